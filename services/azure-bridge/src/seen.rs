//! Which readings the outbox already holds, by origin (producer, stream, seq): a producer
//! replays a reading whose acknowledgement was lost (the bridge killed between storing a
//! message and publishing its acknowledgements, a broker restart), and it must not reach the
//! hub a second time in another message. Pure.
//!
//! Kept as merged ranges per stream, so a steady stream costs one range. Rebuilt at start from
//! the messages the outbox holds (each record's metadata lists its origins), and grown as
//! messages are stored.

use std::collections::HashMap;
use std::fmt::Write as _;

use proto::Origin;

/// Seq ranges of one stream, sorted, merged, inclusive.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ranges(Vec<[u64; 2]>);

impl Ranges {
    pub fn contains(&self, seq: u64) -> bool {
        let i = self.0.partition_point(|r| r[1] < seq);
        self.0.get(i).is_some_and(|r| r[0] <= seq)
    }

    pub fn insert(&mut self, seq: u64) {
        self.insert_range([seq, seq]);
    }

    pub fn insert_range(&mut self, [lo, hi]: [u64; 2]) {
        if lo > hi {
            return;
        }
        // Fast path: appending after the last range (a live stream).
        if let Some(last) = self.0.last_mut()
            && lo >= last[0]
        {
            if lo <= last[1].saturating_add(1) {
                last[1] = last[1].max(hi);
                return;
            }
            self.0.push([lo, hi]);
            return;
        }
        self.0.push([lo, hi]);
        self.0.sort_unstable();
        let mut merged: Vec<[u64; 2]> = Vec::with_capacity(self.0.len());
        for r in self.0.drain(..) {
            match merged.last_mut() {
                Some(m) if r[0] <= m[1].saturating_add(1) => m[1] = m[1].max(r[1]),
                _ => merged.push(r),
            }
        }
        self.0 = merged;
    }

    pub fn ranges(&self) -> &[[u64; 2]] {
        &self.0
    }
}

/// One stream's origins: the seqs, and the newest read time among them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stream {
    ranges: Ranges,
    newest_ts_ms: i64,
}

/// What an arriving reading is, by its origin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Not seen: take it.
    New,
    /// Seen already (its acknowledgement was lost, the producer replayed it): acknowledge it
    /// again, do not send it twice.
    Repeat,
    /// Its seq was seen, but it was read after every reading seen from that stream: not a
    /// replay (a replay is the same reading, so no newer than what was seen), but a producer
    /// whose journal was recreated and numbers from 1 again. The stream's origins are
    /// forgotten and the reading taken.
    Renumbered,
}

/// Origins per `producer/stream`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Seen(HashMap<String, Stream>);

impl Seen {
    /// `producer/stream`, and `/epoch` when the producer's journal has one: a recreated
    /// journal is another key, so its numbers from 1 are new whatever its clock says.
    fn key(o: &Origin) -> String {
        match &o.epoch {
            Some(e) => format!("{}/{}/{e}", o.producer, o.stream),
            None => format!("{}/{}", o.producer, o.stream),
        }
    }

    pub fn contains(&self, o: &Origin) -> bool {
        self.0
            .get(&Self::key(o))
            .is_some_and(|s| s.ranges.contains(o.seq))
    }

    /// What a reading from `o`, read at `ts_ms`, is. A [`Verdict::Renumbered`] stream is
    /// forgotten here. With an epoch (every current producer) a seen seq is a repeat; without
    /// one (an older producer) a seen seq read after everything seen from the stream is a
    /// renumbering, which a clock set back hides (docs/azure-bridge.md).
    pub fn check(&mut self, o: &Origin, ts_ms: i64) -> Verdict {
        let key = Self::key(o);
        let Some(s) = self.0.get(&key) else {
            return Verdict::New;
        };
        if !s.ranges.contains(o.seq) {
            Verdict::New
        } else if o.epoch.is_none() && ts_ms > s.newest_ts_ms {
            self.0.remove(&key);
            Verdict::Renumbered
        } else {
            Verdict::Repeat
        }
    }

    pub fn insert(&mut self, o: &Origin, ts_ms: i64) {
        let s = self.0.entry(Self::key(o)).or_default();
        s.ranges.insert(o.seq);
        s.newest_ts_ms = s.newest_ts_ms.max(ts_ms);
    }

    /// Add every origin of `other`.
    pub fn extend(&mut self, other: &Seen) {
        for (k, o) in &other.0 {
            let mine = self.0.entry(k.clone()).or_default();
            for range in o.ranges.ranges() {
                mine.ranges.insert_range(*range);
            }
            mine.newest_ts_ms = mine.newest_ts_ms.max(o.newest_ts_ms);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Ranges held, all streams together (for the size of the state).
    pub fn ranges(&self) -> usize {
        self.0.values().map(|s| s.ranges.ranges().len()).sum()
    }

    /// `producer/stream[/epoch]@newest:1-500,502-510;other/meas@…:7-7` (segments have no
    /// `@`, `:`, `;`, `,`, ` ` or newline).
    pub fn encode(&self) -> String {
        let mut keys: Vec<&String> = self.0.keys().collect();
        keys.sort();
        let mut out = String::new();
        for k in keys {
            if !out.is_empty() {
                out.push(';');
            }
            let s = &self.0[k];
            let _ = write!(out, "{k}@{}:", s.newest_ts_ms);
            for (i, r) in s.ranges.ranges().iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                let _ = write!(out, "{}-{}", r[0], r[1]);
            }
        }
        out
    }

    pub fn decode(s: &str) -> Option<Seen> {
        let mut seen = Seen::default();
        for part in s.split(';').filter(|p| !p.is_empty()) {
            let (k, ranges) = part.split_once(':')?;
            let (k, newest) = k.split_once('@')?;
            let mine = seen.0.entry(k.to_string()).or_default();
            mine.newest_ts_ms = newest.parse().ok()?;
            for r in ranges.split(',').filter(|r| !r.is_empty()) {
                let (a, b) = r.split_once('-')?;
                mine.ranges.insert_range([a.parse().ok()?, b.parse().ok()?]);
            }
        }
        Some(seen)
    }

    /// The state file's contents: a line `wbseen1 <crc32 of the rest>`, then [`Seen::encode`].
    pub fn to_file(&self) -> Vec<u8> {
        let body = self.encode();
        format!("wbseen1 {:08x}\n{body}", crc32fast::hash(body.as_bytes())).into_bytes()
    }

    /// Read a state file; `Err` says why it is not trusted.
    pub fn from_file(bytes: &[u8]) -> Result<Seen, String> {
        let text = std::str::from_utf8(bytes).map_err(|_| "not text".to_string())?;
        let (head, body) = text.split_once('\n').ok_or("no header line")?;
        let crc = head.strip_prefix("wbseen1 ").ok_or("not a wbseen1 file")?;
        if u32::from_str_radix(crc, 16).ok() != Some(crc32fast::hash(body.as_bytes())) {
            return Err("its checksum does not match (damaged)".into());
        }
        Seen::decode(body).ok_or_else(|| "its contents do not parse".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_merge_and_answer() {
        let mut r = Ranges::default();
        for s in [5, 6, 7, 1, 3, 2, 10] {
            r.insert(s);
        }
        assert_eq!(r.ranges(), &[[1, 3], [5, 7], [10, 10]]);
        r.insert(4);
        r.insert(8);
        r.insert(9);
        assert_eq!(r.ranges(), &[[1, 10]]);
        assert!(r.contains(1) && r.contains(10) && !r.contains(0) && !r.contains(11));
    }

    fn origin(producer: &str, seq: u64, epoch: Option<&str>) -> Origin {
        Origin {
            producer: proto::Segment::new(producer).unwrap(),
            stream: proto::Segment::new("meas").unwrap(),
            seq,
            epoch: epoch.map(|e| proto::Segment::new(e).unwrap()),
        }
    }

    #[test]
    fn seen_round_trips_through_its_text_and_its_file() {
        let mut s = Seen::default();
        for q in [1, 2, 3, 9] {
            s.insert(&origin("modbus-ingest", q, None), 1000 + q as i64);
        }
        s.insert(&origin("sim", 7, None), 5);
        let text = s.encode();
        assert_eq!(text, "modbus-ingest/meas@1009:1-3,9-9;sim/meas@5:7-7");
        assert_eq!(Seen::decode(&text), Some(s.clone()));
        assert_eq!(Seen::decode("x@1:1-a"), None);
        let file = s.to_file();
        assert_eq!(Seen::from_file(&file), Ok(s));
        let mut damaged = file.clone();
        let last = damaged.len() - 1;
        damaged[last] ^= 1;
        assert!(Seen::from_file(&damaged).unwrap_err().contains("checksum"));
    }

    #[test]
    fn a_replay_is_a_repeat_and_a_renumbered_producer_is_not() {
        let mut s = Seen::default();
        for q in 1..=100 {
            s.insert(&origin("p", q, None), 1_000 + q as i64);
        }
        assert_eq!(s.check(&origin("p", 50, None), 1_050), Verdict::Repeat);
        assert_eq!(s.check(&origin("p", 101, None), 1_101), Verdict::New);
        assert_eq!(s.check(&origin("q", 1, None), 1), Verdict::New);
        // A recreated journal of an older producer (no epoch) numbers from 1 again, with
        // readings read later.
        assert_eq!(s.check(&origin("p", 1, None), 9_000), Verdict::Renumbered);
        assert!(
            !s.contains(&origin("p", 50, None)),
            "the old numbers are forgotten"
        );
    }

    /// With epochs, a recreated journal is told apart whatever its clock says: the case the
    /// read times alone get wrong (its clock set back).
    #[test]
    fn a_new_epoch_is_new_even_with_its_clock_behind() {
        let mut s = Seen::default();
        let (old, new) = (Some("00000000000000a1"), Some("00000000000000b2"));
        for q in 1..=100 {
            s.insert(&origin("p", q, old), 1_000_000 + q as i64);
        }
        assert_eq!(s.check(&origin("p", 50, old), 1_000_050), Verdict::Repeat);
        // Same numbers, a new journal, read "an hour earlier".
        assert_eq!(s.check(&origin("p", 50, new), 10), Verdict::New);
        s.insert(&origin("p", 50, new), 10);
        assert_eq!(s.check(&origin("p", 50, old), 1_000_050), Verdict::Repeat);
        assert_eq!(Seen::decode(&s.encode()), Some(s));
    }
}
