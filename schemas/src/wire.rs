//! Bytes and headers from a broker ⇄ [`Event`]s. Placeholder signatures: see module docs in the
//! finished version.

use crate::{DecodeError, Event};

/// How CloudEvents binary-mode attribute headers are spelled on a transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeaderStyle {
    /// `ce-<attr>` (NATS headers, HTTP, the memory bus).
    Dash,
    /// `ce_<attr>` (Kafka headers).
    Underscore,
}

/// What a trigger expects on its topic. `Auto` recognises each format by its shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    #[default]
    Auto,
    CloudEvents,
    Debezium,
    S3,
    Raw,
}

/// A message as a transport received it, before decoding.
#[derive(Debug, Clone, Copy)]
pub struct WireMessage<'a> {
    pub headers: &'a [(String, String)],
    /// `None` is a null value (a Kafka tombstone); `Some(b"")` is an empty body.
    pub payload: Option<&'a [u8]>,
    pub key: Option<&'a [u8]>,
    /// Stable identity of the message at its source (`kafka://orders/0/42`,
    /// `jetstream://ORDERS/17`, `memory://orders/5`): ids of events that carry none are derived
    /// from it so that a redelivery keeps its id.
    pub origin: &'a str,
    /// `source` for events that carry none (e.g. `weir://memory/orders`).
    pub default_source: &'a str,
}

/// Decode one wire message into the events it carries (an S3 notification carries several).
pub fn decode(msg: &WireMessage<'_>, format: Format) -> Result<Vec<Event>, DecodeError> {
    let _ = (msg, format);
    Err(DecodeError::Unsupported("not implemented yet"))
}

/// CloudEvents binary mode: attributes as headers, `data` as the body.
pub fn encode_binary(event: &Event, style: HeaderStyle) -> (Vec<(String, String)>, Vec<u8>) {
    let _ = (event, style);
    (Vec::new(), Vec::new())
}

/// CloudEvents structured mode JSON (`application/cloudevents+json`).
pub fn encode_structured(event: &Event) -> Vec<u8> {
    let _ = event;
    Vec::new()
}
