//! Everything the NATS transport reports about itself: the log lines and metrics of named events.
//!
//! This is the only place in the NATS transport that calls `metrics` macros. Labels are bounded
//! (an event name, a broker kind, an outcome): never a subject, a stream sequence or an event id.
//! It deliberately does not decide anything; callers report what happened.

use std::time::Duration;

use metrics::counter;
use tracing::{debug, info, warn};

/// A connection-level event from async-nats (connect, disconnect, slow consumer, ...).
pub(super) fn connection_event(event: &async_nats::Event) {
    use async_nats::Event;
    let label = match event {
        Event::Connected => {
            info!(messaging.system = "nats", "NATS connection established");
            "connected"
        }
        Event::Disconnected => {
            warn!(
                messaging.system = "nats",
                "NATS connection lost; reconnecting"
            );
            "disconnected"
        }
        Event::LameDuckMode => {
            warn!(
                messaging.system = "nats",
                "NATS server entered lame duck mode"
            );
            "lame_duck"
        }
        Event::Draining => {
            info!(messaging.system = "nats", "NATS connection draining");
            "draining"
        }
        // async-nats reports `Closed` only for a close asked for (a drain, or every handle
        // dropped); giving up on reconnecting is a `ClientError` (max reconnects) instead.
        Event::Closed => {
            info!(messaging.system = "nats", "NATS connection closed");
            "closed"
        }
        Event::SlowConsumer(sid) => {
            warn!(
                messaging.system = "nats",
                subscription = sid,
                "NATS slow consumer: the server or client dropped core messages"
            );
            "slow_consumer"
        }
        Event::ServerError(err) => {
            warn!(messaging.system = "nats", error = %err, "NATS server error");
            "server_error"
        }
        Event::ClientError(err) => {
            warn!(messaging.system = "nats", error = %err, "NATS client error");
            "client_error"
        }
    };
    counter!("weir_nats_connection_events_total", "event" => label).increment(1);
}

/// No server answered while the process was starting; it tries again after `retry_in`, and
/// gives up when `left` has passed.
pub(super) fn record_unreachable_at_startup(
    servers: &str,
    reason: &str,
    retry_in: Duration,
    left: Duration,
) {
    warn!(
        messaging.system = "nats",
        servers,
        error = reason,
        retry_in = ?retry_in,
        gives_up_in = ?left,
        "no NATS server answered at start-up; trying again (brokers.nats.startup_wait)"
    );
    counter!("weir_nats_connection_events_total", "event" => "unreachable_at_startup").increment(1);
}

/// JetStream's API did not answer while the process was starting (a cluster without its
/// leader yet); it asks again after `retry_in`, and gives up when `left` has passed.
pub(super) fn record_jetstream_unready_at_startup(
    reason: &str,
    retry_in: Duration,
    left: Duration,
) {
    warn!(
        messaging.system = "jetstream",
        error = reason,
        retry_in = ?retry_in,
        gives_up_in = ?left,
        "JetStream did not answer at start-up; asking again (brokers.nats.startup_wait)"
    );
    counter!("weir_nats_connection_events_total", "event" => "jetstream_unready_at_startup")
        .increment(1);
}

/// A JetStream pull request failed; the consumer will be re-bound after `retry_in`.
pub(super) fn record_fetch_error(stream: &str, consumer: &str, reason: &str, retry_in: Duration) {
    warn!(
        messaging.system = "jetstream",
        stream,
        consumer,
        error = reason,
        retry_in = ?retry_in,
        "JetStream pull failed; re-binding the consumer"
    );
    counter!("weir_nats_fetch_errors_total").increment(1);
}

/// Re-binding (create-or-update) a pull consumer after an error failed.
pub(super) fn record_consumer_rebind_failed(
    stream: &str,
    consumer: &str,
    reason: &str,
    retry_in: Duration,
) {
    warn!(
        messaging.system = "jetstream",
        stream,
        consumer,
        error = reason,
        retry_in = ?retry_in,
        "re-binding the JetStream consumer failed; will retry"
    );
    counter!("weir_nats_consumer_rebinds_total", "outcome" => "error").increment(1);
}

/// The subscription's consumer was deleted under it and is created again from
/// `start_sequence`, just after its last known ack floor; what was acknowledged after that
/// reading runs again.
pub(super) fn record_consumer_recreated(stream: &str, consumer: &str, start_sequence: u64) {
    warn!(
        messaging.system = "jetstream",
        stream,
        consumer,
        start_sequence,
        "the JetStream consumer was deleted; created it again just after its last known ack \
         floor (events acknowledged since that reading run again)"
    );
    counter!("weir_nats_consumer_rebinds_total", "outcome" => "recreated").increment(1);
}

/// Binding an existing durable consumer moved it from the subjects `from` to the trigger's
/// `to`. It kept its place in the stream, after sequence `delivered`.
pub(super) fn record_consumer_subjects_moved(
    stream: &str,
    consumer: &str,
    from: &str,
    to: &str,
    delivered: u64,
) {
    warn!(
        messaging.system = "jetstream",
        stream,
        consumer,
        from,
        to,
        delivered,
        "the durable consumer read other subjects; binding it moved it to the trigger's. It keeps \
         its place in the stream: events on the new subjects stored up to the stream sequence it \
         had delivered never run, and those it had delivered on the old ones and not \
         acknowledged run again. To start it from the trigger's deliver_policy instead, delete \
         it before weir starts. If another weir process binds this consumer with other \
         subjects, the two move it back and forth: give each function its own group"
    );
    counter!("weir_nats_consumer_subject_changes_total", "by" => "binding").increment(1);
}

/// Another client moved a durable consumer this process reads from its trigger's subjects
/// (`ours`) to `theirs`, while it runs.
pub(super) fn record_consumer_moved_by_another(
    stream: &str,
    consumer: &str,
    ours: &str,
    theirs: &str,
) {
    warn!(
        messaging.system = "jetstream",
        stream,
        consumer,
        ours,
        theirs,
        "another client moved this function's durable consumer to other subjects: the function \
         now runs their events, and nothing of this process reads its trigger's. Most likely \
         another weir process with another configuration binds the same durable (give each \
         function its own group); weir moves it back when it binds it again (at a restart, or \
         a re-bind after a failed pull)"
    );
    counter!("weir_nats_consumer_subject_changes_total", "by" => "another_client").increment(1);
}

/// A pull consumer was re-bound after an error (server restart, leader change, deleted consumer).
pub(super) fn record_consumer_rebound(stream: &str, consumer: &str) {
    info!(
        messaging.system = "jetstream",
        stream, consumer, "JetStream consumer re-bound"
    );
    counter!("weir_nats_consumer_rebinds_total", "outcome" => "ok").increment(1);
}

/// `weir_nats_publish_total` of one broker (outcome `ok`, `error`, `timeout`, and for
/// JetStream `duplicate`), registered once per publisher: a label lookup per message costs
/// more than the rest of a core publish.
#[derive(Clone)]
pub(super) struct PublishCounters {
    ok: metrics::Counter,
    error: metrics::Counter,
    timeout: metrics::Counter,
    /// Only JetStream de-duplicates, so only its publisher has this series.
    duplicate: Option<metrics::Counter>,
}

impl PublishCounters {
    pub(super) fn new(broker: crate::BrokerKind) -> Self {
        let outcome = |outcome: &'static str| counter!("weir_nats_publish_total", "broker" => broker.as_str(), "outcome" => outcome);
        Self {
            ok: outcome("ok"),
            error: outcome("error"),
            timeout: outcome("timeout"),
            duplicate: (broker == crate::BrokerKind::JetStream).then(|| outcome("duplicate")),
        }
    }

    pub(super) fn ok(&self) {
        self.ok.increment(1);
    }

    pub(super) fn error(&self) {
        self.error.increment(1);
    }

    pub(super) fn timeout(&self) {
        self.timeout.increment(1);
    }

    /// The stream already held a message with this `Nats-Msg-Id`: a redelivered input
    /// republished its outputs. This is success, reported at debug level only.
    pub(super) fn duplicate(&self, stream: &str, sequence: u64) {
        debug!(
            messaging.system = "jetstream",
            stream, sequence, "publish was a duplicate inside the stream's duplicate window"
        );
        if let Some(duplicate) = &self.duplicate {
            duplicate.increment(1);
        }
    }
}

/// Settling a delivery (ack, nak, term, in-progress) failed.
pub(super) fn record_settle_error(kind: &'static str, origin: &str, reason: &str) {
    warn!(
        messaging.system = "jetstream",
        origin,
        kind,
        error = reason,
        "settling a delivery failed"
    );
    counter!("weir_nats_settle_errors_total", "kind" => kind).increment(1);
}

/// A message arrived whose reply subject was not JetStream ack metadata.
pub(super) fn record_missing_metadata(stream: &str, reason: &str) {
    warn!(
        messaging.system = "jetstream",
        stream,
        error = reason,
        "JetStream message without readable metadata; delivery count assumed 1"
    );
    counter!("weir_nats_missing_metadata_total").increment(1);
}

/// An existing stream's settings differ from the configured ones; Weir leaves it unchanged.
pub(super) fn record_stream_drift(stream: &str, differences: &[super::StreamDifference]) {
    let summary: Vec<String> = differences.iter().map(ToString::to_string).collect();
    warn!(
        messaging.system = "jetstream",
        stream,
        differences = %summary.join("; "),
        "existing JetStream stream differs from the configuration; leaving it unchanged"
    );
    counter!("weir_nats_stream_drift_total").increment(1);
}

/// A stream was created because it was missing.
pub(super) fn record_stream_created(stream: &str) {
    info!(
        messaging.system = "jetstream",
        stream, "JetStream stream created"
    );
}

/// A declared stream had been deleted while Weir ran and was created again (empty), found
/// missing by a `subscription` re-binding its consumer or by a confirmed `publish`.
pub(super) fn record_stream_recreated(stream: &str, found_by: &'static str) {
    warn!(
        messaging.system = "jetstream",
        stream,
        found_by,
        "declared JetStream stream had been deleted; created it again from its declaration \
         (what it held is gone)"
    );
    counter!("weir_nats_streams_recreated_total", "found_by" => found_by).increment(1);
}

/// Core messages are buffered between async-nats and the dispatcher; the core subscription
/// ended because the connection closed.
pub(super) fn record_core_subscription_ended(subject: &str) {
    warn!(
        messaging.system = "nats",
        subject, "core NATS subscription ended"
    );
}

/// A history read (`weir tail --nats` on a stream's subject) ended by itself: its stream was
/// deleted or created again, or the ordered consumer met an error it could not ride out. At
/// debug level: the reader says why itself ([`crate::Subscription::ended_by`]).
pub(super) fn record_history_ended(stream: &str, subject: &str, reason: &str) {
    debug!(
        messaging.system = "jetstream",
        stream,
        subject,
        error = reason,
        "reading the stream ended"
    );
}

/// A history read could not look up its stream to check it still exists; it reads on and
/// asks again (the server may be restarting).
pub(super) fn record_stream_check_failed(stream: &str, reason: &str) {
    debug!(
        messaging.system = "jetstream",
        stream,
        error = reason,
        "could not check the stream being read"
    );
}

/// A consumer made only to read a stream (`weir tail --nats`: the history read, or counting
/// a subject's messages for `--last N`) could not be deleted; harmless, the server drops it
/// after its inactivity threshold.
pub(super) fn record_reading_consumer_left(consumer: &str, reason: &str) {
    debug!(
        messaging.system = "jetstream",
        consumer,
        error = reason,
        "a reading consumer was left for the server to expire"
    );
}
