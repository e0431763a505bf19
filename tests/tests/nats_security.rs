//! Weir's NATS connection against a real nats-server that demands credentials or TLS: every
//! authentication method of `[brokers.nats]` (user and password from a file or the
//! environment, token, nkey, a creds file under an operator) and TLS (the server verified
//! against `tls_ca`, mutual TLS with `tls_cert`/`tls_key`) carries a core round trip and a
//! confirmed JetStream publish; wrong or missing credentials and certificates that do not
//! verify fail at once with a classified error ([`TransportError::Authentication`],
//! [`TransportError::Tls`]), and `weir run` says so and exits. `weir publish` and `weir tail`
//! with `-c` connect the same way.
//!
//! Certificates are made at test time (`weir_tests::tls`), nkeys and JWTs too (the nkeys
//! crate); every server is a real `nats-server -js` started by the harness.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, ensure, Context as _};
use base64::prelude::{Engine as _, BASE64_URL_SAFE_NO_PAD};
use nkeys::KeyPair;
use serde_json::{json, Value};
use weir_broker_bridge::nats::{NatsConfig, NatsTransport, StreamConfig};
use weir_broker_bridge::{OutboundMessage, Publisher as _, Subscription as _, TransportError};
use weir_tests::nats_server::NatsServer;
use weir_tests::process::WeirProcess;
use weir_tests::tls::TestCa;
use weir_tests::weir::{functions_dir, run_weir};

/// How long a message or an output may take.
const WAIT: Duration = Duration::from_secs(15);
/// A refused connection must be reported within this, not after a round of reconnects.
const FAIL_FAST: Duration = Duration::from_secs(5);

fn config(url: &str) -> NatsConfig {
    NatsConfig {
        servers: vec![url.to_owned()],
        ..NatsConfig::default()
    }
}

fn write(dir: &Path, name: &str, text: &str) -> anyhow::Result<PathBuf> {
    let path = dir.join(name);
    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// A binary-mode CloudEvent whose data is `"hello"`.
fn message(subject: &str) -> OutboundMessage {
    OutboundMessage {
        topic: subject.to_owned(),
        key: None,
        headers: vec![
            ("ce-specversion".into(), "1.0".into()),
            ("ce-id".into(), "secured-1".into()),
            ("ce-type".into(), "com.example.secured".into()),
            ("ce-source".into(), "weir-tests".into()),
            ("content-type".into(), "application/json".into()),
        ],
        payload: r#""hello""#.into(),
        dedup_id: None,
    }
}

/// Connect with `config`; a core message comes back to its own subscription, and a JetStream
/// publish is confirmed and stored.
async fn round_trip(config: &NatsConfig) -> anyhow::Result<()> {
    let transport = NatsTransport::connect(config).await?;
    let mut subscription = transport.subscribe_core("secure.core", None).await?;
    transport
        .core_publisher()
        .publish(message("secure.core"))
        .await?;
    transport.flush().await?;
    let delivery = tokio::time::timeout(WAIT, subscription.next())
        .await
        .context("the core message did not come back")?
        .context("the subscription ended")?;
    ensure!(
        delivery.message.payload.as_deref() == Some(br#""hello""#.as_slice()),
        "{:?}",
        delivery.message
    );
    let stream = StreamConfig::new("SECURE", vec!["secure.js".to_owned()]);
    transport.ensure_stream(&stream).await?;
    let before = transport.stream_messages("SECURE").await?;
    transport
        .jetstream_publisher()
        .publish(message("secure.js"))
        .await?;
    ensure!(transport.stream_messages("SECURE").await? == before + 1);
    subscription.close().await;
    transport.close().await?;
    Ok(())
}

/// Connecting with `config` fails, fast; the error. A weir starting up (which waits up to
/// `startup_wait`, 30 s by default, for a server that does not answer) fails as fast, with the
/// same error: a server that answered and refused will refuse again.
async fn refused(config: &NatsConfig) -> anyhow::Result<TransportError> {
    let mut errors = Vec::new();
    for at_startup in [false, true] {
        let started = Instant::now();
        let connect = async {
            if at_startup {
                NatsTransport::connect_at_startup(config).await
            } else {
                NatsTransport::connect(config).await
            }
        };
        let result = tokio::time::timeout(FAIL_FAST * 4, connect)
            .await
            .context("connecting neither failed nor succeeded")?;
        let Err(error) = result else {
            bail!("connected, though it should have been refused");
        };
        ensure!(
            started.elapsed() < FAIL_FAST,
            "refused only after {:?} (at start-up: {at_startup}): {error}",
            started.elapsed()
        );
        errors.push(error);
    }
    let at_startup = errors.pop().context("two attempts")?;
    let error = errors.pop().context("two attempts")?;
    ensure!(
        at_startup.to_string() == error.to_string(),
        "at start-up: {at_startup}; else: {error}"
    );
    Ok(error)
}

fn is_authentication(error: &TransportError) -> bool {
    matches!(error, TransportError::Authentication { .. })
}

fn is_tls(error: &TransportError) -> bool {
    matches!(error, TransportError::Tls { .. })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_password_token_and_nkey_authenticate_and_wrong_ones_are_refused() -> anyhow::Result<()>
{
    let dir = tempfile::tempdir()?;
    let user_key = KeyPair::new_user();
    let server = NatsServer::start_with_config(&format!(
        r#"authorization {{
  users = [
    {{ user: "weir", password: "s3cret-pw" }}
    {{ nkey: "{}" }}
  ]
}}"#,
        user_key.public_key()
    ))?;
    let url = server.url();

    let password = write(dir.path(), "password", "s3cret-pw\n")?;
    round_trip(&NatsConfig {
        user: Some("weir".into()),
        password_file: Some(password),
        ..config(&url)
    })
    .await
    .context("user and password_file")?;
    let seed = write(dir.path(), "user.nk", &user_key.seed()?)?;
    round_trip(&NatsConfig {
        nkey_seed_file: Some(seed),
        ..config(&url)
    })
    .await
    .context("nkey_seed_file")?;

    let wrong = write(dir.path(), "wrong", "not-the-password")?;
    let error = refused(&NatsConfig {
        user: Some("weir".into()),
        password_file: Some(wrong),
        ..config(&url)
    })
    .await?;
    ensure!(is_authentication(&error), "{error:?}");
    ensure!(
        error.to_string().contains("authorization violation")
            && !error.to_string().contains("not-the-password"),
        "{error}"
    );
    let error = refused(&config(&url)).await?;
    ensure!(is_authentication(&error), "no credentials: {error:?}");
    let stranger = write(dir.path(), "stranger.nk", &KeyPair::new_user().seed()?)?;
    let error = refused(&NatsConfig {
        nkey_seed_file: Some(stranger),
        ..config(&url)
    })
    .await?;
    ensure!(is_authentication(&error), "unknown nkey: {error:?}");
    // A secret file that is not there is named before any connection is tried.
    let missing = dir.path().join("no-such-password");
    let error = refused(&NatsConfig {
        user: Some("weir".into()),
        password_file: Some(missing.clone()),
        ..config(&url)
    })
    .await?;
    ensure!(
        matches!(error, TransportError::Config(_))
            && error.to_string().contains(&format!(
                "password_file: {} does not exist",
                missing.display()
            )),
        "{error:?}"
    );

    let token_server = NatsServer::start_with_config(r#"authorization { token: "t0ken-abc" }"#)?;
    let token = write(dir.path(), "token", "t0ken-abc")?;
    round_trip(&NatsConfig {
        token_file: Some(token),
        ..config(&token_server.url())
    })
    .await
    .context("token_file")?;
    let wrong_token = write(dir.path(), "wrong-token", "t0ken-xyz")?;
    let error = refused(&NatsConfig {
        token_file: Some(wrong_token),
        ..config(&token_server.url())
    })
    .await?;
    ensure!(is_authentication(&error), "wrong token: {error:?}");
    Ok(())
}

// -------------------------------------------------------------------------------------------
// Decentralised auth: an operator, an account and a user, as `nsc` would make them
// -------------------------------------------------------------------------------------------

/// A JWT `issuer` signs about `subject` (the encoding nats-server's jwt library reads).
fn jwt(issuer: &KeyPair, subject: &str, name: &str, nats: Value) -> anyhow::Result<String> {
    let issued_at = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)?
        .as_secs();
    let header = BASE64_URL_SAFE_NO_PAD.encode(r#"{"typ":"JWT","alg":"ed25519-nkey"}"#);
    let claims = BASE64_URL_SAFE_NO_PAD.encode(
        json!({
            "jti": format!("weir-test-{name}-{issued_at}"),
            "iat": issued_at,
            "iss": issuer.public_key(),
            "name": name,
            "sub": subject,
            "nats": nats,
        })
        .to_string(),
    );
    let signed = format!("{header}.{claims}");
    let signature = issuer.sign(signed.as_bytes())?;
    Ok(format!(
        "{signed}.{}",
        BASE64_URL_SAFE_NO_PAD.encode(signature)
    ))
}

/// Account limits that allow everything; JetStream too when `jetstream` (the server refuses
/// it for the system account).
fn unlimited_account(jetstream: bool) -> Value {
    let mut limits = json!({
        "subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1,
        "wildcards": true, "conn": -1, "leaf": -1,
    });
    if jetstream {
        for key in ["mem_storage", "disk_storage", "streams", "consumer"] {
            limits[key] = json!(-1);
        }
    }
    json!({
        "limits": limits,
        "default_permissions": { "pub": {}, "sub": {} },
        "type": "account",
        "version": 2,
    })
}

/// A `.creds` file: the user's JWT and nkey seed, in the layout `nsc` writes.
fn creds(jwt: &str, seed: &str) -> String {
    format!(
        "-----BEGIN NATS USER JWT-----\n{jwt}\n------END NATS USER JWT------\n\n\
         ************************* IMPORTANT *************************\n\
         NKEY Seed printed below can be used to sign and prove identity.\n\n\
         -----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_creds_file_authenticates_under_an_operator() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let operator = KeyPair::new_operator();
    let account = KeyPair::new_account();
    let system = KeyPair::new_account();
    let user = KeyPair::new_user();
    let operator_jwt = jwt(
        &operator,
        &operator.public_key(),
        "weir-test-operator",
        json!({ "system_account": system.public_key(), "type": "operator", "version": 2 }),
    )?;
    let account_jwt = jwt(
        &operator,
        &account.public_key(),
        "weir",
        unlimited_account(true),
    )?;
    let system_jwt = jwt(
        &operator,
        &system.public_key(),
        "SYS",
        unlimited_account(false),
    )?;
    let user_jwt = jwt(
        &account,
        &user.public_key(),
        "weir-user",
        json!({ "pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1, "type": "user", "version": 2 }),
    )?;
    let operator_file = write(dir.path(), "operator.jwt", &operator_jwt)?;
    let server = NatsServer::start_with_config(&format!(
        "operator: \"{}\"\nsystem_account: {}\nresolver: MEMORY\nresolver_preload: {{\n  {}: \"{account_jwt}\"\n  {}: \"{system_jwt}\"\n}}\n",
        operator_file.display(),
        system.public_key(),
        account.public_key(),
        system.public_key(),
    ))?;

    let creds_file = write(dir.path(), "weir.creds", &creds(&user_jwt, &user.seed()?))?;
    round_trip(&NatsConfig {
        creds_file: Some(creds_file),
        ..config(&server.url())
    })
    .await
    .with_context(|| format!("creds_file; server log:\n{}", server.log()))?;

    // A user the account did not sign is refused.
    let impostor = KeyPair::new_user();
    let stranger = KeyPair::new_account();
    let impostor_jwt = jwt(
        &stranger,
        &impostor.public_key(),
        "impostor",
        json!({ "type": "user", "version": 2 }),
    )?;
    let impostor_file = write(
        dir.path(),
        "impostor.creds",
        &creds(&impostor_jwt, &impostor.seed()?),
    )?;
    let error = refused(&NatsConfig {
        creds_file: Some(impostor_file),
        ..config(&server.url())
    })
    .await?;
    ensure!(is_authentication(&error), "{error:?}");
    // A creds file that is not one is named as the problem.
    let garbage = write(dir.path(), "garbage.creds", "not a creds file")?;
    let error = refused(&NatsConfig {
        creds_file: Some(garbage),
        ..config(&server.url())
    })
    .await?;
    ensure!(error.to_string().contains("creds_file"), "{error}");
    Ok(())
}

// -------------------------------------------------------------------------------------------
// TLS
// -------------------------------------------------------------------------------------------

/// A CA, a server certificate for 127.0.0.1 and a client certificate, written to `dir`.
struct Certificates {
    ca: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
}

fn certificates(dir: &Path) -> anyhow::Result<Certificates> {
    let ca = TestCa::new("weir test CA")?;
    let files = Certificates {
        ca: dir.join("ca.pem"),
        server_cert: dir.join("server.pem"),
        server_key: dir.join("server-key.pem"),
        client_cert: dir.join("client.pem"),
        client_key: dir.join("client-key.pem"),
    };
    ca.write(&files.ca)?;
    ca.issue("nats-server", &["127.0.0.1", "localhost"])?
        .write(&files.server_cert, &files.server_key)?;
    ca.issue("weir", &["weir"])?
        .write(&files.client_cert, &files.client_key)?;
    Ok(files)
}

/// A server that speaks only TLS; with `verify`, it also demands a client certificate the CA
/// signed.
fn tls_server(files: &Certificates, verify: bool) -> anyhow::Result<NatsServer> {
    let mut block = format!(
        "tls {{\n  cert_file: \"{}\"\n  key_file: \"{}\"\n  timeout: 2\n",
        files.server_cert.display(),
        files.server_key.display()
    );
    if verify {
        block.push_str(&format!(
            "  ca_file: \"{}\"\n  verify: true\n",
            files.ca.display()
        ));
    }
    block.push_str("}\n");
    NatsServer::start_with_config(&block)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_verifies_the_server_and_mutual_tls_the_client() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let files = certificates(dir.path())?;
    let server = tls_server(&files, false)?;
    let url = server.url();
    round_trip(&NatsConfig {
        tls_ca: Some(files.ca.clone()),
        tls_required: true,
        ..config(&url)
    })
    .await
    .context("TLS with tls_ca")?;
    // The server's certificate is not signed by anything the client trusts.
    let error = refused(&config(&url)).await?;
    ensure!(
        is_tls(&error) && error.to_string().contains("not signed by tls_ca"),
        "without tls_ca: {error:?}"
    );
    let other_ca = write(
        dir.path(),
        "other-ca.pem",
        TestCa::new("another CA")?.cert_pem(),
    )?;
    let error = refused(&NatsConfig {
        tls_ca: Some(other_ca),
        ..config(&url)
    })
    .await?;
    ensure!(is_tls(&error), "another CA: {error:?}");
    // tls_required against a server without TLS: refused rather than sent in the clear.
    let plain = NatsServer::start()?;
    let error = refused(&NatsConfig {
        tls_required: true,
        ..config(&plain.url())
    })
    .await?;
    ensure!(
        is_tls(&error) && error.to_string().contains("did not answer in TLS"),
        "tls_required on a plaintext server: {error:?}"
    );

    let mutual = tls_server(&files, true)?;
    round_trip(&NatsConfig {
        tls_ca: Some(files.ca.clone()),
        tls_cert: Some(files.client_cert.clone()),
        tls_key: Some(files.client_key.clone()),
        ..config(&mutual.url())
    })
    .await
    .context("mutual TLS")?;
    let error = refused(&NatsConfig {
        tls_ca: Some(files.ca.clone()),
        ..config(&mutual.url())
    })
    .await?;
    ensure!(
        is_tls(&error) && error.to_string().contains("set tls_cert and tls_key"),
        "mutual TLS without a client certificate: {error:?}"
    );
    // A client certificate the server's CA did not sign.
    let (stranger_cert, stranger_key) = (
        dir.path().join("stranger.pem"),
        dir.path().join("stranger-key.pem"),
    );
    TestCa::new("another CA")?
        .issue("stranger", &["stranger"])?
        .write(&stranger_cert, &stranger_key)?;
    let error = refused(&NatsConfig {
        tls_ca: Some(files.ca.clone()),
        tls_cert: Some(stranger_cert),
        tls_key: Some(stranger_key),
        ..config(&mutual.url())
    })
    .await?;
    ensure!(
        is_tls(&error)
            && error
                .to_string()
                .contains("does not accept the client certificate"),
        "an untrusted client certificate: {error:?}"
    );
    // A certificate file that is not there is named before any connection is tried.
    let error = refused(&NatsConfig {
        tls_ca: Some(files.ca.clone()),
        tls_cert: Some(dir.path().join("no-such-cert.pem")),
        tls_key: Some(files.client_key.clone()),
        ..config(&mutual.url())
    })
    .await?;
    ensure!(
        matches!(error, TransportError::Config(_))
            && error.to_string().contains("tls_cert")
            && error.to_string().contains("no-such-cert.pem"),
        "a missing client certificate: {error:?}"
    );
    Ok(())
}

// -------------------------------------------------------------------------------------------
// `weir run` end to end
// -------------------------------------------------------------------------------------------

/// A weir whose `[brokers.nats]` uses a password from the environment and mutual TLS.
fn weir_config(url: &str, files: &Certificates) -> anyhow::Result<String> {
    let echo = functions_dir()?.join("echo.wasm");
    ensure!(
        echo.is_file(),
        "{} is missing: run `make functions`",
        echo.display()
    );
    Ok(format!(
        r#"
[brokers.nats]
servers = ["{url}"]
user = "weir"
password_env = "WEIR_TEST_NATS_PASSWORD"
tls_ca = "{ca}"
tls_cert = "{cert}"
tls_key = "{key}"
tls_required = true

[[brokers.nats_streams]]
name = "SECURE"
subjects = ["secure.>"]

[[brokers.nats_streams]]
name = "DLQ"
subjects = ["weir.dlq.>"]

[[functions]]
name = "echo"
module = "{echo}"
outputs = ["secure.out"]
config = {{ output_topic = "secure.out" }}
[functions.trigger]
broker = "jetstream"
topic = "secure.in"
stream = "SECURE"
"#,
        ca = files.ca.display(),
        cert = files.client_cert.display(),
        key = files.client_key.display(),
        echo = echo.display(),
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weir_run_chains_through_an_authenticated_tls_server_and_refuses_a_wrong_password(
) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let files = certificates(dir.path())?;
    let server = NatsServer::start_with_config(&format!(
        "authorization {{ users = [ {{ user: \"weir\", password: \"s3cret-pw\" }} ] }}\ntls {{\n  cert_file: \"{}\"\n  key_file: \"{}\"\n  ca_file: \"{}\"\n  verify: true\n}}\n",
        files.server_cert.display(),
        files.server_key.display(),
        files.ca.display(),
    ))?;
    let config_path = write(
        dir.path(),
        "weir.toml",
        &weir_config(&server.url(), &files)?,
    )?;

    let weir =
        WeirProcess::start(&config_path, &[("WEIR_TEST_NATS_PASSWORD", "s3cret-pw")]).await?;
    let test_side = NatsConfig {
        user: Some("weir".into()),
        password_file: Some(write(dir.path(), "password", "s3cret-pw")?),
        tls_ca: Some(files.ca.clone()),
        tls_cert: Some(files.client_cert.clone()),
        tls_key: Some(files.client_key.clone()),
        ..config(&server.url())
    };
    let transport = NatsTransport::connect(&test_side).await?;
    let mut outputs = transport
        .read_subject_history("secure.out", None)
        .await?
        .context("weir declared no stream capturing secure.out")?;
    transport
        .jetstream_publisher()
        .publish(message("secure.in"))
        .await?;
    let output = tokio::time::timeout(WAIT, outputs.next())
        .await
        .with_context(|| {
            format!(
                "no output within {WAIT:?}; weir's log:\n{}",
                weir.log_text()
            )
        })?
        .context("the output stream ended")?;
    ensure!(
        output.message.payload.as_deref() == Some(br#""hello""#.as_slice()),
        "{:?}",
        output.message
    );

    // The CLI connects as the configuration says (here with the password from a file, as
    // `weir publish` and `weir tail` run without the service's environment); each topic goes
    // to the broker it lives on there.
    let cli_config = write(
        dir.path(),
        "cli.toml",
        &weir_config(&server.url(), &files)?.replace(
            "password_env = \"WEIR_TEST_NATS_PASSWORD\"",
            &format!(
                "password_file = \"{}\"",
                dir.path().join("password").display()
            ),
        ),
    )?;
    let cli_config = cli_config.display().to_string();
    let output = run_weir(
        [
            "publish",
            "secure.in",
            "-c",
            &cli_config,
            "--type",
            "com.example.secured",
            "--data",
            r#""via the CLI""#,
        ],
        WAIT,
    )
    .await?;
    ensure!(output.code == Some(0), "weir publish -c: {output:?}");
    let accepted: Value = serde_json::from_str(output.stdout.trim())
        .with_context(|| format!("publish prints what it published: {output:?}"))?;
    ensure!(accepted["broker"] == "jetstream", "{accepted}");
    // A file with only the connection settings: the topic goes to its one broker.
    let text = std::fs::read_to_string(&cli_config)?;
    let (connection_only, _) = text
        .split_once("[[brokers.nats_streams]]")
        .context("the CLI config declares streams")?;
    let connection_only = write(dir.path(), "connection.toml", connection_only)?;
    let output = run_weir(
        [
            "tail",
            "secure.out",
            "-c",
            &connection_only.display().to_string(),
            "--limit",
            "2",
        ],
        WAIT,
    )
    .await?;
    ensure!(
        output.code == Some(0),
        "weir tail -c: {output:?}\nweir's log:\n{}",
        weir.log_text()
    );
    let data: Vec<String> = output
        .stdout
        .lines()
        .map(|line| serde_json::from_str::<Value>(line).map(|e| e["data"].to_string()))
        .collect::<Result<_, _>>()
        .with_context(|| format!("JSON lines: {output:?}"))?;
    ensure!(
        data == [r#""hello""#, r#""via the CLI""#],
        "{data:?}: {output:?}"
    );
    // Without the configuration the CLI has neither the CA nor a client certificate.
    let output = run_weir(
        [
            "tail",
            "secure.out",
            "--nats",
            &server.url(),
            "--limit",
            "1",
        ],
        WAIT,
    )
    .await?;
    ensure!(
        output.code == Some(1) && output.stderr.contains("TLS with nats failed"),
        "{output:?}"
    );
    drop(weir);

    let started = Instant::now();
    let error = match WeirProcess::start(
        &config_path,
        &[("WEIR_TEST_NATS_PASSWORD", "not-the-password")],
    )
    .await
    {
        Ok(_) => bail!("weir run started with a wrong password"),
        Err(error) => format!("{error:#}"),
    };
    ensure!(
        error.contains("authenticating with nats failed") && !error.contains("not-the-password"),
        "{error}"
    );
    ensure!(
        started.elapsed() < Duration::from_secs(20),
        "weir run took {:?} to give up",
        started.elapsed()
    );
    Ok(())
}
