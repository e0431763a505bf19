//! `db-audit`: turns every database change into a compact audit record.
//!
//! Input: `weir.db.change` events (Debezium changes decoded by the host, tombstones included).
//! Output: one event per change on topic `db.audit`, type `weir.db.audit`, keyed by the qualified
//! table name, with JSON data
//! `{"table": "<schema>.<table>", "op": "create|update|delete|read|truncate|tombstone",
//!   "key": <row key or null>, "changed": [columns whose values differ between before and after]}`.
//! Reads no config. It does not look at the values themselves: the audit says what changed, the
//! change log keeps the values.

use std::collections::BTreeSet;

use serde_json::{json, Map, Value};
use weir_function::prelude::*;

/// The topic audit records go to.
pub const AUDIT_TOPIC: &str = "db.audit";
/// The CloudEvents type of an audit record.
pub const AUDIT_TYPE: &str = "weir.db.audit";

struct DbAudit;

impl Function for DbAudit {
    fn handle(event: Event, delivery: Delivery) -> Result<Vec<Output>, HandleError> {
        let change = event.db_change()?;
        let table = qualified_table(&change.source, &delivery.topic);
        let record = audit_record(&change, &table);
        Ok(vec![
            Output::json(AUDIT_TOPIC, AUDIT_TYPE, &record)?.with_key(table)
        ])
    }
}

weir_function::export!(DbAudit);

/// The audit record of one change.
fn audit_record(change: &DbChange, table: &str) -> Value {
    json!({
        "table": table,
        "op": op_name(change.op),
        "key": change.key.clone().unwrap_or(Value::Null),
        "changed": changed_columns(change.before.as_ref(), change.after.as_ref()),
    })
}

fn op_name(op: DbOp) -> &'static str {
    match op {
        DbOp::Create => "create",
        DbOp::Update => "update",
        DbOp::Delete => "delete",
        DbOp::Read => "read",
        DbOp::Truncate => "truncate",
        DbOp::Tombstone => "tombstone",
    }
}

/// `schema.table` (or `db.table` for databases without schemas, e.g. MySQL). A tombstone carries
/// no `source` block, so the table then comes from the Debezium topic name
/// `<prefix>.<schema>.<table>`: its last two segments.
fn qualified_table(source: &DbSource, topic: &str) -> String {
    let namespace = source.schema.as_deref().or(source.db.as_deref());
    match (namespace, source.table.as_deref()) {
        (Some(namespace), Some(table)) => format!("{namespace}.{table}"),
        (None, Some(table)) => table.to_owned(),
        (_, None) => {
            let segments: Vec<&str> = topic.split('.').collect();
            match segments.as_slice() {
                [.., schema, table] if segments.len() >= 3 => format!("{schema}.{table}"),
                _ => topic.to_owned(),
            }
        }
    }
}

/// Columns whose values differ between the two row images, sorted. A missing image (create,
/// delete, snapshot read) counts as a row of absent columns, so every column of the other image
/// has changed; two missing images (truncate, tombstone) change nothing.
fn changed_columns(before: Option<&Value>, after: Option<&Value>) -> Vec<String> {
    let empty = Map::new();
    let before = before.and_then(Value::as_object).unwrap_or(&empty);
    let after = after.and_then(Value::as_object).unwrap_or(&empty);
    let columns: BTreeSet<&String> = before.keys().chain(after.keys()).collect();
    columns
        .into_iter()
        .filter(|column| before.get(*column) != after.get(*column))
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(op: DbOp, before: Option<Value>, after: Option<Value>) -> DbChange {
        DbChange {
            op,
            before,
            after,
            source: DbSource {
                schema: Some("public".into()),
                table: Some("orders".into()),
                ..DbSource::default()
            },
            ts_ms: Some(1),
            key: Some(json!({"id": 7})),
        }
    }

    #[test]
    fn update_lists_only_columns_whose_values_differ() {
        let update = change(
            DbOp::Update,
            Some(json!({"id": 7, "status": "new", "amount": 10, "gone": 1})),
            Some(json!({"id": 7, "status": "paid", "amount": 10, "added": true})),
        );
        let record = audit_record(&update, "public.orders");
        assert_eq!(
            record,
            json!({"table": "public.orders", "op": "update", "key": {"id": 7},
                   "changed": ["added", "gone", "status"]})
        );
    }

    #[test]
    fn create_changes_every_column_and_truncate_none() {
        let create = change(DbOp::Create, None, Some(json!({"id": 1, "b": 2})));
        assert_eq!(audit_record(&create, "t")["changed"], json!(["b", "id"]));
        let truncate = change(DbOp::Truncate, None, None);
        assert_eq!(audit_record(&truncate, "t")["changed"], json!([]));
    }

    #[test]
    fn tombstone_takes_table_from_topic_and_has_null_key_when_absent() {
        let mut tombstone = change(DbOp::Tombstone, None, None);
        tombstone.source = DbSource::default();
        tombstone.key = None;
        let table = qualified_table(&tombstone.source, "dbserver1.inventory.customers");
        assert_eq!(table, "inventory.customers");
        let record = audit_record(&tombstone, &table);
        assert_eq!(record["op"], "tombstone");
        assert_eq!(record["key"], Value::Null);
        assert_eq!(qualified_table(&DbSource::default(), "orders"), "orders");
    }

    #[test]
    fn table_falls_back_to_database_name() {
        let source = DbSource {
            db: Some("shop".into()),
            table: Some("items".into()),
            ..DbSource::default()
        };
        assert_eq!(qualified_table(&source, "x.y.z"), "shop.items");
    }
}
