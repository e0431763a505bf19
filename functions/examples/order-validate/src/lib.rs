//! `order-validate`: the first hop of the orders chain.
//!
//! Input: custom `orders` events whose data is a JSON object. An order is valid when it has a
//! numeric, non-negative `amount`. Anything else is rejected (dead-lettered at once, no retries)
//! with the precise reason. A valid order goes on to topic `orders.validated`, type
//! `weir.order.validated`: the same JSON object plus `"validated": true`, keyed by the order's
//! `id` when that is a string. Reads no config. It checks only what the next hop relies on; it
//! is not a schema validator.

use serde_json::{Map, Value};
use weir_function::prelude::*;

/// The topic valid orders go to.
pub const VALIDATED_TOPIC: &str = "orders.validated";
/// The CloudEvents type of a validated order.
pub const VALIDATED_TYPE: &str = "weir.order.validated";

struct OrderValidate;

impl Function for OrderValidate {
    fn handle(event: Event, _delivery: Delivery) -> Result<Vec<Output>, HandleError> {
        let order: Value = event.json()?;
        let mut order = validate(order).map_err(HandleError::reject)?;
        let key = order.get("id").and_then(Value::as_str).map(str::to_owned);
        order.insert("validated".to_owned(), Value::Bool(true));
        Ok(vec![
            Output::json(VALIDATED_TOPIC, VALIDATED_TYPE, &order)?.with_key(key)
        ])
    }
}

weir_function::export!(OrderValidate);

/// The order as a JSON object, or why it is invalid.
fn validate(order: Value) -> Result<Map<String, Value>, String> {
    let Value::Object(order) = order else {
        return Err(format!(
            "order is not a JSON object (got {})",
            json_kind(&order)
        ));
    };
    let amount = match order.get("amount") {
        None => return Err("order has no `amount` field".to_owned()),
        Some(Value::Number(amount)) => amount,
        Some(other) => {
            return Err(format!(
                "order `amount` is not a number (got {})",
                json_kind(other)
            ))
        }
    };
    // Any JSON number (integer or float) is representable as f64 for the sign check.
    if amount.as_f64().is_some_and(|value| value < 0.0) {
        return Err(format!("order `amount` is negative: {amount}"));
    }
    Ok(order)
}

fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::validate;
    use serde_json::json;

    #[test]
    fn accepts_a_non_negative_numeric_amount() {
        let order = validate(json!({"id": "o-1", "amount": 0})).unwrap();
        assert_eq!(order["amount"], json!(0));
        assert!(validate(json!({"amount": 12.5})).is_ok());
    }

    #[test]
    fn rejects_with_a_precise_reason() {
        assert_eq!(
            validate(json!([1, 2])).unwrap_err(),
            "order is not a JSON object (got an array)"
        );
        assert_eq!(
            validate(json!({"id": "o-1"})).unwrap_err(),
            "order has no `amount` field"
        );
        assert_eq!(
            validate(json!({"amount": "12"})).unwrap_err(),
            "order `amount` is not a number (got a string)"
        );
        assert_eq!(
            validate(json!({"amount": -3})).unwrap_err(),
            "order `amount` is negative: -3"
        );
    }
}
