//! The boundary between the generated WIT types and the SDK's types: converts the input once,
//! calls the user's [`Function`], converts the outputs back. Nothing else lives here.

use std::collections::BTreeMap;

use weir_schemas::Event;

use crate::bindings::weir::function::types as wit;
use crate::{Delivery, Function, HandleError, Output};

/// Called by the code [`export!`](crate::export) generates for each `handle` call.
pub fn dispatch<F: Function>(
    event: wit::Event,
    delivery: wit::Delivery,
) -> Result<Vec<wit::Output>, wit::HandleError> {
    match F::handle(event_from_wit(event), Delivery::from(delivery)) {
        Ok(outputs) => Ok(outputs.into_iter().map(output_to_wit).collect()),
        Err(HandleError::Retry(reason)) => Err(wit::HandleError::Retry(reason)),
        Err(HandleError::Reject(reason)) => Err(wit::HandleError::Reject(reason)),
    }
}

fn event_from_wit(event: wit::Event) -> Event {
    Event {
        id: event.id,
        source: event.source,
        ty: event.type_,
        specversion: event.specversion,
        subject: event.subject,
        time: event.time,
        datacontenttype: event.datacontenttype,
        dataschema: event.dataschema,
        data: event.data,
        // Duplicate extension names cannot come from a valid CloudEvent; the last one wins.
        extensions: event.extensions.into_iter().collect::<BTreeMap<_, _>>(),
    }
}

fn event_to_wit(event: Event) -> wit::Event {
    wit::Event {
        id: event.id,
        source: event.source,
        type_: event.ty,
        specversion: event.specversion,
        subject: event.subject,
        time: event.time,
        datacontenttype: event.datacontenttype,
        dataschema: event.dataschema,
        data: event.data,
        extensions: event.extensions.into_iter().collect(),
    }
}

fn output_to_wit(output: Output) -> wit::Output {
    wit::Output {
        topic: output.topic,
        key: output.key,
        event: event_to_wit(output.event),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Broker, EventExt};

    fn wit_event() -> wit::Event {
        wit::Event {
            id: "in-1".into(),
            source: "weir://memory/orders".into(),
            type_: "orders".into(),
            specversion: "1.0".into(),
            subject: Some("o-1".into()),
            time: None,
            datacontenttype: Some("application/json".into()),
            dataschema: None,
            data: Some(br#"{"amount":5}"#.to_vec()),
            extensions: vec![("weirhops".into(), "1".into()), ("a".into(), "b".into())],
        }
    }

    fn wit_delivery(attempt: u32) -> wit::Delivery {
        wit::Delivery {
            broker: wit::Broker::Kafka,
            topic: "orders".into(),
            key: Some("k".into()),
            attempt,
        }
    }

    /// Echoes the input on `out` while attempt is 1, asks for a retry on 2, rejects after.
    struct Probe;

    impl Function for Probe {
        fn handle(event: Event, delivery: Delivery) -> Result<Vec<Output>, HandleError> {
            assert_eq!(delivery.broker, Broker::Kafka);
            assert_eq!(event.extension("weirhops"), Some("1"));
            assert_eq!(event.json::<serde_json::Value>().unwrap()["amount"], 5);
            match delivery.attempt {
                1 => Ok(vec![Output::new("out", event).with_key(delivery.key)]),
                2 => Err(HandleError::retry("again")),
                _ => Err(HandleError::reject("no")),
            }
        }
    }

    #[test]
    fn dispatch_round_trips_the_event_and_keeps_every_attribute() {
        let outputs = dispatch::<Probe>(wit_event(), wit_delivery(1)).unwrap();
        assert_eq!(outputs.len(), 1);
        let output = &outputs[0];
        assert_eq!(output.topic, "out");
        assert_eq!(output.key.as_deref(), Some("k"));
        let original = wit_event();
        let event = &output.event;
        assert_eq!(event.id, original.id);
        assert_eq!(event.type_, original.type_);
        assert_eq!(event.subject, original.subject);
        assert_eq!(event.data, original.data);
        // Extensions come back sorted by name: one canonical order on every path.
        assert_eq!(
            event.extensions,
            vec![("a".into(), "b".into()), ("weirhops".into(), "1".into())]
        );
    }

    #[test]
    fn dispatch_maps_retry_and_reject_to_the_wit_variants() {
        match dispatch::<Probe>(wit_event(), wit_delivery(2)) {
            Err(wit::HandleError::Retry(reason)) => assert_eq!(reason, "again"),
            other => panic!("expected retry, got {other:?}"),
        }
        match dispatch::<Probe>(wit_event(), wit_delivery(3)) {
            Err(wit::HandleError::Reject(reason)) => assert_eq!(reason, "no"),
            other => panic!("expected reject, got {other:?}"),
        }
    }
}
