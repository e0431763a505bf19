//! The CloudEvents 1.0 envelope as Weir holds it in memory.
//!
//! Validation of attribute values (required attributes, extension names, time format) lives
//! here; wire formats live in [`crate::cloudevents`] and [`crate::wire`].

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::DecodeError;

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

    /// Check every CloudEvents 1.0 rule Weir enforces: `specversion` is "1.0"; `id`, `source`,
    /// `type` are non-empty; `source` is a URI-reference and `dataschema` an absolute URI;
    /// `subject` and `datacontenttype` are non-empty when set; `time` is RFC 3339; extension
    /// names are valid and do not shadow a context attribute. Every decoder runs this, so an
    /// [`Event`] that came off the wire is always valid; encoders assume it.
    pub fn validate(&self) -> Result<(), DecodeError> {
        if self.specversion != SPECVERSION {
            return Err(DecodeError::SpecVersion {
                found: self.specversion.clone(),
            });
        }
        if self.id.is_empty() {
            return Err(DecodeError::invalid("id", "must be a non-empty string"));
        }
        if self.source.is_empty() {
            return Err(DecodeError::invalid(
                "source",
                "must be a non-empty URI-reference",
            ));
        }
        if let Err(why) = check_uri_reference(&self.source) {
            return Err(DecodeError::invalid(
                "source",
                format!("{:?} is not a URI-reference: {why}", self.source),
            ));
        }
        if self.ty.is_empty() {
            return Err(DecodeError::invalid("type", "must be a non-empty string"));
        }
        if self.subject.as_deref() == Some("") {
            return Err(DecodeError::invalid(
                "subject",
                "must be non-empty when present",
            ));
        }
        if self.datacontenttype.as_deref() == Some("") {
            return Err(DecodeError::invalid(
                "datacontenttype",
                "must be non-empty when present",
            ));
        }
        if let Some(schema) = &self.dataschema {
            let absolute = check_uri_reference(schema).and_then(|()| {
                if has_scheme(schema) {
                    Ok(())
                } else {
                    Err("it has no scheme (an absolute URI is required)")
                }
            });
            if let Err(why) = absolute {
                return Err(DecodeError::invalid(
                    "dataschema",
                    format!("{schema:?} is not an absolute URI: {why}"),
                ));
            }
        }
        if let Some(time) = &self.time {
            if !is_rfc3339(time) {
                return Err(DecodeError::invalid(
                    "time",
                    format!("{time:?} is not an RFC 3339 timestamp"),
                ));
            }
        }
        for name in self.extensions.keys() {
            check_extension_name(name)?;
        }
        Ok(())
    }
}

/// Names that are CloudEvents context attributes or reserved members of the JSON format: an
/// extension with one of these names could not be told apart from them on the wire.
const RESERVED_NAMES: &[&str] = &[
    "id",
    "source",
    "type",
    "specversion",
    "subject",
    "time",
    "datacontenttype",
    "dataschema",
    "data",
];

/// CloudEvents 1.0: attribute names "MUST consist of lower-case letters ('a' to 'z') or digits
/// ('0' to '9')". The spec only says names SHOULD NOT exceed 20 characters, so longer names
/// are accepted.
pub fn check_extension_name(name: &str) -> Result<(), DecodeError> {
    let reason = if name.is_empty() {
        Some("must not be empty")
    } else if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    {
        Some("must consist of lowercase ASCII letters a-z and digits 0-9 only")
    } else if RESERVED_NAMES.contains(&name) {
        Some("is a CloudEvents context attribute or reserved name")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(DecodeError::InvalidExtensionName {
            name: name.to_owned(),
            reason,
        }),
        None => Ok(()),
    }
}

/// Whether `text` is an RFC 3339 `date-time` (e.g. `2024-05-01T12:00:00.5+02:00`).
pub fn is_rfc3339(text: &str) -> bool {
    use time::format_description::well_known::Rfc3339;
    time::OffsetDateTime::parse(text, &Rfc3339).is_ok()
}

/// Milliseconds since the Unix epoch as an RFC 3339 UTC timestamp with millisecond precision
/// (`2024-05-01T12:00:00.123Z`), the one form Weir writes. `None` outside years 0000-9999,
/// which RFC 3339 cannot express.
pub fn rfc3339_from_unix_millis(millis: i64) -> Option<String> {
    let nanos = i128::from(millis).checked_mul(1_000_000)?;
    let at = time::OffsetDateTime::from_unix_timestamp_nanos(nanos).ok()?;
    if !(0..=9999).contains(&at.year()) {
        return None;
    }
    Some(format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        at.year(),
        u8::from(at.month()),
        at.day(),
        at.hour(),
        at.minute(),
        at.second(),
        at.millisecond()
    ))
}

/// RFC 3986 `URI-reference`, checked for its character set, percent-escapes and scheme. It
/// does not check authority or IPv6 literal syntax: CloudEvents only asks for a URI-reference,
/// and rejecting exotic but valid forms would be worse than accepting a few invalid ones.
fn check_uri_reference(text: &str) -> Result<(), &'static str> {
    let bytes = text.as_bytes();
    let mut index = 0;
    while index < bytes.len() {
        let byte = bytes[index];
        if byte == b'%' {
            let valid = bytes
                .get(index + 1..index + 3)
                .is_some_and(|hex| hex.iter().all(u8::is_ascii_hexdigit));
            if !valid {
                return Err("'%' is not followed by two hex digits");
            }
            index += 3;
            continue;
        }
        let allowed = byte.is_ascii_alphanumeric() || b"-._~:/?#[]@!$&'()*+,;=".contains(&byte);
        if !allowed {
            return Err("it contains a character that must be percent-encoded");
        }
        index += 1;
    }
    // A ':' before any '/', '?' or '#' makes the prefix a scheme; a relative reference's first
    // segment may not contain ':'.
    let first_part = text.split(['/', '?', '#']).next().unwrap_or_default();
    if first_part.contains(':') && !has_scheme(text) {
        return Err("the part before ':' is not a valid scheme");
    }
    Ok(())
}

/// Whether `text` starts with `scheme ":"`, scheme = ALPHA *( ALPHA / DIGIT / "+" / "-" / "." ).
fn has_scheme(text: &str) -> bool {
    let Some((scheme, _)) = text.split_once(':') else {
        return false;
    };
    let mut chars = scheme.bytes();
    chars.next().is_some_and(|b| b.is_ascii_alphabetic())
        && chars.all(|b| b.is_ascii_alphanumeric() || b"+-.".contains(&b))
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
    let mut text = [0u8; 32];
    // Into a buffer, not `hex::encode`: that builds the string a char at a time, which showed
    // in profiles (two ids per output event).
    match hex::encode_to_slice(&digest[..16], &mut text) {
        Ok(()) => String::from_utf8_lossy(&text).into_owned(),
        // Unreachable (32 bytes hold 16 encoded ones); the slower path gives the same text.
        Err(_) => hex::encode(&digest[..16]),
    }
}
