//! Dead-letter records: the original event unchanged (or the raw bytes, when it did not
//! decode) plus the `weirdlq*` extensions that say what failed, where and when, so that
//! `weir dlq redrive` can send it back to the function that failed it.
//!
//! Building the record is pure; publishing it (and pausing the lane while the DLQ is
//! unavailable) is the runner's job.

use weir_schemas::{derived_id, ext, Event};

/// Why an event was dead-lettered. The strings are part of the DLQ record format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeadLetterReason {
    RetriesExhausted,
    Rejected,
    Undecodable,
    Timeout,
    Trap,
    HopLimit,
    Expired,
}

impl DeadLetterReason {
    /// Every reason, in the order DESIGN.md lists them.
    pub const ALL: [DeadLetterReason; 7] = [
        DeadLetterReason::RetriesExhausted,
        DeadLetterReason::Rejected,
        DeadLetterReason::Undecodable,
        DeadLetterReason::Timeout,
        DeadLetterReason::Trap,
        DeadLetterReason::HopLimit,
        DeadLetterReason::Expired,
    ];

    /// The reason a record's `weirdlqreason` names.
    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|reason| reason.as_str() == text)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            DeadLetterReason::RetriesExhausted => "retries-exhausted",
            DeadLetterReason::Rejected => "rejected",
            DeadLetterReason::Undecodable => "undecodable",
            DeadLetterReason::Timeout => "timeout",
            DeadLetterReason::Trap => "trap",
            DeadLetterReason::HopLimit => "hop-limit",
            DeadLetterReason::Expired => "expired",
        }
    }
}

/// The broker de-duplication id of `function`'s dead-letter record of `event`: the same when
/// a redelivered event is dead-lettered again (a crash between the record's confirmation and
/// the source's TERM), different for every other function failing the same event and for
/// another source's event with the same id. Several functions' dead-letter topics commonly
/// share one stream (`weir.dlq.>`), where JetStream de-duplicates across subjects. A record of
/// a redriven event also depends on where it was redriven from, so that failing again after a
/// redrive is recorded again (the record redriven may have been removed).
pub fn dedup_id(function: &str, record: &Event) -> String {
    let id = match record.extension(ext::DLQ_REDRIVEN) {
        None => derived_id(&["dlq", function, &record.source, &record.id]),
        Some(from) => derived_id(&["dlq", function, &record.source, &record.id, from]),
    };
    format!("dlq-{id}")
}

/// The most of an error message a record keeps.
pub const MAX_ERROR_BYTES: usize = 1024;

/// What the record says about the failure.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub reason: DeadLetterReason,
    pub error: String,
    pub attempts: u32,
    pub function: String,
    /// sha256 of the function's module.
    pub module: String,
    /// Where the source message sits, e.g. `kafka://topic/partition/offset`.
    pub origin: String,
    /// The topic or subject the source message came in on.
    pub topic: String,
    /// The dead-letter position a redriven event was sent back from (`weir-redrive-from`).
    pub redriven_from: Option<String>,
    /// RFC 3339.
    pub first_failure: String,
    /// RFC 3339.
    pub last_failure: String,
}

/// An input that could not be decoded, kept byte for byte.
#[derive(Debug, Clone)]
pub struct RawInput<'a> {
    pub payload: Option<&'a [u8]>,
    pub content_type: Option<&'a str>,
    pub default_source: &'a str,
}

/// CloudEvents `type` of the record of an undecodable input.
pub const UNDECODABLE_TYPE: &str = "weir.undecodable";

impl DeadLetter {
    /// The record for an event that decoded.
    pub fn record(&self, original: &Event) -> Event {
        let mut record = original.clone();
        self.stamp(&mut record);
        record
    }

    /// The record for an input that did not decode: its bytes unchanged as `data`, with an id
    /// derived from its origin so a redelivery produces the same record.
    pub fn record_raw(&self, raw: &RawInput<'_>) -> Event {
        let mut record = Event::new(
            derived_id(&["undecodable", &self.origin]),
            raw.default_source,
            UNDECODABLE_TYPE,
        );
        record.data = raw.payload.map(<[u8]>::to_vec);
        record.datacontenttype = raw.content_type.map(str::to_owned);
        self.stamp(&mut record);
        record
    }

    fn stamp(&self, record: &mut Event) {
        let ext = &mut record.extensions;
        // An event that was itself a cut-down record (published again by hand) is whole as
        // far as this record goes: only [`shrink`] says what this one left out.
        ext.remove(ext::DLQ_DROPPED);
        ext.remove(ext::DLQ_DROPPED_BYTES);
        ext.insert(ext::DLQ_REASON.to_owned(), self.reason.as_str().to_owned());
        ext.insert(
            ext::DLQ_ERROR.to_owned(),
            self.error[..self.error.floor_char_boundary(MAX_ERROR_BYTES)].to_owned(),
        );
        ext.insert(ext::DLQ_ATTEMPTS.to_owned(), self.attempts.to_string());
        ext.insert(ext::DLQ_FUNCTION.to_owned(), self.function.clone());
        ext.insert(ext::DLQ_MODULE.to_owned(), self.module.clone());
        ext.insert(ext::DLQ_ORIGIN.to_owned(), self.origin.clone());
        ext.insert(ext::DLQ_TOPIC.to_owned(), self.topic.clone());
        match &self.redriven_from {
            Some(from) => ext.insert(ext::DLQ_REDRIVEN.to_owned(), from.clone()),
            // Said by the message it came in, not by an earlier record's extensions.
            None => ext.remove(ext::DLQ_REDRIVEN),
        };
        ext.insert(
            ext::DLQ_FIRST_FAILURE.to_owned(),
            self.first_failure.clone(),
        );
        ext.insert(ext::DLQ_LAST_FAILURE.to_owned(), self.last_failure.clone());
    }
}

/// Cut `record` down for a dead-letter broker that refused it as too large, and say what
/// went: first the data (its size is kept in `weirdlqdroppedbytes`), then the original
/// event's own extensions. The `weirdlq*` extensions always stay: what failed, and
/// `weirdlqorigin`, where the original can still be read for as long as its broker keeps it.
/// `None` when nothing more can go.
pub fn shrink(record: &mut Event) -> Option<&'static str> {
    let dropped_before = record.extensions.get(ext::DLQ_DROPPED).cloned();
    let mut dropped: Vec<&str> = dropped_before
        .as_deref()
        .map(|list| list.split(',').collect())
        .unwrap_or_default();
    let went = if record.data.as_ref().is_some_and(|data| !data.is_empty()) {
        let bytes = record.data.take().map_or(0, |data| data.len());
        record
            .extensions
            .insert(ext::DLQ_DROPPED_BYTES.to_owned(), bytes.to_string());
        "data"
    } else if record
        .extensions
        .keys()
        .any(|name| !ext::is_dead_letter(name))
    {
        record
            .extensions
            .retain(|name, _| ext::is_dead_letter(name));
        "extensions"
    } else {
        return None;
    };
    dropped.push(went);
    record
        .extensions
        .insert(ext::DLQ_DROPPED.to_owned(), dropped.join(","));
    Some(went)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn letter(reason: DeadLetterReason, error: String) -> DeadLetter {
        DeadLetter {
            reason,
            error,
            attempts: 3,
            function: "f".into(),
            module: "abc".into(),
            origin: "memory://orders/7".into(),
            topic: "orders".into(),
            redriven_from: None,
            first_failure: "2024-01-01T00:00:00Z".into(),
            last_failure: "2024-01-01T00:00:02Z".into(),
        }
    }

    #[test]
    fn record_keeps_the_original_and_adds_every_extension() {
        let mut original = Event::new("e1", "s", "t");
        original.data = Some(b"{}".to_vec());
        let record = letter(DeadLetterReason::RetriesExhausted, "boom".into()).record(&original);
        assert_eq!(record.id, "e1");
        assert_eq!(record.data, original.data);
        for (k, v) in [
            (ext::DLQ_REASON, "retries-exhausted"),
            (ext::DLQ_ERROR, "boom"),
            (ext::DLQ_ATTEMPTS, "3"),
            (ext::DLQ_FUNCTION, "f"),
            (ext::DLQ_MODULE, "abc"),
            (ext::DLQ_ORIGIN, "memory://orders/7"),
            (ext::DLQ_TOPIC, "orders"),
            (ext::DLQ_FIRST_FAILURE, "2024-01-01T00:00:00Z"),
            (ext::DLQ_LAST_FAILURE, "2024-01-01T00:00:02Z"),
        ] {
            assert_eq!(record.extension(k), Some(v), "{k}");
        }
        assert_eq!(record.extension(ext::DLQ_REDRIVEN), None);
    }

    #[test]
    fn a_redriven_event_that_fails_again_gets_a_record_of_its_own() {
        let original = Event::new("e1", "s", "t");
        let first = letter(DeadLetterReason::Rejected, "no".into()).record(&original);
        let again = letter(DeadLetterReason::Rejected, "no".into()).record(&original);
        assert_eq!(dedup_id("f", &first), dedup_id("f", &again));
        let redriven = DeadLetter {
            redriven_from: Some("jetstream://DLQ/4".into()),
            ..letter(DeadLetterReason::Rejected, "no".into())
        };
        let after_redrive = redriven.record(&original);
        assert_eq!(
            after_redrive.extension(ext::DLQ_REDRIVEN),
            Some("jetstream://DLQ/4")
        );
        assert_ne!(dedup_id("f", &first), dedup_id("f", &after_redrive));
        let redriven_elsewhere = DeadLetter {
            redriven_from: Some("jetstream://DLQ/9".into()),
            ..letter(DeadLetterReason::Rejected, "no".into())
        };
        assert_ne!(
            dedup_id("f", &after_redrive),
            dedup_id("f", &redriven_elsewhere.record(&original))
        );
        // A record of a record says only how this failure came in.
        let plain_again = letter(DeadLetterReason::Rejected, "no".into()).record(&after_redrive);
        assert_eq!(plain_again.extension(ext::DLQ_REDRIVEN), None);
    }

    #[test]
    fn errors_are_clipped_to_one_kib_on_a_char_boundary() {
        let record =
            letter(DeadLetterReason::Trap, "é".repeat(1000)).record(&Event::new("e", "s", "t"));
        let error = record.extension(ext::DLQ_ERROR).unwrap();
        assert!(error.len() <= MAX_ERROR_BYTES && error.len() >= MAX_ERROR_BYTES - 1);
    }

    #[test]
    fn raw_records_keep_bytes_and_have_stable_ids() {
        let raw = RawInput {
            payload: Some(b"\xff\x00not json"),
            content_type: Some("application/json"),
            default_source: "weir://memory/orders",
        };
        let a = letter(DeadLetterReason::Undecodable, "bad".into()).record_raw(&raw);
        let b = letter(DeadLetterReason::Undecodable, "bad".into()).record_raw(&raw);
        assert_eq!(a.id, b.id);
        assert_eq!(a.data.as_deref(), Some(&b"\xff\x00not json"[..]));
        assert_eq!(a.ty, UNDECODABLE_TYPE);
    }

    #[test]
    fn shrinking_drops_the_data_then_the_originals_extensions_never_the_failure() {
        let mut original = Event::new("e1", "s", "t");
        original.data = Some(vec![7; 5000]);
        original.datacontenttype = Some("application/octet-stream".into());
        original
            .extensions
            .insert(ext::TRACEPARENT.into(), "00-abc-def-01".into());
        let mut record = letter(DeadLetterReason::Rejected, "no".into()).record(&original);

        assert_eq!(shrink(&mut record), Some("data"));
        assert_eq!(record.data, None);
        assert_eq!(record.extension(ext::DLQ_DROPPED), Some("data"));
        assert_eq!(record.extension(ext::DLQ_DROPPED_BYTES), Some("5000"));
        assert_eq!(record.extension(ext::TRACEPARENT), Some("00-abc-def-01"));
        assert_eq!(
            record.datacontenttype.as_deref(),
            Some("application/octet-stream")
        );

        assert_eq!(shrink(&mut record), Some("extensions"));
        assert_eq!(record.extension(ext::TRACEPARENT), None);
        assert_eq!(record.extension(ext::DLQ_DROPPED), Some("data,extensions"));
        assert_eq!(record.extension(ext::DLQ_DROPPED_BYTES), Some("5000"));
        for kept in [
            ext::DLQ_REASON,
            ext::DLQ_ERROR,
            ext::DLQ_ORIGIN,
            ext::DLQ_FUNCTION,
        ] {
            assert!(record.extension(kept).is_some(), "{kept}");
        }
        assert_eq!((record.id.as_str(), record.ty.as_str()), ("e1", "t"));

        assert_eq!(shrink(&mut record), None);
    }

    #[test]
    fn a_cut_down_record_sent_again_makes_a_record_that_claims_nothing_dropped() {
        let mut original = Event::new("e1", "s", "t");
        original.data = Some(vec![7; 10]);
        let mut first = letter(DeadLetterReason::Rejected, "no".into()).record(&original);
        assert_eq!(shrink(&mut first), Some("data"));
        let second = letter(DeadLetterReason::Rejected, "again".into()).record(&first);
        assert_eq!(second.extension(ext::DLQ_DROPPED), None);
        assert_eq!(second.extension(ext::DLQ_DROPPED_BYTES), None);
        assert_eq!(second.extension(ext::DLQ_ERROR), Some("again"));
    }

    #[test]
    fn a_record_without_data_shrinks_by_its_extensions_first() {
        let mut original = Event::new("e1", "s", "t");
        original.extensions.insert("tenant".into(), "x".repeat(900));
        let mut record = letter(DeadLetterReason::Trap, "trap".into()).record(&original);
        assert_eq!(shrink(&mut record), Some("extensions"));
        assert_eq!(record.extension(ext::DLQ_DROPPED), Some("extensions"));
        assert_eq!(record.extension(ext::DLQ_DROPPED_BYTES), None);
        assert_eq!(shrink(&mut record), None);
    }
}
