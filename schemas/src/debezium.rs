//! Debezium change events → [`DbChange`] → a `weir.db.change` [`Event`].
//!
//! Reads the JSON envelope Debezium's JsonConverter writes (with or without `schemas.enable`)
//! and null-valued tombstones. It does not read Avro/Protobuf converters, the CloudEvents
//! converter (that arrives as a CloudEvent and is decoded as one), nor PostgreSQL logical
//! messages (`op` `m`), which are rejected as an unknown op.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::event::{derived_id, rfc3339_from_unix_millis};
use crate::{DecodeError, Event, DB_CHANGE_TYPE};

/// The kind of change. `Tombstone` is the null-valued message Debezium emits after a delete
/// so that log compaction can drop the key; it carries no row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DbOp {
    Create,
    Update,
    Delete,
    Read,
    Truncate,
    Tombstone,
}

/// Where a change came from (Debezium's `source` block). Fields Weir does not name are kept in
/// `extra`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct DbSource {
    #[serde(default)]
    pub connector: Option<String>,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub db: Option<String>,
    #[serde(default)]
    pub schema: Option<String>,
    #[serde(default)]
    pub table: Option<String>,
    #[serde(default)]
    pub ts_ms: Option<i64>,
    #[serde(default)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

/// A typed database change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DbChange {
    pub op: DbOp,
    #[serde(default)]
    pub before: Option<serde_json::Value>,
    #[serde(default)]
    pub after: Option<serde_json::Value>,
    #[serde(default)]
    pub source: DbSource,
    #[serde(default)]
    pub ts_ms: Option<i64>,
    /// The message key (the row's primary key), when the transport gave one; the only content
    /// of a tombstone.
    #[serde(default)]
    pub key: Option<serde_json::Value>,
}

impl DbOp {
    /// The Debezium `op` code: `c`, `u`, `d`, `r`, `t`; `None` for a tombstone, which has none.
    pub fn code(self) -> Option<&'static str> {
        match self {
            Self::Create => Some("c"),
            Self::Update => Some("u"),
            Self::Delete => Some("d"),
            Self::Read => Some("r"),
            Self::Truncate => Some("t"),
            Self::Tombstone => None,
        }
    }

    /// The op for a Debezium `op` code.
    pub fn from_code(code: &str) -> Option<Self> {
        match code {
            "c" => Some(Self::Create),
            "u" => Some(Self::Update),
            "d" => Some(Self::Delete),
            "r" => Some(Self::Read),
            "t" => Some(Self::Truncate),
            _ => None,
        }
    }
}

impl DbChange {
    /// A tombstone for `key`: no row, no source.
    pub fn tombstone(key: Option<serde_json::Value>) -> Self {
        Self {
            op: DbOp::Tombstone,
            before: None,
            after: None,
            source: DbSource::default(),
            ts_ms: None,
            key,
        }
    }

    /// `<db>.<schema>.<table>`, skipping the parts the connector did not give (MySQL has no
    /// schema); `None` when it gave none.
    pub fn subject(&self) -> Option<String> {
        let parts: Vec<&str> = [&self.source.db, &self.source.schema, &self.source.table]
            .into_iter()
            .filter_map(|part| part.as_deref().filter(|text| !text.is_empty()))
            .collect();
        (!parts.is_empty()).then(|| parts.join("."))
    }
}

/// Parse one Debezium message: `value` is the Kafka/NATS payload (`None` for a null value),
/// `key` the message key. Accepts the envelope with or without the JsonConverter
/// `{"schema": .., "payload": ..}` wrapper (the key too). A null value, a JSON `null` body or
/// a wrapper whose `payload` is `null` is a tombstone.
pub fn parse(value: Option<&[u8]>, key: Option<&[u8]>) -> Result<DbChange, DecodeError> {
    let key = key.map(parse_key).transpose()?;
    let Some(value) = value else {
        return Ok(DbChange::tombstone(key));
    };
    let document: serde_json::Value = serde_json::from_slice(value)
        .map_err(|err| DecodeError::json("Debezium change event", &err))?;
    let envelope = match unwrap_schema_wrapper(document) {
        serde_json::Value::Null => return Ok(DbChange::tombstone(key)),
        serde_json::Value::Object(envelope) => envelope,
        other => {
            return Err(DecodeError::debezium(format!(
                "the envelope must be a JSON object, not {}",
                json_kind(&other)
            )))
        }
    };
    parse_envelope(envelope, key)
}

/// `{"schema": .., "payload": X}` → `X`. A document is a wrapper when it has a `payload`
/// member and either a `schema` member or no `op` of its own (an envelope never has a
/// top-level `payload`).
fn unwrap_schema_wrapper(document: serde_json::Value) -> serde_json::Value {
    match document {
        serde_json::Value::Object(mut object)
            if object.contains_key("payload")
                && (object.contains_key("schema") || !object.contains_key("op")) =>
        {
            object.remove("payload").unwrap_or(serde_json::Value::Null)
        }
        other => other,
    }
}

/// The message key as JSON (schema wrapper removed); a key that is not JSON but is UTF-8 is
/// kept as a JSON string, since some sinks key by a plain string.
fn parse_key(key: &[u8]) -> Result<serde_json::Value, DecodeError> {
    match serde_json::from_slice(key) {
        Ok(document) => Ok(unwrap_schema_wrapper(document)),
        Err(_) => match std::str::from_utf8(key) {
            Ok(text) => Ok(serde_json::Value::String(text.to_owned())),
            Err(_) => Err(DecodeError::debezium(
                "the message key is neither JSON nor UTF-8 text",
            )),
        },
    }
}

fn parse_envelope(
    mut envelope: serde_json::Map<String, serde_json::Value>,
    key: Option<serde_json::Value>,
) -> Result<DbChange, DecodeError> {
    let op = match envelope.remove("op") {
        None | Some(serde_json::Value::Null) => {
            return Err(DecodeError::debezium("missing `op`"));
        }
        Some(serde_json::Value::String(code)) => DbOp::from_code(&code).ok_or_else(|| {
            DecodeError::debezium(format!(
                "unknown op {code:?} (expected one of c, u, d, r, t)"
            ))
        })?,
        Some(other) => {
            return Err(DecodeError::debezium(format!(
                "`op` must be a string, not {}",
                json_kind(&other)
            )))
        }
    };
    let row = |value: Option<serde_json::Value>| value.filter(|row| !row.is_null());
    let before = row(envelope.remove("before"));
    let after = row(envelope.remove("after"));
    let source = match envelope.remove("source") {
        None | Some(serde_json::Value::Null) => DbSource::default(),
        Some(serde_json::Value::Object(source)) => parse_source(source)?,
        Some(other) => {
            return Err(DecodeError::debezium(format!(
                "`source` must be an object, not {}",
                json_kind(&other)
            )))
        }
    };
    let ts_ms = optional_i64(envelope.remove("ts_ms"), "ts_ms")?;
    Ok(DbChange {
        op,
        before,
        after,
        source,
        ts_ms,
        key,
    })
}

fn parse_source(
    mut source: serde_json::Map<String, serde_json::Value>,
) -> Result<DbSource, DecodeError> {
    let mut text = |name: &str| match source.remove(name) {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(value)) => Ok(Some(value)),
        Some(other) => Err(DecodeError::debezium(format!(
            "`source.{name}` must be a string, not {}",
            json_kind(&other)
        ))),
    };
    let connector = text("connector")?;
    let name = text("name")?;
    let db = text("db")?;
    let schema = text("schema")?;
    let table = text("table")?;
    let ts_ms = optional_i64(source.remove("ts_ms"), "source.ts_ms")?;
    Ok(DbSource {
        connector,
        name,
        db,
        schema,
        table,
        ts_ms,
        extra: source.into_iter().collect(),
    })
}

fn optional_i64(value: Option<serde_json::Value>, field: &str) -> Result<Option<i64>, DecodeError> {
    match value {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::Number(number)) => number.as_i64().map(Some).ok_or_else(|| {
            DecodeError::debezium(format!(
                "`{field}` must be an integer (milliseconds), not {number}"
            ))
        }),
        Some(other) => Err(DecodeError::debezium(format!(
            "`{field}` must be an integer (milliseconds), not {}",
            json_kind(&other)
        ))),
    }
}

fn json_kind(value: &serde_json::Value) -> &'static str {
    match value {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

/// The event for a change.
///
/// - `id` = `derived_id([origin, "0"])`: the message's place in its log is the identity. It is
///   stable across redeliveries and unique per message. A Debezium source position (LSN, binlog
///   position) was rejected as identity: rows of one snapshot share a position, so ids built on
///   it could collide and a consumer deduplicating on `source`+`id` would drop real changes.
/// - `source` = `weir://debezium/<name>`: `source.name` is the logical server name (topic
///   prefix) and tells two servers apart; `source.connector` (`postgresql`, `mysql`, ...) is
///   used only when there is no name; without either, `default_source`.
/// - `subject` = [`DbChange::subject`]; `time` = `source.ts_ms` (when the change happened in
///   the database), else the envelope's `ts_ms` (when Debezium processed it), as RFC 3339 UTC.
pub fn to_event(
    change: &DbChange,
    origin: &str,
    default_source: &str,
) -> Result<Event, DecodeError> {
    let source = change
        .source
        .name
        .as_deref()
        .or(change.source.connector.as_deref())
        .filter(|name| !name.is_empty())
        .map_or_else(
            || default_source.to_owned(),
            |name| format!("weir://debezium/{}", crate::wire::encode_uri_segment(name)),
        );
    let mut event = Event::new(derived_id(&[origin, "0"]), source, DB_CHANGE_TYPE);
    event.subject = change.subject();
    event.time = change
        .source
        .ts_ms
        .or(change.ts_ms)
        .and_then(rfc3339_from_unix_millis);
    event
        .set_db_change(change)
        .map_err(|err| DecodeError::debezium(err.to_string()))?;
    event.validate()?;
    Ok(event)
}
