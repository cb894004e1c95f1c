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
//! The groups waited for are the configured ones (`wait_for`) and the ones learned from sink
//! registrations. A group learned late starts just below the journal's first record, so it is
//! owed everything still held; a forgotten group stops holding the journal back. **With no
//! group at all there is no trim point**: nothing is trimmed, however long that lasts (the
//! journal's `max_bytes` bound still applies).
//!
//! A group that has unacknowledged records for longer than its timeout is *overdue*: the
//! producer re-publishes what that group has not acknowledged. The timeout doubles while the
//! group makes no progress (a sink down for hours is not flooded) and resets when it does.
//!
//! [`Handed`] keeps which seqs this process handed to the broker, and which of them on the
//! current connection: acknowledgements count only for records that were published (a sink
//! cannot have stored one it never received), and the round after a reconnect re-publishes
//! only what was not published on the new connection.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::backoff::Backoff;

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

    /// The parts of `[first, last]` that are in the set, ascending.
    pub fn within(&self, first: u64, last: u64) -> impl Iterator<Item = [u64; 2]> + '_ {
        let before = self
            .ranges
            .range(..first)
            .next_back()
            .filter(|(_, e)| **e >= first);
        let inside = self.ranges.range(first..=last.max(first));
        before
            .into_iter()
            .chain(inside)
            .filter(move |_| first <= last)
            .map(move |(&s, &e)| [s.max(first), e.min(last)])
    }

    /// Forget the lowest ranges until at most `max` are left.
    fn cap(&mut self, max: usize) {
        while self.ranges.len() > max {
            self.ranges.pop_first();
        }
    }
}

/// Most ranges [`Handed`] keeps per set. Publishing is contiguous except around deferrals, so a
/// real journal needs a handful; past this the oldest are forgotten, which costs a replay (and
/// the refusal of a late acknowledgement for them), never a reading.
const MAX_HANDED_RANGES: usize = 4096;

/// Which journaled seqs this process has handed to the broker (live or replayed), and which of
/// them since the current connection came up.
#[derive(Debug, Clone, Default)]
pub struct Handed {
    ever: RangeSet,
    current: RangeSet,
    /// The connection `current` is about (the bus's ConnAck count).
    epoch: u64,
}

impl Handed {
    /// `seq` was handed to the broker while connection `epoch` was up (read before the
    /// publish: if the link changed meanwhile, the record counts for the older connection,
    /// which costs at most a replay).
    pub fn record(&mut self, seq: u64, epoch: u64) {
        self.connected(epoch);
        self.ever.insert(seq, seq);
        self.ever.cap(MAX_HANDED_RANGES);
        if epoch == self.epoch {
            self.current.insert(seq, seq);
            self.current.cap(MAX_HANDED_RANGES);
        }
    }

    /// Connection `epoch` is up: nothing is published on it yet. An older epoch (a publish
    /// reported late) changes nothing.
    pub fn connected(&mut self, epoch: u64) {
        if epoch > self.epoch {
            self.current = RangeSet::default();
            self.epoch = epoch;
        }
    }

    /// Whether `seq` was published on the current connection.
    pub fn on_current(&self, seq: u64) -> bool {
        self.current.contains(seq)
    }

    /// The parts of acknowledged `ranges` that were ever published by this process.
    pub fn published(&self, ranges: &[[u64; 2]]) -> Vec<[u64; 2]> {
        ranges
            .iter()
            .flat_map(|&[first, last]| self.ever.within(first, last))
            .collect()
    }

    /// Everything `<= seq` left the journal.
    pub fn forget_through(&mut self, seq: u64) {
        self.ever.remove_through(seq);
        self.current.remove_through(seq);
    }
}

#[derive(Debug, Clone)]
struct Group {
    watermark: u64,
    /// Acknowledged seqs above the watermark.
    acked: RangeSet,
    /// Since when the group has had unacknowledged records; restarts at every replay round,
    /// so the round after is due a (doubled) timeout later.
    waiting_since: Option<Instant>,
    timeout: Duration,
    /// Since when the group has kept records waiting without acknowledging any: what the replay
    /// WARN reports as the time waited.
    stalled_since: Option<Instant>,
    /// The next round is the first after a reconnect: what was published on the new connection
    /// is on its way and is not sent again.
    after_reconnect: bool,
    /// Listed in `wait_for`: a registration cannot make the producer forget it.
    configured: bool,
    /// Learned from a registration (persisted by the producer).
    learned: bool,
}

impl Group {
    fn new(watermark: u64, timeout: Duration) -> Self {
        Group {
            watermark,
            acked: RangeSet::default(),
            waiting_since: None,
            timeout,
            stalled_since: None,
            after_reconnect: false,
            configured: false,
            learned: false,
        }
    }
}

/// What [`AckTracker::forget`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forgot {
    /// The group is no longer waited for.
    Forgotten,
    /// It is in `wait_for`, so it is still waited for.
    Configured,
    /// It was not learned.
    Unknown,
}

/// A group that is due for a replay round: see [`AckTracker::overdue`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Due {
    pub group: String,
    /// Its watermark: everything above it that it has not acknowledged is sent again.
    pub after: u64,
    /// What it acknowledged above the watermark (not sent again).
    pub acked: RangeSet,
    /// How long it has kept records waiting without acknowledging any.
    pub waited: Duration,
    /// The first round after a reconnect: records published on the current connection are
    /// on their way and are left out.
    pub after_reconnect: bool,
}

/// Per-group watermarks of one stream.
#[derive(Debug, Clone)]
pub struct AckTracker {
    groups: BTreeMap<String, Group>,
    /// A group's replay timeout: `ack_timeout_ms`, doubling per round to `ack_timeout_max_ms`.
    replay: Backoff,
}

impl AckTracker {
    /// Track the configured `groups`, none of which has acknowledged anything yet: each starts
    /// just below the journal's first record.
    pub fn new<'a>(
        groups: impl IntoIterator<Item = &'a str>,
        journal_first: Option<u64>,
        replay: Backoff,
    ) -> Self {
        let watermark = below(journal_first);
        let groups = groups
            .into_iter()
            .map(|g| {
                let mut group = Group::new(watermark, replay.min());
                group.configured = true;
                (g.to_string(), group)
            })
            .collect();
        Self { groups, replay }
    }

    /// No group is waited for: there is no trim point.
    pub fn is_empty(&self) -> bool {
        self.groups.is_empty()
    }

    /// Whether acknowledgements of `group` count.
    pub fn waits_for(&self, group: &str) -> bool {
        self.groups.contains_key(group)
    }

    /// The groups learned from registrations (what the producer persists).
    pub fn learned(&self) -> impl Iterator<Item = &str> {
        self.groups
            .iter()
            .filter(|(_, g)| g.learned)
            .map(|(name, _)| name.as_str())
    }

    /// Number of groups waited for.
    pub fn len(&self) -> usize {
        self.groups.len()
    }

    /// A registration says `group` consumes this stream. A group not waited for yet starts just
    /// below the journal's first record — it is owed everything still held — and is due after
    /// `grace` (its members subscribed before they registered, so what they got since is
    /// acknowledged by then, and the rest is sent). Returns whether the group is newly waited
    /// for; `false` also when only its `learned` mark is new (see [`AckTracker::learned`]).
    pub fn learn(
        &mut self,
        group: &str,
        journal_first: Option<u64>,
        now: Instant,
        grace: Duration,
    ) -> bool {
        if let Some(g) = self.groups.get_mut(group) {
            g.learned = true;
            return false;
        }
        let mut g = Group::new(below(journal_first), self.due_in(grace));
        g.learned = true;
        g.waiting_since = Some(now);
        g.stalled_since = Some(now);
        self.groups.insert(group.to_string(), g);
        true
    }

    /// A registration withdrew `group` (or says it no longer consumes this stream). A group in
    /// `wait_for` stays waited for; only its `learned` mark goes.
    pub fn forget(&mut self, group: &str) -> Forgot {
        let Some(g) = self.groups.get_mut(group) else {
            return Forgot::Unknown;
        };
        if g.configured {
            return if std::mem::take(&mut g.learned) {
                Forgot::Configured
            } else {
                Forgot::Unknown
            };
        }
        self.groups.remove(group);
        Forgot::Forgotten
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
            g.timeout = self.replay.min();
            g.waiting_since = Some(now);
            g.stalled_since = Some(now);
        }
        moved
    }

    /// Note that records were published up to `last_seq`: groups that had nothing pending
    /// start waiting now.
    pub fn published(&mut self, now: Instant) {
        for g in self.groups.values_mut() {
            g.waiting_since.get_or_insert(now);
            g.stalled_since.get_or_insert(now);
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

    /// Groups that are overdue, with what to send them. Calling this starts each due group's
    /// next wait and doubles its timeout.
    pub fn overdue(&mut self, journal_last: Option<u64>, now: Instant) -> Vec<Due> {
        let mut out = Vec::new();
        let Some(last) = journal_last else {
            for g in self.groups.values_mut() {
                g.waiting_since = None;
                g.stalled_since = None;
            }
            return out;
        };
        for (name, g) in &mut self.groups {
            if g.watermark >= last {
                g.waiting_since = None;
                g.stalled_since = None;
                continue;
            }
            let since = *g.waiting_since.get_or_insert(now);
            let stalled = *g.stalled_since.get_or_insert(since);
            if now.duration_since(since) >= g.timeout {
                out.push(Due {
                    group: name.clone(),
                    after: g.watermark,
                    acked: g.acked.clone(),
                    waited: now.duration_since(stalled),
                    after_reconnect: std::mem::take(&mut g.after_reconnect),
                });
                g.waiting_since = Some(now);
                g.timeout = self.replay.doubled(g.timeout);
            }
        }
        out
    }

    /// After a reconnect, whatever was in flight may be gone: make every waiting group due
    /// after `grace` (time for sinks to reconnect and subscribe too). That round leaves out
    /// what was published on the new connection; later rounds send everything unacknowledged.
    pub fn reconnected(&mut self, now: Instant, grace: Duration) {
        let timeout = self.due_in(grace);
        for g in self.groups.values_mut() {
            if g.waiting_since.is_some() {
                // Due exactly `grace` from now, whatever the base timeout (shorter or longer);
                // the usual doubling continues from there and resets on progress.
                g.waiting_since = Some(now);
                g.timeout = timeout;
                g.after_reconnect = true;
            }
        }
    }

    fn due_in(&self, grace: Duration) -> Duration {
        grace.min(self.replay.max()).max(Duration::from_millis(1))
    }
}

/// The watermark of a group that has acknowledged nothing: just below the journal's first
/// record (0 for an empty journal; `advance` passes gaps).
fn below(journal_first: Option<u64>) -> u64 {
    journal_first.map_or(0, |f| f.saturating_sub(1))
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

    fn policy(min: Duration, max: Duration) -> Backoff {
        Backoff::new(min, max).unwrap()
    }

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
        let mut t = AckTracker::new(["influx"], Some(1), policy(T, T * 30));
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
        let mut t = AckTracker::new(["s"], Some(1), policy(T, T * 30));
        t.ack("s", &[[1, 10]], &journal, now);
        assert_eq!(t.watermark("s"), Some(65_546));
        t.ack("s", &[[65_547, 65_550]], &journal, now);
        assert_eq!(t.watermark("s"), Some(65_550));
    }

    #[test]
    fn the_slowest_group_holds_the_trim_point_and_strangers_are_ignored() {
        let now = Instant::now();
        let journal = [[1, 10]];
        let mut t = AckTracker::new(["a", "b"], Some(1), policy(T, T * 30));
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
        let mut t = AckTracker::new(["s"], Some(1), policy(T, T * 4));
        t.published(t0);
        assert!(t.overdue(Some(10), t0 + T / 2).is_empty());
        let due = t.overdue(Some(10), t0 + T);
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].after, 0);
        // Next wait is twice as long.
        assert!(t.overdue(Some(10), t0 + T + T).is_empty());
        assert_eq!(t.overdue(Some(10), t0 + T * 3).len(), 1);
        // Progress resets the timeout.
        t.ack("s", &[[1, 5]], &journal, t0 + T * 3);
        let due = t.overdue(Some(10), t0 + T * 4);
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].after, 5);
        t.ack("s", &[[6, 10]], &journal, t0 + T * 4);
        assert!(
            t.overdue(Some(10), t0 + T * 100).is_empty(),
            "nothing pending, nothing due"
        );
    }

    #[test]
    fn acks_beyond_the_journal_acknowledge_nothing_in_advance() {
        let now = Instant::now();
        let mut t = AckTracker::new(["influx"], Some(1), policy(T, T * 30));
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
        let mut t = AckTracker::new(["s"], Some(1), policy(Duration::from_millis(500), T));
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
        let mut t = AckTracker::new(["s"], Some(1), policy(T, T));
        // The journal was full and dropped 1..=100; 101..=150 remain.
        t.journal_changed(&[[101, 150]]);
        assert_eq!(t.watermark("s"), Some(100));
        t.ack("s", &[[101, 150]], &[[101, 150]], now);
        assert_eq!(t.watermark("s"), Some(150));
    }

    #[test]
    fn reconnect_makes_waiting_groups_due_after_the_grace() {
        let t0 = Instant::now();
        let mut t = AckTracker::new(["s"], Some(1), policy(T, T));
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

    #[test]
    fn with_no_group_known_there_is_no_trim_point() {
        let now = Instant::now();
        let mut t = AckTracker::new([], Some(1), policy(T, T));
        assert!(t.is_empty());
        // Someone acknowledges everything for a group nobody waits for: nothing moves.
        assert!(!t.ack("stranger", &[[1, u64::MAX]], &[[1, 10]], now));
        assert_eq!(
            t.trim_point(),
            None,
            "no group known: nothing may be trimmed"
        );
        t.published(now);
        assert!(t.overdue(Some(10), now + T * 10).is_empty());
    }

    #[test]
    fn a_group_learned_late_is_owed_everything_still_held() {
        let t0 = Instant::now();
        let grace = Duration::from_secs(2);
        let mut t = AckTracker::new([], Some(1), policy(T, T * 30));
        t.published(t0);
        // Ten records held for nobody; then a sink group registers.
        assert!(t.learn("influx", Some(1), t0 + T, grace));
        assert_eq!(t.watermark("influx"), Some(0));
        assert_eq!(
            t.trim_point(),
            Some(0),
            "nothing trimmed before it acknowledges"
        );
        assert!(t.overdue(Some(10), t0 + T + grace / 2).is_empty());
        let due = t.overdue(Some(10), t0 + T + grace);
        assert_eq!(due.len(), 1);
        assert_eq!((due[0].group.as_str(), due[0].after), ("influx", 0));
        assert!(
            !due[0].after_reconnect,
            "a new group is owed what was published before it"
        );
        assert!(t.ack("influx", &[[1, 10]], &[[1, 10]], t0 + T * 2));
        assert_eq!(t.trim_point(), Some(10));
        // Learning it again changes nothing.
        assert!(!t.learn("influx", Some(11), t0 + T * 3, grace));
        assert_eq!(t.watermark("influx"), Some(10));
    }

    #[test]
    fn a_group_learned_beside_a_faster_one_holds_the_trim_point_back() {
        let now = Instant::now();
        let mut t = AckTracker::new(["files"], Some(5), policy(T, T));
        t.ack("files", &[[5, 9]], &[[5, 20]], now);
        assert_eq!(t.trim_point(), Some(9));
        // The journal still holds 10..=20 (5..=9 were trimmed): the newcomer gets 10 onwards.
        t.learn("influx", Some(10), now, T);
        assert_eq!(t.trim_point(), Some(9));
        t.ack("influx", &[[10, 20]], &[[10, 20]], now);
        assert_eq!(t.watermark("influx"), Some(20));
        assert_eq!(t.trim_point(), Some(9), "files still holds it");
    }

    #[test]
    fn forgetting_a_learned_group_releases_the_journal_but_not_a_configured_one() {
        let now = Instant::now();
        let mut t = AckTracker::new(["files"], Some(1), policy(T, T));
        t.learn("influx", Some(1), now, T);
        t.learn("files", Some(1), now, T);
        assert_eq!(t.learned().collect::<Vec<_>>(), vec!["files", "influx"]);
        t.ack("files", &[[1, 10]], &[[1, 10]], now);
        assert_eq!(t.trim_point(), Some(0));
        assert_eq!(t.forget("influx"), Forgot::Forgotten);
        assert!(!t.waits_for("influx"));
        assert_eq!(t.trim_point(), Some(10));
        assert_eq!(t.forget("files"), Forgot::Configured);
        assert!(t.waits_for("files"), "wait_for is the person's word");
        assert_eq!(t.learned().count(), 0);
        assert_eq!(t.forget("files"), Forgot::Unknown, "nothing left to forget");
        assert_eq!(t.forget("nobody"), Forgot::Unknown);
        assert_eq!(t.forget("influx"), Forgot::Unknown);
    }

    #[test]
    fn a_replay_reports_how_long_the_group_has_kept_records_waiting() {
        let t0 = Instant::now();
        let mut t = AckTracker::new(["s"], Some(1), policy(T, T * 30));
        t.published(t0);
        let waited = |t: &mut AckTracker, at: Duration| {
            let due = t.overdue(Some(10), t0 + at);
            assert_eq!(due.len(), 1, "due at {at:?}");
            due[0].waited
        };
        assert_eq!(waited(&mut t, T), T);
        // Backoff: the next rounds are 20 s and 40 s later, and the wait adds up.
        assert_eq!(waited(&mut t, T * 3), T * 3);
        assert_eq!(waited(&mut t, T * 7), T * 7);
        // Progress restarts the count.
        t.ack("s", &[[1, 5]], &[[1, 10]], t0 + T * 8);
        assert_eq!(waited(&mut t, T * 9), T);
    }

    #[test]
    fn only_the_first_round_after_a_reconnect_leaves_out_the_new_connection() {
        let t0 = Instant::now();
        let grace = Duration::from_secs(2);
        let mut t = AckTracker::new(["s"], Some(1), policy(T, T * 30));
        t.published(t0);
        t.reconnected(t0, grace);
        let due = t.overdue(Some(10), t0 + grace);
        assert!(due[0].after_reconnect);
        let due = t.overdue(Some(10), t0 + grace * 3);
        assert_eq!(due.len(), 1);
        assert!(!due[0].after_reconnect);
    }

    #[test]
    fn handed_counts_acknowledgements_only_for_published_records() {
        let mut h = Handed::default();
        h.connected(1);
        for seq in (1..=5).chain(8..=10) {
            h.record(seq, 1);
        }
        // 6 and 7 were deferred (the broker was unreachable), 11.. do not exist yet.
        assert_eq!(
            h.published(&[[1, u64::MAX]]),
            vec![[1, 5], [8, 10]],
            "a forged range over records nobody received counts for nothing"
        );
        assert_eq!(h.published(&[[4, 8]]), vec![[4, 5], [8, 8]]);
        assert!(h.on_current(9));
        h.connected(2);
        assert!(
            !h.on_current(9),
            "a new connection has published nothing yet"
        );
        // A publish read under connection 1 but reported after connection 2 came up.
        h.record(11, 1);
        assert!(!h.on_current(11));
        assert_eq!(h.published(&[[11, 11]]), vec![[11, 11]]);
        assert_eq!(h.published(&[[9, 9]]), vec![[9, 9]], "still published once");
        h.forget_through(9);
        assert_eq!(h.published(&[[1, 20]]), vec![[10, 11]]);
    }

    #[test]
    fn handed_stays_bounded_when_publishing_is_fragmented() {
        let mut h = Handed::default();
        for i in 0..(MAX_HANDED_RANGES as u64 * 2) {
            h.record(i * 2, 1);
        }
        assert!(h.ever.len() <= MAX_HANDED_RANGES);
        assert!(h.current.len() <= MAX_HANDED_RANGES);
        // The newest survive; the oldest are forgotten (a replay, never a reading).
        assert!(h.ever.contains(MAX_HANDED_RANGES as u64 * 4 - 2));
        assert!(!h.ever.contains(0));
    }

    #[test]
    fn range_set_within_clips_to_the_window() {
        let mut s = RangeSet::default();
        s.insert(1, 5);
        s.insert(10, 20);
        assert_eq!(s.within(3, 12).collect::<Vec<_>>(), vec![[3, 5], [10, 12]]);
        assert_eq!(s.within(6, 9).count(), 0);
        assert_eq!(s.within(12, 3).count(), 0);
        assert_eq!(
            s.within(0, u64::MAX).collect::<Vec<_>>(),
            vec![[1, 5], [10, 20]]
        );
    }
}
