//! Events a function asks the host to publish.
//!
//! An output names its topic (which must be among the function's allowed outputs, or the host
//! fails the invocation), an optional key and the event. The SDK leaves the event's `id` and
//! `source` empty on purpose: the host sets `id` deterministically from the input id, the
//! function and the output's position (so a redelivered input yields the same output ids and
//! brokers can deduplicate), fills `source` when empty, and stamps `specversion`, `weirhops`,
//! `weircausation` and `traceparent`. Keys: without one, Kafka outputs are keyed by the output
//! id; JetStream outputs carry the key as the `partitionkey` extension.

use serde::Serialize;
use weir_schemas::Event;

use crate::DataError;

/// An event to publish on `topic`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    pub topic: String,
    pub key: Option<String>,
    pub event: Event,
}

impl Output {
    /// Publish `event` on `topic`, unkeyed. `event.id` may be left empty: the host sets it.
    pub fn new(topic: impl Into<String>, event: Event) -> Self {
        Output {
            topic: topic.into(),
            key: None,
            event,
        }
    }

    /// Publish `value` as JSON (`datacontenttype: application/json`) in a new event of
    /// CloudEvents type `ty` on `topic`, unkeyed.
    pub fn json<T: Serialize + ?Sized>(
        topic: impl Into<String>,
        ty: impl Into<String>,
        value: &T,
    ) -> Result<Self, DataError> {
        let data = serde_json::to_vec(value).map_err(DataError::Encode)?;
        let mut event = Event::new("", "", ty);
        event.datacontenttype = Some("application/json".to_owned());
        event.data = Some(data);
        Ok(Output::new(topic, event))
    }

    /// Key the output (Kafka message key; ordering key for `ordering = "key"` consumers).
    /// Takes a string or an `Option` of one, so `.with_key(delivery.key.clone())` forwards an
    /// input's key and `None` leaves the output unkeyed.
    pub fn with_key(mut self, key: impl OutputKey) -> Self {
        self.key = key.into_output_key();
        self
    }
}

/// What [`Output::with_key`] accepts: a string, or an optional one.
pub trait OutputKey {
    fn into_output_key(self) -> Option<String>;
}

impl OutputKey for String {
    fn into_output_key(self) -> Option<String> {
        Some(self)
    }
}

impl OutputKey for &str {
    fn into_output_key(self) -> Option<String> {
        Some(self.to_owned())
    }
}

impl OutputKey for &String {
    fn into_output_key(self) -> Option<String> {
        Some(self.clone())
    }
}

impl<K: OutputKey> OutputKey for Option<K> {
    fn into_output_key(self) -> Option<String> {
        self.and_then(OutputKey::into_output_key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_output_carries_json_data_and_leaves_identity_to_the_host() {
        let output = Output::json("t", "my.type", &serde_json::json!({"a": 1})).unwrap();
        assert_eq!(output.topic, "t");
        assert_eq!(output.key, None);
        assert_eq!(output.event.ty, "my.type");
        assert_eq!(output.event.id, "");
        assert_eq!(output.event.source, "");
        assert_eq!(output.event.specversion, "1.0");
        assert_eq!(
            output.event.datacontenttype.as_deref(),
            Some("application/json")
        );
        assert_eq!(output.event.data.as_deref(), Some(&br#"{"a":1}"#[..]));
    }

    #[test]
    fn with_key_accepts_strings_and_options() {
        let output = || Output::new("t", Event::new("", "", "x"));
        assert_eq!(output().with_key("k").key.as_deref(), Some("k"));
        assert_eq!(
            output().with_key(String::from("k")).key.as_deref(),
            Some("k")
        );
        assert_eq!(output().with_key(Some("k")).key.as_deref(), Some("k"));
        assert_eq!(output().with_key("k").with_key(None::<String>).key, None);
    }
}
