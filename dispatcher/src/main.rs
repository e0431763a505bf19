//! The `weir` command line.

use std::io::Read as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context as _};
use clap::{Args, Parser, Subcommand};
use weir_broker_bridge::kafka::{KafkaConfig, KafkaTransport};
use weir_broker_bridge::nats::{NatsConfig, NatsTransport};
use weir_broker_bridge::{BrokerKind, TransportError};
use weir_dispatcher::config::{self, Config};
use weir_dispatcher::deadletter::DeadLetterReason;
use weir_dispatcher::redrive;
use weir_dispatcher::runtime::{self, Runtime};
use weir_dispatcher::{demo, engine, http, ingress, telemetry};

/// mimalloc rather than glibc's malloc, whose arena locks cost a busy dispatcher a fifth of
/// its CPU (many small, short-lived allocations moving between worker threads).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `eprintln!` that does not panic when standard error is a pipe whose reader has gone
/// (`weir check -c bad.toml 2>&1 | head -1`): standard error is where a failure would be
/// reported, so there is nobody left to tell, and the exit code still says how it went.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _unheard = writeln!(std::io::stderr().lock(), $($arg)*);
    }};
}

/// Where `weir up` serves HTTP and where `publish` / `tail` look for a weir by default.
const DEFAULT_HTTP: &str = "127.0.0.1:8080";

#[derive(Debug, Parser)]
#[command(
    name = "weir",
    version,
    about = "Weir: WebAssembly functions on NATS, JetStream, Kafka and an embedded bus"
)]
struct Cli {
    /// Log format.
    #[arg(long, global = true, default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the demo pipeline on the embedded memory bus (no broker needed).
    Up(UpArgs),
    /// Run a configuration file.
    Run {
        #[arg(short, long, value_name = "FILE")]
        config: PathBuf,
        /// Override `http.listen`.
        #[arg(long, value_name = "ADDR")]
        http: Option<SocketAddr>,
    },
    /// Validate a configuration and its modules; list every problem with its key path.
    Check {
        #[arg(short, long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Publish events to a running weir, or straight to NATS or Kafka.
    Publish(PublishArgs),
    /// Print a topic's events as JSON lines, from its retained history on, and follow.
    Tail(TailArgs),
    /// Dead-letter queues.
    #[command(subcommand)]
    Dlq(DlqCommand),
}

#[derive(Debug, Subcommand)]
enum DlqCommand {
    /// Send a function's dead-lettered events back to it, each to the topic it came in on.
    /// A record is removed (JetStream) or moved past (Kafka) once its event is confirmed;
    /// other functions on that topic do not run it again. Prints a JSON line per record,
    /// then a summary.
    Redrive(RedriveArgs),
}

#[derive(Debug, Args)]
struct RedriveArgs {
    /// The function whose dead letters to send back.
    function: String,
    /// The configuration that runs the function: its trigger, dead-letter topic and broker
    /// settings. Its modules need not be on this machine.
    #[arg(short = 'c', long = "config", value_name = "FILE")]
    config: PathBuf,
    /// Only records with this reason (repeat for several): retries-exhausted, rejected,
    /// undecodable, timeout, trap, hop-limit, expired.
    #[arg(long, value_name = "REASON", value_parser = parse_reason)]
    reason: Vec<DeadLetterReason>,
    /// Send at most this many events; the rest stays for the next redrive.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    limit: Option<u64>,
    /// Say what would be sent, and send, remove and move past nothing.
    #[arg(long)]
    dry_run: bool,
    /// Leave the records in the dead-letter queue after sending them (JetStream: not deleted;
    /// Kafka: the redrive group's offsets not moved), so the next redrive sends them again.
    #[arg(long)]
    keep: bool,
}

/// `--reason`: one of the reasons a dead-letter record gives.
fn parse_reason(text: &str) -> Result<DeadLetterReason, String> {
    DeadLetterReason::parse(text).ok_or_else(|| {
        let known: Vec<&str> = DeadLetterReason::ALL.iter().map(|r| r.as_str()).collect();
        format!("not a dead-letter reason; give one of {}", known.join(", "))
    })
}

#[derive(Debug, Args)]
struct UpArgs {
    /// Where the HTTP server listens.
    #[arg(long, value_name = "ADDR", default_value = DEFAULT_HTTP)]
    http: SocketAddr,
    /// Directory with the example components (default: the `make functions` output).
    #[arg(long, value_name = "DIR")]
    functions: Option<PathBuf>,
    /// Run the demo on JetStream at this NATS URL instead (streams are created when missing).
    #[arg(long, value_name = "URL", conflicts_with = "kafka")]
    nats: Option<String>,
    /// Run the demo on Kafka at this bootstrap address instead (topics are created when missing).
    #[arg(long, value_name = "BOOTSTRAP")]
    kafka: Option<String>,
    /// Print the demo configuration and exit.
    #[arg(long)]
    print_config: bool,
}

impl UpArgs {
    fn demo_broker(&self) -> demo::DemoBroker {
        match (&self.nats, &self.kafka) {
            (Some(url), _) => demo::DemoBroker::JetStream(url.clone()),
            (None, Some(bootstrap)) => demo::DemoBroker::Kafka(bootstrap.clone()),
            (None, None) => demo::DemoBroker::Memory,
        }
    }
}

#[derive(Debug, Args)]
struct PublishArgs {
    topic: String,
    /// The event data (JSON). Without --data or --file, stdin is read.
    #[arg(long, conflicts_with = "file")]
    data: Option<String>,
    #[arg(long, value_name = "PATH")]
    file: Option<PathBuf>,
    /// Send a CloudEvent of this type (binary mode). Without it the body is sent as is, and
    /// Weir recognises Debezium, S3/MinIO and CloudEvents JSON by their shape (a JSON array of
    /// CloudEvents is a batch: each event is published on its own).
    #[arg(long = "type", value_name = "TYPE")]
    ty: Option<String>,
    /// CloudEvents `source` with --type.
    #[arg(long, default_value = "weir-cli", requires = "ty")]
    source: String,
    /// Ordering key: the `partitionkey` extension with --type; on Kafka also the record's key
    /// (with or without --type).
    #[arg(long)]
    key: Option<String>,
    /// How many times to send it (at least once).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    count: u64,
    /// Events per second, from one a day (1/86400) to 1e9 (default: as fast as the server
    /// accepts them).
    #[arg(long, value_parser = parse_rate, allow_negative_numbers = true)]
    rate: Option<f64>,
    /// A running weir's HTTP address (default 127.0.0.1:8080; with -c, its `[http] listen`).
    #[arg(long, value_name = "ADDR")]
    http: Option<String>,
    /// Publish straight to NATS at this URL (JetStream, confirmed), not through a running weir.
    #[arg(long, value_name = "URL")]
    nats: Option<String>,
    /// A core NATS publish (unconfirmed) instead of JetStream.
    #[arg(long, conflicts_with_all = ["kafka", "http"])]
    core: bool,
    /// Publish straight to Kafka at this bootstrap address (acks=all), not through a running weir.
    #[arg(long, value_name = "BOOTSTRAP", conflicts_with = "nats")]
    kafka: Option<String>,
    /// Connect as this weir configuration does: its `[brokers.nats]` / `[brokers.kafka]`
    /// settings (credentials, TLS) apply, and without --nats or --kafka the topic goes to the
    /// broker it lives on there (a JetStream topic confirmed, a core subject core); a topic it
    /// does not mention, to its only broker if it configures one (NATS: JetStream), else to
    /// its `[http] listen`. Its modules need not be on this machine.
    #[arg(short = 'c', long = "config", value_name = "FILE")]
    config: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct TailArgs {
    topic: String,
    /// Exit after this many events (at least one).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    limit: Option<u64>,
    /// Start at the last N messages instead of the oldest, then follow (0: new messages only).
    /// On a weir's memory bus and a JetStream subject, the topic's last N; on Kafka, the last
    /// N of each partition.
    #[arg(long, value_name = "N", conflicts_with = "core")]
    last: Option<u64>,
    /// A running weir's HTTP address (default 127.0.0.1:8080; with -c, its `[http] listen`).
    #[arg(long, value_name = "ADDR")]
    http: Option<String>,
    /// Read the subject on NATS at this URL instead of a weir's history: when a JetStream
    /// stream captures it, from the stream's first message on (or the last N), then following;
    /// else (a core subject, or a server without JetStream) new messages only.
    #[arg(long, value_name = "URL")]
    nats: Option<String>,
    /// Follow the core NATS subject (new messages only) even when a stream captures it.
    #[arg(long, conflicts_with_all = ["kafka", "http"])]
    core: bool,
    /// Read the topic on Kafka at this bootstrap address, from its earliest retained offset on
    /// (or the last N), then following. Joins no consumer group and commits nothing.
    #[arg(long, value_name = "BOOTSTRAP", conflicts_with = "nats")]
    kafka: Option<String>,
    /// Connect as this weir configuration does: its `[brokers.nats]` / `[brokers.kafka]`
    /// settings (credentials, TLS) apply, and without --nats or --kafka the topic is read on
    /// the broker it lives on there; a topic it does not mention, on its only broker if it
    /// configures one, else through its `[http] listen`. Its modules need not be on this
    /// machine.
    #[arg(short = 'c', long = "config", value_name = "FILE")]
    config: Option<PathBuf>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // A server logs what it does; a client command only what went wrong.
    let default_level = match cli.command {
        Command::Up(_) | Command::Run { .. } => "info",
        _ => "warn",
    };
    init_logging(&cli.log_format, default_level);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            say!("error: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.command)) {
        Ok(code) => code,
        Err(e) => {
            say!("error: {e:#}");
            if e.is::<BadInput>() {
                usage_exit()
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// The exit code of a command given something wrong (its own arguments, as clap gives for what
/// it finds itself, or its configuration, as `weir check` gives): scripts can tell a mistake
/// to fix (2) from a failure to do what was asked (1).
fn usage_exit() -> ExitCode {
    ExitCode::from(2)
}

/// What the command was given is wrong: a `-c` configuration that is not valid, or arguments
/// that only turn out to contradict each other once it is read (what clap can see alone it
/// reports itself). Exits with [`usage_exit`].
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct BadInput(String);

/// `path is not valid:` and every problem, as [`BadInput`].
fn invalid_config(path: &std::path::Path, problems: impl std::fmt::Display) -> anyhow::Error {
    BadInput(format!("{} is not valid:\n{problems}", path.display())).into()
}

/// `--rate`: a positive, finite number of events per second, one event every 1 ns to 1 day. A
/// zero gap would make the pacing timer panic, and so would a gap that overflows its clock.
fn parse_rate(text: &str) -> Result<f64, String> {
    const LONGEST_GAP: Duration = Duration::from_secs(24 * 60 * 60);
    let rate: f64 = text
        .parse()
        .map_err(|e| format!("{e}: give events per second, e.g. 100 or 0.5"))?;
    if !(rate > 0.0 && rate.is_finite()) {
        return Err("must be a positive number of events per second".into());
    }
    match Duration::try_from_secs_f64(1.0 / rate) {
        Ok(gap) if !gap.is_zero() && gap <= LONGEST_GAP => Ok(rate),
        // Clap names the value given; printed back it could be three hundred digits.
        _ => Err("cannot be paced: give one event every 1 ns to 1 day \
             (1e9 to 1/86400 events per second)"
            .into()),
    }
}

fn init_logging(format: &str, default_level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("WEIR_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

async fn run(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Up(args) => up(args).await,
        Command::Run { config, http } => {
            let mut config = load_checked(&config)?;
            if let Some(http) = http {
                config.http.listen = http;
            }
            serve(config, None).await
        }
        Command::Check { config } => check(&config),
        Command::Publish(args) => publish(args).await,
        Command::Tail(args) => tail(args).await,
        Command::Dlq(DlqCommand::Redrive(args)) => redrive(args).await,
    }
}

async fn up(args: UpArgs) -> anyhow::Result<ExitCode> {
    if args.print_config {
        // Module paths that run from wherever the file is saved: `weir run -c` reads a
        // relative path against the file's directory, where the components seldom are.
        let dir = match demo::find_functions_dir(args.functions.as_deref()) {
            Ok(dir) => Some(std::path::absolute(&dir).unwrap_or(dir)),
            Err(why) if args.functions.is_some() => return Err(anyhow::Error::msg(why)),
            Err(why) => {
                say!(
                    "weir up --print-config: module paths are bare file names, relative to the \
                     file's directory ({why})"
                );
                None
            }
        };
        let toml = demo::toml(&args.demo_broker(), &args.http.to_string(), dir.as_deref());
        print_line(&toml.trim_end())?;
        return Ok(ExitCode::SUCCESS);
    }
    let dir = demo::find_functions_dir(args.functions.as_deref()).map_err(anyhow::Error::msg)?;
    let broker = args.demo_broker();
    let config = demo::config(&broker, &dir, args.http)
        .map_err(|e| anyhow::anyhow!("demo configuration:\n{e}"))?;
    let default_http: SocketAddr = DEFAULT_HTTP.parse()?;
    // The demo's topics live on its broker, so the commands to try go there; on the memory
    // bus they go through this weir's HTTP server.
    let (on, via) = match &broker {
        demo::DemoBroker::Memory if args.http == default_http => {
            ("the embedded memory bus".to_owned(), String::new())
        }
        demo::DemoBroker::Memory => (
            "the embedded memory bus".to_owned(),
            format!(" --http {}", args.http),
        ),
        demo::DemoBroker::JetStream(url) => {
            (format!("JetStream at {url}"), format!(" --nats {url}"))
        }
        demo::DemoBroker::Kafka(bootstrap) => (
            format!("Kafka at {bootstrap}"),
            format!(" --kafka {bootstrap}"),
        ),
    };
    // A redrive reads the dead letters on their broker, which the memory bus is not.
    let redrive = match &broker {
        demo::DemoBroker::Memory => String::new(),
        demo::DemoBroker::JetStream(_) | demo::DemoBroker::Kafka(_) => format!(
            "\n  weir up{via} --print-config > weir.toml     # the demo as a file, for -c\n  \
             weir dlq redrive order-validate -c weir.toml --dry-run     # what would go back"
        ),
    };
    let banner = format!(
        r#"
Weir is up: the demo pipeline on {on}, HTTP on http://{addr}

Try, in another terminal:
  weir publish orders --type com.example.order --data '{{"id":"o-1","amount":42}}'{via}
  weir tail orders.enriched --limit 1{via}
  weir publish orders --type com.example.order --data '{{"id":"o-2"}}'{via}     # rejected: no amount
  weir tail weir.dlq.order-validate --limit 1{via}{redrive}
  curl -s http://{addr}/v1/functions
"#,
        addr = args.http
    );
    serve(config, Some(banner)).await
}

/// Load a config file and check its modules; every problem is an error.
fn load_checked(path: &std::path::Path) -> anyhow::Result<Config> {
    let config = config::load(path).map_err(|e| invalid_config(path, e))?;
    let engine = engine::WasmEngine::new(&runtime::engine_settings(&config))?;
    runtime::load_modules(&engine, &config).map_err(|e| invalid_config(path, e))?;
    Ok(config)
}

fn check(path: &std::path::Path) -> anyhow::Result<ExitCode> {
    let problems = match config::load(path) {
        Ok(config) => {
            let engine = engine::WasmEngine::new(&runtime::engine_settings(&config))?;
            match runtime::load_modules(&engine, &config) {
                Ok(_) => {
                    print_line(&format_args!(
                        "{}: ok ({})",
                        path.display(),
                        count_of(config.functions.len(), "function")
                    ))?;
                    return Ok(ExitCode::SUCCESS);
                }
                Err(e) => e,
            }
        }
        Err(e) => e,
    };
    // Module checks need a config that parsed; parse problems are listed alone.
    let count = problems.len();
    say!(
        "{}: {count} problem{}",
        path.display(),
        if count == 1 { "" } else { "s" }
    );
    for problem in problems.iter() {
        say!("  {}: {}", problem.path, problem.message);
    }
    Ok(usage_exit())
}

async fn serve(config: Config, banner: Option<String>) -> anyhow::Result<ExitCode> {
    let metrics = telemetry::install_prometheus()?;
    let listen = config.http.listen;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("listening on {listen}"))?;
    let runtime = Runtime::start(config).await?;
    let state = http::AppState {
        shared: runtime.shared(),
        metrics,
    };
    let shutdown = runtime.shutdown_token();
    // Said before the server runs, so that whoever sees /healthz answer has the banner too
    // (the listener is bound: a command sent from it right away waits in the backlog).
    tracing::info!(%listen, "weir is serving");
    if let Some(banner) = banner {
        // The banner is help for a person; weir serves whether or not it could be shown.
        if let Err(e) = print_line(&banner) {
            tracing::warn!(error = %e, "could not print the banner");
        }
    }
    let server = tokio::spawn(http::serve(listener, state, shutdown.clone()));
    stop_signal().await;
    tracing::info!("shutting down: no new deliveries; finishing in-flight work");
    runtime.shutdown().await;
    match server.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "HTTP server ended with an error"),
        Err(e) => tracing::warn!(error = %e, "HTTP server task failed"),
    }
    Ok(ExitCode::SUCCESS)
}

/// Resolves on Ctrl-C (SIGINT) or SIGTERM. The handlers are installed when this is called,
/// not when the future is first polled, so a signal that arrives in between is not missed
/// (`weir tail` says it is reading before it polls).
fn stop_signal() -> StopSignal {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match (
            signal(SignalKind::interrupt()),
            signal(SignalKind::terminate()),
        ) {
            (Ok(mut interrupt), Ok(mut terminate)) => {
                return Box::pin(async move {
                    tokio::select! {
                        _ = interrupt.recv() => {}
                        _ = terminate.recv() => {}
                    }
                });
            }
            (Err(e), _) | (_, Err(e)) => {
                tracing::warn!(error = %e, "cannot listen for SIGINT and SIGTERM; only Ctrl-C stops weir");
            }
        }
    }
    Box::pin(async {
        let _ = tokio::signal::ctrl_c().await;
    })
}

fn base_url(addr: &str) -> String {
    if addr.starts_with("http://") || addr.starts_with("https://") {
        addr.trim_end_matches('/').to_owned()
    } else {
        format!("http://{addr}")
    }
}

async fn publish(args: PublishArgs) -> anyhow::Result<ExitCode> {
    // Before the body: a `-c` file that is not valid is reported at once, not after stdin ends.
    let target = Target::resolve(&args.topic, &args.connection())?;
    // Refused rather than dropped: the key would reach neither the event nor the broker.
    if args.key.is_some() && args.ty.is_none() && !matches!(target, Target::Kafka(_)) {
        return Err(BadInput(
            "--key without --type sets nothing here: the key is a --type event's `partitionkey`, \
             or on Kafka the record's key; give --type, or set the key in the event itself"
                .to_owned(),
        )
        .into());
    }
    let body = match (&args.data, &args.file) {
        (Some(data), _) => data.clone().into_bytes(),
        (None, Some(path)) => std::fs::read(path)
            .map_err(|e| BadInput(format!("reading --file {}: {e}", path.display())))?,
        (None, None) => {
            let mut buf = Vec::new();
            std::io::stdin()
                .read_to_end(&mut buf)
                .context("reading the event from stdin")?;
            buf
        }
    };
    let sink = match target {
        Target::Nats { settings, core } => Sink::nats(&settings, core).await?,
        Target::Kafka(settings) => Sink::kafka(&settings, args.key.clone()).await?,
        Target::Http(addr) => Sink::http(&addr, &args.topic)?,
    };
    let mut ticker = args
        .rate
        .map(|rate| tokio::time::interval(Duration::from_secs_f64(1.0 / rate)));
    let mut accepted = 0u64;
    let mut duplicates = 0usize;
    let mut last_answer = String::new();
    // Several sends wait for their confirmation at once: one at a time, a confirmed JetStream
    // or Kafka publish is a round trip each, and `--count` could not build the backlog that
    // shows a function scaling. Every copy is the same event (with its own id, unless the
    // body fixes one), so the order they are confirmed in says nothing.
    let window = sink.window();
    let mut in_flight = futures::stream::FuturesOrdered::new();
    let mut started = 0u64;
    loop {
        tokio::select! {
            biased;
            Some(sent) = futures::StreamExt::next(&mut in_flight), if !in_flight.is_empty() => {
                let sent: anyhow::Result<Sent> = sent;
                let sent = match sent {
                    Ok(sent) => sent,
                    // What a retry of the whole count would store twice.
                    Err(e) if args.count > 1 => {
                        return Err(e.context(format!(
                            "{accepted} of {} confirmed before this failure, and {} more sent \
                             whose answers were not awaited (they may be stored)",
                            args.count,
                            in_flight.len()
                        )))
                    }
                    Err(e) => return Err(e),
                };
                last_answer = sent.answer;
                duplicates += sent.duplicates;
                accepted += 1;
            }
            () = next_tick(ticker.as_mut()), if started < args.count && in_flight.len() < window => {
                let headers = request_headers(&args, &body);
                in_flight.push_back(sink.send(&args.topic, headers, &body));
                started += 1;
            }
            else => break,
        }
    }
    drop(in_flight);
    // Only once it all reached the broker does it count as published.
    sink.finish().await?;
    // Published either way: a reader that went away misses only the answer.
    if args.count == 1 {
        print_line(&last_answer)?;
    } else {
        print_line(&format!(
            "{{\"accepted\":{accepted},\"duplicates\":{duplicates}}}"
        ))?;
    }
    if duplicates > 0 {
        // Said on stderr too: a CloudEvent sent again with its own id, on which nothing runs,
        // looks like a broken pipeline otherwise. (Debezium and S3 bodies get fresh ids here.)
        let were = if duplicates == 1 { "was" } else { "were" };
        say!(
            "weir publish: {} {were} already on {} (same source and id, inside the broker's \
             de-duplication window) and {were} not stored again; give each event its own id to \
             publish it anew",
            count_of(duplicates, "event"),
            args.topic
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// The pace of `--rate`, or none.
async fn next_tick(ticker: Option<&mut tokio::time::Interval>) {
    if let Some(ticker) = ticker {
        ticker.tick().await;
    }
}

/// The headers `weir publish` sends: a binary-mode CloudEvent with `--type`, else only the
/// content type, so that Weir recognises Debezium, S3 and structured CloudEvents by shape (and
/// an array of structured CloudEvents, which no shape rule covers, as the batch it is).
fn request_headers(args: &PublishArgs, body: &[u8]) -> Vec<(String, String)> {
    let mut headers = Vec::new();
    if let Some(ty) = &args.ty {
        headers.push(("ce-specversion".to_owned(), "1.0".to_owned()));
        headers.push(("ce-id".to_owned(), uuid::Uuid::new_v4().to_string()));
        headers.push(("ce-source".to_owned(), args.source.clone()));
        headers.push(("ce-type".to_owned(), ty.clone()));
        headers.push(("content-type".to_owned(), "application/json".to_owned()));
        if let Some(key) = &args.key {
            headers.push(("ce-partitionkey".to_owned(), key.clone()));
        }
    } else if looks_like_batch(body) {
        headers.push((
            "content-type".to_owned(),
            weir_schemas::cloudevents::BATCH_CONTENT_TYPE.to_owned(),
        ));
    } else if looks_like_json(body) {
        headers.push(("content-type".to_owned(), "application/json".to_owned()));
    }
    headers
}

/// A JSON array of objects that all carry `specversion`: structured CloudEvents, a batch.
fn looks_like_batch(body: &[u8]) -> bool {
    serde_json::from_slice::<Vec<serde_json::Map<String, serde_json::Value>>>(body).is_ok_and(
        |members| {
            !members.is_empty()
                && members
                    .iter()
                    .all(|member| member.contains_key("specversion"))
        },
    )
}

/// What one [`Sink::send`] did.
struct Sent {
    /// Weir's `202` body, or the same shape for a publish straight to a broker.
    answer: String,
    /// Events the topic already held (same source and id, inside the broker's de-duplication
    /// window), so not stored again.
    duplicates: usize,
}

/// Where `weir publish` sends events.
enum Sink {
    Http {
        client: reqwest::Client,
        url: String,
    },
    Broker {
        publisher: Box<dyn weir_broker_bridge::Publisher>,
        broker: BrokerKind,
        key: Option<String>,
        /// Closed (flushed) before `weir publish` exits: core publishes are only queued.
        nats: Option<Box<weir_broker_bridge::nats::NatsTransport>>,
    },
}

impl Sink {
    fn http(addr: &str, topic: &str) -> anyhow::Result<Self> {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()?;
        Ok(Sink::Http {
            client,
            url: format!("{}/v1/topics/{topic}", base_url(addr)),
        })
    }

    async fn nats(settings: &NatsConfig, core: bool) -> anyhow::Result<Self> {
        let transport = connect_nats(settings).await?;
        let (publisher, broker): (Box<dyn weir_broker_bridge::Publisher>, _) = if core {
            (Box::new(transport.core_publisher()), BrokerKind::Nats)
        } else {
            (
                Box::new(transport.jetstream_publisher()),
                BrokerKind::JetStream,
            )
        };
        Ok(Sink::Broker {
            publisher,
            broker,
            key: None,
            nats: Some(Box::new(transport)),
        })
    }

    async fn kafka(settings: &KafkaConfig, key: Option<String>) -> anyhow::Result<Self> {
        let transport = connect_kafka(settings).await?;
        let publisher = transport.publisher()?;
        Ok(Sink::Broker {
            publisher: Box::new(publisher),
            broker: BrokerKind::Kafka,
            key,
            nats: None,
        })
    }

    /// Make sure everything sent has reached the broker (Kafka and JetStream publishes were
    /// confirmed one by one; core NATS ones are only queued until this).
    async fn finish(self) -> anyhow::Result<()> {
        if let Sink::Broker {
            nats: Some(transport),
            ..
        } = self
        {
            transport
                .close()
                .await
                .context("sending the queued publishes to NATS")?;
        }
        Ok(())
    }

    /// How many sends may wait for their answers at once. Over HTTP each one waiting holds a
    /// connection to the weir of its own, so fewer there than on a broker connection, which
    /// carries them all.
    fn window(&self) -> usize {
        match self {
            Sink::Http { .. } => 16,
            Sink::Broker { .. } => 256,
        }
    }

    /// Send one event; returns the answer to print and how many of its events the topic
    /// already held.
    async fn send(
        &self,
        topic: &str,
        headers: Vec<(String, String)>,
        body: &[u8],
    ) -> anyhow::Result<Sent> {
        match self {
            Sink::Http { client, url } => {
                let mut request = client.post(url.as_str()).body(body.to_vec());
                for (name, value) in &headers {
                    request = request.header(name, value);
                }
                let response = request
                    .send()
                    .await
                    .with_context(|| format!("POST {url}"))?;
                let status = response.status();
                let text = response.text().await.unwrap_or_default();
                if status.is_client_error() {
                    // The weir refused the event itself (not valid, too large, a topic it
                    // serves elsewhere): something to fix, as on a broker below.
                    return Err(BadInput(format!("{status}: {text}")).into());
                }
                if !status.is_success() {
                    bail!("{status}: {text}");
                }
                // A weir older than the `duplicates` field counts none.
                let duplicates = serde_json::from_str::<serde_json::Value>(&text)
                    .ok()
                    .and_then(|answer| answer["duplicates"].as_array().map(Vec::len))
                    .unwrap_or(0);
                Ok(Sent {
                    answer: text,
                    duplicates,
                })
            }
            Sink::Broker {
                publisher,
                broker,
                key,
                ..
            } => {
                let events = ingress::decode_request(ingress::Entry::Cli, topic, &headers, body)
                    .map_err(|e| BadInput(format!("the event is not valid ({}): {e}", e.kind())))?;
                let accepted =
                    ingress::publish(publisher.as_ref(), *broker, topic, events, key.as_deref())
                        .await
                        .map_err(|e| match e {
                            // The event to fix, as the weir's 413 above.
                            TransportError::TooLarge { .. } => BadInput(e.to_string()).into(),
                            e => anyhow::Error::from(e),
                        })?;
                Ok(Sent {
                    answer: serde_json::to_string(&accepted)?,
                    duplicates: accepted.duplicates.len(),
                })
            }
        }
    }
}

fn looks_like_json(body: &[u8]) -> bool {
    serde_json::from_slice::<serde::de::IgnoredAny>(body).is_ok()
}

/// Ends with exit 0 when its `--limit` is reached, when it is stopped (Ctrl-C, SIGTERM) or
/// when its reader goes away (`weir tail … | head -1`); a broker reader's consumer is removed
/// first in each case.
async fn tail(args: TailArgs) -> anyhow::Result<ExitCode> {
    let connection = Connection {
        http: args.http.as_deref(),
        nats: args.nats.as_deref(),
        kafka: args.kafka.as_deref(),
        core: args.core,
        config: args.config.as_deref(),
    };
    let base = match Target::resolve(&args.topic, &connection)? {
        Target::Nats { settings, core } => return tail_nats(&args, &settings, core).await,
        Target::Kafka(settings) => return tail_kafka(&args, &settings).await,
        Target::Http(addr) => base_url(&addr),
    };
    // Nothing to clean up on a weir's HTTP server: stopping is just ending, as on a broker.
    let stop = tail_stop();
    tokio::select! {
        tailed = tail_http(&args, &base) => tailed,
        () = stop => Ok(ExitCode::SUCCESS),
    }
}

/// `weir tail` through a running weir's HTTP server (its memory bus).
async fn tail_http(args: &TailArgs, base: &str) -> anyhow::Result<ExitCode> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()?;
    let mut after: Option<u64> = match args.last {
        None => None,
        Some(last) => memory_last_seq(&client, base, &args.topic)
            .await?
            .map(|seq| seq.saturating_sub(last)),
    };
    let mut printed = 0u64;
    loop {
        let mut url = format!("{base}/v1/topics/{}/events?wait=10s&limit=100", args.topic);
        if let Some(after) = after {
            url.push_str(&format!("&after={after}"));
        }
        let response = client
            .get(&url)
            .send()
            .await
            .with_context(|| format!("GET {url}"))?;
        if !response.status().is_success() {
            let status = response.status();
            say!("{status}: {}", response.text().await.unwrap_or_default());
            // A 4xx is this tail asking wrongly (a topic the weir serves elsewhere, say).
            return Ok(if status.is_client_error() {
                usage_exit()
            } else {
                ExitCode::FAILURE
            });
        }
        let page: serde_json::Value = response
            .json()
            .await
            .context("reading the topic's events")?;
        for message in page["messages"].as_array().into_iter().flatten() {
            for event in message["events"].as_array().into_iter().flatten() {
                if print_line(event)? == Printed::ReaderGone {
                    return Ok(ExitCode::SUCCESS);
                }
                printed += 1;
                if args.limit.is_some_and(|limit| printed >= limit) {
                    return Ok(ExitCode::SUCCESS);
                }
            }
        }
        after = page["next"].as_u64().or(after);
    }
}

/// `weir tail` on NATS: a stream's history of the subject, else (or with `core`) the core
/// subject from now on.
async fn tail_nats(args: &TailArgs, settings: &NatsConfig, core: bool) -> anyhow::Result<ExitCode> {
    let transport = connect_nats(settings).await?;
    if !core {
        if let Some(history) = transport
            .read_subject_history(&args.topic, args.last)
            .await?
        {
            let from = history_start(args.last, "the first message", "message");
            let stop = tail_stop();
            say!(
                "reading {} from {from} stream {} holds, then following",
                args.topic,
                history.stream()
            );
            return tail_broker(Box::new(history), "jetstream", args.limit, stop).await;
        }
    }
    if args.last.is_some_and(|last| last > 0) {
        let why = if core {
            format!("{} is read as a core subject", args.topic)
        } else {
            format!(
                "no JetStream stream on {} captures {}",
                settings.servers.join(","),
                args.topic
            )
        };
        bail!(
            "--last: {why}, so there are no earlier messages to show (a core subject keeps none); without --last, weir tail follows its new messages"
        );
    }
    let subscription = transport.subscribe_core(&args.topic, None).await?;
    let stop = tail_stop();
    // Once subscribed (the server has registered it), nothing published from now on is missed.
    say!("following core subject {} (new messages only)", args.topic);
    tail_broker(Box::new(subscription), "nats", args.limit, stop).await
}

/// `weir dlq redrive`: the function's dead-letter topic read to its end as of now, each of
/// its records sent back to the function's trigger broker.
async fn redrive(args: RedriveArgs) -> anyhow::Result<ExitCode> {
    let path = args.config.as_path();
    let config =
        config::load_for(path, config::LoadFor::Connecting).map_err(|e| invalid_config(path, e))?;
    let Some(function) = config.functions.iter().find(|f| f.name == args.function) else {
        let names: Vec<&str> = config.functions.iter().map(|f| f.name.as_str()).collect();
        return Err(BadInput(format!(
            "{} has no function {:?} (it has: {})",
            path.display(),
            args.function,
            if names.is_empty() {
                "none".to_owned()
            } else {
                names.join(", ")
            }
        ))
        .into());
    };
    let dlq = &function.dead_letter;
    let trigger = &function.trigger;
    // Both ends are checked before anything is read.
    let name = &function.name;
    let refusal = match (dlq.broker, trigger.broker) {
        (BrokerKind::Memory, _) | (_, BrokerKind::Memory) => Some(format!(
            "{name}'s dead letters or trigger are on the embedded memory bus, which lives \
             inside the weir that runs it; weir dlq redrive works with NATS and Kafka"
        )),
        (BrokerKind::Nats, _) => Some(format!(
            "{name}'s dead letters go to the core NATS subject {}, which keeps nothing to \
             redrive; give the function a JetStream dead-letter topic \
             ([functions.dead_letter] broker = \"jetstream\")",
            dlq.topic
        )),
        (_, BrokerKind::Nats) if !args.keep => Some(format!(
            "{name}'s trigger is the core NATS subject {}: nobody confirms a core publish, so \
             an event sent there while no weir listens is lost, and its record must not be \
             deleted for it; give --keep to send the events and keep the records",
            trigger.topic
        )),
        _ => None,
    };
    if let Some(refusal) = refusal {
        return Err(BadInput(refusal).into());
    }
    let ends = [dlq.broker, trigger.broker];
    let nats = if ends
        .iter()
        .any(|b| matches!(b, BrokerKind::Nats | BrokerKind::JetStream))
    {
        let settings = broker_settings(Some(&config), Some(path), "nats", |b| &b.nats)?;
        Some(connect_nats(&settings).await?)
    } else {
        None
    };
    let kafka = if ends.contains(&BrokerKind::Kafka) {
        let settings = broker_settings(Some(&config), Some(path), "kafka", |b| &b.kafka)?;
        Some(connect_kafka(&settings).await?)
    } else {
        None
    };
    let mut backlog: Box<dyn weir_broker_bridge::Backlog> = match (dlq.broker, &nats, &kafka) {
        (BrokerKind::JetStream, Some(nats), _) => {
            match nats.read_backlog(&dlq.topic, args.keep).await? {
                Some(backlog) => Box::new(backlog),
                None => bail!(
                    "no JetStream stream captures {}, so nothing was kept to redrive",
                    dlq.topic
                ),
            }
        }
        (BrokerKind::Kafka, _, Some(kafka)) => Box::new(
            kafka
                .read_backlog(
                    &dlq.topic,
                    &format!("weir-redrive-{}", function.name),
                    args.keep,
                )
                .await?,
        ),
        (broker, _, _) => bail!("no connection to {broker} for the dead letters"),
    };
    let publisher: Box<dyn weir_broker_bridge::Publisher> = match (trigger.broker, &nats, &kafka) {
        (BrokerKind::JetStream, Some(nats), _) => Box::new(nats.jetstream_publisher()),
        (BrokerKind::Nats, Some(nats), _) => Box::new(nats.core_publisher()),
        (BrokerKind::Kafka, _, Some(kafka)) => Box::new(kafka.publisher()?),
        (broker, _, _) => bail!("no connection to {broker} for the trigger"),
    };
    let plan = redrive::Plan {
        function,
        reasons: args.reason.clone(),
        limit: args.limit,
        dry_run: args.dry_run,
    };
    let mut reader_gone = false;
    let outcome = redrive::redrive(backlog.as_mut(), publisher.as_ref(), &plan, |line| {
        if !reader_gone {
            // A reader that went away misses the report, not the redrive.
            reader_gone = serde_json::to_string(line)
                .map_err(anyhow::Error::from)
                .and_then(|text| print_line(&text))
                .map_or(true, |printed| printed == Printed::ReaderGone);
        }
    })
    .await;
    if let Some(nats) = nats {
        // Core publishes are only queued until the connection is flushed.
        nats.close()
            .await
            .context("sending the queued publishes to NATS")?;
    }
    let summary = outcome?;
    if !reader_gone {
        print_line(&serde_json::json!({ "function": function.name, "summary": summary }))?;
    }
    let verb = if args.dry_run { "would send" } else { "sent" };
    let sent = summary.sent + summary.already_sent + summary.would_send;
    let mut said = format!(
        "weir dlq redrive: {verb} {} of {} back to {}",
        count_of(sent, "event"),
        function.name,
        trigger.topic
    );
    if summary.kept > 0 {
        said.push_str(&format!(
            "; kept {} (see each line's note)",
            count_of(summary.kept, "record")
        ));
    }
    if summary.stopped_at_limit {
        said.push_str("; stopped at --limit with more to send");
    }
    say!("{said}");
    Ok(ExitCode::SUCCESS)
}

/// "1 event", "2 events": a count with its noun, for what weir prints to people.
fn count_of<N: std::fmt::Display + PartialEq + From<u8>>(n: N, noun: &str) -> String {
    if n == N::from(1) {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

/// Where a history read starts, for the line `weir tail` prints: `first` without `--last`,
/// else counted back from the newest `noun` ("the last 3 messages", "the last message", and
/// "after the last message" for `--last 0`).
fn history_start(last: Option<u64>, first: &str, noun: &str) -> String {
    match last {
        None => first.to_owned(),
        Some(0) => format!("after the last {noun}"),
        Some(1) => format!("the last {noun}"),
        Some(last) => format!("the last {last} {noun}s"),
    }
}

/// `weir tail` on Kafka: every partition from its earliest offset (or its last N).
async fn tail_kafka(args: &TailArgs, settings: &KafkaConfig) -> anyhow::Result<ExitCode> {
    let transport = connect_kafka(settings).await?;
    let history = transport.read_topic_history(&args.topic, args.last).await?;
    let from = history_start(args.last, "the earliest offset", "record");
    let partitions = match history.partitions() {
        1 => "its only partition".to_owned(),
        n => format!("each of its {n} partitions"),
    };
    let stop = tail_stop();
    say!(
        "reading {} from {from} of {partitions}, then following",
        args.topic
    );
    tail_broker(Box::new(history), "kafka", args.limit, stop).await
}

/// The sequence of the newest message a weir's memory-bus topic holds; `None` for a topic it
/// has none of yet.
async fn memory_last_seq(
    client: &reqwest::Client,
    base: &str,
    topic: &str,
) -> anyhow::Result<Option<u64>> {
    let url = format!("{base}/v1/topics");
    let response = client
        .get(&url)
        .send()
        .await
        .with_context(|| format!("GET {url}"))?;
    let status = response.status();
    anyhow::ensure!(
        status.is_success(),
        "GET {url}: {status}: {}",
        response.text().await.unwrap_or_default()
    );
    let topics: serde_json::Value = response.json().await.context("reading the topic list")?;
    Ok(topics["topics"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|t| t["name"] == topic)
        .and_then(|t| t["last_seq"].as_u64()))
}

/// The connection flags `weir publish` and `weir tail` share.
struct Connection<'a> {
    http: Option<&'a str>,
    nats: Option<&'a str>,
    kafka: Option<&'a str>,
    core: bool,
    config: Option<&'a std::path::Path>,
}

impl PublishArgs {
    fn connection(&self) -> Connection<'_> {
        Connection {
            http: self.http.as_deref(),
            nats: self.nats.as_deref(),
            kafka: self.kafka.as_deref(),
            core: self.core,
            config: self.config.as_deref(),
        }
    }
}

/// Where `weir publish` / `weir tail` go.
enum Target {
    /// A running weir's HTTP server.
    Http(String),
    /// `core`: a core subject (by `--core`, or as the configuration reads the topic).
    Nats {
        settings: NatsConfig,
        core: bool,
    },
    Kafka(KafkaConfig),
}

impl Target {
    /// `--nats URL` / `--kafka BOOTSTRAP` pick the broker (with `-c`, that configuration's
    /// settings for it, the address replaced); else with `-c` the broker the topic lives on
    /// there; else a weir's HTTP server.
    fn resolve(topic: &str, connection: &Connection<'_>) -> anyhow::Result<Target> {
        let config = match connection.config {
            None => None,
            Some(path) => Some(
                config::load_for(path, config::LoadFor::Connecting)
                    .map_err(|e| invalid_config(path, e))?,
            ),
        };
        let nats = |config: Option<&Config>| {
            broker_settings(config, connection.config, "nats", |b| &b.nats)
        };
        let kafka = |config: Option<&Config>| {
            broker_settings(config, connection.config, "kafka", |b| &b.kafka)
        };
        let target = match (connection.nats, connection.kafka, &config) {
            (Some(url), _, _) => Target::Nats {
                settings: NatsConfig {
                    servers: vec![url.to_owned()],
                    ..nats(config.as_ref())?
                },
                core: connection.core,
            },
            (None, Some(bootstrap), _) => Target::Kafka(KafkaConfig {
                bootstrap: bootstrap.to_owned(),
                ..kafka(config.as_ref())?
            }),
            (None, None, Some(found)) => match found
                .mentioned_topic_broker(topic)
                .unwrap_or_else(|| only_external_broker(found))
            {
                BrokerKind::Nats => Target::Nats {
                    settings: nats(Some(found))?,
                    core: true,
                },
                BrokerKind::JetStream => Target::Nats {
                    settings: nats(Some(found))?,
                    core: connection.core,
                },
                BrokerKind::Kafka => Target::Kafka(kafka(Some(found))?),
                BrokerKind::Memory => Target::Http(
                    connection
                        .http
                        .map_or_else(|| found.http.listen.to_string(), str::to_owned),
                ),
            },
            (None, None, None) => Target::Http(connection.http.unwrap_or(DEFAULT_HTTP).to_owned()),
        };
        if connection.core && !matches!(target, Target::Nats { .. }) {
            return Err(BadInput(format!(
                "--core is for NATS: give --nats URL, or -c FILE in which {topic} is a NATS subject"
            ))
            .into());
        }
        Ok(target)
    }
}

/// `[brokers.<name>]` of the `-c` file, which must have it; the defaults without `-c`.
fn broker_settings<T: Clone + Default>(
    config: Option<&Config>,
    path: Option<&std::path::Path>,
    name: &str,
    section: impl Fn(&config::BrokersConfig) -> &Option<T>,
) -> anyhow::Result<T> {
    match config {
        None => Ok(T::default()),
        Some(config) => section(&config.brokers).clone().ok_or_else(|| {
            let shown = path.map(|p| p.display().to_string()).unwrap_or_default();
            BadInput(format!("{shown} has no [brokers.{name}]")).into()
        }),
    }
}

/// Where a topic the configuration does not mention goes: to its one external broker if it
/// configures exactly one (a file holding only `[brokers.nats]`, say), else to the memory bus.
fn only_external_broker(config: &Config) -> BrokerKind {
    match (&config.brokers.nats, &config.brokers.kafka) {
        (Some(_), None) => BrokerKind::JetStream,
        (None, Some(_)) => BrokerKind::Kafka,
        _ => BrokerKind::Memory,
    }
}

async fn connect_nats(settings: &NatsConfig) -> anyhow::Result<NatsTransport> {
    NatsTransport::connect(settings)
        .await
        .with_context(|| format!("connecting to NATS at {}", settings.servers.join(",")))
}

async fn connect_kafka(settings: &KafkaConfig) -> anyhow::Result<KafkaTransport> {
    KafkaTransport::connect(settings)
        .await
        .with_context(|| format!("connecting to Kafka at {}", settings.bootstrap))
}

/// Print what a broker subscription delivers, as JSON lines, acknowledging as it goes, until
/// `limit`, `stop` or the reader going away (exit 0), or until the subscription ends by itself
/// (an error when it says why); then close the subscription (a history read deletes its
/// consumer).
async fn tail_broker(
    mut subscription: Box<dyn weir_broker_bridge::Subscription>,
    transport: &str,
    limit: Option<u64>,
    mut stop: StopSignal,
) -> anyhow::Result<ExitCode> {
    let mut printed = 0u64;
    // However reading ends (even on standard output failing), the subscription is closed.
    let ended = async {
        loop {
            let delivery = tokio::select! {
                delivery = subscription.next() => delivery,
                () = &mut stop => break,
            };
            let Some(delivery) = delivery else {
                // What it read is gone (a deleted stream): not the end a script may take
                // for a finished tail.
                if let Some(reason) = subscription.ended_by() {
                    bail!("reading ended: {reason}");
                }
                break;
            };
            let message = &delivery.message;
            let origin = message.origin.to_string();
            let source = weir_schemas::wire::default_source(transport, &message.topic);
            let headers = message.headers.view();
            let wire = weir_schemas::WireMessage {
                headers: &headers,
                payload: message.payload.as_deref(),
                key: message.key.as_deref(),
                origin: &origin,
                default_source: &source,
            };
            // `--limit` counts events; a message that is not one is shown but not counted.
            let (lines, events) = match weir_schemas::decode(&wire, weir_schemas::Format::Auto) {
                Ok(events) => (events.iter().map(http::event_json).collect(), events.len()),
                Err(e) => (
                    vec![
                        serde_json::json!({ "topic": message.topic, "origin": origin, "undecodable": e.to_string() }),
                    ],
                    0,
                ),
            };
            for line in &lines {
                if print_line(line)? == Printed::ReaderGone {
                    return Ok(());
                }
            }
            if let Err(e) = delivery.ack().await {
                tracing::debug!(error = %e, "tail: ack failed");
            }
            printed += events as u64;
            if limit.is_some_and(|limit| printed >= limit) {
                break;
            }
        }
        Ok::<(), anyhow::Error>(())
    }
    .await;
    subscription.close().await;
    ended.map(|()| ExitCode::SUCCESS)
}

/// What ends a `weir tail` besides its `--limit`: a stop signal, or its reader going away.
/// Made, like [`stop_signal`], before the tail says it is reading.
fn tail_stop() -> StopSignal {
    let signal = stop_signal();
    Box::pin(async move {
        tokio::select! {
            () = signal => {}
            () = reader_gone() => {}
        }
    })
}

/// How often a tail looks whether its reader has gone.
const READER_CHECK: Duration = Duration::from_millis(500);

/// Resolves once standard output is a pipe whose reader has gone (or a socket whose peer
/// has). A write would tell too, but a tail writes only when an event comes, so `weir tail …
/// | head -1` would wait for the next event, however long that takes; coreutils' `tail -f`
/// polls its output for the same reason.
async fn reader_gone() {
    #[cfg(unix)]
    loop {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        use std::os::fd::AsFd as _;

        let stdout = std::io::stdout();
        let mut fds = [PollFd::new(stdout.as_fd(), PollFlags::empty())];
        // POLLERR and POLLHUP are reported whatever `events` asks for.
        let gone = poll(&mut fds, PollTimeout::ZERO).is_ok()
            && fds[0]
                .revents()
                .is_some_and(|events| events.intersects(PollFlags::POLLERR | PollFlags::POLLHUP));
        if gone {
            return;
        }
        tokio::time::sleep(READER_CHECK).await;
    }
    #[cfg(not(unix))]
    std::future::pending::<()>().await
}

/// What [`stop_signal`] returns.
type StopSignal = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// Whether a line reached standard output.
#[derive(Debug, PartialEq, Eq)]
enum Printed {
    Shown,
    /// Standard output is a pipe whose reader has gone (`weir tail … | head -1`).
    ReaderGone,
}

/// One line on standard output. `println!` panics when the reader of a pipe has gone; that is
/// the ordinary end of `weir tail … | head`, not an error.
fn print_line(line: &dyn std::fmt::Display) -> anyhow::Result<Printed> {
    use std::io::Write as _;
    match writeln!(std::io::stdout().lock(), "{line}") {
        Ok(()) => Ok(Printed::Shown),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(Printed::ReaderGone),
        Err(e) => Err(anyhow::Error::new(e).context("writing to standard output")),
    }
}
