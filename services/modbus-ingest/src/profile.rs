//! Meter profiles: a meter's register map as a TOML file, not as code.
//!
//! A profile says which registers to read, how to decode them and where each value goes
//! (measurement, channel, field, tags). The shipped profiles are compiled into the binary with
//! `include_str!`; a user adds or replaces one by dropping a `*.toml` file into the profile
//! folder ([`load_dir`]), without a rebuild. The format is documented in `docs/modbus.md`.
//!
//! Invariants of a [`Profile`] that has passed [`Profile::from_toml`] (the planner and decoder
//! rely on them instead of checking again):
//! - registers of the same function code never overlap, and each fits below address 0xFFFF;
//! - every register fits into one request (`words ≤ limits.max_registers ≤ 125`);
//! - `(measurement, channel, tags, field)` is unique, so two registers never write one value;
//! - measurement, channel and tag names are valid topic segments, field names are lower snake
//!   case and end in the unit (`power_w` for `W`), scales are finite and non-zero;
//! - every register's poll class has an interval in `[poll_ms]`.
//!
//! All problems of a file are reported together, each naming its entry (`registers[12]
//! (power_w at 0x0140)`, counted from 0 in file order) and the reason, so a user fixes a file in
//! one round.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};

use proto::Segment;
use serde::Deserialize;

use crate::plan::{Limits, MAX_READ_REGISTERS};

/// Which Modbus table a register lives in. The two are separate address spaces: holding
/// register 0x0000 and input register 0x0000 are different values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Function {
    /// Read with function code 03 (ORNO meters).
    Holding,
    /// Read with function code 04 (Eastron meters).
    Input,
}

impl Function {
    /// The Modbus function code that reads this table.
    pub const fn code(self) -> u8 {
        match self {
            Function::Holding => 3,
            Function::Input => 4,
        }
    }
}

/// How the register words of one value are interpreted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ValueType {
    U16,
    I16,
    U32,
    I32,
    U64,
    F32,
    F64,
}

impl ValueType {
    /// How many 16-bit registers the value occupies.
    pub const fn words(self) -> u16 {
        match self {
            ValueType::U16 | ValueType::I16 => 1,
            ValueType::U32 | ValueType::I32 | ValueType::F32 => 2,
            ValueType::U64 | ValueType::F64 => 4,
        }
    }

    pub const fn as_str(self) -> &'static str {
        match self {
            ValueType::U16 => "u16",
            ValueType::I16 => "i16",
            ValueType::U32 => "u32",
            ValueType::I32 => "i32",
            ValueType::U64 => "u64",
            ValueType::F32 => "f32",
            ValueType::F64 => "f64",
        }
    }
}

impl fmt::Display for ValueType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Order of the 16-bit words of a multi-register value. Bytes inside a word are always
/// big-endian (the Modbus spec fixes that); only the word order varies between vendors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WordOrder {
    /// High word first (ORNO, Eastron, and most meters).
    Big,
    /// Low word first ("word-swapped", e.g. some Schneider and ABB maps).
    Little,
}

/// Who the meter is and where its map comes from.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Meter {
    /// The name a device configuration uses to pick this profile (`orno-we-515`). A user file
    /// with the same model replaces the built-in one.
    pub model: String,
    /// Other models that share this register map (`orno-we-514`), so one file serves them all.
    #[serde(default)]
    pub aliases: Vec<String>,
    pub vendor: String,
    /// Human-readable product name, for logs and the scan tool.
    pub name: String,
    /// The vendor document the registers were taken from, so a reviewer can check every entry.
    pub source: String,
}

/// Values a register inherits when it does not set them itself.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct DefaultsFile {
    function: Option<Function>,
    word_order: Option<WordOrder>,
    poll: Option<String>,
}

/// One `[[registers]]` entry as written; `None` means "take it from `[defaults]`".
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RegisterFile {
    address: u16,
    function: Option<Function>,
    #[serde(rename = "type")]
    value_type: ValueType,
    word_order: Option<WordOrder>,
    #[serde(default = "one")]
    scale: f64,
    #[serde(default)]
    unit: String,
    measurement: String,
    channel: String,
    field: String,
    #[serde(default)]
    tags: BTreeMap<String, String>,
    poll: Option<String>,
}

const fn one() -> f64 {
    1.0
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct ProfileFile {
    meter: Meter,
    #[serde(default)]
    defaults: DefaultsFile,
    #[serde(default)]
    limits: Limits,
    poll_ms: BTreeMap<String, u64>,
    registers: Vec<RegisterFile>,
}

/// One value read from a meter, with every default resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct Register {
    /// Zero-based protocol address (what goes on the wire), not the "40001"-style number
    /// some vendor tables print.
    pub address: u16,
    pub function: Function,
    pub value_type: ValueType,
    pub word_order: WordOrder,
    /// Multiplier from the raw number to `unit` (0.01 for a register counting 0.01 V).
    pub scale: f64,
    /// Unit after scaling, e.g. `W`; empty for dimensionless values like power factor.
    pub unit: String,
    pub measurement: Segment,
    pub channel: Segment,
    pub field: String,
    /// Extra identity for the point, e.g. `tariff = "t1"` for a tariff counter.
    pub tags: BTreeMap<Segment, Segment>,
    /// Poll class (`fast`, `slow`, …): registers of one class are read together.
    pub poll: String,
}

impl Register {
    /// How many 16-bit registers this value occupies.
    pub const fn words(&self) -> u16 {
        self.value_type.words()
    }

    /// Last address the value occupies (inclusive). Cannot overflow for a validated register.
    pub fn last(&self) -> u16 {
        self.address.saturating_add(self.words() - 1)
    }
}

/// A validated meter profile.
#[derive(Debug, Clone, PartialEq)]
pub struct Profile {
    pub meter: Meter,
    /// How the planner may merge reads for this meter (some meters refuse holes or long reads).
    pub limits: Limits,
    /// Default interval per poll class in milliseconds; a device configuration may override it.
    pub poll_ms: BTreeMap<String, u64>,
    pub registers: Vec<Register>,
    /// The file it came from (`builtin:orno-we-515.toml` for an embedded one), for messages.
    pub origin: String,
}

/// One thing wrong with one entry of a profile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Where: `meter.model`, `poll_ms.fast`, `registers[3] (power_w at 0x0140)`.
    pub entry: String,
    pub reason: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.entry, self.reason)
    }
}

/// Why a profile, or a folder of them, was rejected. Every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    #[error("{}: cannot read: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Not TOML, a missing or unknown key, or a value of the wrong kind (e.g. `type = "f16"`).
    /// The TOML error carries the line, the column and the reason.
    #[error("{file}: {source}")]
    Syntax {
        file: String,
        #[source]
        source: toml::de::Error,
    },
    #[error("{file}: {}", list(problems))]
    Invalid {
        file: String,
        problems: Vec<Problem>,
    },
    #[error("{file}: model name {name:?} is also claimed by {other}")]
    DuplicateModel {
        file: String,
        name: String,
        other: String,
    },
}

fn list(problems: &[Problem]) -> String {
    problems
        .iter()
        .map(Problem::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

impl Profile {
    /// Parses and validates one profile. `origin` names the file in every error.
    pub fn from_toml(text: &str, origin: &str) -> Result<Profile, ProfileError> {
        let file: ProfileFile = toml::from_str(text).map_err(|source| ProfileError::Syntax {
            file: origin.to_string(),
            source,
        })?;
        let mut problems = Vec::new();
        let profile = resolve(file, origin, &mut problems);
        if problems.is_empty() {
            Ok(profile)
        } else {
            Err(ProfileError::Invalid {
                file: origin.to_string(),
                problems,
            })
        }
    }

    /// Every name this profile answers to: its model, then its aliases.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.meter.model.as_str())
            .chain(self.meter.aliases.iter().map(String::as_str))
    }
}

/// Builds the resolved profile and records every problem found on the way. The returned
/// profile is only used when `problems` stays empty.
fn resolve(file: ProfileFile, origin: &str, problems: &mut Vec<Problem>) -> Profile {
    let mut problem = |entry: String, reason: String| problems.push(Problem { entry, reason });

    for (key, name) in std::iter::once(("meter.model".to_string(), &file.meter.model)).chain(
        file.meter
            .aliases
            .iter()
            .enumerate()
            .map(|(i, a)| (format!("meter.aliases[{i}]"), a)),
    ) {
        if let Err(reason) = check_model_name(name) {
            problem(key, reason);
        }
    }
    for (key, value) in [
        ("meter.vendor", &file.meter.vendor),
        ("meter.name", &file.meter.name),
        ("meter.source", &file.meter.source),
    ] {
        if value.trim().is_empty() {
            problem(key.to_string(), "must not be empty".to_string());
        }
    }

    let limits = file.limits;
    if !(1..=MAX_READ_REGISTERS).contains(&limits.max_registers) {
        problem(
            "limits.max_registers".to_string(),
            format!(
                "is {}; a Modbus read carries 1 to {MAX_READ_REGISTERS} registers",
                limits.max_registers
            ),
        );
    }

    if file.poll_ms.is_empty() {
        problem(
            "poll_ms".to_string(),
            "names no poll class; add e.g. `fast = 1000`".to_string(),
        );
    }
    for (class, interval) in &file.poll_ms {
        if let Err(e) = Segment::new(class.as_str()) {
            problem(format!("poll_ms.{class}"), format!("class name {e}"));
        }
        if *interval == 0 {
            problem(
                format!("poll_ms.{class}"),
                "interval must be at least 1 ms".to_string(),
            );
        }
    }

    if file.registers.is_empty() {
        problem(
            "registers".to_string(),
            "a profile needs at least one [[registers]] entry".to_string(),
        );
    }

    let defaults = &file.defaults;
    if let Some(class) = &defaults.poll
        && !file.poll_ms.contains_key(class)
    {
        problem(
            "defaults.poll".to_string(),
            format!("poll class {class:?} has no interval in [poll_ms]"),
        );
    }

    let mut registers = Vec::with_capacity(file.registers.len());
    // Entry names in file order, for messages that point at a second entry.
    let mut entries = Vec::with_capacity(file.registers.len());
    for (i, spec) in file.registers.into_iter().enumerate() {
        let entry = format!("registers[{i}] ({} at {:#06x})", spec.field, spec.address);
        let reg = resolve_register(spec, defaults, &file.poll_ms, limits, &entry, &mut problem);
        entries.push(entry);
        if let Some(reg) = reg {
            registers.push((i, reg));
        }
    }

    // Overlaps: within one table, sorted by address, each register must start after the
    // furthest end so far (not just after its neighbour: a u64 can cover two u16s).
    let mut by_address: Vec<&(usize, Register)> = registers.iter().collect();
    by_address.sort_by_key(|(_, r)| (r.function, r.address));
    let mut furthest: Option<&(usize, Register)> = None;
    for item in by_address {
        let (ib, b) = item;
        if let Some((ia, a)) = furthest
            && a.function == b.function
            && a.last() >= b.address
        {
            problem(
                entries[*ib].clone(),
                format!(
                    "{} registers {:#06x}..={:#06x} overlap {} ({:#06x}..={:#06x})",
                    fn_name(b.function),
                    b.address,
                    b.last(),
                    entries[*ia],
                    a.address,
                    a.last()
                ),
            );
        }
        let further = furthest.is_none_or(|(_, a)| a.function != b.function || b.last() > a.last());
        if further {
            furthest = Some(item);
        }
    }

    // Identity: two registers must never produce the same value of the same point.
    type PointField<'a> = (
        &'a Segment,
        &'a Segment,
        &'a BTreeMap<Segment, Segment>,
        &'a str,
    );
    let mut seen: HashMap<PointField<'_>, usize> = HashMap::new();
    for (i, r) in &registers {
        let key = (&r.measurement, &r.channel, &r.tags, r.field.as_str());
        if let Some(first) = seen.get(&key) {
            problem(
                entries[*i].clone(),
                format!(
                    "measurement {}, channel {}, field {} with the same tags is already \
                     produced by {}",
                    r.measurement, r.channel, r.field, entries[*first]
                ),
            );
        } else {
            seen.insert(key, *i);
        }
    }

    Profile {
        meter: file.meter,
        limits,
        poll_ms: file.poll_ms,
        registers: registers.into_iter().map(|(_, r)| r).collect(),
        origin: origin.to_string(),
    }
}

fn fn_name(f: Function) -> &'static str {
    match f {
        Function::Holding => "holding",
        Function::Input => "input",
    }
}

/// Resolves defaults and checks one entry; `None` when a name could not be built (the problem
/// is recorded), so later checks do not pile up follow-on errors.
fn resolve_register(
    spec: RegisterFile,
    defaults: &DefaultsFile,
    poll_ms: &BTreeMap<String, u64>,
    limits: Limits,
    entry: &str,
    problem: &mut impl FnMut(String, String),
) -> Option<Register> {
    let mut ok = true;
    let mut bad = |reason: String| problem(entry.to_string(), reason);

    let words = spec.value_type.words();
    if u32::from(spec.address) + u32::from(words) - 1 > u32::from(u16::MAX) {
        bad(format!(
            "a {} at {:#06x} needs {words} registers and runs past the last address 0xffff",
            spec.value_type, spec.address
        ));
        ok = false;
    }
    if words > limits.max_registers {
        bad(format!(
            "a {} needs {words} registers but limits.max_registers is {}",
            spec.value_type, limits.max_registers
        ));
    }
    if !spec.scale.is_finite() || spec.scale == 0.0 {
        bad(format!(
            "scale {} must be a finite, non-zero number",
            spec.scale
        ));
    }
    if let Err(reason) = check_field_name(&spec.field) {
        bad(reason);
    } else if let Err(reason) = check_unit_suffix(&spec.field, &spec.unit) {
        bad(reason);
    }
    let measurement = segment("measurement", &spec.measurement, &mut bad);
    let channel = segment("channel", &spec.channel, &mut bad);
    let mut tags = BTreeMap::new();
    if spec.tags.len() > proto::MAX_TAGS {
        bad(format!(
            "{} tags; at most {}",
            spec.tags.len(),
            proto::MAX_TAGS
        ));
    }
    for (k, v) in &spec.tags {
        if proto::RESERVED_NAMES.contains(&k.as_str()) {
            bad(format!(
                "tag name {k:?} is reserved (site, device, channel, quality and time are the reading's own)"
            ));
        }
        let key = segment("tag name", k, &mut bad);
        let value = segment(&format!("tag {k}"), v, &mut bad);
        match (key, value) {
            (Some(k), Some(v)) => {
                tags.insert(k, v);
            }
            _ => ok = false,
        }
    }
    let poll = match spec.poll.or_else(|| defaults.poll.clone()) {
        Some(class) if poll_ms.contains_key(&class) => Some(class),
        Some(class) => {
            bad(format!("poll class {class:?} has no interval in [poll_ms]"));
            None
        }
        None => {
            bad("no poll class: set `poll` here or in [defaults]".to_string());
            None
        }
    };
    match (measurement, channel, poll) {
        (Some(measurement), Some(channel), Some(poll)) if ok => Some(Register {
            address: spec.address,
            function: spec
                .function
                .or(defaults.function)
                .unwrap_or(Function::Holding),
            value_type: spec.value_type,
            word_order: spec
                .word_order
                .or(defaults.word_order)
                .unwrap_or(WordOrder::Big),
            scale: spec.scale,
            unit: spec.unit,
            measurement,
            channel,
            field: spec.field,
            tags,
            poll,
        }),
        _ => None,
    }
}

fn segment(what: &str, value: &str, bad: &mut impl FnMut(String)) -> Option<Segment> {
    match Segment::new(value) {
        Ok(s) => Some(s),
        Err(e) => {
            bad(format!("{what} {value:?} {e}"));
            None
        }
    }
}

/// Model names are what users type in a device configuration: lower case, digits and `-`.
fn check_model_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "model name {name:?} must be lower case letters, digits and '-' (≤64), \
             e.g. \"orno-we-515\""
        ))
    }
}

/// `proto`'s rule for measurement fields, the one a reading is checked by on publish: a
/// profile it accepts never yields a reading that is refused. With an example, for the person
/// writing the profile.
fn check_field_name(name: &str) -> Result<(), String> {
    proto::check_field_name(name).map_err(|reason| format!("{reason}, e.g. \"power_w\""))
}

/// Units live in field names (`power_w`), and `unit` says the same thing, so a profile that
/// scales to kW but still calls the field `power_w` is caught here rather than in a dashboard.
/// A unit with no letters or digits (`%`, `°`) is not checked.
fn check_unit_suffix(field: &str, unit: &str) -> Result<(), String> {
    let suffix: String = unit
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .map(|c| c.to_ascii_lowercase())
        .collect();
    if suffix.is_empty() || field.ends_with(&format!("_{suffix}")) {
        Ok(())
    } else {
        Err(format!(
            "field name {field:?} must end in _{suffix} for unit {unit:?} \
             (units are part of field names)"
        ))
    }
}

/// The profiles shipped with wattbus, compiled in so the binary works without a profile folder.
const BUILTIN: &[(&str, &str)] = &[
    (
        "orno-we-515.toml",
        include_str!("../profiles/orno-we-515.toml"),
    ),
    (
        "orno-we-517.toml",
        include_str!("../profiles/orno-we-517.toml"),
    ),
    (
        "eastron-sdm120.toml",
        include_str!("../profiles/eastron-sdm120.toml"),
    ),
    (
        "eastron-sdm630.toml",
        include_str!("../profiles/eastron-sdm630.toml"),
    ),
];

/// A set of profiles, looked up by model name or alias.
#[derive(Debug, Clone, Default)]
pub struct Profiles {
    profiles: Vec<Profile>,
    /// Model and alias → index into `profiles`.
    names: BTreeMap<String, usize>,
}

impl Profiles {
    /// Only the shipped profiles.
    pub fn builtin() -> Result<Profiles, ProfileError> {
        let mut set = Profiles::default();
        for (name, text) in BUILTIN {
            let profile = Profile::from_toml(text, &format!("builtin:{name}"))?;
            set.insert(profile)?;
        }
        Ok(set)
    }

    /// The profile for `model` (a model name or an alias).
    pub fn get(&self, model: &str) -> Option<&Profile> {
        self.names.get(model).and_then(|&i| self.profiles.get(i))
    }

    pub fn iter(&self) -> impl Iterator<Item = &Profile> {
        self.profiles.iter()
    }

    pub fn len(&self) -> usize {
        self.profiles.len()
    }

    pub fn is_empty(&self) -> bool {
        self.profiles.is_empty()
    }

    /// Adds a profile whose names must not be taken yet.
    fn insert(&mut self, profile: Profile) -> Result<(), ProfileError> {
        for name in profile.names() {
            if let Some(&other) = self.names.get(name) {
                return Err(ProfileError::DuplicateModel {
                    file: profile.origin.clone(),
                    name: name.to_string(),
                    other: self.profiles[other].origin.clone(),
                });
            }
        }
        let index = self.profiles.len();
        for name in profile.names() {
            self.names.insert(name.to_string(), index);
        }
        self.profiles.push(profile);
        Ok(())
    }

    /// Puts a user profile over the built-ins: it replaces the built-in with the same model,
    /// and its names win over built-in aliases (the built-in stays reachable by its model).
    fn overlay(builtin: Profiles, user: Vec<Profile>) -> Profiles {
        let replaced: Vec<String> = user.iter().map(|p| p.meter.model.clone()).collect();
        let mut set = Profiles::default();
        let kept = builtin
            .profiles
            .into_iter()
            .filter(|p| !replaced.contains(&p.meter.model));
        for profile in kept.chain(user) {
            let index = set.profiles.len();
            for name in profile.names() {
                set.names.insert(name.to_string(), index);
            }
            set.profiles.push(profile);
        }
        set
    }
}

/// Loads the built-in profiles and every `*.toml` file in `dir` (not its subfolders). A file
/// whose model matches a built-in replaces it. Any invalid file, or two files claiming the same
/// model or alias, fails the whole load: a meter silently read with the wrong map is worse
/// than a service that refuses to start.
pub fn load_dir(dir: &Path) -> Result<Profiles, ProfileError> {
    let io = |source| ProfileError::Io {
        path: dir.to_path_buf(),
        source,
    };
    let mut paths = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io)? {
        let path = entry.map_err(io)?.path();
        if path.extension().is_some_and(|e| e == "toml") && path.is_file() {
            paths.push(path);
        }
    }
    // Sorted so that which file an error names does not depend on the file system.
    paths.sort();

    let mut user = Profiles::default();
    for path in paths {
        let text = std::fs::read_to_string(&path).map_err(|source| ProfileError::Io {
            path: path.clone(),
            source,
        })?;
        let profile = Profile::from_toml(&text, &path.display().to_string())?;
        user.insert(profile)?;
    }
    Ok(Profiles::overlay(Profiles::builtin()?, user.profiles))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
        [meter]
        model = "test-meter"
        vendor = "Test"
        name = "Test meter"
        source = "hand-written for a test"

        [poll_ms]
        fast = 1000

        [defaults]
        poll = "fast"

        [[registers]]
        address = 0x0010
        type = "i32"
        unit = "W"
        measurement = "power"
        channel = "l1"
        field = "power_w"
    "#;

    fn with_register(extra: &str) -> String {
        format!("{MINIMAL}\n[[registers]]\n{extra}")
    }

    fn problems(text: &str) -> Vec<Problem> {
        match Profile::from_toml(text, "test.toml") {
            Err(ProfileError::Invalid { problems, .. }) => problems,
            other => panic!("expected an invalid profile, got {other:?}"),
        }
    }

    #[test]
    fn minimal_profile_resolves_defaults() {
        let p = Profile::from_toml(MINIMAL, "test.toml").unwrap();
        assert_eq!(p.registers.len(), 1);
        let r = &p.registers[0];
        assert_eq!(r.address, 0x10);
        assert_eq!(r.function, Function::Holding);
        assert_eq!(r.word_order, WordOrder::Big);
        assert_eq!(r.scale, 1.0);
        assert_eq!(r.poll, "fast");
        assert_eq!(r.last(), 0x11);
        assert_eq!(p.limits, Limits::default());
    }

    #[test]
    fn overlapping_registers_name_both_entries() {
        let text = with_register(
            r#"address = 0x0011
               type = "u16"
               measurement = "power"
               channel = "l1"
               field = "voltage_v"
               unit = "V""#,
        );
        let p = problems(&text);
        assert_eq!(p.len(), 1, "{p:?}");
        assert_eq!(p[0].entry, "registers[1] (voltage_v at 0x0011)");
        assert!(
            p[0].reason
                .contains("overlap registers[0] (power_w at 0x0010)"),
            "{}",
            p[0].reason
        );
    }

    #[test]
    fn a_wide_register_overlapping_two_later_ones_is_reported_for_each() {
        let text = MINIMAL.replace("type = \"i32\"", "type = \"u64\"");
        let text = with_register(
            r#"address = 0x0011
               type = "u16"
               measurement = "power"
               channel = "l1"
               field = "voltage_v"
               unit = "V""#,
        )
        .replace(MINIMAL, &text);
        let text = format!(
            "{text}\n[[registers]]\naddress = 0x0013\ntype = \"u16\"\nmeasurement = \"power\"\n\
             channel = \"l1\"\nfield = \"current_a\"\nunit = \"A\"\n"
        );
        let p = problems(&text);
        let entries: Vec<&str> = p.iter().map(|p| p.entry.as_str()).collect();
        assert_eq!(
            entries,
            [
                "registers[1] (voltage_v at 0x0011)",
                "registers[2] (current_a at 0x0013)"
            ]
        );
        assert!(p[1].reason.contains("overlap registers[0]"), "{p:?}");
    }

    #[test]
    fn same_address_in_the_other_table_is_not_an_overlap() {
        let text = with_register(
            r#"address = 0x0010
               function = "input"
               type = "u16"
               measurement = "power"
               channel = "l1"
               field = "voltage_v"
               unit = "V""#,
        );
        let p = Profile::from_toml(&text, "test.toml").unwrap();
        assert_eq!(p.registers[1].function, Function::Input);
    }

    #[test]
    fn unknown_type_is_a_syntax_error_with_file_and_line() {
        let text = MINIMAL.replace(r#"type = "i32""#, r#"type = "f16""#);
        let err = Profile::from_toml(&text, "profiles/bad.toml").unwrap_err();
        let msg = err.to_string();
        assert!(msg.starts_with("profiles/bad.toml: "), "{msg}");
        assert!(msg.contains("unknown variant `f16`"), "{msg}");
        assert!(msg.contains("line 16, column 16"), "{msg}");
    }

    #[test]
    fn unknown_key_is_rejected() {
        let text = MINIMAL.replace("unit = \"W\"", "unit = \"W\"\nscael = 0.1");
        let msg = Profile::from_toml(&text, "x.toml").unwrap_err().to_string();
        assert!(msg.contains("unknown field `scael`"), "{msg}");
    }

    #[test]
    fn field_names_must_be_snake_case_with_the_unit() {
        let text = MINIMAL.replace("field = \"power_w\"", "field = \"PowerW\"");
        let p = problems(&text);
        assert_eq!(p[0].entry, "registers[0] (PowerW at 0x0010)");
        assert!(p[0].reason.contains("lower snake case"), "{}", p[0].reason);

        let text = MINIMAL.replace("unit = \"W\"", "unit = \"kW\"");
        let p = problems(&text);
        assert!(p[0].reason.contains("must end in _kw"), "{}", p[0].reason);
    }

    #[test]
    fn address_past_the_end_of_the_table_is_rejected() {
        let text = MINIMAL.replace("address = 0x0010", "address = 0xFFFF");
        let p = problems(&text);
        assert!(p[0].reason.contains("runs past the last address"), "{p:?}");
    }

    #[test]
    fn zero_or_infinite_scale_is_rejected() {
        for scale in ["0.0", "inf", "nan"] {
            let text = MINIMAL.replace("unit = \"W\"", &format!("unit = \"W\"\nscale = {scale}"));
            let p = problems(&text);
            assert!(p[0].reason.contains("finite, non-zero"), "{scale}: {p:?}");
        }
    }

    #[test]
    fn duplicate_point_field_is_rejected_unless_tags_differ() {
        let dup = r#"address = 0x0020
               type = "i32"
               unit = "W"
               measurement = "power"
               channel = "l1"
               field = "power_w""#;
        let p = problems(&with_register(dup));
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(
            p[0].reason.contains("already produced by registers[0]"),
            "{p:?}"
        );

        let tagged = format!("{dup}\ntags = {{ tariff = \"t1\" }}");
        let profile = Profile::from_toml(&with_register(&tagged), "t.toml").unwrap();
        assert_eq!(profile.registers[1].tags.len(), 1);
    }

    #[test]
    fn a_tag_named_like_the_readings_identity_is_refused() {
        let tagged = r#"address = 0x0020
               type = "i32"
               unit = "W"
               measurement = "power"
               channel = "l1"
               field = "power_w"
               tags = { device = "sub-a" }"#;
        let p = problems(&with_register(tagged));
        assert!(
            p.iter()
                .any(|p| p.reason.contains("tag name \"device\" is reserved")),
            "{p:?}"
        );
    }

    #[test]
    fn unknown_poll_class_and_bad_names_are_all_reported_together() {
        let text = with_register(
            r#"address = 0x0030
               type = "u16"
               measurement = "power/x"
               channel = "l1"
               field = "voltage_v"
               unit = "V"
               poll = "sometimes""#,
        );
        let p = problems(&text);
        let reasons: Vec<&str> = p.iter().map(|p| p.reason.as_str()).collect();
        assert_eq!(p.len(), 2, "{reasons:?}");
        assert!(
            reasons[0].starts_with("measurement \"power/x\""),
            "{reasons:?}"
        );
        assert!(
            reasons[1].contains("\"sometimes\" has no interval"),
            "{reasons:?}"
        );
        let err = Profile::from_toml(&text, "f.toml").unwrap_err().to_string();
        assert!(
            err.starts_with("f.toml: registers[1] (voltage_v at 0x0030): "),
            "{err}"
        );
    }

    #[test]
    fn limits_must_fit_the_modbus_read() {
        let text = format!("{MINIMAL}\n[limits]\nmax_registers = 126\n");
        let p = problems(&text);
        assert_eq!(p[0].entry, "limits.max_registers");

        let text = format!("{MINIMAL}\n[limits]\nmax_registers = 1\n");
        let p = problems(&text);
        assert!(p[0].reason.contains("limits.max_registers is 1"), "{p:?}");
    }

    #[test]
    fn builtin_profiles_load_and_answer_to_aliases() {
        let set = Profiles::builtin().unwrap();
        assert_eq!(set.len(), BUILTIN.len());
        let we515 = set.get("orno-we-515").unwrap();
        assert_eq!(set.get("orno-we-514"), Some(we515));
        assert!(set.get("eastron-sdm120").is_some());
        assert!(set.get("eastron-sdm630").is_some());
        assert!(set.get("orno-we-517").is_some());
        assert!(set.get("orno-we-516").is_some());
    }

    #[test]
    fn a_user_file_replaces_the_builtin_of_the_same_model() {
        let dir = tempfile::tempdir().unwrap();
        let mine = MINIMAL.replace("model = \"test-meter\"", "model = \"orno-we-515\"");
        std::fs::write(dir.path().join("my-we515.toml"), mine).unwrap();
        std::fs::write(dir.path().join("other.toml"), MINIMAL).unwrap();
        std::fs::write(dir.path().join("README.md"), "not a profile").unwrap();

        let set = load_dir(dir.path()).unwrap();
        let we515 = set.get("orno-we-515").unwrap();
        assert_eq!(we515.registers.len(), 1);
        assert!(we515.origin.ends_with("my-we515.toml"), "{}", we515.origin);
        // The replaced built-in's alias went with it.
        assert!(set.get("orno-we-514").is_none());
        assert!(set.get("test-meter").is_some());
        assert!(
            set.get("eastron-sdm630")
                .unwrap()
                .origin
                .starts_with("builtin:")
        );
        assert_eq!(set.len(), BUILTIN.len() + 1);
    }

    #[test]
    fn a_user_model_wins_over_a_builtin_alias_of_the_same_name() {
        let dir = tempfile::tempdir().unwrap();
        let mine = MINIMAL.replace("model = \"test-meter\"", "model = \"orno-we-514\"");
        std::fs::write(dir.path().join("we514.toml"), mine).unwrap();
        let set = load_dir(dir.path()).unwrap();
        assert_eq!(set.get("orno-we-514").unwrap().registers.len(), 1);
        // The built-in stays reachable by its own model.
        assert_eq!(set.get("orno-we-515").unwrap().meter.vendor, "ORNO");
    }

    #[test]
    fn an_invalid_user_file_fails_the_load_and_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let bad = MINIMAL.replace("unit = \"W\"", "unit = \"W\"\nscale = 0.0");
        std::fs::write(dir.path().join("bad.toml"), bad).unwrap();
        let msg = load_dir(dir.path()).unwrap_err().to_string();
        assert!(
            msg.contains("bad.toml: registers[0] (power_w at 0x0010): scale 0"),
            "{msg}"
        );
    }

    #[test]
    fn two_user_files_with_one_model_are_rejected() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.toml"), MINIMAL).unwrap();
        std::fs::write(dir.path().join("b.toml"), MINIMAL).unwrap();
        let msg = load_dir(dir.path()).unwrap_err().to_string();
        assert!(
            msg.contains("b.toml: model name \"test-meter\" is also claimed by"),
            "{msg}"
        );
        assert!(msg.ends_with("a.toml"), "{msg}");
    }

    #[test]
    fn a_missing_folder_is_an_io_error_naming_it() {
        let msg = load_dir(Path::new("/nonexistent/profiles"))
            .unwrap_err()
            .to_string();
        assert!(
            msg.starts_with("/nonexistent/profiles: cannot read"),
            "{msg}"
        );
    }

    #[test]
    fn a_file_with_two_problems_reports_both_in_one_message() {
        let text = r#"
[meter]
model = "my-meter"
vendor = "Me"
name = "Mine"
source = "my notes"

[poll_ms]
fast = 1000

[defaults]
poll = "fast"

[[registers]]
address = 0x013F
type = "u32"
scale = 0.001
unit = "A"
measurement = "power"
channel = "l1"
field = "current_a"

[[registers]]
address = 0x0140
type = "i32"
unit = "W"
measurement = "power"
channel = "l1"
field = "power_w"

[[registers]]
address = 0x0131
type = "u16"
scale = 0.01
unit = "V"
measurement = "power"
channel = "l1"
field = "Voltage"
"#;
        let msg = Profile::from_toml(text, "profiles/my-meter.toml")
            .unwrap_err()
            .to_string();
        assert_eq!(
            msg,
            "profiles/my-meter.toml: registers[2] (Voltage at 0x0131): field name \"Voltage\" \
             must be lower snake case ([a-z][a-z0-9_]*, ≤64), e.g. \"power_w\"; registers[1] \
             (power_w at 0x0140): holding registers 0x0140..=0x0141 overlap registers[0] \
             (current_a at 0x013f) (0x013f..=0x0140)"
        );
    }
}
