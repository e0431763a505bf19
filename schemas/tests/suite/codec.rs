use std::collections::BTreeMap;

use serde_json::json;
use weir_schemas::codec::{event_from_msgpack, event_to_msgpack, from_msgpack, to_msgpack};
use weir_schemas::{DbChange, DbOp, DbSource, DecodeError, Event, Upload};

use crate::sample_event;

fn fixed_db_change() -> DbChange {
    DbChange {
        op: DbOp::Update,
        before: Some(json!({"id": 7, "qty": 1})),
        after: Some(json!({"id": 7, "qty": 2})),
        source: DbSource {
            connector: Some("postgresql".into()),
            name: Some("shop".into()),
            db: Some("shopdb".into()),
            schema: Some("public".into()),
            table: Some("orders".into()),
            ts_ms: Some(1714564800123),
            extra: BTreeMap::from([("lsn".to_owned(), json!(24023128))]),
        },
        ts_ms: Some(1714564800456),
        key: Some(json!({"id": 7})),
    }
}

fn fixed_upload() -> Upload {
    Upload {
        bucket: "media".into(),
        key: "photos/été.jpg".into(),
        size: Some(1024),
        etag: Some("d41d8cd9".into()),
        event_name: "s3:ObjectCreated:Put".into(),
        event_time: Some("2024-05-01T12:00:00.000Z".into()),
        content_type: None,
        version_id: None,
        sequencer: Some("0055AED6DCD90281E5".into()),
        region: Some("eu-west-1".into()),
    }
}

fn fixed_event() -> Event {
    let mut event = Event::new("evt-1", "weir://test", "t");
    event.time = Some("2024-05-01T12:00:00Z".into());
    event.data = Some(vec![0xde, 0xad]);
    event.extensions.insert("weirhops".into(), "2".into());
    event
}

// Golden bytes: named MessagePack (structs as maps keyed by field name). If one of these
// fails, the encoding changed and records already written, or functions built against an
// older SDK, may no longer read it: that must be a deliberate, versioned decision.

const DB_CHANGE_GOLDEN: &str = "TODO";
const UPLOAD_GOLDEN: &str = "TODO";
const EVENT_GOLDEN: &str = "TODO";

#[test]
fn golden_db_change() {
    let bytes = to_msgpack(&fixed_db_change()).unwrap();
    assert_eq!(hex::encode(&bytes), DB_CHANGE_GOLDEN);
    assert_eq!(from_msgpack::<DbChange>(&hex::decode(DB_CHANGE_GOLDEN).unwrap()).unwrap(), fixed_db_change());
}

#[test]
fn golden_upload() {
    let bytes = to_msgpack(&fixed_upload()).unwrap();
    assert_eq!(hex::encode(&bytes), UPLOAD_GOLDEN);
    assert_eq!(from_msgpack::<Upload>(&hex::decode(UPLOAD_GOLDEN).unwrap()).unwrap(), fixed_upload());
}

#[test]
fn golden_event() {
    let bytes = event_to_msgpack(&fixed_event()).unwrap();
    assert_eq!(hex::encode(&bytes), EVENT_GOLDEN);
    assert_eq!(event_from_msgpack(&hex::decode(EVENT_GOLDEN).unwrap()).unwrap(), fixed_event());
}

#[test]
fn event_round_trips_through_msgpack() {
    for event in [sample_event(), Event::new("1", "s", "t")] {
        assert_eq!(event_from_msgpack(&event_to_msgpack(&event).unwrap()).unwrap(), event);
    }
}

#[test]
fn typed_payloads_round_trip_through_events() {
    let mut event = Event::new("1", "s", "placeholder");
    event.set_db_change(&fixed_db_change()).unwrap();
    assert_eq!(event.db_change().unwrap(), fixed_db_change());
    event.set_upload(&fixed_upload()).unwrap();
    assert_eq!(event.upload().unwrap(), fixed_upload());
    assert_eq!(event.db_change().unwrap_err().kind(), "wrong_type");
}

#[test]
fn named_encoding_tolerates_unknown_and_missing_fields() {
    // A newer writer added a field; an older reader must still decode.
    #[derive(serde::Serialize)]
    struct NewerUpload<'a> {
        bucket: &'a str,
        key: &'a str,
        event_name: &'a str,
        added_later: u32,
    }
    let bytes = to_msgpack(&NewerUpload { bucket: "b", key: "k", event_name: "s3:X", added_later: 1 }).unwrap();
    let upload: Upload = from_msgpack(&bytes).unwrap();
    assert_eq!((upload.bucket.as_str(), upload.key.as_str(), upload.size), ("b", "k", None));
}

#[test]
fn invalid_msgpack_is_a_precise_error() {
    let err = from_msgpack::<DbChange>(&[0xc1]).unwrap_err();
    assert!(matches!(&err, DecodeError::MessagePack { what: "DbChange", .. }), "{err:?}");
    assert_eq!(err.kind(), "msgpack");
    // Truncated input.
    let bytes = to_msgpack(&fixed_upload()).unwrap();
    assert_eq!(from_msgpack::<Upload>(&bytes[..bytes.len() - 3]).unwrap_err().kind(), "msgpack");
    // Trailing garbage.
    let mut bytes = bytes;
    bytes.push(0x00);
    let err = from_msgpack::<Upload>(&bytes).unwrap_err();
    assert!(err.to_string().contains("1 trailing bytes"), "{err}");
    // A forged huge length must fail, not allocate.
    assert_eq!(from_msgpack::<Vec<u8>>(&[0xc6, 0xff, 0xff, 0xff, 0xff, 0x01]).unwrap_err().kind(), "msgpack");
    // An event in MessagePack is validated like one off the wire.
    let mut event = fixed_event();
    event.specversion = "0.3".into();
    let err = event_from_msgpack(&to_msgpack(&event).unwrap()).unwrap_err();
    assert_eq!(err.kind(), "specversion");
    // Data of a typed event that is not MessagePack.
    let mut event = Event::new("1", "s", weir_schemas::DB_CHANGE_TYPE);
    event.datacontenttype = Some(weir_schemas::DB_CHANGE_CONTENT_TYPE.into());
    event.data = Some(b"{\"op\":\"c\"}".to_vec());
    assert_eq!(event.db_change().unwrap_err().kind(), "msgpack");
}
