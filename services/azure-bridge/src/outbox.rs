//! The outbox: packed messages the hub has not acknowledged, on disk.
//!
//! A runtime [`Journal`] (checksummed records, segment files, damage skipped and moved aside,
//! locked against a second process) whose records are whole hub messages. A message is
//! appended and fsynced before its readings are acknowledged to their producers, and trimmed
//! once the hub has acknowledged it and every message before it: so everything between a
//! producer's journal and the hub is always in one of the two, across restarts, `kill -9` and
//! power cuts.
//!
//! A record's topic field carries the message's metadata, `wb1 <readings> <oldest_ms>
//! <newest_ms>`, so the TTL and the counts need no parsing of the body; its payload is the
//! body, sent byte for byte every time (so a repeat carries the same id). Message ids are
//! `<prefix>-<seq>`: the prefix is random per outbox (the `id` file), the seq the journal's,
//! which never repeats; a lost `id` file gives new messages a new prefix, never an old id.

use std::path::{Path, PathBuf};

use runtime::config::{JournalKind, StreamConfig};
use runtime::journal::{Dropped, Journal, JournalError, OpenReport};

use crate::pack::{Packed, Packer, message_id};
use crate::seen::Seen;

/// Segment files of the outbox: 1 MiB, so an acknowledged stretch is freed soon.
const SEGMENT_BYTES: u64 = 1024 * 1024;

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
    /// Where its readings came from (see `seen`).
    pub origins: Seen,
}

impl Meta {
    fn encode(&self) -> String {
        format!(
            "wb1 {} {} {} {}",
            self.readings,
            self.oldest_ms,
            self.newest_ms,
            self.origins.encode()
        )
    }

    fn decode(s: &str) -> Option<Self> {
        let mut p = s.splitn(5, ' ');
        if p.next()? != "wb1" {
            return None;
        }
        Some(Self {
            readings: p.next()?.parse().ok()?,
            oldest_ms: p.next()?.parse().ok()?,
            newest_ms: p.next()?.parse().ok()?,
            origins: Seen::decode(p.next().unwrap_or(""))?,
        })
    }
}

#[derive(Debug)]
pub struct Outbox {
    journal: Journal,
    prefix: String,
    dir: PathBuf,
}

/// A record whose metadata could not be read (written by a newer version): sent as it is.
fn unknown() -> Meta {
    Meta {
        readings: 0,
        oldest_ms: i64::MAX,
        newest_ms: i64::MAX,
        origins: Seen::default(),
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
            segment_bytes: SEGMENT_BYTES,
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
        Ok((
            Self {
                journal,
                prefix,
                dir: dir.to_path_buf(),
            },
            report,
            problem,
        ))
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
            origins,
        };
        let dropped = self.journal.append_at(seq, &meta.encode(), &body)?;
        self.journal.sync_newest()?;
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

    /// Up to `limit` messages after `after`, in order, at most about `max_bytes` of them.
    pub fn read_after(
        &self,
        after: u64,
        limit: usize,
        max_bytes: u64,
    ) -> Result<Vec<Stored>, JournalError> {
        Ok(self
            .journal
            .read_after_within(after, limit, max_bytes, |_| false)?
            .into_iter()
            .map(|r| Stored {
                seq: r.seq,
                id: body_id(&r.payload).unwrap_or_else(|| message_id(&self.prefix, r.seq)),
                meta: Meta::decode(&r.topic).unwrap_or_else(unknown),
                body: r.payload,
            })
            .collect())
    }

    /// Every message `<= seq` is acknowledged by the hub (or expired).
    pub fn trim_through(&mut self, seq: u64) -> Result<(), JournalError> {
        self.journal.trim_through(seq).map(|_| ())
    }

    /// Save the acknowledged point (at a clean stop).
    pub fn save_acked(&self) -> Result<(), JournalError> {
        self.journal.save_acked()
    }

    /// The origins of every message held, for the dedup of replayed readings at start.
    pub fn origins(&self) -> Result<Seen, JournalError> {
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
                if let Some(m) = Meta::decode(&r.topic) {
                    seen.extend(&m.origins);
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
                origin: None,
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
            o.save_acked().unwrap();
            (a, b)
        };
        let (o, _, _) = Outbox::open(dir.path(), 1 << 20).unwrap();
        let held = o.read_after(0, 10, u64::MAX).unwrap();
        assert_eq!(held, vec![second.clone()]);
        assert_eq!(held[0].meta.readings, 5);
        assert!(first.id.ends_with(&format!("-{}", first.seq)));
        assert_eq!(first.id.split('-').next(), second.id.split('-').next());
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
