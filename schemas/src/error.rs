//! Why an input could not be decoded, or a value encoded.
//!
//! Every kind of malformed input has its own [`DecodeError`] variant so that callers can
//! classify it: the `Display` text is precise enough to be an HTTP 400 body or a DLQ
//! `weirdlqerror`, and [`DecodeError::kind`] is a short stable label for metrics. This module
//! only describes errors; it does not decide what a caller does with them (retry, DLQ, reply).

/// A malformed input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The bytes are not the JSON the format requires (position as reported by serde_json).
    #[error("invalid JSON in {what} at line {line} column {column}: {message}")]
    Json {
        /// What was being parsed, e.g. "structured CloudEvent".
        what: &'static str,
        line: usize,
        column: usize,
        message: String,
    },

    /// `specversion` is present but is not the one Weir accepts.
    #[error("unsupported CloudEvents specversion {found:?}: only \"1.0\" is supported")]
    SpecVersion { found: String },

    /// A required CloudEvents attribute is absent (or JSON `null`).
    #[error("missing required CloudEvents attribute `{attribute}`")]
    MissingAttribute { attribute: &'static str },

    /// A CloudEvents attribute is present but its value is not allowed.
    #[error("invalid value for CloudEvents attribute `{attribute}`: {reason}")]
    InvalidAttribute { attribute: String, reason: String },

    /// An extension attribute name breaks CloudEvents 1.0 naming (lowercase `a-z`, `0-9`).
    #[error("invalid CloudEvents extension name {name:?}: {reason}")]
    InvalidExtensionName { name: String, reason: &'static str },

    /// `data_base64` of a structured event is not valid base64.
    #[error("invalid data_base64: {reason}")]
    InvalidBase64 { reason: String },

    /// The message is not a valid Debezium change event.
    #[error("invalid Debezium change event: {reason}")]
    Debezium { reason: String },

    /// The message is not a valid S3/MinIO bucket notification.
    #[error("invalid S3 notification: {reason}")]
    S3 { reason: String },

    /// Bytes that should be MessagePack of `what` are not.
    #[error("invalid MessagePack for {what}: {reason}")]
    MessagePack { what: &'static str, reason: String },

    /// A typed accessor was called on an event that does not carry that type.
    #[error("event is not a {expected}: it has {found}")]
    WrongType {
        expected: &'static str,
        found: String,
    },
}

impl DecodeError {
    /// A short, stable label for metrics (bounded cardinality, never contains input).
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Json { .. } => "json",
            Self::SpecVersion { .. } => "specversion",
            Self::MissingAttribute { .. } => "missing_attribute",
            Self::InvalidAttribute { .. } => "invalid_attribute",
            Self::InvalidExtensionName { .. } => "extension_name",
            Self::InvalidBase64 { .. } => "base64",
            Self::Debezium { .. } => "debezium",
            Self::S3 { .. } => "s3",
            Self::MessagePack { .. } => "msgpack",
            Self::WrongType { .. } => "wrong_type",
        }
    }

    pub(crate) fn json(what: &'static str, err: &serde_json::Error) -> Self {
        Self::Json {
            what,
            line: err.line(),
            column: err.column(),
            message: json_message(err),
        }
    }

    pub(crate) fn invalid(attribute: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::InvalidAttribute {
            attribute: attribute.into(),
            reason: reason.into(),
        }
    }

    pub(crate) fn debezium(reason: impl Into<String>) -> Self {
        Self::Debezium {
            reason: reason.into(),
        }
    }

    pub(crate) fn s3(reason: impl Into<String>) -> Self {
        Self::S3 {
            reason: reason.into(),
        }
    }
}

/// serde_json's `Display` appends " at line L column C"; the variant prints the position
/// itself, so strip it to avoid saying it twice.
pub(crate) fn json_message(err: &serde_json::Error) -> String {
    let text = err.to_string();
    let suffix = format!(" at line {} column {}", err.line(), err.column());
    match text.strip_suffix(&suffix) {
        Some(stripped) => stripped.to_owned(),
        None => text,
    }
}

/// A value could not be encoded (in practice only a `Serialize` impl that reports an error).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot encode {what} as MessagePack: {reason}")]
pub struct EncodeError {
    pub what: &'static str,
    pub reason: String,
}
