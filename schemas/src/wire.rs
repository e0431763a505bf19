//! Bytes and headers from a broker ⇄ [`Event`]s: format detection and dispatch to the codecs.
//!
//! [`decode`] turns one [`WireMessage`] into the events it carries. With [`Format::Auto`] the
//! checks run in this order, first match wins:
//!
//! 1. structured CloudEvent: `content-type` is `application/cloudevents...` (the bindings say
//!    this header decides the mode, so it wins over `ce-` headers a producer may repeat);
//! 2. binary CloudEvent: a `ce-id` or `ce_id` header is present;
//! 3. Debezium tombstone: no payload (a null Kafka value);
//! 4. the body as JSON: literal `null` is a Debezium tombstone; an object with `specversion` is
//!    a structured CloudEvent; one with a string `op` and an object `source` (at the top level
//!    or under a `payload` wrapper), or a `schema` wrapper whose `payload` is `null`, is
//!    Debezium; one whose `Records` array has a record with `s3` is an S3 notification;
//! 5. anything else is a custom event: raw bytes as `data`, type [`CUSTOM_TYPE`],
//!    `datacontenttype` from the `content-type` header.
//!
//! A message recognised in steps 1-4 that then turns out malformed is an error, not a custom
//! event: it is undecodable and belongs in the DLQ. An explicit format forces its parser and
//! fails with that parser's precise error; [`Format::Raw`] never fails.
//!
//! **Ids.** An event that carries its own id (CloudEvents) keeps it. Every other event gets
//! `derived_id([origin, index])`, where `index` is its position among the events of the
//! message (`"0"` for Debezium and custom events, the record index for S3), so a redelivered
//! message decodes to the same ids.

use std::collections::BTreeMap;

use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use serde_json::value::RawValue;

use crate::cloudevents::{self, header, HeaderPair, CONTENT_TYPE_HEADER};
use crate::event::derived_id;
use crate::{debezium, s3, DecodeError, Event};

/// CloudEvents `type` of a message Weir did not recognise, carried as raw bytes.
pub const CUSTOM_TYPE: &str = "weir.custom";

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

/// A message as a transport received it, before decoding. Headers are any [`HeaderPair`]s:
/// owned pairs, or borrowed views of a broker client's own header map.
#[derive(Debug)]
pub struct WireMessage<'a, H = (String, String)> {
    pub headers: &'a [H],
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

impl<H> Clone for WireMessage<'_, H> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<H> Copy for WireMessage<'_, H> {}

/// Decode one wire message into the events it carries (an S3 notification carries several).
pub fn decode<H: HeaderPair>(
    msg: &WireMessage<'_, H>,
    format: Format,
) -> Result<Vec<Event>, DecodeError> {
    match format {
        Format::Auto => decode_auto(msg),
        Format::CloudEvents => decode_cloudevent(msg).map(|event| vec![event]),
        Format::Debezium => decode_debezium(msg).map(|event| vec![event]),
        Format::S3 => decode_s3(msg),
        Format::Raw => Ok(vec![decode_raw(msg)]),
    }
}

/// CloudEvents binary mode: attributes as headers, `data` as the body.
/// See [`cloudevents::encode_binary`] for the exact header layout.
pub fn encode_binary(event: &Event, style: HeaderStyle) -> (cloudevents::BinaryHeaders, Vec<u8>) {
    cloudevents::encode_binary(event, style)
}

/// CloudEvents structured mode JSON (`application/cloudevents+json`).
/// See [`cloudevents::encode_structured`] for how `data` is written.
pub fn encode_structured(event: &Event) -> Vec<u8> {
    cloudevents::encode_structured(event)
}

/// What [`Format::Auto`] found a message to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detected {
    Structured,
    Binary,
    Debezium,
    S3,
    Raw,
}

/// Which parser [`Format::Auto`] would use for a message (exposed for metrics and tests).
pub fn detect<H: HeaderPair>(msg: &WireMessage<'_, H>) -> Detected {
    if header(msg.headers, CONTENT_TYPE_HEADER).is_some_and(cloudevents::is_structured_content_type)
    {
        return Detected::Structured;
    }
    if cloudevents::has_binary_headers(msg.headers) {
        return Detected::Binary;
    }
    let Some(payload) = msg.payload else {
        return Detected::Debezium;
    };
    // Only the top level is parsed; member values stay unparsed slices.
    match serde_json::from_slice::<Option<BTreeMap<String, &RawValue>>>(payload) {
        Ok(None) => Detected::Debezium,
        Ok(Some(object)) if object.contains_key("specversion") => Detected::Structured,
        Ok(Some(object)) if looks_like_debezium(&object) => Detected::Debezium,
        Ok(Some(object)) if looks_like_s3(&object) => Detected::S3,
        _ => Detected::Raw,
    }
}

fn decode_auto<H: HeaderPair>(msg: &WireMessage<'_, H>) -> Result<Vec<Event>, DecodeError> {
    match detect(msg) {
        Detected::Structured => {
            cloudevents::decode_structured(msg.payload.unwrap_or_default()).map(|e| vec![e])
        }
        Detected::Binary => cloudevents::decode_binary(msg.headers, msg.payload).map(|e| vec![e]),
        Detected::Debezium => decode_debezium(msg).map(|event| vec![event]),
        Detected::S3 => decode_s3(msg),
        Detected::Raw => Ok(vec![decode_raw(msg)]),
    }
}

fn looks_like_debezium(object: &BTreeMap<String, &RawValue>) -> bool {
    let is_envelope = |object: &BTreeMap<String, &RawValue>| {
        object.get("op").is_some_and(|op| op.get().starts_with('"'))
            && object
                .get("source")
                .is_some_and(|source| source.get().starts_with('{'))
    };
    if is_envelope(object) {
        return true;
    }
    match object.get("payload") {
        Some(payload) if payload.get() == "null" => object.contains_key("schema"),
        Some(payload) => serde_json::from_str::<BTreeMap<String, &RawValue>>(payload.get())
            .is_ok_and(|inner| is_envelope(&inner)),
        None => false,
    }
}

fn looks_like_s3(object: &BTreeMap<String, &RawValue>) -> bool {
    object.get("Records").is_some_and(|records| {
        serde_json::from_str::<Vec<BTreeMap<String, &RawValue>>>(records.get())
            .is_ok_and(|records| records.iter().any(|record| record.contains_key("s3")))
    })
}

fn decode_cloudevent<H: HeaderPair>(msg: &WireMessage<'_, H>) -> Result<Event, DecodeError> {
    let structured_header = header(msg.headers, CONTENT_TYPE_HEADER)
        .is_some_and(cloudevents::is_structured_content_type);
    if !structured_header && cloudevents::has_any_ce_header(msg.headers) {
        return cloudevents::decode_binary(msg.headers, msg.payload);
    }
    match msg.payload {
        Some(payload) => cloudevents::decode_structured(payload),
        // Neither headers nor a body: report what binary mode misses first.
        None => cloudevents::decode_binary(msg.headers, None),
    }
}

fn decode_debezium<H: HeaderPair>(msg: &WireMessage<'_, H>) -> Result<Event, DecodeError> {
    let change = debezium::parse(msg.payload, msg.key)?;
    debezium::to_event(&change, msg.origin, msg.default_source)
}

fn decode_s3<H: HeaderPair>(msg: &WireMessage<'_, H>) -> Result<Vec<Event>, DecodeError> {
    let payload = msg
        .payload
        .ok_or_else(|| DecodeError::s3("no body (a null value)"))?;
    let uploads = s3::parse(payload)?;
    s3::to_events(&uploads, msg.origin)
}

/// A custom event: never fails. An empty or null body is no data, as in binary mode, so the
/// event reads the same after Weir re-publishes it.
fn decode_raw<H: HeaderPair>(msg: &WireMessage<'_, H>) -> Event {
    let mut event = Event::new(
        derived_id(&[msg.origin, "0"]),
        msg.default_source,
        CUSTOM_TYPE,
    );
    event.datacontenttype = header(msg.headers, CONTENT_TYPE_HEADER)
        .filter(|content_type| !content_type.is_empty())
        .map(str::to_owned);
    event.data = msg
        .payload
        .filter(|payload| !payload.is_empty())
        .map(<[u8]>::to_vec);
    event
}

/// RFC 3986 unreserved characters stay; everything else in a path segment is escaped.
const PATH_SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// The conventional [`WireMessage::default_source`] for a topic: `weir://<transport>/<topic>`
/// with the topic percent-encoded, so that it is always a valid CloudEvents `source` (topic
/// names may contain characters a URI may not).
pub fn default_source(transport: &str, topic: &str) -> String {
    format!(
        "weir://{}/{}",
        encode_uri_segment(transport),
        encode_uri_segment(topic)
    )
}

/// A name made safe as one segment of a `weir://` source URI.
pub(crate) fn encode_uri_segment(name: &str) -> String {
    utf8_percent_encode(name, PATH_SEGMENT).to_string()
}
