//! The `weir` command line.

use std::io::Read as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context as _};
use clap::{Args, Parser, Subcommand};
use weir_broker_bridge::BrokerKind;
use weir_dispatcher::config::{self, Config};
use weir_dispatcher::runtime::{self, Runtime};
use weir_dispatcher::{demo, engine, http, telemetry};

#[derive(Debug, Parser)]
#[command(name = "weir", version, about = "Weir: WebAssembly functions on NATS, JetStream, Kafka and an embedded bus")]
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
    /// Publish events to a running weir.
    Publish(PublishArgs),
    /// Print a topic's events as JSON lines, from its retained history on, and follow.
    Tail(TailArgs),
}

#[derive(Debug, Args)]
struct UpArgs {
    /// Where the HTTP server listens.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8080")]
    http: SocketAddr,
    /// Directory with the example components (default: the `make functions` output).
    #[arg(long, value_name = "DIR")]
    functions: Option<PathBuf>,
    /// Print the demo configuration and exit.
    #[arg(long)]
    print_config: bool,
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
    /// Weir recognises Debezium, S3/MinIO and CloudEvents JSON by their shape.
    #[arg(long = "type", value_name = "TYPE")]
    ty: Option<String>,
    /// CloudEvents `source` with --type.
    #[arg(long, default_value = "weir-cli")]
    source: String,
    /// Ordering key (the `partitionkey` extension) with --type.
    #[arg(long)]
    key: Option<String>,
    /// How many times to send it.
    #[arg(long, default_value_t = 1)]
    count: u64,
    /// Events per second (default: as fast as the server accepts them).
    #[arg(long)]
    rate: Option<f64>,
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8080")]
    http: String,
}

#[derive(Debug, Args)]
struct TailArgs {
    topic: String,
    /// Exit after this many events.
    #[arg(long)]
    limit: Option<u64>,
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8080")]
    http: String,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(&cli.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.command)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("WEIR_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
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
    }
}

async fn up(args: UpArgs) -> anyhow::Result<ExitCode> {
    if args.print_config {
        print!("{}", demo::toml(BrokerKind::Memory, &args.http.to_string()));
        return Ok(ExitCode::SUCCESS);
    }
    let dir = demo::find_functions_dir(args.functions.as_deref()).map_err(anyhow::Error::msg)?;
    let config = demo::config(BrokerKind::Memory, &dir, args.http).map_err(|e| anyhow::anyhow!("demo configuration:\n{e}"))?;
    let banner = format!(
        r#"
Weir is up: the demo pipeline on the embedded memory bus, HTTP on http://{addr}

Try, in another terminal:
  weir publish orders --type com.example.order --data '{{"id":"o-1","amount":42}}'
  weir tail orders.enriched --limit 1
  weir publish orders --type com.example.order --data '{{"id":"o-2"}}'     # rejected: no amount
  weir tail weir.dlq.order-validate --limit 1
  curl -s http://{addr}/v1/functions
"#,
        addr = args.http
    );
    serve(config, Some(banner)).await
}

/// Load a config file and check its modules; every problem is an error.
fn load_checked(path: &std::path::Path) -> anyhow::Result<Config> {
    let config = config::load(path).map_err(|e| anyhow::anyhow!("{} is not valid:\n{e}", path.display()))?;
    let engine = engine::WasmEngine::new(&runtime::engine_settings(&config))?;
    runtime::load_modules(&engine, &config)
        .map_err(|e| anyhow::anyhow!("{} is not valid:\n{e}", path.display()))?;
    Ok(config)
}

fn check(path: &std::path::Path) -> anyhow::Result<ExitCode> {
    let problems = match config::load(path) {
        Ok(config) => {
            let engine = engine::WasmEngine::new(&runtime::engine_settings(&config))?;
            match runtime::load_modules(&engine, &config) {
                Ok(_) => {
                    println!("{}: ok ({} functions)", path.display(), config.functions.len());
                    return Ok(ExitCode::SUCCESS);
                }
                Err(e) => e,
            }
        }
        Err(e) => e,
    };
    // Module checks need a config that parsed; parse problems are listed alone.
    let count = problems.len();
    eprintln!("{}: {count} problem{}", path.display(), if count == 1 { "" } else { "s" });
    for problem in problems.iter() {
        eprintln!("  {}: {}", problem.path, problem.message);
    }
    Ok(ExitCode::from(2))
}

async fn serve(config: Config, banner: Option<String>) -> anyhow::Result<ExitCode> {
    let metrics = telemetry::install_prometheus()?;
    let listen = config.http.listen;
    let listener = tokio::net::TcpListener::bind(listen).await.with_context(|| format!("listening on {listen}"))?;
    let runtime = Runtime::start(config).await?;
    let state = http::AppState { shared: runtime.shared(), metrics };
    let shutdown = runtime.shutdown_token();
    let server = tokio::spawn(http::serve(listener, state, shutdown.clone()));
    tracing::info!(%listen, "weir is serving");
    if let Some(banner) = banner {
        println!("{banner}");
    }
    wait_for_signal().await;
    tracing::info!("shutting down: no new deliveries; finishing in-flight work");
    runtime.shutdown().await;
    match server.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "HTTP server ended with an error"),
        Err(e) => tracing::warn!(error = %e, "HTTP server task failed"),
    }
    Ok(ExitCode::SUCCESS)
}

async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM; only Ctrl-C stops weir");
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

fn base_url(addr: &str) -> String {
    if addr.starts_with("http://") || addr.starts_with("https://") {
        addr.trim_end_matches('/').to_owned()
    } else {
        format!("http://{addr}")
    }
}

async fn publish(args: PublishArgs) -> anyhow::Result<ExitCode> {
    let body = match (&args.data, &args.file) {
        (Some(data), _) => data.clone().into_bytes(),
        (None, Some(path)) => std::fs::read(path).with_context(|| format!("reading {}", path.display()))?,
        (None, None) => {
            let mut buf = Vec::new();
            std::io::stdin().read_to_end(&mut buf).context("reading the event from stdin")?;
            buf
        }
    };
    if args.rate.is_some_and(|r| !(r > 0.0 && r.is_finite())) {
        bail!("--rate must be a positive number of events per second");
    }
    let url = format!("{}/v1/topics/{}", base_url(&args.http), args.topic);
    let client = reqwest::Client::builder().timeout(Duration::from_secs(30)).build()?;
    let mut ticker = args.rate.map(|rate| tokio::time::interval(Duration::from_secs_f64(1.0 / rate)));
    let mut accepted = 0u64;
    for _ in 0..args.count {
        if let Some(ticker) = ticker.as_mut() {
            ticker.tick().await;
        }
        let mut request = client.post(&url).body(body.clone());
        if let Some(ty) = &args.ty {
            request = request
                .header("ce-specversion", "1.0")
                .header("ce-id", uuid::Uuid::new_v4().to_string())
                .header("ce-source", &args.source)
                .header("ce-type", ty)
                .header("content-type", "application/json");
            if let Some(key) = &args.key {
                request = request.header("ce-partitionkey", key);
            }
        } else if looks_like_json(&body) {
            request = request.header("content-type", "application/json");
        }
        let response = request.send().await.with_context(|| format!("POST {url}"))?;
        let status = response.status();
        let text = response.text().await.unwrap_or_default();
        if !status.is_success() {
            eprintln!("{status}: {text}");
            return Ok(ExitCode::FAILURE);
        }
        accepted += 1;
        if args.count == 1 {
            println!("{text}");
        }
    }
    if args.count != 1 {
        println!("{{\"accepted\":{accepted}}}");
    }
    Ok(ExitCode::SUCCESS)
}

fn looks_like_json(body: &[u8]) -> bool {
    serde_json::from_slice::<serde::de::IgnoredAny>(body).is_ok()
}

async fn tail(args: TailArgs) -> anyhow::Result<ExitCode> {
    let client = reqwest::Client::builder().timeout(Duration::from_secs(60)).build()?;
    let base = base_url(&args.http);
    let mut after: Option<u64> = None;
    let mut printed = 0u64;
    loop {
        let mut url = format!("{base}/v1/topics/{}/events?wait=10s&limit=100", args.topic);
        if let Some(after) = after {
            url.push_str(&format!("&after={after}"));
        }
        let response = client.get(&url).send().await.with_context(|| format!("GET {url}"))?;
        if !response.status().is_success() {
            let status = response.status();
            eprintln!("{status}: {}", response.text().await.unwrap_or_default());
            return Ok(ExitCode::FAILURE);
        }
        let page: serde_json::Value = response.json().await.context("reading the topic's events")?;
        for message in page["messages"].as_array().into_iter().flatten() {
            for event in message["events"].as_array().into_iter().flatten() {
                println!("{event}");
                printed += 1;
                if args.limit.is_some_and(|limit| printed >= limit) {
                    return Ok(ExitCode::SUCCESS);
                }
            }
        }
        after = page["next"].as_u64().or(after);
    }
}
