//! The producer journal: where a message waits until every sink it matters to has stored it.
//!
//! # Invariants
//!
//! 1. **Written before published.** A record is appended (handed to the kernel with `write`)
//!    before it is published, so a killed process loses nothing it published. `fsync` follows
//!    within `fsync_interval_ms` (0 = at once), which bounds what a power cut can take.
//! 2. **Sequence numbers only grow, across restarts.** Numbers are reserved in blocks in a
//!    small `seq` file (fsynced, replaced atomically) before they are used; a reopened journal
//!    continues above the reservation. A torn tail or a lost unsynced write can leave a gap,
//!    never a reuse — a reused number could be taken by a sink for one it already stored.
//! 3. **Seqs are contiguous within a segment.** Each run of the process starts a new segment,
//!    and within a run numbers go up by one, so a segment's seqs are one range. The journal's
//!    contents are described exactly by the list of segment ranges ([`Journal::ranges`]).
//! 4. **Every record is checked.** `len | crc32(body) | body`; on open, the first record that
//!    does not check out (torn write, bit rot, a crash mid-append) ends its segment: the file is
//!    truncated there and the loss is reported, never a crash and never garbage replayed.
//! 5. **Bounded.** When the journal exceeds `max_bytes`, whole oldest segments are deleted and
//!    the dropped records reported (the caller logs an ERROR and counts them). Acknowledged
//!    segments are deleted the same way — a delete, never a rewrite, to spare SD cards.
//!
//! # Files
//!
//! `<dir>/seq` holds the reserved sequence ceiling. `<dir>/<first_seq:020>.seg` are segments.
//! Record body: `seq u64 LE | topic_len u16 LE | topic | payload`.
//!
//! The memory journal keeps the same contract except durability: it is a bounded ring, for
//! streams where losing a few seconds on a restart is acceptable (raw sample frames). It still
//! uses the `seq` file, written once per 65 536 records, so numbers never repeat.

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use crate::config::{JournalKind, StreamConfig};

/// Numbers reserved per write of the `seq` file.
const SEQ_BLOCK: u64 = 65_536;
/// Header: body length + CRC.
const HEADER: usize = 8;
/// A record larger than this is taken for corruption (the bus refuses far smaller packets).
const MAX_RECORD: usize = 64 << 20;

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
    fn size(&self) -> u64 {
        (HEADER + 10 + self.topic.len() + self.payload.len()) as u64
    }
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
    pub records: u64,
    pub segments: usize,
    /// Bytes cut off damaged segment tails.
    pub truncated_bytes: u64,
    /// Segments whose tail was damaged.
    pub damaged_segments: usize,
}

/// Hands out sequence numbers that never repeat, reserving them in blocks in `<dir>/seq`.
#[derive(Debug)]
struct SeqAllocator {
    path: PathBuf,
    next: u64,
    reserved: u64,
}

impl SeqAllocator {
    fn open(dir: &Path, at_least: u64) -> Result<Self, JournalError> {
        let path = dir.join("seq");
        let reserved = match fs::read(&path) {
            Ok(bytes) if bytes.len() == 8 => u64::from_le_bytes(bytes.try_into().unwrap_or([0; 8])),
            // Missing (first start) or damaged: the segments still tell where we were; a
            // damaged file is only possible for a torn first write, before any seq was used.
            Ok(_) => 0,
            Err(e) if e.kind() == io::ErrorKind::NotFound => 0,
            Err(e) => return Err(io_err(&path)(e)),
        };
        let mut alloc = Self {
            path,
            next: (reserved + 1).max(at_least).max(1),
            reserved,
        };
        alloc.reserve()?;
        Ok(alloc)
    }

    fn reserve(&mut self) -> Result<(), JournalError> {
        if self.next <= self.reserved {
            return Ok(());
        }
        let ceiling = self.next + SEQ_BLOCK;
        let tmp = self.path.with_extension("tmp");
        let write = || -> io::Result<()> {
            let mut f = File::create(&tmp)?;
            f.write_all(&ceiling.to_le_bytes())?;
            f.sync_all()?;
            fs::rename(&tmp, &self.path)?;
            if let Some(dir) = self.path.parent() {
                File::open(dir)?.sync_all()?;
            }
            Ok(())
        };
        write().map_err(io_err(&self.path))?;
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
struct Segment {
    path: PathBuf,
    /// Contiguous runs of seqs in this segment (one, except in files from a damaged history).
    ranges: Vec<[u64; 2]>,
    bytes: u64,
    records: u64,
}

impl Segment {
    fn first(&self) -> u64 {
        self.ranges.first().map_or(0, |r| r[0])
    }
    fn last(&self) -> u64 {
        self.ranges.last().map_or(0, |r| r[1])
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
    segments: VecDeque<Segment>,
    /// Open for appending; `None` until the first append of this run or after a roll.
    active: Option<File>,
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
    /// active segment is only trimmed logically (deleting and re-creating the file each time
    /// everything is acknowledged would churn the SD card's metadata once a second).
    acked_through: u64,
    /// Where `acked_through` is saved on a clean shutdown, so a restart does not replay the
    /// acknowledged part of the last segment. A lost or stale file only costs a replay.
    acked_path: PathBuf,
    /// Held while the journal is open: two processes appending to one journal would reuse
    /// sequence numbers and interleave records.
    _lock: File,
}

/// Take the journal directory's lock, or say who is in the way.
fn lock_dir(dir: &Path) -> Result<File, JournalError> {
    let path = dir.join("lock");
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(io_err(&path))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(JournalError::Locked(dir.to_path_buf())),
        Err(std::fs::TryLockError::Error(e)) => Err(io_err(&path)(e)),
    }
}

impl Journal {
    /// Open (or create) the journal in `dir`.
    pub fn open(dir: &Path, cfg: &StreamConfig) -> Result<(Self, OpenReport), JournalError> {
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        let lock = lock_dir(dir)?;
        let (store, report, last) = match cfg.journal {
            JournalKind::Disk => {
                let (disk, report) = DiskJournal::open(dir, cfg.segment_bytes)?;
                let last = disk.segments.back().map_or(0, Segment::last);
                (Store::Disk(disk), report, last)
            }
            JournalKind::Memory => {
                // Segments left by an earlier disk configuration of this stream are not ours to
                // replay any more; they stay on disk for a person to look at.
                (
                    Store::Memory(MemoryJournal {
                        records: VecDeque::new(),
                        total_bytes: 0,
                    }),
                    OpenReport::default(),
                    0,
                )
            }
        };
        let acked_path = dir.join("acked");
        let saved = match fs::read(&acked_path) {
            Ok(b) if b.len() == 8 => u64::from_le_bytes(b.try_into().unwrap_or([0; 8])),
            _ => 0,
        };
        // The `seq` file's reservation already covers every number ever handed out; a valid
        // acknowledged point never exceeds the journal's last seq, so it adds nothing here.
        let seq = SeqAllocator::open(dir, last + 1)?;
        let mut journal = Self {
            store,
            seq,
            max_bytes: cfg.max_bytes,
            acked_through: 0,
            acked_path,
            _lock: lock,
        };
        // A damaged or stale value can only be trusted up to what the journal holds.
        journal.trim_through(saved.min(last))?;
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
    /// delete closed segments that hold nothing newer; the active segment stays until it is
    /// full and closed. Returns how many segment files were deleted.
    pub fn trim_through(&mut self, through: u64) -> Result<u64, JournalError> {
        if through <= self.acked_through {
            return Ok(0);
        }
        self.acked_through = through;
        let mut removed = 0;
        match &mut self.store {
            Store::Disk(d) => {
                while d.segments.front().is_some_and(|s| s.last() <= through)
                    && !(d.segments.len() == 1 && d.active.is_some())
                {
                    d.remove_oldest()?;
                    removed += 1;
                }
            }
            Store::Memory(m) => {
                while m.records.front().is_some_and(|r| r.seq <= through) {
                    if let Some(r) = m.records.pop_front() {
                        m.total_bytes -= r.size();
                    }
                }
            }
        }
        Ok(removed)
    }

    /// Save the acknowledged point (on a clean shutdown).
    pub fn save_acked(&self) -> Result<(), JournalError> {
        let tmp = self.acked_path.with_extension("tmp");
        let write = || -> io::Result<()> {
            let mut f = File::create(&tmp)?;
            f.write_all(&self.acked_through.to_le_bytes())?;
            f.sync_all()?;
            fs::rename(&tmp, &self.acked_path)
        };
        write().map_err(io_err(&self.acked_path))
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
            Store::Disk(d) => d.segments.back().map(Segment::last),
            Store::Memory(m) => m.records.back().map(|r| r.seq),
        }
    }

    pub fn bytes(&self) -> u64 {
        match &self.store {
            Store::Disk(d) => d.total_bytes,
            Store::Memory(m) => m.total_bytes,
        }
    }

    /// Records not yet acknowledged.
    pub fn records(&self) -> u64 {
        self.ranges().iter().map(|[f, l]| l - f + 1).sum()
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
                    let (records, _) = read_segment(&s.path)?;
                    for r in records
                        .into_iter()
                        .filter(|r| r.seq > after && !skip(r.seq))
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

impl DiskJournal {
    fn open(dir: &Path, segment_bytes: u64) -> Result<(Self, OpenReport), JournalError> {
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
        let mut report = OpenReport::default();
        let mut segments = VecDeque::new();
        let mut total_bytes = 0;
        let mut last_seq = 0;
        for (_, path) in paths {
            let (records, good_len) = read_segment(&path)?;
            let file_len = fs::metadata(&path).map_err(io_err(&path))?.len();
            if good_len < file_len {
                report.truncated_bytes += file_len - good_len;
                report.damaged_segments += 1;
                let f = OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .map_err(io_err(&path))?;
                f.set_len(good_len).map_err(io_err(&path))?;
                f.sync_all().map_err(io_err(&path))?;
            }
            let mut seg = Segment {
                path: path.clone(),
                ranges: Vec::new(),
                bytes: 0,
                records: 0,
            };
            for r in &records {
                // A segment that overlaps an earlier one (possible only after manual tampering)
                // contributes just its newer records.
                if r.seq > last_seq {
                    seg.push(r.seq, r.size());
                    last_seq = r.seq;
                }
            }
            if seg.records == 0 {
                fs::remove_file(&path).map_err(io_err(&path))?;
                continue;
            }
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
                total_bytes,
            },
            report,
        ))
    }

    fn append(&mut self, seq: u64, topic: &str, payload: &[u8]) -> Result<(), JournalError> {
        let body_len = 10 + topic.len() + payload.len();
        let size = (HEADER + body_len) as u64;
        let needs_new = match (&self.active, self.segments.back()) {
            (Some(_), Some(s)) => s.bytes + size > self.segment_bytes && s.bytes > 0,
            _ => true,
        };
        if needs_new {
            // The segment being closed may hold records the periodic fsync has not reached;
            // it only syncs the active file. Once per segment, so cheap.
            if let (Some(old), Some(seg)) = (self.active.take(), self.segments.back()) {
                old.sync_data().map_err(io_err(&seg.path))?;
            }
            let path = self.dir.join(format!("{seq:020}.seg"));
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .map_err(io_err(&path))?;
            // Make the new file's name durable together with its first records.
            if let Ok(d) = File::open(&self.dir) {
                let _best_effort = d.sync_all();
            }
            self.active = Some(file);
            self.segments.push_back(Segment {
                path,
                ranges: Vec::new(),
                bytes: 0,
                records: 0,
            });
        }
        let mut buf = Vec::with_capacity(HEADER + body_len);
        buf.extend_from_slice(&u32::try_from(body_len).unwrap_or(u32::MAX).to_le_bytes());
        buf.extend_from_slice(&[0; 4]);
        buf.extend_from_slice(&seq.to_le_bytes());
        buf.extend_from_slice(&u16::try_from(topic.len()).unwrap_or(u16::MAX).to_le_bytes());
        buf.extend_from_slice(topic.as_bytes());
        buf.extend_from_slice(payload);
        let crc = crc32fast::hash(&buf[HEADER..]);
        buf[4..8].copy_from_slice(&crc.to_le_bytes());
        let (Some(file), Some(seg)) = (self.active.as_mut(), self.segments.back_mut()) else {
            unreachable!("an active segment was just ensured");
        };
        // One write per record: either the kernel has all of it or, after a crash, the tail is
        // torn and the CRC catches it on the next open.
        if let Err(e) = file.write_all(&buf) {
            // A write that failed half-way (disk full, I/O error) must not leave garbage in the
            // middle of the segment: everything appended after it would be unreadable.
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
        seg.push(seq, size);
        self.total_bytes += size;
        Ok(())
    }

    fn remove_oldest(&mut self) -> Result<Option<Segment>, JournalError> {
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

/// Read every valid record of a segment; also returns the length of the valid prefix.
fn read_segment(path: &Path) -> Result<(Vec<Record>, u64), JournalError> {
    let mut file = File::open(path).map_err(io_err(path))?;
    let mut data = Vec::new();
    file.seek(SeekFrom::Start(0)).map_err(io_err(path))?;
    file.read_to_end(&mut data).map_err(io_err(path))?;
    let mut records = Vec::new();
    let mut pos = 0usize;
    let mut prev_seq = 0u64;
    while let Some(r) = parse_record(&data[pos..]) {
        let (record, used) = r;
        if record.seq <= prev_seq {
            break;
        }
        prev_seq = record.seq;
        records.push(record);
        pos += used;
    }
    Ok((records, pos as u64))
}

fn parse_record(data: &[u8]) -> Option<(Record, usize)> {
    let len = u32::from_le_bytes(data.get(0..4)?.try_into().ok()?) as usize;
    let crc = u32::from_le_bytes(data.get(4..8)?.try_into().ok()?);
    if !(10..=MAX_RECORD).contains(&len) {
        return None;
    }
    let body = data.get(HEADER..HEADER + len)?;
    if crc32fast::hash(body) != crc {
        return None;
    }
    let seq = u64::from_le_bytes(body[0..8].try_into().ok()?);
    let topic_len = u16::from_le_bytes(body[8..10].try_into().ok()?) as usize;
    let topic = std::str::from_utf8(body.get(10..10 + topic_len)?)
        .ok()?
        .to_string();
    let payload = body[10 + topic_len..].to_vec();
    Some((
        Record {
            seq,
            topic,
            payload,
        },
        HEADER + len,
    ))
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
    fn a_saved_acknowledgement_beyond_the_journal_is_not_trusted() {
        let dir = tempfile::tempdir().unwrap();
        let c = cfg(JournalKind::Disk, 1 << 20, 4096);
        let (mut j, _) = Journal::open(dir.path(), &c).unwrap();
        for i in 0..10 {
            j.append("t", &payload(i)).unwrap();
        }
        drop(j);
        // A corrupt `acked` file claiming far more than was ever written.
        fs::write(dir.path().join("acked"), u64::MAX.to_le_bytes()).unwrap();
        let (mut j, _) = Journal::open(dir.path(), &c).unwrap();
        assert_eq!(
            j.records(),
            0,
            "everything the journal held is below the claim"
        );
        let (seq, _) = j.append("t", b"new").unwrap();
        assert_eq!(
            j.ranges(),
            vec![[seq, seq]],
            "a new record is not hidden by the bad claim"
        );
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
        assert_eq!(report.truncated_bytes, 0);
        let all = j.read_after(0, usize::MAX, |_| false).unwrap();
        assert_eq!(all.len(), 100);
        assert_eq!(all[7].payload, payload(7));
        assert_eq!(all[7].topic, "t/a");
        let (next, _) = j.append("t/a", b"x").unwrap();
        assert!(next > seqs[99], "seq {next} reused after reopen");
    }

    #[test]
    fn torn_tail_is_truncated_and_reported_not_fatal() {
        let dir = tempfile::tempdir().unwrap();
        let c = cfg(JournalKind::Disk, 1 << 20, 1 << 16);
        let (mut j, _) = Journal::open(dir.path(), &c).unwrap();
        for i in 0..10 {
            j.append("t", &payload(i)).unwrap();
        }
        drop(j);
        let seg = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.extension().is_some_and(|e| e == "seg"))
            .unwrap();
        // A crash in the middle of the 11th write: header and half a body.
        let len = fs::metadata(&seg).unwrap().len();
        let mut f = OpenOptions::new().append(true).open(&seg).unwrap();
        f.write_all(&[40, 0, 0, 0, 1, 2, 3, 4, 9, 9, 9]).unwrap();
        drop(f);
        let (mut j, report) = Journal::open(dir.path(), &c).unwrap();
        assert_eq!(report.records, 10);
        assert_eq!(report.truncated_bytes, 11);
        assert_eq!(report.damaged_segments, 1);
        assert_eq!(fs::metadata(&seg).unwrap().len(), len);
        // And it keeps working.
        j.append("t", b"after").unwrap();
        assert_eq!(j.records(), 11);
    }

    #[test]
    fn flipped_bit_ends_the_segment_at_the_bad_record() {
        let dir = tempfile::tempdir().unwrap();
        let c = cfg(JournalKind::Disk, 1 << 20, 1 << 16);
        let (mut j, _) = Journal::open(dir.path(), &c).unwrap();
        for i in 0..10 {
            j.append("t", &payload(i)).unwrap();
        }
        drop(j);
        let seg = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.extension().is_some_and(|e| e == "seg"))
            .unwrap();
        let mut bytes = fs::read(&seg).unwrap();
        let rec = bytes.len() / 10;
        bytes[rec * 5 + 12] ^= 0x40;
        fs::write(&seg, &bytes).unwrap();
        let (j, report) = Journal::open(dir.path(), &c).unwrap();
        assert_eq!(report.records, 5);
        assert_eq!(j.read_after(0, 100, |_| false).unwrap().len(), 5);
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

    fn segment_files(dir: &Path) -> usize {
        fs::read_dir(dir)
            .unwrap()
            .flatten()
            .filter(|e| e.path().extension().is_some_and(|x| x == "seg"))
            .count()
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
}
