//! Eastron SDM120-Modbus: single-phase meter, input registers, IEEE-754 float32.
//!
//! Register map from Eastron, "SDM120-Modbus Smart Single Phase Energy Meter — Modbus
//! Protocol" (input register table, 3X; 30001 = address 0x0000), the table
//! `modbus-ingest/profiles/eastron-sdm120.toml` encodes. Every value is a float32 in two
//! input registers (FC04), high word first:
//!
//! | address | quantity | unit |
//! |---|---|---|
//! | 0x0000 | voltage | V |
//! | 0x0006 | current | A |
//! | 0x000C | active power (negative = export) | W |
//! | 0x0012 | apparent power | VA |
//! | 0x0018 | reactive power | var |
//! | 0x001E | power factor (negative = leading) | |
//! | 0x0046 | frequency | Hz |
//! | 0x0048 / 0x004A | import / export active energy | kWh |
//! | 0x004C / 0x004E | import / export reactive energy | kvarh |
//! | 0x0156 / 0x0158 | total active / reactive energy (import + export) | kWh / kvarh |
//!
//! Simplifications, so nobody mistakes them for the meter's behaviour: addresses inside
//! 0x0000..=0x004F and 0x0156..=0x0159 that the table does not name read as 0, others are
//! `IllegalDataAddress`; the holding-register setup parameters (FC03/FC16 on the real meter)
//! are not modelled and answer `IllegalFunction`.

use tokio_modbus::ExceptionCode;

use super::grid::{GridLoad, Integrator};
use super::we515::MAX_READ;

/// Inclusive input-register blocks this model answers.
pub const BLOCKS: [(u16, u16); 2] = [(0x0000, 0x004F), (0x0156, 0x0159)];

/// Import, export active (Wh); import, export reactive (varh).
const COUNTERS: usize = 4;

/// What the meter means at an instant: exactly the float32 values in its registers,
/// widened to f64 (energy converted to Wh/varh by × 1000 as the profile does).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sdm120Values {
    pub voltage_v: f64,
    pub current_a: f64,
    pub power_w: f64,
    pub apparent_power_va: f64,
    pub reactive_power_var: f64,
    pub power_factor: f64,
    pub frequency_hz: f64,
    pub energy_import_wh: f64,
    pub energy_export_wh: f64,
    pub reactive_energy_import_varh: f64,
    pub reactive_energy_export_varh: f64,
    /// Import + export.
    pub energy_wh: f64,
    pub reactive_energy_varh: f64,
}

/// A simulated SDM120 on the same household model as [`We515`](super::We515).
#[derive(Debug, Clone)]
pub struct Sdm120 {
    house: GridLoad,
    energy: Integrator<COUNTERS>,
    /// Register image as f32 by word address / 2 of each value.
    snapshot: [(u16, f32); 13],
    address: u8,
}

impl Sdm120 {
    /// A meter shaped by `seed`, switched on at `start_ms` (Unix ms), address 1.
    pub fn new(seed: u64, start_ms: i64) -> Self {
        let initial_kwh = 800.0 + 11.0 * (seed % 100) as f64;
        let mut meter = Self {
            house: GridLoad::new(seed),
            energy: Integrator::new(
                start_ms,
                [
                    initial_kwh * 1000.0,
                    initial_kwh * 200.0,
                    90_000.0,
                    30_000.0,
                ],
            ),
            snapshot: [(0, 0.0); 13],
            address: 1,
        };
        meter.update(start_ms);
        meter
    }

    /// Advance to `now_ms` and return what the registers now hold (time never runs back).
    pub fn values_at(&mut self, now_ms: i64) -> Sdm120Values {
        self.update(now_ms);
        self.values()
    }

    /// The values the registers hold now.
    pub fn values(&self) -> Sdm120Values {
        let v = |addr: u16| {
            self.snapshot
                .iter()
                .find(|(a, _)| *a == addr)
                .map_or(0.0, |(_, v)| f64::from(*v))
        };
        Sdm120Values {
            voltage_v: v(0x0000),
            current_a: v(0x0006),
            power_w: v(0x000C),
            apparent_power_va: v(0x0012),
            reactive_power_var: v(0x0018),
            power_factor: v(0x001E),
            frequency_hz: v(0x0046),
            energy_import_wh: v(0x0048) * 1000.0,
            energy_export_wh: v(0x004A) * 1000.0,
            reactive_energy_import_varh: v(0x004C) * 1000.0,
            reactive_energy_export_varh: v(0x004E) * 1000.0,
            energy_wh: v(0x0156) * 1000.0,
            reactive_energy_varh: v(0x0158) * 1000.0,
        }
    }

    pub fn address(&self) -> u8 {
        self.address
    }

    pub(crate) fn set_address(&mut self, address: u8) {
        self.address = address;
    }

    /// FC04: `count` registers from `addr` (see the module doc for blocks and exceptions).
    pub fn read_input(&self, addr: u16, count: u16) -> Result<Vec<u16>, ExceptionCode> {
        if count == 0 || count > MAX_READ {
            return Err(ExceptionCode::IllegalDataValue);
        }
        let end = u32::from(addr) + u32::from(count);
        (u32::from(addr)..end)
            .map(|a| {
                let a = u16::try_from(a).map_err(|_| ExceptionCode::IllegalDataAddress)?;
                if !BLOCKS.iter().any(|&(lo, hi)| (lo..=hi).contains(&a)) {
                    return Err(ExceptionCode::IllegalDataAddress);
                }
                let base = a & !1;
                let bits = self
                    .snapshot
                    .iter()
                    .find(|(r, _)| *r == base)
                    .map_or(0, |(_, v)| v.to_bits());
                Ok(if a == base {
                    (bits >> 16) as u16
                } else {
                    bits as u16
                })
            })
            .collect()
    }

    fn update(&mut self, now_ms: i64) {
        let house = self.house;
        self.energy.advance(now_ms, |t| {
            let f = house.flow(t);
            [f.power_w, -f.power_w, f.reactive_var, -f.reactive_var]
        });
        let f = house.flow(self.energy.last_ms());
        let [imp, exp, qimp, qexp] = self.energy.totals.map(|e| e / 1000.0);
        self.snapshot = [
            (0x0000, f.voltage_v as f32),
            (0x0006, f.current_a() as f32),
            (0x000C, f.power_w as f32),
            (0x0012, f.apparent_va() as f32),
            (0x0018, f.reactive_var as f32),
            (0x001E, f.power_factor() as f32),
            (0x0046, f.frequency_hz as f32),
            (0x0048, imp as f32),
            (0x004A, exp as f32),
            (0x004C, qimp as f32),
            (0x004E, qexp as f32),
            (0x0156, (imp + exp) as f32),
            (0x0158, (qimp + qexp) as f32),
        ];
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    const DAY: i64 = 1_717_200_000_000;
    const HOUR: i64 = 3_600_000;

    fn f32_at(regs: &[u16], off: usize) -> f64 {
        f64::from(f32::from_bits(
            (u32::from(regs[off]) << 16) | u32::from(regs[off + 1]),
        ))
    }

    #[test]
    fn float_registers_decode_high_word_first_to_the_truth() {
        let mut m = Sdm120::new(1, DAY);
        let v = m.values_at(DAY + 14 * HOUR);
        assert!(v.power_w < -1000.0, "{v:?}");
        let r = m.read_input(0x0000, 0x50).unwrap();
        assert_eq!(f32_at(&r, 0x00), v.voltage_v);
        assert_eq!(f32_at(&r, 0x06), v.current_a);
        assert_eq!(f32_at(&r, 0x0C), v.power_w);
        assert_eq!(f32_at(&r, 0x1E), v.power_factor);
        assert_eq!(f32_at(&r, 0x46), v.frequency_hz);
        assert_eq!(f32_at(&r, 0x48) * 1000.0, v.energy_import_wh);
        assert_eq!(f32_at(&r, 0x4A) * 1000.0, v.energy_export_wh);
        assert!((230.0 - v.voltage_v).abs() < 15.0);
        assert_eq!(r[0x02], 0, "a hole in the block reads 0");
        let t = m.read_input(0x0156, 2).unwrap();
        assert_eq!(f32_at(&t, 0) * 1000.0, v.energy_wh);
    }

    #[test]
    fn export_grows_the_export_counter_and_not_import() {
        let mut m = Sdm120::new(1, DAY + 13 * HOUR);
        let a = m.values_at(DAY + 13 * HOUR);
        let b = m.values_at(DAY + 14 * HOUR);
        assert!(
            b.energy_export_wh - a.energy_export_wh > 1000.0,
            "{a:?} {b:?}"
        );
        assert_eq!(b.energy_import_wh, a.energy_import_wh);
    }

    #[test]
    fn outside_the_blocks_is_an_illegal_address() {
        let m = Sdm120::new(1, DAY);
        assert_eq!(
            m.read_input(0x004E, 4),
            Err(ExceptionCode::IllegalDataAddress)
        );
        assert_eq!(
            m.read_input(0xFFFF, 2),
            Err(ExceptionCode::IllegalDataAddress)
        );
    }
}
