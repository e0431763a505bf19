//! Weir's event vocabulary, with no I/O.
//!
//! This crate is the one place that knows what an event *is* on the wire and in memory:
//! the CloudEvents 1.0 envelope ([`Event`]), the typed payloads Weir recognises
//! ([`DbChange`] from Debezium, [`Upload`] from S3/MinIO notifications), the wire codecs
//! (CloudEvents binary and structured mode, Debezium and S3 JSON) and the MessagePack codec for
//! typed payloads and Weir's own records. The WIT world `weir:function` lives in `wit/`.
//!
//! It deliberately does no I/O and depends on neither tokio, wasmtime nor any broker client, so
//! the guest SDK (compiled to wasm32-wasip2) uses the very same types and codecs as the host.

pub mod cloudevents;
pub mod codec;
pub mod debezium;
pub mod error;
pub mod event;
pub mod s3;
pub mod wire;

pub use cloudevents::HeaderPair;
pub use debezium::{DbChange, DbOp, DbSource};
pub use error::DecodeError;
pub use error::EncodeError;
pub use event::{derived_id, Event, SPECVERSION};
pub use event::{is_rfc3339, rfc3339_from_unix_millis};
pub use s3::Upload;
pub use wire::{
    decode, detect, encode_binary, encode_structured, Detected, Format, HeaderStyle, WireMessage,
    CUSTOM_TYPE,
};

/// The WIT package text of `weir:function`, for hosts that want to show or check it.
pub const WIT: &str = include_str!("../wit/function.wit");

/// CloudEvents `type` of an event whose `data` is a MessagePack [`DbChange`].
pub const DB_CHANGE_TYPE: &str = "weir.db.change";
/// `datacontenttype` of a MessagePack [`DbChange`].
pub const DB_CHANGE_CONTENT_TYPE: &str = "application/vnd.weir.dbchange+msgpack";
/// CloudEvents `type` of an event whose `data` is a MessagePack [`Upload`].
pub const UPLOAD_TYPE: &str = "weir.upload";
/// `datacontenttype` of a MessagePack [`Upload`].
pub const UPLOAD_CONTENT_TYPE: &str = "application/vnd.weir.upload+msgpack";

/// Names of Weir's own CloudEvents extension attributes.
pub mod ext {
    /// Chain depth: 0 (or absent) for an event published from outside, +1 per function hop.
    pub const HOPS: &str = "weirhops";
    /// Id of the event whose handling produced this one.
    pub const CAUSATION: &str = "weircausation";
    /// W3C trace context, carried unchanged along a chain.
    pub const TRACEPARENT: &str = "traceparent";
    /// Key for ordering when the broker gives none (CloudEvents partitioning extension).
    pub const PARTITION_KEY: &str = "partitionkey";

    pub const DLQ_REASON: &str = "weirdlqreason";
    pub const DLQ_ERROR: &str = "weirdlqerror";
    pub const DLQ_ATTEMPTS: &str = "weirdlqattempts";
    pub const DLQ_FUNCTION: &str = "weirdlqfunction";
    pub const DLQ_MODULE: &str = "weirdlqmodule";
    pub const DLQ_ORIGIN: &str = "weirdlqorigin";
    pub const DLQ_FIRST_FAILURE: &str = "weirdlqfirstfailure";
    pub const DLQ_LAST_FAILURE: &str = "weirdlqlastfailure";
    /// What a record left out because its dead-letter broker refused it whole as too large:
    /// `data`, `extensions` (the original event's own), or both, comma-separated.
    pub const DLQ_DROPPED: &str = "weirdlqdropped";
    /// How many bytes of data a record left out (with `data` in [`DLQ_DROPPED`]).
    pub const DLQ_DROPPED_BYTES: &str = "weirdlqdroppedbytes";
    /// The topic (or subject) the failed message came in on: where `weir dlq redrive` sends
    /// the event back, which the origin does not say for a JetStream message.
    pub const DLQ_TOPIC: &str = "weirdlqtopic";
    /// On the record of an event that was itself redriven: the dead-letter position it was
    /// redriven from. Part of the record's de-duplication id, so that failing again after a
    /// redrive makes a new record rather than a duplicate of the one redriven.
    pub const DLQ_REDRIVEN: &str = "weirdlqredriven";

    /// Every name above: what a receiver of Weir's events may find that Weir set.
    pub const ALL: &[&str] = &[
        HOPS,
        CAUSATION,
        TRACEPARENT,
        PARTITION_KEY,
        DLQ_REASON,
        DLQ_ERROR,
        DLQ_ATTEMPTS,
        DLQ_FUNCTION,
        DLQ_MODULE,
        DLQ_ORIGIN,
        DLQ_FIRST_FAILURE,
        DLQ_LAST_FAILURE,
        DLQ_DROPPED,
        DLQ_DROPPED_BYTES,
        DLQ_TOPIC,
        DLQ_REDRIVEN,
    ];

    /// Whether `name` is one of the `weirdlq*` extensions a dead-letter record adds to the
    /// original event (what a redrive takes off again).
    pub fn is_dead_letter(name: &str) -> bool {
        name.starts_with("weirdlq")
    }

    #[cfg(test)]
    mod tests {
        /// CloudEvents: names of lowercase letters and digits that SHOULD NOT exceed 20
        /// characters. Weir accepts longer ones from others but keeps to it itself.
        #[test]
        fn weirs_own_extension_names_are_valid_and_at_most_twenty_characters() {
            for name in super::ALL {
                assert!(crate::event::check_extension_name(name).is_ok(), "{name}");
                assert!(name.len() <= 20, "{name} is {} characters", name.len());
            }
        }
    }
}
