use weir_schemas::{
    decode, derived_id, detect, rfc3339_from_unix_millis, Detected, Format, WireMessage,
    CUSTOM_TYPE,
};

use crate::{decode_one, fixture, headers, message, DEFAULT_SOURCE, ORIGIN};

#[test]
fn unrecognised_input_is_a_custom_event_with_a_derived_id() {
    let headers = headers(&[("content-type", "text/csv")]);
    for body in [
        &b"a,b,c\n1,2,3"[..],
        b"{\"op\":\"add\"}",
        b"[1,2]",
        &[0xff, 0x00, 0x13],
    ] {
        let msg = message(&headers, Some(body), None);
        let event = decode_one(&msg, Format::Auto);
        assert_eq!(event, decode_one(&msg, Format::Raw));
        assert_eq!(event.ty, CUSTOM_TYPE);
        assert_eq!(event.id, derived_id(&[ORIGIN, "0"]));
        assert_eq!(event.source, DEFAULT_SOURCE);
        assert_eq!(event.datacontenttype.as_deref(), Some("text/csv"));
        assert_eq!(event.data.as_deref(), Some(body));
    }
}

#[test]
fn raw_never_fails() {
    let bad_ce = headers(&[("ce-id", "1"), ("ce-specversion", "0.3")]);
    let bad_structured = &b"{\"specversion\":5}"[..];
    for (headers, payload) in [
        (&bad_ce[..], None),
        (&[][..], Some(bad_structured)),
        (&[][..], Some(&b""[..])),
    ] {
        let msg = message(headers, payload, None);
        // What Auto refuses (or takes as custom), Raw always wraps.
        assert_eq!(
            decode(&msg, Format::Auto).is_err(),
            payload != Some(&b""[..])
        );
        let event = decode_one(&msg, Format::Raw);
        assert_eq!(event.ty, CUSTOM_TYPE);
        // An empty body is no data, as in binary mode.
        assert_eq!(event.data.as_deref(), payload.filter(|p| !p.is_empty()));
    }
}

#[test]
fn derived_ids_are_stable_and_differ_by_origin() {
    let body = b"payload";
    let decode_at = |origin: &str| {
        let msg: WireMessage<'_> = WireMessage {
            headers: &[],
            payload: Some(body),
            key: None,
            origin,
            default_source: DEFAULT_SOURCE,
        };
        decode(&msg, Format::Auto).unwrap().remove(0).id
    };
    let first = decode_at("kafka://orders/0/42");
    assert_eq!(first, decode_at("kafka://orders/0/42"));
    assert_eq!(first, derived_id(&["kafka://orders/0/42", "0"]));
    assert_ne!(first, decode_at("kafka://orders/0/43"));
    assert_ne!(first, decode_at("jetstream://ORDERS/42"));
    assert_eq!(first.len(), 32);
    assert_ne!(derived_id(&["ab", "c"]), derived_id(&["a", "bc"]));
    // S3 record ids are also stable per origin.
    let body = fixture("s3_aws_two_records.json");
    let ids = |origin: &str| {
        let msg: WireMessage<'_> = WireMessage {
            headers: &[],
            payload: Some(&body),
            key: None,
            origin,
            default_source: DEFAULT_SOURCE,
        };
        decode(&msg, Format::Auto)
            .unwrap()
            .into_iter()
            .map(|e| e.id)
            .collect::<Vec<_>>()
    };
    assert_eq!(ids("memory://a/1"), ids("memory://a/1"));
    assert_ne!(ids("memory://a/1"), ids("memory://a/2"));
}

#[test]
fn detection_order() {
    let structured = br#"{"specversion":"1.0","id":"1","source":"s","type":"t"}"#;
    let ce_json = headers(&[
        ("Content-Type", "application/cloudevents+json"),
        ("ce-id", "x"),
    ]);
    let binary = headers(&[("ce_id", "1")]);
    let s3 = fixture("s3_minio_put.json");
    let dbz = fixture("debezium_pg_wrapped.json");
    type Case<'a> = (&'a [(String, String)], Option<&'a [u8]>, Detected);
    let cases: [Case<'_>; 8] = [
        (&ce_json, Some(structured), Detected::Structured),
        (&binary, Some(structured), Detected::Binary),
        (&binary, None, Detected::Binary),
        (&[], None, Detected::Debezium),
        (&[], Some(structured), Detected::Structured),
        (&[], Some(&dbz), Detected::Debezium),
        (&[], Some(&s3), Detected::S3),
        (&[], Some(b"{\"Records\":[{\"x\":1}]}"), Detected::Raw),
    ];
    for (headers, payload, expected) in cases {
        assert_eq!(
            detect(&message(headers, payload, None)),
            expected,
            "{payload:?}"
        );
    }
}

#[test]
fn structured_content_type_wins_over_repeated_ce_headers() {
    let body = br#"{"specversion":"1.0","id":"from-body","source":"s","type":"t"}"#;
    let headers = headers(&[
        ("content-type", "application/cloudevents+json"),
        ("ce-id", "from-header"),
    ]);
    assert_eq!(
        decode_one(&message(&headers, Some(body), None), Format::Auto).id,
        "from-body"
    );
}

#[test]
fn unix_millis_format_as_rfc3339_utc() {
    assert_eq!(
        rfc3339_from_unix_millis(0).as_deref(),
        Some("1970-01-01T00:00:00.000Z")
    );
    assert_eq!(
        rfc3339_from_unix_millis(1714564800123).as_deref(),
        Some("2024-05-01T12:00:00.123Z")
    );
    assert_eq!(
        rfc3339_from_unix_millis(-1).as_deref(),
        Some("1969-12-31T23:59:59.999Z")
    );
    assert_eq!(rfc3339_from_unix_millis(i64::MAX), None);
}

#[test]
fn default_source_is_a_valid_uri_for_any_topic() {
    let source = weir_schemas::wire::default_source("nats", "orders.eu west/>");
    assert_eq!(source, "weir://nats/orders.eu%20west%2F%3E");
    let body = br#"{"op":"c","after":{"id":1},"source":{}}"#;
    let msg: WireMessage<'_> = WireMessage {
        headers: &[],
        payload: Some(body),
        key: None,
        origin: ORIGIN,
        default_source: &source,
    };
    assert_eq!(decode(&msg, Format::Auto).unwrap()[0].source, source);
    let bad = WireMessage {
        default_source: "weir://nats/has space",
        ..msg
    };
    assert_eq!(
        decode(&bad, Format::Auto).unwrap_err().kind(),
        "invalid_attribute"
    );
}
