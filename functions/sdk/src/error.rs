//! How a function says it failed. The two kinds map one to one onto the WIT `handle-error`:
//! the host's retry policy decides what a `retry` costs; a `reject` is never retried.

use weir_schemas::DecodeError;

use crate::{ConfigError, DataError};

/// Why a function did not handle an event.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandleError {
    /// Transient: the event is retried under the function's retry policy (backoff, max
    /// attempts), then dead-lettered with reason `retries-exhausted`.
    #[error("retry: {0}")]
    Retry(String),
    /// Permanent: the event goes to the dead-letter queue at once with reason `rejected`.
    #[error("reject: {0}")]
    Reject(String),
}

impl HandleError {
    /// A transient failure: try again later.
    pub fn retry(reason: impl Into<String>) -> Self {
        HandleError::Retry(reason.into())
    }

    /// A permanent failure: no retry will help; dead-letter the event now.
    pub fn reject(reason: impl Into<String>) -> Self {
        HandleError::Reject(reason.into())
    }
}

/// An event whose payload is missing or malformed will not get better on a retry.
impl From<DataError> for HandleError {
    fn from(error: DataError) -> Self {
        HandleError::Reject(error.to_string())
    }
}

/// A typed payload (`event.db_change()`, `event.upload()`) that is the wrong kind or does not
/// decode is a permanent failure too.
impl From<DecodeError> for HandleError {
    fn from(error: DecodeError) -> Self {
        HandleError::Reject(error.to_string())
    }
}

/// A bad config value needs an operator, not a retry; `weir dlq redrive` replays the events
/// once the config is fixed.
impl From<ConfigError> for HandleError {
    fn from(error: ConfigError) -> Self {
        HandleError::Reject(error.to_string())
    }
}
