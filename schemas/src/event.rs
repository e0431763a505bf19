//! The CloudEvents 1.0 envelope as Weir holds it in memory.
//!
//! Validation of attribute values (required attributes, extension names, time format) lives
//! here; wire formats live in [`crate::cloudevents`] and [`crate::wire`].

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The only CloudEvents spec version Weir accepts.
pub const SPECVERSION: &str = "1.0";

/// A CloudEvents 1.0 event. Extensions are string-valued and kept sorted by name so that
/// every encoding of the same event is byte-identical.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub id: String,
    pub source: String,
    #[serde(rename = "type")]
    pub ty: String,
    pub specversion: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub datacontenttype: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dataschema: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none", with = "serde_bytes")]
    pub data: Option<Vec<u8>>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub extensions: BTreeMap<String, String>,
}

impl Event {
    /// A new event with the required attributes set and everything else empty.
    pub fn new(id: impl Into<String>, source: impl Into<String>, ty: impl Into<String>) -> Self {
        Self {
            id: id.into(),
            source: source.into(),
            ty: ty.into(),
            specversion: SPECVERSION.to_owned(),
            subject: None,
            time: None,
            datacontenttype: None,
            dataschema: None,
            data: None,
            extensions: BTreeMap::new(),
        }
    }

    /// An extension attribute's value, if set.
    pub fn extension(&self, name: &str) -> Option<&str> {
        self.extensions.get(name).map(String::as_str)
    }
}

/// A deterministic id from its parts: the same parts always give the same id, so a redelivered
/// message or a re-run function produces the ids it produced the first time. The parts are
/// length-prefixed before hashing so `("ab","c")` and `("a","bc")` differ.
pub fn derived_id(parts: &[&str]) -> String {
    use sha2::{Digest, Sha256};
    let mut hasher = Sha256::new();
    for part in parts {
        hasher.update((part.len() as u64).to_be_bytes());
        hasher.update(part.as_bytes());
    }
    let digest = hasher.finalize();
    // 128 bits is plenty for uniqueness and keeps ids short in headers and logs.
    hex::encode(&digest[..16])
}
