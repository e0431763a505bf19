//! The NATS transport against a real `nats-server -js` (one per test, on free loopback ports):
//! confirmed JetStream publish and settle semantics, in-flight bound, lag, stream set-up (and
//! re-creating a deleted declared stream, and a deleted consumer after its ack floor),
//! de-duplication, core queue groups, and surviving a server restart.
//!
//! Every wait is bounded; a test that hangs is a failure, not a stuck CI job.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use async_nats::jetstream::consumer::DeliverPolicy;
use async_nats::jetstream::stream;
use weir_broker_bridge::nats::{
    DeliverFrom, JetStreamConsumerOptions, JetStreamSubscription, NatsConfig, NatsTransport,
    RetentionKind, StorageKind, StreamConfig,
};
use weir_broker_bridge::{
    Backlog, BrokerKind, Delivery, Origin, OutboundMessage, Published, Publisher, RetryStyle,
    Subscription, TransportError,
};
use weir_tests::nats_server::NatsServer;

const STREAM: &str = "EVENTS";
const SUBJECT: &str = "events.created";

fn config_for(server: &NatsServer) -> NatsConfig {
    NatsConfig {
        servers: vec![server.url()],
        name: Some("weir-nats-transport-test".into()),
        connect_timeout: Duration::from_secs(2),
        request_timeout: Duration::from_secs(5),
        reconnect_delay_max: Duration::from_millis(500),
        ..NatsConfig::default()
    }
}

/// A server, a connection and the `EVENTS` stream (`events.>`), with `storage`.
async fn setup(storage: StorageKind) -> anyhow::Result<(NatsServer, NatsTransport)> {
    let server = NatsServer::start()?;
    let transport = NatsTransport::connect(&config_for(&server)).await?;
    let mut stream = StreamConfig::new(STREAM, vec!["events.>".into()]);
    stream.storage = storage;
    let report = transport.ensure_stream(&stream).await?;
    ensure!(
        report.created,
        "a fresh server has no stream yet: {report:?}"
    );
    Ok((server, transport))
}

/// A message of `payload` alone to `subject`.
fn bare(subject: &'static str, payload: &'static str) -> OutboundMessage {
    OutboundMessage {
        topic: subject.into(),
        key: None,
        headers: Vec::new(),
        payload: payload.into(),
        dedup_id: None,
    }
}

fn options(ack_wait: Duration) -> JetStreamConsumerOptions {
    let mut options = JetStreamConsumerOptions::new(STREAM);
    options.durable = Some("worker".into());
    options.ack_wait = ack_wait;
    options
}

fn message(payload: &'static str, dedup_id: Option<&str>) -> OutboundMessage {
    OutboundMessage {
        topic: SUBJECT.into(),
        key: None,
        headers: vec![
            ("ce-id".into(), payload.into()),
            ("x-multi".into(), "one".into()),
            ("x-multi".into(), "two".into()),
        ],
        payload: payload.into(),
        dedup_id: dedup_id.map(str::to_owned),
    }
}

async fn next_within(subscription: &mut dyn Subscription, wait: Duration) -> Option<Delivery> {
    tokio::time::timeout(wait, subscription.next())
        .await
        .ok()
        .flatten()
}

async fn expect_next(
    subscription: &mut dyn Subscription,
    wait: Duration,
) -> anyhow::Result<Delivery> {
    match next_within(subscription, wait).await {
        Some(delivery) => Ok(delivery),
        None => bail!("no delivery within {wait:?}"),
    }
}

fn sequence_of(delivery: &Delivery) -> anyhow::Result<u64> {
    match &delivery.message.origin {
        Origin::JetStream { stream, sequence } => {
            ensure!(&**stream == STREAM, "origin stream {stream}");
            Ok(*sequence)
        }
        other => bail!("not a JetStream origin: {other:?}"),
    }
}

/// Polls `lag()` until it equals `expected` (bounded).
/// The `worker` durable's info, read from the server.
async fn worker_info(
    transport: &NatsTransport,
) -> anyhow::Result<async_nats::jetstream::consumer::Info> {
    Ok(transport
        .jetstream()
        .get_stream(STREAM)
        .await?
        .consumer_info("worker")
        .await?
        .clone())
}

async fn wait_for_lag(subscription: &dyn Subscription, expected: u64) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let lag = subscription.lag().await?;
        if lag == expected {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("lag stayed {lag}, expected {expected}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn confirmed_publish_consume_and_ack_leaves_nothing_pending() -> anyhow::Result<()> {
    let (_server, transport) = setup(StorageKind::Memory).await?;
    let publisher = transport.jetstream_publisher();
    assert_eq!(publisher.broker(), BrokerKind::JetStream);
    publisher.publish(message("hello", Some("id-1"))).await?;

    let mut subscription = transport
        .subscribe_jetstream(SUBJECT, &options(Duration::from_secs(1)), 4)
        .await?;
    assert_eq!(subscription.retry_style(), RetryStyle::Redeliver);
    assert_eq!(subscription.broker(), BrokerKind::JetStream);
    let delivery = expect_next(&mut subscription, Duration::from_secs(5)).await?;
    let inbound = &delivery.message;
    assert_eq!(inbound.topic, SUBJECT);
    assert_eq!(inbound.payload.as_deref(), Some(&b"hello"[..]));
    assert_eq!(inbound.delivery_count, 1);
    assert_eq!(inbound.key, None);
    assert_eq!(sequence_of(&delivery)?, 1);
    let headers = inbound.headers.view();
    assert!(headers.contains(&("ce-id", "hello")));
    assert!(headers.contains(&("x-multi", "one")));
    assert!(headers.contains(&("x-multi", "two")));
    assert!(headers.contains(&("Nats-Msg-Id", "id-1")));
    assert_eq!(inbound.headers.get("CE-ID"), Some("hello"));
    delivery.ack().await?;

    // Acks are sent, not confirmed: the server applies them a moment later.
    wait_for_lag(&subscription, 0).await?;
    // And nothing comes back after ack_wait.
    assert!(next_within(&mut subscription, Duration::from_millis(2500))
        .await
        .is_none());
    subscription.close().await;
    assert!(
        subscription.next().await.is_none(),
        "closed subscriptions end"
    );
    Ok(())
}

#[tokio::test]
async fn retry_after_redelivers_no_sooner_than_the_delay() -> anyhow::Result<()> {
    let (_server, transport) = setup(StorageKind::Memory).await?;
    transport
        .jetstream_publisher()
        .publish(message("retry", None))
        .await?;
    // A long ack_wait, so only the NAK delay can explain the redelivery.
    let mut subscription = transport
        .subscribe_jetstream(SUBJECT, &options(Duration::from_secs(30)), 4)
        .await?;
    let first = expect_next(&mut subscription, Duration::from_secs(5)).await?;
    let sequence = sequence_of(&first)?;
    let nacked_at = Instant::now();
    first.retry_after(Duration::from_millis(300)).await?;

    let second = expect_next(&mut subscription, Duration::from_secs(5)).await?;
    let waited = nacked_at.elapsed();
    assert!(
        waited >= Duration::from_millis(300),
        "redelivered after {waited:?}"
    );
    assert_eq!(second.message.delivery_count, 2);
    assert_eq!(sequence_of(&second)?, sequence);
    second.ack().await?;
    // Acks are sent, not confirmed: the server applies them a moment later.
    wait_for_lag(&subscription, 0).await?;
    Ok(())
}

#[tokio::test]
async fn term_stops_redelivery() -> anyhow::Result<()> {
    let (_server, transport) = setup(StorageKind::Memory).await?;
    transport
        .jetstream_publisher()
        .publish(message("poison", None))
        .await?;
    let mut subscription = transport
        .subscribe_jetstream(SUBJECT, &options(Duration::from_secs(1)), 4)
        .await?;
    let delivery = expect_next(&mut subscription, Duration::from_secs(5)).await?;
    delivery.term().await?;
    assert!(
        next_within(&mut subscription, Duration::from_millis(2500))
            .await
            .is_none(),
        "a terminated message came back"
    );
    // Acks are sent, not confirmed: the server applies them a moment later.
    wait_for_lag(&subscription, 0).await?;
    Ok(())
}

#[tokio::test]
async fn unsettled_drop_is_redelivered_after_ack_wait() -> anyhow::Result<()> {
    let (_server, transport) = setup(StorageKind::Memory).await?;
    transport
        .jetstream_publisher()
        .publish(message("dropped", None))
        .await?;
    let mut subscription = transport
        .subscribe_jetstream(SUBJECT, &options(Duration::from_secs(1)), 4)
        .await?;
    let first = expect_next(&mut subscription, Duration::from_secs(5)).await?;
    let sequence = sequence_of(&first)?;
    let dropped_at = Instant::now();
    drop(first);

    let second = expect_next(&mut subscription, Duration::from_secs(5)).await?;
    let waited = dropped_at.elapsed();
    assert!(
        waited >= Duration::from_millis(800),
        "redelivered after only {waited:?}"
    );
    assert_eq!(sequence_of(&second)?, sequence);
    assert_eq!(second.message.delivery_count, 2);
    second.ack().await?;
    Ok(())
}

#[tokio::test]
async fn in_progress_keeps_a_message_past_ack_wait() -> anyhow::Result<()> {
    let (_server, transport) = setup(StorageKind::Memory).await?;
    transport
        .jetstream_publisher()
        .publish(message("slow", None))
        .await?;
    let mut subscription = transport
        .subscribe_jetstream(SUBJECT, &options(Duration::from_secs(1)), 4)
        .await?;
    let delivery = expect_next(&mut subscription, Duration::from_secs(5)).await?;

    // Work for 3 × ack_wait, heartbeating every 300 ms; a redelivery would show up here
    // because the subscription has free in-flight slots.
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(3) {
        delivery.in_progress().await?;
        if let Some(redelivered) = next_within(&mut subscription, Duration::from_millis(300)).await
        {
            bail!(
                "redelivered while in progress: {:?}",
                redelivered.message.origin
            );
        }
    }
    assert_eq!(delivery.message.delivery_count, 1);
    delivery.ack().await?;
    assert!(next_within(&mut subscription, Duration::from_millis(1500))
        .await
        .is_none());
    // Acks are sent, not confirmed: the server applies them a moment later.
    wait_for_lag(&subscription, 0).await?;
    Ok(())
}

#[tokio::test]
async fn nats_msg_id_deduplicates_publishes() -> anyhow::Result<()> {
    let (_server, transport) = setup(StorageKind::Memory).await?;
    let publisher = transport.jetstream_publisher();
    assert_eq!(
        publisher.publish(message("once", Some("output-1"))).await?,
        Published::Stored
    );
    // A redelivered input republishes its output with the same id: success, not stored twice,
    // and said to be a duplicate.
    assert_eq!(
        publisher.publish(message("once", Some("output-1"))).await?,
        Published::Duplicate
    );
    assert_eq!(transport.stream_messages(STREAM).await?, 1);
    assert_eq!(
        publisher
            .publish(message("other", Some("output-2")))
            .await?,
        Published::Stored
    );
    assert_eq!(transport.stream_messages(STREAM).await?, 2);
    Ok(())
}

#[tokio::test]
async fn ensure_stream_creates_then_reports_differences_without_changing() -> anyhow::Result<()> {
    let server = NatsServer::start()?;
    let transport = NatsTransport::connect(&config_for(&server)).await?;
    let original = StreamConfig::new("ORDERS", vec!["orders.>".into()]);

    let created = transport.ensure_stream(&original).await?;
    assert!(created.created);
    assert!(created.differences.is_empty());

    let again = transport.ensure_stream(&original).await?;
    assert!(!again.created);
    assert!(again.differences.is_empty(), "{:?}", again.differences);

    let mut changed = original.clone();
    changed.subjects.push("refunds.>".into());
    changed.storage = StorageKind::Memory;
    changed.max_age = Some(Duration::from_secs(3600));
    changed.max_msgs = Some(1000);
    let report = transport.ensure_stream(&changed).await?;
    assert!(!report.created);
    let fields: Vec<&str> = report.differences.iter().map(|d| d.field).collect();
    assert_eq!(fields, vec!["subjects", "storage", "max_msgs", "max_age"]);
    let max_msgs = &report.differences[2];
    assert_eq!(
        (max_msgs.configured.as_str(), max_msgs.actual.as_str()),
        ("1000", "unlimited")
    );

    // The stream was left as it was.
    let unchanged = transport.ensure_stream(&original).await?;
    assert!(
        unchanged.differences.is_empty(),
        "{:?}",
        unchanged.differences
    );
    Ok(())
}

#[tokio::test]
async fn lag_counts_pending_and_unacknowledged_messages() -> anyhow::Result<()> {
    let (_server, transport) = setup(StorageKind::Memory).await?;
    let publisher = transport.jetstream_publisher();
    for _ in 0..5 {
        publisher.publish(message("lag", None)).await?;
    }
    let mut subscription = transport
        .subscribe_jetstream(SUBJECT, &options(Duration::from_secs(30)), 1)
        .await?;
    assert_eq!(subscription.lag().await?, 5);
    let first = expect_next(&mut subscription, Duration::from_secs(5)).await?;
    // One handed out (ack pending) plus four waiting: still 5 until it is acked.
    assert_eq!(subscription.lag().await?, 5);
    first.ack().await?;
    wait_for_lag(&subscription, 4).await?;
    for _ in 0..4 {
        expect_next(&mut subscription, Duration::from_secs(5))
            .await?
            .ack()
            .await?;
    }
    // Acks are sent, not confirmed: the server applies them a moment later.
    wait_for_lag(&subscription, 0).await?;
    Ok(())
}

#[tokio::test]
async fn prefetch_multiplies_the_bound_and_buffered_deliveries_are_not_redelivered(
) -> anyhow::Result<()> {
    let (_server, transport) = setup(StorageKind::Memory).await?;
    let publisher = transport.jetstream_publisher();
    for _ in 0..12 {
        publisher.publish(message("prefetched", None)).await?;
    }
    let mut opts = options(Duration::from_secs(1));
    opts.prefetch = 2;
    // 3 slots × (1 + 2): nine unsettled at most, and that is the consumer's max_ack_pending.
    let mut subscription = transport.subscribe_jetstream(SUBJECT, &opts, 3).await?;
    let info = worker_info(&transport).await?;
    assert_eq!(info.config.max_ack_pending, 9);
    let mut held = Vec::new();
    for _ in 0..9 {
        held.push(expect_next(&mut subscription, Duration::from_secs(5)).await?);
    }
    assert!(
        next_within(&mut subscription, Duration::from_millis(500))
            .await
            .is_none(),
        "a tenth delivery while nine are unsettled"
    );
    for delivery in held.drain(..) {
        delivery.ack().await?;
    }
    // The last three now wait in the buffer while one slot's worth is worked on for 2.5 ack
    // waits: the buffer's heartbeats keep them from being redelivered.
    let first = expect_next(&mut subscription, Duration::from_secs(5)).await?;
    let working_until = Instant::now() + Duration::from_millis(2500);
    while Instant::now() < working_until {
        first.in_progress().await?;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    first.ack().await?;
    for _ in 0..2 {
        expect_next(&mut subscription, Duration::from_secs(5))
            .await?
            .ack()
            .await?;
    }
    wait_for_lag(&subscription, 0).await?;
    let info = worker_info(&transport).await?;
    assert_eq!(
        info.delivered.consumer_sequence, 12,
        "12 messages, each delivered once: {info:?}"
    );
    Ok(())
}

#[tokio::test]
async fn max_in_flight_bounds_unsettled_deliveries() -> anyhow::Result<()> {
    let (_server, transport) = setup(StorageKind::Memory).await?;
    let publisher = transport.jetstream_publisher();
    for _ in 0..20 {
        publisher.publish(message("bounded", None)).await?;
    }
    // No prefetch: the bound is exactly the in-flight slots.
    let mut no_prefetch = options(Duration::from_secs(30));
    no_prefetch.prefetch = 0;
    let mut subscription = transport
        .subscribe_jetstream(SUBJECT, &no_prefetch, 3)
        .await?;
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(expect_next(&mut subscription, Duration::from_secs(5)).await?);
    }
    assert!(
        next_within(&mut subscription, Duration::from_millis(1500))
            .await
            .is_none(),
        "a fourth delivery while three are unsettled"
    );

    let mut seen = HashSet::new();
    let mut settled = 0;
    let deadline = Instant::now() + Duration::from_secs(20);
    while settled < 20 {
        ensure!(
            Instant::now() < deadline,
            "only {settled} of 20 settled in time"
        );
        let delivery = held.remove(0);
        ensure!(
            seen.insert(sequence_of(&delivery)?),
            "sequence delivered twice"
        );
        delivery.ack().await?;
        settled += 1;
        if settled + held.len() < 20 {
            held.push(expect_next(&mut subscription, Duration::from_secs(5)).await?);
        }
        ensure!(held.len() <= 3, "more than 3 in flight");
        if held.len() == 3 {
            ensure!(
                next_within(&mut subscription, Duration::from_millis(20))
                    .await
                    .is_none(),
                "a delivery beyond max_in_flight"
            );
        }
    }
    assert_eq!(seen.len(), 20);
    // Acks are sent, not confirmed: the server applies them a moment later.
    wait_for_lag(&subscription, 0).await?;
    Ok(())
}

#[tokio::test]
async fn core_queue_group_shares_messages_without_duplicates() -> anyhow::Result<()> {
    let server = NatsServer::start()?;
    let transport = NatsTransport::connect(&config_for(&server)).await?;
    let mut first = transport
        .subscribe_core("jobs.*", Some("workers".into()))
        .await?;
    let mut second = transport
        .subscribe_core("jobs.*", Some("workers".into()))
        .await?;
    assert_eq!(first.retry_style(), RetryStyle::InPlace);
    assert_eq!(first.broker(), BrokerKind::Nats);

    let publisher = transport.core_publisher();
    assert_eq!(publisher.broker(), BrokerKind::Nats);
    for index in 0..1000 {
        publisher
            .publish(OutboundMessage {
                topic: "jobs.new".into(),
                key: None,
                headers: vec![("n".into(), index.to_string())],
                payload: index.to_string().into(),
                dedup_id: None,
            })
            .await?;
    }

    async fn drain(subscription: &mut dyn Subscription) -> anyhow::Result<Vec<String>> {
        let mut received = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            let Some(delivery) = next_within(subscription, Duration::from_millis(500)).await else {
                break;
            };
            ensure!(delivery.message.delivery_count == 1);
            ensure!(
                delivery.message.origin
                    == Origin::Nats {
                        subject: "jobs.new".into()
                    },
                "{:?}",
                delivery.message.origin
            );
            let payload = delivery.message.payload.clone().context("core payload")?;
            received.push(String::from_utf8(payload.to_vec())?);
            delivery.ack().await?;
        }
        Ok(received)
    }
    let (from_first, from_second) = tokio::join!(drain(&mut first), drain(&mut second));
    let (from_first, from_second) = (from_first?, from_second?);
    assert!(
        !from_first.is_empty() && !from_second.is_empty(),
        "both members get work"
    );
    let total = from_first.len() + from_second.len();
    let unique: HashSet<&String> = from_first.iter().chain(&from_second).collect();
    assert_eq!(total, 1000, "every message delivered once");
    assert_eq!(unique.len(), 1000, "no duplicates");
    assert_eq!(first.lag().await?, 0);
    first.close().await;
    assert!(first.next().await.is_none());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscription_survives_a_server_restart() -> anyhow::Result<()> {
    survives_restart(false).await
}

/// A crash (SIGKILL) sends no "server shutdown" status: the pull request just vanishes and the
/// subscription must notice by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscription_survives_a_server_crash() -> anyhow::Result<()> {
    survives_restart(true).await
}

async fn survives_restart(crash: bool) -> anyhow::Result<()> {
    let (mut server, transport) = setup(StorageKind::File).await?;
    let publisher = transport.jetstream_publisher();
    publisher.publish(message("before", Some("before"))).await?;
    let mut subscription = transport
        .subscribe_jetstream(SUBJECT, &options(Duration::from_secs(5)), 4)
        .await?;
    let before = expect_next(&mut subscription, Duration::from_secs(5)).await?;
    assert_eq!(before.message.payload.as_deref(), Some(&b"before"[..]));
    before.ack().await?;

    tokio::task::block_in_place(|| {
        if crash {
            server.kill()?;
        }
        server.restart()
    })?;

    // The client reconnects by itself; publishing works again once it has.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match publisher.publish(message("after", Some("after"))).await {
            Ok(_) => break,
            Err(err) if Instant::now() < deadline => {
                tracing::info!(error = %err, "publish after restart not yet possible");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(err) => return Err(err).context("publishing after the restart"),
        }
    }
    // Settle everything until the consumer is empty. A graceful stop flushes the consumer's
    // ack state, so only "after" comes; a crash may lose the last acks (JetStream writes
    // consumer state lazily), so "before" may come again: a duplicate, never a loss.
    let mut received = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !received.contains(&(2, "after".to_owned())) || subscription.lag().await? > 0 {
        ensure!(
            Instant::now() < deadline,
            "not drained in time; got {received:?}"
        );
        let Some(delivery) = next_within(&mut subscription, Duration::from_secs(1)).await else {
            continue;
        };
        let payload = delivery.message.payload.clone().context("payload")?;
        received.push((
            sequence_of(&delivery)?,
            String::from_utf8(payload.to_vec())?,
        ));
        delivery.ack().await?;
    }
    if crash {
        ensure!(
            received.iter().all(
                |entry| *entry == (1, "before".to_owned()) || *entry == (2, "after".to_owned())
            ),
            "unexpected deliveries after the crash: {received:?}"
        );
    } else {
        assert_eq!(
            received,
            vec![(2, "after".to_owned())],
            "the file store kept sequences and acks"
        );
    }
    wait_for_lag(&subscription, 0).await?;
    assert_eq!(transport.stream_messages(STREAM).await?, 2);
    Ok(())
}

#[tokio::test]
async fn publish_to_a_subject_without_stream_is_a_clear_error() -> anyhow::Result<()> {
    let (_server, transport) = setup(StorageKind::Memory).await?;
    let mut outbound = message("lost", None);
    outbound.topic = "nowhere.at.all".into();
    match transport.jetstream_publisher().publish(outbound).await {
        Err(TransportError::Publish { topic, reason }) => {
            assert_eq!(topic, "nowhere.at.all");
            assert!(
                reason.contains("no JetStream stream captures this subject"),
                "{reason}"
            );
            Ok(())
        }
        other => bail!("expected a publish error, got {other:?}"),
    }
}

/// A message larger than NATS takes is refused as [`TransportError::TooLarge`], so that what
/// sends it can tell it from a broker that is down: over the server's `max_payload` (counted
/// with its headers, on core NATS and JetStream) and over a stream's `max_msg_size` (refused by
/// the server). The connection goes on serving the messages that fit.
#[tokio::test]
async fn a_message_larger_than_the_server_or_its_stream_takes_is_too_large() -> anyhow::Result<()> {
    let server = NatsServer::start_with_config("max_payload: 4096\n")?;
    let transport = NatsTransport::connect(&config_for(&server)).await?;
    transport
        .ensure_stream(&StreamConfig::new(STREAM, vec!["events.>".into()]))
        .await?;
    transport
        .jetstream()
        .create_stream(stream::Config {
            name: "CAPPED".into(),
            subjects: vec!["capped.>".into()],
            max_message_size: 1024,
            ..Default::default()
        })
        .await?;
    let sized = |topic: &str, payload_bytes: usize| OutboundMessage {
        topic: topic.into(),
        key: None,
        headers: vec![("ce-id".into(), format!("sized-{payload_bytes}"))],
        payload: vec![b'x'; payload_bytes].into(),
        dedup_id: Some(format!("{topic}-{payload_bytes}")),
    };
    let too_large =
        |result: Result<Published, TransportError>, topic: &str, says: &str| match result {
            Err(TransportError::TooLarge {
                topic: refused,
                reason,
            }) => {
                ensure!(refused == topic, "{refused}");
                ensure!(reason.contains(says), "{topic}: {reason}");
                Ok(())
            }
            other => bail!("{topic}: expected TooLarge, got {other:?}"),
        };
    let jetstream = transport.jetstream_publisher();
    let core = transport.core_publisher();
    // The payload alone fits; with its headers it does not.
    too_large(
        jetstream.publish(sized(SUBJECT, 4090)).await,
        SUBJECT,
        "limit of 4096",
    )?;
    too_large(
        core.publish(sized("plain.subject", 4090)).await,
        "plain.subject",
        "limit of 4096",
    )?;
    too_large(
        jetstream.publish(sized("capped.in", 2000)).await,
        "capped.in",
        "maximum",
    )?;

    assert_eq!(
        jetstream.publish(sized(SUBJECT, 3000)).await?,
        Published::Stored
    );
    assert_eq!(
        jetstream.publish(sized("capped.in", 500)).await?,
        Published::Stored
    );
    core.publish(sized("plain.subject", 3000)).await?;
    assert_eq!(transport.stream_messages(STREAM).await?, 1);
    assert_eq!(transport.stream_messages("CAPPED").await?, 1);
    Ok(())
}

/// Polls until the server has `stream` again (bounded).
async fn wait_for_stream(transport: &NatsTransport, stream: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(15);
    while transport.jetstream().get_stream(stream).await.is_err() {
        ensure!(
            Instant::now() < deadline,
            "stream {stream} was not created again within 15 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// A declared stream deleted under a running subscription is created again by the
/// subscription's fetcher, which binds its consumer to it and goes on delivering.
#[tokio::test]
async fn a_subscription_recreates_its_deleted_declared_stream() -> anyhow::Result<()> {
    let (_server, transport) = setup(StorageKind::Memory).await?;
    let publisher = transport.jetstream_publisher();
    let mut subscription = transport
        .subscribe_jetstream(SUBJECT, &options(Duration::from_secs(2)), 2)
        .await?;
    publisher.publish(message("before", None)).await?;
    let delivery = expect_next(&mut subscription, Duration::from_secs(5)).await?;
    assert_eq!(delivery.message.payload.as_deref(), Some(&b"before"[..]));
    delivery.ack().await?;

    ensure!(
        transport.jetstream().delete_stream(STREAM).await?.success,
        "the server did not delete the stream"
    );
    // Nothing else publishes to it, so only the subscription can bring it back.
    wait_for_stream(&transport, STREAM).await?;
    publisher.publish(message("after", None)).await?;
    let delivery = expect_next(&mut subscription, Duration::from_secs(10)).await?;
    assert_eq!(delivery.message.payload.as_deref(), Some(&b"after"[..]));
    assert_eq!(delivery.message.delivery_count, 1);
    delivery.ack().await?;
    wait_for_lag(&subscription, 0).await?;
    subscription.close().await;
    Ok(())
}

/// A durable consumer deleted under a subscription is created again just after its ack floor,
/// as last read (here by the lag reading that saw everything acknowledged), not from the
/// stream's start: the five acknowledged messages do not run again, the one published after
/// the deletion does. Subscribing again later binds that consumer where it is, although its
/// deliver policy (by start sequence) is not the configured one, which the server refuses to
/// change.
#[tokio::test]
async fn a_deleted_consumer_is_created_again_after_its_ack_floor() -> anyhow::Result<()> {
    let (_server, transport) = setup(StorageKind::Memory).await?;
    let publisher = transport.jetstream_publisher();
    for _ in 0..5 {
        publisher.publish(message("before", None)).await?;
    }
    let mut subscription = transport
        .subscribe_jetstream(SUBJECT, &options(Duration::from_secs(2)), 2)
        .await?;
    for expected in 1..=5 {
        let delivery = expect_next(&mut subscription, Duration::from_secs(5)).await?;
        assert_eq!(sequence_of(&delivery)?, expected);
        delivery.ack().await?;
    }
    wait_for_lag(&subscription, 0).await?;

    let stream = transport.jetstream().get_stream(STREAM).await?;
    ensure!(
        stream.delete_consumer("worker").await?.success,
        "the server did not delete the consumer"
    );
    publisher.publish(message("after", None)).await?;
    let delivery = expect_next(&mut subscription, Duration::from_secs(15)).await?;
    assert_eq!(
        (sequence_of(&delivery)?, delivery.message.payload.as_deref()),
        (6, Some(&b"after"[..])),
        "the re-created consumer starts after the ack floor, not at the stream's start"
    );
    delivery.ack().await?;
    let info = worker_info(&transport).await?;
    assert_eq!(
        info.config.deliver_policy,
        DeliverPolicy::ByStartSequence { start_sequence: 6 }
    );
    assert!(
        next_within(&mut subscription, Duration::from_millis(2500))
            .await
            .is_none(),
        "nothing acknowledged before the deletion runs again"
    );
    wait_for_lag(&subscription, 0).await?;
    subscription.close().await;

    let mut again = transport
        .subscribe_jetstream(SUBJECT, &options(Duration::from_secs(2)), 2)
        .await?;
    publisher.publish(message("later", None)).await?;
    let delivery = expect_next(&mut again, Duration::from_secs(5)).await?;
    assert_eq!(
        (sequence_of(&delivery)?, delivery.message.payload.as_deref()),
        (7, Some(&b"later"[..]))
    );
    delivery.ack().await?;
    again.close().await;
    Ok(())
}

/// A consumer weir creates starts where its deliver policy says, by name or by position; one
/// that exists keeps its place whatever the policy (see the ack-floor test above).
#[tokio::test]
async fn a_new_consumer_starts_where_its_deliver_policy_says() -> anyhow::Result<()> {
    let (_server, transport) = setup(StorageKind::Memory).await?;
    let publisher = transport.jetstream_publisher();
    // Stream sequences 1 to 3, then a moment later 4.
    for (subject, payload) in [("events.a", "a1"), ("events.b", "b1"), ("events.a", "a2")] {
        publisher.publish(bare(subject, payload)).await?;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let between = time::OffsetDateTime::now_utc();
    tokio::time::sleep(Duration::from_millis(100)).await;
    publisher.publish(bare("events.b", "b2")).await?;

    for (index, (policy, expected)) in [
        (DeliverFrom::All, &["a1", "b1", "a2", "b2"][..]),
        (DeliverFrom::New, &[][..]),
        (DeliverFrom::Last, &["b2"][..]),
        (DeliverFrom::LastPerSubject, &["a2", "b2"][..]),
        (DeliverFrom::StartSequence(2), &["b1", "a2", "b2"][..]),
        (DeliverFrom::StartTime(between), &["b2"][..]),
    ]
    .into_iter()
    .enumerate()
    {
        let mut options = options(Duration::from_secs(5));
        options.durable = Some(format!("from-{index}"));
        options.deliver_policy = policy;
        let mut subscription = transport
            .subscribe_jetstream("events.>", &options, 4)
            .await?;
        let mut received = Vec::new();
        while let Some(delivery) = next_within(
            &mut subscription,
            Duration::from_millis(if received.len() < expected.len() {
                5000
            } else {
                500
            }),
        )
        .await
        {
            received.push(
                String::from_utf8_lossy(delivery.message.payload.as_deref().unwrap_or_default())
                    .into_owned(),
            );
            delivery.ack().await?;
            ensure!(
                received.len() <= 4,
                "{policy:?}: more than the stream holds: {received:?}"
            );
        }
        assert_eq!(received, expected, "{policy:?}");
        subscription.close().await;
    }
    Ok(())
}

/// On a workqueue stream, a durable left behind by a function since renamed (its subjects
/// overlapping the new one's) makes the server refuse the new consumer; the error names the
/// one in the way. A consumer on subjects of its own is accepted.
#[tokio::test]
async fn a_work_queue_refusal_names_the_consumer_in_the_way() -> anyhow::Result<()> {
    let (_server, transport) = setup(StorageKind::Memory).await?;
    let mut jobs = StreamConfig::new("JOBS", vec!["jobs.>".into()]);
    jobs.retention = RetentionKind::WorkQueue;
    transport.ensure_stream(&jobs).await?;
    let mut options = JetStreamConsumerOptions::new("JOBS");
    options.durable = Some("weir-old-name".into());
    let mut old = transport.subscribe_jetstream("jobs.>", &options, 1).await?;
    old.close().await;

    options.durable = Some("weir-new-name".into());
    let refused = match transport
        .subscribe_jetstream("jobs.resize", &options, 1)
        .await
    {
        Ok(_) => bail!("the workqueue stream took a second consumer on overlapping subjects"),
        Err(err) => err.to_string(),
    };
    ensure!(
        refused.contains("filtered consumer not unique on workqueue stream")
            && refused.contains(
                "stream JOBS is a workqueue stream, which hands each message to one consumer, \
                 and consumer weir-old-name (jobs.>) already reads overlapping subjects"
            ),
        "{refused}"
    );

    let mut crop = StreamConfig::new("CROP", vec!["crop.>".into()]);
    crop.retention = RetentionKind::WorkQueue;
    transport.ensure_stream(&crop).await?;
    let mut options = JetStreamConsumerOptions::new("CROP");
    options.durable = Some("weir-crop".into());
    let mut first = transport.subscribe_jetstream("crop.a", &options, 1).await?;
    options.durable = Some("weir-other".into());
    let mut second = transport.subscribe_jetstream("crop.b", &options, 1).await?;
    first.close().await;
    second.close().await;
    Ok(())
}

/// A confirmed publish that finds no stream for a subject a declared stream captures creates
/// that stream again and says so (the publish is the caller's to retry); a stream that was
/// never declared is not guessed at.
#[tokio::test]
async fn a_publish_recreates_a_deleted_declared_stream_only() -> anyhow::Result<()> {
    let (_server, transport) = setup(StorageKind::Memory).await?;
    let publisher = transport.jetstream_publisher();
    transport
        .ensure_stream(&StreamConfig::new("AUDIT", vec!["audit.>".into()]))
        .await?;
    ensure!(transport.jetstream().delete_stream("AUDIT").await?.success);
    let mut outbound = message("audited", Some("audit-1"));
    outbound.topic = "audit.orders".into();
    match publisher.publish(outbound.clone()).await {
        Err(TransportError::Publish { topic, reason }) => {
            assert_eq!(topic, "audit.orders");
            assert!(
                reason.contains("the declared stream AUDIT had been deleted")
                    && reason.contains("created again"),
                "{reason}"
            );
        }
        other => bail!("expected a publish error naming the re-created stream, got {other:?}"),
    }
    publisher.publish(outbound).await?;
    assert_eq!(transport.stream_messages("AUDIT").await?, 1);

    // Made behind Weir's back, not declared: once deleted it stays deleted.
    transport
        .jetstream()
        .create_stream(async_nats::jetstream::stream::Config {
            name: "ADHOC".into(),
            subjects: vec!["adhoc.>".into()],
            storage: async_nats::jetstream::stream::StorageType::Memory,
            ..Default::default()
        })
        .await?;
    ensure!(transport.jetstream().delete_stream("ADHOC").await?.success);
    let mut outbound = message("adhoc", None);
    outbound.topic = "adhoc.x".into();
    match publisher.publish(outbound).await {
        Err(TransportError::Publish { reason, .. }) => assert!(
            reason.contains("no JetStream stream captures this subject"),
            "{reason}"
        ),
        other => bail!("expected a publish error, got {other:?}"),
    }
    ensure!(
        transport.jetstream().get_stream("ADHOC").await.is_err(),
        "an undeclared stream must not be re-created"
    );
    Ok(())
}

/// A trigger on a stream that does not exist, or on a subject its stream does not capture (a
/// stream made elsewhere, which `weir check` cannot see), is refused saying so: the stream's
/// name, and its subjects.
#[tokio::test]
async fn subscribing_to_a_missing_stream_or_outside_one_says_why() -> anyhow::Result<()> {
    let server = NatsServer::start()?;
    let transport = NatsTransport::connect(&config_for(&server)).await?;
    let refusal = |subscribed: Result<JetStreamSubscription, TransportError>| match subscribed {
        Err(TransportError::Subscribe { reason, .. }) => Ok(reason),
        other => bail!("expected a subscribe error, got {other:?}"),
    };
    let missing = refusal(
        transport
            .subscribe_jetstream("x.y", &JetStreamConsumerOptions::new("MISSING"), 1)
            .await,
    )?;
    assert!(
        missing.contains("stream MISSING does not exist"),
        "{missing}"
    );

    transport
        .ensure_stream(&StreamConfig::new(
            "NARROW",
            vec!["narrow.in".into(), "narrow.more.>".into()],
        ))
        .await?;
    let mut options = JetStreamConsumerOptions::new("NARROW");
    options.durable = Some("weir-wide".into());
    let outside = refusal(transport.subscribe_jetstream("wide.in", &options, 1).await)?;
    assert!(
        outside.contains("stream NARROW captures narrow.in, narrow.more.>; `wide.in` is none"),
        "{outside}"
    );
    let stream = transport.jetstream().get_stream("NARROW").await?;
    ensure!(
        stream.consumer_info("weir-wide").await.is_err(),
        "no consumer is left behind"
    );
    // A stream sourcing another holds the other's subjects, none of its own.
    transport
        .jetstream()
        .create_stream(stream::Config {
            name: "COPY".into(),
            sources: Some(vec![stream::Source {
                name: "NARROW".into(),
                ..Default::default()
            }]),
            ..Default::default()
        })
        .await?;
    for (stream, inside) in [
        ("NARROW", "narrow.in"),
        ("NARROW", "narrow.more.x"),
        ("NARROW", "narrow.more.*"),
        ("COPY", "narrow.in"),
    ] {
        let mut subscription = transport
            .subscribe_jetstream(inside, &JetStreamConsumerOptions::new(stream), 1)
            .await
            .with_context(|| format!("stream {stream} holds {inside}"))?;
        subscription.close().await;
    }
    Ok(())
}

/// A server started without JetStream answers no JetStream request. Every JetStream use says
/// that, instead of sending the operator after a stream that is not the problem.
#[tokio::test]
async fn jetstream_on_a_server_without_it_says_so() -> anyhow::Result<()> {
    let server = NatsServer::start_core_only()?;
    let transport = NatsTransport::connect(&config_for(&server)).await?;
    let disabled = |error: &TransportError| error.to_string().contains("JetStream disabled");

    let declared = transport
        .ensure_stream(&StreamConfig::new(STREAM, vec!["events.>".into()]))
        .await;
    ensure!(
        matches!(&declared, Err(e @ TransportError::Subscribe { .. }) if disabled(e)),
        "declaring a stream: {declared:?}"
    );
    let subscribed = transport
        .subscribe_jetstream(SUBJECT, &options(Duration::from_secs(5)), 1)
        .await;
    ensure!(
        matches!(&subscribed, Err(e @ TransportError::Subscribe { .. }) if disabled(e)),
        "subscribing: {:?}",
        subscribed.err()
    );
    let published = transport
        .jetstream_publisher()
        .publish(message("one", None))
        .await;
    ensure!(
        matches!(&published, Err(e @ TransportError::Publish { .. }) if disabled(e)),
        "publishing: {published:?}"
    );

    // Core NATS on the same connection is unaffected.
    let mut subscription = transport.subscribe_core(SUBJECT, None).await?;
    transport
        .core_publisher()
        .publish(message("two", None))
        .await?;
    let delivery = expect_next(&mut subscription, Duration::from_secs(5)).await?;
    assert_eq!(delivery.message.payload.as_deref(), Some(&b"two"[..]));
    Ok(())
}

#[tokio::test]
async fn connecting_to_a_closed_port_fails() -> anyhow::Result<()> {
    let port = weir_tests::ports::free_port()?;
    let config = NatsConfig {
        servers: vec![format!("nats://127.0.0.1:{port}")],
        connect_timeout: Duration::from_secs(1),
        ..NatsConfig::default()
    };
    let started = Instant::now();
    match NatsTransport::connect(&config).await {
        Err(TransportError::Connect {
            broker: BrokerKind::Nats,
            ..
        }) => {}
        other => bail!("expected a connect error, got {other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(10));
    Ok(())
}

/// A weir starting beside its server (compose, a pod) waits for it: `connect_at_startup`
/// tries again while nothing answers, up to `startup_wait`, then fails saying how long it
/// tried. `connect` (the CLI's) does not wait.
#[tokio::test]
async fn a_weir_starting_up_waits_for_a_late_server_up_to_startup_wait() -> anyhow::Result<()> {
    let mut server = NatsServer::start()?;
    server.kill()?;
    let config = NatsConfig {
        startup_wait: Duration::from_secs(1),
        ..config_for(&server)
    };
    let started = Instant::now();
    let gave_up = tokio::time::timeout(
        Duration::from_secs(20),
        NatsTransport::connect_at_startup(&config),
    )
    .await
    .context("giving up took longer than 20 s")?;
    let waited = started.elapsed();
    match gave_up {
        Err(TransportError::Connect { reason, .. }) => ensure!(
            reason.contains("brokers.nats.startup_wait") && reason.contains("attempts"),
            "the error says it waited and what sets it: {reason}"
        ),
        other => bail!("expected a connect error after the wait, got {other:?}"),
    }
    ensure!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(10),
        "gave up after {waited:?}, not after startup_wait (1 s)"
    );

    // The server comes up 1.5 s after the weir starts: the weir connects and works.
    let config = NatsConfig {
        startup_wait: Duration::from_secs(30),
        ..config
    };
    let started = Instant::now();
    let late = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(1500));
        server.restart().map(|()| server)
    });
    let transport = tokio::time::timeout(
        Duration::from_secs(30),
        NatsTransport::connect_at_startup(&config),
    )
    .await
    .context("still not connected after 30 s")??;
    let waited = started.elapsed();
    let server = late
        .join()
        .map_err(|_| anyhow::anyhow!("the thread starting the server panicked"))??;
    ensure!(
        waited >= Duration::from_millis(1400),
        "connected after {waited:?}, before the server was started"
    );
    let stream = StreamConfig::new(STREAM, vec!["events.>".into()]);
    transport.ensure_stream(&stream).await?;
    transport
        .jetstream_publisher()
        .publish(bare(SUBJECT, "late"))
        .await?;
    assert_eq!(transport.stream_messages(STREAM).await?, 1);
    transport.close().await?;

    // A person's command says at once that nothing answers.
    drop(server);
    let started = Instant::now();
    ensure!(
        NatsTransport::connect(&config).await.is_err(),
        "connected to a server that was stopped"
    );
    ensure!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    Ok(())
}

/// `wait_for_jetstream` on a cluster without its majority gives up after its wait, saying
/// why, as do a stream declared at start-up and the wait for a stream made elsewhere; with
/// the majority those return at once (a missing stream too: binding to it says so); on a
/// server without JetStream `wait_for_jetstream` returns at once (what needs JetStream then
/// says it is disabled).
#[tokio::test]
async fn waiting_for_jetstream_gives_up_on_a_cluster_without_majority() -> anyhow::Result<()> {
    let mut cluster =
        tokio::task::spawn_blocking(|| NatsServer::start_cluster("weirwait", 3)).await??;
    let transport = NatsTransport::connect(&config_for(&cluster[0])).await?;
    // Formed: JetStream answers.
    transport
        .wait_for_jetstream(Duration::from_secs(60))
        .await
        .context("the cluster did not form")?;
    // A stream made elsewhere (not declared), on all three: answers, so no wait; a missing
    // one is left to the consumer's binding to report.
    let mut made = StreamConfig::new("MADE", vec!["made.>".into()]);
    made.replicas = 3;
    transport.ensure_stream(&made).await?;
    let started = Instant::now();
    transport
        .wait_for_stream("MADE", Duration::from_secs(30))
        .await?;
    transport
        .wait_for_stream("NOSUCH", Duration::from_secs(30))
        .await?;
    ensure!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    // All stopped, one started again: it knows its two peers and cannot be a majority alone.
    // (Killing two and keeping one is not as clear: the one kept may have led, and goes on
    // answering for a while as if it still did.)
    drop(transport);
    for node in cluster.iter_mut() {
        node.kill()?;
    }
    let alone = &mut cluster[0];
    alone.restart()?;
    let transport = NatsTransport::connect(&config_for(alone)).await?;

    let started = Instant::now();
    let error = match transport.wait_for_jetstream(Duration::from_secs(2)).await {
        Err(error) => error.to_string(),
        Ok(()) => bail!("JetStream answered without a majority"),
    };
    ensure!(
        error.contains("majority") && error.contains("startup_wait"),
        "{error}"
    );
    let waited = started.elapsed();
    ensure!(
        waited >= Duration::from_secs(2) && waited < Duration::from_secs(20),
        "gave up after {waited:?}"
    );
    let stream = StreamConfig::new("NOQUORUM", vec!["noquorum.>".into()]);
    ensure!(
        transport
            .ensure_stream_at_startup(&stream, Duration::from_secs(1))
            .await
            .is_err(),
        "a stream declared without a majority"
    );
    match transport
        .wait_for_stream("MADE", Duration::from_secs(1))
        .await
    {
        Err(error) => ensure!(error.to_string().contains("stream MADE"), "{error}"),
        Ok(()) => bail!("stream MADE answered without a majority"),
    }

    let core = NatsServer::start_core_only()?;
    let transport = NatsTransport::connect(&config_for(&core)).await?;
    let started = Instant::now();
    transport
        .wait_for_jetstream(Duration::from_secs(30))
        .await?;
    ensure!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    Ok(())
}

/// What the dispatcher's batches rely on: `try_next` hands out what is ready without waiting,
/// and nothing when nothing is.
#[tokio::test]
async fn try_next_takes_what_is_ready_without_waiting() -> anyhow::Result<()> {
    let (_server, transport) = setup(StorageKind::Memory).await?;

    // JetStream: once the first delivery is in, the rest of the pull is buffered.
    let publisher = transport.jetstream_publisher();
    for index in 0..5 {
        let mut message = message("batch", None);
        message.payload = format!("js-{index}").into();
        publisher.publish(message).await?;
    }
    let mut jetstream = transport
        .subscribe_jetstream(SUBJECT, &options(Duration::from_secs(30)), 8)
        .await?;
    let mut received = vec![expect_next(&mut jetstream, Duration::from_secs(5)).await?];
    let deadline = Instant::now() + Duration::from_secs(5);
    while received.len() < 5 {
        ensure!(
            Instant::now() < deadline,
            "only {} of 5 ready",
            received.len()
        );
        match jetstream.try_next() {
            Some(delivery) => received.push(delivery),
            None => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
    ensure!(
        jetstream.try_next().is_none(),
        "a sixth delivery out of five"
    );
    let mut sequences = Vec::new();
    for delivery in received {
        sequences.push(sequence_of(&delivery)?);
        delivery.ack().await?;
    }
    assert_eq!(sequences, vec![1, 2, 3, 4, 5], "in stream order");
    jetstream.close().await;
    assert!(jetstream.try_next().is_none(), "nothing after close");

    // Core: what async-nats has received is ready.
    let mut core = transport.subscribe_core("jobs.>", None).await?;
    assert!(core.try_next().is_none(), "nothing published yet");
    let core_publisher = transport.core_publisher();
    for index in 0..5 {
        core_publisher
            .publish(OutboundMessage {
                topic: "jobs.new".into(),
                key: None,
                headers: vec![("ce-id".into(), format!("core-{index}"))],
                payload: index.to_string().into(),
                dedup_id: None,
            })
            .await?;
    }
    let first = expect_next(&mut core, Duration::from_secs(5)).await?;
    let mut ids = vec![first.message.headers.get("ce-id").map(str::to_owned)];
    let deadline = Instant::now() + Duration::from_secs(5);
    while ids.len() < 5 {
        ensure!(Instant::now() < deadline, "only {} of 5 ready", ids.len());
        match core.try_next() {
            Some(delivery) => ids.push(delivery.message.headers.get("ce-id").map(str::to_owned)),
            None => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
    let expected: Vec<Option<String>> = (0..5).map(|i| Some(format!("core-{i}"))).collect();
    assert_eq!(ids, expected, "in publish order");
    core.close().await;
    assert!(core.try_next().is_none(), "nothing after close");
    Ok(())
}

/// The payload of a backlog message, as text.
fn text_of(message: &weir_broker_bridge::InboundMessage) -> String {
    String::from_utf8_lossy(message.payload.as_deref().unwrap_or_default()).into_owned()
}

/// A backlog (what `weir dlq redrive` reads) ends at the subject's last message when it began,
/// deletes exactly what its reader sent on (with `keep`, nothing), and is refused where it
/// could not delete (a stream that denies deletes) or read without taking (a workqueue).
#[tokio::test]
async fn a_backlog_reads_to_where_the_subject_ended_and_deletes_only_what_was_sent(
) -> anyhow::Result<()> {
    let (server, transport) = setup(StorageKind::Memory).await?;
    let publisher = transport.jetstream_publisher();
    for (subject, payload) in [
        ("events.dlq", "d1"),
        ("events.other", "o1"),
        ("events.dlq", "d2"),
        ("events.dlq", "d3"),
    ] {
        publisher.publish(bare(subject, payload)).await?;
    }
    let mut backlog = transport
        .read_backlog("events.dlq", false)
        .await?
        .context("a stream captures events.dlq")?;
    let mut read = Vec::new();
    let mut sent = true;
    while let Some(message) = tokio::time::timeout(Duration::from_secs(15), backlog.next())
        .await
        .context("a backlog read ends by itself")??
    {
        if read.is_empty() {
            // Stored after the read began: left for the next one.
            publisher.publish(bare("events.dlq", "d4")).await?;
        }
        read.push(text_of(&message));
        backlog.done(&message.origin, sent).await?;
        sent = !sent;
    }
    backlog.close().await?;
    assert_eq!(read, ["d1", "d2", "d3"]);
    let client = async_nats::connect(server.url()).await?;
    let stream = async_nats::jetstream::new(client)
        .get_stream(STREAM)
        .await?;
    let mut kept = Vec::new();
    for sequence in 1..=5 {
        if let Ok(message) = stream.get_raw_message(sequence).await {
            kept.push(String::from_utf8_lossy(&message.payload).into_owned());
        }
    }
    // d1 and d3 were sent, so deleted; d2 (not sent), o1 (another subject) and d4 stay.
    assert_eq!(kept, ["o1", "d2", "d4"]);
    let names: Vec<String> = futures::TryStreamExt::try_collect(stream.consumer_names()).await?;
    assert!(
        names.is_empty(),
        "the reading consumer is deleted: {names:?}"
    );

    // Kept: read to the end, nothing deleted; a deletion of what is gone already is no error.
    let mut backlog = transport
        .read_backlog("events.dlq", true)
        .await?
        .context("a stream captures events.dlq")?;
    let mut again = Vec::new();
    while let Some(message) = backlog.next().await? {
        again.push(text_of(&message));
        backlog.done(&message.origin, true).await?;
    }
    assert_eq!(again, ["d2", "d4"]);
    assert!(stream.get_raw_message(3).await.is_ok(), "d2 is kept");

    // Nothing on the subject: an empty read; no stream: none.
    let mut empty = transport
        .read_backlog("events.none", false)
        .await?
        .context("a stream captures events.none")?;
    assert!(empty.next().await?.is_none());
    assert!(transport.read_backlog("elsewhere", false).await?.is_none());

    // A stream that denies deletes, unless kept; a workqueue stream, always.
    let mut no_deletes = StreamConfig::new("NODEL", vec!["nodel.>".into()]);
    no_deletes.storage = StorageKind::Memory;
    transport.ensure_stream(&no_deletes).await?;
    let mut info = stream_config(&server, "NODEL").await?;
    info.deny_delete = true;
    update_stream(&server, info).await?;
    let refused = transport.read_backlog("nodel.x", false).await;
    match refused {
        Err(TransportError::Subscribe { reason, .. }) => {
            assert!(reason.contains("denies deletes"), "{reason}");
        }
        other => bail!("a deny_delete stream is refused: {other:?}"),
    }
    assert!(transport.read_backlog("nodel.x", true).await?.is_some());
    let mut jobs = StreamConfig::new("REDRIVEJOBS", vec!["rjobs.>".into()]);
    jobs.storage = StorageKind::Memory;
    jobs.retention = RetentionKind::WorkQueue;
    transport.ensure_stream(&jobs).await?;
    match transport.read_backlog("rjobs.x", true).await {
        Err(TransportError::Subscribe { reason, .. }) => {
            assert!(reason.contains("workqueue"), "{reason}");
        }
        other => bail!("a workqueue stream is refused: {other:?}"),
    }
    Ok(())
}

async fn stream_config(server: &NatsServer, name: &str) -> anyhow::Result<stream::Config> {
    let client = async_nats::connect(server.url()).await?;
    let mut stream = async_nats::jetstream::new(client).get_stream(name).await?;
    Ok(stream.info().await?.config.clone())
}

async fn update_stream(server: &NatsServer, config: stream::Config) -> anyhow::Result<()> {
    let client = async_nats::connect(server.url()).await?;
    async_nats::jetstream::new(client)
        .update_stream(config)
        .await?;
    Ok(())
}
