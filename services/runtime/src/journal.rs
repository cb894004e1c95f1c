//! The producer journal: where a message waits until every sink it matters to has stored it.
//!
//! # Invariants
//!
//! 1. **Written before published.** A record is appended (handed to the kernel with `write`)
//!    before it is published, so a killed process loses nothing it published. `fsync` follows
//!    for what every sink group has not stored within `fsync_interval_ms` (0 = at once; the
//!    producer decides, see `delivery`), which bounds what a power cut can take. A failed
//!    append (disk full) is cut off again at once: a later record is never hidden behind half a
//!    record.
//! 2. **Sequence numbers only grow, across restarts.** Numbers are reserved in blocks in a
//!    small `seq` file (checksummed, fsynced, replaced atomically) before they are used; a
//!    reopened journal continues above the reservation. A torn tail or a lost unsynced write
//!    can leave a gap, never a reuse — a reused number could be taken for one a sink already
//!    acknowledged. A `seq` file that is missing, damaged or behind the segments is not
//!    trusted (see *Recovering the sequence* below).
//! 3. **Seqs ascend within a segment.** Each run of the process starts a new segment, and
//!    within a run numbers go up by one, so a segment's seqs are one range (several only after
//!    damage). The journal's contents are described exactly by the list of segment ranges
//!    ([`Journal::ranges`]).
//! 4. **Every record is checked, and found again after damage.** Each record starts with a
//!    marker and carries a CRC over everything the marker introduces (see *Format*). On open,
//!    bytes that do not form a valid record are skipped up to the next valid record: every
//!    intact record before and after damage is kept.
//! 5. **Damage is moved aside, never silently dropped.** Damaged bytes are copied to
//!    `<dir>/corrupted/<segment>.<offset>.bin` (a segment with nothing intact left is moved
//!    there whole) before the segment is rewritten without them, and reported (the caller logs
//!    an ERROR naming the file and counts it). A *torn tail* — the last record cut short by a
//!    crash or power cut, which is normal — is only cut off and reported (WARN).
//! 6. **Bounded.** When the journal exceeds `max_bytes`, whole oldest segments are deleted and
//!    the dropped records reported (the caller logs an ERROR and counts them). Acknowledged
//!    segments are deleted the same way — a delete, never a rewrite, to spare SD cards.
//! 7. **The newest segment is never deleted by a trim**, only trimmed logically (by the
//!    acknowledged point), nor on open when a crash tore off its only records (it is kept as a
//!    header: its name is the memory). So the files always remember the highest seq
//!    journaled, and an `acked` point can be checked against it.
//! 8. **The acknowledged point is a hint, checked.** The `acked` file (written on a clean
//!    shutdown) only spares a replay. A value that fails its checksum, has the wrong size, or
//!    lies beyond the journal's last record is not trusted: it is reported and nothing is
//!    trimmed. Trusting it could delete unacknowledged readings; ignoring it costs a replay.
//! 9. **Private.** Files are created 0600 and directories 0700: they hold a household's
//!    readings.
//!
//! # Format
//!
//! A segment file `<first_seq:020>.seg` starts with a 16-byte header, `b"WBJOURNL" | version
//! u32 LE | crc32(magic, version) u32 LE`, then records:
//!
//! ```text
//! marker [FF FE 57 52] | head_crc u32 LE | len u32 LE | body_crc u32 LE | body (len bytes)
//! body: seq u64 LE | topic_len u16 LE | topic | payload
//! head_crc = crc32(len | body_crc)          body_crc = crc32(body)
//! ```
//!
//! Why a marker per record rather than fixed blocks (LevelDB's log): after damage a block
//! format resyncs only at the next block boundary, losing every intact record up to it (one
//! flipped byte would cost a 32 KiB block of readings), and records longer than a block need
//! fragmenting. With a marker per record the scanner tries each following offset where the
//! marker appears and accepts the first one that checks out, so only the damaged record is
//! lost. The marker cannot fool it: `FF` and `FE` never occur in UTF-8, so a topic or a JSON
//! payload never contains it; where it does appear by chance (inside a binary seq, length or
//! CRC), the candidate must still pass both CRCs and carry a seq above the last intact
//! record's. The head CRC covers what the marker introduces — the length, and the body's CRC —
//! so a false or damaged length is caught before it is believed: it neither makes garbage look
//! like a record nor makes a damaged record look like a torn tail (a torn tail is a record
//! whose head checks out and whose body is cut short by the end of the file). The segment
//! header's version lets a reader refuse, with a clear error, a segment written in a format it
//! does not know, instead of taking it for damage and moving a newer version's readings aside.
//!
//! `seq` and `acked` are `value u64 LE | crc32(value) u32 LE`.
//!
//! # Recovering the sequence
//!
//! The `seq` file is replaced atomically and fsynced, so only outside damage (a failing card,
//! a person) leaves it unreadable. Then the journal cannot know the highest number handed out,
//! only bound it: every segment file (kept, or moved to `corrupted/`) holds fewer records than
//! it has bytes, and the `acked` point was once journaled. The safe choice is to continue far
//! above every bound — `2^32` above the highest, and above the wall clock in microseconds when
//! the clock is set — because a gap costs nothing and a reuse can cost a reading. A `seq` file
//! that is missing where a journal existed before (its `lock` file, segments or `acked` are
//! there) is treated the same way. Invariant 7 is what makes this work after every segment
//! was acknowledged: the newest segment's name and records remain. For a memory journal (no
//! segments) only the clock is left: with its `seq` file destroyed and the clock unset,
//! numbers may repeat — acceptable there, because its records die with the process anyway.
//!
//! The memory journal keeps the same contract except durability: it is a bounded ring, for
//! streams where losing a few seconds on a restart is acceptable (raw sample frames). It still
//! uses the `seq` file, written once per 65 536 records, so numbers never repeat.

use std::collections::VecDeque;
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::config::{JournalKind, StreamConfig};
use proto::Segment;

/// Numbers reserved per write of the `seq` file.
const SEQ_BLOCK: u64 = 65_536;
/// How far above every bound a journal whose `seq` file is lost continues (see the module doc).
const SEQ_RECOVERY_JUMP: u64 = 1 << 32;
/// A sequence number or acknowledged point above this is damage: at a million records a second
/// it would take 146 000 years to get there, and it leaves room to add without overflow.
const SEQ_LIMIT: u64 = 1 << 62;
/// The segment format this code writes and reads (1 was the unversioned format before it).
pub const FORMAT_VERSION: u32 = 2;
const SEGMENT_MAGIC: [u8; 8] = *b"WBJOURNL";
const SEGMENT_HEADER: usize = 16;
/// Starts every record; `FF FE` never occur in UTF-8 (see the module doc).
const RECORD_MAGIC: [u8; 4] = [0xFF, 0xFE, b'W', b'R'];
/// Marker, head CRC, length, body CRC.
const RECORD_HEADER: usize = 16;
/// Seq and topic length, at the start of every body.
const BODY_FIXED: usize = 10;
/// A record larger than this is taken for corruption (the bus refuses far smaller packets).
const MAX_RECORD: usize = 64 << 20;
/// `value u64 | crc32 u32`.
const STATE_LEN: usize = 12;
/// Where damaged bytes go, inside the journal directory.
pub const CORRUPTED_DIR: &str = "corrupted";
/// Files that hold readings are the owner's alone, and so are their directories.
const FILE_MODE: u32 = 0o600;
const DIR_MODE: u32 = 0o700;
/// Before this (2020-09-13) the clock is not set (a Pi without RTC boots in 1970).
const PLAUSIBLE_CLOCK_US: u64 = 1_600_000_000_000_000;

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("journal {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "journal {0} is in use by another process: are two instances running with the same \
         name (the MQTT client id)? Give each its own `instance`"
    )]
    Locked(PathBuf),
    #[error("topic of {0} bytes is too long for the journal")]
    TopicTooLong(usize),
    #[error(
        "journal segment {path} is in format version {version}, and this wattbus reads version \
         {FORMAT_VERSION} only: it was written by another wattbus version. Run that version \
         until its journal is drained, or move the file out of the journal directory"
    )]
    UnknownFormat { path: PathBuf, version: u32 },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> JournalError + '_ {
    move |source| JournalError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// One journaled message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub seq: u64,
    pub topic: String,
    pub payload: Vec<u8>,
}

impl Record {
    /// Bytes the record takes in a segment file.
    pub fn size(&self) -> u64 {
        record_size(self.topic.len(), self.payload.len())
    }
}

fn record_size(topic: usize, payload: usize) -> u64 {
    (RECORD_HEADER + BODY_FIXED + topic + payload) as u64
}

/// Records that left the journal unacknowledged because it was full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dropped {
    pub records: u64,
    pub first_seq: u64,
    pub last_seq: u64,
}

/// What opening a disk journal found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OpenReport {
    /// Records held (acknowledged or not) after recovery.
    pub records: u64,
    pub segments: usize,
    /// Segments whose torn tail (the last record cut short by a crash) was cut off.
    pub torn_segments: usize,
    /// Bytes cut off torn tails.
    pub torn_bytes: u64,
    /// Damaged byte ranges, skipped and moved aside.
    pub damaged: Vec<Damage>,
    /// State files (`seq`, `acked`) that were not trusted.
    pub untrusted: Vec<Untrusted>,
}

/// Bytes of a segment that did not form valid records, other than a torn tail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Damage {
    pub segment: PathBuf,
    /// Where the damaged bytes started in the segment, and how many there were.
    pub offset: u64,
    pub bytes: u64,
    /// The segment held nothing intact and was moved aside whole.
    pub whole_segment: bool,
    /// The seqs missing between the intact records around the damage, when records on both
    /// sides survived (seqs are consecutive within a segment, so these are exactly the records
    /// lost).
    pub lost_seqs: Option<[u64; 2]>,
    /// Where a person finds the bytes; `None` if they could not be saved (then `error` says
    /// why, and they stay in the segment, skipped on every read).
    pub saved_to: Option<PathBuf>,
    pub error: Option<String>,
}

/// A state file the journal did not trust, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Untrusted {
    /// `seq` or `acked`.
    pub file: &'static str,
    pub path: PathBuf,
    pub reason: String,
    /// What the journal did instead.
    pub action: String,
}

/// A `seq` or `acked` file as read.
#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    Missing,
    Valid(u64),
    Corrupt(String),
}

fn encode_state(value: u64) -> [u8; STATE_LEN] {
    let mut out = [0; STATE_LEN];
    out[..8].copy_from_slice(&value.to_le_bytes());
    out[8..].copy_from_slice(&crc32fast::hash(&value.to_le_bytes()).to_le_bytes());
    out
}

fn read_state(path: &Path) -> Result<State, JournalError> {
    let bytes = match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(State::Missing),
        Err(e) => return Err(io_err(path)(e)),
    };
    let Ok(exact) = <[u8; STATE_LEN]>::try_from(bytes.as_slice()) else {
        return Ok(State::Corrupt(format!(
            "{} bytes where {STATE_LEN} were written",
            bytes.len()
        )));
    };
    let mut value = [0; 8];
    value.copy_from_slice(&exact[..8]);
    let mut crc = [0; 4];
    crc.copy_from_slice(&exact[8..]);
    if crc32fast::hash(&value) != u32::from_le_bytes(crc) {
        return Ok(State::Corrupt("its checksum does not match".into()));
    }
    let value = u64::from_le_bytes(value);
    if value > SEQ_LIMIT {
        return Ok(State::Corrupt(format!("{value} is not a plausible seq")));
    }
    Ok(State::Valid(value))
}

/// `<path>.tmp`: where a replacement is written before it is renamed over `path`. Leftovers
/// (a crash mid-replace; the old file is intact) are removed on open.
fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    path.with_file_name(name)
}

fn private_file() -> OpenOptions {
    let mut o = OpenOptions::new();
    o.mode(FILE_MODE);
    o
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Create `dir` (and its missing parents) 0700; an existing one is narrowed to 0700 too, since
/// what goes in it is private.
fn private_dir(dir: &Path) -> io::Result<()> {
    DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(dir)?;
    narrow(dir, DIR_MODE)
}

/// Take away group and other permissions, leaving the owner's (files from before 0600).
fn narrow(path: &Path, mode: u32) -> io::Result<()> {
    let perms = fs::metadata(path)?.permissions();
    if perms.mode() & 0o077 != 0 {
        fs::set_permissions(path, fs::Permissions::from_mode(mode))?;
    }
    Ok(())
}

/// Create or truncate `path` (0600), write `bytes` and fsync the file (not its directory).
fn write_synced(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut f = private_file()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

/// Replace `path` by `bytes`, atomically and durably: a crash leaves the old content or the new,
/// never a mix. A failed write (disk full) leaves no temporary file taking space.
pub(crate) fn replace_file(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let tmp = tmp_path(path);
    if let Err(e) = write_synced(&tmp, bytes).and_then(|()| fs::rename(&tmp, path)) {
        // The error that matters is the write's; the cleanup is a courtesy.
        let _best_effort = fs::remove_file(&tmp);
        return Err(e);
    }
    match path.parent() {
        Some(dir) => sync_dir(dir),
        None => Ok(()),
    }
}

/// Hands out sequence numbers that never repeat, reserving them in blocks in `<dir>/seq`.
///
/// A reservation that fails (disk full) fails the [`SeqAllocator::take`] that needed it, and
/// the next take tries again: a journal opened on a full disk still opens, and its producer
/// keeps trying instead of the service failing at start-up.
#[derive(Debug)]
struct SeqAllocator {
    path: PathBuf,
    next: u64,
    /// Every number `<= reserved` may have been handed out by some run.
    reserved: u64,
}

impl SeqAllocator {
    fn reserve(&mut self) -> Result<(), JournalError> {
        if self.next <= self.reserved {
            return Ok(());
        }
        let ceiling = self.next + SEQ_BLOCK;
        replace_file(&self.path, &encode_state(ceiling)).map_err(io_err(&self.path))?;
        self.reserved = ceiling;
        Ok(())
    }

    fn take(&mut self) -> Result<u64, JournalError> {
        self.reserve()?;
        let seq = self.next;
        self.next += 1;
        Ok(seq)
    }
}

#[derive(Debug)]
struct SegmentFile {
    path: PathBuf,
    /// Records in this file have seqs above this: the seq in its name minus one, or the last
    /// seq of the segment before it (a record at or below that is damage). Reads scan with it
    /// too, so they find exactly the records open found.
    floor: u64,
    /// Contiguous runs of seqs in this segment (one, except after damage).
    ranges: Vec<[u64; 2]>,
    /// Bytes of the file, header included.
    bytes: u64,
    records: u64,
}

impl SegmentFile {
    fn first(&self) -> u64 {
        self.ranges.first().map_or(0, |r| r[0])
    }
    fn last(&self) -> u64 {
        self.ranges.last().map_or(0, |r| r[1])
    }
    fn holds(&self, seq: u64) -> bool {
        self.ranges.iter().any(|r| (r[0]..=r[1]).contains(&seq))
    }
    fn push(&mut self, seq: u64, size: u64) {
        match self.ranges.last_mut() {
            Some(r) if r[1] + 1 == seq => r[1] = seq,
            _ => self.ranges.push([seq, seq]),
        }
        self.bytes += size;
        self.records += 1;
    }
}

#[derive(Debug)]
struct DiskJournal {
    dir: PathBuf,
    segment_bytes: u64,
    /// Closed segments first, the active one (if any) last.
    segments: VecDeque<SegmentFile>,
    /// Open for appending; `None` until the first append of this run or after a roll.
    active: Option<File>,
    /// A newest segment file left with no record (its only records torn off by a crash),
    /// kept as just a header, and its size: its name is the journal's memory of the highest
    /// seq ever journaled (invariant 7) until a newer segment exists, when it is deleted.
    stub: Option<(PathBuf, u64)>,
    /// Bytes of the segment files, the stub included.
    total_bytes: u64,
}

#[derive(Debug)]
struct MemoryJournal {
    records: VecDeque<Record>,
    total_bytes: u64,
}

#[derive(Debug)]
enum Store {
    Disk(DiskJournal),
    Memory(MemoryJournal),
}

/// A journal of one producer stream, on disk or in memory.
#[derive(Debug)]
pub struct Journal {
    store: Store,
    seq: SeqAllocator,
    max_bytes: u64,
    /// Every record `<=` this is acknowledged. Closed segments below it are deleted; the
    /// newest segment is only trimmed logically (deleting and re-creating the file each time
    /// everything is acknowledged would churn the SD card's metadata once a second, and it is
    /// the journal's memory of the highest seq; invariant 7).
    acked_through: u64,
    /// Where `acked_through` is saved on a clean shutdown, so a restart does not replay the
    /// acknowledged part of the last segment. A lost or stale file only costs a replay.
    acked_path: PathBuf,
    /// Held while the journal is open: two processes appending to one journal would reuse
    /// sequence numbers and interleave records.
    _lock: File,
    /// This journal's random id (`epoch` file), made when it is created: see
    /// `proto::Origin::epoch`.
    epoch: Segment,
}

/// Take the journal directory's lock, or say who is in the way.
fn lock_dir(dir: &Path) -> Result<File, JournalError> {
    let path = dir.join("lock");
    let file = private_file()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(io_err(&path))?;
    narrow(&path, FILE_MODE).map_err(io_err(&path))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(JournalError::Locked(dir.to_path_buf())),
        Err(std::fs::TryLockError::Error(e)) => Err(io_err(&path)(e)),
    }
}

/// Remove `*.tmp` leftovers of a replacement a crash interrupted (the replaced file is intact).
fn remove_leftovers(dir: &Path) -> Result<(), JournalError> {
    for entry in fs::read_dir(dir).map_err(io_err(dir))? {
        let path = entry.map_err(io_err(dir))?.path();
        if path.extension().is_some_and(|e| e == "tmp") {
            fs::remove_file(&path).map_err(io_err(&path))?;
        }
    }
    Ok(())
}

/// The wall clock in µs (proto's clock, at its ms resolution).
fn now_us() -> u64 {
    u64::try_from(proto::now_ms())
        .unwrap_or(0)
        .saturating_mul(1000)
}

/// The journal's epoch: read from `dir/epoch`, or made (random, 16 hex digits) and written
/// when there is none or it is unreadable. A new epoch only makes a sink that remembers origins
/// (azure-bridge) take replays of old records for new readings: a repeat, never a loss.
fn read_epoch(dir: &Path) -> Result<Segment, JournalError> {
    let path = dir.join("epoch");
    if let Ok(text) = fs::read_to_string(&path)
        && text.len() == 16
        && text.bytes().all(|b| b.is_ascii_hexdigit())
        && let Ok(e) = Segment::new(text)
    {
        return Ok(e);
    }
    let mut rng = fastrand::Rng::new();
    let text = format!("{:016x}", rng.u64(..) ^ now_us().rotate_left(17));
    replace_file(&path, text.as_bytes()).map_err(io_err(&path))?;
    Segment::new(text).map_err(|e| JournalError::Io {
        path,
        source: io::Error::other(e.to_string()),
    })
}

impl Journal {
    /// This journal's epoch (see `proto::Origin::epoch`).
    pub fn epoch(&self) -> &Segment {
        &self.epoch
    }

    /// Open (or create) the journal in `dir`.
    pub fn open(dir: &Path, cfg: &StreamConfig) -> Result<(Self, OpenReport), JournalError> {
        private_dir(dir).map_err(io_err(dir))?;
        let lock_path = dir.join("lock");
        // A lock file is left by every run: with it there, a missing `seq` file is lost, not new.
        let opened_before = lock_path.exists();
        let lock = lock_dir(dir)?;
        remove_leftovers(dir)?;
        let acked_path = dir.join("acked");
        let seq_path = dir.join("seq");
        let (store, mut report, bound) = match cfg.journal {
            JournalKind::Disk => {
                let (disk, report, bound) = DiskJournal::open(dir, cfg.segment_bytes)?;
                (Store::Disk(disk), report, bound)
            }
            JournalKind::Memory => {
                // Segments left by an earlier disk configuration of this stream are not ours to
                // replay any more; they stay on disk for a person to look at.
                let memory = MemoryJournal {
                    records: VecDeque::new(),
                    total_bytes: 0,
                };
                (Store::Memory(memory), OpenReport::default(), 0)
            }
        };
        let last = match &store {
            Store::Disk(d) => d.segments.back().map_or(0, SegmentFile::last),
            Store::Memory(_) => 0,
        };
        // A memory journal has nothing to trim at start; its `acked` file means nothing.
        let acked = match &store {
            Store::Disk(_) => read_state(&acked_path)?,
            Store::Memory(_) => State::Missing,
        };
        let mut trim_to = 0;
        let acked_untrusted = report.untrusted.len();
        match &acked {
            State::Valid(v) if *v <= last => trim_to = *v,
            State::Valid(v) => report.untrusted.push(Untrusted {
                file: "acked",
                path: acked_path.clone(),
                reason: format!(
                    "it says every record through seq {v} is acknowledged, beyond the journal's \
                     last record ({last})"
                ),
                action: "ignored it: nothing is trimmed, unacknowledged records are replayed"
                    .into(),
            }),
            State::Corrupt(why) => report.untrusted.push(Untrusted {
                file: "acked",
                path: acked_path.clone(),
                reason: why.clone(),
                action: "ignored it: nothing is trimmed, unacknowledged records are replayed"
                    .into(),
            }),
            State::Missing => {}
        }
        if report.untrusted.len() > acked_untrusted {
            // Reported once; the next clean shutdown writes a valid one.
            fs::remove_file(&acked_path).map_err(io_err(&acked_path))?;
        }
        let used_before = opened_before || bound > 0 || acked != State::Missing;
        let seq_state = read_state(&seq_path)?;
        let distrust = match seq_state.clone() {
            State::Valid(v) if v >= last => None,
            State::Valid(v) => Some(format!(
                "it reserves up to seq {v}, below the journal's last record ({last})"
            )),
            State::Missing if !used_before => None,
            State::Missing => Some("it is missing".into()),
            State::Corrupt(why) => Some(why),
        };
        let next = match (distrust, seq_state) {
            (None, State::Valid(v)) => v + 1,
            (None, _) => 1,
            (Some(why), _) => {
                untrusted_seq(&mut report, &seq_path, why);
                recovered_seq(dir, bound, last, &acked)
            }
        };
        let mut seq = SeqAllocator {
            path: seq_path,
            next: next.max(last + 1),
            reserved: 0,
        };
        // Reserve now, so a `seq` file found damaged is replaced (and reported) once. On a full
        // disk this fails, and the first `take` tries again: the journal still opens.
        let _retried_by_take = seq.reserve();
        let mut journal = Self {
            store,
            seq,
            max_bytes: cfg.max_bytes,
            acked_through: 0,
            acked_path,
            _lock: lock,
            epoch: read_epoch(dir)?,
        };
        journal.trim_through(trim_to)?;
        Ok((journal, report))
    }

    /// Append a record; returns its seq and what had to be dropped to stay within bounds.
    pub fn append(
        &mut self,
        topic: &str,
        payload: &[u8],
    ) -> Result<(u64, Option<Dropped>), JournalError> {
        let seq = self.next_seq()?;
        let dropped = self.append_at(seq, topic, payload)?;
        Ok((seq, dropped))
    }

    /// Take the next sequence number, for a payload that must carry its own seq before it is
    /// encoded. A number taken and never appended is a harmless gap.
    pub fn next_seq(&mut self) -> Result<u64, JournalError> {
        self.seq.take()
    }

    /// Append a record under a seq from [`Journal::next_seq`] (seqs must be appended in the
    /// order they were taken).
    pub fn append_at(
        &mut self,
        seq: u64,
        topic: &str,
        payload: &[u8],
    ) -> Result<Option<Dropped>, JournalError> {
        if topic.len() > usize::from(u16::MAX) {
            return Err(JournalError::TopicTooLong(topic.len()));
        }
        match &mut self.store {
            Store::Disk(d) => d.append(seq, topic, payload)?,
            Store::Memory(m) => {
                let r = Record {
                    seq,
                    topic: topic.to_string(),
                    payload: payload.to_vec(),
                };
                m.total_bytes += r.size();
                m.records.push_back(r);
            }
        }
        self.enforce_bound()
    }

    fn enforce_bound(&mut self) -> Result<Option<Dropped>, JournalError> {
        let acked = self.acked_through;
        let mut dropped: Option<Dropped> = None;
        let mut note = |records: u64, first: u64, last: u64| {
            let d = dropped.get_or_insert(Dropped {
                records: 0,
                first_seq: first,
                last_seq: last,
            });
            d.records += records;
            d.last_seq = last;
        };
        match &mut self.store {
            Store::Disk(d) => {
                while d.total_bytes > self.max_bytes && d.segments.len() > 1 {
                    if let Some(s) = d.remove_oldest()? {
                        // Only what was not acknowledged yet is a loss.
                        let lost: u64 = s
                            .ranges
                            .iter()
                            .filter(|r| r[1] > acked)
                            .map(|r| r[1] - r[0].max(acked + 1) + 1)
                            .sum();
                        if lost > 0 {
                            note(lost, s.first().max(acked + 1), s.last());
                        }
                    }
                }
            }
            Store::Memory(m) => {
                while m.total_bytes > self.max_bytes && m.records.len() > 1 {
                    if let Some(r) = m.records.pop_front() {
                        m.total_bytes -= r.size();
                        if r.seq > acked {
                            note(1, r.seq, r.seq);
                        }
                    }
                }
            }
        }
        Ok(dropped)
    }

    /// Forget every record with `seq <= through` (they are acknowledged). Disk journals
    /// delete closed segments that hold nothing newer; the newest segment stays (invariant 7)
    /// until a newer one exists. Returns how many segment files were deleted.
    pub fn trim_through(&mut self, through: u64) -> Result<u64, JournalError> {
        self.acked_through = self.acked_through.max(through);
        let acked = self.acked_through;
        let mut removed = 0;
        match &mut self.store {
            Store::Disk(d) => {
                while d.segments.len() > 1 && d.segments.front().is_some_and(|s| s.last() <= acked)
                {
                    d.remove_oldest()?;
                    removed += 1;
                }
            }
            Store::Memory(m) => {
                while m.records.front().is_some_and(|r| r.seq <= acked) {
                    if let Some(r) = m.records.pop_front() {
                        m.total_bytes -= r.size();
                    }
                }
            }
        }
        Ok(removed)
    }

    /// Save the acknowledged point (on a clean shutdown). A memory journal has nothing to save:
    /// it starts empty.
    pub fn save_acked(&self) -> Result<(), JournalError> {
        if matches!(self.store, Store::Memory(_)) {
            return Ok(());
        }
        replace_file(&self.acked_path, &encode_state(self.acked_through))
            .map_err(io_err(&self.acked_path))
    }

    /// The seqs held, as ascending inclusive ranges.
    pub fn ranges(&self) -> Vec<[u64; 2]> {
        let acked = self.acked_through;
        self.physical_ranges()
            .into_iter()
            .filter(|r| r[1] > acked)
            .map(|[first, last]| [first.max(acked + 1), last])
            .collect()
    }

    /// Seq ranges present in the store, acknowledged or not.
    fn physical_ranges(&self) -> Vec<[u64; 2]> {
        match &self.store {
            Store::Disk(d) => d
                .segments
                .iter()
                .flat_map(|s| s.ranges.iter().copied())
                .collect(),
            Store::Memory(m) => {
                let mut out: Vec<[u64; 2]> = Vec::new();
                for r in &m.records {
                    match out.last_mut() {
                        Some(last) if last[1] + 1 == r.seq => last[1] = r.seq,
                        _ => out.push([r.seq, r.seq]),
                    }
                }
                out
            }
        }
    }

    pub fn last_seq(&self) -> Option<u64> {
        match &self.store {
            Store::Disk(d) => d.segments.back().map(SegmentFile::last),
            Store::Memory(m) => m.records.back().map(|r| r.seq),
        }
    }

    /// Bytes held: for a disk journal, the size of its segment files (what it takes on disk,
    /// acknowledged records in the newest segment included).
    pub fn bytes(&self) -> u64 {
        match &self.store {
            Store::Disk(d) => d.total_bytes,
            Store::Memory(m) => m.total_bytes,
        }
    }

    /// When the segment file holding the oldest record held was last written: that record is
    /// at least this old. `None` for a memory journal, an empty one, or a file whose time
    /// cannot be read.
    pub fn oldest_held_written(&self) -> Option<std::time::SystemTime> {
        let first = self.first_held()?;
        match &self.store {
            Store::Disk(d) => d
                .segments
                .iter()
                .find(|s| s.holds(first))
                .and_then(|s| fs::metadata(&s.path).and_then(|m| m.modified()).ok()),
            Store::Memory(_) => None,
        }
    }

    /// The oldest seq held (not yet acknowledged), if any. Cheap (no allocation).
    pub fn first_held(&self) -> Option<u64> {
        let acked = self.acked_through;
        match &self.store {
            Store::Disk(d) => d
                .segments
                .iter()
                .flat_map(|s| s.ranges.iter())
                .find(|r| r[1] > acked)
                .map(|r| r[0].max(acked + 1)),
            Store::Memory(m) => m.records.iter().map(|r| r.seq).find(|&seq| seq > acked),
        }
    }

    /// Records not yet acknowledged. Cheap (no allocation): called after every append to keep
    /// the gauges true.
    pub fn records(&self) -> u64 {
        let acked = self.acked_through;
        match &self.store {
            Store::Disk(d) => d
                .segments
                .iter()
                .flat_map(|s| s.ranges.iter())
                .filter(|r| r[1] > acked)
                .map(|r| r[1] - r[0].max(acked + 1) + 1)
                .sum(),
            // Trimming pops every acknowledged record off the front, and seqs ascend.
            Store::Memory(m) => m.records.len() as u64,
        }
    }

    /// fsync the newest segment file found at open. A process killed before it fsynced its
    /// last records leaves them in the page cache only, and this run never appends to that
    /// file (a new segment starts at every open), so no later fsync would cover them.
    pub fn sync_newest(&self) -> Result<(), JournalError> {
        if let Store::Disk(d) = &self.store
            && let Some(seg) = d.segments.back()
        {
            File::open(&seg.path)
                .and_then(|f| f.sync_data())
                .map_err(io_err(&seg.path))?;
        }
        Ok(())
    }

    /// Whether records live in memory only (nothing to fsync, nothing durable).
    pub fn is_memory(&self) -> bool {
        matches!(self.store, Store::Memory(_))
    }

    /// A handle to fsync the active segment outside the caller's lock (`None`: nothing to sync).
    pub fn sync_handle(&self) -> Result<Option<(PathBuf, File)>, JournalError> {
        match &self.store {
            Store::Disk(d) => {
                let (Some(active), Some(seg)) = (d.active.as_ref(), d.segments.back()) else {
                    return Ok(None);
                };
                // A handle we cannot get is a sync we cannot do: say so, never pretend.
                let file = active.try_clone().map_err(io_err(&seg.path))?;
                Ok(Some((seg.path.clone(), file)))
            }
            Store::Memory(_) => Ok(None),
        }
    }

    /// Up to `limit` records with `seq > after` for which `skip(seq)` is false, in seq order.
    pub fn read_after(
        &self,
        after: u64,
        limit: usize,
        skip: impl Fn(u64) -> bool,
    ) -> Result<Vec<Record>, JournalError> {
        self.read_after_within(after, limit, u64::MAX, skip)
    }

    /// As [`Journal::read_after`], stopping once the records read hold `max_bytes` (at least
    /// one record is returned if there is one): a consumer draining the journal can take a
    /// whole segment per read without holding the whole journal in memory.
    pub fn read_after_within(
        &self,
        after: u64,
        limit: usize,
        max_bytes: u64,
        skip: impl Fn(u64) -> bool,
    ) -> Result<Vec<Record>, JournalError> {
        let after = after.max(self.acked_through);
        let mut out = Vec::new();
        let mut bytes = 0u64;
        match &self.store {
            Store::Memory(m) => {
                for r in m
                    .records
                    .iter()
                    .filter(|r| r.seq > after && !skip(r.seq))
                    .take(limit)
                {
                    if !out.is_empty() && bytes >= max_bytes {
                        break;
                    }
                    bytes += r.size();
                    out.push(r.clone());
                }
            }
            Store::Disk(d) => {
                for s in d.segments.iter().filter(|s| s.last() > after) {
                    if s.ranges.iter().all(|r| (r[0]..=r[1]).all(&skip)) {
                        continue;
                    }
                    let data = fs::read(&s.path).map_err(io_err(&s.path))?;
                    let scan =
                        scan(&data, s.floor).map_err(|version| JournalError::UnknownFormat {
                            path: s.path.clone(),
                            version,
                        })?;
                    // The same scan as on open: damage left in place (it could not be moved
                    // aside) is skipped the same way, and only what open counted is returned.
                    for r in scan
                        .records
                        .into_iter()
                        .map(|f| f.record)
                        .filter(|r| r.seq > after && s.holds(r.seq) && !skip(r.seq))
                    {
                        bytes += r.size();
                        out.push(r);
                        if out.len() >= limit || bytes >= max_bytes {
                            return Ok(out);
                        }
                    }
                }
            }
        }
        Ok(out)
    }
}

/// Where a journal whose `seq` file is not trusted continues: see "Recovering the sequence"
/// in the module doc.
fn recovered_seq(dir: &Path, bound: u64, last: u64, acked: &State) -> u64 {
    let acked = match acked {
        State::Valid(v) => *v,
        _ => 0,
    };
    let clock = Some(now_us())
        .filter(|t| *t >= PLAUSIBLE_CLOCK_US)
        .unwrap_or(0);
    let floor = bound
        .max(last)
        .max(acked)
        .max(corrupted_bound(dir))
        .max(clock);
    floor.min(SEQ_LIMIT) + SEQ_RECOVERY_JUMP
}

fn untrusted_seq(report: &mut OpenReport, path: &Path, reason: String) {
    report.untrusted.push(Untrusted {
        file: "seq",
        path: path.to_path_buf(),
        reason,
        action: format!(
            "continued {SEQ_RECOVERY_JUMP} above the highest seq the journal's files can have \
             used, so no number repeats"
        ),
    });
}

/// The highest seq any file in `corrupted/` can have held: `<first>.seg.<offset>.bin` holds
/// fewer records than bytes, none older than `first`.
fn corrupted_bound(dir: &Path) -> u64 {
    let Ok(entries) = fs::read_dir(dir.join(CORRUPTED_DIR)) else {
        return 0;
    };
    entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name();
            let mut parts = name.to_str()?.split('.');
            let first: u64 = parts.next()?.parse().ok()?;
            let _seg = parts.next().filter(|p| *p == "seg")?;
            let offset: u64 = parts.next()?.parse().ok()?;
            let len = e.metadata().ok()?.len();
            Some(first.saturating_add(offset).saturating_add(len))
        })
        .max()
        .unwrap_or(0)
}

/// A record found by [`scan`], and where its bytes are.
#[derive(Debug)]
struct Found {
    record: Record,
    offset: usize,
    len: usize,
}

/// Bytes between intact records that are not a record.
#[derive(Debug, Clone, Copy)]
struct Damaged {
    start: usize,
    end: usize,
    /// Seqs of the intact records just before and just after, if any.
    before: Option<u64>,
    after: Option<u64>,
}

#[derive(Debug, Default)]
struct Scan {
    records: Vec<Found>,
    damaged: Vec<Damaged>,
    /// Where a torn tail starts: everything from there on is the last record, cut short.
    torn_from: Option<usize>,
}

fn segment_header() -> [u8; SEGMENT_HEADER] {
    let mut h = [0; SEGMENT_HEADER];
    h[..8].copy_from_slice(&SEGMENT_MAGIC);
    h[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    let crc = crc32fast::hash(&h[..12]);
    h[12..].copy_from_slice(&crc.to_le_bytes());
    h
}

/// Every intact record of a segment's bytes, with seqs above `floor` and ascending; damage in
/// between is skipped (resync on the next record marker that checks out) and reported.
/// `Err(version)`: an intact header of a format this code does not know.
fn scan(data: &[u8], floor: u64) -> Result<Scan, u32> {
    let mut out = Scan::default();
    let header = segment_header();
    // (start of the damage, whether it starts where a record was due)
    let mut damage: Option<(usize, bool)> = None;
    let mut pos = SEGMENT_HEADER;
    if data.len() < SEGMENT_HEADER {
        // Cut short while the segment was being created: a torn tail if it is what we write.
        if header.starts_with(data) {
            out.torn_from = (!data.is_empty()).then_some(0);
        } else {
            out.damaged.push(Damaged {
                start: 0,
                end: data.len(),
                before: None,
                after: None,
            });
        }
        return Ok(out);
    }
    if data[..SEGMENT_HEADER] != header {
        let crc = u32::from_le_bytes([data[12], data[13], data[14], data[15]]);
        let version = u32::from_le_bytes([data[8], data[9], data[10], data[11]]);
        if data[..8] == SEGMENT_MAGIC && crc32fast::hash(&data[..12]) == crc {
            return Err(version);
        }
        // A damaged header: look for records from the start.
        damage = Some((0, false));
        pos = 0;
    }
    let mut prev = floor;
    let mut before = None;
    while pos < data.len() {
        if let Some((record, len)) = parse_record(&data[pos..]).filter(|(r, _)| r.seq > prev) {
            if let Some((start, _)) = damage.take() {
                out.damaged.push(Damaged {
                    start,
                    end: pos,
                    before,
                    after: Some(record.seq),
                });
            }
            prev = record.seq;
            before = Some(record.seq);
            out.records.push(Found {
                record,
                offset: pos,
                len,
            });
            pos += len;
            continue;
        }
        if damage.is_none() {
            damage = Some((pos, true));
        }
        // Resync: the next place the marker appears, if any.
        pos = data[pos + 1..]
            .windows(RECORD_MAGIC.len())
            .position(|w| w == RECORD_MAGIC)
            .map_or(data.len(), |i| pos + 1 + i);
    }
    if let Some((start, at_boundary)) = damage {
        if at_boundary && is_torn(&data[start..]) {
            out.torn_from = Some(start);
        } else {
            out.damaged.push(Damaged {
                start,
                end: data.len(),
                before,
                after: None,
            });
        }
    }
    Ok(out)
}

/// Whether the bytes after the last intact record are what a write cut short leaves: a record
/// whose head checks out and whose body the end of the file cuts short, or less than a head
/// that starts like one, or zeros (some file systems extend a file before its data reaches the
/// disk).
fn is_torn(tail: &[u8]) -> bool {
    if tail.iter().all(|b| *b == 0) {
        return true;
    }
    if tail.len() < RECORD_HEADER {
        let n = tail.len().min(RECORD_MAGIC.len());
        return tail[..n] == RECORD_MAGIC[..n];
    }
    parse_head(tail).is_some_and(|(len, _)| tail.len() < RECORD_HEADER + len)
}

/// A record's head: its body length and body CRC, if the marker and the head CRC check out.
fn parse_head(data: &[u8]) -> Option<(usize, u32)> {
    if data.get(..4)? != RECORD_MAGIC {
        return None;
    }
    let head_crc = u32::from_le_bytes(data.get(4..8)?.try_into().ok()?);
    let head = data.get(8..RECORD_HEADER)?;
    if crc32fast::hash(head) != head_crc {
        return None;
    }
    let len = u32::from_le_bytes(head[..4].try_into().ok()?) as usize;
    let body_crc = u32::from_le_bytes(head[4..].try_into().ok()?);
    (BODY_FIXED..=MAX_RECORD)
        .contains(&len)
        .then_some((len, body_crc))
}

fn parse_record(data: &[u8]) -> Option<(Record, usize)> {
    let (len, body_crc) = parse_head(data)?;
    let body = data.get(RECORD_HEADER..RECORD_HEADER + len)?;
    if crc32fast::hash(body) != body_crc {
        return None;
    }
    let seq = u64::from_le_bytes(body[0..8].try_into().ok()?);
    let topic_len = u16::from_le_bytes(body[8..10].try_into().ok()?) as usize;
    let topic = std::str::from_utf8(body.get(BODY_FIXED..BODY_FIXED + topic_len)?)
        .ok()?
        .to_string();
    let payload = body[BODY_FIXED + topic_len..].to_vec();
    Some((
        Record {
            seq,
            topic,
            payload,
        },
        RECORD_HEADER + len,
    ))
}

fn encode_record(buf: &mut Vec<u8>, seq: u64, topic: &str, payload: &[u8]) {
    let len = BODY_FIXED + topic.len() + payload.len();
    let start = buf.len();
    buf.extend_from_slice(&RECORD_MAGIC);
    buf.extend_from_slice(&[0; 12]);
    buf.extend_from_slice(&seq.to_le_bytes());
    buf.extend_from_slice(&u16::try_from(topic.len()).unwrap_or(u16::MAX).to_le_bytes());
    buf.extend_from_slice(topic.as_bytes());
    buf.extend_from_slice(payload);
    let body_crc = crc32fast::hash(&buf[start + RECORD_HEADER..]);
    buf[start + 8..start + 12]
        .copy_from_slice(&u32::try_from(len).unwrap_or(u32::MAX).to_le_bytes());
    buf[start + 12..start + 16].copy_from_slice(&body_crc.to_le_bytes());
    let head_crc = crc32fast::hash(&buf[start + 8..start + RECORD_HEADER]);
    buf[start + 4..start + 8].copy_from_slice(&head_crc.to_le_bytes());
}

/// Copy `bytes` (damage found at `offset` of segment `name`) to `<dir>/corrupted/`.
fn save_aside(dir: &Path, name: &str, offset: usize, bytes: &[u8]) -> io::Result<PathBuf> {
    let aside = dir.join(CORRUPTED_DIR);
    private_dir(&aside)?;
    let dest = aside.join(format!("{name}.{offset}.bin"));
    // Same name on a second open after a crash mid-recovery: overwritten with the same bytes.
    write_synced(&dest, bytes)?;
    sync_dir(&aside)?;
    Ok(dest)
}

/// Move a whole segment to `<dir>/corrupted/<name>.0.bin` (a rename: it costs no space).
fn move_aside(dir: &Path, path: &Path, name: &str) -> io::Result<PathBuf> {
    let aside = dir.join(CORRUPTED_DIR);
    private_dir(&aside)?;
    let dest = aside.join(format!("{name}.0.bin"));
    fs::rename(path, &dest)?;
    sync_dir(&aside)?;
    sync_dir(dir)?;
    Ok(dest)
}

impl DiskJournal {
    /// Read every segment, recovering from damage. Also returns a bound on the seqs the
    /// segment files could have held (for a lost `seq` file).
    fn open(dir: &Path, segment_bytes: u64) -> Result<(Self, OpenReport, u64), JournalError> {
        let mut paths: Vec<(u64, PathBuf)> = Vec::new();
        for entry in fs::read_dir(dir).map_err(io_err(dir))? {
            let path = entry.map_err(io_err(dir))?.path();
            let Some(stem) = path
                .extension()
                .filter(|e| *e == "seg")
                .and(path.file_stem())
            else {
                continue;
            };
            if let Some(first) = stem.to_str().and_then(|s| s.parse::<u64>().ok()) {
                paths.push((first, path));
            }
        }
        paths.sort();
        let newest = paths.last().map(|(_, p)| p.clone());
        let mut report = OpenReport::default();
        let mut segments = VecDeque::new();
        let mut stub = None;
        let mut total_bytes = 0;
        let mut last_seq = 0;
        let mut bound = 0u64;
        for (named, path) in paths {
            narrow(&path, FILE_MODE).map_err(io_err(&path))?;
            let data = fs::read(&path).map_err(io_err(&path))?;
            bound = bound.max(named.saturating_add(data.len() as u64));
            let floor = named.saturating_sub(1).max(last_seq);
            let scan = scan(&data, floor).map_err(|version| JournalError::UnknownFormat {
                path: path.clone(),
                version,
            })?;
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let mut seg = SegmentFile {
                path: path.clone(),
                floor,
                ranges: Vec::new(),
                bytes: data.len() as u64,
                records: 0,
            };
            for f in &scan.records {
                seg.push(f.record.seq, 0);
            }
            if seg.records == 0 {
                if scan.damaged.is_empty() {
                    // Empty, or cut short before its first record was whole: no record to keep.
                    let header = segment_header();
                    if data.len() > header.len() || !header.starts_with(&data) {
                        report.torn_segments += 1;
                        report.torn_bytes += data.len().saturating_sub(header.len()) as u64;
                    }
                    if newest.as_ref() == Some(&path) {
                        // But its name is the memory of the highest seq (invariant 7): keep it,
                        // as a header only.
                        if data[..] != header[..] {
                            replace_file(&path, &header).map_err(io_err(&path))?;
                        }
                        total_bytes += header.len() as u64;
                        stub = Some((path.clone(), header.len() as u64));
                    } else {
                        fs::remove_file(&path).map_err(io_err(&path))?;
                    }
                } else {
                    // Nothing intact: the whole file goes aside for a person.
                    let moved = move_aside(dir, &path, &name);
                    report.damaged.push(Damage {
                        segment: path.clone(),
                        offset: 0,
                        bytes: data.len() as u64,
                        whole_segment: true,
                        lost_seqs: None,
                        error: moved.as_ref().err().map(ToString::to_string),
                        saved_to: moved.ok(),
                    });
                }
                continue;
            }
            if let Some(from) = scan.torn_from {
                report.torn_segments += 1;
                report.torn_bytes += (data.len() - from) as u64;
            }
            if !scan.damaged.is_empty() {
                seg.bytes = recover(dir, &path, &name, &data, &scan, &mut report);
            } else if let Some(from) = scan.torn_from {
                let f = OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .map_err(io_err(&path))?;
                f.set_len(from as u64).map_err(io_err(&path))?;
                f.sync_all().map_err(io_err(&path))?;
                seg.bytes = from as u64;
            }
            last_seq = seg.last();
            report.records += seg.records;
            total_bytes += seg.bytes;
            segments.push_back(seg);
        }
        report.segments = segments.len();
        Ok((
            Self {
                dir: dir.to_path_buf(),
                segment_bytes,
                segments,
                active: None,
                stub,
                total_bytes,
            },
            report,
            bound,
        ))
    }

    fn append(&mut self, seq: u64, topic: &str, payload: &[u8]) -> Result<(), JournalError> {
        let size = record_size(topic.len(), payload.len());
        let needs_new = match (&self.active, self.segments.back()) {
            (Some(_), Some(s)) => s.bytes + size > self.segment_bytes && s.records > 0,
            _ => true,
        };
        let mut buf = Vec::with_capacity(SEGMENT_HEADER + size as usize);
        if needs_new {
            // The segment being closed may hold records the periodic fsync has not reached;
            // it only syncs the active file. Once per segment, so cheap. It stays active until
            // that succeeds, so a failed sync is tried again by the next append.
            if let (Some(old), Some(seg)) = (self.active.as_ref(), self.segments.back()) {
                old.sync_data().map_err(io_err(&seg.path))?;
            }
            self.active = None;
            let path = self.dir.join(format!("{seq:020}.seg"));
            let file = private_file()
                .create_new(true)
                .append(true)
                .open(&path)
                .map_err(io_err(&path))?;
            // Make the new file's name durable together with its first records.
            if let Ok(d) = File::open(&self.dir) {
                let _best_effort = d.sync_all();
            }
            self.active = Some(file);
            self.segments.push_back(SegmentFile {
                path,
                floor: seq - 1,
                ranges: Vec::new(),
                bytes: 0,
                records: 0,
            });
            buf.extend_from_slice(&segment_header());
        }
        encode_record(&mut buf, seq, topic, payload);
        let (Some(file), Some(seg)) = (self.active.as_mut(), self.segments.back_mut()) else {
            unreachable!("an active segment was just ensured");
        };
        // One write per record (and the header with the first): either the kernel has all of
        // it or, after a crash, the tail is torn and the CRC catches it on the next open.
        if let Err(e) = file.write_all(&buf) {
            // A write that failed half-way (disk full, I/O error) must not leave garbage in the
            // middle of the segment: everything appended after it would be skipped as damage.
            let undone = file.set_len(seg.bytes).is_ok();
            let err = io_err(&seg.path)(e);
            if seg.records == 0 {
                if let Some(empty) = self.segments.pop_back() {
                    let _best_effort = fs::remove_file(&empty.path);
                }
                self.active = None;
            } else if !undone {
                // Could not cut it off: start a fresh segment for the next record.
                self.active = None;
            }
            return Err(err);
        }
        let written = buf.len() as u64;
        seg.push(seq, written);
        self.total_bytes += written;
        if let Some((path, bytes)) = self.stub.take() {
            // A newer segment with a record now remembers the highest seq.
            match fs::remove_file(&path) {
                Ok(()) => self.total_bytes -= bytes,
                // Tried again at the next roll; an open deletes it anyway (no longer newest).
                Err(_) => self.stub = Some((path, bytes)),
            }
        }
        Ok(())
    }

    fn remove_oldest(&mut self) -> Result<Option<SegmentFile>, JournalError> {
        let Some(seg) = self.segments.pop_front() else {
            return Ok(None);
        };
        if self.segments.is_empty() {
            self.active = None;
        }
        match fs::remove_file(&seg.path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(&seg.path)(e)),
        }
        self.total_bytes -= seg.bytes;
        Ok(Some(seg))
    }
}

/// Save a segment's damaged bytes aside and rewrite it with its intact records only (a torn
/// tail goes too). Returns the segment's size afterwards. When the bytes cannot be saved the
/// segment is left as it is — its damage is skipped on every read, and the next open tries
/// again — since rewriting would drop them silently.
fn recover(
    dir: &Path,
    path: &Path,
    name: &str,
    data: &[u8],
    scan: &Scan,
    report: &mut OpenReport,
) -> u64 {
    let mut saved_all = true;
    for d in &scan.damaged {
        let saved = save_aside(dir, name, d.start, &data[d.start..d.end]);
        saved_all &= saved.is_ok();
        let lost_seqs = match (d.before, d.after) {
            (Some(b), Some(a)) if a > b + 1 => Some([b + 1, a - 1]),
            _ => None,
        };
        report.damaged.push(Damage {
            segment: path.to_path_buf(),
            offset: d.start as u64,
            bytes: (d.end - d.start) as u64,
            whole_segment: false,
            lost_seqs,
            error: saved.as_ref().err().map(ToString::to_string),
            saved_to: saved.ok(),
        });
    }
    if !saved_all {
        return data.len() as u64;
    }
    let mut clean = segment_header().to_vec();
    for f in &scan.records {
        clean.extend_from_slice(&data[f.offset..f.offset + f.len]);
    }
    match replace_file(path, &clean) {
        Ok(()) => clean.len() as u64,
        Err(e) => {
            // Saved aside but not rewritten: reads skip the damage in place; the next open
            // rewrites (the copy aside is then made again under the same name).
            if let Some(last) = report.damaged.last_mut() {
                last.error = Some(format!(
                    "saved, but the segment could not be rewritten: {e}"
                ));
            }
            data.len() as u64
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(kind: JournalKind, max_bytes: u64, segment_bytes: u64) -> StreamConfig {
        StreamConfig {
            journal: kind,
            max_bytes,
            segment_bytes,
            ..StreamConfig::default()
        }
    }

    fn payload(i: u64) -> Vec<u8> {
        format!("{{\"reading\":{i}}}").into_bytes()
    }

    #[test]
    fn reads_can_be_bounded_by_bytes() {
        for kind in [JournalKind::Disk, JournalKind::Memory] {
            let dir = tempfile::tempdir().unwrap();
            let (mut j, _) = Journal::open(dir.path(), &cfg(kind, 1 << 20, 64 << 10)).unwrap();
            for i in 0..100 {
                j.append("t", &payload(i)).unwrap();
            }
            let one = j.read_after_within(0, usize::MAX, 1, |_| false).unwrap();
            assert_eq!(one.len(), 1, "at least one record, even over the budget");
            let some = j.read_after_within(0, usize::MAX, 300, |_| false).unwrap();
            assert!(
                some.len() > 1 && some.len() < 100,
                "{kind:?}: {}",
                some.len()
            );
            let after = some.last().unwrap().seq;
            let rest = j
                .read_after_within(after, usize::MAX, u64::MAX, |_| false)
                .unwrap();
            assert_eq!(some.len() + rest.len(), 100);
            assert_eq!(rest[0].seq, after + 1);
        }
    }

    #[test]
    fn a_journal_cannot_be_opened_twice() {
        let dir = tempfile::tempdir().unwrap();
        let c = cfg(JournalKind::Disk, 1 << 20, 4096);
        let (_j, _) = Journal::open(dir.path(), &c).unwrap();
        let e = Journal::open(dir.path(), &c).unwrap_err();
        assert!(e.to_string().contains("in use by another process"), "{e}");
    }

    #[test]
    fn records_survive_reopen_and_seqs_keep_growing() {
        let dir = tempfile::tempdir().unwrap();
        let c = cfg(JournalKind::Disk, 1 << 20, 4096);
        let (mut j, _) = Journal::open(dir.path(), &c).unwrap();
        let seqs: Vec<u64> = (0..100)
            .map(|i| j.append("t/a", &payload(i)).unwrap().0)
            .collect();
        assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1));
        drop(j);
        let (mut j, report) = Journal::open(dir.path(), &c).unwrap();
        assert_eq!(report.records, 100);
        assert_eq!(report.torn_bytes, 0);
        let all = j.read_after(0, usize::MAX, |_| false).unwrap();
        assert_eq!(all.len(), 100);
        assert_eq!(all[7].payload, payload(7));
        assert_eq!(all[7].topic, "t/a");
        let (next, _) = j.append("t/a", b"x").unwrap();
        assert!(next > seqs[99], "seq {next} reused after reopen");
    }

    #[test]
    fn full_journal_drops_oldest_segments_and_says_how_many() {
        let dir = tempfile::tempdir().unwrap();
        let c = cfg(JournalKind::Disk, 64 * 1024, 8 * 1024);
        let (mut j, _) = Journal::open(dir.path(), &c).unwrap();
        let mut dropped = 0;
        let mut first_dropped = None;
        for i in 0..2000 {
            if let (_, Some(d)) = j.append("wattbus/v1/home/meas/d/c", &payload(i)).unwrap() {
                first_dropped.get_or_insert(d.first_seq);
                dropped += d.records;
            }
        }
        assert!(j.bytes() <= 64 * 1024, "{} bytes", j.bytes());
        assert!(dropped > 0);
        assert_eq!(
            dropped + j.records(),
            2000,
            "every record is either kept or counted as dropped"
        );
        assert_eq!(first_dropped, Some(1), "the oldest go first");
        let kept = j.read_after(0, usize::MAX, |_| false).unwrap();
        assert_eq!(
            kept.last().unwrap().payload,
            payload(1999),
            "the newest are kept"
        );
    }

    #[test]
    fn trim_deletes_closed_segments_and_never_churns_the_active_one() {
        let dir = tempfile::tempdir().unwrap();
        let c = cfg(JournalKind::Disk, 1 << 20, 4096);
        let (mut j, _) = Journal::open(dir.path(), &c).unwrap();
        let mut last = 0;
        for i in 0..300 {
            last = j.append("t", &payload(i)).unwrap().0;
        }
        let ranges = j.ranges();
        assert!(ranges.len() > 2);
        let first_seg_last = ranges[0][1];
        assert_eq!(
            j.trim_through(first_seg_last - 1).unwrap(),
            0,
            "a partly acknowledged segment stays"
        );
        assert_eq!(
            j.ranges()[0],
            [first_seg_last, first_seg_last],
            "but its acknowledged part is gone"
        );
        assert_eq!(j.trim_through(first_seg_last).unwrap(), 1);
        assert_eq!(j.ranges()[0][0], first_seg_last + 1);
        j.trim_through(last).unwrap();
        assert_eq!(j.records(), 0);
        assert_eq!(segment_files(dir.path()), 1, "the active segment is kept");
        // Acknowledged-and-append cycles (1 Hz readings acknowledged at once) write into the
        // same file: no file is created or deleted per reading.
        for i in 0..20 {
            let (seq, _) = j.append("t", &payload(i)).unwrap();
            assert_eq!(j.ranges(), vec![[seq, seq]]);
            j.trim_through(seq).unwrap();
            assert_eq!(segment_files(dir.path()), 1);
        }
        assert!(
            j.read_after(0, 100, |_| false).unwrap().is_empty(),
            "acknowledged records are never replayed"
        );
        let (seq, _) = j.append("t", b"unacknowledged").unwrap();
        drop(j);
        // Reopened after a crash (nothing saved): the acknowledged point is lost, so the last
        // segment is replayed from its start — duplicates, never a loss.
        let (j, _) = Journal::open(dir.path(), &c).unwrap();
        assert!(j.records() > 1);
        assert_eq!(j.last_seq(), Some(seq));
        // After a clean shutdown it is not.
        let mut j = j;
        j.trim_through(seq - 1).unwrap();
        j.save_acked().unwrap();
        drop(j);
        let (j, _) = Journal::open(dir.path(), &c).unwrap();
        assert_eq!(j.ranges(), vec![[seq, seq]]);
        assert_eq!(
            j.read_after(0, 10, |_| false).unwrap()[0].payload,
            b"unacknowledged"
        );
    }

    #[test]
    fn read_after_skips_acknowledged_and_respects_limit() {
        let dir = tempfile::tempdir().unwrap();
        let (mut j, _) = Journal::open(dir.path(), &cfg(JournalKind::Disk, 1 << 20, 4096)).unwrap();
        for i in 0..50 {
            j.append("t", &payload(i)).unwrap();
        }
        let got = j.read_after(10, 5, |s| s % 2 == 0).unwrap();
        assert_eq!(
            got.iter().map(|r| r.seq).collect::<Vec<_>>(),
            vec![11, 13, 15, 17, 19]
        );
    }

    #[test]
    fn memory_journal_is_bounded_and_never_reuses_seqs() {
        let dir = tempfile::tempdir().unwrap();
        let c = cfg(JournalKind::Memory, 64 * 1024, 4096);
        let (mut j, _) = Journal::open(dir.path(), &c).unwrap();
        let mut dropped = 0;
        let mut last = 0;
        for i in 0..5000 {
            let (seq, d) = j.append("t", &payload(i)).unwrap();
            dropped += d.map_or(0, |d| d.records);
            last = seq;
        }
        assert!(j.bytes() <= 64 * 1024);
        assert_eq!(dropped + j.records(), 5000);
        drop(j);
        let (mut j, _) = Journal::open(dir.path(), &c).unwrap();
        assert_eq!(j.records(), 0, "memory journals start empty");
        assert!(j.append("t", b"x").unwrap().0 > last);
    }

    fn segment_files(dir: &Path) -> usize {
        fs::read_dir(dir)
            .unwrap()
            .flatten()
            .filter(|e| e.path().extension().is_some_and(|x| x == "seg"))
            .count()
    }

    /// The segment files of `dir`, oldest first.
    fn segments(dir: &Path) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = fs::read_dir(dir)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "seg"))
            .collect();
        v.sort();
        v
    }

    fn corrupted(dir: &Path) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = fs::read_dir(dir.join(CORRUPTED_DIR))
            .map(|r| r.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        v.sort();
        v
    }

    /// A disk journal of `n` records in one segment, closed again.
    fn journal_of(dir: &Path, n: u64) -> StreamConfig {
        let c = cfg(JournalKind::Disk, 1 << 20, 1 << 16);
        let (mut j, _) = Journal::open(dir, &c).unwrap();
        for i in 0..n {
            j.append("t", &payload(i)).unwrap();
        }
        c
    }

    fn payloads(j: &Journal) -> Vec<Vec<u8>> {
        j.read_after(0, usize::MAX, |_| false)
            .unwrap()
            .into_iter()
            .map(|r| r.payload)
            .collect()
    }

    /// Offset of record `k` (0-based) in a segment of records `payload(0..)` on topic "t".
    fn record_offset(k: u64) -> usize {
        SEGMENT_HEADER
            + (0..k)
                .map(|i| record_size(1, payload(i).len()) as usize)
                .sum::<usize>()
    }

    #[test]
    fn a_saved_acknowledgement_beyond_the_journal_is_not_trusted() {
        let dir = tempfile::tempdir().unwrap();
        let c = journal_of(dir.path(), 10);
        // A corrupt `acked` file claiming more than was ever written, checksum and all.
        fs::write(dir.path().join("acked"), encode_state(1_000)).unwrap();
        let (mut j, report) = Journal::open(dir.path(), &c).unwrap();
        assert_eq!(j.records(), 10, "nothing is trimmed on the claim");
        assert_eq!(report.untrusted.len(), 1, "{report:?}");
        assert_eq!(report.untrusted[0].file, "acked");
        assert!(
            report.untrusted[0]
                .reason
                .contains("beyond the journal's last record (10)"),
            "{report:?}"
        );
        let (seq, _) = j.append("t", b"new").unwrap();
        assert_eq!(j.ranges(), vec![[1, 10], [seq, seq]]);
    }

    #[test]
    fn an_acked_file_of_the_wrong_size_or_checksum_is_not_trusted() {
        let dir = tempfile::tempdir().unwrap();
        let c = journal_of(dir.path(), 10);
        let mut flipped = encode_state(5);
        flipped[0] ^= 0x08; // now says 13 (beyond), but its checksum is off
        for bad in [
            u64::MAX.to_le_bytes().to_vec(),
            vec![],
            b"garbage, not a number".to_vec(),
            flipped.to_vec(),
        ] {
            fs::write(dir.path().join("acked"), &bad).unwrap();
            let (j, report) = Journal::open(dir.path(), &c).unwrap();
            assert_eq!(j.records(), 10, "{bad:?}");
            assert_eq!(
                report.untrusted.iter().map(|u| u.file).collect::<Vec<_>>(),
                vec!["acked"],
                "{bad:?}"
            );
        }
        // A valid one is used: a clean shutdown spares the replay.
        fs::write(dir.path().join("acked"), encode_state(4)).unwrap();
        let (j, report) = Journal::open(dir.path(), &c).unwrap();
        assert!(report.untrusted.is_empty(), "{report:?}");
        assert_eq!(j.ranges(), vec![[5, 10]]);
    }

    #[test]
    fn torn_tail_is_truncated_and_reported_not_fatal() {
        let dir = tempfile::tempdir().unwrap();
        let c = journal_of(dir.path(), 10);
        let seg = segments(dir.path()).remove(0);
        let len = fs::metadata(&seg).unwrap().len();
        // A power cut in the middle of the 11th write: its first 20 bytes reached the disk.
        let mut eleventh = Vec::new();
        encode_record(&mut eleventh, 11, "t", &payload(10));
        let mut f = OpenOptions::new().append(true).open(&seg).unwrap();
        f.write_all(&eleventh[..20]).unwrap();
        drop(f);
        let (mut j, report) = Journal::open(dir.path(), &c).unwrap();
        assert_eq!(report.records, 10);
        assert_eq!((report.torn_segments, report.torn_bytes), (1, 20));
        assert!(report.damaged.is_empty(), "a torn tail is not damage");
        assert!(corrupted(dir.path()).is_empty(), "nor moved aside");
        assert_eq!(fs::metadata(&seg).unwrap().len(), len);
        // And it keeps working.
        j.append("t", b"after").unwrap();
        assert_eq!(j.records(), 11);
    }

    #[test]
    fn bytes_flipped_mid_segment_lose_only_their_record_and_are_moved_aside() {
        let dir = tempfile::tempdir().unwrap();
        let c = journal_of(dir.path(), 10);
        let seg = segments(dir.path()).remove(0);
        let mut bytes = fs::read(&seg).unwrap();
        // Three bytes in the middle of the 6th record (seq 6).
        let at = record_offset(5) + 15;
        for b in &mut bytes[at..at + 3] {
            *b ^= 0x40;
        }
        let damaged_record = bytes[record_offset(5)..record_offset(6)].to_vec();
        fs::write(&seg, &bytes).unwrap();
        let (j, report) = Journal::open(dir.path(), &c).unwrap();
        let mut expected: Vec<Vec<u8>> = (0..10).map(payload).collect();
        expected.remove(5);
        assert_eq!(
            payloads(&j),
            expected,
            "every intact record, before and after"
        );
        assert_eq!(j.ranges(), vec![[1, 5], [7, 10]]);
        assert_eq!(report.torn_segments, 0);
        assert_eq!(report.damaged.len(), 1, "{report:?}");
        let d = &report.damaged[0];
        assert_eq!(d.offset, record_offset(5) as u64);
        assert_eq!(d.lost_seqs, Some([6, 6]));
        let saved = d.saved_to.clone().expect("saved aside");
        assert_eq!(
            saved,
            dir.path().join(CORRUPTED_DIR).join(format!(
                "{}.{}.bin",
                seg.file_name().unwrap().to_string_lossy(),
                d.offset
            ))
        );
        assert_eq!(
            fs::read(&saved).unwrap(),
            damaged_record,
            "the bytes, for a person"
        );
        drop(j);
        // The segment was rewritten without them: the next open finds nothing to report.
        let (j, report) = Journal::open(dir.path(), &c).unwrap();
        assert!(report.damaged.is_empty(), "{report:?}");
        assert_eq!(payloads(&j), expected);
        assert_eq!(j.bytes(), fs::metadata(&seg).unwrap().len());
    }

    #[test]
    fn a_damaged_segment_header_loses_no_record() {
        let dir = tempfile::tempdir().unwrap();
        let c = journal_of(dir.path(), 10);
        let seg = segments(dir.path()).remove(0);
        let mut bytes = fs::read(&seg).unwrap();
        bytes[3] ^= 0xFF;
        fs::write(&seg, &bytes).unwrap();
        let (j, report) = Journal::open(dir.path(), &c).unwrap();
        assert_eq!(payloads(&j), (0..10).map(payload).collect::<Vec<_>>());
        assert_eq!(report.damaged.len(), 1, "{report:?}");
        assert_eq!(report.damaged[0].bytes, SEGMENT_HEADER as u64);
        assert_eq!(fs::read(&seg).unwrap()[..SEGMENT_HEADER], segment_header());
    }

    #[test]
    fn a_segment_replaced_by_garbage_is_moved_aside_and_the_others_kept() {
        let dir = tempfile::tempdir().unwrap();
        let c = cfg(JournalKind::Disk, 1 << 20, 1024);
        let (mut j, _) = Journal::open(dir.path(), &c).unwrap();
        for i in 0..100 {
            j.append("t", &payload(i)).unwrap();
        }
        let before = j.read_after(0, usize::MAX, |_| false).unwrap();
        drop(j);
        let segs = segments(dir.path());
        assert!(segs.len() > 3);
        let victim = &segs[1];
        let first: u64 = victim
            .file_stem()
            .unwrap()
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        let next: u64 = segs[2]
            .file_stem()
            .unwrap()
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        let mut rng = fastrand::Rng::with_seed(7);
        let garbage: Vec<u8> = (0..700).map(|_| rng.u8(1..)).collect();
        fs::write(victim, &garbage).unwrap();
        let (j, report) = Journal::open(dir.path(), &c).unwrap();
        let after = j.read_after(0, usize::MAX, |_| false).unwrap();
        let expected: Vec<Record> = before
            .into_iter()
            .filter(|r| r.seq < first || r.seq >= next)
            .collect();
        assert_eq!(after, expected, "every record of the other segments");
        assert_eq!(report.damaged.len(), 1, "{report:?}");
        assert!(report.damaged[0].whole_segment);
        assert!(!victim.exists(), "moved, not copied");
        let saved = report.damaged[0].saved_to.clone().unwrap();
        assert_eq!(fs::read(saved).unwrap(), garbage);
    }

    #[test]
    fn marker_bytes_in_payloads_do_not_fool_the_scanner() {
        let dir = tempfile::tempdir().unwrap();
        let c = cfg(JournalKind::Disk, 1 << 20, 1 << 16);
        let (mut j, _) = Journal::open(dir.path(), &c).unwrap();
        // Payloads full of the marker and of things shaped like record headers.
        let mut tricky = Vec::new();
        for i in 0..20u32 {
            let mut p = Vec::new();
            for _ in 0..5 {
                p.extend_from_slice(&RECORD_MAGIC);
                p.extend_from_slice(&i.to_le_bytes());
                p.extend_from_slice(&(BODY_FIXED as u32 + i).to_le_bytes());
            }
            j.append("t", &p).unwrap();
            tricky.push(p);
        }
        drop(j);
        let seg = segments(dir.path()).remove(0);
        let mut bytes = fs::read(&seg).unwrap();
        let rec = record_size(1, tricky[0].len()) as usize;
        // Damage the marker of records 3 and 11: each must be resynced past.
        bytes[SEGMENT_HEADER + 3 * rec] ^= 1;
        bytes[SEGMENT_HEADER + 11 * rec + 5] ^= 1;
        fs::write(&seg, &bytes).unwrap();
        let (j, report) = Journal::open(dir.path(), &c).unwrap();
        let mut expected = tricky.clone();
        expected.remove(11);
        expected.remove(3);
        assert_eq!(payloads(&j), expected);
        assert_eq!(report.damaged.len(), 2, "{report:?}");
    }

    #[test]
    fn damage_that_cannot_be_saved_aside_stays_in_place_and_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let c = journal_of(dir.path(), 10);
        let seg = segments(dir.path()).remove(0);
        let mut bytes = fs::read(&seg).unwrap();
        bytes[record_offset(2) + 14] ^= 0x01;
        fs::write(&seg, &bytes).unwrap();
        // Where the copy should go is taken by a file: it cannot be made.
        fs::write(dir.path().join(CORRUPTED_DIR), b"in the way").unwrap();
        let (j, report) = Journal::open(dir.path(), &c).unwrap();
        assert_eq!(report.damaged.len(), 1);
        assert!(report.damaged[0].saved_to.is_none());
        assert!(report.damaged[0].error.is_some());
        assert_eq!(
            fs::read(&seg).unwrap(),
            bytes,
            "not rewritten: nothing silently dropped"
        );
        let mut expected: Vec<Vec<u8>> = (0..10).map(payload).collect();
        expected.remove(2);
        assert_eq!(payloads(&j), expected, "the damage is skipped on read");
        assert_eq!(j.bytes(), bytes.len() as u64);
    }

    #[test]
    fn a_lost_or_damaged_seq_file_never_lets_a_number_repeat() {
        // Each damage, on a journal whose every record was acknowledged (the `seq` file and the
        // newest segment are then its only memory) and on one with records held.
        type Damage = fn(&Path);
        let damages: [(&str, Damage); 5] = [
            ("deleted", |p| fs::remove_file(p).unwrap()),
            ("truncated", |p| {
                let b = fs::read(p).unwrap();
                fs::write(p, &b[..5]).unwrap();
            }),
            ("empty", |p| fs::write(p, b"").unwrap()),
            ("garbage", |p| fs::write(p, b"\x17\x99garbage!!!").unwrap()),
            ("behind", |p| fs::write(p, encode_state(3)).unwrap()),
        ];
        for (name, damage) in damages {
            for acknowledge_all in [true, false] {
                let dir = tempfile::tempdir().unwrap();
                let c = cfg(JournalKind::Disk, 1 << 20, 1024);
                let (mut j, _) = Journal::open(dir.path(), &c).unwrap();
                let mut issued = 0;
                for i in 0..200 {
                    issued = j.append("t", &payload(i)).unwrap().0;
                }
                if acknowledge_all {
                    j.trim_through(issued).unwrap();
                    j.save_acked().unwrap();
                    assert_eq!(segments(dir.path()).len(), 1, "the newest stays");
                }
                drop(j);
                damage(&dir.path().join("seq"));
                let (mut j, report) = Journal::open(dir.path(), &c).unwrap();
                assert_eq!(
                    report.untrusted.iter().map(|u| u.file).collect::<Vec<_>>(),
                    vec!["seq"],
                    "{name}: {report:?}"
                );
                let (next, _) = j.append("t", b"x").unwrap();
                assert!(
                    next > issued + SEQ_BLOCK,
                    "{name}: seq {next} after {issued}"
                );
                drop(j);
                // The new reservation is trusted again.
                let (mut j, report) = Journal::open(dir.path(), &c).unwrap();
                assert!(report.untrusted.is_empty(), "{name}: {report:?}");
                assert!(j.append("t", b"y").unwrap().0 > next);
            }
        }
    }

    #[test]
    fn a_memory_journal_without_its_seq_file_continues_above_the_clock() {
        let dir = tempfile::tempdir().unwrap();
        let c = cfg(JournalKind::Memory, 1 << 20, 4096);
        let (mut j, _) = Journal::open(dir.path(), &c).unwrap();
        j.append("t", b"x").unwrap();
        drop(j);
        fs::write(dir.path().join("seq"), b"\0\0").unwrap();
        let (mut j, report) = Journal::open(dir.path(), &c).unwrap();
        assert_eq!(report.untrusted.len(), 1, "{report:?}");
        assert!(j.append("t", b"y").unwrap().0 > now_us() - 60_000_000);
    }

    #[test]
    fn a_segment_in_an_unknown_format_is_refused_with_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let c = journal_of(dir.path(), 3);
        let seg = segments(dir.path()).remove(0);
        let mut bytes = fs::read(&seg).unwrap();
        bytes[8..12].copy_from_slice(&3u32.to_le_bytes());
        let crc = crc32fast::hash(&bytes[..12]);
        bytes[12..16].copy_from_slice(&crc.to_le_bytes());
        fs::write(&seg, &bytes).unwrap();
        let e = Journal::open(dir.path(), &c).unwrap_err().to_string();
        assert!(
            e.contains("format version 3") && e.contains("reads version 2"),
            "{e}"
        );
        assert_eq!(
            fs::read(&seg).unwrap(),
            bytes,
            "left untouched for that version"
        );
    }

    #[test]
    fn journal_files_are_private_to_their_owner() {
        let parent = tempfile::tempdir().unwrap();
        let dir = parent.path().join("journal/p/s");
        let c = journal_of(&dir, 10);
        let (mut j, _) = Journal::open(&dir, &c).unwrap();
        j.trim_through(3).unwrap();
        j.save_acked().unwrap();
        drop(j);
        let seg = segments(&dir).remove(0);
        let mut bytes = fs::read(&seg).unwrap();
        bytes[record_offset(5) + 14] ^= 1;
        fs::write(&seg, &bytes).unwrap();
        let (_j, report) = Journal::open(&dir, &c).unwrap();
        let saved = report.damaged[0].saved_to.clone().unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        for d in [
            parent.path().join("journal"),
            parent.path().join("journal/p"),
            dir.clone(),
            dir.join(CORRUPTED_DIR),
        ] {
            assert_eq!(mode(&d), 0o700, "{}", d.display());
        }
        for f in [
            seg,
            dir.join("seq"),
            dir.join("acked"),
            dir.join("lock"),
            saved,
        ] {
            assert_eq!(mode(&f), 0o600, "{}", f.display());
        }
    }
}
