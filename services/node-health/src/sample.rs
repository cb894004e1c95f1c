//! The pure core: what the kernel's files say, turned into readings. No tokio, no clock, no
//! I/O: the parsers take a file's text, and [`Sampler`] takes a [`Snapshot`] (the texts read
//! at one moment, or why they could not be read) with the monotonic time it was taken.
//!
//! Invariants:
//! - A source that could not be read or parsed is left out of that reading and reported in
//!   [`Sample::outcomes`]; it is never published as zero. A group whose every source failed
//!   is not published at all (a measurement has at least one field).
//! - Rates (CPU use, bytes written per second) need two samples: the first publishes none,
//!   and a counter that went backwards (a wrapped 32-bit counter, a disk replaced) starts a
//!   new baseline instead of publishing a negative or huge rate. A failed read keeps the
//!   last good baseline, so the next rate spans the gap and is still the true average.
//! - Nothing here panics on input: every line and number is looked up, never indexed.

use std::collections::BTreeMap;
use std::time::Duration;

use proto::Segment;

/// The sector of `/proc/diskstats`: always 512 bytes, whatever the device's own sector size
/// (the kernel's Documentation/admin-guide/iostats.rst).
pub const DISKSTATS_SECTOR_BYTES: u64 = 512;

/// A problem with a file's content (its reading is the caller's).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("{what} is missing")]
    Missing { what: &'static str },
    #[error("{what} is {text:?}, not a number")]
    NotANumber { what: &'static str, text: String },
    #[error("{0}")]
    Invalid(String),
}

/// At most this much of a bad value goes into a message: a garbage file must not flood the log.
const SNIPPET: usize = 40;

fn snippet(s: &str) -> String {
    let mut out: String = s.chars().take(SNIPPET).collect();
    if s.chars().nth(SNIPPET).is_some() {
        out.push('…');
    }
    out
}

fn number<T: std::str::FromStr>(what: &'static str, text: Option<&str>) -> Result<T, ParseError> {
    let text = text.ok_or(ParseError::Missing { what })?;
    text.parse().map_err(|_| ParseError::NotANumber {
        what,
        text: snippet(text),
    })
}

fn finite(what: &'static str, text: Option<&str>) -> Result<f64, ParseError> {
    let v: f64 = number(what, text)?;
    if v.is_finite() {
        Ok(v)
    } else {
        Err(ParseError::NotANumber {
            what,
            text: snippet(text.unwrap_or("")),
        })
    }
}

/// Widen a count the platform gives as `u32` or `u64` (statvfs on armv7 and aarch64).
pub fn wide<T: Into<u64>>(v: T) -> u64 {
    v.into()
}

#[allow(clippy::cast_precision_loss)] // byte and jiffy counts far below 2^53
fn f(v: u64) -> f64 {
    v as f64
}

// --- /proc/stat ----------------------------------------------------------------------------

/// The aggregate `cpu` line of `/proc/stat`, in clock ticks since boot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CpuTimes {
    pub user: u64,
    pub nice: u64,
    pub system: u64,
    pub idle: u64,
    pub iowait: u64,
    pub irq: u64,
    pub softirq: u64,
    pub steal: u64,
}

impl CpuTimes {
    /// `guest` and `guest_nice` are left out: the kernel already counts them in `user` and
    /// `nice`.
    fn parts(&self) -> [u64; 8] {
        [
            self.user,
            self.nice,
            self.system,
            self.idle,
            self.iowait,
            self.irq,
            self.softirq,
            self.steal,
        ]
    }

    fn total(&self) -> u64 {
        self.parts().iter().fold(0u64, |a, b| a.saturating_add(*b))
    }
}

/// The first line of `/proc/stat`: `cpu  user nice system idle iowait irq softirq steal …`.
/// Kernels before 2.6.11 have fewer columns; the missing ones count as 0.
pub fn parse_stat(text: &str) -> Result<CpuTimes, ParseError> {
    let line = text
        .lines()
        .find(|l| l.split_whitespace().next() == Some("cpu"))
        .ok_or(ParseError::Missing {
            what: "the aggregate `cpu` line",
        })?;
    let mut cols = line.split_whitespace().skip(1);
    const NAMES: [&str; 8] = [
        "cpu user",
        "cpu nice",
        "cpu system",
        "cpu idle",
        "cpu iowait",
        "cpu irq",
        "cpu softirq",
        "cpu steal",
    ];
    let mut v = [0u64; 8];
    for (i, (slot, what)) in v.iter_mut().zip(NAMES).enumerate() {
        match cols.next() {
            Some(text) => *slot = number(what, Some(text))?,
            // user, nice, system and idle exist on every kernel.
            None if i < 4 => return Err(ParseError::Missing { what }),
            None => {}
        }
    }
    let [user, nice, system, idle, iowait, irq, softirq, steal] = v;
    Ok(CpuTimes {
        user,
        nice,
        system,
        idle,
        iowait,
        irq,
        softirq,
        steal,
    })
}

// --- /proc/loadavg -------------------------------------------------------------------------

/// `/proc/loadavg`: `0.52 0.58 0.59 1/467 12345`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LoadAvg {
    pub one: f64,
    pub five: f64,
    pub fifteen: f64,
}

pub fn parse_loadavg(text: &str) -> Result<LoadAvg, ParseError> {
    let mut cols = text.split_whitespace();
    let one = finite("the 1-minute load", cols.next())?;
    let five = finite("the 5-minute load", cols.next())?;
    let fifteen = finite("the 15-minute load", cols.next())?;
    if [one, five, fifteen].iter().any(|v| *v < 0.0) {
        return Err(ParseError::Invalid(format!(
            "a negative load average in {:?}",
            snippet(text.trim())
        )));
    }
    Ok(LoadAvg { one, five, fifteen })
}

// --- /proc/meminfo -------------------------------------------------------------------------

/// What `/proc/meminfo` says, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemInfo {
    pub total: u64,
    /// `MemAvailable`: what can be given to programs without swapping (Linux ≥ 3.14).
    pub available: u64,
    pub swap_total: u64,
    pub swap_free: u64,
}

/// `Key:   123456 kB` lines (the kernel's kB are KiB).
pub fn parse_meminfo(text: &str) -> Result<MemInfo, ParseError> {
    let find = |key: &'static str| -> Result<u64, ParseError> {
        let line = text
            .lines()
            .find(|l| l.split(':').next() == Some(key))
            .ok_or(ParseError::Missing { what: key })?;
        let mut cols = line.split(':').nth(1).unwrap_or("").split_whitespace();
        let kib: u64 = number(key, cols.next())?;
        match cols.next() {
            Some("kB") => kib
                .checked_mul(1024)
                .ok_or_else(|| ParseError::Invalid(format!("{key} = {kib} kB is too large"))),
            other => Err(ParseError::Invalid(format!(
                "{key} is not in kB (unit {:?})",
                snippet(other.unwrap_or(""))
            ))),
        }
    };
    let m = MemInfo {
        total: find("MemTotal")?,
        available: find("MemAvailable")?,
        swap_total: find("SwapTotal")?,
        swap_free: find("SwapFree")?,
    };
    if m.total == 0 {
        return Err(ParseError::Invalid("MemTotal is 0".into()));
    }
    Ok(m)
}

// --- thermal zones -------------------------------------------------------------------------

/// A thermal zone's `temp`: millidegrees Celsius, e.g. `48312`.
pub fn parse_millidegrees(text: &str) -> Result<f64, ParseError> {
    let milli: i64 = number("the temperature", text.split_whitespace().next())?;
    #[allow(clippy::cast_precision_loss)] // |milli| is far below 2^53 for any real sensor
    Ok(milli as f64 / 1000.0)
}

/// Zone types that are the CPU's own sensor: the Raspberry Pi's (`cpu-thermal`; `cpu_thermal`
/// on older kernels) and an Intel package's.
pub const CPU_ZONE_TYPES: [&str; 3] = ["cpu-thermal", "cpu_thermal", "x86_pkg_temp"];

/// A thermal zone as found at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ZoneInfo {
    /// `thermal_zone0`, …, in the kernel's order.
    pub name: String,
    /// Its `type`, e.g. `cpu-thermal`, `acpitz`.
    pub kind: String,
    /// Its `temp` could be read and parsed at start (some zones answer every read with an
    /// error, e.g. a disabled ACPI zone in a VM).
    pub readable: bool,
}

/// The zone whose temperature is published: the first readable CPU zone, else the first
/// readable zone; `None` when no zone can be read.
pub fn choose_zone(zones: &[ZoneInfo]) -> Option<usize> {
    let readable = || zones.iter().enumerate().filter(|(_, z)| z.readable);
    readable()
        .find(|(_, z)| CPU_ZONE_TYPES.contains(&z.kind.trim()))
        .or_else(|| readable().next())
        .map(|(i, _)| i)
}

// --- Raspberry Pi throttling ---------------------------------------------------------------

/// The bits of the firmware's `get_throttled` (vcgencmd(1), the Raspberry Pi documentation's
/// "get_throttled"): the low half is the state now, the high half what has occurred.
pub const THROTTLE_BITS: [(u32, &str); 8] = [
    (0, "under_voltage_now"),
    (1, "arm_freq_capped_now"),
    (2, "throttled_now"),
    (3, "soft_temp_limit_now"),
    (16, "under_voltage_occurred"),
    (17, "arm_freq_capped_occurred"),
    (18, "throttled_occurred"),
    (19, "soft_temp_limit_occurred"),
];

/// The field holding the whole value, for bits not decoded here.
pub const THROTTLE_RAW_FIELD: &str = "throttled_flags";

/// `get_throttled`'s content: hex without a prefix (the kernel prints `%x`, e.g. `50005`);
/// `0x50005` (vcgencmd's form) is taken too.
pub fn parse_throttled(text: &str) -> Result<u32, ParseError> {
    let t = text.trim();
    let hex = t
        .strip_prefix("throttled=")
        .unwrap_or(t)
        .trim_start_matches("0x")
        .trim_start_matches("0X");
    if hex.is_empty() || hex.len() > 8 {
        return Err(ParseError::NotANumber {
            what: "get_throttled",
            text: snippet(t),
        });
    }
    u32::from_str_radix(hex, 16).map_err(|_| ParseError::NotANumber {
        what: "get_throttled",
        text: snippet(t),
    })
}

/// The fields of a `get_throttled` value: each bit as 0/1, and the whole value.
pub fn throttle_fields(value: u32) -> BTreeMap<String, f64> {
    let mut fields: BTreeMap<String, f64> = THROTTLE_BITS
        .iter()
        .map(|(bit, name)| ((*name).to_string(), f64::from((value >> bit) & 1)))
        .collect();
    fields.insert(THROTTLE_RAW_FIELD.into(), f64::from(value));
    fields
}

// --- /proc/uptime --------------------------------------------------------------------------

/// `/proc/uptime`: `12345.67 23456.78` (seconds up, seconds idle summed over CPUs).
pub fn parse_uptime(text: &str) -> Result<f64, ParseError> {
    let s = finite("the uptime", text.split_whitespace().next())?;
    if s < 0.0 {
        return Err(ParseError::Invalid(format!(
            "a negative uptime {:?}",
            snippet(text.trim())
        )));
    }
    Ok(s)
}

// --- /proc/diskstats -----------------------------------------------------------------------

/// The sectors written to each of `devices`, from `/proc/diskstats` (`major minor name
/// reads merged sectors ms writes merged sectors_written …`; 14, 18 or 20 columns by kernel).
/// A device that is not listed (a USB disk unplugged) is left out; none listed is an error.
pub fn parse_sectors_written(
    text: &str,
    devices: &[String],
) -> Result<BTreeMap<String, u64>, ParseError> {
    if devices.is_empty() {
        return Err(ParseError::Invalid("no block device to read".into()));
    }
    let mut out = BTreeMap::new();
    for device in devices {
        let Some(line) = text
            .lines()
            .find(|l| l.split_whitespace().nth(2) == Some(device.as_str()))
        else {
            continue;
        };
        let sectors: u64 = number("the sectors written", line.split_whitespace().nth(9))?;
        out.insert(device.clone(), sectors);
    }
    if out.is_empty() {
        return Err(ParseError::Invalid(format!(
            "block device {} is not listed",
            devices.join(", ")
        )));
    }
    Ok(out)
}

// --- disk space ----------------------------------------------------------------------------

/// A filesystem's size, from statvfs(3), in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskSpace {
    /// `f_blocks × f_frsize`.
    pub total: u64,
    /// `f_bfree × f_frsize`: free, the part reserved for root included.
    pub free: u64,
    /// `f_bavail × f_frsize`: what an unprivileged process (wattbus) can still write.
    pub available: u64,
}

impl DiskSpace {
    /// From statvfs's counts.
    pub fn from_blocks(fragment: u64, blocks: u64, free: u64, available: u64) -> Self {
        Self {
            total: blocks.saturating_mul(fragment),
            free: free.saturating_mul(fragment),
            available: available.saturating_mul(fragment),
        }
    }

    /// Used as `df` shows it: used / (used + available), the root reserve not counted as
    /// room. `None` for a filesystem without blocks (procfs and the like).
    pub fn used_pct(&self) -> Option<f64> {
        let used = self.total.saturating_sub(self.free);
        let room = used.saturating_add(self.available);
        (room > 0).then(|| 100.0 * f(used) / f(room))
    }
}

// --- device numbers and names --------------------------------------------------------------

/// The major and minor numbers of a `st_dev` (glibc's encoding, which Linux uses on every
/// architecture wattbus runs on).
pub fn dev_major_minor(dev: u64) -> (u64, u64) {
    let major = ((dev >> 32) & 0xffff_f000) | ((dev >> 8) & 0x0fff);
    let minor = ((dev >> 12) & 0xffff_ff00) | (dev & 0x00ff);
    (major, minor)
}

/// The node's name from its hostname: lower-cased, every character a segment may not hold
/// turned into `-`, at most 64 characters; `None` when nothing is left.
pub fn node_from_hostname(hostname: &str) -> Option<Segment> {
    let name: String = hostname
        .trim()
        .chars()
        .map(|c| {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '-'
            }
        })
        .take(64)
        .collect();
    let name = name.trim_matches('-');
    if name.is_empty() {
        None
    } else {
        Segment::new(name).ok()
    }
}

// --- the sampler ---------------------------------------------------------------------------

/// Where a value comes from: what is counted and logged when it fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Source {
    Stat,
    LoadAvg,
    MemInfo,
    Thermal,
    Throttled,
    DiskSpace,
    DiskStats,
    Uptime,
}

impl Source {
    pub const fn as_str(self) -> &'static str {
        match self {
            Source::Stat => "cpu",
            Source::LoadAvg => "load",
            Source::MemInfo => "memory",
            Source::Thermal => "temperature",
            Source::Throttled => "throttling",
            Source::DiskSpace => "disk_space",
            Source::DiskStats => "disk_writes",
            Source::Uptime => "uptime",
        }
    }
}

/// The channel (and group of fields) a reading is published on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Channel {
    Cpu,
    Load,
    Memory,
    Temperature,
    Throttling,
    Disk,
    Uptime,
}

impl Channel {
    pub const ALL: [Channel; 7] = [
        Channel::Cpu,
        Channel::Load,
        Channel::Memory,
        Channel::Temperature,
        Channel::Throttling,
        Channel::Disk,
        Channel::Uptime,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            Channel::Cpu => "cpu",
            Channel::Load => "load",
            Channel::Memory => "memory",
            Channel::Temperature => "temperature",
            Channel::Throttling => "throttling",
            Channel::Disk => "disk",
            Channel::Uptime => "uptime",
        }
    }
}

/// One source as read: `None` when it is not read on this machine (no thermal zone, not a
/// Raspberry Pi, no block device found), else its content or why it could not be read.
pub type Read<T> = Option<Result<T, String>>;

/// Every source, read at one moment.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub stat: Read<String>,
    pub loadavg: Read<String>,
    pub meminfo: Read<String>,
    pub thermal: Read<String>,
    pub throttled: Read<String>,
    pub disk_space: Read<DiskSpace>,
    pub diskstats: Read<String>,
    pub uptime: Read<String>,
}

/// What one snapshot gave.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Sample {
    /// The readings to publish, each with at least one field.
    pub groups: Vec<(Channel, BTreeMap<String, f64>)>,
    /// Every source that was read: `Ok`, or why it is left out.
    pub outcomes: Vec<(Source, Result<(), String>)>,
}

impl Sample {
    pub fn fields(&self, channel: Channel) -> Option<&BTreeMap<String, f64>> {
        self.groups
            .iter()
            .find(|(c, _)| *c == channel)
            .map(|(_, f)| f)
    }

    pub fn failures(&self) -> impl Iterator<Item = (Source, &str)> {
        self.outcomes
            .iter()
            .filter_map(|(s, r)| r.as_ref().err().map(|e| (*s, e.as_str())))
    }
}

/// Turns snapshots into readings, keeping the counters rates are computed from.
#[derive(Debug, Clone, Default)]
pub struct Sampler {
    /// The devices whose writes `/proc/diskstats` is read for (see `sources`).
    devices: Vec<String>,
    cpu: Option<CpuTimes>,
    /// Sectors written, and when (monotonic).
    sectors: Option<(BTreeMap<String, u64>, Duration)>,
}

impl Sampler {
    pub fn new(devices: Vec<String>) -> Self {
        Self {
            devices,
            ..Self::default()
        }
    }

    /// The readings of `snap`, taken at `now` on a monotonic clock (any origin).
    pub fn sample(&mut self, snap: &Snapshot, now: Duration) -> Sample {
        let mut groups: BTreeMap<Channel, BTreeMap<String, f64>> = BTreeMap::new();
        let mut outcomes = Vec::new();
        let mut put = |channel: Channel, name: &str, v: f64| {
            groups
                .entry(channel)
                .or_default()
                .insert(name.to_string(), v);
        };

        if let Some(r) = check(&mut outcomes, Source::Stat, &snap.stat, |t| parse_stat(t))
            && let Some((use_pct, iowait_pct)) = self.cpu_shares(r)
        {
            put(Channel::Cpu, "cpu_use_pct", use_pct);
            put(Channel::Cpu, "cpu_iowait_pct", iowait_pct);
        }
        if let Some(l) = check(&mut outcomes, Source::LoadAvg, &snap.loadavg, |t| {
            parse_loadavg(t)
        }) {
            put(Channel::Load, "load_1m", l.one);
            put(Channel::Load, "load_5m", l.five);
            put(Channel::Load, "load_15m", l.fifteen);
        }
        if let Some(m) = check(&mut outcomes, Source::MemInfo, &snap.meminfo, |t| {
            parse_meminfo(t)
        }) {
            let used = m.total.saturating_sub(m.available);
            put(Channel::Memory, "mem_total_bytes", f(m.total));
            put(Channel::Memory, "mem_available_bytes", f(m.available));
            put(
                Channel::Memory,
                "mem_used_pct",
                100.0 * f(used) / f(m.total),
            );
            put(Channel::Memory, "swap_total_bytes", f(m.swap_total));
            put(
                Channel::Memory,
                "swap_used_bytes",
                f(m.swap_total.saturating_sub(m.swap_free)),
            );
        }
        if let Some(c) = check(&mut outcomes, Source::Thermal, &snap.thermal, |t| {
            parse_millidegrees(t)
        }) {
            put(Channel::Temperature, "cpu_temperature_c", c);
        }
        if let Some(v) = check(&mut outcomes, Source::Throttled, &snap.throttled, |t| {
            parse_throttled(t)
        }) {
            for (name, value) in throttle_fields(v) {
                put(Channel::Throttling, &name, value);
            }
        }
        if let Some(d) = check(&mut outcomes, Source::DiskSpace, &snap.disk_space, |d| {
            Ok::<_, ParseError>(*d)
        }) {
            put(Channel::Disk, "disk_total_bytes", f(d.total));
            put(Channel::Disk, "disk_available_bytes", f(d.available));
            if let Some(pct) = d.used_pct() {
                put(Channel::Disk, "disk_used_pct", pct);
            }
        }
        let devices = &self.devices;
        if let Some(s) = check(&mut outcomes, Source::DiskStats, &snap.diskstats, |t| {
            parse_sectors_written(t, devices)
        }) && let Some(rate) = self.write_rate(s, now)
        {
            put(Channel::Disk, "disk_write_bytes_per_s", rate);
        }
        if let Some(s) = check(&mut outcomes, Source::Uptime, &snap.uptime, |t| {
            parse_uptime(t)
        }) {
            put(Channel::Uptime, "uptime_s", s);
        }
        Sample {
            groups: groups.into_iter().filter(|(_, f)| !f.is_empty()).collect(),
            outcomes,
        }
    }

    /// CPU use and iowait since the previous sample, in %; `None` on the first sample, when
    /// no tick passed, or when the counters went backwards (a new baseline).
    fn cpu_shares(&mut self, now: CpuTimes) -> Option<(f64, f64)> {
        let before = self.cpu.replace(now)?;
        if now.total() < before.total() {
            return None;
        }
        let (n, b) = (now.parts(), before.parts());
        let d: [u64; 8] = std::array::from_fn(|i| n[i].saturating_sub(b[i]));
        let total = d.iter().fold(0u64, |a, b| a.saturating_add(*b));
        if total == 0 {
            return None;
        }
        // The order of `CpuTimes::parts`: idle is 3, iowait 4.
        let (idle, iowait) = (d[3], d[4]);
        let busy = total.saturating_sub(idle).saturating_sub(iowait);
        Some((100.0 * f(busy) / f(total), 100.0 * f(iowait) / f(total)))
    }

    /// Bytes written per second since the last good read, over the devices read both
    /// times (one unplugged or plugged in meanwhile does not count for this interval; one
    /// whose counter went backwards, re-created, neither). `None` on the first read, when no
    /// time passed, or when no device counts.
    fn write_rate(&mut self, sectors: BTreeMap<String, u64>, now: Duration) -> Option<f64> {
        let (before, at) = self.sectors.replace((sectors, now))?;
        let secs = now.checked_sub(at)?.as_secs_f64();
        let current = &self.sectors.as_ref()?.0;
        let deltas: Vec<u64> = current
            .iter()
            .filter_map(|(d, now)| now.checked_sub(*before.get(d)?))
            .collect();
        if deltas.is_empty() || secs <= 0.0 {
            return None;
        }
        let sum = deltas.iter().fold(0u64, |a, b| a.saturating_add(*b));
        Some(f(sum.saturating_mul(DISKSTATS_SECTOR_BYTES)) / secs)
    }
}

/// Parse a source that was read, noting its outcome; `None` when it is not read here or failed.
fn check<T, U, E: std::fmt::Display>(
    outcomes: &mut Vec<(Source, Result<(), String>)>,
    source: Source,
    read: &Read<T>,
    parse: impl FnOnce(&T) -> Result<U, E>,
) -> Option<U> {
    let read = read.as_ref()?;
    let parsed = match read {
        Ok(content) => parse(content).map_err(|e| e.to_string()),
        Err(e) => Err(e.clone()),
    };
    match parsed {
        Ok(v) => {
            outcomes.push((source, Ok(())));
            Some(v)
        }
        Err(e) => {
            outcomes.push((source, Err(e)));
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A Raspberry Pi 4's files (bookworm, 6.6 kernel), as read.
    const STAT_1: &str = "cpu  93842 1204 40122 5130467 8231 0 1733 0 0 0\n\
        cpu0 23187 290 10331 1282054 2310 0 1040 0 0 0\n\
        cpu1 23690 305 9908 1282930 1945 0 291 0 0 0\n\
        intr 19283746 0 0 0\nctxt 33445566\nbtime 1764000000\nprocesses 51234\n";
    /// 1 000 ticks later: 150 user, 50 system, 750 idle, 50 iowait.
    const STAT_2: &str = "cpu  93992 1204 40172 5131217 8281 0 1733 0 0 0\n\
        cpu0 23250 290 10350 1282240 2320 0 1040 0 0 0\n";
    const LOADAVG: &str = "0.52 0.58 0.59 1/467 12345\n";
    const MEMINFO: &str = "MemTotal:        3884328 kB\n\
        MemFree:         2012344 kB\n\
        MemAvailable:    3101204 kB\n\
        Buffers:           61232 kB\n\
        Cached:           987654 kB\n\
        SwapCached:            0 kB\n\
        SwapTotal:        204796 kB\n\
        SwapFree:         153600 kB\n\
        HugePages_Total:       0\n\
        Hugepagesize:       2048 kB\n";
    const DISKSTATS_1: &str = "   1       0 ram0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0\n\
         7       0 loop0 62 0 2206 40 0 0 0 0 0 76 40 0 0 0 0 0 0\n\
       179       0 mmcblk0 30412 9511 2203442 183320 88213 61233 4102088 811632 0 402120 1003144 0 0 0 0 9862 8190\n\
       179       1 mmcblk0p1 312 1046 12034 880 2 0 2 0 0 312 880 0 0 0 0 0 0\n\
       179       2 mmcblk0p2 29994 8465 2187248 182320 88211 61233 4102086 811632 0 401720 993952 0 0 0 0 0 0\n";
    /// 10 s later: mmcblk0 wrote 2 000 more sectors (1 024 000 bytes).
    const DISKSTATS_2: &str = "   179       0 mmcblk0 30412 9511 2203442 183320 88300 61240 4104088 811999 0 402300 1003500 0 0 0 0 9870 8200\n";

    fn snap(stat: &str, diskstats: &str) -> Snapshot {
        let ok = |s: &str| Some(Ok(s.to_string()));
        Snapshot {
            stat: ok(stat),
            loadavg: ok(LOADAVG),
            meminfo: ok(MEMINFO),
            thermal: ok("48312\n"),
            throttled: ok("50005\n"),
            disk_space: Some(Ok(DiskSpace::from_blocks(
                4096, 7_500_000, 5_000_000, 4_600_000,
            ))),
            diskstats: ok(diskstats),
            uptime: ok("350125.61 1379012.33\n"),
        }
    }

    fn sampler() -> Sampler {
        Sampler::new(vec!["mmcblk0".into()])
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    #[test]
    fn a_pi_s_files_become_readings_with_rates_from_the_second_sample_on() {
        let mut s = sampler();
        let first = s.sample(&snap(STAT_1, DISKSTATS_1), Duration::from_secs(100));
        assert!(first.failures().next().is_none(), "{first:?}");
        // No rate from one sample: CPU use and writes are left out, not zero.
        assert!(first.fields(Channel::Cpu).is_none());
        assert!(
            !first
                .fields(Channel::Disk)
                .unwrap()
                .contains_key("disk_write_bytes_per_s")
        );

        let second = s.sample(&snap(STAT_2, DISKSTATS_2), Duration::from_secs(110));
        let cpu = second.fields(Channel::Cpu).unwrap();
        assert!(close(cpu["cpu_use_pct"], 20.0), "{cpu:?}");
        assert!(close(cpu["cpu_iowait_pct"], 5.0), "{cpu:?}");
        let disk = second.fields(Channel::Disk).unwrap();
        assert!(close(disk["disk_write_bytes_per_s"], 102_400.0), "{disk:?}");
        assert!(close(disk["disk_total_bytes"], 30_720_000_000.0));
        assert!(close(disk["disk_available_bytes"], 18_841_600_000.0));
        // used 2.5 M blocks of (2.5 M + 4.6 M) usable: 35.2 %, as df shows it.
        assert!(
            (disk["disk_used_pct"] - 35.211_267).abs() < 1e-5,
            "{disk:?}"
        );

        let load = second.fields(Channel::Load).unwrap();
        assert_eq!(
            (load["load_1m"], load["load_5m"], load["load_15m"]),
            (0.52, 0.58, 0.59)
        );
        let mem = second.fields(Channel::Memory).unwrap();
        assert!(close(mem["mem_total_bytes"], 3_884_328.0 * 1024.0));
        assert!(close(mem["mem_available_bytes"], 3_101_204.0 * 1024.0));
        assert!((mem["mem_used_pct"] - 20.161_119).abs() < 1e-5, "{mem:?}");
        assert!(close(mem["swap_total_bytes"], 204_796.0 * 1024.0));
        assert!(close(mem["swap_used_bytes"], 51_196.0 * 1024.0));
        assert!(close(
            second.fields(Channel::Temperature).unwrap()["cpu_temperature_c"],
            48.312
        ));
        assert!(close(
            second.fields(Channel::Uptime).unwrap()["uptime_s"],
            350_125.61
        ));
        let t = second.fields(Channel::Throttling).unwrap();
        assert_eq!(t["throttled_flags"], f64::from(0x50005u32));
        for (name, on) in [
            ("under_voltage_now", 1.0),
            ("arm_freq_capped_now", 0.0),
            ("throttled_now", 1.0),
            ("soft_temp_limit_now", 0.0),
            ("under_voltage_occurred", 1.0),
            ("arm_freq_capped_occurred", 0.0),
            ("throttled_occurred", 1.0),
            ("soft_temp_limit_occurred", 0.0),
        ] {
            assert_eq!(t[name], on, "{name}");
        }
    }

    #[test]
    fn every_reading_passes_proto_validation_and_plausibility() {
        use proto::{Measurement, Payload as _, Quality, ReadingId};
        let seg = |s: &str| Segment::new(s).unwrap();
        let mut s = sampler();
        s.sample(&snap(STAT_1, DISKSTATS_1), Duration::from_secs(0));
        let sample = s.sample(&snap(STAT_2, DISKSTATS_2), Duration::from_secs(10));
        assert_eq!(sample.groups.len(), Channel::ALL.len());
        for (channel, fields) in sample.groups {
            let m = Measurement::new(
                ReadingId::new(seg("home"), seg("pi-1"), seg(channel.as_str())),
                seg(crate::MEASUREMENT),
                1_764_000_000_000,
                Quality::Good,
                fields,
            );
            m.validate().unwrap();
            assert_eq!(m.implausible().count(), 0, "{m:?}");
        }
    }

    #[test]
    fn a_source_that_fails_is_left_out_and_reported_never_zero() {
        let mut s = sampler();
        let mut bad = snap(STAT_1, DISKSTATS_1);
        bad.meminfo = Some(Err("Permission denied (os error 13)".into()));
        bad.thermal = Some(Ok("garbage\n".into()));
        bad.disk_space = Some(Err("No such file or directory (os error 2)".into()));
        let sample = s.sample(&bad, Duration::ZERO);
        assert!(sample.fields(Channel::Memory).is_none());
        assert!(sample.fields(Channel::Temperature).is_none());
        // The disk reading is gone too: its space failed and the writes have no rate yet.
        assert!(sample.fields(Channel::Disk).is_none());
        let failed: Vec<Source> = sample.failures().map(|(s, _)| s).collect();
        assert_eq!(
            failed,
            [Source::MemInfo, Source::Thermal, Source::DiskSpace]
        );
        let why = sample
            .failures()
            .find(|(s, _)| *s == Source::Thermal)
            .unwrap()
            .1;
        assert_eq!(why, r#"the temperature is "garbage", not a number"#);
        assert_eq!(sample.outcomes.iter().filter(|(_, r)| r.is_ok()).count(), 5);
    }

    #[test]
    fn sources_not_on_this_machine_are_neither_published_nor_failures() {
        let mut s = sampler();
        let mut x86 = snap(STAT_1, DISKSTATS_1);
        x86.thermal = None;
        x86.throttled = None;
        let sample = s.sample(&x86, Duration::ZERO);
        assert!(sample.fields(Channel::Temperature).is_none());
        assert!(sample.fields(Channel::Throttling).is_none());
        assert!(
            sample
                .outcomes
                .iter()
                .all(|(s, r)| r.is_ok() && *s != Source::Thermal && *s != Source::Throttled)
        );
    }

    #[test]
    fn a_failed_read_keeps_the_baseline_so_the_next_rate_spans_the_gap() {
        let mut s = sampler();
        s.sample(&snap(STAT_1, DISKSTATS_1), Duration::from_secs(0));
        let mut gap = snap(STAT_2, DISKSTATS_2);
        gap.diskstats = Some(Err("Input/output error (os error 5)".into()));
        let missed = s.sample(&gap, Duration::from_secs(10));
        assert!(
            !missed
                .fields(Channel::Disk)
                .unwrap()
                .contains_key("disk_write_bytes_per_s")
        );
        let next = s.sample(&snap(STAT_2, DISKSTATS_2), Duration::from_secs(20));
        // 1 024 000 bytes over the 20 s since the last good read.
        assert!(close(
            next.fields(Channel::Disk).unwrap()["disk_write_bytes_per_s"],
            51_200.0
        ));
    }

    #[test]
    fn counters_that_go_backwards_start_a_new_baseline() {
        let mut s = sampler();
        s.sample(&snap(STAT_2, DISKSTATS_2), Duration::from_secs(0));
        // A wrapped sector counter and a CPU total that fell: nothing published...
        let back = s.sample(&snap(STAT_1, DISKSTATS_1), Duration::from_secs(10));
        assert!(back.fields(Channel::Cpu).is_none());
        assert!(
            !back
                .fields(Channel::Disk)
                .unwrap()
                .contains_key("disk_write_bytes_per_s")
        );
        assert!(back.failures().next().is_none());
        // ...and the next sample measures from the new baseline.
        let on = s.sample(&snap(STAT_2, DISKSTATS_2), Duration::from_secs(20));
        assert!(close(on.fields(Channel::Cpu).unwrap()["cpu_use_pct"], 20.0));
        assert!(close(
            on.fields(Channel::Disk).unwrap()["disk_write_bytes_per_s"],
            102_400.0
        ));
    }

    #[test]
    fn no_time_or_no_ticks_between_samples_gives_no_rate() {
        let mut s = sampler();
        s.sample(&snap(STAT_1, DISKSTATS_1), Duration::from_secs(5));
        let same = s.sample(&snap(STAT_1, DISKSTATS_2), Duration::from_secs(5));
        assert!(same.fields(Channel::Cpu).is_none());
        assert!(
            !same
                .fields(Channel::Disk)
                .unwrap()
                .contains_key("disk_write_bytes_per_s")
        );
    }

    #[test]
    fn stat_parsing_takes_old_kernels_and_refuses_garbage() {
        // 2.6.0–2.6.10: no steal column.
        let old = parse_stat("cpu 10 0 5 100 3 1 1\n").unwrap();
        assert_eq!((old.user, old.iowait, old.steal), (10, 3, 0));
        for (text, why) in [
            ("", "the aggregate `cpu` line is missing"),
            ("cpu0 1 2 3 4\n", "the aggregate `cpu` line is missing"),
            ("cpu 1 2 3\n", "cpu idle is missing"),
            ("cpu 1 2 x 4\n", r#"cpu system is "x", not a number"#),
            ("cpu 1 2 3 -4\n", r#"cpu idle is "-4", not a number"#),
            (
                "cpu 1 2 3 99999999999999999999999\n",
                r#"cpu idle is "99999999999999999999999", not a number"#,
            ),
        ] {
            assert_eq!(parse_stat(text).unwrap_err().to_string(), why, "{text:?}");
        }
    }

    #[test]
    fn loadavg_meminfo_uptime_refuse_what_is_malformed() {
        for text in [
            "",
            "0.5 0.4\n",
            "0.5 x 0.3 1/2 3\n",
            "NaN 1 1\n",
            "inf 1 1\n",
            "-1 0 0\n",
        ] {
            assert!(parse_loadavg(text).is_err(), "{text:?}");
        }
        for (text, why) in [
            ("", "MemTotal is missing"),
            (
                "MemTotal: 100 kB\nMemAvailable: 50 kB\nSwapTotal: 0 kB\n",
                "SwapFree is missing",
            ),
            (
                "MemTotal: 100 MB\nMemAvailable: 50 kB\nSwapTotal: 0 kB\nSwapFree: 0 kB\n",
                r#"MemTotal is not in kB (unit "MB")"#,
            ),
            (
                "MemTotal: 0 kB\nMemAvailable: 0 kB\nSwapTotal: 0 kB\nSwapFree: 0 kB\n",
                "MemTotal is 0",
            ),
            (
                "MemTotal: 18446744073709551615 kB\nMemAvailable: 0 kB\nSwapTotal: 0 kB\nSwapFree: 0 kB\n",
                "MemTotal = 18446744073709551615 kB is too large",
            ),
            ("MemTotal:\n", "MemTotal is missing"),
        ] {
            assert_eq!(
                parse_meminfo(text).unwrap_err().to_string(),
                why,
                "{text:?}"
            );
        }
        assert_eq!(parse_uptime("12.5 3.0\n"), Ok(12.5));
        for text in ["", "x 1\n", "-5 1\n", "nan 1\n"] {
            assert!(parse_uptime(text).is_err(), "{text:?}");
        }
    }

    #[test]
    fn a_long_garbage_value_is_cut_short_in_the_message() {
        let garbage = "y".repeat(10_000);
        let why = parse_uptime(&garbage).unwrap_err().to_string();
        assert!(why.len() < 100, "{why}");
        assert!(why.contains('…'));
    }

    #[test]
    fn throttled_is_read_as_the_kernel_and_vcgencmd_print_it() {
        assert_eq!(parse_throttled("0\n"), Ok(0));
        assert_eq!(parse_throttled("50005\n"), Ok(0x50005));
        assert_eq!(parse_throttled("80008\n"), Ok(0x80008));
        assert_eq!(parse_throttled("throttled=0xe0000\n"), Ok(0xe0000));
        for text in ["", "\n", "0x", "zz", "123456789", "-1"] {
            assert!(parse_throttled(text).is_err(), "{text:?}");
        }
        let all = throttle_fields(0x000f_000f);
        assert_eq!(all.len(), 9);
        assert!(
            all.iter()
                .all(|(k, v)| k == THROTTLE_RAW_FIELD || *v == 1.0)
        );
        // Bits nobody decodes yet stay in the whole value only.
        let other = throttle_fields(0x0000_0100);
        assert_eq!(other[THROTTLE_RAW_FIELD], 256.0);
        assert!(
            other
                .iter()
                .all(|(k, v)| k == THROTTLE_RAW_FIELD || *v == 0.0)
        );
    }

    #[test]
    fn temperatures_are_millidegrees_and_may_be_negative() {
        assert_eq!(parse_millidegrees("48312\n"), Ok(48.312));
        assert_eq!(parse_millidegrees("-5250\n"), Ok(-5.25));
        assert!(parse_millidegrees("").is_err());
        assert!(parse_millidegrees("48.3\n").is_err());
    }

    #[test]
    fn the_write_rate_counts_only_the_disks_read_both_times() {
        let mut s = Sampler::new(vec!["sda".into(), "sdb".into()]);
        let m = |pairs: &[(&str, u64)]| -> BTreeMap<String, u64> {
            pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
        };
        let at = Duration::from_secs;
        assert_eq!(
            s.write_rate(m(&[("sda", 100), ("sdb", 1000)]), at(10)),
            None
        );
        // sdb unplugged: sda's 200 sectors in 10 s still count.
        assert_eq!(
            s.write_rate(m(&[("sda", 300)]), at(20)),
            Some(200.0 * 512.0 / 10.0)
        );
        // sdb back, its counter from 0: only sda counts for this interval …
        assert_eq!(
            s.write_rate(m(&[("sda", 400), ("sdb", 5)]), at(30)),
            Some(100.0 * 512.0 / 10.0)
        );
        // … and both from the next.
        assert_eq!(
            s.write_rate(m(&[("sda", 400), ("sdb", 15)]), at(40)),
            Some(10.0 * 512.0 / 10.0)
        );
    }

    #[test]
    fn sectors_are_read_per_device_and_a_missing_one_is_left_out() {
        let one = parse_sectors_written(DISKSTATS_1, &["mmcblk0".into()]).unwrap();
        assert_eq!(one.values().copied().collect::<Vec<_>>(), [4_102_088]);
        let two = parse_sectors_written(DISKSTATS_1, &["mmcblk0".into(), "loop0".into()]).unwrap();
        assert_eq!(two["mmcblk0"], 4_102_088);
        // An unplugged disk beside the card: the card still counts.
        let gone = parse_sectors_written(DISKSTATS_1, &["mmcblk0".into(), "sdz".into()]).unwrap();
        assert_eq!(gone.keys().collect::<Vec<_>>(), ["mmcblk0"]);
        assert_eq!(
            parse_sectors_written(DISKSTATS_1, &["sda".into()])
                .unwrap_err()
                .to_string(),
            "block device sda is not listed"
        );
        assert!(parse_sectors_written("179 0 mmcblk0 1 2 3\n", &["mmcblk0".into()]).is_err());
        assert!(parse_sectors_written(DISKSTATS_1, &[]).is_err());
    }

    #[test]
    fn the_cpu_zone_is_preferred_else_the_first_readable_one() {
        let zone = |name: &str, kind: &str, readable: bool| ZoneInfo {
            name: name.into(),
            kind: kind.into(),
            readable,
        };
        let pc = [
            zone("thermal_zone0", "acpitz", true),
            zone("thermal_zone1", "x86_pkg_temp", true),
        ];
        assert_eq!(choose_zone(&pc), Some(1));
        let pi = [zone("thermal_zone0", "cpu-thermal\n", true)];
        assert_eq!(choose_zone(&pi), Some(0));
        let other = [
            zone("thermal_zone0", "acpitz", false),
            zone("thermal_zone1", "x86_pkg_temp", false),
            zone("thermal_zone2", "iwlwifi_1", true),
        ];
        assert_eq!(choose_zone(&other), Some(2));
        assert_eq!(choose_zone(&[zone("thermal_zone0", "acpitz", false)]), None);
        assert_eq!(choose_zone(&[]), None);
    }

    #[test]
    fn device_numbers_decode_like_glibc() {
        // 179:2 (mmcblk0p2), 8:1 (sda1), 259:0 (nvme0n1), 0:27 (tmpfs, overlay), and a large
        // minor (the high bits of both numbers).
        assert_eq!(dev_major_minor(0xb302), (179, 2));
        assert_eq!(dev_major_minor(0x0801), (8, 1));
        assert_eq!(dev_major_minor(0x10300), (259, 0));
        assert_eq!(dev_major_minor(0x1b), (0, 27));
        assert_eq!(dev_major_minor(0x0000_1000_1000_0345), (0x1003, 0x10045));
    }

    #[test]
    fn a_hostname_becomes_a_valid_device_name() {
        let n = |h: &str| node_from_hostname(h).map(|s| s.as_str().to_string());
        assert_eq!(n("raspberrypi\n").as_deref(), Some("raspberrypi"));
        assert_eq!(n("Pi-Garage.local\n").as_deref(), Some("pi-garage.local"));
        assert_eq!(n("küche pi").as_deref(), Some("k-che-pi"));
        assert_eq!(n(&"a".repeat(100)).map(|s| s.len()), Some(64));
        assert_eq!(n(""), None);
        assert_eq!(n("  \n"), None);
        assert_eq!(n("###"), None);
    }

    #[test]
    fn used_space_is_counted_as_df_counts_it() {
        let d = DiskSpace::from_blocks(1024, 100, 20, 15);
        assert_eq!((d.total, d.free, d.available), (102_400, 20_480, 15_360));
        // 80 used of 80 + 15: 84.2 %.
        assert!((d.used_pct().unwrap() - 84.210_526).abs() < 1e-5);
        assert_eq!(DiskSpace::from_blocks(4096, 0, 0, 0).used_pct(), None);
    }
}
