//! Reading sets back: verification and the lines of a restore (`wattbus backup`).
//!
//! A part is read a range at a time, decompressed as it comes, and handed to the writer in
//! batches of whole lines; the SHA-256 of what was read is checked at the end (and `wattbus
//! backup restore` verifies the whole chain before it writes anything).

use std::future::Future;
use std::io::Write as _;
use std::pin::Pin;

use flate2::write::GzDecoder;

use crate::manifest::{Manifest, Part};
use crate::store::{Store, StoreError};

/// Where restored lines go: `rp` is the part's retention policy, `body` whole lines of line
/// protocol with nanosecond timestamps.
pub trait LineSink {
    fn write<'a>(
        &'a mut self,
        rp: &'a str,
        body: &'a str,
    ) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send + 'a>>;
}

#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{part}: {problem}")]
    Damaged { part: String, problem: String },
    #[error("writing {part}: {problem}")]
    Write { part: String, problem: String },
}

/// Which timestamps to restore: `>= from_ns` and `< to_ns`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Range {
    pub from_ns: Option<i64>,
    pub to_ns: Option<i64>,
}

impl Range {
    fn contains(&self, ts: i64) -> bool {
        self.from_ns.is_none_or(|f| ts >= f) && self.to_ns.is_none_or(|t| ts < t)
    }
}

/// What a part gave.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Restored {
    /// Lines written (or, dry, that would be).
    pub points: u64,
    /// Lines outside the range.
    pub outside: u64,
}

/// The timestamp of a line (its last field).
fn timestamp(line: &str) -> Option<i64> {
    line.rsplit_once(' ').and_then(|(_, ts)| ts.parse().ok())
}

/// Every part of every set, read and checked; the damaged ones as `(set, file, problem)`.
/// With `native`, the files of native backups too (a restore, which does not read them,
/// leaves them out).
pub async fn verify(
    store: &Store,
    sets: &[Manifest],
    native: bool,
) -> Result<Vec<(String, String, String)>, StoreError> {
    let mut damaged = Vec::new();
    for m in sets {
        for f in m.native.iter().filter(|_| native).flat_map(|n| &n.files) {
            let result = store
                .read_file(&m.id, &f.file, f.bytes, &f.sha256, |_| Ok(()))
                .await;
            if let Some(problem) = damage(result)? {
                damaged.push((m.id.clone(), f.file.clone(), problem));
            }
        }
        for p in &m.parts {
            let mut gz = GzDecoder::new(std::io::sink());
            let result = store
                .read_part(&m.id, p, |b| {
                    gz.write_all(b)
                        .map_err(|e| format!("is not valid gzip: {e}"))
                })
                .await;
            let result = result.and_then(|()| {
                gz.try_finish().map_err(|e| StoreError::Corrupt {
                    store: store.describe().to_string(),
                    path: format!("{}/{}", m.id, p.file),
                    problem: format!("is not valid gzip: {e}"),
                })
            });
            if let Some(problem) = damage(result)? {
                damaged.push((m.id.clone(), p.file.clone(), problem));
            }
        }
    }
    Ok(damaged)
}

/// What is wrong with a file read back (`None`: nothing), or the error that stopped the
/// reading (the storage away: not damage).
fn damage(result: Result<(), StoreError>) -> Result<Option<String>, StoreError> {
    match result {
        Ok(()) => Ok(None),
        Err(StoreError::Corrupt { problem, .. }) => Ok(Some(problem)),
        Err(StoreError::Store {
            source: object_store::Error::NotFound { .. },
            ..
        }) => Ok(Some("is missing".into())),
        Err(e) => Err(e),
    }
}

/// Restore one part: its lines in `range`, in batches of about `batch` lines, to `sink`
/// (none with `dry`).
pub async fn restore_part(
    store: &Store,
    set: &Manifest,
    part: &Part,
    range: Range,
    batch: usize,
    dry: bool,
    sink: &mut dyn LineSink,
) -> Result<Restored, RestoreError> {
    let name = format!("{}/{}", set.id, part.file);
    let damaged = |problem: String| RestoreError::Damaged {
        part: name.clone(),
        problem,
    };
    let mut reader = store.part_reader(&set.id, part).await?;
    let mut gz = GzDecoder::new(Vec::new());
    let mut pending: Vec<u8> = Vec::new();
    let mut body = String::new();
    let mut lines_in_body = 0usize;
    let mut out = Restored::default();
    let mut finished = false;
    // Compressed bytes are fed in small slices and the lines they give written out before
    // the next: line protocol inflates ten-fold and more, and a whole 4 MiB block at once
    // held hundreds of megabytes on a restore of a month.
    let mut block = bytes::Bytes::new();
    while !finished {
        if block.is_empty() {
            match reader.next().await? {
                Some(b) => block = b,
                None => {
                    gz.try_finish()
                        .map_err(|e| damaged(format!("is not valid gzip: {e}")))?;
                    finished = true;
                }
            }
        }
        if !block.is_empty() {
            let slice = block.split_to(block.len().min(64 * 1024));
            gz.write_all(&slice)
                .map_err(|e| damaged(format!("is not valid gzip: {e}")))?;
        }
        pending.append(gz.get_mut());
        let cut = if finished {
            pending.len()
        } else {
            match pending.iter().rposition(|&b| b == b'\n') {
                Some(i) => i + 1,
                None => continue,
            }
        };
        let whole: Vec<u8> = pending.drain(..cut).collect();
        let text =
            std::str::from_utf8(&whole).map_err(|e| damaged(format!("is not UTF-8: {e}")))?;
        for line in text.lines().filter(|l| !l.is_empty()) {
            let ts = timestamp(line)
                .ok_or_else(|| damaged(format!("has a line without a timestamp: {line:.80}")))?;
            if !range.contains(ts) {
                out.outside += 1;
                continue;
            }
            out.points += 1;
            if !dry {
                body.push_str(line);
                body.push('\n');
                lines_in_body += 1;
                if lines_in_body >= batch {
                    sink.write(&part.retention_policy, &body)
                        .await
                        .map_err(|problem| RestoreError::Write {
                            part: name.clone(),
                            problem,
                        })?;
                    body.clear();
                    lines_in_body = 0;
                }
            }
        }
    }
    if !body.is_empty() {
        sink.write(&part.retention_policy, &body)
            .await
            .map_err(|problem| RestoreError::Write {
                part: name.clone(),
                problem,
            })?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_the_last_field_even_after_escaped_spaces_and_strings() {
        assert_eq!(
            timestamp(r#"m,t=a\ b f="x y" 1700000000000000000"#),
            Some(1_700_000_000_000_000_000)
        );
        assert_eq!(timestamp("m f=1 -5"), Some(-5));
        assert_eq!(timestamp("m f=1"), None);
        let r = Range {
            from_ns: Some(10),
            to_ns: Some(20),
        };
        assert!(r.contains(10) && r.contains(19) && !r.contains(20) && !r.contains(9));
    }
}
