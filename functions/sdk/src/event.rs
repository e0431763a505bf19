//! Reading an event's `data`.
//!
//! The host decodes Debezium changes and S3/MinIO notifications before a function sees them and
//! hands them over as MessagePack with Weir's types and content types. Their accessors are
//! inherent methods of [`Event`] in `weir_schemas` (same codec as the host, so both sides agree
//! byte for byte): `event.db_change()` → [`DbChange`](weir_schemas::DbChange) (type
//! `weir.db.change`; a Debezium tombstone is a change with `op == DbOp::Tombstone`, no row and
//! the key in `key`) and `event.upload()` → [`Upload`](weir_schemas::Upload) (type
//! `weir.upload`). Their `DecodeError` converts into a reject, so `?` works in a handler.
//!
//! Custom events carry whatever bytes the producer sent, usually JSON: [`EventExt`] adds
//! [`json`](EventExt::json) and [`data_bytes`](EventExt::data_bytes). Nothing is cached: each
//! call decodes again.

use serde::de::DeserializeOwned;
use weir_schemas::Event;

/// Why an event's data could not be read as JSON, or an output's value written as JSON.
/// Converts into [`HandleError::Reject`](crate::HandleError): a malformed payload does not get
/// better on a retry.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("event `{id}` of type `{ty}` has no data")]
    NoData { id: String, ty: String },
    #[error("event `{id}` data is not the expected JSON: {source}")]
    Json {
        id: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("output data could not be encoded as JSON: {0}")]
    Encode(#[source] serde_json::Error),
}

/// Accessors for custom event data, on top of `Event`'s own `db_change()` and `upload()`.
/// In the prelude.
pub trait EventExt {
    /// The data parsed as JSON into `T` (use `serde_json::Value` for "any JSON"). Does not look
    /// at `datacontenttype`: producers often leave it unset.
    fn json<T: DeserializeOwned>(&self) -> Result<T, DataError>;

    /// The raw data; empty when the event has none (`event.data.is_none()` tells the two apart).
    fn data_bytes(&self) -> &[u8];
}

impl EventExt for Event {
    fn json<T: DeserializeOwned>(&self) -> Result<T, DataError> {
        let data = self.data.as_deref().ok_or_else(|| DataError::NoData {
            id: self.id.clone(),
            ty: self.ty.clone(),
        })?;
        serde_json::from_slice(data).map_err(|source| DataError::Json {
            id: self.id.clone(),
            source,
        })
    }

    fn data_bytes(&self) -> &[u8] {
        self.data.as_deref().unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::HandleError;
    use weir_schemas::{DbChange, DbOp, DbSource};

    #[test]
    fn json_reads_custom_data_and_names_what_is_wrong() {
        let mut event = Event::new("e-1", "s", "orders");
        assert!(matches!(
            event.json::<serde_json::Value>(),
            Err(DataError::NoData { .. })
        ));
        assert_eq!(event.data_bytes(), b"");
        event.data = Some(b"not json".to_vec());
        let error = event.json::<serde_json::Value>().unwrap_err();
        assert!(error
            .to_string()
            .starts_with("event `e-1` data is not the expected JSON"));
        assert!(matches!(HandleError::from(error), HandleError::Reject(_)));
        event.data = Some(br#"{"amount":3}"#.to_vec());
        assert_eq!(event.json::<serde_json::Value>().unwrap()["amount"], 3);
        assert_eq!(event.data_bytes(), br#"{"amount":3}"#);
    }

    #[test]
    fn typed_payloads_round_trip_and_wrong_kinds_reject() {
        let change = DbChange {
            op: DbOp::Tombstone,
            before: None,
            after: None,
            source: DbSource::default(),
            ts_ms: None,
            key: Some(serde_json::json!({"id": 1})),
        };
        let mut event = Event::new("e-2", "s", "ignored");
        event.set_db_change(&change).unwrap();
        assert_eq!(event.db_change().unwrap(), change);
        let handled: Result<(), HandleError> = event.upload().map(drop).map_err(Into::into);
        assert!(matches!(handled, Err(HandleError::Reject(_))));
    }
}
