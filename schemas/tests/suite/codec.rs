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

const DB_CHANGE_GOLDEN: &str = concat!(
    "86a26f70a6757064617465a66265666f726582a2696407a371747901a5616674",
    "657282a2696407a371747902a6736f7572636587a9636f6e6e6563746f72aa70",
    "6f737467726573716ca46e616d65a473686f70a26462a673686f706462a67363",
    "68656d61a67075626c6963a57461626c65a66f7264657273a574735f6d73cf00",
    "00018f34069e7ba5657874726181a36c736ece016e9058a574735f6d73cf0000",
    "018f34069fc8a36b657981a2696407",
);
const UPLOAD_GOLDEN: &str = concat!(
    "8aa66275636b6574a56d65646961a36b6579b070686f746f732fc3a974c3a92e",
    "6a7067a473697a65cd0400a465746167a86434316438636439aa6576656e745f",
    "6e616d65b473333a4f626a656374437265617465643a507574aa6576656e745f",
    "74696d65b8323032342d30352d30315431323a30303a30302e3030305aac636f",
    "6e74656e745f74797065c0aa76657273696f6e5f6964c0a973657175656e6365",
    "72b2303035354145443644434439303238314535a6726567696f6ea965752d77",
    "6573742d31",
);
const EVENT_GOLDEN: &str = concat!(
    "87a26964a56576742d31a6736f75726365ab776569723a2f2f74657374a47479",
    "7065a174ab7370656376657273696f6ea3312e30a474696d65b4323032342d30",
    "352d30315431323a30303a30305aa464617461c402deadaa657874656e73696f",
    "6e7381a877656972686f7073a132",
);

#[test]
fn golden_db_change() {
    let bytes = to_msgpack(&fixed_db_change()).unwrap();
    assert_eq!(hex::encode(&bytes), DB_CHANGE_GOLDEN);
    assert_eq!(
        from_msgpack::<DbChange>(&hex::decode(DB_CHANGE_GOLDEN).unwrap()).unwrap(),
        fixed_db_change()
    );
}

#[test]
fn golden_upload() {
    let bytes = to_msgpack(&fixed_upload()).unwrap();
    assert_eq!(hex::encode(&bytes), UPLOAD_GOLDEN);
    assert_eq!(
        from_msgpack::<Upload>(&hex::decode(UPLOAD_GOLDEN).unwrap()).unwrap(),
        fixed_upload()
    );
}

#[test]
fn golden_event() {
    let bytes = event_to_msgpack(&fixed_event()).unwrap();
    assert_eq!(hex::encode(&bytes), EVENT_GOLDEN);
    assert_eq!(
        event_from_msgpack(&hex::decode(EVENT_GOLDEN).unwrap()).unwrap(),
        fixed_event()
    );
}

#[test]
fn event_round_trips_through_msgpack() {
    for event in [sample_event(), Event::new("1", "s", "t")] {
        assert_eq!(
            event_from_msgpack(&event_to_msgpack(&event).unwrap()).unwrap(),
            event
        );
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
    let bytes = to_msgpack(&NewerUpload {
        bucket: "b",
        key: "k",
        event_name: "s3:X",
        added_later: 1,
    })
    .unwrap();
    let upload: Upload = from_msgpack(&bytes).unwrap();
    assert_eq!(
        (upload.bucket.as_str(), upload.key.as_str(), upload.size),
        ("b", "k", None)
    );
}

#[test]
fn invalid_msgpack_is_a_precise_error() {
    let err = from_msgpack::<DbChange>(&[0xc1]).unwrap_err();
    assert!(
        matches!(
            &err,
            DecodeError::MessagePack {
                what: "DbChange",
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(err.kind(), "msgpack");
    // Truncated input.
    let bytes = to_msgpack(&fixed_upload()).unwrap();
    assert_eq!(
        from_msgpack::<Upload>(&bytes[..bytes.len() - 3])
            .unwrap_err()
            .kind(),
        "msgpack"
    );
    // Trailing garbage.
    let mut bytes = bytes;
    bytes.push(0x00);
    let err = from_msgpack::<Upload>(&bytes).unwrap_err();
    assert!(err.to_string().contains("1 trailing bytes"), "{err}");
    // A forged huge length must fail, not allocate.
    assert_eq!(
        from_msgpack::<Vec<u8>>(&[0xc6, 0xff, 0xff, 0xff, 0xff, 0x01])
            .unwrap_err()
            .kind(),
        "msgpack"
    );
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
