//! Acknowledgement bookkeeping of one producer stream (pure: no I/O, no clock of its own).
//!
//! Sinks acknowledge *sets* of sequence numbers (ranges), not a single "stored up to" number:
//! the producer is the only one that knows which numbers exist in its journal (gaps after a
//! restart, records dropped when full, a shared subscription handing half the stream to each
//! of two sink instances). So the producer turns acknowledged sets into a per-group
//! **watermark**: the highest seq `W` such that every journaled record `<= W` is acknowledged
//! by that group. The journal is trimmed through the lowest watermark of the groups it waits
//! for.
//!
//! A group that has unacknowledged records for longer than its timeout is *overdue*: the
//! producer re-publishes what that group has not acknowledged. The timeout doubles while the
//! group makes no progress (a sink down for hours is not flooded) and resets when it does.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// A set of u64 as disjoint inclusive ranges.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RangeSet {
    /// start → end (inclusive), disjoint and not adjacent.
    ranges: BTreeMap<u64, u64>,
}

impl RangeSet {
    pub fn insert(&mut self, first: u64, last: u64) {
        if first > last {
            return;
        }
        let (mut lo, mut hi) = (first, last);
        // Merge with a range that starts before and reaches into or touches [lo, hi].
        if let Some((&s, &e)) = self.ranges.range(..=lo).next_back()
            && e.saturating_add(1) >= lo
        {
            lo = s;
            hi = hi.max(e);
            self.ranges.remove(&s);
        }
        // Merge with ranges that start inside or right after [lo, hi].
        while let Some((&s, &e)) = self.ranges.range(lo..).next() {
            if s > hi.saturating_add(1) {
                break;
            }
            hi = hi.max(e);
            self.ranges.remove(&s);
        }
        self.ranges.insert(lo, hi);
    }

    pub fn contains(&self, x: u64) -> bool {
        self.ranges
            .range(..=x)
            .next_back()
            .is_some_and(|(_, &e)| e >= x)
    }

    /// The largest `y` such that `[from, y]` is in the set, or `from - 1` if `from` is not.
    pub fn covered_until(&self, from: u64) -> u64 {
        match self.ranges.range(..=from).next_back() {
            Some((_, &e)) if e >= from => e,
            _ => from.saturating_sub(1),
        }
    }

    /// Forget everything `<= through`.
    pub fn remove_through(&mut self, through: u64) {
        let keep = self.ranges.split_off(&through.saturating_add(1));
        if let Some((_, &e)) = self.ranges.iter().next_back()
            && e > through
        {
            let mut keep = keep;
            keep.insert(through + 1, e);
            self.ranges = keep;
            return;
        }
        self.ranges = keep;
    }

    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = [u64; 2]> + '_ {
        self.ranges.iter().map(|(&s, &e)| [s, e])
    }

    /// Number of disjoint ranges.
    pub fn len(&self) -> usize {
        self.ranges.len()
    }
}

#[derive(Debug, Clone)]
struct Group {
    watermark: u64,
    /// Acknowledged seqs above the watermark.
    acked: RangeSet,
    /// Since when the group has had unacknowledged records without progress.
    waiting_since: Option<Instant>,
    timeout: Duration,
}

/// Per-group watermarks of one stream.
#[derive(Debug, Clone)]
pub struct AckTracker {
    groups: BTreeMap<String, Group>,
    base_timeout: Duration,
    max_timeout: Duration,
}

impl AckTracker {
    /// Track `groups`, none of which has acknowledged anything yet: each starts just below the
    /// journal's first record.
    pub fn new<'a>(
        groups: impl IntoIterator<Item = &'a str>,
        journal_first: Option<u64>,
        base_timeout: Duration,
        max_timeout: Duration,
    ) -> Self {
        let watermark = journal_first.map_or(0, |f| f.saturating_sub(1));
        let groups = groups
            .into_iter()
            .map(|g| {
                let group = Group {
                    watermark,
                    acked: RangeSet::default(),
                    waiting_since: None,
                    timeout: base_timeout,
                };
                (g.to_string(), group)
            })
            .collect();
        Self {
            groups,
            base_timeout,
            max_timeout,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.groups.is_empty()
    }

    /// Record an acknowledgement from `group`. `journal` is what the journal holds now.
    /// Returns whether the group's watermark moved. Acks from groups we do not wait for are
    /// ignored.
    pub fn ack(
        &mut self,
        group: &str,
        ranges: &[[u64; 2]],
        journal: &[[u64; 2]],
        now: Instant,
    ) -> bool {
        let Some(g) = self.groups.get_mut(group) else {
            return false;
        };
        // Only seqs the journal holds can be acknowledged. Anything above its end does not
        // exist (yet): accepting it would acknowledge future records in advance (a buggy or
        // hostile client), and keeping it would let such ranges pile up without bound.
        let Some(end) = journal.last().map(|r| r[1]) else {
            return false;
        };
        for &[first, last] in ranges {
            let (lo, hi) = (first.max(g.watermark + 1), last.min(end));
            if lo <= hi {
                g.acked.insert(lo, hi);
            }
        }
        let before = g.watermark;
        advance(g, journal);
        let moved = g.watermark > before;
        if moved {
            g.timeout = self.base_timeout;
            g.waiting_since = Some(now);
        }
        moved
    }

    /// Note that records were published up to `last_seq`: groups that had nothing pending
    /// start waiting now.
    pub fn published(&mut self, now: Instant) {
        for g in self.groups.values_mut() {
            g.waiting_since.get_or_insert(now);
        }
    }

    /// The journal dropped or trimmed records: watermarks may move past the gap.
    pub fn journal_changed(&mut self, journal: &[[u64; 2]]) {
        for g in self.groups.values_mut() {
            advance(g, journal);
        }
    }

    /// Everything `<=` this is acknowledged by every group.
    pub fn trim_point(&self) -> Option<u64> {
        self.groups.values().map(|g| g.watermark).min()
    }

    pub fn watermark(&self, group: &str) -> Option<u64> {
        self.groups.get(group).map(|g| g.watermark)
    }

    /// Groups that are overdue and what to send them: `(group, after, acked-above)`.
    /// Calling this starts the group's next wait and doubles its timeout.
    pub fn overdue(
        &mut self,
        journal_last: Option<u64>,
        now: Instant,
    ) -> Vec<(String, u64, RangeSet)> {
        let mut out = Vec::new();
        let Some(last) = journal_last else {
            for g in self.groups.values_mut() {
                g.waiting_since = None;
            }
            return out;
        };
        for (name, g) in &mut self.groups {
            if g.watermark >= last {
                g.waiting_since = None;
                continue;
            }
            let since = *g.waiting_since.get_or_insert(now);
            if now.duration_since(since) >= g.timeout {
                out.push((name.clone(), g.watermark, g.acked.clone()));
                g.waiting_since = Some(now);
                g.timeout = (g.timeout * 2).min(self.max_timeout);
            }
        }
        out
    }

    /// After a reconnect, whatever was in flight may be gone: make every waiting group due
    /// after `grace` (time for sinks to reconnect and subscribe too).
    pub fn reconnected(&mut self, now: Instant, grace: Duration) {
        for g in self.groups.values_mut() {
            if g.waiting_since.is_some() {
                // Due exactly `grace` from now, whatever the base timeout (shorter or longer);
                // the usual doubling continues from there and resets on progress.
                g.waiting_since = Some(now);
                g.timeout = grace.min(self.max_timeout).max(Duration::from_millis(1));
            }
        }
    }
}

/// Move the group's watermark over every journaled seq it has acknowledged.
fn advance(g: &mut Group, journal: &[[u64; 2]]) {
    for &[first, last] in journal {
        if last <= g.watermark {
            continue;
        }
        let start = first.max(g.watermark + 1);
        let covered = g.acked.covered_until(start);
        if covered >= last {
            g.watermark = last;
        } else {
            // Seqs between the old watermark and `start` are not in the journal (a gap), so
            // the watermark may move up to just below the first unacknowledged one.
            g.watermark = covered.max(start - 1);
            break;
        }
    }
    g.acked.remove_through(g.watermark);
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Duration = Duration::from_secs(10);

    #[test]
    fn range_set_merges_and_answers() {
        let mut s = RangeSet::default();
        s.insert(5, 7);
        s.insert(1, 2);
        s.insert(3, 4);
        assert_eq!(s.iter().collect::<Vec<_>>(), vec![[1, 7]]);
        s.insert(10, 12);
        s.insert(8, 9);
        assert_eq!(s.iter().collect::<Vec<_>>(), vec![[1, 12]]);
        s.insert(20, 30);
        assert!(s.contains(25) && !s.contains(15));
        assert_eq!(s.covered_until(3), 12);
        assert_eq!(s.covered_until(15), 14);
        s.remove_through(25);
        assert_eq!(s.iter().collect::<Vec<_>>(), vec![[26, 30]]);
    }

    #[test]
    fn watermark_moves_only_over_a_contiguous_acknowledged_prefix() {
        let now = Instant::now();
        let mut t = AckTracker::new(["influx"], Some(1), T, T * 30);
        let journal = [[1, 100]];
        // Out of order acks (a shared group, or a replay racing live data).
        assert!(!t.ack("influx", &[[51, 100]], &journal, now));
        assert_eq!(t.watermark("influx"), Some(0));
        assert!(t.ack("influx", &[[1, 50]], &journal, now));
        assert_eq!(t.watermark("influx"), Some(100));
        assert_eq!(t.trim_point(), Some(100));
    }

    #[test]
    fn gaps_in_the_journal_do_not_block_the_watermark() {
        let now = Instant::now();
        // Seqs 1..=10, then a restart jumped to 65_547.
        let journal = [[1, 10], [65_547, 65_550]];
        let mut t = AckTracker::new(["s"], Some(1), T, T * 30);
        t.ack("s", &[[1, 10]], &journal, now);
        assert_eq!(t.watermark("s"), Some(65_546));
        t.ack("s", &[[65_547, 65_550]], &journal, now);
        assert_eq!(t.watermark("s"), Some(65_550));
    }

    #[test]
    fn the_slowest_group_holds_the_trim_point_and_strangers_are_ignored() {
        let now = Instant::now();
        let journal = [[1, 10]];
        let mut t = AckTracker::new(["a", "b"], Some(1), T, T * 30);
        t.ack("a", &[[1, 10]], &journal, now);
        t.ack("stranger", &[[1, 10]], &journal, now);
        assert_eq!(t.trim_point(), Some(0));
        t.ack("b", &[[1, 4]], &journal, now);
        assert_eq!(t.trim_point(), Some(4));
    }

    #[test]
    fn overdue_groups_are_replayed_with_backoff_and_reset_on_progress() {
        let t0 = Instant::now();
        let journal = [[1, 10]];
        let mut t = AckTracker::new(["s"], Some(1), T, T * 4);
        t.published(t0);
        assert!(t.overdue(Some(10), t0 + T / 2).is_empty());
        let due = t.overdue(Some(10), t0 + T);
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].1, 0);
        // Next wait is twice as long.
        assert!(t.overdue(Some(10), t0 + T + T).is_empty());
        assert_eq!(t.overdue(Some(10), t0 + T * 3).len(), 1);
        // Progress resets the timeout.
        t.ack("s", &[[1, 5]], &journal, t0 + T * 3);
        let due = t.overdue(Some(10), t0 + T * 4);
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].1, 5);
        t.ack("s", &[[6, 10]], &journal, t0 + T * 4);
        assert!(
            t.overdue(Some(10), t0 + T * 100).is_empty(),
            "nothing pending, nothing due"
        );
    }

    #[test]
    fn acks_beyond_the_journal_acknowledge_nothing_in_advance() {
        let now = Instant::now();
        let mut t = AckTracker::new(["influx"], Some(1), T, T * 30);
        t.ack("influx", &[[1, 1_000_000]], &[[1, 10]], now);
        assert_eq!(t.watermark("influx"), Some(10));
        // 11..=20 are appended later and never acknowledged.
        t.ack("influx", &[[3, 3]], &[[1, 20]], now);
        assert_eq!(t.watermark("influx"), Some(10));
        // And a flood of disjoint ranges above the journal keeps no state.
        for m in 0..200u64 {
            let r: Vec<[u64; 2]> = (0..512u64)
                .map(|i| [1_000_000 + (m * 512 + i) * 2; 2])
                .collect();
            t.ack("influx", &r, &[[1, 20]], now);
        }
        assert!(t.groups["influx"].acked.is_empty());
    }

    #[test]
    fn the_reconnect_grace_holds_even_when_the_timeout_is_shorter() {
        let t0 = Instant::now();
        let mut t = AckTracker::new(["s"], Some(1), Duration::from_millis(500), T);
        t.published(t0);
        t.reconnected(t0, Duration::from_secs(2));
        assert!(t.overdue(Some(10), t0 + Duration::from_secs(1)).is_empty());
        assert_eq!(
            t.overdue(Some(10), t0 + Duration::from_millis(2001)).len(),
            1
        );
    }

    #[test]
    fn dropped_records_let_the_watermark_pass() {
        let now = Instant::now();
        let mut t = AckTracker::new(["s"], Some(1), T, T);
        // The journal was full and dropped 1..=100; 101..=150 remain.
        t.journal_changed(&[[101, 150]]);
        assert_eq!(t.watermark("s"), Some(100));
        t.ack("s", &[[101, 150]], &[[101, 150]], now);
        assert_eq!(t.watermark("s"), Some(150));
    }

    #[test]
    fn reconnect_makes_waiting_groups_due_after_the_grace() {
        let t0 = Instant::now();
        let mut t = AckTracker::new(["s"], Some(1), T, T);
        t.published(t0);
        let t1 = t0 + Duration::from_secs(1);
        t.reconnected(t1, Duration::from_secs(2));
        assert!(
            t.overdue(Some(10), t1 + Duration::from_millis(1500))
                .is_empty()
        );
        assert_eq!(
            t.overdue(Some(10), t1 + Duration::from_millis(2100)).len(),
            1
        );
    }
}
