//! `weir dlq redrive`: sending dead-lettered events back to the function that failed them.
//!
//! A dead-letter record is the original event plus the `weirdlq*` extensions (DESIGN.md). A
//! redrive reads the function's dead-letter topic up to where it ended when the redrive began
//! (a [`Backlog`]), takes each of the function's records back to the event it was and
//! publishes that, confirmed, to the topic it first came in on (`weirdlqtopic`; for a record
//! without it, the trigger's topic when that is one subject). Only then is the record removed
//! (JetStream) or moved past (Kafka: the `weir-redrive-<function>` group's offsets).
//!
//! The event goes back with two headers. [`FOR_HEADER`] names the function: the other
//! functions triggered by the same topic, which handled the event the first time, acknowledge
//! it without running ([`Redrive::of`], read by the runner). [`FROM_HEADER`] names the record's
//! position: the record of a second failure keeps it (`weirdlqredriven`, part of that record's
//! de-duplication id, so it is not taken for the first), and it makes the publish's
//! de-duplication id, so a redrive stopped between a publish and the record's removal and run
//! again does not send that event twice to a JetStream trigger.
//!
//! An undecodable input goes back as the bytes it was, with its content type, to be decoded
//! again (after the function's `format` was changed, say). An event that expired or went over
//! the hop limit goes back as it was and meets the same limit unless it was raised.
//!
//! Left where they are, and reported: records of other functions (a shared dead-letter
//! topic), records whose reason the redrive was not asked for, records cut down for size (their
//! data is gone; `weirdlqorigin` says where the original was), records with no topic to go to.
//!
//! It does not run functions or decide retries: the running weir does, as for any event.

use std::borrow::Cow;

use bytes::Bytes;
use serde::Serialize;
use weir_broker_bridge::{
    Backlog, BrokerKind, InboundMessage, OutboundMessage, Published, Publisher, TransportError,
};
use weir_schemas::cloudevents::CONTENT_TYPE_HEADER;
use weir_schemas::{derived_id, ext, Event, Format, WireMessage};

use crate::config::{FunctionConfig, TriggerConfig};
use crate::deadletter::{DeadLetterReason, UNDECODABLE_TYPE};
use crate::runner::header_style;

/// The function a redriven message is for.
pub const FOR_HEADER: &str = "weir-redrive-for";
/// Where a redriven message's dead-letter record was (its origin, e.g. `jetstream://DLQ/7`).
pub const FROM_HEADER: &str = "weir-redrive-from";

/// What a received message's headers say about a redrive.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Redrive<'a> {
    /// [`FOR_HEADER`]: the one function that is to run it.
    pub for_function: Option<&'a str>,
    /// [`FROM_HEADER`].
    pub from: Option<&'a str>,
}

impl<'a> Redrive<'a> {
    /// Read from a message's headers: one pass, no allocation (every delivery is looked at).
    pub fn of(headers: &[(&'a str, &'a str)]) -> Self {
        let mut redrive = Self::default();
        for &(name, value) in headers {
            if name.eq_ignore_ascii_case(FOR_HEADER) {
                redrive.for_function.get_or_insert(value);
            } else if name.eq_ignore_ascii_case(FROM_HEADER) {
                redrive.from.get_or_insert(value);
            }
        }
        redrive
    }
}

/// What to send back.
#[derive(Debug, Clone)]
pub struct Plan<'a> {
    pub function: &'a FunctionConfig,
    /// Only records with one of these reasons; all when empty.
    pub reasons: Vec<DeadLetterReason>,
    /// Send at most this many events; the rest stays for the next redrive.
    pub limit: Option<u64>,
    /// Say what would be sent; send, remove and move past nothing.
    pub dry_run: bool,
}

/// What a redrive did with one record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Action {
    /// Published (and removed, or moved past).
    Sent,
    /// The trigger's broker held it already (sent by an earlier redrive that stopped before
    /// removing the record); removed now.
    AlreadySent,
    /// `--dry-run`: would have been sent.
    WouldSend,
    /// The function's, but not sent back: see `note`.
    Kept,
    /// Another function's record (a shared dead-letter topic): left alone.
    OtherFunction,
    /// Not a dead-letter record Weir wrote: left alone.
    NotARecord,
}

/// One line of a redrive's report.
#[derive(Debug, Clone, Serialize)]
pub struct RecordReport {
    /// Where the record is (was) in the dead-letter topic.
    pub origin: String,
    pub action: Action,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The topic it was (or would be) sent to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
    /// Why it was kept, or what else to know.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// What a redrive did, in all.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Summary {
    /// Records read.
    pub read: u64,
    pub sent: u64,
    pub already_sent: u64,
    pub would_send: u64,
    pub kept: u64,
    pub other_functions: u64,
    pub not_records: u64,
    /// The limit was reached with records left to read.
    pub stopped_at_limit: bool,
}

impl Summary {
    fn count(&mut self, action: &Action) {
        let counter = match action {
            Action::Sent => &mut self.sent,
            Action::AlreadySent => &mut self.already_sent,
            Action::WouldSend => &mut self.would_send,
            Action::Kept => &mut self.kept,
            Action::OtherFunction => &mut self.other_functions,
            Action::NotARecord => &mut self.not_records,
        };
        *counter += 1;
    }
}

/// Why a redrive stopped before its end.
#[derive(Debug, thiserror::Error)]
pub enum RedriveError {
    #[error("reading the dead letters: {0}")]
    Read(TransportError),
    #[error("sending {id} back: {error}")]
    Send { id: String, error: TransportError },
    #[error("removing the record at {origin} after sending it: {error}")]
    Done {
        origin: String,
        error: TransportError,
    },
}

/// Send back what `backlog` holds of `plan.function`'s records to `to` (a publisher on the
/// function's trigger broker), reporting each record to `report`. Stops at the first failure
/// to read, send or remove: what was sent before is removed (or its offsets committed) and
/// stays sent; the rest stays for the next redrive.
pub async fn redrive(
    backlog: &mut dyn Backlog,
    to: &dyn Publisher,
    plan: &Plan<'_>,
    mut report: impl FnMut(&RecordReport),
) -> Result<Summary, RedriveError> {
    let mut summary = Summary::default();
    let result = drain(backlog, to, plan, &mut summary, &mut report).await;
    // Whatever happened, what was done is saved (Kafka commits it).
    let closed = backlog.close().await;
    result?;
    closed.map_err(RedriveError::Read)?;
    Ok(summary)
}

async fn drain(
    backlog: &mut dyn Backlog,
    to: &dyn Publisher,
    plan: &Plan<'_>,
    summary: &mut Summary,
    report: &mut impl FnMut(&RecordReport),
) -> Result<(), RedriveError> {
    let mut sendable = 0u64;
    while let Some(message) = backlog.next().await.map_err(RedriveError::Read)? {
        let origin = message.origin.to_string();
        let verdict = judge(&message, &origin, plan);
        let (mut line, outbound) = match verdict {
            Verdict::Send {
                message: outbound,
                id,
                reason,
            } => {
                if plan.limit.is_some_and(|limit| sendable >= limit) {
                    summary.stopped_at_limit = true;
                    return Ok(());
                }
                sendable += 1;
                let line = RecordReport {
                    origin: origin.clone(),
                    action: Action::WouldSend,
                    id: Some(id),
                    reason,
                    to: Some(outbound.topic.clone()),
                    note: None,
                };
                (line, Some(outbound))
            }
            Verdict::Leave(line) => (line, None),
        };
        summary.read += 1;
        let mut sent = false;
        if let (Some(outbound), false) = (outbound, plan.dry_run) {
            match to.publish(outbound).await {
                Ok(Published::Stored) => line.action = Action::Sent,
                Ok(Published::Duplicate) => line.action = Action::AlreadySent,
                // Larger than the trigger's broker takes (it may not be the dead letters'):
                // sending again will not help, and the record says what it was.
                Err(TransportError::TooLarge { reason, .. }) => {
                    line.action = Action::Kept;
                    line.note = Some(format!("too large for {}: {reason}", line.to_topic()));
                }
                Err(error) => {
                    return Err(RedriveError::Send {
                        id: line.id.unwrap_or_default(),
                        error,
                    })
                }
            }
            sent = matches!(line.action, Action::Sent | Action::AlreadySent);
        }
        if !plan.dry_run {
            backlog
                .done(&message.origin, sent)
                .await
                .map_err(|error| RedriveError::Done {
                    origin: origin.clone(),
                    error,
                })?;
        }
        summary.count(&line.action);
        report(&line);
    }
    Ok(())
}

impl RecordReport {
    fn to_topic(&self) -> &str {
        self.to.as_deref().unwrap_or("its topic")
    }
}

/// What to do with one record.
enum Verdict {
    Send {
        message: OutboundMessage,
        id: String,
        reason: Option<String>,
    },
    Leave(RecordReport),
}

fn judge(message: &InboundMessage, origin: &str, plan: &Plan<'_>) -> Verdict {
    let leave = |action: Action, record: Option<&Event>, note: Option<String>| {
        Verdict::Leave(RecordReport {
            origin: origin.to_owned(),
            action,
            id: record.map(|r| r.id.clone()),
            reason: record.and_then(|r| r.extension(ext::DLQ_REASON).map(str::to_owned)),
            to: None,
            note,
        })
    };
    let headers = message.headers.view();
    let default_source = weir_schemas::wire::default_source("dlq", &message.topic);
    let wire = WireMessage {
        headers: &headers,
        payload: message.payload.as_deref(),
        key: message.key.as_deref(),
        origin,
        default_source: &default_source,
    };
    let record = match weir_schemas::decode(&wire, Format::CloudEvents) {
        Ok(mut events) if events.len() == 1 => events.remove(0),
        Ok(events) => {
            let note = format!("{} events in one message", events.len());
            return leave(Action::NotARecord, None, Some(note));
        }
        Err(e) => return leave(Action::NotARecord, None, Some(e.to_string())),
    };
    let function = &plan.function.name;
    match record.extension(ext::DLQ_FUNCTION) {
        None => {
            let note = format!("no {} extension", ext::DLQ_FUNCTION);
            return leave(Action::NotARecord, Some(&record), Some(note));
        }
        Some(other) if other != function => {
            let note = format!("a record of {other}");
            return leave(Action::OtherFunction, Some(&record), Some(note));
        }
        Some(_) => {}
    }
    let reason = record.extension(ext::DLQ_REASON).map(str::to_owned);
    if !plan.reasons.is_empty()
        && !plan
            .reasons
            .iter()
            .any(|wanted| reason.as_deref() == Some(wanted.as_str()))
    {
        let note = format!(
            "reason {} was not asked for",
            reason.as_deref().unwrap_or("(none)")
        );
        return leave(Action::Kept, Some(&record), Some(note));
    }
    if let Some(dropped) = record.extension(ext::DLQ_DROPPED) {
        let note = format!(
            "the record was cut down for size and holds no {dropped}; the original was at {}",
            record.extension(ext::DLQ_ORIGIN).unwrap_or("(not said)")
        );
        return leave(Action::Kept, Some(&record), Some(note));
    }
    let topic = match destination(&plan.function.trigger, record.extension(ext::DLQ_TOPIC)) {
        Ok(topic) => topic,
        Err(note) => return leave(Action::Kept, Some(&record), Some(note)),
    };
    let id = record.id.clone();
    let undecodable = record.ty == UNDECODABLE_TYPE
        && reason.as_deref() == Some(DeadLetterReason::Undecodable.as_str());
    let (mut headers, payload, key) = if undecodable {
        // Sent as the bytes that came in, to be decoded again.
        let headers = record
            .datacontenttype
            .iter()
            .map(|content_type| (Cow::Borrowed(CONTENT_TYPE_HEADER), content_type.clone()))
            .collect();
        (headers, record.data.unwrap_or_default(), None)
    } else {
        let mut event = record;
        event
            .extensions
            .retain(|name, _| !ext::is_dead_letter(name));
        let key = event
            .extension(ext::PARTITION_KEY)
            .map(|key| Bytes::from(key.to_owned()));
        let (headers, payload) =
            weir_schemas::encode_binary(&event, header_style(plan.function.trigger.broker));
        (headers, payload, key)
    };
    headers.push((Cow::Borrowed(FOR_HEADER), function.clone()));
    headers.push((Cow::Borrowed(FROM_HEADER), origin.to_owned()));
    Verdict::Send {
        message: OutboundMessage {
            topic,
            key,
            headers,
            payload: Bytes::from(payload),
            dedup_id: Some(format!(
                "redrive-{}",
                derived_id(&["redrive", function, origin])
            )),
        },
        id,
        reason,
    }
}

/// The topic a record goes back to: the one it came in on while the trigger still reaches
/// it, else the trigger's topic when that is a single topic.
fn destination(trigger: &TriggerConfig, came_in_on: Option<&str>) -> Result<String, String> {
    let subjects = matches!(trigger.broker, BrokerKind::Nats | BrokerKind::JetStream);
    let reaches = |topic: &str| {
        if subjects {
            weir_broker_bridge::nats::subject_covers(&trigger.topic, topic)
        } else {
            trigger.topic == topic
        }
    };
    let literal = !subjects || !trigger.topic.split('.').any(|t| t == "*" || t == ">");
    match came_in_on {
        Some(topic) if reaches(topic) => Ok(topic.to_owned()),
        _ if literal => Ok(trigger.topic.clone()),
        Some(topic) => Err(format!(
            "it came in on {topic}, which the trigger {} no longer reaches",
            trigger.topic
        )),
        None => Err(format!(
            "the record does not say which subject of {} it came in on (written before Weir \
             recorded {})",
            trigger.topic,
            ext::DLQ_TOPIC
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redrive_headers_are_read_in_any_case_and_first_wins() {
        let headers = [
            ("ce-id", "1"),
            ("Weir-Redrive-For", "audit"),
            ("weir-redrive-from", "jetstream://DLQ/3"),
            ("weir-redrive-for", "other"),
        ];
        assert_eq!(
            Redrive::of(&headers),
            Redrive {
                for_function: Some("audit"),
                from: Some("jetstream://DLQ/3"),
            }
        );
        assert_eq!(Redrive::of(&[("ce-id", "1")]), Redrive::default());
    }

    fn trigger(broker: BrokerKind, topic: &str) -> TriggerConfig {
        TriggerConfig {
            broker,
            topic: topic.to_owned(),
            format: Format::Auto,
            ordering: Default::default(),
            group: "g".to_owned(),
            jetstream: None,
        }
    }

    #[test]
    fn a_record_goes_back_where_it_came_in_while_the_trigger_reaches_it() {
        let wild = trigger(BrokerKind::JetStream, "orders.>");
        assert_eq!(
            destination(&wild, Some("orders.eu")),
            Ok("orders.eu".into())
        );
        assert!(destination(&wild, Some("payments.eu")).is_err());
        assert!(destination(&wild, None).is_err());
        let one = trigger(BrokerKind::JetStream, "orders");
        assert_eq!(destination(&one, None), Ok("orders".into()));
        // The trigger moved: the record goes to where the function now listens.
        assert_eq!(destination(&one, Some("old-orders")), Ok("orders".into()));
        let kafka = trigger(BrokerKind::Kafka, "orders.>");
        assert_eq!(destination(&kafka, Some("x")), Ok("orders.>".into()));
    }
}
