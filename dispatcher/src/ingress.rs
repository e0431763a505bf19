//! Events entering Weir from outside (HTTP ingress, `weir publish` straight to a broker):
//! decode what the caller sent, give every event a trace, and encode it for the broker.
//!
//! Ingress decodes before it publishes so that a malformed event is refused at the door with a
//! precise reason; what it publishes is the decoded event in CloudEvents binary mode, so the id
//! the caller is told is the id the function sees. A request in the HTTP binding's batched mode
//! becomes one message per event: batching is how the events came in, not how they are stored.

use bytes::Bytes;
use serde::Serialize;
use serde_json::value::RawValue;
use weir_broker_bridge::{BrokerKind, OutboundMessage, Published, Publisher, TransportError};
use weir_schemas::cloudevents::{self, BATCH_CONTENT_TYPE, CONTENT_TYPE_HEADER};
use weir_schemas::{ext, DecodeError, Event, Format, WireMessage};

use crate::chain;
use crate::runner::header_style;

/// Where an event entered Weir. It names the `source` of an event that brings none
/// (`weir://http/<topic>`, `weir://cli/<topic>`), so that source does not claim a way in the
/// event did not take.
#[derive(Debug, Clone, Copy)]
pub enum Entry {
    /// `POST /v1/topics/{topic}`.
    Http,
    /// `weir publish` straight to a broker.
    Cli,
}

impl Entry {
    fn as_str(self) -> &'static str {
        match self {
            Self::Http => "http",
            Self::Cli => "cli",
        }
    }
}

/// Why a request carries no events Weir can publish.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error(transparent)]
    Decode(#[from] DecodeError),
    #[error("a batch ({BATCH_CONTENT_TYPE}) must be a JSON array of structured CloudEvents: {0}")]
    NotABatch(serde_json::Error),
    /// All or nothing: one bad event refuses the whole batch, so a client's retry of the
    /// corrected batch is not half a repeat.
    #[error("event [{index}] of the batch: {error}")]
    InBatch { index: usize, error: DecodeError },
}

impl RequestError {
    /// A short, stable label for the answer and for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Decode(error) | Self::InBatch { error, .. } => error.kind(),
            Self::NotABatch(_) => "batch",
        }
    }
}

/// Decode a request into the events it carries. Each request is its own origin, so events
/// without an id of their own get a fresh one.
pub fn decode_request(
    entry: Entry,
    topic: &str,
    headers: &[(String, String)],
    body: &[u8],
) -> Result<Vec<Event>, RequestError> {
    let batched = cloudevents::header(headers, CONTENT_TYPE_HEADER)
        .is_some_and(cloudevents::is_batch_content_type);
    let mut events = if batched {
        decode_batch(body)?
    } else {
        let origin = format!("ingress://{}", uuid::Uuid::new_v4());
        let default_source = weir_schemas::wire::default_source(entry.as_str(), topic);
        let wire = WireMessage {
            headers,
            payload: Some(body),
            key: None,
            origin: &origin,
            default_source: &default_source,
        };
        weir_schemas::decode(&wire, Format::Auto)?
    };
    let traceparent = cloudevents::header(headers, ext::TRACEPARENT);
    for event in &mut events {
        stamp_trace(event, traceparent);
    }
    Ok(events)
}

/// Each member of a batch, decoded as the structured event it must be (each carries its own
/// id and source, so the request's origin and default source play no part).
fn decode_batch(body: &[u8]) -> Result<Vec<Event>, RequestError> {
    let members: Vec<&RawValue> = serde_json::from_slice(body).map_err(RequestError::NotABatch)?;
    members
        .into_iter()
        .enumerate()
        .map(|(index, member)| {
            cloudevents::decode_structured(member.get().as_bytes())
                .map_err(|error| RequestError::InBatch { index, error })
        })
        .collect()
}

/// Every event enters Weir with a trace: the caller's `traceparent` header (or extension), or
/// one derived from the event's source and id.
fn stamp_trace(event: &mut Event, header: Option<&str>) {
    if event.extension(ext::TRACEPARENT).is_some() {
        return;
    }
    let traceparent = header.map_or_else(|| chain::traceparent_for(event), str::to_owned);
    event
        .extensions
        .insert(ext::TRACEPARENT.to_owned(), traceparent);
}

/// The message that publishes `event` to `topic` on `broker`.
fn outbound(event: &Event, topic: &str, broker: BrokerKind) -> OutboundMessage {
    let (headers, payload) = weir_schemas::encode_binary(event, header_style(broker));
    OutboundMessage {
        topic: topic.to_owned(),
        key: event
            .extension(ext::PARTITION_KEY)
            .map(|k| Bytes::from(k.to_owned())),
        headers,
        payload: Bytes::from(payload),
        // Source and id: a client retrying its request is de-duplicated, another producer's
        // event that happens to share the id is not.
        dedup_id: Some(weir_schemas::derived_id(&[
            "ingress",
            &event.source,
            &event.id,
        ])),
    }
}

/// What publishing a request's events did: the `202` answer of `POST /v1/topics/{topic}`, and
/// what `weir publish` prints for a publish straight to a broker.
#[derive(Debug, Serialize)]
pub struct Accepted {
    pub topic: String,
    pub broker: &'static str,
    /// Ids of the published events (an S3 notification with several records gives several).
    pub ids: Vec<String>,
    /// Those of `ids` the topic already held (same source and id, inside the broker's
    /// de-duplication window): accepted, as a client's retry should be, but not stored again.
    pub duplicates: Vec<String>,
}

/// Publish a request's events to `topic`, each confirmed before the next; `key`, when given,
/// is every message's broker key (`weir publish --key`). The first failure ends it; the
/// transport's error names the topic.
pub async fn publish(
    publisher: &dyn Publisher,
    broker: BrokerKind,
    topic: &str,
    events: Vec<Event>,
    key: Option<&str>,
) -> Result<Accepted, TransportError> {
    let mut ids = Vec::with_capacity(events.len());
    let mut duplicates = Vec::new();
    for event in events {
        let mut message = outbound(&event, topic, broker);
        if let Some(key) = key {
            message.key = Some(Bytes::copy_from_slice(key.as_bytes()));
        }
        if publisher.publish(message).await? == Published::Duplicate {
            duplicates.push(event.id.clone());
        }
        ids.push(event.id);
    }
    Ok(Accepted {
        topic: topic.to_owned(),
        broker: broker.as_str(),
        ids,
        duplicates,
    })
}
