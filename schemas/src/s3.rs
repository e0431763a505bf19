//! S3 / MinIO bucket notifications → [`Upload`] (one per record).

use serde::{Deserialize, Serialize};

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
