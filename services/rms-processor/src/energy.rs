//! Energy counters per channel, integrated from power and kept on disk across restarts
//! (std only: no tokio).
//!
//! Each channel has two counters that only ever grow, like a meter's registers: imported Wh
//! (power > 0) and exported Wh (power < 0, e.g. a solar inverter feeding back). A counter
//! that went down would look like a huge negative consumption to every dashboard that takes a
//! difference, so the only way down is [`Energy::reset`]: explicit, logged by the caller,
//! counted in `resets`, and dated in `since_ms` so a dashboard can tell.
//!
//! The file is written whole to `<file>.tmp`, fsynced and renamed over the old one, so a
//! power cut leaves either the old or the new state, never half of one. How often to save is
//! the caller's choice (SD-card wear against what a power cut can take).
//!
//! A file that exists but cannot be read is an error naming the file: starting again from
//! zero would silently break the counters' monotonicity. The JSON is followed by a line
//! `crc32 <8 hex digits>` over everything before it, so that a flipped bit or a hand edit is
//! that error too rather than believed: a mark moved decades ahead had every later sample of
//! its device skipped as already counted, and a counter edited down went down without a reset
//! (hostile review). Files of version 1 (before the checksum) are read once and rewritten.
//!
//! While an [`Energy`] is loaded it holds an exclusive lock on `<file>.lock`: a running
//! processor would overwrite a counter reset from outside (`wattbus energy reset`) at its next
//! save, and two processors sharing one file would each overwrite the other's counts.
//!
//! The file also holds, per device, the time up to which samples have been counted (the
//! *mark*). Counters and marks are saved together, in one atomic write, so after a crash the
//! processor knows exactly which replayed samples the counters already hold: those before the
//! mark are skipped, those after it are counted again from the saved counters. That is what
//! makes a replay neither double-count nor lose energy.
//!
//! And it holds the **outbox**: the readings computed from the samples the marks cover that
//! may not be journaled yet. The processor saves the file *before* it journals those readings
//! (see the processor's checkpoint), so the counters a stored reading shows are always saved,
//! whenever the process dies: a counter never resumes below a stored reading (which would read
//! as a reset on a dashboard), even when the frames after the mark are gone for good. After a
//! restart the outbox is journaled again; a reading journaled twice is the same reading twice,
//! which sinks store once.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};

use proto::Measurement;
use serde::{Deserialize, Serialize};

/// One channel's counters.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Counters {
    pub import_wh: f64,
    pub export_wh: f64,
    /// How many times the counters were reset.
    pub resets: u32,
    /// When counting started (Unix ms): the first reading, or the last reset.
    pub since_ms: i64,
}

#[derive(Debug, thiserror::Error)]
pub enum EnergyError {
    #[error("cannot read the energy counters in {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error(
        "the energy counters in {path} are damaged ({reason}); move the file away to start \
         from zero, knowingly"
    )]
    Damaged { path: PathBuf, reason: String },
    #[error("cannot save the energy counters to {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
    #[error(
        "the energy counters in {path} are in use by another process (a running rms-processor?); \
         stop it first"
    )]
    Locked { path: PathBuf },
}

/// The file's version: 2 has the checksum line.
const VERSION: u32 = 2;

#[derive(Debug, Default, Serialize, Deserialize)]
struct File {
    version: u32,
    channels: BTreeMap<String, Counters>,
    /// Per device: samples up to this time (Unix µs) are in the counters.
    #[serde(default)]
    marks: BTreeMap<String, i64>,
    /// Readings of counted samples that may not be journaled yet (see the module doc).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    outbox: Vec<Measurement>,
    /// Per device: the producer (instance) whose frames it takes (see the processor).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    owners: BTreeMap<String, String>,
}

/// Energy counters of every channel of one processor, and their file.
#[derive(Debug)]
pub struct Energy {
    path: PathBuf,
    /// Held while loaded (see the module doc).
    _lock: fs::File,
    channels: BTreeMap<String, Counters>,
    marks: BTreeMap<String, i64>,
    outbox: Vec<Measurement>,
    owners: BTreeMap<String, String>,
    dirty: bool,
}

impl Energy {
    /// Load the counters (none yet if the file does not exist).
    pub fn load(path: &Path) -> Result<Self, EnergyError> {
        let lock = lock(path)?;
        let mut legacy = false;
        let (channels, marks, outbox, owners) = match fs::read(path) {
            Ok(bytes) => {
                let damaged = |reason: String| EnergyError::Damaged {
                    path: path.to_path_buf(),
                    reason,
                };
                let (json, checked) = runtime::state::split_checksum(&bytes).map_err(damaged)?;
                let f: File = serde_json::from_slice(json).map_err(|e| damaged(e.to_string()))?;
                if !checked {
                    if f.version >= VERSION {
                        return Err(damaged(
                            "its last line is not its checksum (crc32 <8 hex digits>)".into(),
                        ));
                    }
                    legacy = true;
                }
                if let Some((k, _)) = f.channels.iter().find(|(_, c)| {
                    !(c.import_wh.is_finite()
                        && c.export_wh.is_finite()
                        && c.import_wh >= 0.0
                        && c.export_wh >= 0.0)
                }) {
                    return Err(EnergyError::Damaged {
                        path: path.to_path_buf(),
                        reason: format!("channel {k:?} holds a negative or non-finite counter"),
                    });
                }
                (f.channels, f.marks, f.outbox, f.owners)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => (
                BTreeMap::new(),
                BTreeMap::new(),
                Vec::new(),
                BTreeMap::new(),
            ),
            Err(source) => {
                return Err(EnergyError::Read {
                    path: path.to_path_buf(),
                    source,
                });
            }
        };
        Ok(Self {
            path: path.to_path_buf(),
            _lock: lock,
            channels,
            marks,
            outbox,
            owners,
            // A file without its checksum is written again, with it, at the next save.
            dirty: legacy,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Samples of `device` up to this time (Unix µs) are counted.
    pub fn mark(&self, device: &str) -> Option<i64> {
        self.marks.get(device).copied()
    }

    /// Record that `device`'s samples up to `through_us` are counted. Saved with the counters.
    pub fn set_mark(&mut self, device: &str, through_us: i64) {
        if self.marks.get(device) != Some(&through_us) {
            self.marks.insert(device.to_string(), through_us);
            self.dirty = true;
        }
    }

    /// The producer whose frames `device` takes, if one was recorded.
    pub fn owner(&self, device: &str) -> Option<&str> {
        self.owners.get(device).map(String::as_str)
    }

    /// Record that `device` takes the frames of `producer`. Saved with the counters.
    pub fn set_owner(&mut self, device: &str, producer: &str) {
        if self.owner(device) != Some(producer) {
            self.owners.insert(device.to_string(), producer.to_string());
            self.dirty = true;
        }
    }

    /// Readings to be saved with the counters, replacing those saved before: the readings the
    /// counters and marks hold that are not known to be journaled.
    pub fn set_outbox(&mut self, readings: &[Measurement]) {
        if self.outbox != readings {
            self.outbox = readings.to_vec();
            self.dirty = true;
        }
    }

    /// The saved outbox, to journal again after a restart (see the module doc).
    pub fn outbox(&self) -> &[Measurement] {
        &self.outbox
    }

    /// Integrate `power_w` over `dt_s` seconds into `channel`; returns its counters.
    /// Non-finite or negative durations add nothing, and neither does a sum that would no
    /// longer be a finite number: a counter saved as infinite would make the file unreadable,
    /// and the processor refuses to start on an unreadable file.
    pub fn add(&mut self, channel: &str, power_w: f64, dt_s: f64, now_ms: i64) -> Counters {
        let c = counters(&mut self.channels, channel, now_ms);
        if power_w.is_finite() && dt_s.is_finite() && dt_s > 0.0 {
            let wh = power_w * dt_s / 3600.0;
            let (import, export) = if wh >= 0.0 {
                (c.import_wh + wh, c.export_wh)
            } else {
                (c.import_wh, c.export_wh - wh)
            };
            if import.is_finite() && export.is_finite() {
                c.import_wh = import;
                c.export_wh = export;
                self.dirty = true;
            }
        }
        *c
    }

    pub fn get(&self, channel: &str) -> Option<Counters> {
        self.channels.get(channel).copied()
    }

    /// Start `channel` again from zero, visibly: `resets` goes up and `since_ms` moves.
    pub fn reset(&mut self, channel: &str, now_ms: i64) -> Counters {
        let c = counters(&mut self.channels, channel, now_ms);
        c.import_wh = 0.0;
        c.export_wh = 0.0;
        c.resets += 1;
        c.since_ms = now_ms;
        self.dirty = true;
        *c
    }

    /// Write the file if anything changed since the last save (blocking: fsync).
    pub fn save(&mut self) -> Result<(), EnergyError> {
        match self.snapshot()? {
            Some(s) => {
                s.write()?;
                self.saved();
                Ok(())
            }
            None => Ok(()),
        }
    }

    /// What [`Energy::save`] would write, to write elsewhere (an async caller writes it on a
    /// blocking thread: an fsync on an SD card can take long); `None` if nothing changed.
    /// Call [`Energy::saved`] once it is written, with no change in between.
    pub fn snapshot(&self) -> Result<Option<Snapshot>, EnergyError> {
        if !self.dirty {
            return Ok(None);
        }
        let mut body = serde_json::to_vec_pretty(&File {
            version: VERSION,
            channels: self.channels.clone(),
            marks: self.marks.clone(),
            outbox: self.outbox.clone(),
            owners: self.owners.clone(),
        })
        .map_err(|e| EnergyError::Write {
            path: self.path.clone(),
            source: io::Error::other(e),
        })?;
        body.push(b'\n');
        runtime::state::append_checksum(&mut body);
        Ok(Some(Snapshot {
            path: self.path.clone(),
            body,
        }))
    }

    /// The last snapshot is on disk.
    pub fn saved(&mut self) {
        self.dirty = false;
    }
}

/// The file's content at one moment, to be written whole.
#[derive(Debug)]
pub struct Snapshot {
    path: PathBuf,
    body: Vec<u8>,
}

impl Snapshot {
    /// Write to `<file>.tmp`, fsync, rename over the file, fsync the directory. The file holds
    /// readings (the outbox): it is created 0600 in a 0700 directory.
    pub fn write(self) -> Result<(), EnergyError> {
        let err = |source| EnergyError::Write {
            path: self.path.clone(),
            source,
        };
        if let Some(dir) = self.path.parent() {
            private_dir(dir).map_err(err)?;
        }
        let tmp = self.path.with_extension("tmp");
        let write = || -> io::Result<()> {
            let mut f = private_file(&tmp)?;
            f.write_all(&self.body)?;
            f.sync_all()?;
            fs::rename(&tmp, &self.path)?;
            if let Some(dir) = self.path.parent()
                && let Ok(d) = fs::File::open(dir)
            {
                d.sync_all()?;
            }
            Ok(())
        };
        write().map_err(err)
    }
}

/// Create `dir` (and its parents) 0700 if missing.
fn private_dir(dir: &Path) -> io::Result<()> {
    let mut b = fs::DirBuilder::new();
    b.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut b, 0o700);
    b.create(dir)
}

/// Create (or truncate) `path` for writing, 0600.
fn private_file(path: &Path) -> io::Result<fs::File> {
    let mut o = fs::OpenOptions::new();
    o.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut o, 0o600);
    o.open(path)
}

/// Take `<path>.lock`, or say that someone else has it.
fn lock(path: &Path) -> Result<fs::File, EnergyError> {
    let lock_path = path.with_extension("lock");
    let read_err = |source| EnergyError::Read {
        path: lock_path.clone(),
        source,
    };
    if let Some(dir) = path.parent() {
        private_dir(dir).map_err(read_err)?;
    }
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(read_err)?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(fs::TryLockError::WouldBlock) => Err(EnergyError::Locked {
            path: path.to_path_buf(),
        }),
        Err(fs::TryLockError::Error(e)) => Err(read_err(e)),
    }
}

/// Channels whose counters are kept, for a person choosing one to reset.
impl Energy {
    pub fn channels(&self) -> impl Iterator<Item = (&str, &Counters)> {
        self.channels.iter().map(|(k, c)| (k.as_str(), c))
    }
}

/// A channel's counters, started at `now_ms` if it has none yet.
fn counters<'a>(
    channels: &'a mut BTreeMap<String, Counters>,
    channel: &str,
    now_ms: i64,
) -> &'a mut Counters {
    channels.entry(channel.to_string()).or_insert(Counters {
        import_wh: 0.0,
        export_wh: 0.0,
        resets: 0,
        since_ms: now_ms,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn import_and_export_only_grow_and_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("energy.json");
        let mut e = Energy::load(&path).unwrap();
        // 1 kW for an hour in 1 s steps, then 500 W exported for 30 minutes.
        for _ in 0..3600 {
            e.add("meter/main", 1000.0, 1.0, 1_764_000_000_000);
        }
        for _ in 0..1800 {
            e.add("meter/main", -500.0, 1.0, 1_764_000_000_000);
        }
        let c = e.get("meter/main").unwrap();
        assert!((c.import_wh - 1000.0).abs() < 1e-6, "{c:?}");
        assert!((c.export_wh - 250.0).abs() < 1e-6, "{c:?}");
        e.save().unwrap();
        drop(e); // a restart: the process that held the file is gone
        let mut again = Energy::load(&path).unwrap();
        assert_eq!(again.get("meter/main"), Some(c));
        let next = again.add("meter/main", 3600.0, 1.0, 1_764_000_001_000);
        assert!((next.import_wh - 1001.0).abs() < 1e-6);
        // Garbage durations and powers add nothing, nor does a sum past what f64 holds.
        let same = again.add("meter/main", f64::NAN, 1.0, 0);
        let same2 = again.add("meter/main", 100.0, -5.0, 0);
        let same3 = again.add("meter/main", f64::MAX, 1e10, 0);
        assert_eq!(same, next);
        assert_eq!(same2, next);
        assert_eq!(same3, next);
        again.save().unwrap();
        drop(again);
        assert_eq!(Energy::load(&path).unwrap().get("meter/main"), Some(next));
    }

    #[test]
    fn marks_are_saved_with_the_counters() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("energy.json");
        let mut e = Energy::load(&path).unwrap();
        e.add("prime-1/ct1", 100.0, 36.0, 1);
        e.set_mark("prime-1", 1_764_000_000_123_456);
        e.save().unwrap();
        drop(e);
        let again = Energy::load(&path).unwrap();
        assert_eq!(again.mark("prime-1"), Some(1_764_000_000_123_456));
        assert_eq!(again.mark("prime-2"), None);
        assert!((again.get("prime-1/ct1").unwrap().import_wh - 1.0).abs() < 1e-9);
    }

    #[test]
    fn the_outbox_is_saved_with_the_counters_and_survives_a_reset() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("energy.json");
        let reading: Measurement = serde_json::from_str(
            r#"{"site":"home","device":"ct-1","channel":"ct1","measurement":"power","ts_ms":1764000001000,"quality":"good","fields":{"energy_import_wh":0.25}}"#,
        )
        .unwrap();
        let mut e = Energy::load(&path).unwrap();
        e.add("ct-1/ct1", 900.0, 1.0, 1_764_000_001_000);
        e.set_mark("ct-1", 1_764_000_001_000_000);
        e.set_outbox(std::slice::from_ref(&reading));
        e.save().unwrap();
        drop(e);
        let mut again = Energy::load(&path).unwrap();
        assert_eq!(again.outbox(), std::slice::from_ref(&reading));
        // `wattbus energy reset` loads and saves the file: what waits to be journaled stays.
        again.reset("ct-1/ct1", 1_764_000_002_000);
        again.save().unwrap();
        drop(again);
        let mut third = Energy::load(&path).unwrap();
        assert_eq!(third.outbox().len(), 1);
        third.set_outbox(&[]);
        third.save().unwrap();
        drop(third);
        assert!(Energy::load(&path).unwrap().outbox().is_empty());
        assert!(!fs::read_to_string(&path).unwrap().contains("outbox"));
    }

    #[cfg(unix)]
    #[test]
    fn the_file_holds_readings_so_only_its_owner_reads_it() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state/energy.json");
        let mut e = Energy::load(&path).unwrap();
        e.add("a", 1.0, 1.0, 0);
        e.save().unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(path.parent().unwrap()), 0o700);
    }

    #[test]
    fn a_second_holder_is_refused_while_the_first_has_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("energy.json");
        let first = Energy::load(&path).unwrap();
        let e = Energy::load(&path).unwrap_err().to_string();
        assert!(e.contains("in use by another process"), "{e}");
        drop(first);
        assert!(
            Energy::load(&path).is_ok(),
            "free again once the first is gone"
        );
    }

    #[test]
    fn a_reset_is_explicit_and_visible() {
        let dir = tempfile::tempdir().unwrap();
        let mut e = Energy::load(&dir.path().join("energy.json")).unwrap();
        e.add("a", 100.0, 36.0, 1);
        let c = e.reset("a", 2_000);
        assert_eq!(
            (c.import_wh, c.export_wh, c.resets, c.since_ms),
            (0.0, 0.0, 1, 2_000)
        );
    }

    #[test]
    fn a_damaged_file_is_an_error_not_a_silent_zero() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("energy.json");
        fs::write(&path, b"{\"version\":1,\"chann").unwrap();
        let e = Energy::load(&path).unwrap_err().to_string();
        assert!(e.contains("energy.json") && e.contains("damaged"), "{e}");
        fs::write(
            &path,
            br#"{"version":1,"channels":{"a":{"import_wh":-5,"export_wh":0,"resets":0,"since_ms":0}}}"#,
        )
        .unwrap();
        let e = Energy::load(&path).unwrap_err().to_string();
        assert!(e.contains("negative"), "{e}");
    }

    #[test]
    fn one_changed_digit_is_damage_not_a_new_mark_or_a_lower_counter() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("energy.json");
        {
            let mut e = Energy::load(&path).unwrap();
            e.add("ct-1/l1", 9030.0, 3600.0, 0);
            e.set_mark("ct-1", 1_796_295_900_407_000);
            e.save().unwrap();
        }
        let good = fs::read_to_string(&path).unwrap();
        assert!(good.lines().last().unwrap().starts_with("crc32 "), "{good}");
        for (from, to) in [
            ("1796295900407000", "2796295900407000"),
            ("\"import_wh\": 9030.0", "\"import_wh\": 1030.0"),
        ] {
            assert!(good.contains(from), "{from} not in {good}");
            fs::write(&path, good.replace(from, to)).unwrap();
            let e = Energy::load(&path).unwrap_err().to_string();
            assert!(e.contains("energy.json") && e.contains("checksum"), "{e}");
        }
        // Without its checksum line a version-2 file is damaged too.
        let stripped: String = good.lines().filter(|l| !l.starts_with("crc32")).collect();
        fs::write(&path, stripped).unwrap();
        let e = Energy::load(&path).unwrap_err().to_string();
        assert!(e.contains("checksum"), "{e}");
        fs::write(&path, &good).unwrap();
        let mut e = Energy::load(&path).unwrap();
        assert_eq!(e.mark("ct-1"), Some(1_796_295_900_407_000));
        e.set_owner("ct-1", "serial-ingest");
        e.save().unwrap();
        drop(e);
        let e = Energy::load(&path).unwrap();
        assert_eq!(e.owner("ct-1"), Some("serial-ingest"));
        assert_eq!(e.get("ct-1/l1").unwrap().import_wh, 9030.0);
    }

    #[test]
    fn a_file_from_before_the_checksum_is_read_and_rewritten_with_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("energy.json");
        fs::write(
            &path,
            br#"{"version":1,"channels":{"a":{"import_wh":5,"export_wh":0,"resets":1,"since_ms":7}},"marks":{"d":42}}"#,
        )
        .unwrap();
        let mut e = Energy::load(&path).unwrap();
        assert_eq!(e.get("a").unwrap().import_wh, 5.0);
        assert_eq!(e.mark("d"), Some(42));
        e.save().unwrap();
        drop(e);
        let text = fs::read_to_string(&path).unwrap();
        assert!(text.lines().last().unwrap().starts_with("crc32 "), "{text}");
        let e = Energy::load(&path).unwrap();
        assert_eq!(e.get("a").unwrap().resets, 1);
    }

    #[test]
    fn saving_leaves_no_temporary_file_and_skips_when_unchanged() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state/energy.json");
        let mut e = Energy::load(&path).unwrap();
        e.save().unwrap();
        assert!(!path.exists(), "nothing to save yet");
        e.add("a", 1.0, 1.0, 0);
        e.save().unwrap();
        assert!(path.exists());
        assert!(!path.with_extension("tmp").exists());
    }
}
