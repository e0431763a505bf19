//! Chaining: turning what a function returned into events fit to publish.
//!
//! Every output gets a deterministic id (from the input's source and id, the function and the
//! output's index) so a redelivered input republishes the *same* outputs and brokers can
//! de-duplicate them; `weirhops` counts the chain depth (checked against the hop limit before
//! a function runs), `weircausation` names the input and `traceparent` carries the original
//! trace.
//!
//! It does not publish anything and does not check allow-lists (see [`check_outputs`] for the
//! rules, applied by the runner before anything leaves).

use weir_schemas::{derived_id, ext, Event, SPECVERSION};

/// The chain depth of an event (0 when it came from outside Weir).
pub fn hops(event: &Event) -> u32 {
    event
        .extension(ext::HOPS)
        .and_then(|h| h.parse().ok())
        .unwrap_or(0)
}

/// A W3C `traceparent` for an event that arrived without one, derived from its source and id
/// so a redelivery keeps the same trace. (An id is unique only within its source: two
/// producers' event "1" are two events and must not share a trace.)
pub fn traceparent_for(event: &Event) -> String {
    let trace = trace_id_for(event);
    let span = &derived_id(&["span", &event.source, &event.id])[..16];
    format!("00-{trace}-{span}-01")
}

/// The trace id `traceparent_for` gives an event.
fn trace_id_for(event: &Event) -> String {
    derived_id(&["trace", &event.source, &event.id])
}

/// The trace id (the second field) of a `traceparent`.
pub fn trace_id(traceparent: &str) -> Option<&str> {
    traceparent.split('-').nth(1)
}

/// An output ready to publish.
#[derive(Debug, Clone)]
pub struct ChainedOutput {
    pub topic: String,
    /// The function's key, else the output's id (Kafka needs a key for stable partitioning).
    pub key: String,
    pub event: Event,
}

/// Stamp the outputs of `function` handling `input`.
pub fn chain_outputs(
    function: &str,
    input: &Event,
    outputs: Vec<(String, Option<String>, Event)>,
    now_rfc3339: &str,
) -> Vec<ChainedOutput> {
    let next_hops = (hops(input) + 1).to_string();
    // Only the trace id carries over (each output names its own span), so an input without
    // a traceparent needs only the trace half of `traceparent_for`.
    let derived_trace;
    let input_trace = match input.extension(ext::TRACEPARENT) {
        Some(traceparent) => trace_id(traceparent),
        None => {
            derived_trace = trace_id_for(input);
            Some(derived_trace.as_str())
        }
    };
    outputs
        .into_iter()
        .enumerate()
        .map(|(index, (topic, key, mut event))| {
            // CloudEvents makes an id unique only within its source: two producers' event
            // "1" are different events, and outputs sharing an id would be de-duplicated away
            // by the broker (JetStream's `Nats-Msg-Id`).
            event.id = derived_id(&[&input.source, &input.id, function, &index.to_string()]);
            if event.source.is_empty() {
                event.source = format!("weir://function/{function}");
            }
            if event.ty.is_empty() {
                event.ty = format!("weir.{function}.output");
            }
            // Guests echo it back as a rule: no new string for it then.
            if event.specversion != SPECVERSION {
                event.specversion = SPECVERSION.to_owned();
            }
            if event.time.is_none() {
                event.time = Some(now_rfc3339.to_owned());
            }
            event
                .extensions
                .insert(ext::HOPS.to_owned(), next_hops.clone());
            event
                .extensions
                .insert(ext::CAUSATION.to_owned(), input.id.clone());
            // Keep the trace id; name this hop's span after the output so retries agree.
            let span = &event.id[..16];
            let trace = input_trace.unwrap_or(&event.id);
            event
                .extensions
                .insert(ext::TRACEPARENT.to_owned(), format!("00-{trace}-{span}-01"));
            let key = key.unwrap_or_else(|| event.id.clone());
            ChainedOutput { topic, key, event }
        })
        .collect()
}

/// Limits on what one invocation may emit.
#[derive(Debug, Clone)]
pub struct OutputRules {
    /// Patterns as [`crate::config::topic_matches`] reads them.
    pub allowed_topics: Vec<String>,
    pub max_outputs: usize,
    pub max_output_bytes: usize,
}

impl OutputRules {
    pub fn allows(&self, topic: &str) -> bool {
        self.allowed_topics
            .iter()
            .any(|pattern| crate::config::topic_matches(pattern, topic))
    }
}

/// Check outputs against the rules; the error says which rule broke and how.
pub fn check_outputs<'a>(
    rules: &OutputRules,
    outputs: impl ExactSizeIterator<Item = (&'a str, usize)>,
) -> Result<(), String> {
    if outputs.len() > rules.max_outputs {
        return Err(format!(
            "{} outputs exceed the limit of {}",
            outputs.len(),
            rules.max_outputs
        ));
    }
    let mut total = 0usize;
    for (topic, bytes) in outputs {
        if !rules.allows(topic) {
            return Err(format!(
                "topic {topic:?} is not in the function's allowed outputs {:?}",
                rules.allowed_topics
            ));
        }
        total = total.saturating_add(bytes);
    }
    if total > rules.max_output_bytes {
        return Err(format!(
            "outputs carry {total} bytes, over the limit of {}",
            rules.max_output_bytes
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input() -> Event {
        let mut e = Event::new("in-1", "test", "t");
        e.extensions.insert(
            ext::TRACEPARENT.into(),
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into(),
        );
        e
    }

    #[test]
    fn outputs_are_deterministic_and_stamped() {
        let out = || {
            vec![
                ("a".to_owned(), None, Event::new("", "", "x")),
                (
                    "b".to_owned(),
                    Some("k".to_owned()),
                    Event::new("", "", "y"),
                ),
            ]
        };
        let first = chain_outputs("f", &input(), out(), "2024-01-01T00:00:00Z");
        let again = chain_outputs("f", &input(), out(), "2024-01-01T00:00:01Z");
        assert_eq!(first[0].event.id, again[0].event.id);
        assert_ne!(first[0].event.id, first[1].event.id);
        let mut elsewhere = input();
        elsewhere.source = format!("{}-elsewhere", elsewhere.source);
        let other = chain_outputs("f", &elsewhere, out(), "2024-01-01T00:00:00Z");
        assert_ne!(
            first[0].event.id, other[0].event.id,
            "the same id from another source is another event"
        );
        let other_function = chain_outputs("g", &input(), out(), "2024-01-01T00:00:00Z");
        assert_ne!(first[0].event.id, other_function[0].event.id);
        assert_eq!(first[0].event.extension(ext::HOPS), Some("1"));
        assert_eq!(first[0].event.extension(ext::CAUSATION), Some("in-1"));
        let tp = first[1].event.extension(ext::TRACEPARENT).unwrap();
        assert_eq!(trace_id(tp), Some("4bf92f3577b34da6a3ce929d0e0e4736"));
        assert_eq!(first[0].key, first[0].event.id);
        assert_eq!(first[1].key, "k");
        assert_eq!(first[0].event.source, "weir://function/f");
    }

    #[test]
    fn an_input_without_a_trace_gets_one_from_its_source_and_id() {
        let untraced = |source: &str| {
            let event = Event::new("1", source, "t");
            let out = chain_outputs(
                "f",
                &event,
                vec![("t".into(), None, Event::new("", "", "x"))],
                "t",
            );
            let traceparent = out[0].event.extension(ext::TRACEPARENT).unwrap().to_owned();
            (traceparent_for(&event), traceparent)
        };
        let (a, a_output) = untraced("producer-a");
        let (again, _) = untraced("producer-a");
        let (b, _) = untraced("producer-b");
        assert_eq!(a, again, "a redelivery keeps its trace");
        assert_eq!(
            trace_id(&a),
            trace_id(&a_output),
            "the output carries the input's trace"
        );
        assert_ne!(
            trace_id(&a),
            trace_id(&b),
            "another source's event 1 is another trace"
        );
        assert_eq!(a.len(), 55, "a W3C traceparent: {a}");
    }

    #[test]
    fn hops_accumulate() {
        let mut e = input();
        e.extensions.insert(ext::HOPS.into(), "1".into());
        let out = chain_outputs(
            "g",
            &e,
            vec![("t".into(), None, Event::new("", "s", "x"))],
            "t",
        );
        assert_eq!(hops(&out[0].event), 2);
    }

    #[test]
    fn rules_check_topics_counts_and_bytes() {
        let rules = OutputRules {
            allowed_topics: vec!["orders.ok".into(), "audit.>".into()],
            max_outputs: 2,
            max_output_bytes: 10,
        };
        assert!(check_outputs(&rules, [("orders.ok", 3), ("audit.x", 3)].into_iter()).is_ok());
        assert!(check_outputs(&rules, [("orders.bad", 1)].into_iter())
            .unwrap_err()
            .contains("orders.bad"));
        assert!(check_outputs(&rules, [("audit.", 1)].into_iter()).is_err());
        assert!(check_outputs(&rules, [("orders.ok", 1); 3].into_iter())
            .unwrap_err()
            .contains("limit of 2"));
        assert!(check_outputs(&rules, [("orders.ok", 11)].into_iter())
            .unwrap_err()
            .contains("11 bytes"));
    }
}
