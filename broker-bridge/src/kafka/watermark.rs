//! The per-partition commit watermark: which offset is safe to commit when messages of one
//! partition finish out of order.
//!
//! Kafka remembers one number per partition (the next offset to read), so Weir may only commit
//! up to the lowest offset that is not finished yet. The tracker remembers every offset that was
//! received and not finished; the commit position is the lowest of them, or one past the highest
//! received offset when all are finished. Offsets that never arrive (compaction, transaction
//! markers) do not hold the watermark back. It does no I/O and knows nothing about rdkafka.
//!
//! Offsets arrive in increasing order, so the unfinished ones are kept in a sorted ring
//! (`VecDeque`) rather than a tree: receiving appends, finishing the oldest (the common case,
//! and the only one under `partition` ordering) pops the front, and finishing out of order
//! marks an entry found by binary search; finished entries leave once nothing older is
//! unfinished. No allocation per message once the ring has grown to the buffer size.

use std::collections::VecDeque;

/// Tracks the unfinished offsets of one partition, for one assignment of that partition.
#[derive(Debug, Default, Clone)]
pub struct WatermarkTracker {
    /// Received offsets in increasing order, each with whether it is finished. The front is
    /// always unfinished (finished entries at the front are dropped at once).
    window: VecDeque<(i64, bool)>,
    /// Entries of `window` not finished (handed out, buffered or waiting for a retry).
    unfinished: usize,
    /// The highest offset ever received in this assignment.
    highest_received: Option<i64>,
    /// The last position handed to a commit (the next offset to read after a restart).
    last_committed: Option<i64>,
}

impl WatermarkTracker {
    pub fn new() -> Self {
        Self::default()
    }

    /// A message at `offset` was received. Returns false for an offset at or below one already
    /// received (a duplicate fetch): it must not be tracked twice.
    pub fn received(&mut self, offset: i64) -> bool {
        if self
            .highest_received
            .is_some_and(|highest| offset <= highest)
        {
            return false;
        }
        self.highest_received = Some(offset);
        self.window.push_back((offset, false));
        self.unfinished += 1;
        true
    }

    /// The message at `offset` is done (acked or terminated). Returns false when the offset was
    /// not unfinished (already finished, or never received).
    pub fn finished(&mut self, offset: i64) -> bool {
        let index = match self.window.front() {
            // The oldest one: no search.
            Some((front, _)) if *front == offset => 0,
            _ => match self.window.binary_search_by_key(&offset, |(o, _)| *o) {
                Ok(index) => index,
                Err(_) => return false,
            },
        };
        let Some(entry) = self.window.get_mut(index) else {
            return false;
        };
        if entry.1 {
            return false;
        }
        entry.1 = true;
        self.unfinished -= 1;
        while self.window.front().is_some_and(|(_, done)| *done) {
            self.window.pop_front();
        }
        true
    }

    /// The offset a restarted consumer should resume at: the lowest unfinished offset, or one
    /// past the highest received one. `None` before anything was received.
    pub fn position(&self) -> Option<i64> {
        match self.window.front() {
            Some((lowest, _)) => Some(*lowest),
            None => self.highest_received.map(|highest| highest + 1),
        }
    }

    /// The position to commit, if it moved past the last committed one.
    pub fn commit_candidate(&self) -> Option<i64> {
        let position = self.position()?;
        match self.last_committed {
            Some(committed) if committed >= position => None,
            _ => Some(position),
        }
    }

    /// Remember that `position` was handed to a commit.
    pub fn mark_committed(&mut self, position: i64) {
        self.last_committed = Some(self.last_committed.map_or(position, |c| c.max(position)));
    }

    /// Forget a commit that failed, so the next commit round tries again.
    pub fn commit_failed(&mut self) {
        self.last_committed = None;
    }

    pub fn last_committed(&self) -> Option<i64> {
        self.last_committed
    }

    /// How many received offsets are not finished.
    pub fn unfinished_count(&self) -> usize {
        self.unfinished
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_received_means_nothing_to_commit() {
        let tracker = WatermarkTracker::new();
        assert_eq!(tracker.position(), None);
        assert_eq!(tracker.commit_candidate(), None);
    }

    #[test]
    fn in_order_completion_advances_one_by_one() {
        let mut tracker = WatermarkTracker::new();
        for offset in 0..3 {
            assert!(tracker.received(offset));
        }
        assert_eq!(tracker.position(), Some(0));
        assert!(tracker.finished(0));
        assert_eq!(tracker.position(), Some(1));
        assert!(tracker.finished(1));
        assert!(tracker.finished(2));
        assert_eq!(tracker.position(), Some(3));
    }

    #[test]
    fn out_of_order_completion_holds_the_watermark_at_the_lowest_unfinished() {
        let mut tracker = WatermarkTracker::new();
        for offset in 1..=3 {
            tracker.received(offset);
        }
        tracker.finished(2);
        tracker.finished(3);
        assert_eq!(tracker.position(), Some(1), "offset 1 is still unfinished");
        tracker.finished(1);
        assert_eq!(
            tracker.position(),
            Some(4),
            "all done: resume after the highest"
        );
    }

    #[test]
    fn gaps_in_offsets_do_not_block_the_watermark() {
        let mut tracker = WatermarkTracker::new();
        tracker.received(10);
        tracker.received(15);
        tracker.finished(10);
        assert_eq!(tracker.position(), Some(15));
        tracker.finished(15);
        assert_eq!(tracker.position(), Some(16));
    }

    #[test]
    fn duplicates_and_unknown_offsets_are_refused() {
        let mut tracker = WatermarkTracker::new();
        assert!(tracker.received(5));
        assert!(!tracker.received(5));
        assert!(!tracker.received(4));
        assert!(!tracker.finished(7));
        assert!(tracker.finished(5));
        assert!(!tracker.finished(5), "finishing twice is a no-op");
        assert_eq!(tracker.unfinished_count(), 0);
    }

    #[test]
    fn commit_candidate_only_when_the_position_moved() {
        let mut tracker = WatermarkTracker::new();
        tracker.received(0);
        tracker.received(1);
        assert_eq!(tracker.commit_candidate(), Some(0));
        tracker.mark_committed(0);
        assert_eq!(tracker.commit_candidate(), None);
        tracker.finished(1);
        assert_eq!(tracker.commit_candidate(), None, "offset 0 still holds it");
        tracker.finished(0);
        assert_eq!(tracker.commit_candidate(), Some(2));
        tracker.mark_committed(2);
        assert_eq!(tracker.last_committed(), Some(2));
        tracker.commit_failed();
        assert_eq!(
            tracker.commit_candidate(),
            Some(2),
            "a failed commit is retried"
        );
    }

    #[test]
    fn finishing_inside_the_window_holds_until_the_front_finishes() {
        let mut tracker = WatermarkTracker::new();
        for offset in 0..6 {
            assert!(tracker.received(offset));
        }
        assert!(tracker.finished(3));
        assert!(!tracker.finished(3), "finishing twice is a no-op");
        assert!(tracker.finished(1));
        assert_eq!(tracker.position(), Some(0));
        assert!(tracker.finished(0));
        assert_eq!(
            tracker.position(),
            Some(2),
            "1 was done: the front moves past it"
        );
        assert!(tracker.finished(2));
        assert_eq!(tracker.position(), Some(4), "and past 3");
        assert!(!tracker.finished(1), "already left the window");
        assert!(!tracker.finished(9), "never received");
        assert_eq!(tracker.unfinished_count(), 2);
        assert!(tracker.finished(5));
        assert!(tracker.finished(4));
        assert_eq!(tracker.position(), Some(6));
        assert_eq!(tracker.unfinished_count(), 0);
    }
}
