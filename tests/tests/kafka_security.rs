//! Kafka security against a real broker (Tansu, see `weir_tests::kafka_broker` for what it
//! can do): TLS (`ssl`), mutual TLS, SASL/SCRAM over TLS (`sasl_ssl`) and without
//! (`sasl_plaintext`). Each success path publishes, consumes and commits through Weir's Kafka
//! transport; each failure path must fail `KafkaTransport::connect` with a classified error
//! that says what is wrong, well within the connect timeout (never a hang).

// Test helpers outside `#[test]` functions: a failed expect is a failed assertion here too.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, Instant};

use weir_broker_bridge::kafka::{KafkaConfig, KafkaTransport, SaslMechanism, SecurityProtocol};
use weir_broker_bridge::{
    Ordering, Origin, OutboundMessage, Publisher, Subscription, TransportError,
};
use weir_tests::kafka_broker::{KafkaBroker, SecurityOptions};

/// The first delivery of a fresh group waits for the group join.
const FIRST_DELIVERY: Duration = Duration::from_secs(30);
const COMMIT_WAIT: Duration = Duration::from_secs(15);
/// A TLS or SASL failure is reported on the first connection attempt: `connect` must return
/// well before its own 10 s metadata timeout.
const FAST_FAILURE: Duration = Duration::from_secs(8);
/// Any failure at all: the connect timeout plus slack. Beyond it the test calls it a hang.
const ANY_FAILURE: Duration = Duration::from_secs(20);

const USER: &str = "weir";
const PASSWORD: &str = "correct horse battery staple";

fn scram_users() -> Vec<(String, String)> {
    vec![
        (USER.to_owned(), PASSWORD.to_owned()),
        ("other".to_owned(), "other-password".to_owned()),
    ]
}

/// Connect with `config`; the error, and how long it took to come.
async fn connect_error(config: &KafkaConfig) -> (TransportError, Duration) {
    let started = Instant::now();
    match tokio::time::timeout(ANY_FAILURE, KafkaTransport::connect(config)).await {
        Err(_) => panic!("connect with {config:?} hung for {ANY_FAILURE:?}"),
        Ok(Ok(_)) => panic!("connect with {config:?} succeeded"),
        Ok(Err(error)) => {
            let took = started.elapsed();
            eprintln!("connect failed after {took:?}: {error}");
            (error, took)
        }
    }
}

/// Create `topic`, publish two records, consume and ack them in a fresh group, and wait until
/// the group's committed offset reaches 2: every client Weir makes (admin, producer, consumer
/// with its group coordinator) worked with `config`.
async fn round_trip(broker: &KafkaBroker, config: &KafkaConfig, topic: &str) {
    let transport = KafkaTransport::connect(config)
        .await
        .unwrap_or_else(|e| panic!("connect: {e}; log:\n{}{}", broker.log(), broker.tls_log()));
    transport
        .ensure_topic(topic, 1, 1)
        .await
        .expect("create topic");
    let publisher = transport.publisher().expect("publisher");
    for n in 0..2 {
        publisher
            .publish(OutboundMessage {
                topic: topic.to_owned(),
                key: Some(format!("k{n}").into_bytes().into()),
                headers: vec![("ce_id".into(), format!("evt-{n}"))],
                payload: format!("payload-{n}").into_bytes().into(),
                dedup_id: None,
            })
            .await
            .unwrap_or_else(|e| panic!("publish: {e}; log:\n{}", broker.log()));
    }
    let group = format!("g-{topic}");
    let mut sub = transport
        .subscribe(topic, &group, Ordering::Partition, 4)
        .expect("subscribe");
    for n in 0..2 {
        let delivery = tokio::time::timeout(FIRST_DELIVERY, sub.next())
            .await
            .ok()
            .flatten()
            .unwrap_or_else(|| panic!("delivery {n} never came; log:\n{}", broker.log()));
        assert_eq!(
            delivery.message.payload.as_deref(),
            Some(format!("payload-{n}").as_bytes())
        );
        assert_eq!(
            delivery.message.origin,
            Origin::Kafka {
                topic: topic.to_owned(),
                partition: 0,
                offset: n
            }
        );
        delivery.ack().await.expect("ack");
    }
    let deadline = Instant::now() + COMMIT_WAIT;
    loop {
        let committed = transport
            .committed_offsets(topic, &group)
            .await
            .expect("committed offsets");
        if committed.get(&0).copied().flatten() == Some(2) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "committed offset is {committed:?}, expected 2"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    sub.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssl_publishes_consumes_and_commits() {
    let broker = KafkaBroker::start_secured(SecurityOptions {
        tls: true,
        ..Default::default()
    })
    .await
    .expect("tansu behind TLS starts");
    let config = broker.config();
    assert_eq!(config.security_protocol, Some(SecurityProtocol::Ssl));
    assert!(config.ssl_ca_location.is_some());
    assert!(
        config.validate("kafka").is_empty(),
        "{:?}",
        config.validate("kafka")
    );
    round_trip(&broker, &config, "tls-orders").await;
    assert!(
        !broker.tls_log().contains("TLS handshake failed"),
        "no failed handshake: {}",
        broker.tls_log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssl_failures_are_classified_and_fast() {
    let broker = KafkaBroker::start_secured(SecurityOptions {
        tls: true,
        ..Default::default()
    })
    .await
    .expect("tansu behind TLS starts");

    // A CA that did not issue the broker's certificate.
    let config = KafkaConfig {
        ssl_ca_location: Some(broker.unrelated_ca().expect("unrelated CA")),
        ..broker.config()
    };
    let (error, took) = connect_error(&config).await;
    match &error {
        TransportError::Tls { reason, .. } => {
            assert!(reason.contains("certificate verify failed"), "{reason}");
            assert!(reason.contains(&broker.bootstrap()), "{reason}");
        }
        other => panic!("expected a TLS error, got {other:?}"),
    }
    assert!(took < FAST_FAILURE, "took {took:?}: {error}");
    assert!(
        error.to_string().starts_with("TLS with kafka failed: "),
        "{error}"
    );

    // Without a CA the system's store is used, which does not know the test CA either.
    let config = KafkaConfig {
        ssl_ca_location: None,
        ..broker.config()
    };
    let (error, took) = connect_error(&config).await;
    assert!(
        matches!(&error, TransportError::Tls { reason, .. } if reason.contains("certificate verify failed")),
        "{error:?}"
    );
    assert!(took < FAST_FAILURE, "took {took:?}: {error}");

    // A CA file librdkafka cannot load fails before any connection.
    let garbage = broker.password_file("not a certificate").expect("file");
    let config = KafkaConfig {
        ssl_ca_location: Some(garbage),
        ..broker.config()
    };
    let (error, _) = connect_error(&config).await;
    assert!(
        matches!(&error, TransportError::Tls { reason, .. } if reason.contains("ssl.ca.location")),
        "{error:?}"
    );

    // Plaintext to the TLS port: the TLS server hangs up on the first request. Not
    // classified (it looks like any dropped connection), but bounded by the connect timeout,
    // with librdkafka's last error and a hint.
    let config = KafkaConfig {
        security_protocol: None,
        ssl_ca_location: None,
        ..broker.config()
    };
    let (error, took) = connect_error(&config).await;
    assert!(
        matches!(&error, TransportError::Connect { reason, .. }
            if reason.contains("in state APIVERSION_QUERY") && reason.contains("expect TLS")),
        "{error:?}"
    );
    assert!(error.to_string().contains(&broker.bootstrap()), "{error}");
    assert!(took < ANY_FAILURE, "took {took:?}: {error}");

    // TLS to Tansu's own plaintext listener: the handshake gets no answer.
    let config = KafkaConfig {
        bootstrap: broker.plaintext_bootstrap(),
        ..broker.config()
    };
    let (error, took) = connect_error(&config).await;
    assert!(
        matches!(&error, TransportError::Connect { reason, .. }
            if reason.contains("in state SSL_HANDSHAKE") && reason.contains("speak TLS")),
        "{error:?}"
    );
    assert!(
        error.to_string().contains(&broker.plaintext_bootstrap()),
        "{error}"
    );
    assert!(took < ANY_FAILURE, "took {took:?}: {error}");

    // After all that, the right settings still work.
    KafkaTransport::connect(&broker.config())
        .await
        .expect("the right CA connects");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_needs_the_client_certificate() {
    let broker = KafkaBroker::start_secured(SecurityOptions {
        tls: true,
        require_client_certificate: true,
        ..Default::default()
    })
    .await
    .expect("tansu behind mutual TLS starts");
    let config = broker.config();
    assert!(config.ssl_certificate_location.is_some() && config.ssl_key_location.is_some());
    round_trip(&broker, &config, "mtls-orders").await;

    let without = KafkaConfig {
        ssl_certificate_location: None,
        ssl_key_location: None,
        ..broker.config()
    };
    let (error, took) = connect_error(&without).await;
    assert!(
        matches!(&error, TransportError::Tls { reason, .. } if reason.contains("certificate required")),
        "{error:?}"
    );
    assert!(took < FAST_FAILURE, "took {took:?}: {error}");
    assert!(
        broker.tls_log().contains("TLS handshake failed"),
        "the terminator refused the handshake: {}",
        broker.tls_log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sasl_ssl_scram_publishes_consumes_and_commits() {
    let broker = KafkaBroker::start_secured(SecurityOptions {
        tls: true,
        scram_users: scram_users(),
        ..Default::default()
    })
    .await
    .expect("tansu with TLS and SCRAM starts");
    let config = broker.config();
    assert_eq!(config.security_protocol, Some(SecurityProtocol::SaslSsl));
    assert_eq!(config.sasl_mechanism, Some(SaslMechanism::ScramSha512));
    assert!(
        config.validate("kafka").is_empty(),
        "{:?}",
        config.validate("kafka")
    );
    round_trip(&broker, &config, "scram512-orders").await;

    // The other user, with SCRAM-SHA-256.
    let config = KafkaConfig {
        sasl_mechanism: Some(SaslMechanism::ScramSha256),
        sasl_username: Some("other".to_owned()),
        sasl_password_file: Some(broker.password_file("other-password").expect("file")),
        ..broker.config()
    };
    round_trip(&broker, &config, "scram256-orders").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sasl_failures_are_classified_and_fast() {
    let broker = KafkaBroker::start_secured(SecurityOptions {
        tls: true,
        scram_users: scram_users(),
        ..Default::default()
    })
    .await
    .expect("tansu with TLS and SCRAM starts");

    for mechanism in [SaslMechanism::ScramSha512, SaslMechanism::ScramSha256] {
        // The right user, a wrong password.
        let config = KafkaConfig {
            sasl_mechanism: Some(mechanism),
            sasl_password_file: Some(broker.password_file("wrong password").expect("file")),
            ..broker.config()
        };
        let (error, took) = connect_error(&config).await;
        match &error {
            TransportError::Authentication { reason, .. } => {
                assert!(reason.contains("SASL authentication error"), "{reason}");
                assert!(!reason.contains("wrong password"), "{reason}");
            }
            other => panic!("{mechanism:?}: expected an authentication error, got {other:?}"),
        }
        assert!(took < FAST_FAILURE, "took {took:?}: {error}");
        assert!(
            error
                .to_string()
                .starts_with("authenticating with kafka failed: "),
            "{error}"
        );
    }

    // A user the broker does not know.
    let config = KafkaConfig {
        sasl_username: Some("nobody".to_owned()),
        ..broker.config()
    };
    let (error, took) = connect_error(&config).await;
    assert!(
        matches!(&error, TransportError::Authentication { .. }),
        "{error:?}"
    );
    assert!(took < FAST_FAILURE, "took {took:?}: {error}");

    // A password valid for another user.
    let config = KafkaConfig {
        sasl_username: Some("other".to_owned()),
        ..broker.config()
    };
    let (error, _) = connect_error(&config).await;
    assert!(
        matches!(&error, TransportError::Authentication { .. }),
        "{error:?}"
    );

    // PLAIN: Tansu 0.6 does not offer it (it hangs up on the handshake).
    let config = KafkaConfig {
        sasl_mechanism: Some(SaslMechanism::Plain),
        ..broker.config()
    };
    let (error, took) = connect_error(&config).await;
    assert!(
        matches!(&error, TransportError::Authentication { reason, .. }
            if reason.contains("SASL PLAIN mechanism handshake failed")),
        "{error:?}"
    );
    assert!(took < FAST_FAILURE, "took {took:?}: {error}");

    // No SASL at all against a broker that requires it (TLS alone): Tansu hangs up on the
    // first request that is not part of authenticating.
    let config = KafkaConfig {
        security_protocol: Some(SecurityProtocol::Ssl),
        sasl_mechanism: None,
        sasl_username: None,
        sasl_password_file: None,
        ..broker.config()
    };
    let (error, took) = connect_error(&config).await;
    assert!(
        matches!(&error, TransportError::Connect { reason, .. } if reason.contains("require SASL")),
        "{error:?}"
    );
    assert!(took < ANY_FAILURE, "took {took:?}: {error}");

    // After all that, the right credentials still work.
    KafkaTransport::connect(&broker.config())
        .await
        .expect("the right password connects");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sasl_plaintext_scram_works_and_refuses_a_wrong_password() {
    let broker = KafkaBroker::start_secured(SecurityOptions {
        scram_users: scram_users(),
        ..Default::default()
    })
    .await
    .expect("tansu with SCRAM starts");
    let config = KafkaConfig {
        sasl_mechanism: Some(SaslMechanism::ScramSha256),
        ..broker.config()
    };
    assert_eq!(
        config.security_protocol,
        Some(SecurityProtocol::SaslPlaintext)
    );
    round_trip(&broker, &config, "scram-plaintext-orders").await;

    let config = KafkaConfig {
        sasl_password_file: Some(broker.password_file("wrong password").expect("file")),
        ..broker.config()
    };
    let (error, took) = connect_error(&config).await;
    assert!(
        matches!(&error, TransportError::Authentication { reason, .. } if reason.contains("SASL authentication error")),
        "{error:?}"
    );
    assert!(took < FAST_FAILURE, "took {took:?}: {error}");
}
