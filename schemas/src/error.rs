//! Why an input could not be decoded. Every kind of malformed input has its own variant so that
//! callers can classify it (HTTP 400 reason, DLQ `undecodable` error text, metrics).

/// A malformed input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("unsupported input: {0}")]
    Unsupported(&'static str),
}
