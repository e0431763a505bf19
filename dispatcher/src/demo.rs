//! The demo pipeline `weir up` runs: the example functions on `db.changes`, `uploads` and
//! `orders`, on the embedded memory bus (or on NATS / Kafka when asked).
//!
//! It only produces a configuration; running it is [`crate::runtime`]'s job.

use std::path::{Path, PathBuf};

use weir_broker_bridge::BrokerKind;

use crate::config::{self, Config, ConfigErrors};

/// The example functions' module files, as `make functions` builds them.
pub const MODULES: [&str; 4] = [
    "db_audit.wasm",
    "upload_indexer.wasm",
    "order_validate.wasm",
    "order_enrich.wasm",
];

/// Where `make functions` puts the components, relative to the repository root.
pub const BUILD_DIR: &str = "functions/target/wasm32-wasip2/release";

/// Where the demo pipeline runs.
#[derive(Debug, Clone)]
pub enum DemoBroker {
    /// The embedded memory bus.
    Memory,
    /// JetStream on this NATS server URL; streams are created when missing.
    JetStream(String),
    /// Kafka at this bootstrap address; topics are created when missing.
    Kafka(String),
}

impl DemoBroker {
    fn kind(&self) -> BrokerKind {
        match self {
            DemoBroker::Memory => BrokerKind::Memory,
            DemoBroker::JetStream(_) => BrokerKind::JetStream,
            DemoBroker::Kafka(_) => BrokerKind::Kafka,
        }
    }
}

/// The demo configuration, with modules resolved against `functions_dir`.
pub fn config(
    broker: &DemoBroker,
    functions_dir: &Path,
    listen: std::net::SocketAddr,
) -> Result<Config, ConfigErrors> {
    config::from_toml_str(&toml(broker, &listen.to_string(), None), functions_dir)
}

/// The demo's JetStream streams: every demo subject, outputs and dead letters included, is
/// captured by one (JetStream publishes need a stream to confirm them).
pub const STREAMS: [(&str, &str); 4] = [
    ("WEIR_DEMO_DB", r#"["db.changes", "db.audit"]"#),
    ("WEIR_DEMO_UPLOADS", r#"["uploads", "uploads.indexed"]"#),
    ("WEIR_DEMO_ORDERS", r#"["orders", "orders.>"]"#),
    ("WEIR_DEMO_DLQ", r#"["weir.dlq.>"]"#),
];

fn broker_sections(broker: &DemoBroker) -> String {
    match broker {
        DemoBroker::Memory => String::new(),
        DemoBroker::JetStream(url) => {
            let mut text =
                format!("\n[brokers.nats]\nservers = [\"{url}\"]\nname = \"weir-demo\"\n");
            for (name, subjects) in STREAMS {
                text.push_str(&format!(
                    "\n[[brokers.nats_streams]]\nname = \"{name}\"\nsubjects = {subjects}\n"
                ));
            }
            text
        }
        DemoBroker::Kafka(bootstrap) => {
            format!("\n[brokers.kafka]\nbootstrap = \"{bootstrap}\"\ncreate_topics = true\n")
        }
    }
}

/// The demo configuration as TOML (also what `weir up --print-config` shows). Module paths
/// are `modules_dir` joined with each module's file name, or the bare file names (relative to
/// the file's directory, as `weir run -c` reads them) without it.
pub fn toml(demo: &DemoBroker, listen: &str, modules_dir: Option<&Path>) -> String {
    let broker = demo.kind();
    let broker_name = broker.as_str();
    let trigger_extra = match broker {
        BrokerKind::JetStream => |stream: &str| format!("stream = \"{stream}\"\n"),
        _ => |_: &str| String::new(),
    };
    let function =
        |name: &str, module: &str, topic: &str, stream: &str, output: &str, extra: &str| {
            let module = match modules_dir {
                Some(dir) => dir.join(module).display().to_string(),
                None => module.to_owned(),
            };
            // A TOML string however the path is spelled (quotes, backslashes).
            let module = ::toml::Value::String(module);
            format!(
                r#"
[[functions]]
name = "{name}"
module = {module}
outputs = ["{output}"]
{extra}
[functions.trigger]
broker = "{broker_name}"
topic = "{topic}"
{trigger}"#,
                trigger = trigger_extra(stream),
            )
        };
    let mut text = format!(
        r#"# The demo pipeline of `weir up`.
[http]
listen = "{listen}"

[defaults]
timeout = "2s"
memory = "64MiB"

[defaults.retry]
max_attempts = 3
initial_delay = "200ms"

[defaults.scaling]
min = 1
max = 4
"#
    );
    text.push_str(&broker_sections(demo));
    text.push_str(&function(
        "db-audit",
        MODULES[0],
        "db.changes",
        "WEIR_DEMO_DB",
        "db.audit",
        "",
    ));
    text.push_str(&function(
        "upload-indexer",
        MODULES[1],
        "uploads",
        "WEIR_DEMO_UPLOADS",
        "uploads.indexed",
        "",
    ));
    text.push_str(&function(
        "order-validate",
        MODULES[2],
        "orders",
        "WEIR_DEMO_ORDERS",
        "orders.validated",
        "",
    ));
    text.push_str(&function(
        "order-enrich",
        MODULES[3],
        "orders.validated",
        "WEIR_DEMO_ORDERS",
        "orders.enriched",
        "config = { large_threshold = \"1000\", currency = \"EUR\" }\n",
    ));
    text
}

/// Find the directory holding the example components: `--functions`, else `WEIR_FUNCTIONS_DIR`,
/// else the build directory under the current directory or above the `weir` executable, else
/// `/opt/weir/functions` (the container image).
pub fn find_functions_dir(explicit: Option<&Path>) -> Result<PathBuf, String> {
    let has_modules = |dir: &Path| MODULES.iter().all(|m| dir.join(m).is_file());
    if let Some(dir) = explicit {
        return if has_modules(dir) {
            Ok(dir.to_path_buf())
        } else {
            Err(format!(
                "{} does not contain the example components ({}): run `make functions`",
                dir.display(),
                MODULES.join(", ")
            ))
        };
    }
    let mut candidates = Vec::new();
    if let Some(dir) = std::env::var_os("WEIR_FUNCTIONS_DIR") {
        candidates.push(PathBuf::from(dir));
    }
    if let Ok(cwd) = std::env::current_dir() {
        candidates.push(cwd.join(BUILD_DIR));
    }
    if let Ok(exe) = std::env::current_exe() {
        // target/{debug,release}/weir → the repository root is three levels up.
        if let Some(root) = exe.ancestors().nth(3) {
            candidates.push(root.join(BUILD_DIR));
        }
    }
    candidates.push(PathBuf::from("/opt/weir/functions"));
    candidates.iter().find(|dir| has_modules(dir)).cloned().ok_or_else(|| {
        format!(
            "the example components were not found (looked in {}): run `make functions`, or pass --functions DIR",
            candidates.iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(", ")
        )
    })
}
