//! Plausibility: the physical range a value may have, by the unit in its field name.
//!
//! A value outside its range is not a reading of anything on a low-voltage installation: it is a
//! register read as garbage, a scale left out of a profile, a float register that answered
//! `3.4e38`, or a forged message. Sinks store such a reading with quality `out_of_range` rather
//! than `good` — the value is kept for a person to look at (no reading is ever lost), and a
//! dashboard that filters on `quality = 'good'` never plots it.
//!
//! The ranges are deliberately generous: this is a plausibility check, not a sensor
//! specification. A bound is only useful if no real installation wattbus is meant for (houses,
//! workshops, small commercial sites on the low-voltage grid, with meters, CT clamps and a few
//! sensors) can ever reach it, while the common failures land outside. Each row of [`RANGES`]
//! says why its bound is where it is; docs/ARCHITECTURE.md carries the same table.
//!
//! The unit of a field is the part of its name after the last `_` (`apparent_power_va` → `va`,
//! `energy_import_wh` → `wh`); `power_factor` (and names ending in `_power_factor`) is the
//! dimensionless power factor, as is the suffix `_pf`. A field whose unit is not in the table
//! (`reading_n`, `adc_counts`, `latency_ms`, `value`) is not judged.

use crate::payload::{Measurement, Quality};

/// The plausible range of one unit. Bounds are inclusive.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct UnitRange {
    /// The field-name suffix, e.g. `w` for `power_w`.
    pub unit: &'static str,
    /// What is measured, for messages.
    pub quantity: &'static str,
    pub min: f64,
    pub max: f64,
    /// Why the bounds are what they are.
    pub why: &'static str,
}

/// 20 MW (or MVA, Mvar): the largest power an LV connection can carry is a 2.5 MVA transformer's
/// secondary; 20 MW leaves eight times that, and covers the √3 · 1 kV · 10 kA product of the
/// voltage and current bounds.
const POWER: f64 = 20e6;
/// 10 TWh: 20 MW, flat out, for the 50 years a meter's counter could run is 8.8 TWh.
const ENERGY: f64 = 1e13;

/// Every judged unit. Kilo-units (a profile may scale to them) have the same physical bounds.
pub const RANGES: &[UnitRange] = &[
    UnitRange {
        unit: "v",
        quantity: "voltage",
        min: -1500.0,
        max: 1500.0,
        why: "low voltage ends at 1000 V AC and 1500 V DC (IEC 60364, the EU Low Voltage \
              Directive), PV strings included; \
              signed for DC; a 0.01 V register read without its scale (23 100 for 231.00 V) \
              is outside",
    },
    UnitRange {
        unit: "a",
        quantity: "current",
        min: -10_000.0,
        max: 10_000.0,
        why: "a 2.5 MVA transformer's LV side carries 3 600 A, CTs are made up to ~6 000 A; \
              signed for export; an all-ones 16-bit register (65 535) is outside",
    },
    UnitRange {
        unit: "w",
        quantity: "active power",
        min: -POWER,
        max: POWER,
        why: "20 MW: eight times the largest LV transformer; signed (export is negative); \
              all-ones 32-bit registers (4.29e9) and float garbage are outside",
    },
    UnitRange {
        unit: "va",
        quantity: "apparent power",
        min: -POWER,
        max: POWER,
        why: "as active power; signed because some meters give apparent power the sign of \
              the active power",
    },
    UnitRange {
        unit: "var",
        quantity: "reactive power",
        min: -POWER,
        max: POWER,
        why: "as active power; signed (capacitive is negative)",
    },
    UnitRange {
        unit: "kw",
        quantity: "active power",
        min: -POWER / 1e3,
        max: POWER / 1e3,
        why: "as `w`, in kW",
    },
    UnitRange {
        unit: "kva",
        quantity: "apparent power",
        min: -POWER / 1e3,
        max: POWER / 1e3,
        why: "as `va`, in kVA",
    },
    UnitRange {
        unit: "kvar",
        quantity: "reactive power",
        min: -POWER / 1e3,
        max: POWER / 1e3,
        why: "as `var`, in kvar",
    },
    UnitRange {
        unit: "wh",
        quantity: "energy",
        min: -ENERGY,
        max: ENERGY,
        why: "10 TWh: 20 MW for 50 years is 8.8 TWh; signed for net counters; catches \
              float garbage (1e308, 3.4e38), not a counter that is merely large",
    },
    UnitRange {
        unit: "varh",
        quantity: "reactive energy",
        min: -ENERGY,
        max: ENERGY,
        why: "as energy",
    },
    UnitRange {
        unit: "vah",
        quantity: "apparent energy",
        min: -ENERGY,
        max: ENERGY,
        why: "as energy",
    },
    UnitRange {
        unit: "kwh",
        quantity: "energy",
        min: -ENERGY / 1e3,
        max: ENERGY / 1e3,
        why: "as `wh`, in kWh",
    },
    UnitRange {
        unit: "kvarh",
        quantity: "reactive energy",
        min: -ENERGY / 1e3,
        max: ENERGY / 1e3,
        why: "as `varh`, in kvarh",
    },
    UnitRange {
        unit: "kvah",
        quantity: "apparent energy",
        min: -ENERGY / 1e3,
        max: ENERGY / 1e3,
        why: "as `vah`, in kVAh",
    },
    UnitRange {
        unit: "hz",
        quantity: "frequency",
        min: 0.0,
        max: 600.0,
        why: "mains is 50/60 Hz, 0 on a dead line; drives and 400 Hz supplies stay below \
              600 Hz (faster drives need an export licence); an all-ones 0.01 Hz register \
              (655.35) is outside",
    },
    UnitRange {
        unit: "pf",
        quantity: "power factor",
        min: -1.1,
        max: 1.1,
        why: "P/S lies within ±1; meters that average P and S over different windows overshoot a \
              little while the load changes; a percentage (87) or a missing 0.001 scale \
              (870) is outside",
    },
    UnitRange {
        unit: "c",
        quantity: "temperature",
        min: -100.0,
        max: 1500.0,
        why: "−89 °C is the coldest air ever measured, kilns and flue gas stay below 1 500 °C; \
              a disconnected DS18B20 (−127) and an all-ones 0.1 °C register (6 553.5) are \
              outside",
    },
    UnitRange {
        unit: "pct",
        quantity: "percentage",
        min: -1000.0,
        max: 1000.0,
        why: "humidity and charge are 0–100 %, distortion can exceed 100 %, changes can be \
              negative; an all-ones 0.1 % register (6 553.5) is outside",
    },
];

/// The unit of a field name, as [`RANGES`] knows it (see the module doc).
fn unit_of(field: &str) -> Option<&str> {
    if field == "power_factor" || field.ends_with("_power_factor") {
        return Some("pf");
    }
    field.rsplit_once('_').map(|(_, unit)| unit)
}

/// The plausible range of a field, by the unit in its name; `None`: not judged.
///
/// ```
/// assert_eq!(proto::plausible_range("power_w").map(|r| r.quantity), Some("active power"));
/// assert_eq!(proto::plausible_range("power_factor").map(|r| r.unit), Some("pf"));
/// assert_eq!(proto::plausible_range("reading_n"), None);
/// ```
pub fn plausible_range(field: &str) -> Option<&'static UnitRange> {
    let unit = unit_of(field)?;
    RANGES.iter().find(|r| r.unit == unit)
}

/// A field outside the range of its unit.
#[derive(Debug, Clone, PartialEq)]
pub struct Implausible {
    pub field: String,
    pub value: f64,
    pub range: &'static UnitRange,
}

impl std::fmt::Display for Implausible {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} = {} is not a plausible {} ({} to {} {})",
            self.field,
            Num(self.value),
            self.range.quantity,
            Num(self.range.min),
            Num(self.range.max),
            self.range.unit
        )
    }
}

/// A number as a person reads it: `1e308`, not 309 digits.
struct Num(f64);

impl std::fmt::Display for Num {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let a = self.0.abs();
        if a != 0.0 && !(1e-3..1e9).contains(&a) {
            write!(f, "{:e}", self.0)
        } else {
            write!(f, "{}", self.0)
        }
    }
}

impl Measurement {
    /// The fields whose value is outside the plausible range of their unit.
    pub fn implausible(&self) -> impl Iterator<Item = Implausible> + '_ {
        self.fields.iter().filter_map(|(name, &value)| {
            let range = plausible_range(name)?;
            (!(range.min..=range.max).contains(&value)).then(|| Implausible {
                field: name.clone(),
                value,
                range,
            })
        })
    }

    /// Judge a reading before it is stored: a `good` reading with an implausible field becomes
    /// `out_of_range` (values untouched), and the first such field is returned for the log.
    /// A reading already marked `stale`, `error` or `out_of_range` keeps its quality: it
    /// already says it is not to be trusted, and says more about why.
    pub fn flag_implausible(&mut self) -> Option<Implausible> {
        if self.quality != Quality::Good {
            return None;
        }
        let first = self.implausible().next()?;
        self.quality = Quality::OutOfRange;
        Some(first)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topic::Segment;

    fn reading(fields: &[(&str, f64)]) -> Measurement {
        let seg = |s: &str| Segment::new(s).unwrap();
        Measurement {
            origin: None,
            site: seg("home"),
            device: seg("we515-1"),
            channel: seg("l1"),
            measurement: seg("power"),
            ts_ms: 1_764_000_000_000,
            quality: Quality::Good,
            fields: fields.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
            tags: Default::default(),
        }
    }

    /// Every field name a wattbus producer publishes (modbus-ingest's shipped profiles,
    /// rms-processor, serial-ingest's PowMon and sensor lines, the simulators), with a value a
    /// real installation gives and the unit it must be judged by (`None`: not judged).
    const PUBLISHED: &[(&str, f64, Option<&str>)] = &[
        ("voltage_v", 231.45, Some("v")),
        ("nominal_voltage_v", 230.0, Some("v")),
        ("sensor_v", 1.65, Some("v")),
        ("current_a", 5.34, Some("a")),
        ("power_w", -1234.5, Some("w")),
        ("apparent_power_va", 1300.0, Some("va")),
        ("reactive_power_var", -250.0, Some("var")),
        ("power_factor", -0.87, Some("pf")),
        ("frequency_hz", 49.98, Some("hz")),
        ("energy_wh", 12_345_670.0, Some("wh")),
        ("energy_import_wh", 5_000_000.0, Some("wh")),
        ("energy_export_wh", 0.0, Some("wh")),
        ("reactive_energy_varh", 800_000.0, Some("varh")),
        ("reactive_energy_import_varh", 1.0, Some("varh")),
        ("reactive_energy_export_varh", 2.0, Some("varh")),
        ("apparent_energy_vah", 3.0, Some("vah")),
        ("temperature_c", -18.5, Some("c")),
        ("humidity_pct", 100.3, Some("pct")),
        ("energy_resets", 1.0, None),
        ("adc_counts", 4095.0, None),
        ("value", 1e300, None),
        ("reading_n", 1e300, None),
        ("latency_ms", 12.0, None),
        ("error_rate", 0.5, None),
        ("utilisation", 0.98, None),
        ("requests", 1e12, None),
    ];

    #[test]
    fn every_published_field_is_judged_by_its_unit_and_real_values_pass() {
        for &(field, value, unit) in PUBLISHED {
            assert_eq!(plausible_range(field).map(|r| r.unit), unit, "{field}");
            let m = reading(&[(field, value)]);
            assert_eq!(m.implausible().next(), None, "{field} = {value}");
        }
    }

    #[test]
    fn garbage_that_meters_and_forgers_send_is_flagged() {
        for (field, value) in [
            ("power_w", 1e308),
            ("power_w", -1e308),
            ("power_w", 4_294_967_295.0),           // u32 all ones
            ("apparent_power_va", 2_147_483_647.0), // i32 max
            ("voltage_v", 23_145.0),                // 0.01 V register without its scale
            ("voltage_v", f64::from(f32::MAX)),     // float register garbage
            ("current_a", 65_535.0),                // u16 all ones
            ("frequency_hz", 655.35),               // u16 all ones, 0.01 Hz
            ("frequency_hz", -50.0),
            ("power_factor", 870.0),   // 0.001 register without its scale
            ("power_factor", 87.0),    // a percentage
            ("temperature_c", -127.0), // DS18B20 disconnected
            ("temperature_c", 6553.5),
            ("humidity_pct", 6553.5),
            ("energy_wh", 1e308),
            ("reactive_energy_varh", f64::from(f32::MAX)),
        ] {
            let m = reading(&[("reading_n", 1.0), (field, value)]);
            let bad: Vec<Implausible> = m.implausible().collect();
            assert_eq!(bad.len(), 1, "{field} = {value}");
            assert_eq!(bad[0].field, field);
        }
    }

    #[test]
    fn bounds_are_inclusive_and_kilo_units_match_base_units() {
        let r = plausible_range("power_w").unwrap();
        assert!(
            reading(&[("power_w", r.max)])
                .implausible()
                .next()
                .is_none()
        );
        assert!(
            reading(&[("power_w", r.min)])
                .implausible()
                .next()
                .is_none()
        );
        assert!(
            reading(&[("power_w", r.max * 1.000_001)])
                .implausible()
                .next()
                .is_some()
        );
        for (base, kilo) in [
            ("w", "kw"),
            ("va", "kva"),
            ("var", "kvar"),
            ("wh", "kwh"),
            ("varh", "kvarh"),
            ("vah", "kvah"),
        ] {
            let b = RANGES.iter().find(|r| r.unit == base).unwrap();
            let k = RANGES.iter().find(|r| r.unit == kilo).unwrap();
            assert_eq!((b.min / 1e3, b.max / 1e3), (k.min, k.max), "{kilo}");
            assert_eq!(b.quantity, k.quantity);
        }
    }

    #[test]
    fn the_table_is_well_formed() {
        for (i, r) in RANGES.iter().enumerate() {
            assert!(r.min < r.max, "{}", r.unit);
            assert!(!r.why.is_empty(), "{}", r.unit);
            assert!(
                RANGES[i + 1..].iter().all(|o| o.unit != r.unit),
                "{} twice",
                r.unit
            );
        }
    }

    #[test]
    fn the_table_in_the_architecture_doc_is_this_table() {
        let doc = include_str!("../../docs/ARCHITECTURE.md");
        let rows: Vec<&str> = doc.lines().filter(|l| l.starts_with("| `_")).collect();
        assert_eq!(rows.len(), RANGES.len(), "{rows:#?}");
        for r in RANGES {
            let cells = format!(" | {} | {} to {} | ", r.quantity, Num(r.min), Num(r.max));
            assert!(
                rows.iter().any(|row| row.starts_with(&format!("| `_{}`", r.unit))
                    && row.contains(&cells)),
                "docs/ARCHITECTURE.md has no row `_{}`{cells}",
                r.unit
            );
        }
    }

    #[test]
    fn only_good_readings_are_flagged_and_values_are_kept() {
        let mut m = reading(&[("power_w", 1e308), ("voltage_v", 230.0)]);
        let first = m.flag_implausible().unwrap();
        assert_eq!(m.quality, Quality::OutOfRange);
        assert_eq!(m.fields["power_w"], 1e308, "the value is kept for a person");
        assert_eq!(
            first.to_string(),
            "power_w = 1e308 is not a plausible active power (-20000000 to 20000000 w)"
        );
        // Judged once: a second pass (a replay) leaves it as it is.
        assert_eq!(m.flag_implausible(), None);
        assert_eq!(m.quality, Quality::OutOfRange);

        let mut stale = reading(&[("power_w", 1e308)]);
        stale.quality = Quality::Stale;
        assert_eq!(stale.flag_implausible(), None);
        assert_eq!(stale.quality, Quality::Stale);

        let mut fine = reading(&[("power_w", 460.0)]);
        assert_eq!(fine.flag_implausible(), None);
        assert_eq!(fine.quality, Quality::Good);
    }
}
