//! `order-enrich`: the second hop of the orders chain.
//!
//! Input: validated orders from `orders.validated` (JSON objects with a numeric `amount`).
//! Output: topic `orders.enriched`, type `weir.order.enriched`: the order plus
//! `"tier": "large"` when `amount >= large_threshold` (else `"small"`) and `"currency"`, keyed by
//! the order's `id` when that is a string, else by the input's key.
//!
//! Config: `large_threshold` (number, default 1000), `currency` (default `EUR`). A config value
//! that does not parse rejects the event (it needs an operator, not a retry). An order without a
//! numeric amount is rejected too: `order-validate` should never let one through.

use serde_json::{Map, Value};
use weir_function::prelude::*;

/// The topic enriched orders go to.
pub const ENRICHED_TOPIC: &str = "orders.enriched";
/// The CloudEvents type of an enriched order.
pub const ENRICHED_TYPE: &str = "weir.order.enriched";
/// `large_threshold` when the config does not set it.
pub const DEFAULT_LARGE_THRESHOLD: f64 = 1000.0;
/// `currency` when the config does not set it.
pub const DEFAULT_CURRENCY: &str = "EUR";

struct OrderEnrich;

impl Function for OrderEnrich {
    fn handle(event: Event, delivery: Delivery) -> Result<Vec<Output>, HandleError> {
        let large_threshold = config::parse_or("large_threshold", DEFAULT_LARGE_THRESHOLD)?;
        let currency = config::get_or("currency", DEFAULT_CURRENCY);
        let order: Map<String, Value> = event.json()?;
        let order = enrich(order, large_threshold, currency).map_err(HandleError::reject)?;
        let key = match order.get("id") {
            Some(Value::String(id)) => Some(id.clone()),
            _ => delivery.key,
        };
        Ok(vec![
            Output::json(ENRICHED_TOPIC, ENRICHED_TYPE, &order)?.with_key(key)
        ])
    }
}

weir_function::export!(OrderEnrich);

fn enrich(
    mut order: Map<String, Value>,
    large_threshold: f64,
    currency: String,
) -> Result<Map<String, Value>, String> {
    let amount = order
        .get("amount")
        .and_then(Value::as_f64)
        .ok_or("order has no numeric `amount`")?;
    let tier = if amount >= large_threshold {
        "large"
    } else {
        "small"
    };
    order.insert("tier".to_owned(), Value::from(tier));
    order.insert("currency".to_owned(), Value::from(currency));
    Ok(order)
}

#[cfg(test)]
mod tests {
    use super::enrich;
    use serde_json::{json, Map, Value};

    fn order(value: Value) -> Map<String, Value> {
        match value {
            Value::Object(map) => map,
            other => panic!("not an object: {other}"),
        }
    }

    #[test]
    fn tier_is_large_from_the_threshold_on() {
        let at = enrich(order(json!({"amount": 1000})), 1000.0, "EUR".into()).unwrap();
        assert_eq!(at["tier"], "large");
        assert_eq!(at["currency"], "EUR");
        let below = enrich(order(json!({"amount": 999.99})), 1000.0, "USD".into()).unwrap();
        assert_eq!(below["tier"], "small");
        assert_eq!(below["currency"], "USD");
        assert_eq!(below["amount"], json!(999.99));
    }

    #[test]
    fn rejects_an_order_without_a_numeric_amount() {
        assert!(enrich(order(json!({"amount": "5"})), 1.0, "EUR".into()).is_err());
    }
}
