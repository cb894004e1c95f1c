//! Energy counters per plug that only grow, across plug reboots and bridge restarts (std
//! only: no tokio, no clock).
//!
//! A plug counts energy itself, but its counter is not one a dashboard can take differences
//! of: myStrom's `energy_since_boot` starts again at 0 on every power-on (its `boot_id`
//! changes), Shelly Gen1 plugs lose theirs on a power loss (home-assistant/core #77496), and a
//! counter that goes down reads as a new meter in Home Assistant and as negative consumption
//! in Grafana. So the bridge publishes its own counter: the plug's, plus an **offset** that
//! grows by what the plug had counted each time the plug's counter starts again.
//!
//! When does it start again? myStrom says so (`boot_id`). For Shelly and Tasmota only a
//! decrease tells: their counters are lifetime totals that survive reboots on current
//! firmware, and guessing a reboot from uptime and the wall clock would, after a clock jump,
//! add a plug's whole history a second time. A counter that restarts and grows past its old
//! value while the bridge is not looking is missed (energy under-counted, never doubled).
//!
//! Across bridge restarts the offsets live in a file. Saving at every poll (each second)
//! would wear an SD card out, so the bridge keeps a **ceiling**: a value no counter it
//! published exceeds, saved *before* a counter above it is published, and raised by
//! `margin_wh` at a time (so saves follow consumption, one per `margin_wh`, not the poll
//! rate). After a crash the bridge does not know the last counter it published, only that it
//! was at most the ceiling; if the plug's counter then starts again, the counter continues
//! from the ceiling: at most `margin_wh` too high, never lower than a stored reading. A clean
//! stop saves the exact value, so a restart is exact.
//!
//! After a crash the bridge also does not know whether a Shelly's counter restarted and grew
//! past the value last saved; so until the plug's counter passes the ceiling, the counter is
//! held at the ceiling: flat for a while, never below a stored reading, exact again after.
//!
//! What the counter refuses (the sample changes nothing, the reading goes out without
//! `energy_wh`): a jump faster than a plug can draw ([`MAX_PLUG_W`]), a boot id that comes
//! back after another (two plugs answering at one address), values no counter can have. A dip
//! that is not a fall to well below the last value is noise, held at the last value rather
//! than taken for a restart (which would count the whole history twice). Another kind of plug
//! under the same id (a plug replaced) continues the counter.
//!
//! A reset is the only way down: explicit, counted in `resets`, dated in `since_ms`
//! ([`PlugEnergy::reset`]; no command offers it yet: until then, stop the bridge and move the file
//! away).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Which power-on of a plug its counter counts from, where the plug says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Boot {
    /// myStrom's `boot_id`.
    Id(String),
    /// The plug does not say (Shelly, Tasmota): only a decrease means a restart.
    Unknown,
}

/// One sample of a plug's own counter.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub boot: Boot,
    pub total_wh: f64,
}

/// Why the plug's counter was taken to start again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Restart {
    /// It says it booted (a new `boot_id`).
    Reboot,
    /// Its counter fell to well below its last value.
    Decrease,
    /// Another kind of plug answers under this id (a plug replaced).
    Replaced,
}

/// What a sample gave.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Step {
    /// The bridge's counter to publish (Wh).
    pub energy_wh: f64,
    pub restart: Option<Restart>,
    /// The file must be saved before `energy_wh` is published (it passed the ceiling).
    pub save_first: bool,
}

/// Why a sample was refused (nothing changed).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SampleError {
    #[error("the plug's energy counter reads {0}, which no counter can")]
    Impossible(f64),
    #[error(
        "the plug's energy counter jumped by {jump_wh:.1} Wh in {secs:.0} s, more than a plug \
         can draw ({MAX_PLUG_W} W): a garbled answer, not counted"
    )]
    TooFast { jump_wh: f64, secs: f64 },
    #[error(
        "the plug answers with boot id {0:?} again, after another one: two plugs answering at \
         one address? Not counted until it is one plug"
    )]
    BootFlip(String),
}

/// No plug draws more than this (a 16 A outlet at 240 V is 3.8 kW; three-phase plugs and
/// meters go elsewhere). A counter that grows faster is a garbled answer.
pub const MAX_PLUG_W: f64 = 10_000.0;

/// The bridge's counter never passes this (Wh; 10 MW for 100 years is less): beyond, a sample
/// is refused, so the file always loads again.
const MAX_COUNTER_WH: f64 = 1e12;

/// A plug's counter is taken to have started again when it falls below this fraction of its
/// last value (Shelly and Tasmota fall to about zero); a smaller dip is noise (a rounding, a
/// correction), held at the last value rather than counted twice.
const RESTART_BELOW: f64 = 0.5;

/// Boot ids remembered per plug, so one that comes back is seen as what it is.
const BOOTS_REMEMBERED: usize = 8;

/// One plug's counter as saved.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlugCounter {
    /// What earlier runs of the plug's own counter counted (Wh).
    pub offset_wh: f64,
    /// The plug's own counter at the last sample, and the boot it was in.
    pub last_raw_wh: f64,
    pub boot: Option<Boot>,
    /// Boot ids seen before the current one (myStrom), newest last.
    #[serde(default)]
    pub earlier_boots: Vec<String>,
    /// When the last sample was taken (Unix ms; 0: none yet).
    #[serde(default)]
    pub last_ms: i64,
    /// No published counter exceeds this (see the module doc).
    pub ceiling_wh: f64,
    /// Times the plug's counter started again (reboots, decreases).
    pub restarts: u32,
    /// Explicit resets.
    pub resets: u32,
    /// When counting started: the first sample, or the last reset (Unix ms).
    pub since_ms: i64,
    /// The highest counter published, exactly, while this process runs (after a load: not
    /// known, the ceiling stands in).
    #[serde(skip)]
    published_wh: Option<f64>,
    /// Before the last fall taken as a restart: the plug's counter and the offset then. A
    /// sample that comes back to it (the fall was one garbled answer) undoes the restart,
    /// rather than counting the plug's whole total a second time.
    #[serde(skip)]
    before_fall: Option<(f64, f64, i64)>,
    /// Samples refused in a row as growing too fast, and the last of them: a plug whose
    /// counter stays where it jumped to (a used plug put in, a counter set by hand) is taken
    /// to have started again there, never counted as consumption.
    #[serde(skip)]
    jumped: Option<(u32, f64)>,
}

/// Refused jumps in a row, each consistent with the one before, after which the plug's
/// counter is taken to have started again where it jumped to.
const JUMPS_TO_REBASE: u32 = 5;

/// A fall is undone by a sample back at the old value only this soon after it (a real
/// restart's counter, growing from zero, must not be taken for the old one coming back).
const UNDO_FALL_MS: i64 = 120_000;

impl PlugCounter {
    fn new(now_ms: i64) -> Self {
        Self {
            offset_wh: 0.0,
            last_raw_wh: 0.0,
            boot: None,
            earlier_boots: Vec::new(),
            last_ms: 0,
            ceiling_wh: 0.0,
            restarts: 0,
            resets: 0,
            since_ms: now_ms,
            published_wh: Some(0.0),
            before_fall: None,
            jumped: None,
        }
    }

    /// The lowest value the counter may take next: what was (or, after a crash, may have
    /// been) published.
    fn floor(&self) -> f64 {
        self.published_wh.unwrap_or(self.ceiling_wh)
    }

    /// Take a sample of the plug's counter at `now_ms`. A refused sample changes nothing.
    pub fn observe(
        &mut self,
        s: &Sample,
        margin_wh: f64,
        now_ms: i64,
    ) -> Result<Step, SampleError> {
        if !s.total_wh.is_finite() || s.total_wh < 0.0 || s.total_wh > MAX_COUNTER_WH {
            return Err(SampleError::Impossible(s.total_wh));
        }
        let kind_changed = matches!(
            (&self.boot, &s.boot),
            (Some(Boot::Id(_)), Boot::Unknown) | (Some(Boot::Unknown), Boot::Id(_))
        );
        let new_boot = match (&self.boot, &s.boot) {
            (Some(Boot::Id(old)), Boot::Id(new)) if old != new => {
                if self.earlier_boots.iter().any(|b| b == new) {
                    return Err(SampleError::BootFlip(new.clone()));
                }
                true
            }
            _ => false,
        };
        let dropped = self.boot.is_some()
            && !kind_changed
            && !new_boot
            && s.total_wh < self.last_raw_wh * RESTART_BELOW;
        let dipped = self.boot.is_some()
            && !kind_changed
            && !new_boot
            && !dropped
            && s.total_wh < self.last_raw_wh;
        // How fast it grew since the last sample, within one run of the plug's counter.
        let mut rebase = false;
        if self.boot.is_some() && !kind_changed && !new_boot && !dropped && self.last_ms > 0 {
            let secs = ((now_ms - self.last_ms) as f64 / 1000.0).max(0.0);
            let allowed = |from: f64| s.total_wh - from <= MAX_PLUG_W * (secs + 60.0) / 3600.0;
            let jump_wh = s.total_wh - self.last_raw_wh;
            // Back, soon, to where it was before a fall: the fall was a garbled answer.
            if let Some((raw, offset, at)) = self.before_fall
                && now_ms - at <= UNDO_FALL_MS
                && s.total_wh >= raw
                && allowed(raw)
            {
                self.offset_wh = offset;
                self.last_raw_wh = raw;
                self.before_fall = None;
                self.restarts = self.restarts.saturating_sub(1);
            } else if !allowed(self.last_raw_wh) {
                let consistent = self
                    .jumped
                    .is_some_and(|(_, at)| s.total_wh >= at && allowed(at));
                let n = if consistent {
                    self.jumped.map_or(1, |(n, _)| n + 1)
                } else {
                    1
                };
                if n < JUMPS_TO_REBASE {
                    self.jumped = Some((n, s.total_wh));
                    return Err(SampleError::TooFast { jump_wh, secs });
                }
                rebase = true;
            }
        }
        self.jumped = None;
        let restart = if new_boot {
            Some(Restart::Reboot)
        } else if dropped {
            Some(Restart::Decrease)
        } else {
            None
        };
        let mut offset = self.offset_wh;
        if kind_changed || rebase {
            // Another kind of plug under this id (replaced): continue from where the counter
            // was, not from the new plug's lifetime total.
            offset = self.floor() - s.total_wh;
        } else if restart.is_some() {
            offset = (self.offset_wh + self.last_raw_wh).max(self.floor());
        }
        // A dip is held at the last value: neither counted twice nor taken back.
        let raw = if dipped { self.last_raw_wh } else { s.total_wh };
        // Never below what was (or may have been) published.
        let energy_wh = (offset + raw).max(self.floor());
        if energy_wh > MAX_COUNTER_WH {
            return Err(SampleError::Impossible(energy_wh));
        }
        if restart == Some(Restart::Decrease) {
            self.before_fall = Some((self.last_raw_wh, self.offset_wh, now_ms));
        } else if restart.is_some() || kind_changed || rebase {
            self.before_fall = None;
        }
        self.offset_wh = offset;
        if restart.is_some() || kind_changed || rebase {
            self.restarts = self.restarts.saturating_add(1);
        }
        if new_boot && let Some(Boot::Id(old)) = self.boot.take() {
            self.earlier_boots.push(old);
            if self.earlier_boots.len() > BOOTS_REMEMBERED {
                self.earlier_boots.remove(0);
            }
        }
        self.boot = Some(s.boot.clone());
        self.last_raw_wh = raw;
        self.last_ms = now_ms;
        let save_first = energy_wh > self.ceiling_wh;
        if save_first {
            self.ceiling_wh = energy_wh + margin_wh.max(0.0);
        }
        self.published_wh = Some(energy_wh);
        Ok(Step {
            energy_wh,
            restart: if kind_changed || rebase {
                Some(Restart::Replaced)
            } else {
                restart
            },
            save_first,
        })
    }

    /// Start again from zero (the next sample continues from there).
    fn reset(&mut self, now_ms: i64) {
        self.offset_wh = -self.last_raw_wh;
        self.ceiling_wh = 0.0;
        self.published_wh = Some(0.0);
        self.resets = self.resets.saturating_add(1);
        self.since_ms = now_ms;
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PlugEnergyError {
    #[error("cannot read the plug energy counters in {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "the plug energy counters in {path} are damaged ({reason}); move the file away to start \
         from zero, knowingly"
    )]
    Damaged { path: PathBuf, reason: String },
    #[error("cannot save the plug energy counters to {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "the plug energy counters in {path} are in use by another process (another plug-bridge \
         with the same energy_file?); each needs its own"
    )]
    Locked { path: PathBuf },
}

const VERSION: u32 = 1;

#[derive(Debug, Serialize, Deserialize)]
struct File {
    version: u32,
    plugs: BTreeMap<String, PlugCounter>,
}

/// Every plug's counter, and their file.
#[derive(Debug)]
pub struct PlugEnergy {
    path: PathBuf,
    /// `<file>.lock`, held while loaded: two bridges sharing one file would each overwrite
    /// the other's counters.
    _lock: std::fs::File,
    plugs: BTreeMap<String, PlugCounter>,
    dirty: bool,
    /// The last save failed: every sample asks for a save until one succeeds.
    save_failed: bool,
}

impl PlugEnergy {
    /// Load the counters (none yet if the file does not exist). A file that exists but cannot
    /// be read is an error naming it: starting from zero would break every counter.
    pub fn load(path: &Path) -> Result<Self, PlugEnergyError> {
        let lock = lock(path)?;
        let plugs = match std::fs::read(path) {
            Ok(bytes) => {
                let damaged = |reason: String| PlugEnergyError::Damaged {
                    path: path.to_path_buf(),
                    reason,
                };
                let (json, checked) = runtime::state::split_checksum(&bytes).map_err(damaged)?;
                if !checked {
                    return Err(damaged("it has no checksum line".into()));
                }
                let file: File =
                    serde_json::from_slice(json).map_err(|e| damaged(e.to_string()))?;
                if file.version != VERSION {
                    return Err(damaged(format!(
                        "version {} is not one this wattbus reads",
                        file.version
                    )));
                }
                for (plug, c) in &file.plugs {
                    let ok = [c.offset_wh, c.last_raw_wh, c.ceiling_wh]
                        .iter()
                        .all(|v| v.is_finite() && v.abs() <= MAX_COUNTER_WH * 2.0);
                    if !ok {
                        return Err(damaged(format!("plug {plug:?} has impossible numbers")));
                    }
                }
                file.plugs
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(source) => {
                return Err(PlugEnergyError::Read {
                    path: path.to_path_buf(),
                    source,
                });
            }
        };
        Ok(Self {
            path: path.to_path_buf(),
            _lock: lock,
            plugs,
            dirty: false,
            save_failed: false,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A sample of `plug`'s counter, at `now_ms`.
    pub fn observe(
        &mut self,
        plug: &str,
        s: &Sample,
        margin_wh: f64,
        now_ms: i64,
    ) -> Result<Step, SampleError> {
        let c = self
            .plugs
            .entry(plug.to_string())
            .or_insert_with(|| PlugCounter::new(now_ms));
        let mut step = c.observe(s, margin_wh, now_ms)?;
        self.dirty = true;
        step.save_first |= self.save_failed;
        Ok(step)
    }

    pub fn counter(&self, plug: &str) -> Option<&PlugCounter> {
        self.plugs.get(plug)
    }

    /// Every plug's counter, by plug id.
    pub fn counters(&self) -> impl Iterator<Item = (&str, &PlugCounter)> {
        self.plugs.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// Set `plug`'s counter back to zero; `false` if it has none.
    pub fn reset(&mut self, plug: &str, now_ms: i64) -> bool {
        match self.plugs.get_mut(plug) {
            Some(c) => {
                c.reset(now_ms);
                self.dirty = true;
                true
            }
            None => false,
        }
    }

    /// Save if anything changed. With `exact` (a clean stop) each ceiling comes down to the
    /// counter published last, so a restart continues exactly.
    pub fn save(&mut self, exact: bool) -> Result<(), PlugEnergyError> {
        if exact {
            for c in self.plugs.values_mut() {
                if let Some(p) = c.published_wh
                    && p < c.ceiling_wh
                {
                    c.ceiling_wh = p;
                    self.dirty = true;
                }
            }
        }
        if !self.dirty {
            return Ok(());
        }
        let err = |source| PlugEnergyError::Write {
            path: self.path.clone(),
            source,
        };
        let mut body = serde_json::to_vec_pretty(&File {
            version: VERSION,
            plugs: self.plugs.clone(),
        })
        .map_err(|e| err(std::io::Error::other(e)))?;
        body.push(b'\n');
        runtime::state::append_checksum(&mut body);
        let written = std::fs::create_dir_all(self.path.parent().unwrap_or(Path::new(".")))
            .and_then(|()| runtime::state::replace_file(&self.path, &body));
        self.save_failed = written.is_err();
        written.map_err(err)?;
        self.dirty = false;
        Ok(())
    }
}

/// Take `<path>.lock`, or say that another process has it.
fn lock(path: &Path) -> Result<std::fs::File, PlugEnergyError> {
    let lock_path = path.with_extension("lock");
    let read = |source| PlugEnergyError::Read {
        path: lock_path.clone(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(read)?;
    }
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(read)?;
    match f.try_lock() {
        Ok(()) => Ok(f),
        Err(std::fs::TryLockError::WouldBlock) => Err(PlugEnergyError::Locked {
            path: path.to_path_buf(),
        }),
        Err(std::fs::TryLockError::Error(e)) => Err(read(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(b: &str, wh: f64) -> Sample {
        Sample {
            boot: Boot::Id(b.into()),
            total_wh: wh,
        }
    }

    fn unknown(wh: f64) -> Sample {
        Sample {
            boot: Boot::Unknown,
            total_wh: wh,
        }
    }

    #[test]
    fn a_reboot_continues_the_counter_from_where_it_was() {
        let mut c = PlugCounter::new(0);
        assert_eq!(c.observe(&id("a", 5.0), 10.0, 1).unwrap().energy_wh, 5.0);
        assert_eq!(c.observe(&id("a", 7.5), 10.0, 1).unwrap().energy_wh, 7.5);
        // Rebooted: its counter starts at 0 again, ours goes on.
        let s = c.observe(&id("b", 0.25), 10.0, 1).unwrap();
        assert_eq!((s.energy_wh, s.restart), (7.75, Some(Restart::Reboot)));
        assert_eq!(c.observe(&id("b", 1.0), 10.0, 1).unwrap().energy_wh, 8.5);
        assert_eq!(c.restarts, 1);
    }

    #[test]
    fn without_a_boot_id_only_a_decrease_is_a_restart() {
        let mut c = PlugCounter::new(0);
        c.observe(&unknown(1000.0), 10.0, 1).unwrap();
        assert_eq!(c.observe(&unknown(1000.5), 10.0, 1).unwrap().restart, None);
        let s = c.observe(&unknown(2.0), 10.0, 1).unwrap();
        assert_eq!((s.energy_wh, s.restart), (1002.5, Some(Restart::Decrease)));
    }

    #[test]
    fn the_file_is_saved_only_when_the_counter_passes_its_ceiling() {
        let mut c = PlugCounter::new(0);
        assert!(c.observe(&id("a", 1.0), 10.0, 1).unwrap().save_first);
        assert_eq!(c.ceiling_wh, 11.0);
        for wh in [2.0, 5.0, 10.9, 11.0] {
            assert!(
                !c.observe(&id("a", wh), 10.0, 1).unwrap().save_first,
                "{wh}"
            );
        }
        assert!(c.observe(&id("a", 11.5), 10.0, 1).unwrap().save_first);
        assert_eq!(c.ceiling_wh, 21.5);
    }

    #[test]
    fn after_a_crash_and_a_reboot_the_counter_never_goes_below_a_published_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("plugs.json");
        let mut e = PlugEnergy::load(&path).unwrap();
        let mut published = 0.0f64;
        for wh in [1.0, 3.0] {
            let s = e.observe("p", &id("a", wh), 10.0, 0).unwrap();
            if s.save_first {
                e.save(false).unwrap();
            }
            published = published.max(s.energy_wh);
        }
        // Saved at 1.0 (ceiling 11); published 3.0; then killed (no clean save) while the
        // plug rebooted.
        drop(e);
        let mut e = PlugEnergy::load(&path).unwrap();
        let s = e.observe("p", &id("b", 0.5), 10.0, 0).unwrap();
        assert!(s.energy_wh >= published, "{} < {published}", s.energy_wh);
        assert!(
            s.energy_wh <= published + 10.0 + 0.5,
            "at most a margin high"
        );
        drop(e);
        // The same boot after a crash: held at the ceiling (what may have been published)
        // until the plug's counter passes it, then exact again.
        let mut e = PlugEnergy::load(&path).unwrap();
        let s = e.observe("p", &id("a", 4.0), 10.0, 0).unwrap();
        assert!(
            s.energy_wh >= published && s.energy_wh <= 11.0,
            "{}",
            s.energy_wh
        );
        assert_eq!(
            e.observe("p", &id("a", 12.0), 10.0, 0).unwrap().energy_wh,
            12.0
        );
    }

    #[test]
    fn a_shelly_that_loses_its_total_during_a_crash_never_goes_below_a_published_counter() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("plugs.json");
        let mut e = PlugEnergy::load(&path).unwrap();
        let mut published = 0.0f64;
        for wh in [1.0, 3.0, 4.3] {
            let s = e.observe("p", &unknown(wh), 5.0, 0).unwrap();
            if s.save_first {
                e.save(false).unwrap();
            }
            published = published.max(s.energy_wh);
        }
        drop(e);
        // Killed; the plug lost its total and counted 2.0 since, above the 1.0 last saved.
        let mut e = PlugEnergy::load(&path).unwrap();
        for wh in [2.0, 2.5, 7.0] {
            let s = e.observe("p", &unknown(wh), 5.0, 0).unwrap();
            assert!(s.energy_wh >= published, "{} < {published}", s.energy_wh);
            published = s.energy_wh;
        }
    }

    #[test]
    fn a_dip_is_held_not_counted_twice_and_a_flip_or_a_jump_is_refused() {
        let mut c = PlugCounter::new(0);
        c.observe(&unknown(500.001), 10.0, 1000).unwrap();
        let s = c.observe(&unknown(500.0), 10.0, 2000).unwrap();
        assert_eq!((s.energy_wh, s.restart), (500.001, None));
        assert_eq!(
            c.observe(&unknown(500.5), 10.0, 3000).unwrap().energy_wh,
            500.5
        );
        // Two plugs at one address: boot ids taking turns.
        let mut m = PlugCounter::new(0);
        m.observe(&id("A", 100.0), 10.0, 1000).unwrap();
        m.observe(&id("B", 1.0), 10.0, 2000).unwrap();
        let e = m.observe(&id("A", 100.0), 10.0, 3000).unwrap_err();
        assert!(matches!(e, SampleError::BootFlip(_)), "{e}");
        assert_eq!(
            m.observe(&id("B", 1.5), 10.0, 4000).unwrap().energy_wh,
            101.5
        );
        // A garbled answer: more than a plug can draw in the time.
        let e = m.observe(&id("B", 9.9e11), 10.0, 5000).unwrap_err();
        assert!(matches!(e, SampleError::TooFast { .. }), "{e}");
        assert_eq!(
            m.observe(&id("B", 2.0), 10.0, 6000).unwrap().energy_wh,
            102.0
        );
    }

    #[test]
    fn one_garbled_zero_is_undone_and_a_counter_that_stays_jumped_is_rebased_never_counted() {
        let unknown = |wh: f64| Sample {
            boot: Boot::Unknown,
            total_wh: wh,
        };
        let mut c = PlugCounter::new(0);
        c.observe(&unknown(200.0), 10.0, 1_000).unwrap();
        c.observe(&unknown(200.5), 10.0, 2_000).unwrap();
        // One answer of 0 (a garbled Tasmota Total), then its true value again.
        let held = c.observe(&unknown(0.0), 10.0, 3_000).unwrap();
        assert_eq!(held.restart, Some(Restart::Decrease));
        let back = c.observe(&unknown(201.0), 10.0, 4_000).unwrap();
        assert!(
            (back.energy_wh - 201.0).abs() < 1e-9,
            "counted twice: {back:?}"
        );
        assert_eq!(c.restarts, 0);
        // A real restart that grows past the old value much later is not taken for it.
        c.observe(&unknown(0.0), 10.0, 5_000).unwrap();
        let later = c.observe(&unknown(0.5), 10.0, 6_000).unwrap();
        assert!((later.energy_wh - 201.5).abs() < 1e-9, "{later:?}");
        let much_later = c
            .observe(&unknown(202.0), 10.0, 6_000 + 200 * 3_600_000)
            .unwrap();
        assert!(
            (much_later.energy_wh - 403.0).abs() < 1e-9,
            "{much_later:?}"
        );
        // A counter that jumps and stays there (a used plug put in): refused a few times,
        // then taken as a new start from where the bridge's counter was, never as consumption.
        let mut c = PlugCounter::new(0);
        c.observe(&unknown(100.0), 10.0, 1_000).unwrap();
        let mut at = 2_000;
        for _ in 1..JUMPS_TO_REBASE {
            assert!(matches!(
                c.observe(&unknown(900_000.0), 10.0, at),
                Err(SampleError::TooFast { .. })
            ));
            at += 1_000;
        }
        let rebased = c.observe(&unknown(900_000.0), 10.0, at).unwrap();
        assert_eq!(rebased.restart, Some(Restart::Replaced));
        assert!((rebased.energy_wh - 100.0).abs() < 1e-9, "{rebased:?}");
        let next = c.observe(&unknown(900_001.0), 10.0, at + 1_000).unwrap();
        assert!((next.energy_wh - 101.0).abs() < 1e-9, "{next:?}");
    }

    #[test]
    fn a_plug_replaced_by_another_kind_continues_the_counter() {
        let mut c = PlugCounter::new(0);
        c.observe(&id("A", 2.0), 10.0, 1000).unwrap();
        let s = c.observe(&unknown(5000.0), 10.0, 2000).unwrap();
        assert_eq!((s.energy_wh, s.restart), (2.0, Some(Restart::Replaced)));
        assert_eq!(
            c.observe(&unknown(5001.0), 10.0, 3000).unwrap().energy_wh,
            3.0
        );
    }

    #[test]
    fn a_failed_save_is_tried_again_at_every_sample_and_a_second_process_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub").join("plugs.json");
        let mut e = PlugEnergy::load(&path).unwrap();
        let err = PlugEnergy::load(&path).unwrap_err().to_string();
        assert!(err.contains("in use"), "{err}");
        e.observe("p", &id("a", 1.0), 10.0, 0).unwrap();
        // The directory made unwritable: the save fails, the next samples ask again.
        std::fs::remove_dir_all(dir.path().join("sub")).unwrap();
        std::fs::write(dir.path().join("sub"), "a file in the way").unwrap();
        assert!(e.save(false).is_err());
        assert!(e.observe("p", &id("a", 1.5), 10.0, 0).unwrap().save_first);
        std::fs::remove_file(dir.path().join("sub")).unwrap();
        e.save(false).unwrap();
        assert!(!e.observe("p", &id("a", 1.6), 10.0, 0).unwrap().save_first);
    }

    #[test]
    fn a_clean_stop_makes_a_restart_exact() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("plugs.json");
        let mut e = PlugEnergy::load(&path).unwrap();
        e.observe("p", &id("a", 1.0), 10.0, 0).unwrap();
        e.observe("p", &id("a", 3.0), 10.0, 0).unwrap();
        e.save(true).unwrap();
        drop(e);
        let mut e = PlugEnergy::load(&path).unwrap();
        let s = e.observe("p", &id("b", 0.5), 10.0, 0).unwrap();
        assert_eq!(s.energy_wh, 3.5);
    }

    #[test]
    fn damage_and_nonsense_are_refused_and_a_reset_is_the_only_way_down() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("plugs.json");
        let mut e = PlugEnergy::load(&path).unwrap();
        assert!(e.observe("p", &id("a", f64::NAN), 10.0, 0).is_err());
        assert!(e.observe("p", &id("a", -1.0), 10.0, 0).is_err());
        e.observe("p", &id("a", 50.0), 10.0, 0).unwrap();
        e.save(true).unwrap();
        let mut bytes = std::fs::read(&path).unwrap();
        let at = bytes.iter().position(|&b| b == b'5').unwrap();
        bytes[at] = b'9';
        std::fs::write(&path, &bytes).unwrap();
        drop(e);
        let err = PlugEnergy::load(&path).unwrap_err().to_string();
        assert!(
            err.contains("plugs.json") && err.contains("checksum"),
            "{err}"
        );

        let mut e = PlugEnergy::load(&dir.path().join("other.json")).unwrap();
        e.observe("p", &id("a", 50.0), 10.0, 0).unwrap();
        assert!(e.reset("p", 1));
        assert_eq!(
            e.observe("p", &id("a", 51.0), 10.0, 0).unwrap().energy_wh,
            1.0
        );
        assert_eq!(e.counter("p").unwrap().resets, 1);
        assert!(!e.reset("unknown", 1));
    }
}
