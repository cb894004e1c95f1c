//! The sink groups a producer stream learned from registrations, kept on disk beside its
//! journal (`<journal dir>/sinks`), so that a restart, or a broker that forgot its retained
//! messages, changes nothing about whom the stream waits for.
//!
//! # Invariants
//!
//! 1. **Replaced whole, never edited.** The file is written to `sinks.tmp` (0600), fsynced and
//!    renamed over `sinks`, then the directory is fsynced: a crash leaves the old list or the
//!    new one, never half of either.
//! 2. **Damage costs a line, not the list, and no reading.** One group per line; a line that
//!    is not a valid group name (bit rot, a torn write on a file system without atomic
//!    rename) is reported with an ERROR, every valid line is kept, and the producer waits for
//!    a stand-in group in its place ([`stand_in`]) until a person withdraws it.
//! 3. **Written only on a change** (a group learned or forgotten), not on every registration
//!    received: registrations come again on every connection, and an SD card should not pay
//!    for that.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write as _};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

use proto::Segment;

/// The file's name in the journal directory.
pub const FILE: &str = "sinks";

const HEADER: &str =
    "# Sink groups this stream waits for, learned from their registrations (`wattbus sinks`).\n";

/// The groups read from the file.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Loaded {
    pub groups: Vec<Segment>,
    /// 1-based numbers of lines that were not a valid group name.
    pub bad_lines: Vec<usize>,
}

/// The group waited for in place of one on line `line` of the file that cannot be read
/// (`unreadable-<line>`), or of the whole file when it cannot be read at all (`unreadable`).
///
/// Which group it was is lost, and it may be one that is down right now: waiting for a
/// stand-in, which never acknowledges, trims nothing until a person has checked that every
/// real group registered again and withdraws it (`wattbus sinks forget unreadable-2`). Skipping
/// the line instead would trim readings as soon as the other groups have them, and the lost
/// group would never get them.
pub fn stand_in(line: Option<usize>) -> Segment {
    let name = match line {
        Some(n) => format!("unreadable-{n}"),
        None => "unreadable".to_string(),
    };
    Segment::new(name).unwrap_or_else(|e| unreachable!("a valid group name: {e}"))
}

/// The path of the file in `dir`.
pub fn path(dir: &Path) -> PathBuf {
    dir.join(FILE)
}

/// Read the groups learned before. A missing file is an empty list.
pub fn load(dir: &Path) -> io::Result<Loaded> {
    let bytes = match fs::read(path(dir)) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Loaded::default()),
        Err(e) => return Err(e),
    };
    let mut loaded = Loaded::default();
    let lines: Vec<&[u8]> = bytes.split(|b| *b == b'\n').collect();
    for (i, line) in lines.iter().enumerate() {
        // Every line the file is written with ends in a newline: text after the last one is
        // what is left of a torn write, not a name to trust.
        let torn = i + 1 == lines.len() && !line.is_empty();
        if torn {
            loaded.bad_lines.push(i + 1);
            continue;
        }
        if line.is_empty() || line.starts_with(b"#") {
            continue;
        }
        match std::str::from_utf8(line).ok().map(Segment::new) {
            Some(Ok(group)) if !loaded.groups.contains(&group) => loaded.groups.push(group),
            Some(Ok(_)) => {}
            _ => loaded.bad_lines.push(i + 1),
        }
    }
    Ok(loaded)
}

/// Replace the file with `groups` (see the module's invariants).
pub fn save<'a>(dir: &Path, groups: impl IntoIterator<Item = &'a str>) -> io::Result<()> {
    let mut text = String::from(HEADER);
    for g in groups {
        text.push_str(g);
        text.push('\n');
    }
    let target = path(dir);
    let tmp = target.with_extension("tmp");
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    fs::rename(&tmp, &target)?;
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    fn names(l: &Loaded) -> Vec<&str> {
        l.groups.iter().map(Segment::as_str).collect()
    }

    #[test]
    fn learned_groups_survive_a_reload_in_a_private_file() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(load(dir.path()).unwrap(), Loaded::default());
        save(dir.path(), ["influx-writer", "azure-bridge"]).unwrap();
        let l = load(dir.path()).unwrap();
        assert_eq!(names(&l), vec!["influx-writer", "azure-bridge"]);
        assert!(l.bad_lines.is_empty());
        let mode = fs::metadata(path(dir.path())).unwrap().permissions().mode();
        assert_eq!(
            mode & 0o777,
            0o600,
            "a list of who stores the readings is nobody else's"
        );
        save(dir.path(), ["azure-bridge"]).unwrap();
        assert_eq!(names(&load(dir.path()).unwrap()), vec!["azure-bridge"]);
        assert!(!dir.path().join("sinks.tmp").exists());
    }

    #[test]
    fn a_damaged_file_keeps_its_valid_lines_and_names_the_bad_ones() {
        let dir = tempfile::tempdir().unwrap();
        let mut bytes = HEADER.as_bytes().to_vec();
        bytes.extend_from_slice(
            b"influx-writer\ninflux-wr\xffter\nfiles/out\n\nazure-bridge\ninflux-writer\nrms-proc",
        );
        fs::write(path(dir.path()), bytes).unwrap();
        let l = load(dir.path()).unwrap();
        // A name with no newline after it is the torn end of a write: not trusted.
        assert_eq!(names(&l), vec!["influx-writer", "azure-bridge"]);
        assert_eq!(l.bad_lines, vec![3, 4, 8]);
    }
}
