//! A received Kafka record in compact form: what the consumer thread buffers and what a
//! delivery keeps to hand its message back.
//!
//! The consumer thread copies each rdkafka message into one buffer (key, value and headers
//! side by side), which is one allocation instead of one per header name and value; the
//! [`InboundMessage`] the dispatcher sees is built from it when the delivery is handed out, on
//! the dispatcher's side. The delivery's settle handle keeps the record itself, so handing a
//! message back (retry, dropped delivery) rebuilds the message instead of every delivery
//! carrying a deep copy it almost never needs.
//!
//! It converts and copies; it does not decide anything about scheduling or commits.

use bytes::{BufMut, Bytes, BytesMut};
use rdkafka::message::{Headers, Message};

use super::metrics_events;
use crate::{InboundMessage, Origin};

/// Length prefix marking a null header value.
const NULL_VALUE: u32 = u32::MAX;

/// One received record of the subscription's topic.
#[derive(Debug, Clone)]
pub(super) struct Record {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Bytes>,
    /// `None` is a null value (a tombstone).
    pub payload: Option<Bytes>,
    /// Headers as `[u32 name length][name][u32 value length or NULL_VALUE][value]...`, native
    /// endian (never leaves the process).
    headers: Bytes,
    pub delivery_count: u32,
}

impl Record {
    /// Copy a borrowed rdkafka message. Headers whose name or value is longer than `u32::MAX`
    /// bytes cannot exist on the wire (Kafka uses varint lengths below that).
    pub fn copy_from(message: &impl Message) -> Self {
        let key = message.key();
        let payload = message.payload();
        let headers = message.headers();
        let mut size = key.map_or(0, <[u8]>::len) + payload.map_or(0, <[u8]>::len);
        if let Some(list) = headers {
            for header in list.iter() {
                size += 8 + header.key.len() + header.value.map_or(0, <[u8]>::len);
            }
        }
        let mut buffer = BytesMut::with_capacity(size);
        buffer.put_slice(key.unwrap_or_default());
        buffer.put_slice(payload.unwrap_or_default());
        if let Some(list) = headers {
            for header in list.iter() {
                put_len(&mut buffer, header.key.len());
                buffer.put_slice(header.key.as_bytes());
                match header.value {
                    None => buffer.put_u32_ne(NULL_VALUE),
                    Some(value) => {
                        put_len(&mut buffer, value.len());
                        buffer.put_slice(value);
                    }
                }
            }
        }
        let mut buffer = buffer.freeze();
        let key_len = key.map_or(0, <[u8]>::len);
        let payload_len = payload.map_or(0, <[u8]>::len);
        let key_bytes = buffer.split_to(key_len);
        let payload_bytes = buffer.split_to(payload_len);
        Self {
            partition: message.partition(),
            offset: message.offset(),
            key: key.map(|_| key_bytes),
            payload: payload.map(|_| payload_bytes),
            headers: buffer,
            delivery_count: 1,
        }
    }

    /// The message the dispatcher sees. Header values that are not UTF-8 are converted lossily
    /// (and counted); a null header value becomes the empty string.
    pub fn to_message(&self, topic: &str) -> InboundMessage {
        InboundMessage {
            topic: topic.to_owned(),
            key: self.key.clone(),
            headers: self.decode_headers().into(),
            payload: self.payload.clone(),
            origin: Origin::Kafka {
                topic: topic.to_owned(),
                partition: self.partition,
                offset: self.offset,
            },
            delivery_count: self.delivery_count,
        }
    }

    fn decode_headers(&self) -> Vec<(String, String)> {
        let mut rest: &[u8] = &self.headers;
        let mut headers = Vec::new();
        while let Some((name, after)) = take(rest) {
            let (value, after) = take(after).unwrap_or((None, &[]));
            rest = after;
            headers.push((
                text(name.unwrap_or_default()),
                value.map(text).unwrap_or_default(),
            ));
        }
        headers
    }
}

fn put_len(buffer: &mut BytesMut, len: usize) {
    // Below u32::MAX on the wire (see `copy_from`); saturating keeps NULL_VALUE out of reach
    // of a real length only in theory, which is all an impossible input deserves.
    buffer.put_u32_ne(u32::try_from(len).unwrap_or(NULL_VALUE - 1));
}

/// One length-prefixed field: `Some(bytes)`, or `None` for a null value; `None` overall at the
/// end of the buffer.
fn take(buffer: &[u8]) -> Option<(Option<&[u8]>, &[u8])> {
    let (len, rest) = buffer.split_first_chunk::<4>()?;
    let len = u32::from_ne_bytes(*len);
    if len == NULL_VALUE {
        return Some((None, rest));
    }
    let len = usize::try_from(len).ok()?.min(rest.len());
    let (field, rest) = rest.split_at(len);
    Some((Some(field), rest))
}

fn text(bytes: &[u8]) -> String {
    match std::str::from_utf8(bytes) {
        Ok(text) => text.to_owned(),
        Err(_) => {
            metrics_events::lossy_header();
            String::from_utf8_lossy(bytes).into_owned()
        }
    }
}

#[cfg(test)]
mod tests {
    use rdkafka::message::{Header, OwnedHeaders, OwnedMessage, Timestamp};

    use super::*;

    fn message(key: Option<&[u8]>, payload: Option<&[u8]>, headers: OwnedHeaders) -> OwnedMessage {
        OwnedMessage::new(
            payload.map(<[u8]>::to_vec),
            key.map(<[u8]>::to_vec),
            "t".to_owned(),
            Timestamp::NotAvailable,
            2,
            41,
            Some(headers),
        )
    }

    #[test]
    fn round_trips_key_value_and_headers_in_order() {
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: "ce_id",
                value: Some("e-1"),
            })
            .insert(Header::<&str> {
                key: "empty",
                value: None,
            })
            .insert(Header {
                key: "ce_id",
                value: Some(""),
            })
            .insert(Header {
                key: "bad",
                value: Some(&[0xff_u8, b'x'][..]),
            });
        let record = Record::copy_from(&message(Some(b"k"), Some(b"{\"a\":1}"), headers));
        let inbound = record.to_message("t");
        assert_eq!(inbound.topic, "t");
        assert_eq!(inbound.key.as_deref(), Some(&b"k"[..]));
        assert_eq!(inbound.payload.as_deref(), Some(&b"{\"a\":1}"[..]));
        assert_eq!(
            inbound.headers,
            vec![
                ("ce_id".to_owned(), "e-1".to_owned()),
                ("empty".to_owned(), String::new()),
                ("ce_id".to_owned(), String::new()),
                ("bad".to_owned(), "\u{fffd}x".to_owned()),
            ]
        );
        assert_eq!(
            inbound.origin,
            Origin::Kafka {
                topic: "t".to_owned(),
                partition: 2,
                offset: 41
            }
        );
        assert_eq!(inbound.delivery_count, 1);
    }

    #[test]
    fn null_key_and_tombstone_stay_null_and_empty_ones_stay_empty() {
        let record = Record::copy_from(&message(None, None, OwnedHeaders::new()));
        let inbound = record.to_message("t");
        assert_eq!(inbound.key, None);
        assert_eq!(inbound.payload, None);
        assert!(inbound.headers.is_empty());
        let record = Record::copy_from(&message(Some(b""), Some(b""), OwnedHeaders::new()));
        let inbound = record.to_message("t");
        assert_eq!(inbound.key.as_deref(), Some(&b""[..]));
        assert_eq!(inbound.payload.as_deref(), Some(&b""[..]));
    }
}
