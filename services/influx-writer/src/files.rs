//! The file output: readings appended to CSV or line-protocol files that rotate by size and
//! age (pure std: no tokio, tested on its own).
//!
//! Files are named by the UTC time they were started, `readings-2026-11-24T10-15-00Z.csv`, so
//! the newest is the one being written and a directory listing is a timeline. A batch is
//! written with one `write` and fsynced before its readings are acknowledged.
//!
//! After a crash the current file may end in a partial row (its batch was never
//! acknowledged and will be replayed): it is cut back to the last complete row before anything
//! is appended. Replay after a crash can repeat rows that were written but not yet
//! acknowledged; `(time, device, channel, measurement, field)` identifies a value, so a reader
//! can drop the repeats.

use std::fmt::Write as _;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use proto::Measurement;

use crate::config::{FileFormat, FilesConfig};
use crate::line_protocol::{Precision, encode_point, measurement_point};

const PREFIX: &str = "readings-";

/// Header of the long CSV layout.
pub const CSV_HEADER: &str = "time,site,device,channel,measurement,field,value,quality\n";
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
    /// The file closed by a rotation, if one happened (after compression, if on).
    pub rotated: Option<PathBuf>,
}

impl RotatingFiles {
    /// Open `dir`, continuing its newest file if it is still within bounds.
    pub fn open(dir: &Path, cfg: &FilesConfig) -> io::Result<Self> {
        fs::create_dir_all(dir)?;
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
            let bytes = cut_partial_row(&file)?;
            files.current = Some(Current {
                file,
                path,
                bytes,
                started,
            });
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

    /// Append readings, rotating first if the current file is full or old; fsync.
    pub fn write(&mut self, readings: &[&Measurement], now: SystemTime) -> io::Result<Written> {
        let mut out = Written::default();
        self.buf.clear();
        for (i, m) in readings.iter().enumerate() {
            if let Err(e) = encode(&mut self.buf, self.format, m) {
                out.skipped.push((i, e));
            }
        }
        if self.buf.is_empty() {
            return Ok(out);
        }
        let needs_rotation = self.current.as_ref().is_some_and(|c| {
            c.bytes > 0
                && (c.bytes + self.buf.len() as u64 > self.max_bytes
                    || self.max_age.is_some_and(|age| {
                        now.duration_since(c.started).unwrap_or_default() >= age
                    }))
        });
        if needs_rotation {
            out.rotated = self.rotate()?;
        }
        if self.current.is_none() {
            self.current = Some(self.create(now)?);
        }
        let header = self.header();
        let Some(c) = self.current.as_mut() else {
            return Ok(out);
        };
        if c.bytes == 0 && !header.is_empty() {
            c.file.write_all(header.as_bytes())?;
            c.bytes += header.len() as u64;
            out.bytes += header.len() as u64;
        }
        if let Err(e) = c
            .file
            .write_all(self.buf.as_bytes())
            .and_then(|()| c.file.sync_data())
        {
            // The batch is not acknowledged and will be replayed: take its rows out again,
            // so neither a partial row nor rows that will come back are left behind.
            let _ = c.file.set_len(c.bytes);
            let _ = c.file.seek(SeekFrom::Start(c.bytes));
            return Err(e);
        }
        c.bytes += self.buf.len() as u64;
        out.bytes += self.buf.len() as u64;
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
            match OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
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

/// Cut a torn last row (a crash mid-write) and position at the end. Returns the length.
fn cut_partial_row(mut file: &File) -> io::Result<u64> {
    let len = file.metadata()?.len();
    if len == 0 {
        return Ok(0);
    }
    // Look back at most 64 KiB for the last newline; a row is far shorter.
    let back = len.min(64 * 1024);
    file.seek(SeekFrom::Start(len - back))?;
    let mut tail = Vec::with_capacity(back as usize);
    file.take(back).read_to_end(&mut tail)?;
    let keep = match tail.iter().rposition(|b| *b == b'\n') {
        Some(i) => len - back + i as u64 + 1,
        None if back == len => 0,
        None => len,
    };
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
        let out = File::create(&tmp)?;
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
            for (field, value) in &m.fields {
                let _ = write!(
                    out,
                    "{time},{},{},{},{},",
                    m.site, m.device, m.channel, m.measurement
                );
                csv_field(out, field);
                let _ = writeln!(out, ",{value},{}", m.quality.as_str());
            }
            Ok(())
        }
        FileFormat::CsvPowmon => {
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
    let (y, mo, d, h, mi, s) = civil(secs);
    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}.{ms:03}Z")
}

fn file_stamp(t: SystemTime) -> String {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(0));
    let (y, mo, d, h, mi, s) = civil(secs);
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
    let days = days_from_civil(num(0..4)?, num(5..7)?, num(8..10)?);
    let secs = days * 86_400 + num(11..13)? * 3600 + num(14..16)? * 60 + num(17..19)?;
    Some(UNIX_EPOCH + Duration::from_secs(u64::try_from(secs).ok()?))
}

/// Unix seconds to UTC (year, month, day, hour, minute, second): Howard Hinnant's
/// `civil_from_days`.
fn civil(secs: i64) -> (i64, i64, i64, i64, i64, i64) {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d, rem / 3600, rem % 3600 / 60, rem % 60)
}

fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
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
            "time,site,device,channel,measurement,field,value,quality\n\
             2025-11-24T16:00:00.250Z,home,meter-1,main,power,current_a,2,good\n\
             2025-11-24T16:00:00.250Z,home,meter-1,main,power,power_w,460,good\n"
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
            rotations += usize::from(w.rotated.is_some());
        }
        assert!(rotations >= 2, "{rotations}");
        // Age: an hour later the next write starts a new file.
        let w = f
            .write(&[&reading(T0 + 3_700_000, 1.0)], at(T0 + 3_700_000))
            .unwrap();
        assert!(w.rotated.is_some());
        let files = f.list().unwrap();
        assert_eq!(files.len(), rotations + 2);
        let mut rows = 0;
        for p in &files {
            let text = fs::read_to_string(p).unwrap();
            assert!(fs::metadata(p).unwrap().len() <= 4096);
            let mut lines = text.lines();
            assert_eq!(lines.next(), Some(CSV_HEADER.trim_end()));
            for l in lines {
                assert_eq!(l.split(',').count(), 8, "{l}");
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
        assert!(lines.iter().all(|l| l.split(',').count() == 8), "{text}");
        assert_eq!(f.list().unwrap().len(), 1);
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
        assert!(text.ends_with(",good\n"));
    }
}
