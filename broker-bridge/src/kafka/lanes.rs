//! The lane scheduler: which buffered message may be handed out next, for a trigger's ordering.
//!
//! Messages of a partition are split into lanes: one lane per partition for
//! [`Ordering::Partition`], one lane per message key inside each partition for [`Ordering::Key`]
//! (null keys share one lane per partition), and one non-exclusive lane per partition for
//! [`Ordering::None`]. An exclusive lane has at most one message in flight and hands out its
//! messages in the order they were queued; a message handed back (retry, dropped delivery) goes
//! to the head of its lane, so nothing behind it overtakes it. A global cap bounds the number of
//! messages in flight whatever the ordering.
//!
//! It is pure bookkeeping: no I/O, no clock, no rdkafka; the consumer wraps it in a mutex.

use std::collections::{BTreeMap, HashMap, VecDeque};

use bytes::Bytes;

use crate::Ordering;

/// Which lane of a partition a message belongs to: the message key for [`Ordering::Key`]
/// (`None` for a null key), always `None` otherwise.
pub type LaneId = Option<Bytes>;

/// A message handed out by [`LaneScheduler::pop`], with what is needed to settle it later.
#[derive(Debug)]
pub struct Popped<T> {
    pub partition: i32,
    pub lane: LaneId,
    /// The assignment generation of the partition when the message was handed out; settling a
    /// message of an older generation (the partition was revoked meanwhile) touches no lane.
    pub generation: u64,
    pub item: T,
}

#[derive(Debug)]
struct Lane<T> {
    queue: VecDeque<T>,
    /// A message of this lane is in flight (exclusive orderings only).
    busy: bool,
    /// The lane is listed in the ready queue.
    listed: bool,
}

impl<T> Default for Lane<T> {
    fn default() -> Self {
        Self {
            queue: VecDeque::new(),
            busy: false,
            listed: false,
        }
    }
}

#[derive(Debug)]
struct PartitionLanes<T> {
    generation: u64,
    lanes: HashMap<LaneId, Lane<T>>,
    buffered: usize,
    in_flight: usize,
    /// Being revoked: nothing is queued or handed out any more.
    stopped: bool,
}

/// Buffers received messages in lanes and hands them out as their lanes allow.
#[derive(Debug)]
pub struct LaneScheduler<T> {
    ordering: Ordering,
    max_in_flight: usize,
    partitions: BTreeMap<i32, PartitionLanes<T>>,
    /// Lanes that may have a message to hand out, in round-robin order. Entries may be stale
    /// (lane drained, partition revoked): `pop` skips those.
    ready: VecDeque<(i32, LaneId)>,
    in_flight: usize,
    next_generation: u64,
}

impl<T> LaneScheduler<T> {
    pub fn new(ordering: Ordering, max_in_flight: usize) -> Self {
        Self {
            ordering,
            max_in_flight: max_in_flight.max(1),
            partitions: BTreeMap::new(),
            ready: VecDeque::new(),
            in_flight: 0,
            next_generation: 1,
        }
    }

    pub fn ordering(&self) -> Ordering {
        self.ordering
    }

    /// The lane a message with this key belongs to.
    pub fn lane_of(&self, key: Option<&Bytes>) -> LaneId {
        match self.ordering {
            Ordering::Key => key.cloned(),
            Ordering::Partition | Ordering::None => None,
        }
    }

    fn exclusive(&self) -> bool {
        !matches!(self.ordering, Ordering::None)
    }

    /// Start owning a partition. Re-assigning an owned partition keeps its state.
    pub fn assign(&mut self, partition: i32) -> u64 {
        if let Some(lanes) = self.partitions.get(&partition) {
            return lanes.generation;
        }
        let generation = self.next_generation;
        self.next_generation += 1;
        self.partitions.insert(
            partition,
            PartitionLanes {
                generation,
                lanes: HashMap::new(),
                buffered: 0,
                in_flight: 0,
                stopped: false,
            },
        );
        generation
    }

    /// Stop owning a partition: its buffered messages are dropped (they were never finished, so
    /// the next owner reads them again). Returns how many were dropped.
    pub fn revoke(&mut self, partition: i32) -> usize {
        self.partitions
            .remove(&partition)
            .map_or(0, |lanes| lanes.buffered)
    }

    /// Stop handing out a partition that is being revoked: its buffered messages are dropped
    /// (never finished, so the next owner reads them again), messages handed back are not
    /// queued again, and its in-flight count still drops as deliveries settle.
    pub fn stop_partition(&mut self, partition: i32) -> usize {
        let Some(lanes) = self.partitions.get_mut(&partition) else {
            return 0;
        };
        lanes.stopped = true;
        lanes.lanes.retain(|_, lane| {
            lane.queue.clear();
            lane.busy
        });
        std::mem::take(&mut lanes.buffered)
    }

    pub fn owns(&self, partition: i32) -> bool {
        self.partitions.contains_key(&partition)
    }

    pub fn generation(&self, partition: i32) -> Option<u64> {
        self.partitions
            .get(&partition)
            .map(|lanes| lanes.generation)
    }

    pub fn partitions(&self) -> impl Iterator<Item = i32> + '_ {
        self.partitions.keys().copied()
    }

    /// Queue a received message at the tail of its lane. The item comes back as the error when
    /// the partition is not owned or is being revoked.
    pub fn push(&mut self, partition: i32, lane: LaneId, item: T) -> Result<(), T> {
        self.enqueue(partition, lane, item)
    }

    fn enqueue(&mut self, partition: i32, lane_id: LaneId, item: T) -> Result<(), T> {
        let exclusive = self.exclusive();
        let Some(lanes) = self.partitions.get_mut(&partition).filter(|l| !l.stopped) else {
            return Err(item);
        };
        let lane = lanes.lanes.entry(lane_id.clone()).or_default();
        lane.queue.push_back(item);
        lanes.buffered += 1;
        if (!exclusive || !lane.busy) && !lane.listed {
            lane.listed = true;
            self.ready.push_back((partition, lane_id));
        }
        Ok(())
    }

    /// The next message whose lane is free, if the in-flight cap allows one more.
    pub fn pop(&mut self) -> Option<Popped<T>> {
        if self.in_flight >= self.max_in_flight {
            return None;
        }
        let exclusive = self.exclusive();
        while let Some((partition, lane_id)) = self.ready.pop_front() {
            let Some(lanes) = self.partitions.get_mut(&partition).filter(|l| !l.stopped) else {
                continue;
            };
            let Some(lane) = lanes.lanes.get_mut(&lane_id) else {
                continue;
            };
            lane.listed = false;
            if exclusive && lane.busy {
                continue;
            }
            let Some(item) = lane.queue.pop_front() else {
                continue;
            };
            if exclusive {
                lane.busy = true;
            } else if !lane.queue.is_empty() {
                lane.listed = true;
                self.ready.push_back((partition, lane_id.clone()));
            }
            lanes.buffered -= 1;
            lanes.in_flight += 1;
            self.in_flight += 1;
            return Some(Popped {
                partition,
                lane: lane_id,
                generation: lanes.generation,
                item,
            });
        }
        None
    }

    /// A handed-out message is finished: free its lane.
    pub fn release(&mut self, partition: i32, lane: &LaneId, generation: u64) {
        self.in_flight = self.in_flight.saturating_sub(1);
        let Some(lanes) = self.current(partition, generation) else {
            return;
        };
        lanes.in_flight = lanes.in_flight.saturating_sub(1);
        let Some(state) = lanes.lanes.get_mut(lane) else {
            return;
        };
        state.busy = false;
        if state.queue.is_empty() {
            if !state.listed {
                lanes.lanes.remove(lane);
            }
        } else if !state.listed {
            state.listed = true;
            self.ready.push_back((partition, lane.clone()));
        }
    }

    /// A handed-out message comes back unfinished: it goes to the head of its lane, so it is the
    /// next one handed out there. Returns the item when the partition was revoked meanwhile.
    pub fn requeue_front(
        &mut self,
        partition: i32,
        lane: LaneId,
        generation: u64,
        item: T,
    ) -> Result<(), T> {
        self.in_flight = self.in_flight.saturating_sub(1);
        let exclusive = self.exclusive();
        let Some(lanes) = self.current(partition, generation) else {
            return Err(item);
        };
        lanes.in_flight = lanes.in_flight.saturating_sub(1);
        if lanes.stopped {
            lanes.lanes.remove(&lane);
            return Err(item);
        }
        let state = lanes.lanes.entry(lane.clone()).or_default();
        state.busy = false;
        state.queue.push_front(item);
        lanes.buffered += 1;
        if !state.listed {
            state.listed = true;
            if exclusive {
                // Its lane was blocked behind it: it goes first again.
                self.ready.push_front((partition, lane));
            } else {
                self.ready.push_back((partition, lane));
            }
        }
        Ok(())
    }

    fn current(&mut self, partition: i32, generation: u64) -> Option<&mut PartitionLanes<T>> {
        self.partitions
            .get_mut(&partition)
            .filter(|lanes| lanes.generation == generation)
    }

    /// Messages of a partition buffered and not handed out.
    pub fn buffered(&self, partition: i32) -> usize {
        self.partitions
            .get(&partition)
            .map_or(0, |lanes| lanes.buffered)
    }

    /// Messages of a partition handed out and not settled.
    pub fn in_flight_of(&self, partition: i32) -> usize {
        self.partitions
            .get(&partition)
            .map_or(0, |lanes| lanes.in_flight)
    }

    /// Messages handed out and not settled, all partitions (including revoked ones).
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(k: &str) -> Option<Bytes> {
        Some(Bytes::copy_from_slice(k.as_bytes()))
    }

    fn push(s: &mut LaneScheduler<i64>, partition: i32, k: Option<Bytes>, offset: i64) {
        let lane = s.lane_of(k.as_ref());
        assert!(s.push(partition, lane, offset).is_ok());
    }

    #[test]
    fn partition_ordering_hands_out_one_per_partition_in_order() {
        let mut s = LaneScheduler::new(Ordering::Partition, 100);
        s.assign(0);
        s.assign(1);
        push(&mut s, 0, key("a"), 0);
        push(&mut s, 0, key("b"), 1);
        push(&mut s, 1, None, 0);
        let first = s.pop().unwrap();
        let second = s.pop().unwrap();
        assert_eq!((first.partition, first.item), (0, 0));
        assert_eq!((second.partition, second.item), (1, 0));
        assert!(
            s.pop().is_none(),
            "partition 0 is busy until offset 0 is settled"
        );
        s.release(0, &first.lane, first.generation);
        let third = s.pop().unwrap();
        assert_eq!((third.partition, third.item), (0, 1));
    }

    #[test]
    fn key_ordering_blocks_only_the_busy_key() {
        let mut s = LaneScheduler::new(Ordering::Key, 100);
        s.assign(0);
        push(&mut s, 0, key("a"), 0);
        push(&mut s, 0, key("a"), 1);
        push(&mut s, 0, key("b"), 2);
        push(&mut s, 0, None, 3);
        push(&mut s, 0, None, 4);
        let mut out: Vec<i64> = std::iter::from_fn(|| s.pop()).map(|p| p.item).collect();
        out.sort_unstable();
        assert_eq!(out, vec![0, 2, 3], "one per key, null keys share a lane");
        assert_eq!(s.buffered(0), 2);
        assert_eq!(s.in_flight_of(0), 3);
    }

    #[test]
    fn no_ordering_is_capped_by_max_in_flight_only() {
        let mut s = LaneScheduler::new(Ordering::None, 3);
        s.assign(0);
        for offset in 0..5 {
            push(&mut s, 0, None, offset);
        }
        let popped: Vec<_> = std::iter::from_fn(|| s.pop()).collect();
        assert_eq!(
            popped.iter().map(|p| p.item).collect::<Vec<_>>(),
            vec![0, 1, 2]
        );
        s.release(0, &popped[1].lane, popped[1].generation);
        assert_eq!(s.pop().unwrap().item, 3);
        assert!(s.pop().is_none());
    }

    #[test]
    fn requeued_message_goes_first_in_its_lane() {
        let mut s = LaneScheduler::new(Ordering::Partition, 10);
        let generation = s.assign(0);
        push(&mut s, 0, None, 0);
        push(&mut s, 0, None, 1);
        let first = s.pop().unwrap();
        assert!(s
            .requeue_front(0, first.lane, generation, first.item)
            .is_ok());
        assert_eq!(
            s.pop().unwrap().item,
            0,
            "the requeued message, not the next one"
        );
    }

    #[test]
    fn settling_after_revoke_touches_no_lane_of_the_new_assignment() {
        let mut s = LaneScheduler::new(Ordering::Partition, 10);
        s.assign(0);
        push(&mut s, 0, None, 0);
        let old = s.pop().unwrap();
        assert_eq!(s.revoke(0), 0);
        let new_generation = s.assign(0);
        assert_ne!(new_generation, old.generation);
        push(&mut s, 0, None, 0);
        let fresh = s.pop().unwrap();
        assert_eq!(s.in_flight(), 2);
        // The stale settle frees the global slot but not the new owner's busy lane.
        assert_eq!(
            s.requeue_front(0, old.lane, old.generation, old.item),
            Err(0)
        );
        assert_eq!(s.in_flight(), 1);
        push(&mut s, 0, None, 1);
        assert!(s.pop().is_none(), "the new lane is still busy with `fresh`");
        s.release(0, &fresh.lane, fresh.generation);
        assert_eq!(s.pop().unwrap().item, 1);
    }

    #[test]
    fn a_stopped_partition_hands_out_nothing_but_counts_its_settles() {
        let mut s = LaneScheduler::new(Ordering::None, 10);
        let generation = s.assign(0);
        for offset in 0..3 {
            push(&mut s, 0, None, offset);
        }
        let first = s.pop().unwrap();
        assert_eq!(s.stop_partition(0), 2);
        assert!(s.pop().is_none());
        assert_eq!(s.push(0, None, 9), Err(9));
        assert_eq!(s.in_flight_of(0), 1);
        assert_eq!(
            s.requeue_front(0, first.lane, generation, first.item),
            Err(0)
        );
        assert_eq!(s.in_flight_of(0), 0);
        assert_eq!(s.in_flight(), 0);
    }

    #[test]
    fn pushing_to_an_unowned_partition_is_refused() {
        let mut s: LaneScheduler<i64> = LaneScheduler::new(Ordering::Key, 10);
        assert_eq!(s.push(3, None, 7), Err(7));
    }
}
