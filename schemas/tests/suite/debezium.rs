use serde_json::json;
use weir_schemas::{derived_id, DbOp, DecodeError, Format, DB_CHANGE_CONTENT_TYPE, DB_CHANGE_TYPE};

use crate::{decode_err, decode_one, fixture, message, DEFAULT_SOURCE, ORIGIN};

fn envelope(op: &str) -> serde_json::Value {
    json!({
        "before": if op == "c" || op == "r" { serde_json::Value::Null } else { json!({"id": 7, "name": "old"}) },
        "after": if op == "d" || op == "t" { serde_json::Value::Null } else { json!({"id": 7, "name": "new"}) },
        "source": {"connector": "postgresql", "name": "shop", "db": "shopdb", "schema": "public",
                   "table": "orders", "ts_ms": 1714564800123_i64, "lsn": 123, "snapshot": "false"},
        "op": op,
        "ts_ms": 1714564800999_i64
    })
}

#[test]
fn every_op_with_and_without_wrapper() {
    for (code, op) in [
        ("c", DbOp::Create),
        ("u", DbOp::Update),
        ("d", DbOp::Delete),
        ("r", DbOp::Read),
        ("t", DbOp::Truncate),
    ] {
        let plain = envelope(code);
        let wrapped = json!({"schema": {"type": "struct"}, "payload": plain.clone()});
        for body in [plain, wrapped] {
            let body = serde_json::to_vec(&body).unwrap();
            let msg = message(&[], Some(&body), Some(br#"{"id":7}"#));
            let event = decode_one(&msg, Format::Auto);
            assert_eq!(event, decode_one(&msg, Format::Debezium));
            assert_eq!(event.ty, DB_CHANGE_TYPE);
            assert_eq!(
                event.datacontenttype.as_deref(),
                Some(DB_CHANGE_CONTENT_TYPE)
            );
            assert_eq!(event.id, derived_id(&[ORIGIN, "0"]));
            assert_eq!(event.source, "weir://debezium/shop");
            assert_eq!(event.subject.as_deref(), Some("shopdb.public.orders"));
            assert_eq!(event.time.as_deref(), Some("2024-05-01T12:00:00.123Z"));
            let change = event.db_change().unwrap();
            assert_eq!(change.op, op);
            assert_eq!(change.op.code(), Some(code));
            assert_eq!(change.key, Some(json!({"id": 7})));
            assert_eq!(change.ts_ms, Some(1714564800999));
            assert_eq!(change.source.ts_ms, Some(1714564800123));
            assert_eq!(change.source.extra.get("lsn"), Some(&json!(123)));
            assert_eq!(change.source.extra.get("snapshot"), Some(&json!("false")));
            assert_eq!(
                change.before.is_some(),
                matches!(op, DbOp::Update | DbOp::Delete | DbOp::Truncate)
            );
            assert_eq!(
                change.after.is_some(),
                matches!(op, DbOp::Create | DbOp::Update | DbOp::Read)
            );
        }
    }
}

#[test]
fn postgres_fixture_with_wrapped_key() {
    let body = fixture("debezium_pg_wrapped.json");
    let key = fixture("debezium_key_wrapped.json");
    let event = decode_one(&message(&[], Some(&body), Some(&key)), Format::Auto);
    let change = event.db_change().unwrap();
    assert_eq!(change.op, DbOp::Update);
    assert_eq!(change.key, Some(json!({"id": 1004})));
    assert_eq!(change.after.unwrap()["first_name"], "Anne Marie");
    assert_eq!(change.source.connector.as_deref(), Some("postgresql"));
    assert_eq!(change.source.extra.get("txId"), Some(&json!(555)));
    assert_eq!(
        change.source.extra.get("xmin"),
        Some(&serde_json::Value::Null)
    );
    assert_eq!(
        event.subject.as_deref(),
        Some("inventorydb.public.customers")
    );
    assert_eq!(event.source, "weir://debezium/inventory");
}

#[test]
fn mysql_fixture_without_wrapper_has_no_schema_part() {
    let body = fixture("debezium_mysql_plain.json");
    let event = decode_one(&message(&[], Some(&body), Some(b"1005")), Format::Auto);
    assert_eq!(event.subject.as_deref(), Some("inventory.customers"));
    assert_eq!(event.time.as_deref(), Some("2024-05-01T12:00:00.000Z"));
    let change = event.db_change().unwrap();
    assert_eq!(change.op, DbOp::Create);
    assert_eq!(change.before, None);
    assert_eq!(change.key, Some(json!(1005)));
    assert_eq!(
        change.source.extra.get("file"),
        Some(&json!("mysql-bin.000003"))
    );
}

#[test]
fn source_falls_back_to_connector_then_default_and_time_to_envelope_ts() {
    let body = br#"{"op":"c","after":{"id":1},"source":{"connector":"mysql"},"ts_ms":0}"#;
    let event = decode_one(&message(&[], Some(body), None), Format::Auto);
    assert_eq!(event.source, "weir://debezium/mysql");
    assert_eq!(event.subject, None);
    assert_eq!(event.time.as_deref(), Some("1970-01-01T00:00:00.000Z"));
    let body = br#"{"op":"c","after":{"id":1},"source":{}}"#;
    let event = decode_one(&message(&[], Some(body), None), Format::Auto);
    assert_eq!(event.source, DEFAULT_SOURCE);
    assert_eq!(event.time, None);
}

#[test]
fn tombstones_from_null_value_literal_null_and_null_payload() {
    let key = br#"{"schema":{"type":"struct"},"payload":{"id":7}}"#;
    for payload in [
        None,
        Some(&b"null"[..]),
        Some(&b" null \n"[..]),
        Some(&br#"{"schema":null,"payload":null}"#[..]),
    ] {
        let msg = message(&[], payload, Some(key));
        let event = decode_one(&msg, Format::Auto);
        assert_eq!(event, decode_one(&msg, Format::Debezium), "{payload:?}");
        assert_eq!(event.ty, DB_CHANGE_TYPE);
        assert_eq!(event.source, DEFAULT_SOURCE);
        assert_eq!(event.subject, None);
        let change = event.db_change().unwrap();
        assert_eq!(change.op, DbOp::Tombstone);
        assert_eq!(change.key, Some(json!({"id": 7})));
        assert_eq!(change.before, None);
        assert_eq!(change.after, None);
    }
}

#[test]
fn missing_and_unknown_op_are_precise_errors() {
    let err = decode_err(
        &message(
            &[],
            Some(br#"{"before":null,"after":{"id":1},"source":{}}"#),
            None,
        ),
        Format::Debezium,
    );
    assert_eq!(
        err,
        DecodeError::Debezium {
            reason: "missing `op`".into()
        }
    );
    assert_eq!(err.kind(), "debezium");
    let err = decode_err(
        &message(&[], Some(br#"{"op":"m","source":{"db":"x"}}"#), None),
        Format::Auto,
    );
    assert!(
        matches!(&err, DecodeError::Debezium { reason } if reason.contains("unknown op \"m\"")),
        "{err:?}"
    );
    let err = decode_err(
        &message(
            &[],
            Some(br#"{"payload":{"op":"x","source":{}},"schema":{}}"#),
            None,
        ),
        Format::Auto,
    );
    assert_eq!(err.kind(), "debezium");
    let err = decode_err(
        &message(&[], Some(br#"{"op":"c","source":{"db":5}}"#), None),
        Format::Auto,
    );
    assert!(
        err.to_string().contains("`source.db` must be a string"),
        "{err}"
    );
    let err = decode_err(
        &message(&[], Some(br#"{"op":"c","source":{},"ts_ms":"soon"}"#), None),
        Format::Debezium,
    );
    assert!(
        err.to_string().contains("`ts_ms` must be an integer"),
        "{err}"
    );
    let err = decode_err(&message(&[], Some(br#"[1,2]"#), None), Format::Debezium);
    assert!(err.to_string().contains("must be a JSON object"), "{err}");
    let err = decode_err(&message(&[], Some(b"{oops"), None), Format::Debezium);
    assert_eq!(err.kind(), "json");
    let err = decode_err(&message(&[], None, Some(&[0xff, 0xfe])), Format::Debezium);
    assert_eq!(err.kind(), "debezium");
}

#[test]
fn wrong_type_accessor_is_refused() {
    let body = fixture("debezium_mysql_plain.json");
    let event = decode_one(&message(&[], Some(&body), None), Format::Auto);
    let err = event.upload().unwrap_err();
    assert_eq!(err.kind(), "wrong_type");
}
