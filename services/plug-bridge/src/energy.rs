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
//! A reset (`wattbus plugs reset-energy`) is the only way down: explicit, counted in
//! `resets`, dated in `since_ms`.

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
    /// Its counter went down.
    Decrease,
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
}

/// One plug's counter as saved.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Counter {
    /// What earlier runs of the plug's own counter counted (Wh).
    pub offset_wh: f64,
    /// The plug's own counter at the last sample, and the boot it was in.
    pub last_raw_wh: f64,
    pub boot: Option<Boot>,
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
}

impl Counter {
    fn new(now_ms: i64) -> Self {
        Self {
            offset_wh: 0.0,
            last_raw_wh: 0.0,
            boot: None,
            ceiling_wh: 0.0,
            restarts: 0,
            resets: 0,
            since_ms: now_ms,
            published_wh: Some(0.0),
        }
    }

    /// The lowest value the counter may take next: what was (or may have been) published.
    fn floor(&self) -> f64 {
        self.published_wh.unwrap_or(self.ceiling_wh)
    }

    /// Take a sample of the plug's counter.
    pub fn observe(&mut self, s: &Sample, margin_wh: f64) -> Result<Step, SampleError> {
        if !s.total_wh.is_finite() || s.total_wh < 0.0 || s.total_wh > 1e12 {
            return Err(SampleError::Impossible(s.total_wh));
        }
        let restart = match &self.boot {
            None => None,
            Some(old) if *old != s.boot && s.boot != Boot::Unknown => Some(Restart::Reboot),
            // A float read back from JSON may differ in its last bit: a real restart is a
            // drop, not a rounding.
            Some(_) if s.total_wh < self.last_raw_wh - 1e-6 * self.last_raw_wh.max(1.0) => {
                Some(Restart::Decrease)
            }
            Some(_) => None,
        };
        if restart.is_some() {
            self.offset_wh = (self.offset_wh + self.last_raw_wh).max(self.floor());
            self.restarts = self.restarts.saturating_add(1);
        }
        self.boot = Some(s.boot.clone());
        self.last_raw_wh = s.total_wh;
        // Never below what was published: a raw counter read back one rounding lower.
        let energy_wh = (self.offset_wh + s.total_wh).max(self.published_wh.unwrap_or(0.0));
        let save_first = energy_wh > self.ceiling_wh;
        if save_first {
            self.ceiling_wh = energy_wh + margin_wh.max(0.0);
        }
        self.published_wh = Some(self.published_wh.map_or(energy_wh, |p| p.max(energy_wh)));
        Ok(Step {
            energy_wh,
            restart,
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
pub enum EnergyError {
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
}

const VERSION: u32 = 1;

#[derive(Debug, Serialize, Deserialize)]
struct File {
    version: u32,
    plugs: BTreeMap<String, Counter>,
}

/// Every plug's counter, and their file.
#[derive(Debug)]
pub struct Energy {
    path: PathBuf,
    plugs: BTreeMap<String, Counter>,
    dirty: bool,
}

impl Energy {
    /// Load the counters (none yet if the file does not exist). A file that exists but cannot
    /// be read is an error naming it: starting from zero would break every counter.
    pub fn load(path: &Path) -> Result<Self, EnergyError> {
        let plugs = match std::fs::read(path) {
            Ok(bytes) => {
                let damaged = |reason: String| EnergyError::Damaged {
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
                        .all(|v| v.is_finite() && v.abs() < 1e13);
                    if !ok {
                        return Err(damaged(format!("plug {plug:?} has impossible numbers")));
                    }
                }
                file.plugs
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(source) => {
                return Err(EnergyError::Read {
                    path: path.to_path_buf(),
                    source,
                });
            }
        };
        Ok(Self {
            path: path.to_path_buf(),
            plugs,
            dirty: false,
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
            .or_insert_with(|| Counter::new(now_ms));
        let step = c.observe(s, margin_wh)?;
        self.dirty = true;
        Ok(step)
    }

    pub fn counter(&self, plug: &str) -> Option<&Counter> {
        self.plugs.get(plug)
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
    pub fn save(&mut self, exact: bool) -> Result<(), EnergyError> {
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
        let err = |source| EnergyError::Write {
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
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir).map_err(err)?;
        }
        runtime::state::replace_file(&self.path, &body).map_err(err)?;
        self.dirty = false;
        Ok(())
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
        let mut c = Counter::new(0);
        assert_eq!(c.observe(&id("a", 5.0), 10.0).unwrap().energy_wh, 5.0);
        assert_eq!(c.observe(&id("a", 7.5), 10.0).unwrap().energy_wh, 7.5);
        // Rebooted: its counter starts at 0 again, ours goes on.
        let s = c.observe(&id("b", 0.25), 10.0).unwrap();
        assert_eq!((s.energy_wh, s.restart), (7.75, Some(Restart::Reboot)));
        assert_eq!(c.observe(&id("b", 1.0), 10.0).unwrap().energy_wh, 8.5);
        assert_eq!(c.restarts, 1);
    }

    #[test]
    fn without_a_boot_id_only_a_decrease_is_a_restart() {
        let mut c = Counter::new(0);
        c.observe(&unknown(1000.0), 10.0).unwrap();
        assert_eq!(c.observe(&unknown(1000.5), 10.0).unwrap().restart, None);
        let s = c.observe(&unknown(2.0), 10.0).unwrap();
        assert_eq!((s.energy_wh, s.restart), (1002.5, Some(Restart::Decrease)));
    }

    #[test]
    fn the_file_is_saved_only_when_the_counter_passes_its_ceiling() {
        let mut c = Counter::new(0);
        assert!(c.observe(&id("a", 1.0), 10.0).unwrap().save_first);
        assert_eq!(c.ceiling_wh, 11.0);
        for wh in [2.0, 5.0, 10.9, 11.0] {
            assert!(!c.observe(&id("a", wh), 10.0).unwrap().save_first, "{wh}");
        }
        assert!(c.observe(&id("a", 11.5), 10.0).unwrap().save_first);
        assert_eq!(c.ceiling_wh, 21.5);
    }

    #[test]
    fn after_a_crash_and_a_reboot_the_counter_never_goes_below_a_published_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("plugs.json");
        let mut e = Energy::load(&path).unwrap();
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
        let mut e = Energy::load(&path).unwrap();
        let s = e.observe("p", &id("b", 0.5), 10.0, 0).unwrap();
        assert!(s.energy_wh >= published, "{} < {published}", s.energy_wh);
        assert!(
            s.energy_wh <= published + 10.0 + 0.5,
            "at most a margin high"
        );
        // The same boot after a crash: exact, the plug's counter carries on.
        let mut e = Energy::load(&path).unwrap();
        let s = e.observe("p", &id("a", 4.0), 10.0, 0).unwrap();
        assert_eq!(s.energy_wh, 4.0);
    }

    #[test]
    fn a_clean_stop_makes_a_restart_exact() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("plugs.json");
        let mut e = Energy::load(&path).unwrap();
        e.observe("p", &id("a", 1.0), 10.0, 0).unwrap();
        e.observe("p", &id("a", 3.0), 10.0, 0).unwrap();
        e.save(true).unwrap();
        let mut e = Energy::load(&path).unwrap();
        let s = e.observe("p", &id("b", 0.5), 10.0, 0).unwrap();
        assert_eq!(s.energy_wh, 3.5);
    }

    #[test]
    fn damage_and_nonsense_are_refused_and_a_reset_is_the_only_way_down() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("plugs.json");
        let mut e = Energy::load(&path).unwrap();
        assert!(e.observe("p", &id("a", f64::NAN), 10.0, 0).is_err());
        assert!(e.observe("p", &id("a", -1.0), 10.0, 0).is_err());
        e.observe("p", &id("a", 50.0), 10.0, 0).unwrap();
        e.save(true).unwrap();
        let mut bytes = std::fs::read(&path).unwrap();
        let at = bytes.iter().position(|&b| b == b'5').unwrap();
        bytes[at] = b'9';
        std::fs::write(&path, &bytes).unwrap();
        let err = Energy::load(&path).unwrap_err().to_string();
        assert!(
            err.contains("plugs.json") && err.contains("checksum"),
            "{err}"
        );

        let mut e = Energy::load(&dir.path().join("other.json")).unwrap();
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
