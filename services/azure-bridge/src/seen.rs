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

/// Origins per `producer/stream`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Seen(HashMap<String, Ranges>);

impl Seen {
    fn key(producer: &str, stream: &str) -> String {
        format!("{producer}/{stream}")
    }

    pub fn contains(&self, producer: &str, stream: &str, seq: u64) -> bool {
        self.0
            .get(&Self::key(producer, stream))
            .is_some_and(|r| r.contains(seq))
    }

    pub fn insert(&mut self, producer: &str, stream: &str, seq: u64) {
        self.0
            .entry(Self::key(producer, stream))
            .or_default()
            .insert(seq);
    }

    /// Add every origin of `other`.
    pub fn extend(&mut self, other: &Seen) {
        for (k, r) in &other.0 {
            let mine = self.0.entry(k.clone()).or_default();
            for range in r.ranges() {
                mine.insert_range(*range);
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// `producer/stream:1-500,502-510;other/meas:7-7` (segments have no `:`, `;`, `,`, ` `).
    pub fn encode(&self) -> String {
        let mut keys: Vec<&String> = self.0.keys().collect();
        keys.sort();
        let mut out = String::new();
        for k in keys {
            if !out.is_empty() {
                out.push(';');
            }
            out.push_str(k);
            out.push(':');
            for (i, r) in self.0[k].ranges().iter().enumerate() {
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
            let mine = seen.0.entry(k.to_string()).or_default();
            for r in ranges.split(',') {
                let (a, b) = r.split_once('-')?;
                mine.insert_range([a.parse().ok()?, b.parse().ok()?]);
            }
        }
        Some(seen)
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

    #[test]
    fn seen_round_trips_through_its_text() {
        let mut s = Seen::default();
        for q in [1, 2, 3, 9] {
            s.insert("modbus-ingest", "meas", q);
        }
        s.insert("sim", "meas", 7);
        let text = s.encode();
        assert_eq!(text, "modbus-ingest/meas:1-3,9-9;sim/meas:7-7");
        assert_eq!(Seen::decode(&text), Some(s));
        assert_eq!(Seen::decode("x:1-a"), None);
    }
}
