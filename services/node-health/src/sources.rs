//! The files: found once at start ([`discover`]), read at every sample ([`Sources::read`]).
//!
//! Plain blocking std I/O. procfs and sysfs answer from memory, but a sysfs attribute is
//! driver code (`get_throttled` asks the Pi's firmware over a mailbox with a one-second
//! timeout) and statvfs(3) on a stuck mount can block, so `run` reads a snapshot on tokio's
//! blocking pool, one at a time, never on the async threads.
//!
//! Every read is bounded ([`read_capped`]): a file that is not what it should be costs a
//! clear error, never the process's memory.

use std::fs::File;
use std::io::Read as _;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};

use runtime::telemetry::chain;

use crate::config::Plan;
use crate::sample::{
    DiskSpace, Snapshot, Source, ZoneInfo, choose_zone, dev_major_minor, parse_millidegrees, wide,
};

/// At most `cap` bytes of a file, as text.
pub fn read_capped(path: &Path, cap: u64) -> std::io::Result<String> {
    let mut text = String::new();
    File::open(path)?.take(cap).read_to_string(&mut text)?;
    Ok(text)
}

/// `/proc/stat`'s first line is all that is used, but its `intr` line can run to tens of KiB on
/// a large machine: the first 64 KiB are read.
const STAT_CAP: u64 = 64 << 10;
const MEMINFO_CAP: u64 = 64 << 10;
/// One line per block device (a few hundred with many loop devices).
const DISKSTATS_CAP: u64 = 1 << 20;
/// One-line files: loadavg, uptime, a zone's temp and type, get_throttled, the hostname.
const SMALL_CAP: u64 = 4 << 10;

/// The thermal zone read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Zone {
    /// `thermal_zone0`.
    pub name: String,
    /// Its type, e.g. `cpu-thermal`.
    pub kind: String,
    pub temp: PathBuf,
}

/// Whose writes `/proc/diskstats` is read for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Writes {
    /// `block_device` in the section.
    Configured(String),
    /// The disk holding `disk_path` (through `partition`, if it is on one).
    Holding {
        disk: String,
        partition: Option<String>,
    },
    /// The disk holding `disk_path` could not be found (`why`): every physical disk, summed.
    AllDisks { disks: Vec<String>, why: String },
    /// No disk at all (`why`): left out.
    Unknown(String),
}

impl Writes {
    pub fn devices(&self) -> Vec<String> {
        match self {
            Writes::Configured(d) => vec![d.clone()],
            Writes::Holding { disk, .. } => vec![disk.clone()],
            Writes::AllDisks { disks, .. } => disks.clone(),
            Writes::Unknown(_) => Vec::new(),
        }
    }
}

/// Every file of a sample, found.
#[derive(Debug, Clone)]
pub struct Sources {
    pub stat: PathBuf,
    pub loadavg: PathBuf,
    pub meminfo: PathBuf,
    pub uptime: PathBuf,
    pub diskstats: PathBuf,
    /// `Err(why)`: no thermal zone can be read on this machine.
    pub thermal: Result<Zone, String>,
    /// `Err(why)`: not a Raspberry Pi (or its firmware driver is not loaded).
    pub throttled: Result<PathBuf, String>,
    pub disk_path: PathBuf,
    pub writes: Writes,
}

/// Find the files of `plan` on this machine. Never fails: what is not there is left out, and
/// says why.
pub fn discover(plan: &Plan, data_dir: &Path) -> Sources {
    let proc = &plan.proc_root;
    let sys = &plan.sys_root;
    let disk_path = plan.disk_path(data_dir);
    Sources {
        stat: proc.join("stat"),
        loadavg: proc.join("loadavg"),
        meminfo: proc.join("meminfo"),
        uptime: proc.join("uptime"),
        diskstats: proc.join("diskstats"),
        thermal: find_zone(sys),
        throttled: find_throttled(sys),
        writes: find_writes(plan.block_device.as_deref(), &disk_path, sys),
        disk_path,
    }
}

/// The thermal zones, in the kernel's order, and the one chosen ([`choose_zone`]).
fn find_zone(sys: &Path) -> Result<Zone, String> {
    let dir = sys.join("class/thermal");
    let entries =
        std::fs::read_dir(&dir).map_err(|e| format!("{}: {}", dir.display(), chain(&e)))?;
    let mut zones: Vec<(u64, String)> = entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().to_str()?.to_string();
            let n = name.strip_prefix("thermal_zone")?.parse().ok()?;
            Some((n, name))
        })
        .collect();
    zones.sort();
    if zones.is_empty() {
        return Err(format!("{} has no thermal_zone*", dir.display()));
    }
    let found: Vec<ZoneInfo> = zones
        .iter()
        .map(|(_, name)| {
            let zone = dir.join(name);
            ZoneInfo {
                name: name.clone(),
                kind: read_capped(&zone.join("type"), SMALL_CAP)
                    .map(|t| t.trim().to_string())
                    .unwrap_or_default(),
                readable: read_capped(&zone.join("temp"), SMALL_CAP)
                    .ok()
                    .is_some_and(|t| parse_millidegrees(&t).is_ok()),
            }
        })
        .collect();
    let chosen = choose_zone(&found)
        .and_then(|i| found.get(i))
        .ok_or_else(|| {
            format!(
                "no thermal zone of {} gives a temperature ({})",
                dir.display(),
                found
                    .iter()
                    .map(|z| format!("{} {:?}", z.name, z.kind))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })?;
    Ok(Zone {
        name: chosen.name.clone(),
        kind: chosen.kind.clone(),
        temp: dir.join(&chosen.name).join("temp"),
    })
}

/// The Pi firmware's `get_throttled`: at `soc/soc:firmware` on a Pi 1–4, elsewhere on a Pi 5
/// (`soc@107c000000/soc@107c000000:firmware`), so it is looked for through the firmware
/// driver's devices too.
fn find_throttled(sys: &Path) -> Result<PathBuf, String> {
    let usual = sys.join("devices/platform/soc/soc:firmware/get_throttled");
    if usual.exists() {
        return Ok(usual);
    }
    let driver = sys.join("bus/platform/drivers/raspberrypi-firmware");
    let mut found: Vec<PathBuf> = std::fs::read_dir(&driver)
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .map(|e| e.path().join("get_throttled"))
        .filter(|p| p.exists())
        .collect();
    found.sort();
    found.into_iter().next().ok_or_else(|| {
        format!(
            "neither {} nor a get_throttled under {} exists",
            usual.display(),
            driver.display()
        )
    })
}

fn find_writes(configured: Option<&str>, disk_path: &Path, sys: &Path) -> Writes {
    if let Some(d) = configured {
        return Writes::Configured(d.to_string());
    }
    let why = match holding_disk(disk_path, sys) {
        Ok((disk, partition)) => return Writes::Holding { disk, partition },
        Err(why) => why,
    };
    match physical_disks(sys) {
        Ok(disks) if !disks.is_empty() => Writes::AllDisks { disks, why },
        Ok(_) => Writes::Unknown(format!(
            "{why}; and {} lists no physical disk",
            sys.join("block").display()
        )),
        Err(e) => Writes::Unknown(format!("{why}; and {e}")),
    }
}

/// The disk (and partition) holding `path`: its `st_dev` through `/sys/dev/block/MAJ:MIN`.
fn holding_disk(path: &Path, sys: &Path) -> Result<(String, Option<String>), String> {
    let meta = std::fs::metadata(path).map_err(|e| format!("{}: {}", path.display(), chain(&e)))?;
    let (major, minor) = dev_major_minor(meta.dev());
    if major == 0 {
        return Err(format!(
            "{} is on device {major}:{minor}, which is no block device (tmpfs, overlay, a btrfs subvolume, a network filesystem)",
            path.display()
        ));
    }
    disk_of_device(sys, major, minor)
}

/// The disk (and partition) of device `major:minor`, through `/sys/dev/block/MAJ:MIN`, a link
/// to the device's directory: a partition's (it has a `partition` file) is inside its disk's.
fn disk_of_device(sys: &Path, major: u64, minor: u64) -> Result<(String, Option<String>), String> {
    let link = sys.join(format!("dev/block/{major}:{minor}"));
    let real =
        std::fs::canonicalize(&link).map_err(|e| format!("{}: {}", link.display(), chain(&e)))?;
    let name = |p: &Path| p.file_name().and_then(|n| n.to_str()).map(str::to_string);
    let own = name(&real).ok_or_else(|| format!("{} has no name", real.display()))?;
    if real.join("partition").exists() {
        let disk = real
            .parent()
            .and_then(name)
            .ok_or_else(|| format!("the partition {} has no disk", real.display()))?;
        Ok((disk, Some(own)))
    } else {
        Ok((own, None))
    }
}

/// Whole disks with hardware behind them (`/sys/block/<name>/device`): not loop, ram, zram,
/// device-mapper or md devices, whose writes land on a physical disk already counted.
fn physical_disks(sys: &Path) -> Result<Vec<String>, String> {
    let dir = sys.join("block");
    let entries =
        std::fs::read_dir(&dir).map_err(|e| format!("{}: {}", dir.display(), chain(&e)))?;
    let mut disks: Vec<String> = entries
        .filter_map(Result::ok)
        .filter(|e| e.path().join("device").exists())
        .filter_map(|e| e.file_name().to_str().map(str::to_string))
        .collect();
    disks.sort();
    Ok(disks)
}

impl Sources {
    /// Read every source once (blocking).
    pub fn read(&self) -> Snapshot {
        let text = |path: &Path, cap: u64| {
            read_capped(path, cap).map_err(|e| format!("{}: {}", path.display(), chain(&e)))
        };
        let devices_known = !self.writes.devices().is_empty();
        Snapshot {
            stat: Some(text(&self.stat, STAT_CAP)),
            loadavg: Some(text(&self.loadavg, SMALL_CAP)),
            meminfo: Some(text(&self.meminfo, MEMINFO_CAP)),
            thermal: self.thermal.as_ref().ok().map(|z| text(&z.temp, SMALL_CAP)),
            throttled: self.throttled.as_ref().ok().map(|p| text(p, SMALL_CAP)),
            disk_space: Some(disk_space(&self.disk_path)),
            diskstats: devices_known.then(|| text(&self.diskstats, DISKSTATS_CAP)),
            uptime: Some(text(&self.uptime, SMALL_CAP)),
        }
    }

    /// Where `source` is read from, for the log.
    pub fn path(&self, source: Source) -> String {
        let p = |p: &Path| p.display().to_string();
        match source {
            Source::Stat => p(&self.stat),
            Source::LoadAvg => p(&self.loadavg),
            Source::MemInfo => p(&self.meminfo),
            Source::Uptime => p(&self.uptime),
            Source::DiskStats => p(&self.diskstats),
            Source::DiskSpace => p(&self.disk_path),
            Source::Thermal => self
                .thermal
                .as_ref()
                .map_or_else(|_| "-".into(), |z| p(&z.temp)),
            Source::Throttled => self
                .throttled
                .as_ref()
                .map_or_else(|_| "-".into(), |t| p(t)),
        }
    }
}

/// statvfs(3) of `path`.
fn disk_space(path: &Path) -> Result<DiskSpace, String> {
    let s = nix::sys::statvfs::statvfs(path)
        .map_err(|e| format!("statvfs {}: {}", path.display(), e.desc()))?;
    Ok(DiskSpace::from_blocks(
        wide(s.fragment_size()),
        wide(s.blocks()),
        wide(s.blocks_free()),
        wide(s.blocks_available()),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn write(path: &Path, text: &str) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }

    #[test]
    fn the_cpu_zone_is_found_among_the_zones_in_the_kernel_s_order() {
        let sys = tempfile::tempdir().unwrap();
        let zone = |n: &str, kind: &str, temp: &str| {
            write(&sys.path().join(format!("class/thermal/{n}/type")), kind);
            write(&sys.path().join(format!("class/thermal/{n}/temp")), temp);
        };
        zone("thermal_zone10", "cpu-thermal\n", "51000\n");
        zone("thermal_zone2", "acpitz\n", "40000\n");
        write(
            &sys.path().join("class/thermal/cooling_device0/type"),
            "fan\n",
        );
        let z = find_zone(sys.path()).unwrap();
        assert_eq!(
            (z.name.as_str(), z.kind.as_str()),
            ("thermal_zone10", "cpu-thermal")
        );
        // Without a CPU zone, the first readable one in number order (2 before 10).
        write(
            &sys.path().join("class/thermal/thermal_zone10/type"),
            "soc\n",
        );
        let z = find_zone(sys.path()).unwrap();
        assert_eq!(z.name, "thermal_zone2");
        assert_eq!(z.temp, sys.path().join("class/thermal/thermal_zone2/temp"));
    }

    #[test]
    fn no_readable_zone_says_why() {
        let sys = tempfile::tempdir().unwrap();
        assert!(find_zone(sys.path()).unwrap_err().contains("class/thermal"));
        write(
            &sys.path().join("class/thermal/thermal_zone0/type"),
            "acpitz\n",
        );
        write(&sys.path().join("class/thermal/thermal_zone0/temp"), "\n");
        let why = find_zone(sys.path()).unwrap_err();
        assert!(why.contains(r#"thermal_zone0 "acpitz""#), "{why}");
    }

    #[test]
    fn get_throttled_is_found_on_a_pi_4_and_a_pi_5_and_not_elsewhere() {
        let sys = tempfile::tempdir().unwrap();
        assert!(find_throttled(sys.path()).is_err());
        // A Pi 5: the firmware device under soc@107c000000, linked from its driver.
        let dev = sys
            .path()
            .join("devices/platform/soc@107c000000/soc@107c000000:firmware");
        write(&dev.join("get_throttled"), "0\n");
        let driver = sys.path().join("bus/platform/drivers/raspberrypi-firmware");
        std::fs::create_dir_all(&driver).unwrap();
        symlink(&dev, driver.join("soc@107c000000:firmware")).unwrap();
        assert_eq!(
            find_throttled(sys.path()).unwrap(),
            driver.join("soc@107c000000:firmware/get_throttled")
        );
        // A Pi 4's usual path wins.
        let pi4 = sys
            .path()
            .join("devices/platform/soc/soc:firmware/get_throttled");
        write(&pi4, "50005\n");
        assert_eq!(find_throttled(sys.path()).unwrap(), pi4);
    }

    #[test]
    fn a_configured_block_device_is_taken_as_given() {
        let w = find_writes(
            Some("sda"),
            Path::new("/nonexistent"),
            Path::new("/nonexistent"),
        );
        assert_eq!(w, Writes::Configured("sda".into()));
        assert_eq!(w.devices(), ["sda"]);
    }

    #[test]
    fn the_disk_of_a_partition_is_found_through_sys_dev_block() {
        // A Pi 4's sysfs: 179:2 is mmcblk0p2, a partition inside mmcblk0's directory.
        let sys = tempfile::tempdir().unwrap();
        let disk = "devices/platform/emmc2bus/fe340000.mmc/mmc_host/mmc0/mmc0:0001/block/mmcblk0";
        write(&sys.path().join(disk).join("mmcblk0p2/partition"), "2\n");
        std::fs::create_dir_all(sys.path().join("dev/block")).unwrap();
        symlink(
            format!("../../{disk}/mmcblk0p2"),
            sys.path().join("dev/block/179:2"),
        )
        .unwrap();
        symlink(format!("../../{disk}"), sys.path().join("dev/block/179:0")).unwrap();
        assert_eq!(
            disk_of_device(sys.path(), 179, 2),
            Ok(("mmcblk0".into(), Some("mmcblk0p2".into())))
        );
        // A whole disk (no partition table, or a device-mapper volume) is its own disk.
        assert_eq!(
            disk_of_device(sys.path(), 179, 0),
            Ok(("mmcblk0".into(), None))
        );
        let why = disk_of_device(sys.path(), 8, 1).unwrap_err();
        assert!(why.contains("dev/block/8:1"), "{why}");
    }

    #[test]
    fn the_data_dir_s_own_device_is_looked_up() {
        // Whatever this machine's device is: found in the fake sysfs when linked there, or
        // named as no block device (tmpfs, overlay).
        let data = tempfile::tempdir().unwrap();
        let (major, minor) = dev_major_minor(std::fs::metadata(data.path()).unwrap().dev());
        let sys = tempfile::tempdir().unwrap();
        let got = holding_disk(data.path(), sys.path());
        if major == 0 {
            assert!(got.unwrap_err().contains("no block device"));
            return;
        }
        assert!(
            got.unwrap_err()
                .contains(&format!("dev/block/{major}:{minor}"))
        );
        write(&sys.path().join("devices/virtual/block/dm-0/size"), "1\n");
        std::fs::create_dir_all(sys.path().join("dev/block")).unwrap();
        symlink(
            "../../devices/virtual/block/dm-0",
            sys.path().join(format!("dev/block/{major}:{minor}")),
        )
        .unwrap();
        assert_eq!(
            holding_disk(data.path(), sys.path()),
            Ok(("dm-0".into(), None))
        );
    }

    #[test]
    fn without_the_data_disk_every_physical_disk_is_summed_and_else_nothing() {
        let sys = tempfile::tempdir().unwrap();
        let w = find_writes(None, Path::new("/nonexistent-data"), sys.path());
        let Writes::Unknown(why) = &w else {
            panic!("{w:?}")
        };
        assert!(why.contains("/nonexistent-data"), "{why}");
        assert!(w.devices().is_empty());
        for (disk, physical) in [
            ("mmcblk0", true),
            ("sda", true),
            ("loop0", false),
            ("zram0", false),
        ] {
            let d = sys.path().join("block").join(disk);
            std::fs::create_dir_all(&d).unwrap();
            if physical {
                std::fs::create_dir_all(d.join("device")).unwrap();
            }
        }
        let w = find_writes(None, Path::new("/nonexistent-data"), sys.path());
        assert_eq!(w.devices(), ["mmcblk0", "sda"]);
        assert!(matches!(w, Writes::AllDisks { .. }));
    }

    #[test]
    fn a_snapshot_reads_what_was_found_and_says_what_failed() {
        let root = tempfile::tempdir().unwrap();
        let proc = root.path().join("proc");
        write(&proc.join("stat"), "cpu  1 2 3 4 5 6 7 8 0 0\n");
        write(&proc.join("loadavg"), "0.1 0.2 0.3 1/100 42\n");
        write(&proc.join("uptime"), "100.5 300.1\n");
        let s = Sources {
            stat: proc.join("stat"),
            loadavg: proc.join("loadavg"),
            meminfo: proc.join("meminfo"),
            uptime: proc.join("uptime"),
            diskstats: proc.join("diskstats"),
            thermal: Err("none".into()),
            throttled: Err("not a Pi".into()),
            disk_path: root.path().to_path_buf(),
            writes: Writes::Unknown("none".into()),
        };
        let snap = s.read();
        assert_eq!(snap.loadavg, Some(Ok("0.1 0.2 0.3 1/100 42\n".into())));
        let meminfo = snap.meminfo.unwrap().unwrap_err();
        assert!(
            meminfo.contains("proc/meminfo") && meminfo.contains("No such file"),
            "{meminfo}"
        );
        assert_eq!(snap.thermal, None);
        assert_eq!(snap.throttled, None);
        assert_eq!(snap.diskstats, None);
        let space = snap.disk_space.unwrap().unwrap();
        assert!(
            space.total > 0 && space.available <= space.total,
            "{space:?}"
        );
        assert_eq!(
            s.path(Source::MemInfo),
            proc.join("meminfo").display().to_string()
        );
    }

    #[test]
    fn a_file_larger_than_its_cap_is_cut_not_read_whole() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("big");
        std::fs::write(&p, "x".repeat(10_000)).unwrap();
        assert_eq!(read_capped(&p, 100).unwrap().len(), 100);
    }
}
