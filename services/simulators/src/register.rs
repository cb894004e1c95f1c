//! The simulated meters' energy registers, kept on disk like a real meter keeps its own.
//!
//! A real meter's import counter does not go back to zero when the program reading it
//! restarts, and neither may a simulated one: dashboards, the demo's energy panels and the
//! deployment tests (`docker compose down` then `up`) rely on the counter only growing.
//!
//! Writing the register at every reading would wear an SD card for a simulation, so the file
//! holds a *reservation*: the register plus what the house can draw at most in
//! [`RESERVE`]. A reading is published only when the file covers it; when one would not be,
//! a new reservation is written first. After a `kill -9` the register continues from the
//! reservation: a little ahead of the last reading (as if the house drew full power for a
//! moment), never behind it. A clean stop writes the exact values.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::household::MAX_POWER_W;

/// How far ahead a reservation reaches: at most this much full-power drawing between writes.
pub const RESERVE: Duration = Duration::from_secs(60);

const HEADER: &str = "# wattbus simulator: energy registers in Wh or varh (register value)\n";

#[derive(Debug, thiserror::Error)]
pub enum RegisterError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{path} line {line} is not `<device> <Wh>`: {text:?} (remove the file to start the \
         simulated registers from zero)"
    )]
    Corrupt {
        path: PathBuf,
        line: usize,
        text: String,
    },
}

/// The registers file and what it covers.
#[derive(Debug)]
pub struct Registers {
    path: PathBuf,
    saved: BTreeMap<String, f64>,
}

impl Registers {
    /// Open `path` (absent: every register starts at zero).
    pub fn open(path: &Path) -> Result<Registers, RegisterError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(source) => {
                return Err(RegisterError::Read {
                    path: path.to_path_buf(),
                    source,
                });
            }
        };
        let mut saved = BTreeMap::new();
        for (i, line) in text.lines().enumerate() {
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            let corrupt = || RegisterError::Corrupt {
                path: path.to_path_buf(),
                line: i + 1,
                text: line.to_string(),
            };
            let (device, value) = line.split_once(' ').ok_or_else(corrupt)?;
            let wh: f64 = value.trim().parse().map_err(|_| corrupt())?;
            if !wh.is_finite() || wh < 0.0 || device.is_empty() {
                return Err(corrupt());
            }
            saved.insert(device.to_string(), wh);
        }
        Ok(Registers {
            path: path.to_path_buf(),
            saved,
        })
    }

    /// Registers kept nowhere: every one starts at zero and nothing is written.
    pub fn empty() -> Registers {
        Registers {
            path: PathBuf::new(),
            saved: BTreeMap::new(),
        }
    }

    /// Where `device`'s register starts.
    pub fn start(&self, device: &str) -> f64 {
        self.get(device).unwrap_or(0.0)
    }

    /// `device`'s saved register, if the file has one.
    pub fn get(&self, device: &str) -> Option<f64> {
        self.saved.get(device).copied()
    }

    /// Make sure the file covers `energy_wh` for `device` before a reading with it goes out:
    /// a new reservation is written when it does not. `Err` when it cannot be written.
    pub fn cover(&mut self, device: &str, energy_wh: f64) -> std::io::Result<()> {
        if self.saved.get(device).is_some_and(|&s| s >= energy_wh) {
            return Ok(());
        }
        let headroom = MAX_POWER_W * RESERVE.as_secs_f64() / 3600.0;
        let before = self.saved.insert(device.to_string(), energy_wh + headroom);
        self.write().inspect_err(|_| {
            // Not written: what the file covers is what it held.
            match before {
                Some(v) => self.saved.insert(device.to_string(), v),
                None => self.saved.remove(device),
            };
        })
    }

    /// Write these registers (and keep the others). At a clean stop: the exact registers, so
    /// the next start continues from them.
    pub fn save_exact(
        &mut self,
        registers: impl IntoIterator<Item = (String, f64)>,
    ) -> std::io::Result<()> {
        // Taken as saved only once written: a failed write leaves what the file holds.
        let mut next = self.saved.clone();
        next.extend(registers);
        Self::write_map(&self.path, &next)?;
        self.saved = next;
        Ok(())
    }

    fn write(&self) -> std::io::Result<()> {
        Self::write_map(&self.path, &self.saved)
    }

    fn write_map(path: &Path, saved: &BTreeMap<String, f64>) -> std::io::Result<()> {
        let mut text = String::from(HEADER);
        for (device, wh) in saved {
            text.push_str(&format!("{device} {wh}\n"));
        }
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        runtime::state::replace_file(path, text.as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_register_never_restarts_below_a_reading_that_went_out() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sim").join("registers");
        let mut r = Registers::open(&path).unwrap();
        assert_eq!(r.start("m1"), 0.0);
        let mut published = 0.0;
        for wh in [0.5, 10.0, 39.0, 45.0, 120.0] {
            r.cover("m1", wh).unwrap();
            published = wh;
        }
        // kill -9 here: nothing but the file survives.
        let after = Registers::open(&path).unwrap();
        assert!(
            after.start("m1") >= published,
            "{} < {published}",
            after.start("m1")
        );
        assert!(after.start("m1") <= published + 40.0);
        // A clean stop keeps the exact value.
        let mut r = after;
        r.save_exact([("m1".to_string(), 130.25)]).unwrap();
        assert_eq!(Registers::open(&path).unwrap().start("m1"), 130.25);
    }

    #[test]
    fn a_corrupt_file_is_refused_naming_the_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("registers");
        std::fs::write(&path, format!("{HEADER}m1 12.5\nm2 twelve\n")).unwrap();
        let e = Registers::open(&path).unwrap_err().to_string();
        assert!(e.contains("registers line 3"), "{e}");
        assert!(e.contains("twelve"), "{e}");
        std::fs::write(&path, "m1 -4\n").unwrap();
        assert!(Registers::open(&path).is_err());
    }
}
