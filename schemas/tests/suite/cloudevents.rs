use weir_schemas::cloudevents::{decode_binary, decode_structured};
use weir_schemas::{encode_binary, encode_structured, DecodeError, Event, Format, HeaderStyle};

use crate::{decode_err, decode_one, headers, message, sample_event};

/// [`encode_binary`]'s headers as owned pairs.
fn encoded(event: &Event, style: HeaderStyle) -> (Vec<(String, String)>, Vec<u8>) {
    let (headers, body) = encode_binary(event, style);
    let headers = headers
        .into_iter()
        .map(|(name, value)| (name.into_owned(), value))
        .collect();
    (headers, body)
}

fn binary_round_trip(event: &Event, style: HeaderStyle) -> Event {
    let (headers, body) = encoded(event, style);
    let msg = message(&headers, Some(&body), None);
    let auto = decode_one(&msg, Format::Auto);
    let forced = decode_one(&msg, Format::CloudEvents);
    assert_eq!(auto, forced);
    auto
}

fn structured_round_trip(event: &Event) -> Event {
    let body = encode_structured(event);
    let headers = headers(&[(
        "content-type",
        "application/cloudevents+json; charset=UTF-8",
    )]);
    let with_header = decode_one(&message(&headers, Some(&body), None), Format::Auto);
    // Without the content-type header the `specversion` member is what identifies it.
    let sniffed = decode_one(&message(&[], Some(&body), None), Format::Auto);
    assert_eq!(with_header, sniffed);
    with_header
}

/// Events whose values need care: non-ASCII, spaces, quotes and percent signs in headers,
/// binary data, no data, no optional attributes.
fn tricky_events() -> Vec<Event> {
    let mut awkward = Event::new("id with space", "/relative/source", "t\"quoted\"%25");
    awkward.subject = Some("été / 100% \"sure\"".into());
    awkward
        .extensions
        .insert("comment".into(), "naïve ☃\ttab".into());
    awkward.datacontenttype = Some("application/octet-stream".into());
    awkward.data = Some(vec![0, 159, 146, 150, 255]);

    let minimal = Event::new("1", "urn:x", "t");

    let mut text = Event::new("2", "https://example.com/a?b=c#d", "t");
    text.datacontenttype = Some("text/plain; charset=utf-8".into());
    text.data = Some(b"hello world".to_vec());

    let mut no_ct_json = Event::new("3", "s", "t");
    no_ct_json.data = Some(b"[1,2,{\"a\":null}]".to_vec());

    let mut json_with_space = Event::new("4", "s", "t");
    json_with_space.datacontenttype = Some("application/vnd.api+json".into());
    json_with_space.data = Some(b" {\"a\": 1}\n".to_vec());

    let mut invalid_json = Event::new("5", "s", "t");
    invalid_json.datacontenttype = Some("application/json".into());
    invalid_json.data = Some(b"{not json".to_vec());

    vec![
        sample_event(),
        awkward,
        minimal,
        text,
        no_ct_json,
        json_with_space,
        invalid_json,
    ]
}

#[test]
fn binary_round_trip_is_exact_for_both_header_styles() {
    for event in tricky_events() {
        event.validate().unwrap();
        for style in [HeaderStyle::Dash, HeaderStyle::Underscore] {
            assert_eq!(binary_round_trip(&event, style), event, "{style:?}");
        }
    }
}

#[test]
fn structured_round_trip_is_exact() {
    for event in tricky_events() {
        assert_eq!(structured_round_trip(&event), event);
    }
}

#[test]
fn structured_embeds_json_data_and_base64_otherwise() {
    let json: serde_json::Value =
        serde_json::from_slice(&encode_structured(&sample_event())).unwrap();
    assert_eq!(json["data"], serde_json::json!({"order": 42, "total": 9.5}));
    assert!(json.get("data_base64").is_none());
    assert_eq!(json["weirhops"], "1");

    let mut binary = Event::new("1", "s", "t");
    binary.datacontenttype = Some("image/png".into());
    binary.data = Some(vec![0x89, b'P', b'N', b'G']);
    let json: serde_json::Value = serde_json::from_slice(&encode_structured(&binary)).unwrap();
    assert_eq!(json["data_base64"], "iVBORw==");
    assert!(json.get("data").is_none());
}

#[test]
fn structured_encoding_is_deterministic_and_ordered() {
    let text = String::from_utf8(encode_structured(&sample_event())).unwrap();
    assert_eq!(
        text,
        r#"{"specversion":"1.0","id":"evt-1","source":"weir://test/orders","type":"com.example.order.created","subject":"orders/42","time":"2024-05-01T12:00:00.123Z","datacontenttype":"application/json","dataschema":"https://example.com/schemas/order.json","traceparent":"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01","weirhops":"1","data":{"order":42,"total":9.5}}"#
    );
}

#[test]
fn golden_binary_headers_for_a_fixed_event() {
    let mut event = sample_event();
    event.subject = Some("été 100%".into());
    let (dash, body) = encoded(&event, HeaderStyle::Dash);
    assert_eq!(body, br#"{"order":42,"total":9.5}"#);
    assert_eq!(
        dash,
        headers(&[
            ("ce-specversion", "1.0"),
            ("ce-id", "evt-1"),
            ("ce-source", "weir://test/orders"),
            ("ce-type", "com.example.order.created"),
            ("ce-subject", "%C3%A9t%C3%A9%20100%25"),
            ("ce-time", "2024-05-01T12:00:00.123Z"),
            ("ce-dataschema", "https://example.com/schemas/order.json"),
            ("content-type", "application/json"),
            (
                "ce-traceparent",
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
            ),
            ("ce-weirhops", "1"),
        ])
    );
    let (underscore, _) = encoded(&event, HeaderStyle::Underscore);
    assert_eq!(
        underscore,
        headers(&[
            ("ce_specversion", "1.0"),
            ("ce_id", "evt-1"),
            ("ce_source", "weir://test/orders"),
            ("ce_type", "com.example.order.created"),
            ("ce_subject", "été 100%"),
            ("ce_time", "2024-05-01T12:00:00.123Z"),
            ("ce_dataschema", "https://example.com/schemas/order.json"),
            ("content-type", "application/json"),
            (
                "ce_traceparent",
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
            ),
            ("ce_weirhops", "1"),
        ])
    );
}

#[test]
fn binary_header_names_are_case_insensitive() {
    let headers = headers(&[
        ("CE-SpecVersion", "1.0"),
        ("Ce-Id", "abc"),
        ("CE-SOURCE", "weir://x"),
        ("ce-TYPE", "t"),
        ("Content-Type", "text/plain"),
        ("CE-MyExt", "v"),
    ]);
    let event = decode_one(&message(&headers, Some(b"hi"), None), Format::Auto);
    assert_eq!(event.id, "abc");
    assert_eq!(event.ty, "t");
    assert_eq!(event.datacontenttype.as_deref(), Some("text/plain"));
    assert_eq!(event.extension("myext"), Some("v"));
    assert_eq!(event.data.as_deref(), Some(&b"hi"[..]));
}

#[test]
fn binary_accepts_ce_datacontenttype_and_null_body() {
    let headers = headers(&[
        ("ce_specversion", "1.0"),
        ("ce_id", "abc"),
        ("ce_source", "weir://x"),
        ("ce_type", "t"),
        ("ce_datacontenttype", "application/json"),
    ]);
    let event = decode_binary(&headers, None).unwrap();
    assert_eq!(event.datacontenttype.as_deref(), Some("application/json"));
    assert_eq!(event.data, None);
}

#[test]
fn kafka_style_values_are_not_percent_decoded() {
    let headers = headers(&[
        ("ce_specversion", "1.0"),
        ("ce_id", "a%20b"),
        ("ce_source", "weir://x"),
        ("ce_type", "t"),
    ]);
    assert_eq!(decode_binary(&headers, Some(b"")).unwrap().id, "a%20b");
}

#[test]
fn structured_converts_non_string_extensions_and_ignores_nulls() {
    let body = br#"{"specversion":"1.0","id":"1","source":"s","type":"t","count":42,"ratio":1.5,"flag":true,"gone":null,"subject":null}"#;
    let event = decode_structured(body).unwrap();
    assert_eq!(event.extension("count"), Some("42"));
    assert_eq!(event.extension("ratio"), Some("1.5"));
    assert_eq!(event.extension("flag"), Some("true"));
    assert_eq!(event.extension("gone"), None);
    assert_eq!(event.subject, None);
}

#[test]
fn structured_string_data_with_text_content_type_is_the_text() {
    let body = br#"{"specversion":"1.0","id":"1","source":"s","type":"t","datacontenttype":"text/plain","data":"hello"}"#;
    assert_eq!(
        decode_structured(body).unwrap().data.as_deref(),
        Some(&b"hello"[..])
    );
    let body = br#"{"specversion":"1.0","id":"1","source":"s","type":"t","data":"hello"}"#;
    assert_eq!(
        decode_structured(body).unwrap().data.as_deref(),
        Some(&b"\"hello\""[..])
    );
}

// ---- every DecodeError variant from a real malformed input ----

fn structured_err(body: &str) -> DecodeError {
    decode_err(
        &message(&[], Some(body.as_bytes()), None),
        Format::CloudEvents,
    )
}

#[test]
fn bad_json_reports_line_and_column() {
    let err = structured_err("{\n  \"specversion\": \"1.0\",\n  \"id\": }");
    match &err {
        DecodeError::Json { line, column, .. } => assert_eq!((*line, *column), (3, 9)),
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(err.kind(), "json");
    assert!(err.to_string().contains("line 3 column 9"), "{err}");
}

#[test]
fn specversion_0_3_is_rejected_by_name() {
    let err = structured_err(r#"{"specversion":"0.3","id":"1","source":"s","type":"t"}"#);
    assert_eq!(
        err,
        DecodeError::SpecVersion {
            found: "0.3".into()
        }
    );
    assert_eq!(err.kind(), "specversion");
    assert!(err.to_string().contains("\"0.3\""));
    let headers = headers(&[
        ("ce-specversion", "0.3"),
        ("ce-id", "1"),
        ("ce-source", "s"),
        ("ce-type", "t"),
    ]);
    let err = decode_err(&message(&headers, None, None), Format::Auto);
    assert_eq!(
        err,
        DecodeError::SpecVersion {
            found: "0.3".into()
        }
    );
}

#[test]
fn missing_required_attributes_are_named() {
    for (body, attribute) in [
        (r#"{"specversion":"1.0","source":"s","type":"t"}"#, "id"),
        (r#"{"specversion":"1.0","id":"1","type":"t"}"#, "source"),
        (r#"{"specversion":"1.0","id":"1","source":"s"}"#, "type"),
        (
            r#"{"specversion":"1.0","id":null,"source":"s","type":"t"}"#,
            "id",
        ),
        (r#"{"id":"1","source":"s","type":"t"}"#, "specversion"),
    ] {
        let err = structured_err(body);
        assert_eq!(err, DecodeError::MissingAttribute { attribute }, "{body}");
        assert_eq!(err.kind(), "missing_attribute");
    }
    let headers = headers(&[("ce-specversion", "1.0"), ("ce-id", "1"), ("ce-type", "t")]);
    assert_eq!(
        decode_err(&message(&headers, None, None), Format::Auto),
        DecodeError::MissingAttribute {
            attribute: "source"
        }
    );
}

#[test]
fn invalid_attribute_values_say_which_and_why() {
    for (body, attribute, why) in [
        (
            r#"{"specversion":"1.0","id":"","source":"s","type":"t"}"#,
            "id",
            "non-empty",
        ),
        (
            r#"{"specversion":"1.0","id":"1","source":"s","type":"t","time":"2024-13-01T00:00:00Z"}"#,
            "time",
            "RFC 3339",
        ),
        (
            r#"{"specversion":"1.0","id":"1","source":"s","type":"t","time":"yesterday"}"#,
            "time",
            "RFC 3339",
        ),
        (
            r#"{"specversion":"1.0","id":"1","source":"not a uri","type":"t"}"#,
            "source",
            "URI-reference",
        ),
        (
            r#"{"specversion":"1.0","id":"1","source":"a%zz","type":"t"}"#,
            "source",
            "hex",
        ),
        (
            r#"{"specversion":"1.0","id":"1","source":"s","type":"t","dataschema":"relative/path"}"#,
            "dataschema",
            "absolute",
        ),
        (
            r#"{"specversion":"1.0","id":1,"source":"s","type":"t"}"#,
            "id",
            "JSON string",
        ),
        (
            r#"{"specversion":"1.0","id":"1","source":"s","type":"t","data":1,"data_base64":"AA=="}"#,
            "data",
            "both",
        ),
        (
            r#"{"specversion":"1.0","id":"1","source":"s","type":"t","obj":{"a":1}}"#,
            "obj",
            "string, number or boolean",
        ),
    ] {
        let err = structured_err(body);
        match &err {
            DecodeError::InvalidAttribute {
                attribute: a,
                reason,
            } => {
                assert_eq!(a, attribute, "{body}");
                assert!(err.to_string().contains(why), "{body}: {reason}");
            }
            other => panic!("{body}: unexpected {other:?}"),
        }
        assert_eq!(err.kind(), "invalid_attribute");
    }
}

#[test]
fn valid_times_with_offsets_and_fractions_are_accepted() {
    for time in [
        "2024-05-01T12:00:00Z",
        "2024-05-01T12:00:00.123456789+02:00",
        "1985-04-12t23:20:50.52z",
    ] {
        let body =
            format!(r#"{{"specversion":"1.0","id":"1","source":"s","type":"t","time":"{time}"}}"#);
        assert_eq!(
            decode_structured(body.as_bytes()).unwrap().time.as_deref(),
            Some(time)
        );
    }
}

#[test]
fn bad_extension_names_are_rejected() {
    for name in ["MyExt", "my-ext", "ext_1", "Ünï"] {
        let body =
            format!(r#"{{"specversion":"1.0","id":"1","source":"s","type":"t","{name}":"v"}}"#);
        let err = structured_err(&body);
        assert!(
            matches!(err, DecodeError::InvalidExtensionName { .. }),
            "{name}: {err:?}"
        );
        assert_eq!(err.kind(), "extension_name");
    }
    let headers = headers(&[
        ("ce-specversion", "1.0"),
        ("ce-id", "1"),
        ("ce-source", "s"),
        ("ce-type", "t"),
        ("ce-my-ext", "v"),
    ]);
    let err = decode_err(&message(&headers, None, None), Format::Auto);
    assert_eq!(
        err,
        DecodeError::InvalidExtensionName {
            name: "my-ext".into(),
            reason: "must consist of lowercase ASCII letters a-z and digits 0-9 only"
        }
    );
    let headers = crate::headers(&[
        ("ce-specversion", "1.0"),
        ("ce-id", "1"),
        ("ce-source", "s"),
        ("ce-type", "t"),
        ("ce-data", "v"),
    ]);
    let err = decode_err(&message(&headers, None, None), Format::Auto);
    assert!(
        matches!(&err, DecodeError::InvalidExtensionName { name, .. } if name == "data"),
        "{err:?}"
    );
    // Longer than the 20 characters the spec recommends is still valid (it is a SHOULD).
    let body = r#"{"specversion":"1.0","id":"1","source":"s","type":"t","averyveryverylongextensionname":"v"}"#;
    assert!(decode_structured(body.as_bytes()).is_ok());
}

#[test]
fn bad_base64_is_rejected() {
    let err = structured_err(
        r#"{"specversion":"1.0","id":"1","source":"s","type":"t","data_base64":"not*base64"}"#,
    );
    assert!(matches!(err, DecodeError::InvalidBase64 { .. }), "{err:?}");
    assert_eq!(err.kind(), "base64");
    // Both padded and unpadded base64 decode.
    for text in ["aGk=", "aGk"] {
        let body = format!(
            r#"{{"specversion":"1.0","id":"1","source":"s","type":"t","data_base64":"{text}"}}"#
        );
        assert_eq!(
            decode_structured(body.as_bytes()).unwrap().data.as_deref(),
            Some(&b"hi"[..])
        );
    }
}

#[test]
fn percent_encoded_non_utf8_header_is_invalid() {
    let headers = headers(&[
        ("ce-specversion", "1.0"),
        ("ce-id", "%FF"),
        ("ce-source", "s"),
        ("ce-type", "t"),
    ]);
    let err = decode_err(&message(&headers, None, None), Format::Auto);
    assert!(
        matches!(&err, DecodeError::InvalidAttribute { attribute, .. } if attribute == "id"),
        "{err:?}"
    );
}

#[test]
fn forced_cloudevents_on_non_event_fails_precisely() {
    let err = decode_err(
        &message(&[], Some(b"plain text"), None),
        Format::CloudEvents,
    );
    assert_eq!(err.kind(), "json");
    let err = decode_err(&message(&[], None, None), Format::CloudEvents);
    assert_eq!(
        err,
        DecodeError::MissingAttribute {
            attribute: "specversion"
        }
    );
}
