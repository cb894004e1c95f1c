// Test code: a failed step should panic with its reason.
#![allow(clippy::unwrap_used, clippy::expect_used)]

//! A model test of the disk journal, like vector's `lib/vector-buffers` disk_v2 `tests/model/`:
//! random sequences of operations — append, acknowledge (`trim_through`, `save_acked`),
//! drop-when-full (a small `max_bytes`), restart (clean or not) and corruption between runs
//! (bytes flipped inside a record, a torn tail, a damaged segment header, a segment replaced by
//! garbage, a garbage or missing `acked` file, a lost or damaged `seq` file) — checked after
//! every step against a plain in-memory model:
//!
//! - every record the model says is intact and unacknowledged is read back exactly (seq, topic,
//!   payload), before and after every reopen; the counts, ranges and bytes the journal reports
//!   are the model's (bytes: the size of the segment files on disk);
//! - sequence numbers never repeat, whatever happened to the `seq` file;
//! - nothing acknowledged reappears, except what the contract allows: after a restart whose
//!   `acked` file is missing, stale (no `save_acked` since the last trim) or not trusted,
//!   acknowledged records still in a segment come back and are replayed — duplicates for
//!   idempotent sinks, never a loss. After a clean restart none does;
//! - damage is reported, and what was moved aside is in `corrupted/`; a restart with no
//!   corruption reports nothing.
//!
//! `JOURNAL_MODEL_CASES` (default 300) sets how many cases run; `JOURNAL_MODEL_SEED` replays
//! one case (the seed a failure prints).

use std::collections::BTreeMap;
use std::fs;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};

use runtime::config::{JournalKind, StreamConfig};
use runtime::journal::{CORRUPTED_DIR, FORMAT_VERSION, Journal, OpenReport};

/// Record head (marker, head CRC, length, body CRC), then seq and topic length: the bytes
/// before a record's topic.
const BEFORE_TOPIC: usize = 16 + 10;

type Rec = (String, Vec<u8>);

/// What the journal should hold.
#[derive(Default)]
struct Model {
    /// Intact, journaled, not acknowledged: the journal must return exactly these.
    unacked: BTreeMap<u64, Rec>,
    /// Acknowledged and intact: these may come back after an unclean restart, nothing else.
    acked: BTreeMap<u64, Rec>,
    /// What the journal's acknowledged point is.
    acked_through: u64,
    /// Highest seq ever handed out: the next must be above.
    max_issued: u64,
    /// The value of the last `save_acked`, if the `acked` file is still as written.
    saved: Option<u64>,
    /// The highest seq appended and its size, while it is intact (a torn tail cuts it).
    newest: Option<(u64, usize)>,
}

impl Model {
    fn lose(&mut self, seq: u64) {
        self.unacked.remove(&seq);
        self.acked.remove(&seq);
        if self.newest.is_some_and(|(s, _)| s == seq) {
            self.newest = None;
        }
    }

    fn ranges(&self) -> Vec<[u64; 2]> {
        let mut out: Vec<[u64; 2]> = Vec::new();
        for &s in self.unacked.keys() {
            match out.last_mut() {
                Some(r) if r[1] + 1 == s => r[1] = s,
                _ => out.push([s, s]),
            }
        }
        out
    }
}

/// What a corruption between two runs should make the journal report.
#[derive(Default, Debug)]
struct Expect {
    /// Segments (file names) where damage that is not a torn tail must be reported.
    damaged: Vec<String>,
    /// A segment replaced by garbage: reported and moved aside whole.
    garbage: Vec<String>,
    torn: bool,
    seq_untrusted: bool,
    acked_untrusted: bool,
    /// The `acked` file is gone or damaged: acknowledged records may reappear.
    acked_lost: bool,
    any: bool,
}

struct Case {
    rng: fastrand::Rng,
    dir: PathBuf,
    cfg: StreamConfig,
    model: Model,
    next_id: u64,
    trace: Vec<String>,
}

fn segment_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "seg"))
        .collect();
    v.sort();
    v
}

fn name(p: &Path) -> String {
    p.file_name().unwrap().to_string_lossy().into_owned()
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

impl Case {
    fn new(seed: u64, dir: PathBuf) -> Case {
        let mut rng = fastrand::Rng::with_seed(seed);
        let segment_bytes = [300, 700, 2_000, 8_000][rng.usize(..4)];
        let max_bytes = [3_000, 12_000, 1 << 20][rng.usize(..3)];
        Case {
            rng,
            dir,
            cfg: StreamConfig {
                journal: JournalKind::Disk,
                segment_bytes,
                max_bytes,
                ..StreamConfig::default()
            },
            model: Model::default(),
            next_id: 0,
            trace: vec![format!(
                "segment_bytes={segment_bytes} max_bytes={max_bytes}"
            )],
        }
    }

    /// A payload that can be found in a segment file by its id, with random bytes after it
    /// (the full byte range: markers, zeros, anything).
    fn payload(&mut self) -> Vec<u8> {
        self.next_id += 1;
        let mut p = format!("\u{1}\u{2}id{:012}\u{3}", self.next_id).into_bytes();
        let filler = self.rng.usize(..300);
        p.extend((0..filler).map(|_| self.rng.u8(..)));
        p
    }

    fn open(&mut self) -> (Journal, OpenReport) {
        Journal::open(&self.dir, &self.cfg).unwrap_or_else(|e| panic!("open: {e}"))
    }

    fn check(&self, j: &Journal, read: bool) {
        let m = &self.model;
        assert_eq!(j.records(), m.unacked.len() as u64, "records held");
        // Per segment, so runs that continue into the next segment are joined here.
        let mut ranges: Vec<[u64; 2]> = Vec::new();
        for r in j.ranges() {
            match ranges.last_mut() {
                Some(last) if last[1] + 1 == r[0] => last[1] = r[1],
                _ => ranges.push(r),
            }
        }
        assert_eq!(ranges, m.ranges(), "ranges held");
        let on_disk: u64 = segment_files(&self.dir)
            .iter()
            .map(|p| fs::metadata(p).unwrap().len())
            .sum();
        assert_eq!(j.bytes(), on_disk, "bytes: the segment files' size");
        if read {
            let got = j.read_after(0, usize::MAX, |_| false).unwrap();
            let want: Vec<(u64, &Rec)> = m.unacked.iter().map(|(s, r)| (*s, r)).collect();
            assert_eq!(got.len(), want.len(), "records read back");
            for (g, (s, (topic, payload))) in got.iter().zip(want) {
                assert_eq!(g.seq, s);
                assert_eq!(&g.topic, topic, "seq {s}");
                assert!(&g.payload == payload, "seq {s}: payload differs");
            }
        }
    }

    fn append(&mut self, j: &mut Journal) {
        let n = 1 + self.rng.usize(..6);
        for _ in 0..n {
            let topic = ["a", "wattbus/v1/home/meas/we515-1/main"][self.rng.usize(..2)];
            let payload = self.payload();
            let (seq, dropped) = j.append(topic, &payload).unwrap();
            assert!(
                seq > self.model.max_issued,
                "seq {seq} repeats or goes back (max issued {})",
                self.model.max_issued
            );
            self.model.max_issued = seq;
            if let Some(d) = dropped {
                let gone: Vec<u64> = self
                    .model
                    .unacked
                    .range(d.first_seq..=d.last_seq)
                    .map(|(s, _)| *s)
                    .collect();
                assert_eq!(gone.len() as u64, d.records, "dropped {d:?}");
                for s in gone {
                    self.model.unacked.remove(&s);
                }
                // Acknowledged ones in those segments are gone too.
                let acked: Vec<u64> = self
                    .model
                    .acked
                    .range(..=d.last_seq)
                    .map(|(s, _)| *s)
                    .collect();
                for s in acked {
                    self.model.acked.remove(&s);
                }
                self.trace.push(format!("dropped {d:?}"));
            }
            let size = BEFORE_TOPIC + topic.len() + payload.len();
            self.model.newest = Some((seq, size));
            self.model.unacked.insert(seq, (topic.to_string(), payload));
        }
        self.trace
            .push(format!("append {n} → {}", self.model.max_issued));
    }

    fn trim(&mut self, j: &mut Journal) {
        // As the ack tracker does: never beyond what the journal holds.
        let through = self.rng.u64(..=j.last_seq().unwrap_or(0));
        j.trim_through(through).unwrap();
        let m = &mut self.model;
        m.acked_through = m.acked_through.max(through);
        let keep = m.unacked.split_off(&(m.acked_through + 1));
        m.acked.append(&mut m.unacked);
        m.unacked = keep;
        self.trace.push(format!("trim_through {through}"));
    }

    fn save(&mut self, j: &Journal) {
        j.save_acked().unwrap();
        self.model.saved = Some(self.model.acked_through);
        self.trace
            .push(format!("save_acked {}", self.model.acked_through));
    }

    /// Damage the closed journal's files; returns what the reopen must report.
    fn corrupt(&mut self) -> Expect {
        let mut expect = Expect::default();
        for _ in 0..1 + self.rng.usize(..3) {
            match self.rng.usize(..7) {
                0 | 1 => self.flip_record(&mut expect),
                2 => self.tear_tail(&mut expect),
                3 => self.flip_header(&mut expect),
                4 => self.garbage_segment(&mut expect),
                5 => self.damage_acked(&mut expect),
                _ => self.damage_seq(&mut expect),
            }
        }
        expect
    }

    /// Flip 1–3 bytes inside one record (any field: marker, CRC, length, body).
    fn flip_record(&mut self, expect: &mut Expect) {
        let candidates: Vec<(u64, Rec)> = self
            .model
            .unacked
            .iter()
            .chain(self.model.acked.iter())
            .map(|(s, r)| (*s, r.clone()))
            .collect();
        if candidates.is_empty() {
            return;
        }
        let (seq, (topic, payload)) = candidates[self.rng.usize(..candidates.len())].clone();
        let id = &payload[..17];
        for path in segment_files(&self.dir) {
            let mut bytes = fs::read(&path).unwrap();
            let Some(at) = find(&bytes, id) else { continue };
            let start = at - BEFORE_TOPIC - topic.len();
            let end = at + payload.len();
            // Distinct bytes: two flips of one byte could cancel out.
            let mut at: Vec<usize> = (0..1 + self.rng.usize(..3))
                .map(|_| self.rng.usize(start..end))
                .collect();
            at.sort_unstable();
            at.dedup();
            for i in at {
                bytes[i] ^= self.rng.u8(1..);
            }
            fs::write(&path, &bytes).unwrap();
            // Damage, never a torn tail, even at the end of the file: the record's head does
            // not check out, or its body is all there and does not.
            expect.damaged.push(name(&path));
            self.model.lose(seq);
            expect.any = true;
            self.trace
                .push(format!("flip record {seq} in {}", name(&path)));
            return;
        }
    }

    /// A power cut in the middle of the newest record's write.
    fn tear_tail(&mut self, expect: &mut Expect) {
        let Some((seq, size)) = self.model.newest else {
            return;
        };
        let Some(path) = segment_files(&self.dir).pop() else {
            return;
        };
        let bytes = fs::read(&path).unwrap();
        let cut = 1 + self.rng.usize(..size - 1);
        fs::write(&path, &bytes[..bytes.len() - cut]).unwrap();
        self.model.lose(seq);
        expect.torn = true;
        expect.any = true;
        self.trace.push(format!("tear {cut} bytes off {seq}"));
    }

    fn flip_header(&mut self, expect: &mut Expect) {
        let segs = segment_files(&self.dir);
        if segs.is_empty() {
            return;
        }
        let path = &segs[self.rng.usize(..segs.len())];
        let mut bytes = fs::read(path).unwrap();
        if bytes.len() < 16 {
            return;
        }
        let i = self.rng.usize(..16);
        bytes[i] ^= self.rng.u8(1..);
        fs::write(path, &bytes).unwrap();
        let mut header = b"WBJOURNL".to_vec();
        header.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        header.extend_from_slice(&crc32fast::hash(&header).to_le_bytes());
        if bytes[..16] != header[..] {
            // (Two flips of one byte can cancel out.)
            expect.damaged.push(name(path));
        }
        expect.any = true;
        self.trace
            .push(format!("flip header byte {i} of {}", name(path)));
    }

    fn garbage_segment(&mut self, expect: &mut Expect) {
        let segs = segment_files(&self.dir);
        if segs.is_empty() {
            return;
        }
        let k = self.rng.usize(..segs.len());
        let first = |p: &Path| -> u64 { p.file_stem().unwrap().to_str().unwrap().parse().unwrap() };
        let from = first(&segs[k]);
        let to = segs.get(k + 1).map_or(u64::MAX, |p| first(p));
        let len = 20 + self.rng.usize(..600);
        // Not zeros and not our header: garbage, not a torn segment.
        let garbage: Vec<u8> = (0..len)
            .map(|_| self.rng.u8(1..))
            .map(|b| if b == b'W' { 1 } else { b })
            .collect();
        fs::write(&segs[k], &garbage).unwrap();
        let lost: Vec<u64> = self
            .model
            .unacked
            .keys()
            .chain(self.model.acked.keys())
            .copied()
            .filter(|s| (from..to).contains(s))
            .collect();
        for s in lost {
            self.model.lose(s);
        }
        expect.garbage.push(name(&segs[k]));
        expect.any = true;
        self.trace
            .push(format!("garbage segment {}", name(&segs[k])));
    }

    fn damage_acked(&mut self, expect: &mut Expect) {
        let path = self.dir.join("acked");
        match self.rng.usize(..3) {
            0 => {
                let _ = fs::remove_file(&path);
                expect.acked_untrusted = false;
            }
            1 => {
                let len = [0, 3, 8, 12, 13][self.rng.usize(..5)];
                let bytes: Vec<u8> = (0..len).map(|_| self.rng.u8(..)).collect();
                fs::write(&path, bytes).unwrap();
                expect.acked_untrusted = true;
            }
            _ => {
                // Checksummed and all, but beyond anything ever journaled.
                let v = self.model.max_issued + 1 + self.rng.u64(..1000);
                let mut bytes = v.to_le_bytes().to_vec();
                bytes.extend_from_slice(&crc32fast::hash(&v.to_le_bytes()).to_le_bytes());
                fs::write(&path, bytes).unwrap();
                expect.acked_untrusted = true;
            }
        }
        self.model.saved = None;
        expect.acked_lost = true;
        expect.any = true;
        self.trace.push("damage acked".into());
    }

    fn damage_seq(&mut self, expect: &mut Expect) {
        let path = self.dir.join("seq");
        match self.rng.usize(..3) {
            0 => {
                let _ = fs::remove_file(&path);
            }
            1 => {
                let bytes = fs::read(&path).unwrap_or_default();
                let keep = self.rng.usize(..12).min(bytes.len());
                fs::write(&path, &bytes[..keep]).unwrap();
            }
            _ => {
                let bytes: Vec<u8> = (0..12).map(|_| self.rng.u8(..)).collect();
                fs::write(&path, bytes).unwrap();
            }
        }
        expect.seq_untrusted = true;
        expect.any = true;
        self.trace.push("damage seq".into());
    }

    /// Close, maybe corrupt, reopen, and hold the journal to the model.
    fn restart(&mut self, j: Journal) -> Journal {
        let clean = self.rng.bool();
        if clean {
            self.save(&j);
        }
        drop(j);
        let expect = if self.rng.usize(..3) == 0 {
            self.corrupt()
        } else {
            Expect::default()
        };
        self.trace.push(format!("restart clean={clean} {expect:?}"));
        let (j, report) = self.open();
        self.trace.push(format!("report {report:?}"));
        self.reconcile(&j, &report, &expect);
        j
    }

    fn reconcile(&mut self, j: &Journal, report: &OpenReport, expect: &Expect) {
        if !expect.any {
            assert_eq!(report.damaged, vec![], "no corruption, no damage");
            assert_eq!(report.untrusted, vec![], "no corruption, nothing untrusted");
            assert_eq!(report.torn_segments, 0, "no corruption, no torn tail");
        }
        if expect.torn {
            assert!(
                report.torn_segments > 0 || !report.damaged.is_empty(),
                "torn tail unreported"
            );
        }
        for seg in &expect.damaged {
            assert!(
                report.damaged.iter().any(|d| name(&d.segment) == *seg)
                    || expect.garbage.contains(seg),
                "damage in {seg} not reported"
            );
        }
        for seg in &expect.garbage {
            assert!(
                report
                    .damaged
                    .iter()
                    .any(|d| name(&d.segment) == *seg && d.whole_segment),
                "garbage segment {seg} not moved aside"
            );
        }
        for d in &report.damaged {
            let saved = d
                .saved_to
                .as_ref()
                .unwrap_or_else(|| panic!("not saved: {d:?}"));
            assert!(saved.starts_with(self.dir.join(CORRUPTED_DIR)));
            assert_eq!(fs::metadata(saved).unwrap().len(), d.bytes, "{d:?}");
        }
        let untrusted: Vec<&str> = report.untrusted.iter().map(|u| u.file).collect();
        assert_eq!(
            untrusted.contains(&"seq"),
            expect.seq_untrusted,
            "seq: {untrusted:?}"
        );
        if expect.acked_untrusted {
            assert!(untrusted.contains(&"acked"), "acked: {untrusted:?}");
        }
        // Where the journal's acknowledged point is now: the saved one if it was trusted.
        let m = &mut self.model;
        let trusted = m
            .saved
            .filter(|_| !untrusted.contains(&"acked"))
            .unwrap_or(0);
        if trusted < m.acked_through {
            m.acked_through = trusted;
        }
        if untrusted.contains(&"acked") || expect.acked_lost {
            m.saved = None;
        }
        // Acknowledged records above it that are still in a segment come back; nothing else.
        let got = j.read_after(0, usize::MAX, |_| false).unwrap();
        let mut back = 0;
        for r in &got {
            if m.unacked.contains_key(&r.seq) {
                continue;
            }
            let Some(rec) = m.acked.remove(&r.seq) else {
                panic!("seq {} came back but was never an intact record", r.seq);
            };
            assert!(
                r.seq > m.acked_through,
                "seq {} reappeared below the acknowledged point",
                r.seq
            );
            assert!(
                rec.0 == r.topic && rec.1 == r.payload,
                "seq {} came back changed",
                r.seq
            );
            m.unacked.insert(r.seq, rec);
            back += 1;
        }
        if back > 0 {
            self.trace
                .push(format!("{back} acknowledged records came back"));
        }
        self.check(j, true);
    }
}

fn run_case(case: &mut Case) {
    let (mut j, report) = case.open();
    assert_eq!(report, OpenReport::default());
    let steps = 40 + case.rng.usize(..80);
    for _ in 0..steps {
        match case.rng.usize(..20) {
            0..=9 => case.append(&mut j),
            10..=12 => case.trim(&mut j),
            13 => case.save(&j),
            14..=16 => j = case.restart(j),
            _ => {
                case.trace.push("read".into());
                case.check(&j, true);
                continue;
            }
        }
        case.check(&j, false);
    }
    j = case.restart(j);
    // The sequence goes on above everything ever issued, whatever the restarts did.
    case.append(&mut j);
    case.check(&j, true);
}

fn scratch_dir() -> tempfile::TempDir {
    // The model is about contents, not durability: a RAM disk spares a loaded machine the
    // fsyncs of thousands of restarts.
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        tempfile::tempdir_in(shm).unwrap()
    } else {
        tempfile::tempdir().unwrap()
    }
}

#[test]
fn the_journal_matches_its_model_through_appends_acks_drops_restarts_and_corruption() {
    let one: Option<u64> = std::env::var("JOURNAL_MODEL_SEED").ok().map(|s| {
        s.parse()
            .unwrap_or_else(|_| panic!("JOURNAL_MODEL_SEED={s:?} is not a number"))
    });
    let cases: u64 = std::env::var("JOURNAL_MODEL_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(300);
    let base = fastrand::u64(..u64::MAX / 2);
    let seeds: Vec<u64> = match one {
        Some(seed) => vec![seed],
        None => (0..cases).map(|i| base + i).collect(),
    };
    eprintln!(
        "journal model: {} cases from seed {}",
        seeds.len(),
        seeds[0]
    );
    for seed in seeds {
        let dir = scratch_dir();
        let mut case = Case::new(seed, dir.path().join("journal"));
        let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| run_case(&mut case)));
        if let Err(panic) = outcome {
            let tail = case.trace.len().saturating_sub(40);
            eprintln!(
                "journal model case failed; replay it with JOURNAL_MODEL_SEED={seed}\nlast steps:\n  {}",
                case.trace[tail..].join("\n  ")
            );
            std::panic::resume_unwind(panic);
        }
    }
}
