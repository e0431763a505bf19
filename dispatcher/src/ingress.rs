//! Events entering Weir from outside (HTTP ingress, `weir publish` straight to a broker):
//! decode what the caller sent, give every event a trace, and encode it for the broker.
//!
//! Ingress decodes before it publishes so that a malformed event is refused at the door with a
//! precise reason; what it publishes is the decoded event in CloudEvents binary mode, so the id
//! the caller is told is the id the function sees.

use bytes::Bytes;
use serde::Serialize;
use weir_broker_bridge::{BrokerKind, OutboundMessage, Published, Publisher, TransportError};
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

/// Decode a request into the events it carries. Each request is its own origin, so events
/// without an id of their own get a fresh one.
pub fn decode_request(
    entry: Entry,
    topic: &str,
    headers: &[(String, String)],
    body: &[u8],
) -> Result<Vec<Event>, DecodeError> {
    let origin = format!("ingress://{}", uuid::Uuid::new_v4());
    let default_source = weir_schemas::wire::default_source(entry.as_str(), topic);
    let wire = WireMessage {
        headers,
        payload: Some(body),
        key: None,
        origin: &origin,
        default_source: &default_source,
    };
    let mut events = weir_schemas::decode(&wire, Format::Auto)?;
    let traceparent = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(ext::TRACEPARENT))
        .map(|(_, v)| v.as_str());
    for event in &mut events {
        stamp_trace(event, traceparent);
    }
    Ok(events)
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
