//! `upload-indexer`: turns object-store notifications into index entries.
//!
//! Input: `weir.upload` events (S3/MinIO bucket notifications decoded by the host, one per
//! object). Output: one event on topic `uploads.indexed`, type `weir.upload.indexed`, keyed by
//! bucket, with JSON data `{"bucket", "key", "size", "etag", "kind"}` where `kind` is `image`,
//! `video`, `document` or `other`, from the object key's extension (case-insensitive). Reads no
//! config. It never fetches the object: the kind is a guess from the name, not from the bytes.

use serde_json::json;
use weir_function::prelude::*;

/// The topic index entries go to.
pub const INDEX_TOPIC: &str = "uploads.indexed";
/// The CloudEvents type of an index entry.
pub const INDEX_TYPE: &str = "weir.upload.indexed";

struct UploadIndexer;

impl Function for UploadIndexer {
    fn handle(event: Event, _delivery: Delivery) -> Result<Vec<Output>, HandleError> {
        let upload = event.upload()?;
        let entry = json!({
            "bucket": upload.bucket,
            "key": upload.key,
            "size": upload.size,
            "etag": upload.etag,
            "kind": kind_of(&upload.key),
        });
        Ok(vec![
            Output::json(INDEX_TOPIC, INDEX_TYPE, &entry)?.with_key(upload.bucket)
        ])
    }
}

weir_function::export!(UploadIndexer);

const IMAGE: &[&str] = &[
    "jpg", "jpeg", "png", "gif", "webp", "bmp", "tif", "tiff", "svg", "heic", "heif", "avif", "ico",
];
const VIDEO: &[&str] = &[
    "mp4", "m4v", "mov", "avi", "mkv", "webm", "mpeg", "mpg", "wmv", "flv", "3gp",
];
const DOCUMENT: &[&str] = &[
    "pdf", "doc", "docx", "xls", "xlsx", "ppt", "pptx", "odt", "ods", "odp", "rtf", "txt", "md",
    "csv", "json", "xml", "html", "htm", "epub",
];

/// The kind of object from the extension of the key's last path segment. A dot-file such as
/// `.env` has no extension.
fn kind_of(key: &str) -> &'static str {
    let file_name = key.rsplit('/').next().unwrap_or(key);
    let extension = match file_name.rsplit_once('.') {
        Some((stem, extension)) if !stem.is_empty() => extension.to_ascii_lowercase(),
        _ => return "other",
    };
    let extension = extension.as_str();
    if IMAGE.contains(&extension) {
        "image"
    } else if VIDEO.contains(&extension) {
        "video"
    } else if DOCUMENT.contains(&extension) {
        "document"
    } else {
        "other"
    }
}

#[cfg(test)]
mod tests {
    use super::kind_of;

    #[test]
    fn kinds_follow_the_extension_case_insensitively() {
        assert_eq!(kind_of("photos/2024/IMG_0001.JPG"), "image");
        assert_eq!(kind_of("a/b/clip.mp4"), "video");
        assert_eq!(kind_of("reports/q1.final.PDF"), "document");
        assert_eq!(kind_of("archive.tar.gz"), "other");
    }

    #[test]
    fn names_without_an_extension_are_other() {
        assert_eq!(kind_of("README"), "other");
        assert_eq!(kind_of("config/.env"), "other");
        assert_eq!(kind_of("dir.png/file"), "other");
        assert_eq!(kind_of("trailing."), "other");
    }
}
