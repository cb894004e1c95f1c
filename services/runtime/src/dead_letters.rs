//! The dead-letter file: messages a service could not use, kept on disk for a person.
//!
//! A dead letter also goes to `wattbus/v1/<site>/dead/<service>`, but a message on a broker
//! that keeps nothing is gone unless someone was listening; a journaled message that is
//! dead-lettered is then acknowledged, so the file is the one place it survives.
//!
//! Invariants:
//! - One [`DeadLetter`] as JSON per line (`jq` reads it), appended and fsynced before the
//!   call returns: a caller acknowledges a message only after this.
//! - Bounded: at `max_bytes` the file is renamed to `<file>.1` (replacing the previous one)
//!   and a new one started, so it never holds more than about twice `max_bytes`.
//! - Private: the file is created 0600 and missing directories 0700 — dead letters are
//!   readings.
//! - One writer at a time per [`DeadLetterFile`]: share it (`Arc`) between everything in a
//!   process that writes the same file, or a rotation could race an append.

use std::fs::{self, DirBuilder, OpenOptions};
use std::io::{self, Write as _};
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use proto::DeadLetter;

/// An append-only JSON-lines file of dead letters, rotated once at a size.
#[derive(Debug)]
pub struct DeadLetterFile {
    path: PathBuf,
    max_bytes: u64,
    /// Serialises rotation and appends of everything sharing this file.
    lock: Mutex<()>,
}

impl DeadLetterFile {
    pub fn new(path: PathBuf, max_bytes: u64) -> Self {
        Self {
            path,
            max_bytes,
            lock: Mutex::new(()),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Append `letters` and fsync. Blocking: call it off the async threads.
    pub fn append(&self, letters: &[DeadLetter]) -> io::Result<()> {
        if letters.is_empty() {
            return Ok(());
        }
        let mut buf = Vec::new();
        for dl in letters {
            serde_json::to_writer(&mut buf, dl).map_err(io::Error::other)?;
            buf.push(b'\n');
        }
        // A poisoned lock only means another append panicked; the file is still consistent
        // line by line, so carry on.
        let _guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
        }
        if fs::metadata(&self.path).is_ok_and(|m| m.len() >= self.max_bytes) {
            let mut old = self.path.as_os_str().to_owned();
            old.push(".1");
            fs::rename(&self.path, old)?;
        }
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&self.path)?;
        f.write_all(&buf)?;
        f.sync_data()
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;
    use proto::{Payload, Segment};

    fn letter(reason: &str) -> DeadLetter {
        DeadLetter::new(
            Segment::new("influx-writer").unwrap(),
            reason,
            "wattbus/v1/home/meas/d/c",
            b"{}",
        )
    }

    #[test]
    fn letters_are_json_lines_private_and_rotated_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state/sub/dead-letters.jsonl");
        let file = DeadLetterFile::new(path.clone(), 100);
        file.append(&[letter("one"), letter("two")]).unwrap();
        let text = fs::read_to_string(&path).unwrap();
        let reasons: Vec<String> = text
            .lines()
            .map(|l| DeadLetter::decode(l.as_bytes()).unwrap().reason)
            .collect();
        assert_eq!(reasons, ["one", "two"]);
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&path), 0o600, "dead letters are readings: owner only");
        assert_eq!(mode(path.parent().unwrap()), 0o700);
        assert_eq!(mode(&dir.path().join("state")), 0o700);

        // Past max_bytes the file moves to .1 and a new one starts; nothing is lost.
        file.append(&[letter("three")]).unwrap();
        let old = dir.path().join("state/sub/dead-letters.jsonl.1");
        assert_eq!(fs::read_to_string(&old).unwrap(), text);
        assert!(fs::read_to_string(&path).unwrap().contains("three"));
        assert_eq!(mode(&path), 0o600);
    }
}
