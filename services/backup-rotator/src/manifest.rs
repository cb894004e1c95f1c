//! A backup set as stored, and which sets rotation deletes (pure: no I/O).
//!
//! A set is a directory of parts and one `manifest.json`:
//!
//! ```text
//! <prefix>/20261204T100500Z-full/0001.lp.gz      line protocol, gzip, one measurement of one policy
//! <prefix>/20261204T100500Z-full/0002.lp.gz
//! <prefix>/20261204T100500Z-full/manifest.json  written last
//! ```
//!
//! The manifest is written only after every part was uploaded and read back (size and
//! SHA-256), so a set without one is unfinished (a run killed or failed mid-way) and is never
//! counted, restored or kept. Parts are numbered, not named after measurements, so any
//! measurement name is a safe object name; the manifest says which is which.
//!
//! Every part is plain gzip'd line protocol with nanosecond timestamps: `gunzip -c 0001.lp.gz`
//! can be posted to any InfluxDB's `/write?precision=ns` without wattbus.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The manifest's own format; a reader refuses a newer one rather than misread it.
pub const FORMAT: u32 = 1;
pub const MANIFEST: &str = "manifest.json";

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SetKind {
    /// Everything the database held before `to_ns`.
    Full,
    /// What was written with timestamps in `[from_ns, to_ns)`: restored after its `base`.
    Incremental,
}

impl SetKind {
    pub const fn as_str(self) -> &'static str {
        match self {
            SetKind::Full => "full",
            SetKind::Incremental => "incremental",
        }
    }
}

/// A field's type as `SHOW FIELD KEYS` says it, which decides how its values are written
/// (`1.5`, `3i`, `3u`, `"text"`, `true`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FieldType {
    Float,
    Integer,
    Unsigned,
    String,
    Boolean,
}

impl FieldType {
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "float" => FieldType::Float,
            "integer" => FieldType::Integer,
            "unsigned" => FieldType::Unsigned,
            "string" => FieldType::String,
            "boolean" => FieldType::Boolean,
            _ => return None,
        })
    }
}

/// A retention policy as the database had it, so a restore can make it again.
pub use influx_client::query::RetentionPolicy;

/// One measurement of one retention policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Part {
    /// The object's name inside the set (`0001.lp.gz`).
    pub file: String,
    pub retention_policy: String,
    pub measurement: String,
    pub fields: BTreeMap<String, FieldType>,
    pub tags: Vec<String>,
    pub points: u64,
    /// Stored (compressed) size and its SHA-256, hex.
    pub bytes: u64,
    pub sha256: String,
    /// Rows that line protocol cannot carry (a newline in a string), left out and counted.
    #[serde(default)]
    pub skipped: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    pub id: String,
    pub kind: SetKind,
    /// For an incremental set: the full set it continues.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base: Option<String>,
    pub database: String,
    /// The window: timestamps `>= from_ns` (none for a full set) and `< to_ns`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_ns: Option<i64>,
    pub to_ns: i64,
    /// When the set was made (Unix ms) and how long it took.
    pub created_ms: i64,
    pub duration_ms: u64,
    pub wattbus_version: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub influxdb_version: Option<String>,
    pub retention_policies: Vec<RetentionPolicy>,
    pub parts: Vec<Part>,
    /// Native mode: InfluxDB's own backup of the database, taken with this full set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub native: Option<Native>,
}

/// InfluxDB's own backup (`influxd backup -portable`, `influx backup`) stored beside a full
/// set's line protocol, its files as the tool wrote them under `native/`. Restore does not use
/// it: `wattbus backup fetch` downloads it for InfluxDB's own restore.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Native {
    /// The tool that made it (`influxd` or `influx`).
    pub tool: String,
    pub files: Vec<NativeFile>,
    /// Why there are no files: the tool failed (the line-protocol set is good without them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Native {
    /// Whether the native backup is there: files and no error.
    pub fn ok(&self) -> bool {
        self.error.is_none() && !self.files.is_empty()
    }

    pub fn bytes(&self) -> u64 {
        self.files.iter().fold(0, |n, f| n.saturating_add(f.bytes))
    }
}

/// One file of a native backup: its object name inside the set (`native/<name>`), size and
/// SHA-256 (hex), stored as the tool wrote it (its shards are already compressed).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NativeFile {
    pub file: String,
    pub bytes: u64,
    pub sha256: String,
}

/// The object name of a native backup's file `name` (as the tool named it).
pub fn native_file(name: &str) -> Option<String> {
    let ok = !name.is_empty()
        && name.len() <= 200
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-');
    ok.then(|| format!("native/{name}"))
}

impl Manifest {
    pub fn points(&self) -> u64 {
        self.parts.iter().fold(0, |n, p| n.saturating_add(p.points))
    }

    /// Stored bytes: the parts, and the native backup's files if any.
    pub fn bytes(&self) -> u64 {
        let native = self.native.as_ref().map_or(0, Native::bytes);
        self.parts
            .iter()
            .fold(native, |n, p| n.saturating_add(p.bytes))
    }

    /// Points left out because line protocol cannot carry them (see `export`).
    pub fn skipped(&self) -> u64 {
        self.parts
            .iter()
            .fold(0, |n, p| n.saturating_add(p.skipped))
    }

    /// Read a stored manifest, refusing what this version cannot read right.
    pub fn from_json(bytes: &[u8]) -> Result<Self, String> {
        let m: Manifest = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        if m.format > FORMAT {
            return Err(format!(
                "format {} is newer than this wattbus reads ({FORMAT}): restore with a newer wattbus",
                m.format
            ));
        }
        if !valid_id(&m.id) {
            return Err(format!("the set id {:?} is not one wattbus writes", m.id));
        }
        for p in &m.parts {
            if !valid_file(&p.file) {
                return Err(format!("part file {:?} is not one wattbus writes", p.file));
            }
        }
        for f in m.native.iter().flat_map(|n| &n.files) {
            let name = f.file.strip_prefix("native/").unwrap_or_default();
            if native_file(name).as_deref() != Some(f.file.as_str()) {
                return Err(format!(
                    "native file {:?} is not one wattbus writes",
                    f.file
                ));
            }
        }
        if m.database.is_empty()
            || m.database.len() > 255
            || m.database.chars().any(char::is_control)
        {
            return Err(format!(
                "database {:?} is not a name a database has",
                m.database
            ));
        }
        if m.native.is_some() && m.kind != SetKind::Full {
            return Err("a native backup in an incremental set".into());
        }
        // Times a set can have: made after 2000 and before 2200, a window that ends after it
        // starts. Anything else is damage (or a hostile file), never arithmetic to trust.
        const MIN_MS: i64 = 946_684_800_000;
        const MAX_MS: i64 = 7_258_118_400_000;
        if !(MIN_MS..MAX_MS).contains(&m.created_ms) {
            return Err(format!(
                "created_ms {} is not a plausible time",
                m.created_ms
            ));
        }
        if !(0..MAX_MS.saturating_mul(1_000_000)).contains(&m.to_ns) {
            return Err(format!("to_ns {} is not a plausible time", m.to_ns));
        }
        if m.from_ns.is_some_and(|f| f < 0 || f >= m.to_ns) {
            return Err(format!(
                "from_ns {:?} is not before to_ns {}",
                m.from_ns, m.to_ns
            ));
        }
        let id_kind = m.id.rsplit('-').next().unwrap_or_default();
        if id_kind != m.kind.as_str() {
            return Err(format!(
                "the set id {:?} says another kind than {:?}",
                m.id,
                m.kind.as_str()
            ));
        }
        if m.kind == SetKind::Incremental && (m.base.is_none() || m.from_ns.is_none()) {
            return Err("an incremental set without its base or window start".into());
        }
        Ok(m)
    }
}

/// The id of the set whose window ends at `to_ns`: its UTC time and kind, so ids sort by time.
pub fn set_id(to_ns: i64, kind: SetKind) -> String {
    let (y, mo, d, h, mi, s) = proto::utc::civil(to_ns.div_euclid(1_000_000_000));
    format!("{y:04}{mo:02}{d:02}T{h:02}{mi:02}{s:02}Z-{}", kind.as_str())
}

/// Whether `id` is a set id as [`set_id`] writes them (anything else under the prefix is not
/// ours and is never touched).
pub fn valid_id(id: &str) -> bool {
    let Some((stamp, kind)) = id.split_once('-') else {
        return false;
    };
    let b = stamp.as_bytes();
    b.len() == 16
        && b[8] == b'T'
        && b[15] == b'Z'
        && b[..8].iter().all(u8::is_ascii_digit)
        && b[9..15].iter().all(u8::is_ascii_digit)
        && (kind == "full" || kind == "incremental")
}

/// The time a set id names (its window's end), in Unix seconds.
pub fn id_time_s(id: &str) -> Option<i64> {
    if !valid_id(id) {
        return None;
    }
    let n = |r: std::ops::Range<usize>| id.get(r).and_then(|t| t.parse::<i64>().ok());
    let days = proto::utc::days_from_civil(n(0..4)?, n(4..6)?, n(6..8)?);
    Some(days * 86_400 + n(9..11)? * 3600 + n(11..13)? * 60 + n(13..15)?)
}

/// A part's file name: `0001.lp.gz`.
pub fn part_file(n: usize) -> String {
    format!("{n:04}.lp.gz")
}

fn valid_file(f: &str) -> bool {
    f.strip_suffix(".lp.gz")
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// What rotation needs to know of a good set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetRef {
    pub id: String,
    pub kind: SetKind,
}

/// The sets rotation deletes: all but the newest `keep_full` full sets, and the incremental
/// sets older than the oldest full set kept (they continue a deleted full set). Only good sets
/// (with a manifest) are given; with `keep_full` at least 1 the newest full set always stays,
/// so the only good copy is never deleted.
pub fn expired(sets: &[SetRef], keep_full: usize) -> Vec<String> {
    let keep_full = keep_full.max(1);
    let mut fulls: Vec<&str> = sets
        .iter()
        .filter(|s| s.kind == SetKind::Full)
        .map(|s| s.id.as_str())
        .collect();
    fulls.sort_unstable();
    if fulls.len() <= keep_full {
        return Vec::new();
    }
    let oldest_kept = fulls[fulls.len() - keep_full];
    let mut out: Vec<String> = sets
        .iter()
        .filter(|s| s.id.as_str() < oldest_kept)
        .map(|s| s.id.clone())
        .collect();
    out.sort();
    out
}

/// What makes a chain restorable: each incremental set continues the chain's full set and
/// starts no later than the set before it ended, so no hour is missing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainLink {
    pub id: String,
    pub kind: SetKind,
    pub base: Option<String>,
    pub from_ns: Option<i64>,
    pub to_ns: i64,
}

impl From<&Manifest> for ChainLink {
    fn from(m: &Manifest) -> Self {
        Self {
            id: m.id.clone(),
            kind: m.kind,
            base: m.base.clone(),
            from_ns: m.from_ns,
            to_ns: m.to_ns,
        }
    }
}

/// Checks a chain from [`chain`] (oldest first): a restore of a chain with a gap would
/// silently leave hours out. The error names the first set that does not continue.
pub fn check_chain(links: &[ChainLink]) -> Result<(), String> {
    let Some(first) = links.first() else {
        return Err("no full set".into());
    };
    if first.kind != SetKind::Full {
        return Err(format!("{} is not a full set", first.id));
    }
    let mut end = first.to_ns;
    for l in &links[1..] {
        if l.kind != SetKind::Incremental || l.base.as_deref() != Some(first.id.as_str()) {
            return Err(format!(
                "{} does not continue {} (its base is {:?}): a set between them is missing or damaged",
                l.id, first.id, l.base
            ));
        }
        match l.from_ns {
            Some(from) if from <= end => {}
            _ => {
                return Err(format!(
                    "{} starts at {:?} ns but the set before it ended at {end} ns: the readings between are in no set (a set is missing or damaged)",
                    l.id, l.from_ns
                ));
            }
        }
        end = end.max(l.to_ns);
    }
    Ok(())
}

/// The sets that restore the database as of the newest good set at or before `at` (all when
/// `None`): the newest full set and the incremental sets after it, oldest first.
pub fn chain(sets: &[SetRef], at: Option<&str>) -> Vec<String> {
    let mut sorted: Vec<&SetRef> = sets
        .iter()
        .filter(|s| at.is_none_or(|a| s.id.as_str() <= a))
        .collect();
    sorted.sort_by(|a, b| a.id.cmp(&b.id));
    let Some(start) = sorted.iter().rposition(|s| s.kind == SetKind::Full) else {
        return Vec::new();
    };
    sorted[start..].iter().map(|s| s.id.clone()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(id: &str, base: Option<&str>, from_ns: Option<i64>, to_ns: i64) -> ChainLink {
        ChainLink {
            id: id.into(),
            kind: if id.ends_with("full") {
                SetKind::Full
            } else {
                SetKind::Incremental
            },
            base: base.map(String::from),
            from_ns,
            to_ns,
        }
    }

    #[test]
    fn set_ids_name_their_time() {
        let t = 1_764_842_700; // 2025-12-04T10:05:00Z
        assert_eq!(
            id_time_s(&set_id(t * 1_000_000_000, SetKind::Full)),
            Some(t)
        );
        assert_eq!(id_time_s("not-a-set"), None);
    }

    #[test]
    fn a_chain_with_a_missing_hour_is_refused() {
        let f = "20261204T100000Z-full";
        let good = [
            link(f, None, None, 100),
            link("20261204T110000Z-incremental", Some(f), Some(90), 200),
            link("20261204T120000Z-incremental", Some(f), Some(190), 300),
        ];
        assert_eq!(check_chain(&good), Ok(()));
        // The middle set's manifest was lost: the third starts after the first ended.
        let gap = [good[0].clone(), good[2].clone()];
        let e = check_chain(&gap).unwrap_err();
        assert!(
            e.contains("20261204T120000Z-incremental") && e.contains("missing"),
            "{e}"
        );
        // An incremental set of another full set.
        let other = [
            good[0].clone(),
            link(
                "20261204T110000Z-incremental",
                Some("20261203T100000Z-full"),
                Some(90),
                200,
            ),
        ];
        assert!(
            check_chain(&other)
                .unwrap_err()
                .contains("does not continue")
        );
        assert!(check_chain(&good[1..]).is_err(), "no full set first");
    }

    fn s(id: &str) -> SetRef {
        SetRef {
            id: id.into(),
            kind: if id.ends_with("full") {
                SetKind::Full
            } else {
                SetKind::Incremental
            },
        }
    }

    #[test]
    fn ids_sort_by_time_and_are_recognised() {
        let a = set_id(1_764_842_700_000_000_000, SetKind::Full);
        assert_eq!(a, "20251204T100500Z-full");
        let b = set_id(1_764_846_300_000_000_000, SetKind::Incremental);
        assert!(a < b);
        assert!(valid_id(&a) && valid_id(&b));
        for bad in [
            "",
            "x-full",
            "20251204T100500Z-other",
            "20251204T100500-full",
            "../x",
        ] {
            assert!(!valid_id(bad), "{bad}");
        }
        assert!(valid_file(&part_file(7)) && !valid_file("../x.lp.gz") && !valid_file(".lp.gz"));
    }

    #[test]
    fn rotation_keeps_the_newest_fulls_and_what_they_need() {
        let sets: Vec<SetRef> = [
            "20260101T000000Z-full",
            "20260101T010000Z-incremental",
            "20260102T000000Z-full",
            "20260102T010000Z-incremental",
            "20260103T000000Z-full",
            "20260103T010000Z-incremental",
        ]
        .into_iter()
        .map(s)
        .collect();
        assert_eq!(
            expired(&sets, 2),
            vec!["20260101T000000Z-full", "20260101T010000Z-incremental"]
        );
        assert!(expired(&sets, 3).is_empty());
        // Never the last full set, whatever the setting.
        assert_eq!(expired(&sets, 0).len(), 4);
        assert!(!expired(&sets, 0).contains(&"20260103T000000Z-full".to_string()));
        // Only incrementals: nothing to anchor on, nothing deleted.
        assert!(expired(&[s("20260101T010000Z-incremental")], 1).is_empty());
    }

    #[test]
    fn a_restore_chain_is_the_newest_full_and_what_follows() {
        let sets: Vec<SetRef> = [
            "20260101T000000Z-full",
            "20260101T010000Z-incremental",
            "20260102T000000Z-full",
            "20260102T010000Z-incremental",
            "20260102T020000Z-incremental",
        ]
        .into_iter()
        .map(s)
        .collect();
        assert_eq!(
            chain(&sets, None),
            vec![
                "20260102T000000Z-full",
                "20260102T010000Z-incremental",
                "20260102T020000Z-incremental"
            ]
        );
        assert_eq!(
            chain(&sets, Some("20260101T230000Z-x")),
            vec!["20260101T000000Z-full", "20260101T010000Z-incremental"]
        );
        assert!(chain(&[s("20260101T010000Z-incremental")], None).is_empty());
    }

    #[test]
    fn manifests_round_trip_and_refuse_what_they_cannot_read() {
        let m = Manifest {
            format: FORMAT,
            id: "20260101T000000Z-full".into(),
            kind: SetKind::Full,
            base: None,
            database: "wattbus".into(),
            from_ns: None,
            to_ns: 1_767_225_600_000_000_000,
            created_ms: 1_767_225_660_000,
            duration_ms: 3,
            wattbus_version: "0.1.0".into(),
            influxdb_version: Some("1.6.7".into()),
            retention_policies: vec![],
            parts: vec![Part {
                file: part_file(1),
                retention_policy: "autogen".into(),
                measurement: "power".into(),
                fields: BTreeMap::from([("power_w".into(), FieldType::Float)]),
                tags: vec!["device".into()],
                points: 10,
                bytes: 100,
                sha256: "ab".into(),
                skipped: 0,
            }],
            native: Some(Native {
                tool: "influxd".into(),
                files: vec![NativeFile {
                    file: native_file("20260101T000000Z.s1.tar.gz").expect("a tool's name"),
                    bytes: 7,
                    sha256: "cd".into(),
                }],
                error: None,
            }),
        };
        assert_eq!(m.bytes(), 107);
        let json = serde_json::to_vec(&m).expect("serialises");
        assert_eq!(Manifest::from_json(&json).expect("reads"), m);
        let newer = String::from_utf8(json.clone())
            .expect("utf-8")
            .replace("\"format\":1", "\"format\":9");
        assert!(
            Manifest::from_json(newer.as_bytes())
                .expect_err("newer")
                .contains("newer")
        );
        let text = String::from_utf8(json).expect("utf-8");
        let evil = text.replace("0001.lp.gz", "../../etc/passwd");
        assert!(Manifest::from_json(evil.as_bytes()).is_err());
        for evil in [
            "native/../../x",
            "native/.hidden",
            "native/a/b",
            "other/x.tar.gz",
        ] {
            let bad = text.replace("native/20260101T000000Z.s1.tar.gz", evil);
            assert!(Manifest::from_json(bad.as_bytes()).is_err(), "{evil}");
        }
        // Times no set has (arithmetic on them would overflow), and a kind the id denies.
        for (from, to) in [
            ("1767225660000", "-9223372036854775808"),
            ("1767225600000000000", "9223372036854775807"),
            ("\"kind\":\"full\"", "\"kind\":\"incremental\""),
        ] {
            let bad = text.replace(from, to);
            assert_ne!(bad, text);
            assert!(Manifest::from_json(bad.as_bytes()).is_err(), "{bad}");
        }
    }
}
