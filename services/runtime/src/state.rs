//! One process per instance's state: a lock file under the data directory.
//!
//! A journal, a spool or an energy file written by two processes at once is corrupt, and two
//! processes with one instance name also share one MQTT client id, so the broker keeps
//! throwing one of them out. Both happen by accident in a deployment: a second copy started
//! by hand beside the systemd unit, `docker compose up --scale` on a service that must not
//! scale. A [`Claim`] is an advisory lock (`flock`) on `<data_dir>/locks/<instance>.lock`, held
//! for as long as the process runs and dropped by the kernel when it dies, even by `kill -9`,
//! so no stale lock is ever left to clear by hand.
//!
//! A service that may run as several replicas over one volume (influx-writer, scaled with
//! `docker compose up --scale influx-writer=2`) takes the first free *slot* instead:
//! `<instance>`, `<instance>-2`, `<instance>-3`, … Replica k takes slot k again after a
//! restart or `docker compose down`/`up`, so it finds its own spool again.

use std::fs::{File, OpenOptions, TryLockError};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use proto::Segment;

/// The right to use one instance's state, until dropped (or the process ends).
#[derive(Debug)]
pub struct Claim {
    instance: Segment,
    path: PathBuf,
    _lock: File,
}

#[derive(Debug, thiserror::Error)]
pub enum ClaimError {
    #[error(
        "another process runs {service} instance `{instance}` (it holds {path}): two would \
         corrupt its journal and fight over one client id; give each its own `instance`{hint}"
    )]
    Held {
        service: String,
        instance: Segment,
        path: PathBuf,
        hint: &'static str,
    },
    #[error(
        "all {slots} slots of {service} instance `{instance}` are taken (locks in {dir}): \
         at most {slots} replicas share one data directory"
    )]
    Full {
        service: String,
        instance: Segment,
        dir: PathBuf,
        slots: u32,
    },
    #[error("cannot lock {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The hint for a service that must not run twice on one data directory.
pub const MUST_NOT_SCALE: &str = " (this service must not be scaled: run one per data directory)";

impl Claim {
    /// `instance` alone, or an error naming the lock another process holds, then `hint`.
    pub fn exclusive(
        data_dir: &Path,
        service: &str,
        instance: &Segment,
        hint: &'static str,
    ) -> Result<Claim, ClaimError> {
        match try_claim(data_dir, instance)? {
            Some(claim) => Ok(claim),
            None => Err(ClaimError::Held {
                service: service.to_string(),
                instance: instance.clone(),
                path: lock_path(data_dir, instance),
                hint,
            }),
        }
    }

    /// Slot `k` (1-based) of `instance` if no process holds it: `instance` for 1,
    /// `instance-<k>` for the others. What a replica uses to take over a free slot's state.
    pub fn try_slot(
        data_dir: &Path,
        instance: &Segment,
        k: u32,
    ) -> Result<Option<Claim>, ClaimError> {
        try_claim(data_dir, &slot_name(data_dir, instance, k)?)
    }

    /// The first free of `instance`, `instance-2`, … `instance-<slots>`.
    pub fn first_free(
        data_dir: &Path,
        service: &str,
        instance: &Segment,
        slots: u32,
    ) -> Result<Claim, ClaimError> {
        for k in 1..=slots.max(1) {
            let name = slot_name(data_dir, instance, k)?;
            if let Some(claim) = try_claim(data_dir, &name)? {
                return Ok(claim);
            }
        }
        Err(ClaimError::Full {
            service: service.to_string(),
            instance: instance.clone(),
            dir: data_dir.join("locks"),
            slots: slots.max(1),
        })
    }

    /// The instance name this process runs as: its client id and state directory name.
    pub fn instance(&self) -> &Segment {
        &self.instance
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Replace `path` by `bytes` (0600), atomically and durably: after a crash, power cut or
/// `kill -9` the file holds the old content or the new, never a mix or nothing.
pub fn replace_file(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    crate::journal::replace_file(path, bytes)
}

/// How the checksum line of a state file starts.
const CHECKSUM: &str = "crc32 ";

/// End `body` (a state file's text, ending in a newline) with a line `crc32 <8 hex digits>`
/// over everything before it: a flipped bit or a hand edit is then found by
/// [`split_checksum`] rather than believed (counters, marks: rms-processor, plug-bridge).
pub fn append_checksum(body: &mut Vec<u8>) {
    let crc = crc32fast::hash(body);
    body.extend_from_slice(format!("{CHECKSUM}{crc:08x}\n").as_bytes());
}

/// The content of a state file and whether it carried a checksum line, which then matched;
/// `Err(reason)` if it carried one that does not match. A file without one is for the caller
/// to judge (an older version of its format, or refused).
pub fn split_checksum(bytes: &[u8]) -> Result<(&[u8], bool), String> {
    let text = bytes.strip_suffix(b"\n").unwrap_or(bytes);
    let last_line_at = text.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    let Some(hex) = text[last_line_at..].strip_prefix(CHECKSUM.as_bytes()) else {
        return Ok((bytes, false));
    };
    let want = std::str::from_utf8(hex)
        .ok()
        .filter(|h| h.len() == 8)
        .and_then(|h| u32::from_str_radix(h, 16).ok())
        .ok_or_else(|| "its checksum line is malformed".to_string())?;
    let covered = &bytes[..last_line_at];
    if crc32fast::hash(covered) != want {
        return Err(
            "its checksum does not match its content: changed or corrupted since it was written"
                .into(),
        );
    }
    Ok((covered, true))
}

fn slot_name(data_dir: &Path, instance: &Segment, k: u32) -> Result<Segment, ClaimError> {
    if k <= 1 {
        return Ok(instance.clone());
    }
    // A segment plus "-<digits>" is a segment unless it grows too long.
    Segment::new(format!("{instance}-{k}")).map_err(|e| ClaimError::Io {
        path: lock_path(data_dir, instance),
        source: std::io::Error::other(e.to_string()),
    })
}

fn lock_path(data_dir: &Path, instance: &Segment) -> PathBuf {
    data_dir.join("locks").join(format!("{instance}.lock"))
}

fn try_claim(data_dir: &Path, instance: &Segment) -> Result<Option<Claim>, ClaimError> {
    let path = lock_path(data_dir, instance);
    let io = |source| ClaimError::Io {
        path: path.clone(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io)?;
    }
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(io)?;
    match file.try_lock() {
        Ok(()) => Ok(Some(Claim {
            instance: instance.clone(),
            path,
            _lock: file,
        })),
        Err(TryLockError::WouldBlock) => Ok(None),
        Err(TryLockError::Error(e)) => Err(io(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(s: &str) -> Segment {
        Segment::new(s).unwrap()
    }

    #[test]
    fn a_checksum_finds_a_changed_byte_and_a_file_without_one_is_said_to_be() {
        let mut body = b"{\"a\": 1}\n".to_vec();
        append_checksum(&mut body);
        assert_eq!(split_checksum(&body), Ok((&b"{\"a\": 1}\n"[..], true)));
        let mut bad = body.clone();
        bad[6] = b'2';
        assert!(split_checksum(&bad).unwrap_err().contains("does not match"));
        assert_eq!(split_checksum(b"{}\n"), Ok((&b"{}\n"[..], false)));
        assert!(split_checksum(b"{}\ncrc32 xyz\n").is_err());
    }

    #[test]
    fn a_second_claim_of_one_instance_is_refused_until_the_first_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let first =
            Claim::exclusive(dir.path(), "modbus-ingest", &seg("mb"), MUST_NOT_SCALE).unwrap();
        let err =
            Claim::exclusive(dir.path(), "modbus-ingest", &seg("mb"), MUST_NOT_SCALE).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("another process runs modbus-ingest instance `mb`"),
            "{msg}"
        );
        assert!(msg.contains("locks/mb.lock"), "{msg}");
        assert!(msg.contains("must not be scaled"), "{msg}");
        // Another instance is free all along.
        Claim::exclusive(dir.path(), "modbus-ingest", &seg("mb2"), MUST_NOT_SCALE).unwrap();
        drop(first);
        Claim::exclusive(dir.path(), "modbus-ingest", &seg("mb"), MUST_NOT_SCALE).unwrap();
    }

    #[test]
    fn replicas_take_the_first_free_slot_and_get_theirs_back() {
        let dir = tempfile::tempdir().unwrap();
        let claim = |slots| Claim::first_free(dir.path(), "influx-writer", &seg("iw"), slots);
        let one = claim(3).unwrap();
        let two = claim(3).unwrap();
        let three = claim(3).unwrap();
        let names: Vec<_> = [&one, &two, &three]
            .iter()
            .map(|c| c.instance().to_string())
            .collect();
        assert_eq!(names, ["iw", "iw-2", "iw-3"]);
        let err = claim(3).unwrap_err().to_string();
        assert!(err.contains("all 3 slots"), "{err}");
        // Replica 2 restarts: it gets slot 2 back, not a new one.
        drop(two);
        assert_eq!(claim(3).unwrap().instance().as_str(), "iw-2");
    }
}
