//! Events entering Weir from outside (HTTP ingress, `weir publish` straight to a broker):
//! decode what the caller sent, give every event a trace, and encode it for the broker.
//!
//! Ingress decodes before it publishes so that a malformed event is refused at the door with a
//! precise reason; what it publishes is the decoded event in CloudEvents binary mode, so the id
//! the caller is told is the id the function sees.

use bytes::Bytes;
use weir_broker_bridge::{BrokerKind, OutboundMessage};
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
pub fn outbound(event: &Event, topic: &str, broker: BrokerKind) -> OutboundMessage {
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
