use weir_schemas::s3::{decode_object_key, normalise_event_name};
use weir_schemas::{derived_id, DecodeError, Format, Upload, UPLOAD_CONTENT_TYPE, UPLOAD_TYPE};

use crate::{decode_err, fixture, message, ORIGIN};

#[test]
fn aws_notification_with_two_records() {
    let body = fixture("s3_aws_two_records.json");
    let msg = message(&[], Some(&body), None);
    let events = weir_schemas::decode(&msg, Format::Auto).unwrap();
    assert_eq!(events, weir_schemas::decode(&msg, Format::S3).unwrap());
    assert_eq!(events.len(), 2);
    let first = events[0].upload().unwrap();
    assert_eq!(
        first,
        Upload {
            bucket: "media".into(),
            key: "photos/summer 2024/été.jpg".into(),
            size: Some(1024),
            etag: Some("d41d8cd98f00b204e9800998ecf8427e".into()),
            event_name: "s3:ObjectCreated:Put".into(),
            event_time: Some("2024-05-01T12:00:00.000Z".into()),
            content_type: None,
            version_id: Some("096fKKXTRTtl3on89fVO.nfljtsv6qko".into()),
            sequencer: Some("0055AED6DCD90281E5".into()),
            region: Some("eu-west-1".into()),
        }
    );
    let second = events[1].upload().unwrap();
    assert_eq!(second.event_name, "s3:ObjectRemoved:Delete");
    assert_eq!(second.key, "old/report.pdf");
    assert_eq!(second.size, None);
    for (index, event) in events.iter().enumerate() {
        assert_eq!(event.ty, UPLOAD_TYPE);
        assert_eq!(event.datacontenttype.as_deref(), Some(UPLOAD_CONTENT_TYPE));
        assert_eq!(event.source, "weir://s3/media");
        assert_eq!(event.id, derived_id(&[ORIGIN, &index.to_string()]));
    }
    assert_ne!(events[0].id, events[1].id);
    assert_eq!(
        events[0].subject.as_deref(),
        Some("media/photos/summer 2024/été.jpg")
    );
    assert_eq!(events[1].time.as_deref(), Some("2024-05-01T12:00:01.000Z"));
}

#[test]
fn minio_notification() {
    let body = fixture("s3_minio_put.json");
    let events = weir_schemas::decode(&message(&[], Some(&body), None), Format::Auto).unwrap();
    assert_eq!(events.len(), 1);
    let upload = events[0].upload().unwrap();
    assert_eq!(upload.event_name, "s3:ObjectCreated:Put");
    assert_eq!(upload.key, "red flower.jpg");
    assert_eq!(upload.bucket, "uploads");
    assert_eq!(upload.content_type.as_deref(), Some("image/jpeg"));
    assert_eq!(upload.region, None, "MinIO's empty region is no region");
    assert_eq!(events[0].subject.as_deref(), Some("uploads/red flower.jpg"));
}

#[test]
fn event_names_are_normalised_to_the_s3_prefix() {
    assert_eq!(
        normalise_event_name("ObjectCreated:Put"),
        "s3:ObjectCreated:Put"
    );
    assert_eq!(
        normalise_event_name("s3:ObjectCreated:Put"),
        "s3:ObjectCreated:Put"
    );
    assert_eq!(
        normalise_event_name("ObjectRemoved:DeleteMarkerCreated"),
        "s3:ObjectRemoved:DeleteMarkerCreated"
    );
}

#[test]
fn object_keys_are_form_decoded() {
    assert_eq!(
        decode_object_key("photos/summer+2024/%C3%A9t%C3%A9.jpg").unwrap(),
        "photos/summer 2024/été.jpg"
    );
    assert_eq!(decode_object_key("a%2Bb").unwrap(), "a+b");
    assert!(decode_object_key("100%").is_err());
    assert!(decode_object_key("%zz").is_err());
    assert!(decode_object_key("%FF").is_err(), "not UTF-8 once decoded");
}

#[test]
fn bad_url_encoding_is_an_s3_error() {
    let body = br#"{"Records":[{"eventName":"s3:ObjectCreated:Put","s3":{"bucket":{"name":"b"},"object":{"key":"bad%2"}}}]}"#;
    let err = decode_err(&message(&[], Some(body), None), Format::Auto);
    assert!(
        matches!(&err, DecodeError::S3 { reason } if reason.contains("record 0") && reason.contains("bad URL-encoding")),
        "{err:?}"
    );
    assert_eq!(err.kind(), "s3");
}

#[test]
fn no_records_is_an_error_including_the_test_event() {
    for body in [fixture("s3_test_event.json"), br#"{"Records":[]}"#.to_vec()] {
        let err = decode_err(&message(&[], Some(&body), None), Format::S3);
        assert!(
            matches!(&err, DecodeError::S3 { reason } if reason.starts_with("no Records")),
            "{err:?}"
        );
    }
    // Auto does not take a test event for a notification: it is a custom event.
    let body = fixture("s3_test_event.json");
    let events = weir_schemas::decode(&message(&[], Some(&body), None), Format::Auto).unwrap();
    assert_eq!(events[0].ty, weir_schemas::CUSTOM_TYPE);
}

#[test]
fn malformed_record_names_the_record_and_field() {
    let body = br#"{"Records":[{"eventName":"s3:ObjectCreated:Put","s3":{"bucket":{"name":"b"},"object":{"key":"k"}}},{"eventName":"x","s3":{"object":{"key":"k"}}}]}"#;
    let err = decode_err(&message(&[], Some(body), None), Format::Auto);
    assert!(
        err.to_string().contains("record 1: missing field `bucket`"),
        "{err}"
    );
    let err = decode_err(&message(&[], None, None), Format::S3);
    assert_eq!(err.kind(), "s3");
}
