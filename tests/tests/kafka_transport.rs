//! The Kafka transport against a real Kafka-protocol broker (Tansu): round trips, a record too
//! large refused as such, commits at
//! the watermark, ordering lanes, redelivery of dropped deliveries, lag, and resuming after a
//! consumer restart; and the topic reader of `weir tail --kafka` ending when its topic is
//! deleted (on librdkafka's mock cluster: see that test). Each test starts its own broker;
//! every wait is bounded.

// Test helpers outside `#[test]` functions: a failed expect is a failed assertion here too.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use weir_broker_bridge::kafka::{KafkaPublisher, KafkaSubscription, KafkaTransport};
use weir_broker_bridge::{
    BrokerKind, Delivery, Ordering, Origin, OutboundMessage, Publisher, RetryStyle, Subscription,
    TransportError,
};
use weir_tests::kafka_broker::KafkaBroker;

/// The first delivery of a fresh group waits for the group join.
const FIRST_DELIVERY: Duration = Duration::from_secs(30);
const NEXT_DELIVERY: Duration = Duration::from_secs(10);
const COMMIT_WAIT: Duration = Duration::from_secs(15);

struct Setup {
    broker: KafkaBroker,
    transport: KafkaTransport,
    publisher: KafkaPublisher,
    topic: String,
}

async fn setup(topic: &str, partitions: i32) -> Setup {
    let broker = KafkaBroker::start().await.expect("tansu starts");
    let transport = KafkaTransport::connect(&broker.config())
        .await
        .expect("connect");
    transport
        .ensure_topic(topic, partitions, 1)
        .await
        .expect("create topic");
    // Creating it twice is fine.
    transport
        .ensure_topic(topic, partitions, 1)
        .await
        .expect("topic already exists is ok");
    let publisher = transport.publisher().expect("publisher");
    Setup {
        broker,
        transport,
        publisher,
        topic: topic.to_owned(),
    }
}

impl Setup {
    async fn produce(&self, key: Option<&str>, payload: &str) {
        self.publisher
            .publish(OutboundMessage {
                topic: self.topic.clone(),
                key: key.map(|k| k.as_bytes().to_vec().into()),
                headers: Vec::new(),
                payload: payload.as_bytes().to_vec().into(),
                dedup_id: None,
            })
            .await
            .unwrap_or_else(|e| panic!("publish failed: {e}; broker log:\n{}", self.broker.log()));
    }

    fn subscribe(
        &self,
        group: &str,
        ordering: Ordering,
        max_in_flight: usize,
    ) -> KafkaSubscription {
        self.transport
            .subscribe(&self.topic, group, ordering, max_in_flight)
            .expect("subscribe")
    }

    /// Wait until the group's committed offset of partition 0 equals `expected`.
    async fn wait_committed(&self, group: &str, expected: i64) {
        let deadline = Instant::now() + COMMIT_WAIT;
        let mut last = None;
        while Instant::now() < deadline {
            let offsets = self
                .transport
                .committed_offsets(&self.topic, group)
                .await
                .expect("read");
            last = offsets.get(&0).copied().flatten();
            if last == Some(expected) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("committed offset of partition 0 is {last:?}, expected {expected}");
    }

    async fn committed(&self, group: &str) -> Option<i64> {
        let offsets = self
            .transport
            .committed_offsets(&self.topic, group)
            .await
            .expect("read");
        offsets.get(&0).copied().flatten()
    }
}

async fn next_within(sub: &mut impl Subscription, within: Duration) -> Option<Delivery> {
    tokio::time::timeout(within, sub.next())
        .await
        .ok()
        .flatten()
}

fn offset_of(delivery: &Delivery) -> i64 {
    match delivery.message.origin {
        Origin::Kafka { offset, .. } => offset,
        ref other => panic!("not a kafka origin: {other}"),
    }
}

fn payload_of(delivery: &Delivery) -> String {
    String::from_utf8(delivery.message.payload.clone().expect("payload").to_vec()).expect("utf-8")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_key_and_null_payload_survive_the_round_trip() {
    let setup = setup("roundtrip", 1).await;
    let headers = vec![
        ("ce_id".to_owned(), "evt-1".to_owned()),
        ("ce_type".to_owned(), "com.example.created".to_owned()),
        ("content-type".to_owned(), "application/json".to_owned()),
    ];
    setup
        .publisher
        .publish(OutboundMessage {
            topic: setup.topic.clone(),
            key: Some(b"order-7".to_vec().into()),
            headers: headers
                .iter()
                .map(|(name, value)| (name.clone().into(), value.clone()))
                .collect(),
            payload: br#"{"n":1}"#.to_vec().into(),
            dedup_id: None,
        })
        .await
        .expect("publish");
    setup
        .publisher
        .publish_record::<&str, &str>(&setup.topic, Some(b"order-7"), &[], None)
        .await
        .expect("publish tombstone");
    assert_eq!(setup.publisher.broker(), BrokerKind::Kafka);

    let mut sub = setup.subscribe("g-roundtrip", Ordering::Partition, 8);
    assert_eq!(sub.retry_style(), RetryStyle::InPlace);
    assert_eq!(sub.broker(), BrokerKind::Kafka);
    let first = next_within(&mut sub, FIRST_DELIVERY)
        .await
        .expect("first message");
    assert_eq!(first.message.topic, "roundtrip");
    assert_eq!(first.message.key.as_deref(), Some(b"order-7".as_slice()));
    assert_eq!(first.message.headers, headers);
    assert_eq!(
        first.message.payload.as_deref(),
        Some(br#"{"n":1}"#.as_slice())
    );
    assert_eq!(first.message.delivery_count, 1);
    assert_eq!(
        first.message.origin,
        Origin::Kafka {
            topic: "roundtrip".into(),
            partition: 0,
            offset: 0
        }
    );
    first.ack().await.expect("ack");

    let tombstone = next_within(&mut sub, NEXT_DELIVERY)
        .await
        .expect("tombstone");
    assert_eq!(
        tombstone.message.payload, None,
        "a null value is a None payload"
    );
    assert_eq!(
        tombstone.message.key.as_deref(),
        Some(b"order-7".as_slice())
    );
    assert!(tombstone.message.headers.is_empty());
    tombstone.ack().await.expect("ack");
    sub.close().await;
    assert!(
        sub.next().await.is_none(),
        "a closed subscription yields nothing"
    );
}

/// A record over librdkafka's `message.max.bytes` (1,000,000 by default) is refused as
/// [`TransportError::TooLarge`], which the dispatcher treats as the sender's fault rather than
/// a broker to wait for; the producer goes on with records that fit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_over_message_max_bytes_is_too_large() {
    let setup = setup("too-large", 1).await;
    let refused = setup
        .publisher
        .publish(OutboundMessage {
            topic: setup.topic.clone(),
            key: None,
            headers: Vec::new(),
            payload: vec![b'x'; 1_100_000].into(),
            dedup_id: None,
        })
        .await;
    match refused {
        Err(TransportError::TooLarge { topic, reason }) => {
            assert_eq!(topic, setup.topic);
            assert!(reason.contains("too large"), "{reason}");
        }
        other => panic!("expected TooLarge, got {other:?}"),
    }
    setup.produce(None, "fits").await;
    let mut sub = setup.subscribe("too-large-group", Ordering::Partition, 4);
    let delivery = next_within(&mut sub, FIRST_DELIVERY)
        .await
        .expect("the record that fits");
    assert_eq!(payload_of(&delivery), "fits");
    delivery.ack().await.expect("ack");
    sub.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ack_advances_the_committed_offset() {
    let setup = setup("acks", 1).await;
    for n in 0..3 {
        setup.produce(None, &format!("m{n}")).await;
    }
    let mut sub = setup.subscribe("g-acks", Ordering::Partition, 8);
    for n in 0..3 {
        let within = if n == 0 {
            FIRST_DELIVERY
        } else {
            NEXT_DELIVERY
        };
        let delivery = next_within(&mut sub, within).await.expect("delivery");
        assert_eq!(offset_of(&delivery), n);
        delivery.ack().await.expect("ack");
    }
    setup.wait_committed("g-acks", 3).await;
    sub.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn committed_offset_waits_for_the_lowest_unfinished_offset() {
    let setup = setup("watermark", 1).await;
    for n in 0..4 {
        setup.produce(None, &format!("m{n}")).await;
    }
    let mut sub = setup.subscribe("g-watermark", Ordering::None, 16);
    let mut deliveries = Vec::new();
    for n in 0..4 {
        let within = if n == 0 {
            FIRST_DELIVERY
        } else {
            NEXT_DELIVERY
        };
        deliveries.push(next_within(&mut sub, within).await.expect("delivery"));
    }
    let offsets: Vec<i64> = deliveries.iter().map(offset_of).collect();
    assert_eq!(
        offsets,
        vec![0, 1, 2, 3],
        "ordering none hands out all at once"
    );
    let mut by_offset: Vec<Option<Delivery>> = deliveries.into_iter().map(Some).collect();

    by_offset[0].take().unwrap().ack().await.unwrap();
    setup.wait_committed("g-watermark", 1).await;
    by_offset[2].take().unwrap().ack().await.unwrap();
    by_offset[3].take().unwrap().ack().await.unwrap();
    // Several commit rounds (200 ms each) pass: offset 1 still holds the watermark.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(setup.committed("g-watermark").await, Some(1));
    by_offset[1].take().unwrap().ack().await.unwrap();
    setup.wait_committed("g-watermark", 4).await;
    sub.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partition_ordering_holds_the_next_message_until_the_first_settles() {
    let setup = setup("partition-order", 1).await;
    setup.produce(Some("a"), "first").await;
    setup.produce(Some("b"), "second").await;
    let mut sub = setup.subscribe("g-partition", Ordering::Partition, 8);
    let first = next_within(&mut sub, FIRST_DELIVERY).await.expect("first");
    assert_eq!(payload_of(&first), "first");
    assert!(
        next_within(&mut sub, Duration::from_secs(2))
            .await
            .is_none(),
        "the second message of the partition must wait for the first"
    );
    first.ack().await.unwrap();
    let second = next_within(&mut sub, NEXT_DELIVERY).await.expect("second");
    assert_eq!(payload_of(&second), "second");
    second.ack().await.unwrap();
    sub.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_ordering_blocks_only_the_held_key() {
    let setup = setup("key-order", 1).await;
    for round in 1..=2 {
        for key in ["a", "b", "c", "d"] {
            setup.produce(Some(key), &format!("{key}{round}")).await;
        }
    }
    let mut sub = setup.subscribe("g-key", Ordering::Key, 16);
    let held = next_within(&mut sub, FIRST_DELIVERY).await.expect("first");
    assert_eq!(payload_of(&held), "a1", "offset order: a1 comes first");
    let mut seen = BTreeSet::new();
    while let Some(delivery) = next_within(&mut sub, Duration::from_secs(2)).await {
        seen.insert(payload_of(&delivery));
        delivery.ack().await.unwrap();
    }
    let expected: BTreeSet<String> = ["b1", "c1", "d1", "b2", "c2", "d2"]
        .into_iter()
        .map(String::from)
        .collect();
    assert_eq!(
        seen, expected,
        "other keys continue, a2 waits behind the held a1"
    );
    held.ack().await.unwrap();
    let a2 = next_within(&mut sub, NEXT_DELIVERY)
        .await
        .expect("a2 after a1 settled");
    assert_eq!(payload_of(&a2), "a2");
    a2.ack().await.unwrap();
    sub.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_delivery_comes_back_with_count_two_at_the_same_offset() {
    let setup = setup("dropped", 1).await;
    setup.produce(None, "only").await;
    setup.produce(None, "next").await;
    let mut sub = setup.subscribe("g-dropped", Ordering::Partition, 8);
    let first = next_within(&mut sub, FIRST_DELIVERY).await.expect("first");
    assert_eq!((offset_of(&first), first.message.delivery_count), (0, 1));
    drop(first);
    let again = next_within(&mut sub, NEXT_DELIVERY)
        .await
        .expect("redelivered");
    assert_eq!(
        offset_of(&again),
        0,
        "the dropped message, not the next one"
    );
    assert_eq!(again.message.delivery_count, 2);
    // retry_after also hands it back at the head of its lane, after the delay.
    let started = Instant::now();
    again.retry_after(Duration::from_millis(300)).await.unwrap();
    let third = next_within(&mut sub, NEXT_DELIVERY).await.expect("retried");
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert_eq!((offset_of(&third), third.message.delivery_count), (0, 3));
    third.ack().await.unwrap();
    let next = next_within(&mut sub, NEXT_DELIVERY).await.expect("next");
    assert_eq!(offset_of(&next), 1);
    next.ack().await.unwrap();
    setup.wait_committed("g-dropped", 2).await;
    sub.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lag_is_produced_minus_committed() {
    let setup = setup("lag", 1).await;
    for n in 0..5 {
        setup.produce(None, &format!("m{n}")).await;
    }
    let mut sub = setup.subscribe("g-lag", Ordering::Partition, 8);
    for _ in 0..2 {
        let delivery = next_within(&mut sub, FIRST_DELIVERY)
            .await
            .expect("delivery");
        delivery.ack().await.unwrap();
    }
    let deadline = Instant::now() + COMMIT_WAIT;
    let mut lag = sub.lag().await.expect("lag");
    while lag != 3 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        lag = sub.lag().await.expect("lag");
    }
    assert_eq!(lag, 3, "5 produced, 2 committed");
    let per_partition = sub.partition_lag().await.expect("partition lag");
    assert_eq!(per_partition.len(), 1);
    assert_eq!(per_partition[0].high_watermark, 5);
    assert_eq!(per_partition[0].committed, 2);
    assert_eq!(per_partition[0].lag, 3);
    let probe = sub.lag_probe().expect("kafka offers a detached lag probe");
    assert_eq!(probe.lag().await.expect("probe lag"), 3);
    sub.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_member_resumes_after_the_committed_offset() {
    let setup = setup("resume", 1).await;
    for n in 0..6 {
        setup.produce(None, &format!("m{n}")).await;
    }
    let mut first = setup.subscribe("g-resume", Ordering::Partition, 8);
    for n in 0..3 {
        let within = if n == 0 {
            FIRST_DELIVERY
        } else {
            NEXT_DELIVERY
        };
        let delivery = next_within(&mut first, within).await.expect("delivery");
        assert_eq!(offset_of(&delivery), n);
        delivery.ack().await.unwrap();
    }
    // Handed out but never settled: it must come again to the next member.
    let unsettled = next_within(&mut first, NEXT_DELIVERY)
        .await
        .expect("offset 3");
    assert_eq!(offset_of(&unsettled), 3);
    drop(unsettled);
    first.close().await;
    setup.wait_committed("g-resume", 3).await;

    let mut second = setup.subscribe("g-resume", Ordering::Partition, 8);
    let mut offsets = Vec::new();
    for n in 0..3 {
        let within = if n == 0 {
            FIRST_DELIVERY
        } else {
            NEXT_DELIVERY
        };
        let delivery = next_within(&mut second, within)
            .await
            .expect("resumed delivery");
        assert_eq!(
            delivery.message.delivery_count, 1,
            "a new member counts afresh"
        );
        offsets.push(offset_of(&delivery));
        delivery.ack().await.unwrap();
    }
    assert_eq!(
        offsets,
        vec![3, 4, 5],
        "no loss, no replay of committed offsets"
    );
    setup.wait_committed("g-resume", 6).await;
    second.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_member_takes_over_a_partition_without_loss() {
    let setup = setup("rebalance", 2).await;
    for n in 0..20 {
        setup
            .produce(Some(&format!("k{n}")), &format!("m{n}"))
            .await;
    }
    let mut first = setup.subscribe("g-rebalance", Ordering::Partition, 8);
    // Held across the rebalance: if its partition is revoked, the revoke waits for it.
    let held = next_within(&mut first, FIRST_DELIVERY)
        .await
        .expect("first delivery");
    let mut seen = BTreeSet::new();
    seen.insert((held.message.origin.to_string(), 0));
    let release = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(2)).await;
        held.ack().await.unwrap();
    });
    let mut second = setup.subscribe("g-rebalance", Ordering::Partition, 8);

    async fn drain(sub: &mut KafkaSubscription) -> Vec<String> {
        let mut origins = Vec::new();
        while let Some(delivery) = next_within(sub, Duration::from_secs(6)).await {
            origins.push(delivery.message.origin.to_string());
            delivery.ack().await.unwrap();
        }
        origins
    }
    let (from_first, from_second) = tokio::join!(drain(&mut first), drain(&mut second));
    release.await.unwrap();
    let mut all: BTreeSet<String> = seen.into_iter().map(|(origin, _)| origin).collect();
    all.extend(from_first.iter().cloned());
    all.extend(from_second.iter().cloned());
    assert_eq!(
        all.len(),
        20,
        "every message delivered at least once: {all:?}"
    );
    assert_eq!(
        first.assigned_partitions().len(),
        1,
        "cooperative rebalance split the partitions"
    );
    assert_eq!(second.assigned_partitions().len(), 1);

    let deadline = Instant::now() + COMMIT_WAIT;
    let mut total = 0;
    while Instant::now() < deadline {
        let offsets = setup
            .transport
            .committed_offsets("rebalance", "g-rebalance")
            .await
            .unwrap();
        total = offsets.values().map(|o| o.unwrap_or(0)).sum::<i64>();
        if total == 20 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(total, 20, "both partitions committed to their end");
    first.close().await;
    second.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn harness_restart_keeps_the_port_and_loses_memory_storage() {
    let mut setup = setup("restart", 1).await;
    setup.produce(None, "before").await;
    let bootstrap = setup.broker.bootstrap();
    setup.broker.restart().await.expect("restart");
    assert_eq!(setup.broker.bootstrap(), bootstrap);
    let transport = KafkaTransport::connect(&setup.broker.config())
        .await
        .expect("reconnect");
    // memory:// storage: the topic is gone after the restart, so it can be created again.
    transport
        .ensure_topic("restart", 1, 1)
        .await
        .expect("create again");
    let offsets = transport
        .committed_offsets("restart", "g-restart")
        .await
        .expect("offsets");
    assert_eq!(offsets.get(&0).copied().flatten(), None);
    setup.transport = transport;
    setup.publisher = setup.transport.publisher().expect("publisher");
    setup.produce(None, "after").await;
    let mut sub = setup.subscribe("g-restart", Ordering::Partition, 4);
    let first = next_within(&mut sub, FIRST_DELIVERY)
        .await
        .expect("delivery");
    assert_eq!(
        payload_of(&first),
        "after",
        "memory storage lost the earlier message"
    );
    first.ack().await.unwrap();
    sub.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn harness_restart_on_sqlite_keeps_topics_records_and_offsets() {
    let broker = KafkaBroker::start_persistent().await.expect("tansu starts");
    let transport = KafkaTransport::connect(&broker.config())
        .await
        .expect("connect");
    transport.ensure_topic("kept", 1, 1).await.expect("create");
    let setup = Setup {
        publisher: transport.publisher().expect("publisher"),
        transport,
        broker,
        topic: "kept".to_owned(),
    };
    setup.produce(None, "before-0").await;
    setup.produce(None, "before-1").await;
    let mut sub = setup.subscribe("g-kept", Ordering::Partition, 4);
    let first = next_within(&mut sub, FIRST_DELIVERY)
        .await
        .expect("delivery");
    assert_eq!(payload_of(&first), "before-0");
    first.ack().await.unwrap();
    setup.wait_committed("g-kept", 1).await;
    sub.close().await;
    drop(sub);

    let Setup { mut broker, .. } = setup;
    let bootstrap = broker.bootstrap();
    broker.restart().await.expect("restart");
    assert_eq!(broker.bootstrap(), bootstrap);
    let transport = KafkaTransport::connect(&broker.config())
        .await
        .expect("reconnect");
    let offsets = transport
        .committed_offsets("kept", "g-kept")
        .await
        .expect("offsets");
    assert_eq!(
        offsets.get(&0).copied().flatten(),
        Some(1),
        "the committed offset survived the restart"
    );
    let setup = Setup {
        publisher: transport.publisher().expect("publisher"),
        transport,
        broker,
        topic: "kept".to_owned(),
    };
    // A fresh group reads the records from the start. Not "g-kept" again: a new member joining
    // that group after the restart got no assignment within 30 s in 2 runs of 3 (a Tansu 0.6
    // group-restore behaviour, not investigated further). A member that stays across the
    // restart, which is Weir's case, is what kafka_e2e's broker-restart test checks.
    let mut sub = setup.subscribe("g-fresh", Ordering::Partition, 4);
    let mut seen = Vec::new();
    while seen.len() < 2 {
        let within = if seen.is_empty() {
            FIRST_DELIVERY
        } else {
            NEXT_DELIVERY
        };
        let Some(delivery) = next_within(&mut sub, within).await else {
            panic!(
                "after the restart got only {seen:?}; broker log:\n{}",
                setup.broker.log()
            );
        };
        seen.push(payload_of(&delivery));
        delivery.ack().await.unwrap();
    }
    assert_eq!(
        seen,
        ["before-0", "before-1"],
        "the records survived the restart"
    );
    setup.wait_committed("g-fresh", 2).await;
    sub.close().await;
}

/// A buffer of 4 records per partition: the consumer thread takes records from librdkafka only
/// as the buffer drains, and still delivers every record once, in order, committing to the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_buffer_throttles_without_losing_or_reordering() {
    let setup = setup("throttled", 1).await;
    let total = 60;
    for i in 0..total {
        setup.produce(None, &format!("m-{i:03}")).await;
    }
    let config = weir_broker_bridge::kafka::KafkaConfig {
        max_buffered_per_partition: 4,
        ..setup.broker.config()
    };
    let transport = KafkaTransport::connect(&config).await.expect("connect");
    let mut sub = transport
        .subscribe(&setup.topic, "g-throttled", Ordering::Partition, 4)
        .expect("subscribe");
    let mut seen = Vec::new();
    let deadline = Instant::now() + FIRST_DELIVERY;
    while seen.len() < total && Instant::now() < deadline {
        let Some(delivery) = next_within(&mut sub, NEXT_DELIVERY).await else {
            break;
        };
        seen.push(payload_of(&delivery));
        delivery.ack().await.unwrap();
    }
    let expected: Vec<String> = (0..total).map(|i| format!("m-{i:03}")).collect();
    assert_eq!(seen, expected, "every record once, in order");
    setup.wait_committed("g-throttled", 60).await;
    sub.close().await;
}

/// `weir tail --kafka`'s reader ends, saying why, when its topic is deleted while it follows.
///
/// On librdkafka's mock cluster, not Tansu: a fetch from a topic deleted on Tansu 0.6 crashes
/// librdkafka 2.12 (SIGSEGV). Tansu answers it with a zero topic id and a current-leader tag,
/// and librdkafka then looks the tag's topic up by a null name. The mock answers the topic's
/// metadata with the error a deleted topic gives, which is what the reader's check reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_reader_ends_when_its_topic_is_deleted() {
    use rdkafka::mocking::MockCluster;
    use rdkafka::producer::{FutureProducer, FutureRecord};
    use rdkafka::types::RDKafkaRespErr;

    let mock = MockCluster::new(1).expect("mock cluster");
    mock.create_topic("goes", 1, 1).expect("create topic");
    let bootstrap = mock.bootstrap_servers();
    let producer: FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .create()
        .expect("producer");
    producer
        .send(
            FutureRecord::<(), str>::to("goes").payload(r#"{"n":0}"#),
            NEXT_DELIVERY,
        )
        .await
        .expect("produce");
    let config = weir_broker_bridge::kafka::KafkaConfig {
        bootstrap,
        ..weir_broker_bridge::kafka::KafkaConfig::default()
    };
    let transport = KafkaTransport::connect(&config).await.expect("connect");
    let mut reader = transport
        .read_topic_history("goes", None)
        .await
        .expect("read the topic");
    let first = next_within(&mut reader, FIRST_DELIVERY)
        .await
        .expect("the topic's record");
    assert_eq!(payload_of(&first), r#"{"n":0}"#);
    assert_eq!(reader.ended_by(), None);

    mock.topic_error(
        "goes",
        RDKafkaRespErr::RD_KAFKA_RESP_ERR_UNKNOWN_TOPIC_OR_PART,
    )
    .expect("the topic's metadata says it is gone");
    let ended = tokio::time::timeout(NEXT_DELIVERY, reader.next())
        .await
        .expect("the reader ends in time");
    assert!(ended.is_none(), "no record after the topic is gone");
    assert_eq!(reader.ended_by(), Some("topic goes was deleted"));
    // Ended for good.
    assert!(reader.next().await.is_none());
}
