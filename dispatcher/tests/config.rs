//! `weir.toml` loading: defaults, env overrides, and that every problem is reported with its
//! path.

// Helpers outside `#[test]` functions are test code too: a failed unwrap is a failed assertion.
#![allow(clippy::unwrap_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytesize::ByteSize;
use weir_broker_bridge::nats::DeliverFrom;
use weir_broker_bridge::{BrokerKind, Ordering};
use weir_dispatcher::config::{self, ConfigErrors, Isolation};
use weir_schemas::Format;

/// A directory with a `weir.toml` and the module files it names.
struct Fixture {
    dir: tempfile::TempDir,
}

impl Fixture {
    fn new(modules: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        for module in modules {
            let path = dir.path().join(module);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, b"\0asm").unwrap();
        }
        Self { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn write(&self, text: &str) -> PathBuf {
        let file = self.dir.path().join("weir.toml");
        std::fs::write(&file, text).unwrap();
        file
    }
}

fn env(vars: &[(&str, &str)]) -> Vec<(String, String)> {
    vars.iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn paths(errors: &ConfigErrors) -> Vec<&str> {
    errors.iter().map(|p| p.path.as_str()).collect()
}

fn message_at<'a>(errors: &'a ConfigErrors, path: &str) -> &'a str {
    errors
        .iter()
        .find(|p| p.path == path)
        .map(|p| p.message.as_str())
        .unwrap_or_else(|| panic!("no problem at {path}; got:\n{errors}"))
}

fn expect_errors(text: &str, base: &Path) -> ConfigErrors {
    match config::from_toml_str(text, base) {
        Ok(config) => panic!("expected errors, got {config:#?}"),
        Err(errors) => errors,
    }
}

const FULL: &str = r#"
[http]
listen = "0.0.0.0:8081"
max_body = "2MiB"

[brokers.memory]
history = 500
max_pending = 2000

[brokers.kafka]
bootstrap = "127.0.0.1:9092"

[defaults]
timeout = "2s"
memory = "32MiB"
config = { region = "eu", level = "info" }
[defaults.retry]
max_attempts = 7
jitter = 0.5
[defaults.scaling]
max = 8

[[functions]]
name = "order-validate"
module = "modules/validate.wasm"
isolation = "per-event"
timeout = "250ms"
memory = "64MiB"
max_stack = "512KiB"
max_outputs = 4
max_output_bytes = 2048
outputs = ["orders.validated", "orders.audit.>"]
hop_limit = 3
config = { large_threshold = "1000", level = "debug" }
[functions.trigger]
broker = "kafka"
topic = "orders"
format = "cloudevents"
ordering = "key"
group = "validators"
[functions.retry]
max_attempts = 3
initial_delay = "100ms"
multiplier = 1.5
max_delay = "10s"
max_age = "24h"
[functions.dead_letter]
topic = "orders.dlq"
broker = "memory"
[functions.scaling]
min = 0
max = 2
target_lag = 50
scale_down_window = "1m"
idle_timeout = "90s"
max_invocations = 100

[[functions]]
name = "thumbnail"
module = "thumb.wasm"
[functions.trigger]
broker = "memory"
topic = "uploads"
"#;

#[test]
fn full_config_loads_with_defaults_applied() {
    let fixture = Fixture::new(&["modules/validate.wasm", "thumb.wasm"]);
    let file = fixture.write(FULL);
    let config = config::load_with_env(&file, Vec::new()).unwrap_or_else(|e| panic!("{e}"));

    assert_eq!(config.http.listen.to_string(), "0.0.0.0:8081");
    assert_eq!(config.http.max_body, ByteSize::mib(2));
    assert_eq!(config.brokers.memory.history, 500);
    assert_eq!(config.brokers.memory.max_pending, 2000);
    assert_eq!(
        config.brokers.kafka.as_ref().unwrap().bootstrap,
        "127.0.0.1:9092"
    );
    assert_eq!(config.functions.len(), 2);

    // Everything set explicitly wins over [defaults].
    let f = config.function("order-validate").unwrap();
    assert_eq!(f.module, fixture.path().join("modules/validate.wasm"));
    assert_eq!(f.isolation, Isolation::PerEvent);
    assert_eq!(f.timeout, Duration::from_millis(250));
    assert_eq!(f.memory, ByteSize::mib(64));
    assert_eq!(f.max_stack, ByteSize::kib(512));
    assert_eq!(f.max_outputs, 4);
    assert_eq!(f.max_output_bytes, ByteSize::b(2048));
    assert_eq!(f.outputs, ["orders.validated", "orders.audit.>"]);
    assert!(f.output_allowed("orders.validated"));
    assert!(f.output_allowed("orders.audit.eu"));
    assert!(!f.output_allowed("orders.audit"));
    assert!(!f.output_allowed("payments"));
    assert_eq!(f.output_broker, BrokerKind::Kafka);
    assert_eq!(f.hop_limit, 3);
    // Function config is merged over [defaults].config, the function's values winning.
    assert_eq!(
        f.config.get("large_threshold").map(String::as_str),
        Some("1000")
    );
    assert_eq!(f.config.get("level").map(String::as_str), Some("debug"));
    assert_eq!(f.config.get("region").map(String::as_str), Some("eu"));
    assert_eq!(f.trigger.broker, BrokerKind::Kafka);
    assert_eq!(f.trigger.topic, "orders");
    assert_eq!(f.trigger.format, Format::CloudEvents);
    assert_eq!(f.trigger.ordering, Ordering::Key);
    assert_eq!(f.trigger.group, "validators");
    assert_eq!(f.trigger.jetstream, None);
    assert_eq!(f.retry.max_attempts, 3);
    assert_eq!(f.retry.initial_delay, Duration::from_millis(100));
    assert_eq!(f.retry.multiplier, 1.5);
    assert_eq!(f.retry.max_delay, Duration::from_secs(10));
    assert_eq!(f.retry.jitter, 0.5, "jitter comes from [defaults.retry]");
    assert_eq!(f.retry.max_age, Some(Duration::from_secs(24 * 3600)));
    assert_eq!(f.dead_letter.topic, "orders.dlq");
    assert_eq!(f.dead_letter.broker, BrokerKind::Memory);
    assert_eq!(f.scaling.min, 0);
    assert_eq!(f.scaling.max, 2);
    assert_eq!(f.scaling.target_lag, 50);
    assert_eq!(f.scaling.scale_down_window, Duration::from_secs(60));
    assert_eq!(f.scaling.idle_timeout, Duration::from_secs(90));
    assert_eq!(f.scaling.max_invocations, 100);

    // The second function takes [defaults], then the built-in defaults.
    let t = config.function("thumbnail").unwrap();
    assert_eq!(t.module, fixture.path().join("thumb.wasm"));
    assert_eq!(t.isolation, Isolation::Warm);
    assert_eq!(t.timeout, Duration::from_secs(2));
    assert_eq!(t.memory, ByteSize::mib(32));
    assert_eq!(t.max_stack, ByteSize::kib(512));
    assert_eq!(t.max_outputs, 64);
    assert_eq!(t.max_output_bytes, ByteSize::mib(1));
    assert!(t.outputs.is_empty());
    assert!(!t.output_allowed("uploads.done"));
    assert_eq!(t.output_broker, BrokerKind::Memory);
    assert_eq!(t.hop_limit, 16);
    assert_eq!(t.config.len(), 2);
    assert_eq!(t.trigger.format, Format::Auto);
    assert_eq!(t.trigger.ordering, Ordering::Partition);
    assert_eq!(t.trigger.group, "weir-thumbnail");
    assert_eq!(t.retry.max_attempts, 7);
    assert_eq!(t.retry.initial_delay, Duration::from_millis(200));
    assert_eq!(t.retry.multiplier, 2.0);
    assert_eq!(t.retry.max_delay, Duration::from_secs(30));
    assert_eq!(t.retry.max_age, None);
    assert_eq!(t.dead_letter.topic, "weir.dlq.thumbnail");
    assert_eq!(t.dead_letter.broker, BrokerKind::Memory);
    assert_eq!(t.scaling.min, 1);
    assert_eq!(t.scaling.max, 8);
    assert_eq!(t.scaling.target_lag, 10);
    assert_eq!(t.scaling.max_invocations, 10_000);
}

#[test]
fn a_minimal_config_needs_only_a_function() {
    let fixture = Fixture::new(&["f.wasm"]);
    let config = config::from_toml_str(
        "[[functions]]\nname = \"f\"\nmodule = \"f.wasm\"\ntrigger = { broker = \"memory\", topic = \"in\" }\n",
        fixture.path(),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.http.listen.to_string(), "127.0.0.1:8080");
    assert_eq!(config.http.max_body, ByteSize::mib(1));
    assert!(config.brokers.nats.is_none() && config.brokers.kafka.is_none());
    assert_eq!(config.functions[0].timeout, Duration::from_secs(5));
    assert_eq!(config.functions[0].memory, ByteSize::mib(64));
}

#[test]
fn unknown_keys_are_reported_with_their_path() {
    let fixture = Fixture::new(&["a.wasm", "b.wasm"]);
    let errors = expect_errors(
        r#"
        listen_port = 1
        [http]
        listn = "127.0.0.1:1"
        [[functions]]
        name = "a"
        module = "a.wasm"
        [functions.trigger]
        broker = "memory"
        topc = "x"
        [[functions]]
        name = "b"
        module = "b.wasm"
        trigger = { broker = "memory", topic = "in" }
        [functions.retry]
        max_attmpts = 3
        "#,
        fixture.path(),
    );
    let mut got = paths(&errors);
    got.sort_unstable();
    assert_eq!(
        got,
        [
            "functions[0].trigger.topc",
            "functions[1].retry.max_attmpts",
            "http.listn",
            "listen_port"
        ],
        "{errors}"
    );
    assert!(message_at(&errors, "functions[1].retry.max_attmpts")
        .contains("unknown field `max_attmpts`"));
    assert!(message_at(&errors, "listen_port").contains("unknown key `listen_port`"));
}

#[test]
fn a_bad_duration_is_reported_with_its_path() {
    let fixture = Fixture::new(&["a.wasm"]);
    let errors = expect_errors(
        r#"
        [[functions]]
        name = "a"
        module = "a.wasm"
        timeout = "5 parsecs"
        trigger = { broker = "memory", topic = "in" }
        "#,
        fixture.path(),
    );
    assert_eq!(paths(&errors), ["functions[0].timeout"], "{errors}");
    let message = message_at(&errors, "functions[0].timeout");
    assert!(
        message.contains("invalid duration \"5 parsecs\""),
        "{message}"
    );
}

#[test]
fn sizes_parse_from_human_units_and_bytes() {
    let fixture = Fixture::new(&["a.wasm"]);
    let config = config::from_toml_str(
        r#"
        [http]
        max_body = 65536
        [defaults]
        max_output_bytes = "1.5MiB"
        [[functions]]
        name = "a"
        module = "a.wasm"
        memory = "64MiB"
        max_stack = "512KiB"
        trigger = { broker = "memory", topic = "in" }
        "#,
        fixture.path(),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let f = &config.functions[0];
    assert_eq!(f.memory.as_u64(), 64 * 1024 * 1024);
    assert_eq!(f.max_stack.as_u64(), 512 * 1024);
    assert_eq!(f.max_output_bytes.as_u64(), 1024 * 1024 * 3 / 2);
    assert_eq!(config.http.max_body.as_u64(), 65536);

    let errors = expect_errors(
        r#"
        [[functions]]
        name = "a"
        module = "a.wasm"
        memory = "lots"
        trigger = { broker = "memory", topic = "in" }
        "#,
        fixture.path(),
    );
    assert_eq!(paths(&errors), ["functions[0].memory"]);
    assert!(message_at(&errors, "functions[0].memory").contains("invalid size \"lots\""));
}

#[test]
fn every_problem_is_reported_at_once() {
    let fixture = Fixture::new(&["ok.wasm"]);
    let errors = expect_errors(
        r#"
        [http]
        listen = "localhost"

        [defaults.retry]
        multiplier = 0.5

        [[functions]]
        name = "Bad_Name"
        module = "missing.wasm"
        timeout = "1ms"
        outputs = ["orders"]
        [functions.trigger]
        broker = "memory"
        topic = "orders"
        [functions.retry]
        initial_delay = "5s"
        max_delay = "1s"
        jitter = 1.5
        [functions.scaling]
        min = 5
        max = 2

        [[functions]]
        name = "ok"
        module = "ok.wasm"
        [functions.trigger]
        broker = "jetstream"
        topic = "orders.*"
        [functions.dead_letter]
        topic = "orders.dlq"

        [[functions]]
        name = "ok"
        module = "ok.wasm"
        output_broker = "kafka"
        [functions.trigger]
        broker = "memory"
        topic = "x"
        [functions.dead_letter]
        topic = "x"
        "#,
        fixture.path(),
    );
    let expected = [
        "http.listen",
        "defaults.retry.multiplier",
        "functions[0].timeout",
        "functions[0].retry.jitter",
        "functions[0].name",
        "functions[0].module",
        "functions[0].outputs[0]",
        "functions[0].retry.max_delay",
        "functions[0].scaling.max",
        "functions[1].trigger.stream",
        "functions[1].dead_letter.topic",
        "functions[1].trigger.broker",
        "functions[1].output_broker",
        "functions[1].dead_letter.broker",
        "functions[2].name",
        "functions[2].dead_letter.topic",
        "functions[2].output_broker",
    ];
    assert_eq!(paths(&errors), expected, "{errors}");
    assert_eq!(errors.len(), 17);

    assert!(message_at(&errors, "http.listen").contains("not a socket address"));
    assert!(message_at(&errors, "functions[0].outputs[0]")
        .contains("would consume its own outputs and loop"));
    assert!(
        message_at(&errors, "functions[0].retry.max_delay").contains("must be >= initial_delay")
    );
    assert!(message_at(&errors, "functions[0].scaling.max").contains("max (2) must be >= min (5)"));
    assert!(message_at(&errors, "functions[1].trigger.stream")
        .contains("jetstream trigger must name its stream"));
    // `orders.dlq` on NATS is matched by the trigger subject `orders.*`.
    assert!(message_at(&errors, "functions[1].dead_letter.topic")
        .contains("dead letters would be consumed again"));
    assert_eq!(
        message_at(&errors, "functions[1].trigger.broker"),
        "trigger.broker = jetstream but [brokers.nats] is not configured"
    );
    assert!(message_at(&errors, "functions[2].name")
        .contains("duplicate function name \"ok\" (also functions[1])"));
    assert_eq!(
        message_at(&errors, "functions[2].output_broker"),
        "output_broker = kafka but [brokers.kafka] is not configured"
    );

    // Display lists one problem per line, path first.
    let text = errors.to_string();
    assert_eq!(text.lines().count(), 17);
    assert!(
        text.lines()
            .any(|l| l.starts_with("functions[0].retry.jitter: must be between 0 and 1")),
        "{text}"
    );
}

#[test]
fn every_mistake_in_one_section_is_reported_in_one_run() {
    let fixture = Fixture::new(&["a.wasm"]);
    let errors = expect_errors(
        r#"
        [brokers.nats]
        servers = ["nats://user:secret@127.0.0.1:4222"]
        reconnect_delay_max = "-4s"
        connect_timeout = 5
        max_reconnects = "often"
        user = "weir"

        [[functions]]
        name = "a"
        module = "a.wasm"
        timeout = "5 parsecs"
        max_outputs = "many"
        outputs = ["ok", ["nested"], "fine"]
        trigger = { broker = "nats", topic = "in" }
        [functions.retry]
        max_attempts = -1
        initial_delay = "5s"
        max_delay = "1s"
        "#,
        fixture.path(),
    );
    let expected = [
        // Values that do not parse, in path order within each section ...
        "brokers.nats.connect_timeout",
        "brokers.nats.max_reconnects",
        "brokers.nats.reconnect_delay_max",
        "functions[0].max_outputs",
        "functions[0].outputs[1]",
        "functions[0].retry.max_attempts",
        "functions[0].timeout",
        // ... then each section's own checks, which still ran on the rest of it.
        "brokers.nats.servers[0]",
        "brokers.nats.user",
        "functions[0].retry.max_delay",
    ];
    assert_eq!(paths(&errors), expected, "{errors}");
    assert!(message_at(&errors, "brokers.nats.servers[0]").contains("credentials in a server URL"));
    assert!(message_at(&errors, "brokers.nats.user").contains("without password_file"));
    assert!(message_at(&errors, "functions[0].timeout").contains("invalid duration"));
    assert!(message_at(&errors, "functions[0].outputs[1]").contains("invalid type"));
    // The trigger's broker is configured; its section's mistakes are not repeated as
    // "[brokers.nats] is not configured".
    assert!(!errors.to_string().contains("not configured"), "{errors}");
}

#[test]
fn a_required_value_that_does_not_parse_is_reported_once() {
    let fixture = Fixture::new(&["a.wasm"]);
    let errors = expect_errors(
        r#"
        [[functions]]
        name = "a"
        module = "a.wasm"
        timeout = "soon"
        trigger = { broker = "rabbitmq", topic = "in" }
        "#,
        fixture.path(),
    );
    // Without its trigger the function cannot be checked further; no "missing field `broker`"
    // for the broker that was there but wrong.
    assert_eq!(
        paths(&errors),
        ["functions[0].timeout", "functions[0].trigger.broker"],
        "{errors}"
    );

    // A misspelt required key is the unknown key, not also a missing one; a required key that
    // is simply absent is reported beside another value's mistake.
    let errors = expect_errors(
        r#"
        [[functions]]
        name = "a"
        module = "a.wasm"
        trigger = { broker = "memory", topc = "in" }
        [[functions]]
        name = "b"
        module = "a.wasm"
        trigger = { broker = "memory", format = 5 }
        "#,
        fixture.path(),
    );
    assert_eq!(
        paths(&errors),
        [
            "functions[0].trigger.topc",
            "functions[1].trigger",
            "functions[1].trigger.format"
        ],
        "{errors}"
    );
    assert_eq!(
        message_at(&errors, "functions[1].trigger"),
        "missing field `topic`"
    );

    // serde reads a table's keys in hash order and gives up on the whole section at a missing
    // field, so keys after a broken table were reported in some runs and not in others. Each
    // parse hashes afresh; the report must not change.
    let text = r#"
        [[functions]]
        name = "a"
        module = "a.wasm"
        timeout = "5 parsecs"
        memory = "lots"
        max_outputs = "many"
        trigger = { broker = "memory", topc = "in" }
        retry = { max_attempts = "three" }
        "#;
    for _ in 0..20 {
        let errors = expect_errors(text, fixture.path());
        assert_eq!(
            paths(&errors),
            [
                "functions[0].max_outputs",
                "functions[0].memory",
                "functions[0].retry.max_attempts",
                "functions[0].timeout",
                "functions[0].trigger.topc"
            ],
            "{errors}"
        );
    }
}

#[test]
fn a_missing_module_names_the_resolved_path() {
    let fixture = Fixture::new(&[]);
    let file = fixture.write(
        "[[functions]]\nname = \"a\"\nmodule = \"wasm/a.wasm\"\ntrigger = { broker = \"memory\", topic = \"in\" }\n",
    );
    let errors = config::load_with_env(&file, Vec::new()).unwrap_err();
    assert_eq!(paths(&errors), ["functions[0].module"]);
    let resolved = fixture.path().join("wasm/a.wasm");
    assert!(
        message_at(&errors, "functions[0].module").contains(&resolved.display().to_string()),
        "{errors}"
    );
}

/// `weir publish/tail -c` on a machine without the modules, or with a file that only holds
/// broker settings: loaded for connecting, both are fine and the topic map still works; loaded
/// for running, both are refused. Mistakes in what is there are reported either way.
#[test]
fn loading_for_connecting_needs_no_module_files_and_no_functions() {
    let fixture = Fixture::new(&[]);
    let file = fixture.write(
        "[brokers.nats]\nservers = [\"nats://127.0.0.1:4222\"]\n\n[[functions]]\nname = \"a\"\nmodule = \"wasm/a.wasm\"\noutputs = [\"a.out\"]\ntrigger = { broker = \"jetstream\", topic = \"in\", stream = \"IN\" }\n",
    );
    let config =
        config::load_for(&file, config::LoadFor::Connecting).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.topic_broker("in"), BrokerKind::JetStream);
    assert_eq!(config.topic_broker("a.out"), BrokerKind::JetStream);
    assert_eq!(config.topic_broker("elsewhere"), BrokerKind::Memory);
    assert_eq!(config.mentioned_topic_broker("elsewhere"), None);
    let errors = config::load_for(&file, config::LoadFor::Running).unwrap_err();
    assert_eq!(paths(&errors), ["functions[0].module"]);

    let brokers_only = fixture.write("[brokers.nats]\nservers = [\"nats://127.0.0.1:4222\"]\n");
    let config = config::load_for(&brokers_only, config::LoadFor::Connecting)
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(config.brokers.nats.is_some() && config.functions.is_empty());
    let errors = config::load_for(&brokers_only, config::LoadFor::Running).unwrap_err();
    assert_eq!(paths(&errors), ["functions"]);

    let broken = fixture.write(
        "[brokers.nats]\nservers = [\"nats://127.0.0.1:4222\"]\nconnect_timeout = \"soon\"\n",
    );
    let errors = config::load_for(&broken, config::LoadFor::Connecting).unwrap_err();
    assert_eq!(paths(&errors), ["brokers.nats.connect_timeout"]);
}

#[test]
fn deserialization_errors_in_several_functions_are_all_reported() {
    let fixture = Fixture::new(&["a.wasm"]);
    let errors = expect_errors(
        r#"
        [[functions]]
        name = "a"
        module = "a.wasm"
        max_outputs = "many"
        trigger = { broker = "memory", topic = "in" }
        [[functions]]
        name = "b"
        module = "a.wasm"
        trigger = { broker = "rabbitmq", topic = "in" }
        [[functions]]
        name = "c"
        module = "a.wasm"
        "#,
        fixture.path(),
    );
    assert_eq!(
        paths(&errors),
        [
            "functions[0].max_outputs",
            "functions[1].trigger.broker",
            "functions[2]"
        ],
        "{errors}"
    );
    assert_eq!(
        message_at(&errors, "functions[2]"),
        "missing field `trigger`"
    );
    assert_eq!(
        message_at(&errors, "functions[1].trigger.broker"),
        "unknown variant `rabbitmq`, expected one of `memory`, `nats`, `jetstream`, `kafka`"
    );
}

#[test]
fn env_overrides_reach_sections_and_functions() {
    let fixture = Fixture::new(&["modules/validate.wasm", "thumb.wasm"]);
    let file = fixture.write(FULL);
    let config = config::load_with_env(
        &file,
        env(&[
            ("WEIR__HTTP__LISTEN", "127.0.0.1:9000"),
            ("WEIR__BROKERS__MEMORY__HISTORY", "7"),
            ("WEIR__FUNCTIONS__0__RETRY__MAX_ATTEMPTS", "9"),
            ("WEIR__FUNCTIONS__THUMBNAIL__TIMEOUT", "750ms"),
            (
                "WEIR__FUNCTIONS__ORDER_VALIDATE__CONFIG__LARGE_THRESHOLD",
                "5",
            ),
            ("WEIR__DEFAULTS__SCALING__TARGET_LAG", "99"),
            ("UNRELATED", "x"),
        ]),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.http.listen.to_string(), "127.0.0.1:9000");
    assert_eq!(config.brokers.memory.history, 7);
    let f = config.function("order-validate").unwrap();
    assert_eq!(f.retry.max_attempts, 9);
    assert_eq!(f.retry.multiplier, 1.5, "values not overridden stay");
    assert_eq!(
        f.config.get("large_threshold").map(String::as_str),
        Some("5")
    );
    assert_eq!(
        f.scaling.target_lag, 50,
        "the function's own value beats an overridden default"
    );
    let t = config.function("thumbnail").unwrap();
    assert_eq!(t.timeout, Duration::from_millis(750));
    assert_eq!(t.scaling.target_lag, 99);
}

#[test]
fn env_override_problems_name_the_variable() {
    let fixture = Fixture::new(&["modules/validate.wasm", "thumb.wasm"]);
    let file = fixture.write(FULL);
    let errors = config::load_with_env(
        &file,
        env(&[
            ("WEIR__HTTP__LISTEN", "nowhere"),
            ("WEIR__FUNCTIONS__1__RETRY__MAX_ATTEMPTS", "lots"),
            ("WEIR__FUNCTIONS__5__TIMEOUT", "1s"),
            ("WEIR__FUNCTIONS__NO_SUCH__TIMEOUT", "1s"),
        ]),
    )
    .unwrap_err();
    let mut got = paths(&errors);
    got.sort_unstable();
    assert_eq!(
        got,
        [
            "WEIR__FUNCTIONS__5__TIMEOUT",
            "WEIR__FUNCTIONS__NO_SUCH__TIMEOUT",
            "functions[1].retry.max_attempts",
            "http.listen"
        ],
        "{errors}"
    );
    assert!(message_at(&errors, "http.listen")
        .contains("(set by environment variable WEIR__HTTP__LISTEN)"));
    assert!(message_at(&errors, "WEIR__FUNCTIONS__5__TIMEOUT").contains("out of range"));
}

/// The only test that reads the real process environment (the others pass it explicitly, so
/// they cannot see this variable).
#[test]
fn load_reads_the_process_environment() {
    let fixture = Fixture::new(&["modules/validate.wasm", "thumb.wasm"]);
    let file = fixture.write(FULL);
    std::env::set_var("WEIR__HTTP__LISTEN", "127.0.0.1:9555");
    let loaded = config::load(&file);
    std::env::remove_var("WEIR__HTTP__LISTEN");
    assert_eq!(
        loaded
            .unwrap_or_else(|e| panic!("{e}"))
            .http
            .listen
            .to_string(),
        "127.0.0.1:9555"
    );
}

#[test]
fn jetstream_and_wildcard_rules() {
    let fixture = Fixture::new(&["a.wasm"]);
    let errors = expect_errors(
        r#"
        [[functions]]
        name = "a"
        module = "a.wasm"
        outputs = ["orders.*", "payments.>"]
        [functions.trigger]
        broker = "kafka"
        topic = "orders"
        stream = "ORDERS"
        ack_wait = "10s"
        prefetch = 4
        deliver_policy = "new"
        [functions.dead_letter]
        topic = "dlq.>"
        "#,
        fixture.path(),
    );
    assert_eq!(
        paths(&errors),
        [
            "functions[0].trigger.stream",
            "functions[0].trigger.ack_wait",
            "functions[0].trigger.prefetch",
            "functions[0].trigger.deliver_policy",
            "functions[0].outputs[0]",
            "functions[0].dead_letter.topic",
            "functions[0].trigger.broker",
            "functions[0].output_broker",
            "functions[0].dead_letter.broker",
        ],
        "{errors}"
    );
    assert!(message_at(&errors, "functions[0].trigger.stream")
        .contains("only jetstream triggers have a stream"));
    assert!(message_at(&errors, "functions[0].trigger.deliver_policy")
        .contains("only jetstream triggers have a deliver_policy"));
    assert!(message_at(&errors, "functions[0].outputs[0]").contains("only a trailing `>` wildcard"));
}

#[test]
fn merged_engine_problems_display_with_the_rest() {
    let mut errors = ConfigErrors::new();
    assert!(errors.is_empty());
    errors.push(
        "functions[0].module",
        "not a component of world weir:function/function",
    );
    assert!(!errors.is_empty());
    assert_eq!(
        errors.to_string(),
        "functions[0].module: not a component of world weir:function/function"
    );
}

#[test]
fn an_unreadable_file_is_one_problem() {
    let fixture = Fixture::new(&[]);
    let missing = fixture.path().join("nope.toml");
    let errors = config::load(&missing).unwrap_err();
    assert_eq!(errors.len(), 1);
    assert!(errors.to_string().contains("nope.toml"));

    let file = fixture.write("[[functions]]\nname = ");
    let errors = config::load_with_env(&file, Vec::new()).unwrap_err();
    assert_eq!(errors.len(), 1);
    assert!(errors.to_string().contains("weir.toml"), "{errors}");
}

#[test]
fn a_jetstream_trigger_must_be_among_its_declared_streams_subjects() {
    let fixture = Fixture::new(&["a.wasm"]);
    let text = |topic: &str, stream: &str| {
        format!(
            r#"
            [brokers.nats]
            servers = ["nats://127.0.0.1:4333"]
            [[brokers.nats_streams]]
            name = "ORDERS"
            subjects = ["orders.*", "refunds.>"]
            [[functions]]
            name = "a"
            module = "a.wasm"
            [functions.trigger]
            broker = "jetstream"
            topic = "{topic}"
            stream = "{stream}"
            "#
        )
    };
    for topic in ["orders.eu", "orders.*", "refunds.eu.>"] {
        if let Err(errors) = config::from_toml_str(&text(topic, "ORDERS"), fixture.path()) {
            panic!("`{topic}` is captured by ORDERS: {errors}");
        }
    }
    // A stream declared nowhere here may capture anything: only the server knows.
    if let Err(errors) = config::from_toml_str(&text("payments", "PAYMENTS"), fixture.path()) {
        panic!("{errors}");
    }
    for topic in ["payments", "orders", "orders.>", "orders.eu.paid"] {
        let errors = expect_errors(&text(topic, "ORDERS"), fixture.path());
        assert_eq!(paths(&errors), ["functions[0].trigger.topic"], "{errors}");
        let message = message_at(&errors, "functions[0].trigger.topic");
        assert!(
            message.contains(&format!(
                "`{topic}` is not among the subjects of stream ORDERS"
            )) && message.contains("orders.*, refunds.>"),
            "{message}"
        );
    }
}

#[test]
fn broker_sections_are_validated_by_their_own_rules() {
    let fixture = Fixture::new(&["a.wasm"]);
    let config = config::from_toml_str(
        r#"
        [brokers.nats]
        servers = ["nats://127.0.0.1:4333"]
        [[brokers.nats_streams]]
        name = "ORDERS"
        subjects = ["orders.>"]
        [[functions]]
        name = "a"
        module = "a.wasm"
        timeout = "1s"
        outputs = ["audit.orders"]
        [functions.trigger]
        broker = "jetstream"
        topic = "orders.*"
        stream = "ORDERS"
        ack_wait = "5s"
        deliver_policy = "new"
        [[functions]]
        name = "b"
        module = "a.wasm"
        [functions.trigger]
        broker = "jetstream"
        topic = "orders.b"
        stream = "ORDERS"
        "#,
        fixture.path(),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let f = &config.functions[0];
    let js = f.trigger.jetstream.as_ref().unwrap();
    assert_eq!(
        (js.stream.as_str(), js.ack_wait, js.deliver_policy),
        ("ORDERS", Duration::from_secs(5), DeliverFrom::New)
    );
    let b = config.functions[1].trigger.jetstream.as_ref().unwrap();
    assert_eq!(
        b.deliver_policy,
        DeliverFrom::All,
        "the stream's first message, by default"
    );
    assert_eq!(f.output_broker, BrokerKind::JetStream);
    assert_eq!(f.dead_letter.topic, "weir.dlq.a");
    assert_eq!(config.brokers.nats_streams[0].name, "ORDERS");

    let errors = expect_errors(
        r#"
        [brokers.nats]
        servers = []
        [brokers.kafka]
        bootstrap = "no-port"
        [[brokers.nats_streams]]
        name = "ORDERS"
        subjects = []
        [[functions]]
        name = "a"
        module = "a.wasm"
        timeout = "10s"
        [functions.trigger]
        broker = "jetstream"
        topic = "orders"
        stream = "ORDERS"
        ack_wait = "5s"
        prefetch = 5000
        ordering = "key"
        deliver_policy = "first"
        "#,
        fixture.path(),
    );
    assert_eq!(
        paths(&errors),
        [
            "functions[0].trigger.deliver_policy",
            "brokers.nats.servers",
            "brokers.kafka.bootstrap",
            "brokers.nats_streams[0].subjects",
            "functions[0].trigger.ack_wait",
            "functions[0].trigger.prefetch",
            "functions[0].trigger.ordering",
        ],
        "{errors}"
    );
    assert!(message_at(&errors, "functions[0].trigger.ack_wait")
        .contains("must exceed the function timeout"));
    assert!(message_at(&errors, "functions[0].trigger.prefetch").contains("at most 1024"));
    assert!(
        message_at(&errors, "functions[0].trigger.deliver_policy")
            .contains(r#"unknown deliver policy "first"; expected "all", "new", "last", "last_per_subject", { start_sequence = N } or { start_time = "<RFC 3339 time>" }"#),
        "{errors}"
    );
    assert!(message_at(&errors, "functions[0].trigger.ordering")
        .contains("jetstream triggers run events in parallel"));
}

/// Every JetStream deliver policy, by name or as a one-key table, from a function or from
/// `[defaults.trigger]`; what is not one is refused at its key path, saying what would be.
#[test]
fn jetstream_deliver_policies_are_names_or_a_start_position() {
    let fixture = Fixture::new(&["a.wasm"]);
    let with = |policy: &str| {
        format!(
            r#"
            [brokers.nats]
            servers = ["nats://127.0.0.1:4333"]
            [defaults.trigger]
            deliver_policy = "last"
            [[functions]]
            name = "a"
            module = "a.wasm"
            [functions.trigger]
            broker = "jetstream"
            topic = "orders.a"
            stream = "ORDERS"
            {policy}
            "#
        )
    };
    let policy_of = |policy: &str| {
        let config = config::from_toml_str(&with(policy), fixture.path())
            .unwrap_or_else(|e| panic!("{policy}: {e}"));
        config.functions[0]
            .trigger
            .jetstream
            .as_ref()
            .unwrap()
            .deliver_policy
    };
    for (policy, expected) in [
        ("", DeliverFrom::Last),
        ("deliver_policy = \"all\"", DeliverFrom::All),
        ("deliver_policy = \"new\"", DeliverFrom::New),
        (
            "deliver_policy = \"last_per_subject\"",
            DeliverFrom::LastPerSubject,
        ),
        (
            "deliver_policy = { start_sequence = 42 }",
            DeliverFrom::StartSequence(42),
        ),
    ] {
        assert_eq!(policy_of(policy), expected, "{policy}");
    }
    match policy_of("deliver_policy = { start_time = \"2026-12-01T09:30:00+01:00\" }") {
        // 2026-12-01T08:30:00Z
        DeliverFrom::StartTime(at) => assert_eq!(at.unix_timestamp(), 1_796_113_800),
        other => panic!("{other:?}"),
    }
    for (policy, says) in [
        (
            "deliver_policy = { start_sequence = 0 }",
            "start_sequence is a stream sequence, counted from 1 (the stream's first message); got 0",
        ),
        ("deliver_policy = { start_sequence = -3 }", "got -3"),
        ("deliver_policy = { start_sequence = \"42\" }", "got \"42\""),
        (
            "deliver_policy = { start_time = 1 }",
            "start_time is an RFC 3339 time in quotes",
        ),
        (
            "deliver_policy = { start_time = \"yesterday\" }",
            r#"start_time "yesterday" is not an RFC 3339 time"#,
        ),
        (
            "deliver_policy = { start_sequence = 1, start_time = \"2026-12-01T00:00:00Z\" }",
            "a deliver policy table holds one key",
        ),
        (
            "deliver_policy = { from = 1 }",
            "a deliver policy table holds one key",
        ),
        ("deliver_policy = 7", "expected \"all\", \"new\""),
    ] {
        let errors = expect_errors(&with(policy), fixture.path());
        assert_eq!(
            paths(&errors),
            ["functions[0].trigger.deliver_policy"],
            "{policy}: {errors}"
        );
        assert!(
            message_at(&errors, "functions[0].trigger.deliver_policy").contains(says),
            "{policy}: {errors}"
        );
    }
}

#[test]
fn two_functions_may_not_read_through_one_consumer() {
    let fixture = Fixture::new(&["a.wasm"]);
    // Two functions, each with its trigger's broker, topic, stream and group.
    let text = |first: (&str, &str, &str, &str), second: (&str, &str, &str, &str)| {
        let function = |name: &str, (broker, topic, stream, group): (&str, &str, &str, &str)| {
            let stream = if stream.is_empty() {
                String::new()
            } else {
                format!("stream = \"{stream}\"\n")
            };
            let group = if group.is_empty() {
                String::new()
            } else {
                format!("group = \"{group}\"\n")
            };
            format!(
                "[[functions]]\nname = \"{name}\"\nmodule = \"a.wasm\"\n\
                 [functions.trigger]\nbroker = \"{broker}\"\ntopic = \"{topic}\"\n{stream}{group}"
            )
        };
        format!(
            "[brokers.nats]\nservers = [\"nats://127.0.0.1:4333\"]\n\
             [brokers.kafka]\nbootstrap = \"127.0.0.1:9092\"\n{}{}",
            function("first", first),
            function("second", second)
        )
    };
    let refused = [
        // One durable consumer, whatever the subjects: the second binding re-points it.
        (
            ("jetstream", "orders.eu", "ORDERS", "shared"),
            ("jetstream", "orders.us", "ORDERS", "shared"),
            "is already the durable consumer on stream ORDERS of functions[0] (first): a \
             durable consumer has one subject filter, so the second binding would re-point it",
        ),
        (
            ("nats", "orders.*", "", "shared"),
            ("nats", "orders.eu", "", "shared"),
            "is already the queue group on `orders.*` (overlapping `orders.eu`) of functions[0]",
        ),
        (
            ("kafka", "orders", "", "shared"),
            ("kafka", "orders", "", "shared"),
            "is already the consumer group on `orders` of functions[0] (first)",
        ),
        (
            ("memory", "orders", "", "shared"),
            ("memory", "orders", "", "shared"),
            "is already the consumer group on `orders` of functions[0] (first)",
        ),
        // A group named after another function's default.
        (
            ("memory", "orders", "", ""),
            ("memory", "orders", "", "weir-first"),
            "\"weir-first\" is already the consumer group on `orders` of functions[0] (first)",
        ),
    ];
    for (first, second, expected) in refused {
        let split = first.0 != "jetstream";
        let errors = expect_errors(&text(first, second), fixture.path());
        assert_eq!(paths(&errors), ["functions[1].trigger.group"], "{errors}");
        let message = message_at(&errors, "functions[1].trigger.group");
        assert!(
            message.contains(expected) && message.contains("give each function its own group"),
            "{message}"
        );
        assert_eq!(
            message.contains("each seeing only a share"),
            split,
            "{message}"
        );
    }
    let accepted = [
        // Each function its own default group.
        (
            ("jetstream", "orders.eu", "ORDERS", ""),
            ("jetstream", "orders.eu", "ORDERS", ""),
        ),
        (("kafka", "orders", "", ""), ("kafka", "orders", "", "")),
        // One name on different streams is two durable consumers.
        (
            ("jetstream", "orders.eu", "ORDERS", "shared"),
            ("jetstream", "refunds", "REFUNDS", "shared"),
        ),
        // Queue groups on subjects no message matches both of.
        (
            ("nats", "orders.*", "", "shared"),
            ("nats", "orders.eu.paid", "", "shared"),
        ),
        // A Kafka group may read several topics; memory groups are per topic.
        (
            ("kafka", "orders", "", "shared"),
            ("kafka", "refunds", "", "shared"),
        ),
        (
            ("memory", "orders", "", "shared"),
            ("memory", "refunds", "", "shared"),
        ),
        // Different brokers.
        (
            ("nats", "orders", "", "shared"),
            ("memory", "orders", "", "shared"),
        ),
    ];
    for (first, second) in accepted {
        if let Err(errors) = config::from_toml_str(&text(first, second), fixture.path()) {
            panic!("{first:?} and {second:?}: {errors}");
        }
    }
}

#[test]
fn a_work_queue_stream_has_one_function_per_subject() {
    let fixture = Fixture::new(&["a.wasm"]);
    let text = |retention: &str, first: &str, second: &str| {
        let function = |name: &str, topic: &str| {
            format!(
                "[[functions]]\nname = \"{name}\"\nmodule = \"a.wasm\"\n\
                 [functions.trigger]\nbroker = \"jetstream\"\ntopic = \"{topic}\"\n\
                 stream = \"JOBS\"\n"
            )
        };
        format!(
            "[brokers.nats]\nservers = [\"nats://127.0.0.1:4333\"]\n\
             [[brokers.nats_streams]]\nname = \"JOBS\"\nsubjects = [\"jobs.>\"]\n\
             retention = \"{retention}\"\n{}{}",
            function("first", first),
            function("second", second)
        )
    };
    for (first, second) in [("jobs.>", "jobs.resize"), ("jobs.*", "jobs.resize")] {
        let errors = expect_errors(&text("workqueue", first, second), fixture.path());
        assert_eq!(paths(&errors), ["functions[1].trigger.topic"], "{errors}");
        let message = message_at(&errors, "functions[1].trigger.topic");
        assert!(
            message.contains(&format!(
                "`jobs.resize` overlaps `{first}`, which functions[0] (first) reads from stream \
                 JOBS, a workqueue stream"
            )),
            "{message}"
        );
    }
    // Subjects apart on a work queue, and any subjects on the other retentions.
    let accepted = [
        ("workqueue", "jobs.resize", "jobs.crop"),
        ("limits", "jobs.>", "jobs.resize"),
        ("interest", "jobs.>", "jobs.resize"),
    ];
    for (retention, first, second) in accepted {
        if let Err(errors) = config::from_toml_str(&text(retention, first, second), fixture.path())
        {
            panic!("{retention}, {first} and {second}: {errors}");
        }
    }
}
