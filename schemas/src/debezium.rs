//! Debezium change events → [`DbChange`].

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

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
