//! The local stack's files: `docker-compose.yml` must be a valid Compose file (checked by
//! `docker-compose config`, which needs no Docker engine), `deploy/prometheus/prometheus.yml` a
//! valid Prometheus config (`promtool check config`), and they must agree with each other and
//! with the Grafana provisioning: Prometheus scrapes both weir services on the port they
//! listen on, and Grafana mounts the provisioning and dashboard directories that exist.
//!
//! Needs `docker-compose` and `promtool` (Debian packages `docker-compose` and `prometheus`,
//! installed by `make tools`); fails with the install command when they are missing.

use std::path::Path;
use std::process::{Command, Output};

use anyhow::{ensure, Context as _};
use weir_tests::weir::repo_root;

/// Run `program args` in the repository root; a missing program is an error that says how to
/// install it.
fn run(program: &str, args: &[&str], package: &str) -> anyhow::Result<Output> {
    Command::new(program)
        .args(args)
        .current_dir(repo_root())
        // `docker-compose config` interpolates ${VAR}: the defaults must do without any.
        .env_remove("GRAFANA_ADMIN_PASSWORD")
        .output()
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => {
                anyhow::anyhow!("{program} is not installed: `apt-get install -y {package}` (make tools does it)")
            }
            _ => anyhow::Error::new(e).context(format!("running {program}")),
        })
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

#[test]
fn docker_compose_config_validates_the_stack() -> anyhow::Result<()> {
    let output = run(
        "docker-compose",
        &["--file", "docker-compose.yml", "config"],
        "docker-compose",
    )?;
    ensure!(
        output.status.success(),
        "docker-compose config rejected docker-compose.yml:\n{}",
        text(&output)
    );
    let resolved = String::from_utf8_lossy(&output.stdout);
    for service in [
        "nats:",
        "kafka:",
        "weir-nats:",
        "weir-kafka:",
        "prometheus:",
        "grafana:",
    ] {
        ensure!(
            resolved.lines().any(|line| line.trim_start() == service
                && line.starts_with("  ")
                && !line.starts_with("   ")),
            "service {service} missing from the resolved stack:\n{resolved}"
        );
    }
    // Both dispatchers run the demo, one per broker, on the port Prometheus scrapes.
    ensure!(
        resolved.contains("nats://nats:4222"),
        "weir-nats does not run on JetStream:\n{resolved}"
    );
    ensure!(
        resolved.contains("kafka:9092"),
        "weir-kafka does not run on Kafka:\n{resolved}"
    );
    ensure!(
        resolved.contains("0.0.0.0:8080"),
        "the weir services do not listen on 8080:\n{resolved}"
    );
    ensure!(
        resolved.lines().any(|l| l.trim() == "- -js"),
        "NATS runs without JetStream:\n{resolved}"
    );
    // The one-node KRaft settings on Kafka; anonymous viewers on Grafana.
    for (key, value) in [
        ("KAFKA_PROCESS_ROLES", "broker,controller"),
        ("KAFKA_CONTROLLER_QUORUM_VOTERS", "1@kafka:9093"),
        ("KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR", "1"),
        ("KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR", "1"),
        ("GF_AUTH_ANONYMOUS_ENABLED", "true"),
        ("GF_AUTH_ANONYMOUS_ORG_ROLE", "Viewer"),
    ] {
        ensure!(
            setting(&resolved, key) == Some(value),
            "{key} is not {value} in the resolved stack:\n{resolved}"
        );
    }
    Ok(())
}

/// The value of `key: value` in the resolved YAML, without quotes.
fn setting<'a>(resolved: &'a str, key: &str) -> Option<&'a str> {
    resolved.lines().find_map(|line| {
        let value = line.trim().strip_prefix(key)?.strip_prefix(':')?;
        Some(value.trim().trim_matches(|c| c == '"' || c == '\''))
    })
}

#[test]
fn prometheus_config_is_valid_and_scrapes_both_dispatchers() -> anyhow::Result<()> {
    let output = run(
        "promtool",
        &["check", "config", "deploy/prometheus/prometheus.yml"],
        "prometheus",
    )?;
    ensure!(
        output.status.success(),
        "promtool rejected deploy/prometheus/prometheus.yml:\n{}",
        text(&output)
    );
    let config = std::fs::read_to_string(repo_root().join("deploy/prometheus/prometheus.yml"))
        .context("reading deploy/prometheus/prometheus.yml")?;
    for target in ["weir-nats:8080", "weir-kafka:8080"] {
        ensure!(
            config.contains(target),
            "prometheus.yml does not scrape {target}"
        );
    }
    ensure!(
        config.contains("scrape_interval: 5s"),
        "the stack scrapes every 5 s"
    );
    Ok(())
}

#[test]
fn grafana_mounts_existing_provisioning() -> anyhow::Result<()> {
    let root = repo_root();
    let compose = std::fs::read_to_string(root.join("docker-compose.yml"))
        .context("reading docker-compose.yml")?;
    for (dir, mount) in [
        ("deploy/grafana/provisioning", "/etc/grafana/provisioning"),
        ("deploy/grafana/dashboards", "/var/lib/grafana/dashboards"),
        (
            "deploy/prometheus/prometheus.yml",
            "/etc/prometheus/prometheus.yml",
        ),
    ] {
        ensure!(
            compose.contains(&format!("./{dir}:{mount}")),
            "docker-compose.yml does not mount ./{dir} at {mount}"
        );
        ensure!(Path::new(&root.join(dir)).exists(), "{dir} does not exist");
    }
    for file in [
        "deploy/grafana/provisioning/datasources/prometheus.yaml",
        "deploy/grafana/provisioning/dashboards/weir.yaml",
        "deploy/grafana/dashboards/weir.json",
    ] {
        ensure!(root.join(file).is_file(), "{file} is missing");
    }
    let provider =
        std::fs::read_to_string(root.join("deploy/grafana/provisioning/dashboards/weir.yaml"))?;
    ensure!(
        provider.contains("path: /var/lib/grafana/dashboards"),
        "the dashboard provider does not read the mounted directory"
    );
    let dashboard: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(
        root.join("deploy/grafana/dashboards/weir.json"),
    )?)
    .context("the dashboard is not JSON")?;
    ensure!(
        dashboard["uid"].is_string() && dashboard["title"] == "Weir",
        "the dashboard has no uid or title"
    );
    Ok(())
}

#[test]
fn the_image_ships_the_demo_components_where_weir_up_looks() -> anyhow::Result<()> {
    let dockerfile =
        std::fs::read_to_string(repo_root().join("Dockerfile")).context("reading Dockerfile")?;
    ensure!(
        dockerfile.contains(weir_dispatcher::demo::BUILD_DIR)
            && dockerfile.contains("/opt/weir/functions"),
        "the Dockerfile must copy {} to /opt/weir/functions",
        weir_dispatcher::demo::BUILD_DIR
    );
    ensure!(
        dockerfile.contains("EXPOSE 8080") && dockerfile.contains("USER weir"),
        "the image must run as a non-root user and expose 8080"
    );
    let ignore = std::fs::read_to_string(repo_root().join(".dockerignore"))
        .context("reading .dockerignore")?;
    ensure!(
        ignore.lines().any(|l| l.trim() == "target"),
        ".dockerignore must keep target/ out of the build context"
    );
    Ok(())
}
