//! weir-schemas behaviour tests: one binary (one link) with a module per area.

// Test helpers are not `#[test]` fns, so clippy's test exemption does not reach them; a failed
// unwrap here is a failed assertion like any other.
#![allow(clippy::unwrap_used, clippy::panic)]

mod cloudevents;
mod codec;
mod debezium;
mod s3;
mod wire;

use weir_schemas::{decode, DecodeError, Event, Format, WireMessage};

pub const ORIGIN: &str = "kafka://orders/0/42";
pub const DEFAULT_SOURCE: &str = "weir://kafka/orders";

pub fn fixture(name: &str) -> Vec<u8> {
    let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read(&path).unwrap_or_else(|err| panic!("read {path}: {err}"))
}

pub fn headers(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(name, value)| ((*name).to_owned(), (*value).to_owned()))
        .collect()
}

pub fn message<'a>(
    headers: &'a [(String, String)],
    payload: Option<&'a [u8]>,
    key: Option<&'a [u8]>,
) -> WireMessage<'a> {
    WireMessage {
        headers,
        payload,
        key,
        origin: ORIGIN,
        default_source: DEFAULT_SOURCE,
    }
}

pub fn decode_one(msg: &WireMessage<'_>, format: Format) -> Event {
    let mut events = decode(msg, format).unwrap();
    assert_eq!(events.len(), 1, "expected exactly one event");
    events.remove(0)
}

pub fn decode_err(msg: &WireMessage<'_>, format: Format) -> DecodeError {
    match decode(msg, format) {
        Ok(events) => panic!("expected an error, decoded {events:?}"),
        Err(err) => err,
    }
}

/// A fully populated event used by round-trip and golden tests.
pub fn sample_event() -> Event {
    let mut event = Event::new("evt-1", "weir://test/orders", "com.example.order.created");
    event.subject = Some("orders/42".into());
    event.time = Some("2024-05-01T12:00:00.123Z".into());
    event.datacontenttype = Some("application/json".into());
    event.dataschema = Some("https://example.com/schemas/order.json".into());
    event.data = Some(br#"{"order":42,"total":9.5}"#.to_vec());
    event.extensions.insert("weirhops".into(), "1".into());
    event.extensions.insert(
        "traceparent".into(),
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into(),
    );
    event
}
