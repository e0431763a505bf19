//! The one MessagePack module: typed payloads ([`DbChange`], [`Upload`]) in `data`, and whole
//! [`Event`]s for Weir's own records.
//!
//! **Named encoding, decided here once:** structs are written as maps keyed by field name
//! (`rmp_serde::to_vec_named`), not as positional arrays. A reader built against an older
//! version of a struct ignores fields it does not know and defaults fields that are absent, so
//! fields can be added without breaking functions compiled against an older SDK (and records
//! written by an older Weir stay readable). The cost, a few bytes of field names per record,
//! is small next to the payloads. Golden-byte tests pin the encoding so that it cannot change
//! by accident.
//!
//! Nothing else in Weir calls rmp-serde directly; this module does no I/O.

use serde::{de::DeserializeOwned, Serialize};

use crate::error::EncodeError;
use crate::{
    DbChange, DecodeError, Event, Upload, DB_CHANGE_CONTENT_TYPE, DB_CHANGE_TYPE,
    UPLOAD_CONTENT_TYPE, UPLOAD_TYPE,
};

/// Encode a value as named MessagePack (structs as maps).
pub fn to_msgpack<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, EncodeError> {
    rmp_serde::to_vec_named(value).map_err(|err| EncodeError {
        what: short_type_name::<T>(),
        reason: err.to_string(),
    })
}

/// Decode MessagePack into `T`. Trailing bytes after the value are an error: they mean the
/// input is not what the caller thinks it is.
pub fn from_msgpack<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, DecodeError> {
    let what = short_type_name::<T>();
    let mut rest = bytes;
    // A `Read`-based deserializer reads lengths from the input but only allocates as bytes
    // arrive, so a forged length prefix cannot make it allocate gigabytes.
    let mut deserializer = rmp_serde::Deserializer::new(&mut rest);
    let value = T::deserialize(&mut deserializer).map_err(|err| DecodeError::MessagePack {
        what,
        reason: err.to_string(),
    })?;
    drop(deserializer);
    if !rest.is_empty() {
        return Err(DecodeError::MessagePack {
            what,
            reason: format!("{} trailing bytes after the value", rest.len()),
        });
    }
    Ok(value)
}

/// A whole event as MessagePack (Weir's own records, e.g. DLQ or spool entries).
pub fn event_to_msgpack(event: &Event) -> Result<Vec<u8>, EncodeError> {
    to_msgpack(event)
}

/// An event from [`event_to_msgpack`] bytes, validated like any decoded event.
pub fn event_from_msgpack(bytes: &[u8]) -> Result<Event, DecodeError> {
    let event: Event = from_msgpack(bytes)?;
    event.validate()?;
    Ok(event)
}

impl Event {
    /// The [`DbChange`] this event carries. Fails with [`DecodeError::WrongType`] unless the
    /// event has type [`DB_CHANGE_TYPE`] and datacontenttype [`DB_CHANGE_CONTENT_TYPE`].
    pub fn db_change(&self) -> Result<DbChange, DecodeError> {
        self.typed_data(DB_CHANGE_TYPE, DB_CHANGE_CONTENT_TYPE)
    }

    /// The [`Upload`] this event carries. Fails with [`DecodeError::WrongType`] unless the
    /// event has type [`UPLOAD_TYPE`] and datacontenttype [`UPLOAD_CONTENT_TYPE`].
    pub fn upload(&self) -> Result<Upload, DecodeError> {
        self.typed_data(UPLOAD_TYPE, UPLOAD_CONTENT_TYPE)
    }

    /// Set `type`, `datacontenttype` and `data` to carry `change`.
    pub fn set_db_change(&mut self, change: &DbChange) -> Result<(), EncodeError> {
        self.set_typed_data(DB_CHANGE_TYPE, DB_CHANGE_CONTENT_TYPE, change)
    }

    /// Set `type`, `datacontenttype` and `data` to carry `upload`.
    pub fn set_upload(&mut self, upload: &Upload) -> Result<(), EncodeError> {
        self.set_typed_data(UPLOAD_TYPE, UPLOAD_CONTENT_TYPE, upload)
    }

    fn typed_data<T: DeserializeOwned>(
        &self,
        ty: &'static str,
        content_type: &'static str,
    ) -> Result<T, DecodeError> {
        let found_content_type = self.datacontenttype.as_deref().unwrap_or("(none)");
        if self.ty != ty || found_content_type != content_type {
            return Err(DecodeError::WrongType {
                expected: ty,
                found: format!(
                    "type {:?} and datacontenttype {found_content_type:?}",
                    self.ty
                ),
            });
        }
        match &self.data {
            Some(data) => from_msgpack(data),
            None => Err(DecodeError::MessagePack {
                what: short_type_name::<T>(),
                reason: "the event has no data".to_owned(),
            }),
        }
    }

    fn set_typed_data<T: Serialize>(
        &mut self,
        ty: &str,
        content_type: &str,
        value: &T,
    ) -> Result<(), EncodeError> {
        self.data = Some(to_msgpack(value)?);
        ty.clone_into(&mut self.ty);
        self.datacontenttype = Some(content_type.to_owned());
        Ok(())
    }
}

/// `weir_schemas::debezium::DbChange` → `DbChange`: enough to say what was being coded.
fn short_type_name<T: ?Sized>() -> &'static str {
    let full = std::any::type_name::<T>();
    let without_generics = full.split('<').next().unwrap_or(full);
    without_generics
        .rsplit("::")
        .next()
        .unwrap_or(without_generics)
}
