//! The file output: readings appended to CSV or line-protocol files that rotate by size and
//! age (pure std: no tokio, tested on its own).
//!
//! Files are named by the UTC time they were started, `readings-2026-11-24T10-15-00Z.csv`, so
//! the newest is the one being written and a directory listing is a timeline.
//!
//! Invariants:
//! - A batch is written with one `write` per file it lands in and fsynced before its readings
//!   are acknowledged.
//! - Rotation is decided row by row: a file never exceeds `max_bytes`, except by the single row
//!   that starts it (a row larger than `max_bytes` still has to go somewhere). A batch may
//!   therefore end one file and start the next.
//! - After a crash the current file may end in a partial row (its batch was never
//!   acknowledged and will be replayed): it is cut back to the last complete row before
//!   anything is appended.
//! - A file is continued after a restart only if its header is the current one; a file
//!   written in an older layout is left as it is and a new one started, so no file mixes two
//!   layouts.
//! - Replay after a crash can repeat rows that were written but not yet acknowledged;
//!   `(time, site, device, channel, measurement, tags, field)` identifies a value, so a reader
//!   can drop the repeats.
//! - Readings are private: files are created 0600, missing directories 0700.

use std::fmt::Write as _;
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, BufRead as _, BufReader, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use proto::Measurement;

use crate::config::{FileFormat, FilesConfig};
use crate::line_protocol::{Precision, encode_point, measurement_point};

const PREFIX: &str = "readings-";

/// Header of the long CSV layout. `tags` is last so scripts that index the earlier columns
/// keep working; it is `key=value` pairs joined by `;`, sorted by key, empty when the reading
/// has none.
pub const CSV_HEADER: &str = "time,site,device,channel,measurement,field,value,quality,tags\n";
/// Header of the PowMon layout.
pub const POWMON_HEADER: &str = "time,device,amps,watts\n";

#[derive(Debug)]
struct Current {
    file: File,
    path: PathBuf,
    bytes: u64,
    started: SystemTime,
}

/// Rotating files in one directory.
#[derive(Debug)]
pub struct RotatingFiles {
    dir: PathBuf,
    format: FileFormat,
    max_bytes: u64,
    max_age: Option<Duration>,
    gzip: bool,
    keep_files: usize,
    current: Option<Current>,
    /// Reused between batches.
    buf: String,
}

/// What a write did besides appending.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Written {
    pub bytes: u64,
    /// Readings that could not be written (a timestamp outside the range of line protocol).
    pub skipped: Vec<(usize, String)>,
    /// The files closed by rotations, oldest first (after compression, if on).
    pub rotated: Vec<PathBuf>,
}

impl RotatingFiles {
    /// Open `dir`, continuing its newest file if it is still within bounds.
    pub fn open(dir: &Path, cfg: &FilesConfig) -> io::Result<Self> {
        DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
        let mut files = Self {
            dir: dir.to_path_buf(),
            format: cfg.format,
            max_bytes: cfg.max_bytes,
            max_age: (cfg.max_age_s > 0).then(|| Duration::from_secs(cfg.max_age_s)),
            gzip: cfg.gzip,
            keep_files: cfg.keep_files,
            current: None,
            buf: String::new(),
        };
        if let Some(path) = files.newest_open_file()? {
            let started = parse_name(&path, files.extension()).unwrap_or_else(SystemTime::now);
            let file = OpenOptions::new().read(true).write(true).open(&path)?;
            if has_header(&file, files.header())? {
                let bytes = cut_partial_row(&file)?;
                files.current = Some(Current {
                    file,
                    path,
                    bytes,
                    started,
                });
            } else {
                tracing::info!(
                    file = %path.display(),
                    "The newest readings file has another header (an older layout); starting a new file."
                );
            }
        }
        Ok(files)
    }

    fn extension(&self) -> &'static str {
        match self.format {
            FileFormat::Csv | FileFormat::CsvPowmon => "csv",
            FileFormat::LineProtocol => "lp",
        }
    }

    fn header(&self) -> &'static str {
        match self.format {
            FileFormat::Csv => CSV_HEADER,
            FileFormat::CsvPowmon => POWMON_HEADER,
            FileFormat::LineProtocol => "",
        }
    }

    /// The file being written, if any.
    pub fn current_path(&self) -> Option<&Path> {
        self.current.as_ref().map(|c| c.path.as_path())
    }

    /// Files of this format in the directory, oldest first (compressed ones included).
    pub fn list(&self) -> io::Result<Vec<PathBuf>> {
        let ext = self.extension();
        let mut v: Vec<PathBuf> = fs::read_dir(&self.dir)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                    n.starts_with(PREFIX)
                        && (n.ends_with(&format!(".{ext}")) || n.ends_with(&format!(".{ext}.gz")))
                })
            })
            .collect();
        // By start time, then by the `-N` suffix a second file of the same second gets
        // (a plain sort would put `…Z-1.csv` before `…Z.csv`).
        v.sort_by_key(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            let stamp = name
                .get(PREFIX.len()..PREFIX.len() + 20)
                .unwrap_or_default()
                .to_string();
            let n: u32 = name
                .get(PREFIX.len() + 20..)
                .and_then(|rest| rest.strip_prefix('-'))
                .and_then(|rest| rest.split('.').next())
                .and_then(|d| d.parse().ok())
                .unwrap_or(0);
            (stamp, n)
        });
        Ok(v)
    }

    fn newest_open_file(&self) -> io::Result<Option<PathBuf>> {
        let ext = format!(".{}", self.extension());
        Ok(self
            .list()?
            .into_iter()
            .rev()
            .find(|p| p.to_string_lossy().ends_with(&ext)))
    }

    /// Append readings, rotating when the current file is old, and before any row that would
    /// take it past `max_bytes`; fsync every file written.
    pub fn write(&mut self, readings: &[&Measurement], now: SystemTime) -> io::Result<Written> {
        let mut out = Written::default();
        self.buf.clear();
        // Where each row ends in `buf`.
        let mut row_ends: Vec<usize> = Vec::with_capacity(readings.len());
        for (i, m) in readings.iter().enumerate() {
            let before = self.buf.len();
            match encode(&mut self.buf, self.format, m) {
                Ok(()) => row_ends.extend(
                    self.buf[before..]
                        .match_indices('\n')
                        .map(|(at, _)| before + at + 1),
                ),
                Err(e) => {
                    self.buf.truncate(before);
                    out.skipped.push((i, e));
                }
            }
        }
        if row_ends.is_empty() {
            return Ok(out);
        }
        let header = self.header();
        let too_old = self.current.as_ref().is_some_and(|c| {
            self.max_age
                .is_some_and(|age| now.duration_since(c.started).unwrap_or_default() >= age)
        });
        if too_old && self.current.as_ref().is_some_and(|c| has_rows(c, header)) {
            out.rotated.extend(self.rotate()?);
        }
        let mut rows = row_ends.iter().peekable();
        let mut from = 0;
        while rows.peek().is_some() {
            if self.current.is_none() {
                self.current = Some(self.create(now)?);
            }
            let Some(c) = self.current.as_mut() else {
                break;
            };
            let head = if c.bytes == 0 { header } else { "" };
            // Rows that fit; the first row of a file always does.
            let mut to = from;
            let mut has_row = has_rows(c, header);
            while let Some(&&end) = rows.peek() {
                let size = c.bytes + (head.len() + end - from) as u64;
                if has_row && size > self.max_bytes {
                    break;
                }
                to = end;
                has_row = true;
                rows.next();
            }
            if to > from {
                append(c, head, &self.buf[from..to])?;
                out.bytes += (head.len() + to - from) as u64;
                from = to;
            }
            if rows.peek().is_some() {
                out.rotated.extend(self.rotate()?);
            }
        }
        Ok(out)
    }

    fn create(&self, now: SystemTime) -> io::Result<Current> {
        let stamp = file_stamp(now);
        let ext = self.extension();
        let mut n = 0;
        loop {
            let name = if n == 0 {
                format!("{PREFIX}{stamp}.{ext}")
            } else {
                format!("{PREFIX}{stamp}-{n}.{ext}")
            };
            let path = self.dir.join(name);
            // A file of this name compressed earlier leaves only `<name>.gz`: taking the name
            // again would have its compression rename over that one (two rotations in one
            // second, a writer catching up, lost acknowledged readings).
            let mut gz = path.clone().into_os_string();
            gz.push(".gz");
            if Path::new(&gz).exists() && n < 1000 {
                n += 1;
                continue;
            }
            match OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
            {
                Ok(file) => {
                    // The new name must survive a power cut, or the next start would continue
                    // the previous file.
                    if let Ok(d) = File::open(&self.dir) {
                        let _ = d.sync_all();
                    }
                    return Ok(Current {
                        file,
                        path,
                        bytes: 0,
                        started: now,
                    });
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists && n < 1000 => n += 1,
                Err(e) => return Err(e),
            }
        }
    }

    /// Close the current file (compressing it if configured) and prune old ones.
    fn rotate(&mut self) -> io::Result<Option<PathBuf>> {
        let Some(c) = self.current.take() else {
            return Ok(None);
        };
        drop(c.file);
        let closed = if self.gzip {
            let gz = compress(&c.path)?;
            Some(gz)
        } else {
            Some(c.path)
        };
        if self.keep_files > 0 {
            let files = self.list()?;
            let excess = files.len().saturating_sub(self.keep_files);
            for old in files.into_iter().take(excess) {
                fs::remove_file(&old)?;
            }
        }
        Ok(closed)
    }
}

/// Whether the file holds a row besides its header.
fn has_rows(c: &Current, header: &str) -> bool {
    c.bytes > header.len() as u64
}

/// Write a file's header (if it is new) and rows with one `write`, and fsync. On failure the
/// file is cut back to where it was: the batch is not acknowledged and will be replayed, so
/// neither a partial row nor rows that will come back are left behind.
fn append(c: &mut Current, head: &str, rows: &str) -> io::Result<()> {
    let mut chunk = String::with_capacity(head.len() + rows.len());
    chunk.push_str(head);
    chunk.push_str(rows);
    if let Err(e) = c
        .file
        .write_all(chunk.as_bytes())
        .and_then(|()| c.file.sync_data())
    {
        if let Err(cut) = c
            .file
            .set_len(c.bytes)
            .and_then(|()| c.file.seek(SeekFrom::Start(c.bytes)).map(drop))
        {
            tracing::error!(file = %c.path.display(), error = %cut, "Cannot cut a failed write back out of the readings file; rows of a batch that will be replayed may appear twice.");
        }
        return Err(e);
    }
    c.bytes += chunk.len() as u64;
    Ok(())
}

/// Whether a file to be continued starts with `header` (an empty file, or a format without a
/// header, always qualifies).
fn has_header(file: &File, header: &str) -> io::Result<bool> {
    if header.is_empty() || file.metadata()?.len() == 0 {
        return Ok(true);
    }
    let mut first = String::new();
    BufReader::new(file)
        .take(header.len() as u64 + 1)
        .read_line(&mut first)?;
    Ok(first == header)
}

/// Cut a torn last row (a crash mid-write) and position at the end. Returns the length.
fn cut_partial_row(mut file: &File) -> io::Result<u64> {
    let len = file.metadata()?.len();
    if len == 0 {
        return Ok(0);
    }
    // Back to the last newline, 64 KiB at a time: a row is usually far shorter, but one with
    // many tags can be longer (a torn row of 680 KiB was kept, and the next row glued to it).
    const CHUNK: u64 = 64 * 1024;
    let mut end = len;
    let mut keep = 0;
    let mut chunk = Vec::with_capacity(CHUNK as usize);
    while end > 0 {
        let start = end.saturating_sub(CHUNK);
        file.seek(SeekFrom::Start(start))?;
        chunk.clear();
        file.take(end - start).read_to_end(&mut chunk)?;
        if let Some(i) = chunk.iter().rposition(|b| *b == b'\n') {
            keep = start + i as u64 + 1;
            break;
        }
        end = start;
    }
    if keep < len {
        tracing::warn!(
            cut_bytes = len - keep,
            "The readings file ended in a partial row (a crash mid-write); cut it off. Its readings are replayed."
        );
        file.set_len(keep)?;
        file.sync_data()?;
    }
    file.seek(SeekFrom::Start(keep))?;
    Ok(keep)
}

fn compress(path: &Path) -> io::Result<PathBuf> {
    let mut gz_name = path.as_os_str().to_owned();
    gz_name.push(".gz");
    let gz_path = PathBuf::from(gz_name);
    let tmp = gz_path.with_extension("gz.tmp");
    let write = || -> io::Result<()> {
        let mut input = File::open(path)?;
        let out = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        // Level 1: CSV of readings still shrinks ~8×, at a fraction of the CPU on a Pi.
        let mut enc = flate2::write::GzEncoder::new(out, flate2::Compression::fast());
        io::copy(&mut input, &mut enc)?;
        let out = enc.finish()?;
        out.sync_all()
    };
    if let Err(e) = write() {
        // The plain file stays; only the half-written copy goes.
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    fs::rename(&tmp, &gz_path)?;
    fs::remove_file(path)?;
    Ok(gz_path)
}

/// One reading as rows of the chosen format.
fn encode(out: &mut String, format: FileFormat, m: &Measurement) -> Result<(), String> {
    match format {
        FileFormat::Csv => {
            let time = iso_ms(m.ts_ms);
            // Tag keys and values are topic segments (`[A-Za-z0-9._-]`): no `=`, `;`, `,` or
            // quote can occur, so the column needs no escaping and is never quoted.
            let mut tags = String::new();
            for (k, v) in &m.tags {
                if !tags.is_empty() {
                    tags.push(';');
                }
                let _ = write!(tags, "{k}={v}");
            }
            for (field, value) in &m.fields {
                let _ = write!(
                    out,
                    "{time},{},{},{},{},",
                    m.site, m.device, m.channel, m.measurement
                );
                csv_field(out, field);
                let _ = writeln!(out, ",{value},{},{tags}", m.quality.as_str());
            }
            Ok(())
        }
        FileFormat::CsvPowmon => {
            // The format has a place for current and power only. A reading with neither
            // (energy, a temperature) would be an empty row, acknowledged and so deleted
            // upstream: it is refused instead, which keeps it in the dead-letter file.
            if !m.fields.contains_key("current_a") && !m.fields.contains_key("power_w") {
                return Err(format!(
                    "csv-powmon has columns for current_a and power_w only, and this {} reading has neither; use format \"csv\" to keep every reading",
                    m.measurement
                ));
            }
            let time = iso_ms(m.ts_ms);
            let get = |k: &str| m.fields.get(k).map(|v| v.to_string()).unwrap_or_default();
            let _ = writeln!(
                out,
                "{time},{},{},{}",
                m.device,
                get("current_a"),
                get("power_w")
            );
            Ok(())
        }
        FileFormat::LineProtocol => measurement_point(m, Precision::Ms)
            .and_then(|p| encode_point(out, &p))
            .map_err(|e| e.to_string()),
    }
}

/// A CSV value, quoted when it holds a comma, quote or line break (RFC 4180).
fn csv_field(out: &mut String, s: &str) {
    if s.contains([',', '"', '\n', '\r']) {
        out.push('"');
        out.push_str(&s.replace('"', "\"\""));
        out.push('"');
    } else {
        out.push_str(s);
    }
}

/// `2026-11-24T10:15:00.123Z`.
pub fn iso_ms(ts_ms: i64) -> String {
    let secs = ts_ms.div_euclid(1000);
    let ms = ts_ms.rem_euclid(1000);
    let (y, mo, d, h, mi, s) = proto::utc::civil(secs);
    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}.{ms:03}Z")
}

fn file_stamp(t: SystemTime) -> String {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(0));
    let (y, mo, d, h, mi, s) = proto::utc::civil(secs);
    format!("{y:04}-{mo:02}-{d:02}T{h:02}-{mi:02}-{s:02}Z")
}

/// The start time encoded in a file name.
fn parse_name(path: &Path, ext: &str) -> Option<SystemTime> {
    let name = path.file_name()?.to_str()?;
    let stamp = name
        .strip_prefix(PREFIX)?
        .strip_suffix(&format!(".{ext}"))?;
    let stamp = stamp.get(..20)?; // YYYY-MM-DDTHH-MM-SSZ
    let num = |r: std::ops::Range<usize>| stamp.get(r)?.parse::<i64>().ok();
    let days = proto::utc::days_from_civil(num(0..4)?, num(5..7)?, num(8..10)?);
    let secs = days * 86_400 + num(11..13)? * 3600 + num(14..16)? * 60 + num(17..19)?;
    Some(UNIX_EPOCH + Duration::from_secs(u64::try_from(secs).ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::{Quality, Segment};

    fn seg(s: &str) -> Segment {
        Segment::new(s).unwrap()
    }

    fn reading(ts_ms: i64, power: f64) -> Measurement {
        Measurement {
            origin: None,
            site: seg("home"),
            device: seg("meter-1"),
            channel: seg("main"),
            measurement: seg("power"),
            ts_ms,
            quality: Quality::Good,
            fields: [
                ("power_w".to_string(), power),
                ("current_a".to_string(), power / 230.0),
            ]
            .into(),
            tags: Default::default(),
        }
    }

    fn cfg(format: FileFormat) -> FilesConfig {
        FilesConfig {
            enabled: Some(true),
            dir: None,
            format,
            max_bytes: 4096,
            max_age_s: 3600,
            gzip: false,
            keep_files: 0,
        }
    }

    const T0: i64 = 1_795_000_000_000; // 2026-11-18T…

    fn at(ms: i64) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(ms as u64)
    }

    #[test]
    fn dates_match_known_instants() {
        assert_eq!(iso_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(iso_ms(951_782_400_123), "2000-02-29T00:00:00.123Z");
        assert_eq!(iso_ms(1_764_000_000_999), "2025-11-24T16:00:00.999Z");
        let t = at(1_764_000_000_000);
        let name = format!("{PREFIX}{}.csv", file_stamp(t));
        assert_eq!(name, "readings-2025-11-24T16-00-00Z.csv");
        assert_eq!(parse_name(Path::new(&name), "csv"), Some(t));
    }

    #[test]
    fn csv_rows_per_field_value_with_a_header() {
        let dir = tempfile::tempdir().unwrap();
        let mut f = RotatingFiles::open(dir.path(), &cfg(FileFormat::Csv)).unwrap();
        let r = reading(1_764_000_000_250, 460.0);
        f.write(&[&r], at(1_764_000_000_250)).unwrap();
        let text = fs::read_to_string(f.current_path().unwrap()).unwrap();
        assert_eq!(
            text,
            "time,site,device,channel,measurement,field,value,quality,tags\n\
             2025-11-24T16:00:00.250Z,home,meter-1,main,power,current_a,2,good,\n\
             2025-11-24T16:00:00.250Z,home,meter-1,main,power,power_w,460,good,\n"
        );
    }

    #[test]
    fn powmon_and_line_protocol_layouts() {
        let dir = tempfile::tempdir().unwrap();
        let mut f = RotatingFiles::open(dir.path(), &cfg(FileFormat::CsvPowmon)).unwrap();
        f.write(&[&reading(1_764_000_000_000, 230.0)], at(T0))
            .unwrap();
        let text = fs::read_to_string(f.current_path().unwrap()).unwrap();
        assert_eq!(
            text,
            "time,device,amps,watts\n2025-11-24T16:00:00.000Z,meter-1,1,230\n"
        );

        let dir = tempfile::tempdir().unwrap();
        let mut f = RotatingFiles::open(dir.path(), &cfg(FileFormat::LineProtocol)).unwrap();
        f.write(&[&reading(1_764_000_000_000, 230.0)], at(T0))
            .unwrap();
        let text = fs::read_to_string(f.current_path().unwrap()).unwrap();
        assert_eq!(
            text,
            "power,channel=main,device=meter-1,quality=good,site=home current_a=1.0,power_w=230.0 1764000000000\n"
        );
    }

    /// A reading the format has no column for is refused (and so dead-lettered, not
    /// acknowledged as stored): an empty row used to stand for a temperature or an energy.
    #[test]
    fn powmon_refuses_a_reading_without_current_or_power() {
        let dir = tempfile::tempdir().unwrap();
        let mut f = RotatingFiles::open(dir.path(), &cfg(FileFormat::CsvPowmon)).unwrap();
        let mut temperature = reading(T0, 1.0);
        temperature.measurement = seg("temperature");
        temperature.fields = [("temperature_c".to_string(), 4.5)].into();
        let out = f
            .write(&[&temperature, &reading(T0, 230.0)], at(T0))
            .unwrap();
        assert_eq!(out.skipped.len(), 1, "{:?}", out.skipped);
        assert_eq!(out.skipped[0].0, 0);
        assert!(
            out.skipped[0].1.contains("use format \"csv\""),
            "{:?}",
            out.skipped
        );
        let text = fs::read_to_string(f.current_path().unwrap()).unwrap();
        let rows: Vec<&str> = text.lines().collect();
        assert_eq!(rows.len(), 2, "{text}");
        assert!(rows[1].ends_with(",meter-1,1,230"), "{text}");
    }

    #[test]
    fn files_of_the_same_second_sort_in_creation_order() {
        let dir = tempfile::tempdir().unwrap();
        let f = RotatingFiles::open(dir.path(), &cfg(FileFormat::Csv)).unwrap();
        let now = at(T0);
        let names: Vec<PathBuf> = (0..3).map(|_| f.create(now).unwrap().path).collect();
        assert!(names[1].to_string_lossy().ends_with("Z-1.csv"));
        assert_eq!(f.list().unwrap(), names);
        // The newest, which a restart continues, is the last one created.
        assert_eq!(f.newest_open_file().unwrap().as_ref(), names.last());
    }

    #[test]
    fn csv_quotes_awkward_field_names() {
        let mut s = String::new();
        csv_field(&mut s, "a,b \"c\"");
        assert_eq!(s, "\"a,b \"\"c\"\"\"");
    }

    #[test]
    fn rotates_by_size_and_by_age_and_keeps_every_row() {
        let dir = tempfile::tempdir().unwrap();
        let mut f = RotatingFiles::open(dir.path(), &cfg(FileFormat::Csv)).unwrap();
        let mut rotations = 0;
        // ~70 bytes per row, 2 rows per reading: 4 KiB holds about 29 readings.
        for i in 0..100 {
            let r = reading(T0 + i * 1000, i as f64);
            let w = f.write(&[&r], at(T0 + i * 1000)).unwrap();
            rotations += w.rotated.len();
        }
        assert!(rotations >= 2, "{rotations}");
        // Age: an hour later the next write starts a new file.
        let w = f
            .write(&[&reading(T0 + 3_700_000, 1.0)], at(T0 + 3_700_000))
            .unwrap();
        assert_eq!(w.rotated.len(), 1);
        let files = f.list().unwrap();
        assert_eq!(files.len(), rotations + 2);
        let mut rows = 0;
        for p in &files {
            let text = fs::read_to_string(p).unwrap();
            assert!(fs::metadata(p).unwrap().len() <= 4096);
            let mut lines = text.lines();
            assert_eq!(lines.next(), Some(CSV_HEADER.trim_end()));
            for l in lines {
                assert_eq!(l.split(',').count(), 9, "{l}");
                rows += 1;
            }
        }
        assert_eq!(rows, 101 * 2);
    }

    #[test]
    fn restart_appends_and_cuts_a_torn_row() {
        let dir = tempfile::tempdir().unwrap();
        let path = {
            let mut f = RotatingFiles::open(dir.path(), &cfg(FileFormat::Csv)).unwrap();
            f.write(&[&reading(T0, 1.0)], at(T0)).unwrap();
            f.current_path().unwrap().to_path_buf()
        };
        // A crash in the middle of the next row.
        let mut raw = OpenOptions::new().append(true).open(&path).unwrap();
        raw.write_all(b"2026-11-18T00:00:01.000Z,home,met").unwrap();
        drop(raw);
        let mut f = RotatingFiles::open(dir.path(), &cfg(FileFormat::Csv)).unwrap();
        assert_eq!(f.current_path(), Some(path.as_path()));
        f.write(&[&reading(T0 + 1000, 2.0)], at(T0 + 1000)).unwrap();
        let text = fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 1 + 4, "{text}");
        assert!(lines.iter().all(|l| l.split(',').count() == 9), "{text}");
        assert_eq!(f.list().unwrap().len(), 1);
    }

    /// A row can be longer than one look-back (many tags): a crash inside such a row must
    /// still be cut back to the row before, not leave the next row glued to it.
    #[test]
    fn a_torn_row_longer_than_64_kib_is_cut_too() {
        let dir = tempfile::tempdir().unwrap();
        let mut big = reading(T0, 1.0);
        big.tags = (0..20_000)
            .map(|i| (seg(&format!("t{i:05}")), seg("vvvvvvvvvvvvvvvvvvvv")))
            .collect();
        let cfg = FilesConfig {
            max_bytes: 64 << 20,
            ..cfg(FileFormat::Csv)
        };
        let path = {
            let mut f = RotatingFiles::open(dir.path(), &cfg).unwrap();
            f.write(&[&reading(T0, 1.0), &big], at(T0)).unwrap();
            f.current_path().unwrap().to_path_buf()
        };
        // A power cut 5000 bytes before the end of the last (longest) row.
        let len = fs::metadata(&path).unwrap().len();
        OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(len - 5000)
            .unwrap();
        let mut f = RotatingFiles::open(dir.path(), &cfg).unwrap();
        f.write(&[&reading(T0 + 1000, 333.0)], at(T0 + 1000))
            .unwrap();
        assert_eq!(f.list().unwrap().len(), 1);
        let text = fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines.iter().all(|l| l.split(',').count() == 9));
        // Header, the small reading's two rows, the big one's first field row (complete),
        // then the new reading's two rows: the torn second field row of `big` is gone.
        assert_eq!(lines.len(), 1 + 2 + 1 + 2, "{} lines", lines.len());
        assert!(lines[5].contains(",power_w,333,"), "{}", &lines[5][..80]);
    }

    #[test]
    fn gzip_on_rotation_and_keep_files() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = cfg(FileFormat::Csv);
        c.gzip = true;
        c.keep_files = 3;
        let mut f = RotatingFiles::open(dir.path(), &c).unwrap();
        for i in 0..200 {
            let r = reading(T0 + i * 1000, i as f64);
            f.write(&[&r], at(T0 + i * 1000)).unwrap();
        }
        let files = f.list().unwrap();
        // Three rotated files kept, plus the one being written.
        assert_eq!(files.len(), 4, "{files:?}");
        let gz: Vec<_> = files
            .iter()
            .filter(|p| p.to_string_lossy().ends_with(".csv.gz"))
            .collect();
        assert_eq!(gz.len(), 3);
        let mut text = String::new();
        flate2::read::GzDecoder::new(File::open(gz[0]).unwrap())
            .read_to_string(&mut text)
            .unwrap();
        assert!(text.starts_with(CSV_HEADER), "{text}");
        assert!(text.ends_with(",good,\n"));
    }

    /// A batch several times `max_bytes` rotates several times in one second. A name whose
    /// file was compressed is taken: reused, its compression renamed over the earlier `.gz`
    /// and acknowledged readings were gone (third hostile review).
    #[test]
    fn rotations_within_one_second_with_gzip_keep_every_row() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = cfg(FileFormat::Csv);
        c.gzip = true;
        let mut f = RotatingFiles::open(dir.path(), &c).unwrap();
        let batch: Vec<Measurement> = (0..300).map(|i| reading(T0 + i, i as f64)).collect();
        let refs: Vec<&Measurement> = batch.iter().collect();
        let out = f.write(&refs, at(T0)).unwrap();
        assert!(out.rotated.len() >= 3, "{:?}", out.rotated);
        let mut rows = 0;
        for path in f.list().unwrap() {
            let mut text = String::new();
            if path.to_string_lossy().ends_with(".gz") {
                flate2::read::GzDecoder::new(File::open(&path).unwrap())
                    .read_to_string(&mut text)
                    .unwrap();
            } else {
                text = fs::read_to_string(&path).unwrap();
            }
            rows += text.lines().filter(|l| !l.starts_with("time,")).count();
        }
        assert_eq!(
            rows, 600,
            "two rows (current and power) for each of 300 readings"
        );
    }

    fn tagged(
        ts_ms: i64,
        device: &str,
        field: &str,
        value: f64,
        tags: &[(&str, &str)],
    ) -> Measurement {
        let mut m = reading(ts_ms, 0.0);
        m.device = seg(device);
        m.channel = seg("total");
        m.measurement = seg("energy");
        m.fields = [(field.to_string(), value)].into();
        m.tags = tags.iter().map(|(k, v)| (seg(k), seg(v))).collect();
        m
    }

    #[test]
    fn csv_keeps_tags_so_tariff_and_basis_rows_never_share_a_key() {
        let dir = tempfile::tempdir().unwrap();
        let mut f = RotatingFiles::open(dir.path(), &cfg(FileFormat::Csv)).unwrap();
        // One poll of a WE-515: the total and the four tariff registers, same time, device,
        // channel, measurement and field; and a CT reading labelled with its power basis.
        let mut batch = vec![tagged(T0, "we515-1", "energy_wh", 1000.0, &[])];
        for (i, t) in ["t1", "t2", "t3", "t4"].iter().enumerate() {
            batch.push(tagged(
                T0,
                "we515-1",
                "energy_wh",
                i as f64,
                &[("tariff", t)],
            ));
        }
        batch.push(tagged(
            T0,
            "ct-1",
            "apparent_power_va",
            460.0,
            &[("power_basis", "nominal_voltage"), ("phase", "l1")],
        ));
        let refs: Vec<&Measurement> = batch.iter().collect();
        f.write(&refs, at(T0)).unwrap();
        let text = fs::read_to_string(f.current_path().unwrap()).unwrap();
        let rows: Vec<Vec<&str>> = text
            .lines()
            .skip(1)
            .map(|l| l.split(',').collect())
            .collect();
        assert_eq!(rows.len(), 6, "{text}");
        let tags: Vec<&str> = rows.iter().map(|r| r[8]).collect();
        assert_eq!(
            tags,
            [
                "",
                "tariff=t1",
                "tariff=t2",
                "tariff=t3",
                "tariff=t4",
                "phase=l1;power_basis=nominal_voltage"
            ],
            "tags sorted by key"
        );
        // (time, site, device, channel, measurement, field, tags) is a key: no two rows share it.
        let mut keys: Vec<Vec<&str>> = rows.iter().map(|r| [&r[..6], &r[8..]].concat()).collect();
        keys.sort();
        keys.dedup();
        assert_eq!(keys.len(), 6, "{text}");
        assert_eq!(rows[3][6], "2", "tariff t3's own value: {text}");
    }

    fn file_sizes(f: &RotatingFiles) -> Vec<(u64, usize)> {
        f.list()
            .unwrap()
            .iter()
            .map(|p| {
                let text = fs::read_to_string(p).unwrap();
                (text.len() as u64, text.lines().count() - 1)
            })
            .collect()
    }

    #[test]
    fn rotation_is_decided_per_row_so_a_big_batch_cannot_overshoot() {
        let dir = tempfile::tempdir().unwrap();
        let mut f = RotatingFiles::open(dir.path(), &cfg(FileFormat::Csv)).unwrap();
        // One batch of 300 readings (600 rows, ~42 KB) into 4 KiB files: what a loaded
        // machine delivers when the writer falls behind.
        let batch: Vec<Measurement> = (0..300).map(|i| reading(T0 + i, i as f64)).collect();
        let refs: Vec<&Measurement> = batch.iter().collect();
        let w = f.write(&refs, at(T0)).unwrap();
        let sizes = file_sizes(&f);
        assert_eq!(w.rotated.len() + 1, sizes.len());
        assert!(sizes.len() >= 10, "{sizes:?}");
        for (bytes, _) in &sizes {
            assert!(*bytes <= 4096, "a file overshoots max_bytes: {sizes:?}");
        }
        assert_eq!(sizes.iter().map(|(_, rows)| rows).sum::<usize>(), 600);
        // Filled, not merely bounded: each closed file was full up to less than one row.
        for (bytes, _) in &sizes[..sizes.len() - 1] {
            assert!(*bytes > 4096 - 100, "{sizes:?}");
        }

        // A row larger than max_bytes still gets written: alone, at the start of a file.
        let mut c = cfg(FileFormat::LineProtocol);
        c.max_bytes = 10;
        let dir = tempfile::tempdir().unwrap();
        let mut f = RotatingFiles::open(dir.path(), &c).unwrap();
        let batch = [reading(T0, 1.0), reading(T0 + 1, 2.0)];
        f.write(&[&batch[0], &batch[1]], at(T0)).unwrap();
        f.write(&[&batch[0]], at(T0)).unwrap();
        let sizes = file_sizes(&f);
        assert_eq!(sizes.len(), 3, "one oversized row per file: {sizes:?}");
    }

    #[test]
    fn readings_files_and_their_directory_are_private() {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        let dir = tempfile::tempdir().unwrap();
        let readings = dir.path().join("data/readings");
        let mut c = cfg(FileFormat::Csv);
        c.gzip = true;
        let mut f = RotatingFiles::open(&readings, &c).unwrap();
        for i in 0..100 {
            f.write(&[&reading(T0 + i * 1000, i as f64)], at(T0 + i * 1000))
                .unwrap();
        }
        assert_eq!(mode(&readings), 0o700);
        assert_eq!(mode(&dir.path().join("data")), 0o700);
        let files = f.list().unwrap();
        assert!(files.len() >= 2, "{files:?}");
        assert!(files[0].to_string_lossy().ends_with(".gz"));
        for p in &files {
            assert_eq!(mode(p), 0o600, "{}", p.display());
        }
    }

    #[test]
    fn a_file_in_an_older_layout_is_left_alone_and_a_new_one_started() {
        let dir = tempfile::tempdir().unwrap();
        let old = dir.path().join("readings-2025-11-24T16-00-00Z.csv");
        let old_text = "time,site,device,channel,measurement,field,value,quality\n\
                        2025-11-24T16:00:00.250Z,home,meter-1,main,power,power_w,460,good\n";
        fs::write(&old, old_text).unwrap();
        let mut f = RotatingFiles::open(dir.path(), &cfg(FileFormat::Csv)).unwrap();
        assert_eq!(f.current_path(), None);
        f.write(&[&reading(T0, 1.0)], at(T0)).unwrap();
        assert_eq!(fs::read_to_string(&old).unwrap(), old_text);
        let new = f.current_path().unwrap().to_path_buf();
        assert_ne!(new, old);
        assert!(fs::read_to_string(&new).unwrap().starts_with(CSV_HEADER));
        // The new file, in the current layout, is continued by the next start.
        drop(f);
        let f = RotatingFiles::open(dir.path(), &cfg(FileFormat::Csv)).unwrap();
        assert_eq!(f.current_path(), Some(new.as_path()));
    }
}
