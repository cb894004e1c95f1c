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
//! 3. **Every line checks out, or it is bad.** A group line carries its name's CRC-32, the
//!    last line the count and the CRC-32 of all before it: a flipped bit that makes another
//!    valid name, joins two lines or loses one is noticed, never taken for a smaller list.
//! 4. **Written only on a change** (a group learned or forgotten), not on every registration
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
///
/// Every group line carries the CRC-32 of its name, and the last line (`end <count> <crc>`)
/// the count of groups and the CRC-32 of everything before it. A line that does not check
/// out is a bad line, whatever it looks like: a flipped bit can turn one group's name into
/// another valid name, or join a name to the line before it. Lines that do check out are
/// kept. When the end line is missing or does not match and no other line is bad (a line
/// lost whole, a file cut short at a line's end), the end line's number (or the last line's)
/// is reported bad, since something is missing that no line can name.
pub fn load(dir: &Path) -> io::Result<Loaded> {
    let bytes = match fs::read(path(dir)) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Loaded::default()),
        Err(e) => return Err(e),
    };
    let mut loaded = Loaded::default();
    let lines: Vec<&[u8]> = bytes.split(|b| *b == b'\n').collect();
    // The text up to each line, for the end line's checksum.
    let mut offset = 0;
    let mut end_ok = false;
    // The end line, when it does not match: reported only if no other line explains why.
    let mut end_line = lines.len().saturating_sub(1).max(1);
    let mut groups_seen = 0u64;
    for (i, line) in lines.iter().enumerate() {
        let before = &bytes[..offset];
        offset += line.len() + 1;
        let last = i + 1 == lines.len();
        if last {
            // What follows the final newline: nothing, in a file written whole.
            if !line.is_empty() {
                loaded.bad_lines.push(i + 1);
            }
            continue;
        }
        let text = std::str::from_utf8(line).ok();
        if i == 0 {
            if text != Some(HEADER.trim_end()) {
                loaded.bad_lines.push(1);
            }
            continue;
        }
        if let Some(rest) = text.and_then(|t| t.strip_prefix("end ")) {
            let expected = format!("{groups_seen} {:08x}", crc32fast::hash(before));
            if rest == expected && lines[i + 1..].iter().all(|l| l.is_empty()) {
                end_ok = true;
            } else {
                end_line = i + 1;
            }
            continue;
        }
        match text.and_then(group_of_line) {
            Some(group) => {
                groups_seen += 1;
                if !loaded.groups.contains(&group) {
                    loaded.groups.push(group);
                }
            }
            None => loaded.bad_lines.push(i + 1),
        }
    }
    if !end_ok && loaded.bad_lines.is_empty() {
        loaded.bad_lines.push(end_line);
    }
    Ok(loaded)
}

/// `<name> <crc32 of name, 8 hex digits>`, the name a valid group.
fn group_of_line(line: &str) -> Option<Segment> {
    let (name, crc) = line.split_once(' ')?;
    if crc != format!("{:08x}", crc32fast::hash(name.as_bytes())) {
        return None;
    }
    Segment::new(name).ok()
}

/// Replace the file with `groups` (see the module's invariants).
pub fn save<'a>(dir: &Path, groups: impl IntoIterator<Item = &'a str>) -> io::Result<()> {
    let mut text = String::from(HEADER);
    let mut count = 0u64;
    for g in groups {
        text.push_str(&format!("{g} {:08x}\n", crc32fast::hash(g.as_bytes())));
        count += 1;
    }
    let crc = crc32fast::hash(text.as_bytes());
    text.push_str(&format!("end {count} {crc:08x}\n"));
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
        save(dir.path(), ["influx-writer", "archive", "azure-bridge"]).unwrap();
        let good = fs::read(path(dir.path())).unwrap();
        let line_of = |bytes: &[u8], name: &str| {
            bytes
                .split(|b| *b == b'\n')
                .position(|l| l.starts_with(name.as_bytes()))
                .unwrap()
                + 1
        };
        let archive = line_of(&good, "archive");
        let damage = |f: &dyn Fn(&mut Vec<u8>)| {
            let mut bytes = good.clone();
            f(&mut bytes);
            fs::write(path(dir.path()), &bytes).unwrap();
            load(dir.path()).unwrap()
        };
        // One bit: another valid name ("archive" -> "arcjive") is caught by its CRC.
        let l = damage(&|b| {
            let at = b.windows(7).position(|w| w == b"archive").unwrap();
            b[at + 3] ^= 0x02;
        });
        assert_eq!(names(&l), vec!["influx-writer", "azure-bridge"]);
        assert_eq!(l.bad_lines, vec![archive]);
        // The header's newline flipped: the first group joins the comment.
        let l = damage(&|b| {
            let at = b.iter().position(|c| *c == b'\n').unwrap();
            b[at] ^= 0x40;
        });
        assert!(!l.bad_lines.is_empty(), "{l:?}");
        assert!(!names(&l).contains(&"influx-writer"));
        // A whole line gone: every remaining line checks out, the end line does not.
        let l = damage(&|b| {
            let text = String::from_utf8(b.clone()).unwrap();
            let kept: String = text
                .lines()
                .filter(|l| !l.starts_with("archive"))
                .map(|l| format!("{l}\n"))
                .collect();
            *b = kept.into_bytes();
        });
        assert_eq!(names(&l), vec!["influx-writer", "azure-bridge"]);
        assert!(!l.bad_lines.is_empty(), "a lost line must be noticed");
        // Cut short, and text after the last newline.
        let l = damage(&|b| b.truncate(b.len() - 10));
        assert!(!l.bad_lines.is_empty());
        let l = damage(&|b| b.extend_from_slice(b"rms-processor"));
        assert!(!l.bad_lines.is_empty());
        // Untouched: clean.
        let l = damage(&|_| {});
        assert!(l.bad_lines.is_empty());
        assert_eq!(names(&l), vec!["influx-writer", "archive", "azure-bridge"]);
    }
}
