//! The outbox: packed messages the hub has not acknowledged, on disk.
//!
//! A runtime [`Journal`] (checksummed records, segment files, damage skipped and moved aside,
//! locked against a second process) whose records are whole hub messages. A message is
//! appended and fsynced before its readings are acknowledged to their producers, and trimmed
//! once the hub has acknowledged it and every message before it: so everything between a
//! producer's journal and the hub is always in one of the two, across restarts, `kill -9` and
//! power cuts.
//!
//! A record's topic field carries the message's metadata, `wb2 <readings> <oldest_ms>
//! <newest_ms>`, so the TTL and the counts need no parsing of the body. Its payload is the
//! origins of its readings (`seen`'s text, one line) and then the body, sent byte for byte
//! every time (so a repeat carries the same id).
//!
//! The outbox also keeps what it has ever held, by origin (`seen`), so a reading a producer
//! replays after its acknowledgement was lost — the bridge or the producer killed, a power
//! cut, a broker restart — is never sent twice. That set lives in memory and in the `seen`
//! file; it is saved before any message is trimmed (at most every 30 s, the trim waiting
//! meanwhile), so every origin is always either in the file or in a message still on disk.
//! Message ids are
//! `<prefix>-<seq>`: the prefix is random per outbox (the `id` file), the seq the journal's,
//! which never repeats; a lost `id` file gives new messages a new prefix, never an old id.

use std::path::{Path, PathBuf};

use runtime::config::{JournalKind, StreamConfig};
use runtime::journal::{Dropped, Journal, JournalError, OpenReport};

use crate::pack::{Packed, Packer, message_id};
use crate::seen::{Seen, Verdict};

/// Segment files of the outbox: 1 MiB, so an acknowledged stretch is freed soon.
const SEGMENT_BYTES: u64 = 1024 * 1024;

/// A full outbox drops its oldest segment files whole: segments are at most 1/16 of the
/// bound (and at least 64 KiB), so an overflow drops at most that share, not most of a
/// small outbox.
fn segment_bytes(max_bytes: u64) -> u64 {
    (max_bytes / 16).clamp(64 * 1024, SEGMENT_BYTES)
}

/// One stored message.
#[derive(Debug, Clone, PartialEq)]
pub struct Stored {
    pub seq: u64,
    pub id: String,
    pub meta: Meta,
    pub body: Vec<u8>,
}

/// What the outbox knows of a message without reading its body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Meta {
    pub readings: u64,
    pub oldest_ms: i64,
    pub newest_ms: i64,
}

impl Meta {
    fn encode(&self) -> String {
        format!(
            "wb2 {} {} {}",
            self.readings, self.oldest_ms, self.newest_ms
        )
    }

    fn decode(s: &str) -> Option<Self> {
        let mut p = s.split(' ');
        if p.next()? != "wb2" {
            return None;
        }
        Some(Self {
            readings: p.next()?.parse().ok()?,
            oldest_ms: p.next()?.parse().ok()?,
            newest_ms: p.next()?.parse().ok()?,
        })
    }
}

/// A record's payload: `<origins>\n<body>`.
fn split_payload(payload: &[u8]) -> (Option<Seen>, &[u8]) {
    match payload.iter().position(|b| *b == b'\n') {
        Some(i) => (
            std::str::from_utf8(&payload[..i])
                .ok()
                .and_then(Seen::decode),
            &payload[i + 1..],
        ),
        None => (None, payload),
    }
}

/// The `seen` file is saved at most this often (a small file, replaced: SD-card wear); trims
/// wait for it, so messages the hub has are deleted up to this late.
const SEEN_SAVE_EVERY: std::time::Duration = std::time::Duration::from_secs(30);

#[derive(Debug)]
pub struct Outbox {
    journal: Journal,
    prefix: String,
    dir: PathBuf,
    /// Every origin this outbox has held (see the module doc).
    seen: Seen,
    seen_dirty: bool,
    seen_saved: std::time::Instant,
    /// Every message `<=` this is done (acknowledged by the hub, or expired); the journal is
    /// trimmed to it once `seen` is saved.
    done_through: u64,
}

/// A record whose metadata could not be read (written by a newer version): sent as it is.
fn unknown() -> Meta {
    Meta {
        readings: 0,
        oldest_ms: i64::MAX,
        newest_ms: i64::MAX,
    }
}

impl Outbox {
    /// Open (or create) the outbox in `dir`, holding at most `max_bytes`.
    pub fn open(
        dir: &Path,
        max_bytes: u64,
    ) -> Result<(Self, OpenReport, Option<String>), JournalError> {
        let cfg = StreamConfig {
            journal: JournalKind::Disk,
            max_bytes,
            segment_bytes: segment_bytes(max_bytes),
            ..StreamConfig::default()
        };
        let (journal, report) = Journal::open(dir, &cfg)?;
        let id_path = dir.join("id");
        let (prefix, problem) = match std::fs::read_to_string(&id_path) {
            Ok(s) if is_prefix(s.trim()) => (s.trim().to_string(), None),
            other => {
                let prefix = random_prefix();
                let problem = match other {
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                    Err(e) => Some(format!("cannot read {}: {e}", id_path.display())),
                    Ok(_) => Some(format!("{} is damaged", id_path.display())),
                };
                runtime::state::replace_file(&id_path, prefix.as_bytes()).map_err(|source| {
                    JournalError::Io {
                        path: id_path.clone(),
                        source,
                    }
                })?;
                (prefix, problem)
            }
        };
        let seen_path = dir.join("seen");
        let (mut seen, seen_problem) = match std::fs::read(&seen_path) {
            Ok(bytes) => match Seen::from_file(&bytes) {
                Ok(s) => (s, None),
                Err(why) => (
                    Seen::default(),
                    Some(format!(
                        "{} is not trusted ({why}): readings a producer replays that the hub already has may be sent again",
                        seen_path.display()
                    )),
                ),
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => (Seen::default(), None),
            Err(e) => (
                Seen::default(),
                Some(format!("cannot read {}: {e}", seen_path.display())),
            ),
        };
        let mut outbox = Self {
            journal,
            prefix,
            dir: dir.to_path_buf(),
            seen: Seen::default(),
            seen_dirty: false,
            seen_saved: std::time::Instant::now(),
            done_through: 0,
        };
        seen.extend(&outbox.held_origins()?);
        outbox.seen = seen;
        let problem = match (problem, seen_problem) {
            (Some(a), Some(b)) => Some(format!("{a}; {b}")),
            (a, b) => a.or(b),
        };
        Ok((outbox, report, problem))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Take the packer's message, append it and fsync it. What the bound dropped to make room
    /// is returned with it.
    pub fn append(
        &mut self,
        packer: &mut Packer,
    ) -> Result<(Stored, Option<Dropped>), JournalError> {
        let seq = self.journal.next_seq()?;
        let id = message_id(&self.prefix, seq);
        let Packed {
            body,
            readings,
            origins,
            oldest_ms,
            newest_ms,
        } = packer.take(&id);
        let meta = Meta {
            readings: readings as u64,
            oldest_ms,
            newest_ms,
        };
        let mut payload = origins.encode().into_bytes();
        payload.push(b'\n');
        payload.extend_from_slice(&body);
        let dropped = self.journal.append_at(seq, &meta.encode(), &payload)?;
        self.journal.sync_newest()?;
        self.seen.extend(&origins);
        self.seen_dirty = true;
        Ok((
            Stored {
                seq,
                id,
                meta,
                body,
            },
            dropped,
        ))
    }

    /// Up to `limit` messages after `after` (and after what is done), in order, at most about
    /// `max_bytes` of them.
    pub fn read_after(
        &self,
        after: u64,
        limit: usize,
        max_bytes: u64,
    ) -> Result<Vec<Stored>, JournalError> {
        Ok(self
            .journal
            .read_after_within(after.max(self.done_through), limit, max_bytes, |_| false)?
            .into_iter()
            .map(|r| {
                let (_, body) = split_payload(&r.payload);
                Stored {
                    seq: r.seq,
                    id: body_id(body).unwrap_or_else(|| message_id(&self.prefix, r.seq)),
                    meta: Meta::decode(&r.topic).unwrap_or_else(unknown),
                    body: body.to_vec(),
                }
            })
            .collect())
    }

    /// Every message `<= seq` is done: acknowledged by the hub, or expired. The journal is
    /// trimmed once the origins it holds are in the `seen` file (see the module doc).
    pub fn trim_through(&mut self, seq: u64) -> Result<(), JournalError> {
        self.done_through = self.done_through.max(seq);
        if self.seen_dirty && self.seen_saved.elapsed() < SEEN_SAVE_EVERY {
            return Ok(());
        }
        self.save_seen()?;
        self.journal.trim_through(self.done_through).map(|_| ())
    }

    /// Apply a trim `trim_through` postponed, once the `seen` file is due (called every few
    /// seconds).
    pub fn flush_due(&mut self) -> Result<(), JournalError> {
        if self.seen_dirty && self.seen_saved.elapsed() < SEEN_SAVE_EVERY {
            return Ok(());
        }
        self.save_state()
    }

    /// What `trim_through` postponed, and the acknowledged point: when due and at a clean
    /// stop.
    pub fn save_state(&mut self) -> Result<(), JournalError> {
        self.save_seen()?;
        self.journal.trim_through(self.done_through)?;
        self.journal.save_acked()
    }

    fn save_seen(&mut self) -> Result<(), JournalError> {
        if !self.seen_dirty {
            return Ok(());
        }
        let path = self.dir.join("seen");
        runtime::state::replace_file(&path, &self.seen.to_file())
            .map_err(|source| JournalError::Io { path, source })?;
        self.seen_dirty = false;
        self.seen_saved = std::time::Instant::now();
        Ok(())
    }

    /// What an arriving reading is, by its origin (see `seen`).
    pub fn check(&mut self, o: &proto::Origin, ts_ms: i64) -> Verdict {
        let v = self.seen.check(o, ts_ms);
        if v == Verdict::Renumbered {
            self.seen_dirty = true;
        }
        v
    }

    /// A reading settled without being stored (filtered out): noted, so its stream's origins
    /// stay whole ranges.
    pub fn settled(&mut self, o: &proto::Origin, ts_ms: i64) {
        self.seen.insert(o, ts_ms);
        self.seen_dirty = true;
    }

    /// Ranges in the dedup set.
    pub fn seen_ranges(&self) -> usize {
        self.seen.ranges()
    }

    /// The origins of every message held.
    fn held_origins(&self) -> Result<Seen, JournalError> {
        let mut seen = Seen::default();
        let mut after = 0;
        loop {
            let batch = self
                .journal
                .read_after_within(after, 1024, 4 * 1024 * 1024, |_| false)?;
            let Some(last) = batch.last() else {
                return Ok(seen);
            };
            after = last.seq;
            for r in &batch {
                if let (Some(o), _) = split_payload(&r.payload) {
                    seen.extend(&o);
                }
            }
        }
    }

    pub fn records(&self) -> u64 {
        self.journal.records()
    }

    pub fn bytes(&self) -> u64 {
        self.journal.bytes()
    }

    pub fn first_held(&self) -> Option<u64> {
        self.journal.first_held()
    }
}

/// The id a stored body carries (what was sent the first time).
fn body_id(body: &[u8]) -> Option<String> {
    // `{"v":1,"id":"…",` is how every body starts: no need to parse the rest.
    let rest = body.strip_prefix(b"{\"v\":1,\"id\":\"")?;
    let end = rest.iter().position(|b| *b == b'"')?;
    String::from_utf8(rest[..end].to_vec()).ok()
}

fn is_prefix(s: &str) -> bool {
    s.len() == 16 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

fn random_prefix() -> String {
    use ring::rand::SecureRandom as _;
    let mut b = [0u8; 8];
    if ring::rand::SystemRandom::new().fill(&mut b).is_err() {
        // No randomness from the system: the clock in µs still differs per outbox.
        b = (proto::now_ms().unsigned_abs().wrapping_mul(1000)).to_le_bytes();
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::{Measurement, Quality, Segment};
    use std::collections::BTreeMap;

    fn packer_with(n: i64) -> Packer {
        let seg = |s: &str| Segment::new(s).unwrap();
        let mut p = Packer::new(seg("home"), 4096);
        for i in 0..n {
            p.push(&Measurement {
                origin: Some(proto::Origin {
                    producer: seg("modbus-ingest"),
                    stream: seg("meas"),
                    seq: 1000 + i as u64,
                    epoch: None,
                }),
                site: seg("home"),
                device: seg("m1"),
                channel: seg("main"),
                measurement: seg("power"),
                ts_ms: 1_764_000_000_000 + i,
                quality: Quality::Good,
                fields: BTreeMap::from([("power_w".to_string(), i as f64)]),
                tags: BTreeMap::new(),
            })
            .unwrap();
        }
        p
    }

    #[test]
    fn messages_survive_a_reopen_with_their_ids_and_an_acknowledged_one_is_gone() {
        let dir = tempfile::tempdir().unwrap();
        let (first, second) = {
            let (mut o, _, problem) = Outbox::open(dir.path(), 1 << 20).unwrap();
            assert_eq!(problem, None);
            let (a, _) = o.append(&mut packer_with(3)).unwrap();
            let (b, _) = o.append(&mut packer_with(5)).unwrap();
            o.trim_through(a.seq).unwrap();
            o.save_state().unwrap();
            (a, b)
        };
        let (o, _, _) = Outbox::open(dir.path(), 1 << 20).unwrap();
        let held = o.read_after(0, 10, u64::MAX).unwrap();
        assert_eq!(held, vec![second.clone()]);
        assert_eq!(held[0].meta.readings, 5);
        assert!(first.id.ends_with(&format!("-{}", first.seq)));
        assert_eq!(first.id.split('-').next(), second.id.split('-').next());
    }

    fn origin(seq: u64) -> proto::Origin {
        proto::Origin {
            producer: Segment::new("modbus-ingest").unwrap(),
            stream: Segment::new("meas").unwrap(),
            seq,
            epoch: None,
        }
    }

    /// A power cut at any moment: every reading the outbox ever held is still known, so a
    /// producer's replay is recognised whether its message is still held or long sent.
    #[test]
    fn the_origins_of_sent_messages_survive_a_power_cut() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (mut o, _, _) = Outbox::open(dir.path(), 1 << 20).unwrap();
            let (a, _) = o.append(&mut packer_with(3)).unwrap();
            // The hub has it; the trim waits for the `seen` file, which was just saved at
            // open: nothing is lost if the power goes now (no save_state).
            o.trim_through(a.seq).unwrap();
        }
        {
            let (mut o, _, _) = Outbox::open(dir.path(), 1 << 20).unwrap();
            assert_eq!(o.check(&origin(1001), 1_764_000_000_001), Verdict::Repeat);
            let (b, _) = o.append(&mut packer_with(3)).unwrap();
            assert_eq!(b.meta.readings, 3);
            // Sent, trimmed and saved: gone from the journal, still known.
            o.trim_through(b.seq).unwrap();
            o.save_state().unwrap();
            assert!(o.read_after(0, 10, u64::MAX).unwrap().is_empty());
        }
        let (mut o, _, problem) = Outbox::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(problem, None);
        assert!(o.read_after(0, 10, u64::MAX).unwrap().is_empty());
        assert_eq!(o.check(&origin(1002), 1_764_000_000_002), Verdict::Repeat);
        assert_eq!(o.check(&origin(1003), 1_764_000_000_003), Verdict::New);
        // A damaged `seen` file is reported, not trusted.
        drop(o);
        std::fs::write(dir.path().join("seen"), "wbseen1 00000000\nx@1:1-2").unwrap();
        let (_, _, problem) = Outbox::open(dir.path(), 1 << 20).unwrap();
        assert!(problem.unwrap().contains("not trusted"));
    }

    /// A full outbox drops only the oldest messages, a sixteenth of it at a time at most.
    #[test]
    fn a_full_outbox_drops_a_small_share_of_its_oldest_messages() {
        let dir = tempfile::tempdir().unwrap();
        let bound = 1024 * 1024;
        let (mut o, _, _) = Outbox::open(dir.path(), bound).unwrap();
        let mut dropped = Vec::new();
        for _ in 0..3000 {
            let (_, d) = o.append(&mut packer_with(60)).unwrap();
            dropped.extend(d);
        }
        assert!(!dropped.is_empty(), "the bound was never reached");
        assert!(o.bytes() <= bound + 64 * 1024, "{} bytes held", o.bytes());
        let held = o.read_after(0, 100_000, u64::MAX).unwrap().len() as u64;
        let per_drop = dropped.iter().map(|d| d.records).max().unwrap();
        assert!(
            per_drop * 8 < held,
            "one overflow dropped {per_drop} of {held} messages"
        );
    }

    #[test]
    fn a_lost_id_file_never_gives_a_new_message_an_old_id() {
        let dir = tempfile::tempdir().unwrap();
        let a = {
            let (mut o, _, _) = Outbox::open(dir.path(), 1 << 20).unwrap();
            o.append(&mut packer_with(1)).unwrap().0
        };
        std::fs::write(dir.path().join("id"), "garbage").unwrap();
        let (mut o, _, problem) = Outbox::open(dir.path(), 1 << 20).unwrap();
        assert!(problem.unwrap().contains("damaged"));
        let held = o.read_after(0, 10, u64::MAX).unwrap();
        assert_eq!(
            held[0].id, a.id,
            "a stored message keeps the id it was sent with"
        );
        let b = o.append(&mut packer_with(1)).unwrap().0;
        assert_ne!(b.id.split('-').next(), a.id.split('-').next());
    }
}
