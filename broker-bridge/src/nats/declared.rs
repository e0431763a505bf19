//! The JetStream streams this process declared, remembered so that one deleted while Weir runs
//! is created again.
//!
//! A declared stream is the operator's statement that it should exist: [`super::ensure_stream`]
//! creates it at start-up, and a fetcher whose stream has gone, or a confirmed publish that
//! finds no stream for its subject, creates it again from the same declaration. A subscription
//! or an output topic then heals by itself instead of failing until a restart.
//!
//! It only ever creates a *missing* stream, with the declared settings; it never changes an
//! existing one (that stays the operator's decision, as at start-up), and it cannot bring back
//! what the deleted stream held. A stream that is not declared is not re-created: Weir does not
//! guess settings.

use std::sync::{Arc, Mutex, PoisonError};

use async_nats::jetstream::Context;

use super::config::StreamConfig;
use super::{ensure_stream, events};
use crate::TransportError;

/// The declarations [`super::ensure_stream`] saw, shared by every clone of the transport and
/// by the fetchers and publishers made from it.
#[derive(Debug, Clone, Default)]
pub(super) struct DeclaredStreams {
    streams: Arc<Mutex<Vec<StreamConfig>>>,
    /// Several fetchers on one stream find it gone at the same moment; one re-creation at a
    /// time lets the first create it and the others find it there (one warning, one count).
    recreating: Arc<tokio::sync::Mutex<()>>,
}

impl DeclaredStreams {
    /// Remembers `config`, replacing an earlier declaration of the same name.
    pub(super) fn remember(&self, config: &StreamConfig) {
        let mut streams = self.lock();
        match streams.iter_mut().find(|known| known.name == config.name) {
            Some(known) => *known = config.clone(),
            None => streams.push(config.clone()),
        }
    }

    /// The declaration of the stream called `name`.
    pub(super) fn named(&self, name: &str) -> Option<StreamConfig> {
        self.lock().iter().find(|known| known.name == name).cloned()
    }

    /// The declaration of a stream whose subjects capture `subject`.
    pub(super) fn capturing(&self, subject: &str) -> Option<StreamConfig> {
        self.lock()
            .iter()
            .find(|known| {
                known
                    .subjects
                    .iter()
                    .any(|pattern| subject_covers(pattern, subject))
            })
            .cloned()
    }

    /// Creates the declared stream `config` if it is still missing; true when this call
    /// created it. `found_by` says who noticed (a `subscription` or a `publish`).
    pub(super) async fn recreate(
        &self,
        jetstream: &Context,
        config: &StreamConfig,
        found_by: &'static str,
    ) -> Result<bool, TransportError> {
        let _one_at_a_time = self.recreating.lock().await;
        let report = ensure_stream(jetstream, config).await?;
        if report.created {
            events::record_stream_recreated(&config.name, found_by);
        }
        Ok(report.created)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<StreamConfig>> {
        // A panic while holding this lock cannot leave the list half-written (each change is
        // one push or one assignment), so a poisoned lock is still a valid list.
        self.streams.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Whether every subject `filter` matches is one `pattern` matches (NATS wildcards: `*` one
/// token, `>` one or more trailing tokens). With a literal subject as `filter`, whether
/// `pattern` matches it: whether a stream with that subject captures a publish to it.
pub fn subject_covers(pattern: &str, filter: &str) -> bool {
    let mut pattern_tokens = pattern.split('.');
    let mut filter_tokens = filter.split('.');
    loop {
        match (pattern_tokens.next(), filter_tokens.next()) {
            (None, None) => return true,
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(token)) if token != ">" => continue,
            (Some(p), Some(f)) if p == f => continue,
            _ => return false,
        }
    }
}

/// Whether some subject matches both patterns (NATS wildcards: `*` one token, `>` one or more
/// trailing tokens). Weir's topic rules on Kafka and the memory bus use the same tokens.
pub fn subjects_overlap(a: &str, b: &str) -> bool {
    let mut a_tokens = a.split('.');
    let mut b_tokens = b.split('.');
    loop {
        match (a_tokens.next(), b_tokens.next()) {
            (None, None) => return true,
            (Some(">"), Some(_)) | (Some(_), Some(">")) => return true,
            (Some(x), Some(y)) if x == y || x == "*" || y == "*" => continue,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn overlap_follows_nats_wildcards() {
        assert!(subjects_overlap("orders", "orders"));
        assert!(subjects_overlap("orders.>", "orders.*"));
        assert!(subjects_overlap("orders.*", "orders.eu"));
        assert!(subjects_overlap(">", "orders"));
        assert!(!subjects_overlap("orders.>", "orders"));
        assert!(!subjects_overlap("orders.*", "orders.eu.paid"));
        assert!(!subjects_overlap("orders.validated", "orders"));
    }

    #[test]
    fn a_stream_subject_covers_a_filter_when_it_matches_all_it_matches() {
        assert!(subject_covers("orders", "orders"));
        assert!(subject_covers("orders.>", "orders.eu"));
        assert!(subject_covers("orders.>", "orders.eu.>"));
        assert!(subject_covers("orders.>", "orders.*"));
        assert!(subject_covers("orders.*", "orders.*"));
        assert!(subject_covers(">", "orders"));
        assert!(subject_covers("*.eu", "orders.eu"));
        assert!(!subject_covers("orders.*", "orders.>"));
        assert!(!subject_covers("orders.*", "orders.eu.paid"));
        assert!(!subject_covers("orders.eu", "orders.*"));
        assert!(!subject_covers("orders.>", "orders"));
        assert!(!subject_covers("chk.a.>", "chk.b.in"));
    }

    #[test]
    fn a_later_declaration_replaces_an_earlier_one() {
        let declared = DeclaredStreams::default();
        declared.remember(&StreamConfig::new("OUT", vec!["out.a".into()]));
        declared.remember(&StreamConfig::new("DLQ", vec!["weir.dlq.>".into()]));
        declared.remember(&StreamConfig::new("OUT", vec!["out.>".into()]));
        assert_eq!(
            declared.named("OUT").map(|s| s.subjects),
            Some(vec!["out.>".to_owned()])
        );
        assert_eq!(
            declared.capturing("out.b").map(|s| s.name),
            Some("OUT".to_owned())
        );
        assert_eq!(
            declared.capturing("weir.dlq.f").map(|s| s.name),
            Some("DLQ".to_owned())
        );
        assert!(declared.capturing("elsewhere").is_none());
        assert!(declared.named("ELSEWHERE").is_none());
    }
}
