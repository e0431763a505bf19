//! S3 / MinIO bucket notifications → [`Upload`]s (one per record) → `weir.upload` [`Event`]s.
//!
//! Reads the AWS record layout, which MinIO also uses (MinIO's extra top-level `EventName` and
//! `Key` are ignored: the records say the same). A notification without records, such as the
//! AWS `s3:TestEvent` sent when a notification is configured or MinIO's, is an error
//! ("no Records"), not zero events: a message that carries no event must not be acknowledged
//! silently as if it had been handled, and the DLQ keeps it visible. This module does not
//! fetch objects; it only describes them.

use serde::{Deserialize, Serialize};

use crate::event::{derived_id, is_rfc3339};
use crate::{DecodeError, Event};

/// One object event from a bucket notification.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Upload {
    pub bucket: String,
    /// The object key, URL-decoded.
    pub key: String,
    pub size: Option<u64>,
    pub etag: Option<String>,
    /// e.g. `s3:ObjectCreated:Put`.
    pub event_name: String,
    pub event_time: Option<String>,
    pub content_type: Option<String>,
    pub version_id: Option<String>,
    pub sequencer: Option<String>,
    pub region: Option<String>,
}

#[derive(Deserialize)]
struct Notification {
    #[serde(rename = "Records")]
    records: Option<Vec<serde_json::Value>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Record {
    event_name: String,
    #[serde(default)]
    event_time: Option<String>,
    #[serde(default)]
    aws_region: Option<String>,
    s3: RecordS3,
}

#[derive(Deserialize)]
struct RecordS3 {
    bucket: RecordBucket,
    object: RecordObject,
}

#[derive(Deserialize)]
struct RecordBucket {
    name: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RecordObject {
    key: String,
    #[serde(default)]
    size: Option<u64>,
    #[serde(default, rename = "eTag")]
    etag: Option<String>,
    #[serde(default)]
    content_type: Option<String>,
    #[serde(default)]
    version_id: Option<String>,
    #[serde(default)]
    sequencer: Option<String>,
}

/// Parse a notification body into its uploads, in record order.
pub fn parse(body: &[u8]) -> Result<Vec<Upload>, DecodeError> {
    let notification: Notification =
        serde_json::from_slice(body).map_err(|err| DecodeError::json("S3 notification", &err))?;
    let records = notification.records.unwrap_or_default();
    if records.is_empty() {
        return Err(DecodeError::s3(
            "no Records (a test event, or not a notification)",
        ));
    }
    records
        .into_iter()
        .enumerate()
        .map(|(index, record)| {
            let record: Record = serde_json::from_value(record)
                .map_err(|err| DecodeError::s3(format!("record {index}: {err}")))?;
            upload_from_record(record)
                .map_err(|reason| DecodeError::s3(format!("record {index}: {reason}")))
        })
        .collect()
}

fn upload_from_record(record: Record) -> Result<Upload, String> {
    let key = decode_object_key(&record.s3.object.key)?;
    let non_empty = |value: Option<String>| value.filter(|text| !text.is_empty());
    Ok(Upload {
        bucket: record.s3.bucket.name,
        key,
        size: record.s3.object.size,
        etag: non_empty(record.s3.object.etag),
        event_name: normalise_event_name(&record.event_name),
        event_time: non_empty(record.event_time),
        content_type: non_empty(record.s3.object.content_type),
        version_id: non_empty(record.s3.object.version_id),
        sequencer: non_empty(record.s3.object.sequencer),
        // MinIO sends "" when no region is configured.
        region: non_empty(record.aws_region),
    })
}

/// AWS writes `ObjectCreated:Put`, MinIO `s3:ObjectCreated:Put`: Weir uses the `s3:` form.
pub fn normalise_event_name(name: &str) -> String {
    if name.starts_with("s3:") {
        name.to_owned()
    } else {
        format!("s3:{name}")
    }
}

/// Object keys in notifications are form-encoded: `+` is a space and `%XX` an octet of UTF-8.
pub fn decode_object_key(encoded: &str) -> Result<String, String> {
    let bytes = encoded.as_bytes();
    if let Some(at) = bytes.iter().enumerate().find_map(|(at, &byte)| {
        let escape_ok = bytes
            .get(at + 1..at + 3)
            .is_some_and(|hex| hex.iter().all(u8::is_ascii_hexdigit));
        (byte == b'%' && !escape_ok).then_some(at)
    }) {
        return Err(format!(
            "bad URL-encoding in object key {encoded:?}: '%' at byte {at} is not followed by two hex digits"
        ));
    }
    let spaced = encoded.replace('+', " ");
    percent_encoding::percent_decode_str(&spaced)
        .decode_utf8()
        .map(|key| key.into_owned())
        .map_err(|_| format!("bad URL-encoding in object key {encoded:?}: not UTF-8 once decoded"))
}

/// The events for a notification's uploads. Record `index` gives `id` =
/// `derived_id([origin, index])`, stable across redeliveries of the same message; `source` =
/// `weir://s3/<bucket>`; `subject` = `<bucket>/<key>`; `time` = `eventTime` when it is
/// RFC 3339 (the raw value stays in [`Upload::event_time`] either way).
pub fn to_events(uploads: &[Upload], origin: &str) -> Result<Vec<Event>, DecodeError> {
    uploads
        .iter()
        .enumerate()
        .map(|(index, upload)| {
            let mut event = Event::new(
                derived_id(&[origin, &index.to_string()]),
                format!(
                    "weir://s3/{}",
                    crate::wire::encode_uri_segment(&upload.bucket)
                ),
                crate::UPLOAD_TYPE,
            );
            event.subject = Some(format!("{}/{}", upload.bucket, upload.key));
            event.time = upload.event_time.clone().filter(|time| is_rfc3339(time));
            event
                .set_upload(upload)
                .map_err(|err| DecodeError::s3(err.to_string()))?;
            event.validate()?;
            Ok(event)
        })
        .collect()
}
