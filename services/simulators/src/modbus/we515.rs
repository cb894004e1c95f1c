//! ORNO OR-WE-515 (and WE-514): single-phase meter, holding registers, integers.
//!
//! Register map from ORNO, "Register description OR-WE-514 & OR-WE-515" (the vendor's Modbus
//! PDF), the same table `modbus-ingest/profiles/orno-we-515.toml` encodes. All values are
//! holding registers (FC03), high word first:
//!
//! | register | words | type | unit | quantity |
//! |---|---|---|---|---|
//! | 0x0110 | 1 | u16, writable (FC06/FC16) | | slave address 1–247 |
//! | 0x0111 | 1 | u16, writable | | baud code 1=1200, 2=2400, 3=4800, 4=9600 |
//! | 0x0130 | 1 | u16 | 0.01 Hz | frequency |
//! | 0x0131 | 1 | u16 | 0.01 V | voltage L1 (0x0132/0x0133: L2/L3 on 3-phase relatives, 0 here) |
//! | 0x0139 | 2 | u32 | 0.001 A | current L1 |
//! | 0x0140 / 0x0146 | 2 | **i32** | 1 W | active power L1 / total; negative = export |
//! | 0x0148 / 0x014E | 2 | i32 | 1 var | reactive power L1 / total |
//! | 0x0150 / 0x0156 | 2 | i32 | 1 VA | apparent power L1 / total |
//! | 0x0158 / 0x015B | 1 | **i16** | 0.001 | power factor L1 / total; negative = leading |
//! | 0xA000 | 2 | u32 | 0.01 kWh | total active energy |
//! | 0xA002..0xA008 | 2 each | u32 | 0.01 kWh | active energy T1–T4 |
//! | 0xA01E | 2 | u32 | 0.01 kvarh | total reactive energy |
//! | 0xA020..0xA026 | 2 each | u32 | 0.01 kvarh | reactive energy T1–T4 |
//!
//! Addresses the table does not name but that lie inside a documented block (0x0110..=0x0111,
//! 0x0130..=0x015B, 0xA000..=0xA027) read as 0, which is what lets a poller fetch a block in one
//! request; an address outside every block is `IllegalDataAddress`, as on the real meter.
//!
//! Choices the vendor table leaves open, made here and documented so tests can rely on them:
//! - the total active (reactive) energy counts both directions, |P| (|Q|), so it grows while
//!   exporting too; T1 counts 06:00–22:00 UTC, T2 the night, T3 and T4 stay at their initial
//!   value (a factory tariff table with two zones);
//! - the power factor's sign follows the reactive power (negative = capacitive = leading), not
//!   the direction of active power;
//! - a baud code written to 0x0111 is stored and read back but does not change the simulated
//!   line (the port's speed is the server's, not the model's).

use tokio_modbus::ExceptionCode;

use super::grid::{GridLoad, Integrator};

/// Slave address register (writable).
pub const REG_ADDRESS: u16 = 0x0110;
/// Baud code register (writable).
pub const REG_BAUD: u16 = 0x0111;
/// Inclusive register blocks the meter answers (see the module doc).
pub const BLOCKS: [(u16, u16); 3] = [(0x0110, 0x0111), (0x0130, 0x015B), (0xA000, 0xA027)];

/// Modbus limit on registers in one read (FC03/FC04) request.
pub(crate) const MAX_READ: u16 = 125;
/// Modbus limit on registers in one FC16 request.
pub(crate) const MAX_WRITE: u16 = 123;

/// Energy counters the meter keeps: active total, T1..T4, reactive total, T1..T4 (see
/// [`We515::counters`]).
pub const COUNTERS: usize = 10;

/// What the meter means at an instant: the physical values exactly as its registers encode
/// them (register × the profile's scale), so a decoder that applies the profile must get
/// these numbers back (compare with a tolerance of a few ulps, or of half a register unit
/// if it scales differently).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct We515Values {
    pub frequency_hz: f64,
    pub voltage_v: f64,
    pub current_a: f64,
    /// Negative = export.
    pub power_w: f64,
    pub reactive_power_var: f64,
    pub apparent_power_va: f64,
    /// Negative = leading (capacitive).
    pub power_factor: f64,
    /// Total active energy, 10 Wh resolution; only grows.
    pub energy_wh: f64,
    /// Active energy per tariff T1..T4.
    pub energy_tariff_wh: [f64; 4],
    pub reactive_energy_varh: f64,
    pub reactive_energy_tariff_varh: [f64; 4],
}

/// The register values of one instant, as the meter holds them.
#[derive(Debug, Clone, Copy, Default)]
struct Snapshot {
    frequency: u16,
    voltage: u16,
    current: u32,
    power: i32,
    reactive: i32,
    apparent: i32,
    power_factor: i16,
    /// 0.01 kWh / 0.01 kvarh units, in `COUNTERS` order.
    energy: [u32; COUNTERS],
}

/// A simulated OR-WE-515. See the module doc for the map and the modelling choices.
#[derive(Debug, Clone)]
pub struct We515 {
    house: GridLoad,
    energy: Integrator<COUNTERS>,
    snapshot: Snapshot,
    address: u8,
    baud_code: u16,
}

impl We515 {
    /// A meter whose household is shaped by `seed`, switched on at `start_ms` (Unix ms) with
    /// counters that already show some years of use (a meter fresh from the box reads 0, but
    /// a decoder should also meet counters beyond 16 bits). Address 1, baud code 4 (9600).
    pub fn new(seed: u64, start_ms: i64) -> Self {
        let initial_kwh = 1500.0 + 37.0 * (seed % 100) as f64;
        let initial_kvarh = initial_kwh / 10.0;
        let mut initial = [0.0; COUNTERS];
        initial[0] = initial_kwh * 1000.0;
        initial[1] = initial_kwh * 600.0;
        initial[2] = initial_kwh * 400.0;
        initial[5] = initial_kvarh * 1000.0;
        initial[6] = initial_kvarh * 600.0;
        initial[7] = initial_kvarh * 400.0;
        let mut meter = Self {
            house: GridLoad::new(seed),
            energy: Integrator::new(start_ms, initial),
            snapshot: Snapshot::default(),
            address: 1,
            baud_code: 4,
        };
        meter.update(start_ms);
        meter
    }

    /// A meter like [`new`](Self::new) whose energy counters continue from `counters` (what
    /// [`counters`](Self::counters) gave before a restart): a real meter keeps its registers
    /// through a power cut, and so does a simulated one whose counters were saved.
    pub fn resume(seed: u64, start_ms: i64, counters: [f64; COUNTERS]) -> Self {
        let mut meter = Self::new(seed, start_ms);
        meter.energy = Integrator::new(start_ms, counters);
        meter.update(start_ms);
        meter
    }

    /// The energy counters, unrounded (Wh, then varh): total import, four tariffs, total
    /// reactive, four tariffs. For saving across a restart.
    pub fn counters(&self) -> [f64; COUNTERS] {
        self.energy.totals
    }

    /// Advance to `now_ms` (Unix ms) and return what the registers now hold. An instant
    /// before the last one reads the last state again (time never runs backwards, so the
    /// energy counters cannot shrink).
    pub fn values_at(&mut self, now_ms: i64) -> We515Values {
        self.update(now_ms);
        self.values()
    }

    /// The values the registers hold now (as of the last [`values_at`](Self::values_at)).
    pub fn values(&self) -> We515Values {
        let s = &self.snapshot;
        let e = |i: usize| f64::from(s.energy[i]) * 10.0;
        We515Values {
            frequency_hz: f64::from(s.frequency) * 0.01,
            voltage_v: f64::from(s.voltage) * 0.01,
            current_a: f64::from(s.current) * 0.001,
            power_w: f64::from(s.power),
            reactive_power_var: f64::from(s.reactive),
            apparent_power_va: f64::from(s.apparent),
            power_factor: f64::from(s.power_factor) * 0.001,
            energy_wh: e(0),
            energy_tariff_wh: [e(1), e(2), e(3), e(4)],
            reactive_energy_varh: e(5),
            reactive_energy_tariff_varh: [e(6), e(7), e(8), e(9)],
        }
    }

    /// The slave address (register 0x0110).
    pub fn address(&self) -> u8 {
        self.address
    }

    /// The baud code (register 0x0111).
    pub fn baud_code(&self) -> u16 {
        self.baud_code
    }

    /// Set the slave address without a Modbus write (for a bus that places the meter).
    pub(crate) fn set_address(&mut self, address: u8) {
        self.address = address;
    }

    /// FC03: `count` registers from `addr`. `IllegalDataValue` for a count outside 1..=125
    /// (the Modbus limit), `IllegalDataAddress` if any register lies outside the blocks.
    pub fn read_holding(&self, addr: u16, count: u16) -> Result<Vec<u16>, ExceptionCode> {
        if count == 0 || count > MAX_READ {
            return Err(ExceptionCode::IllegalDataValue);
        }
        let end = u32::from(addr) + u32::from(count);
        if end > 0x1_0000 {
            return Err(ExceptionCode::IllegalDataAddress);
        }
        (u32::from(addr)..end)
            .map(|a| self.word(a as u16).ok_or(ExceptionCode::IllegalDataAddress))
            .collect()
    }

    /// FC06 to 0x0110 (1..=247) or 0x0111 (1..=4). Another address inside a block is
    /// read-only (`IllegalDataAddress`); a value out of range is `IllegalDataValue`.
    pub fn write_single(&mut self, addr: u16, value: u16) -> Result<(), ExceptionCode> {
        self.write_multiple(addr, &[value])
    }

    /// FC16: all values are checked before any is stored, so a rejected write changes nothing.
    pub fn write_multiple(&mut self, addr: u16, values: &[u16]) -> Result<(), ExceptionCode> {
        if values.is_empty() || values.len() > usize::from(MAX_WRITE) {
            return Err(ExceptionCode::IllegalDataValue);
        }
        let mut address = self.address;
        let mut baud = self.baud_code;
        for (i, &v) in values.iter().enumerate() {
            let reg = u32::from(addr) + i as u32;
            match reg {
                r if r == u32::from(REG_ADDRESS) => {
                    address = u8::try_from(v)
                        .ok()
                        .filter(|a| (1..=247).contains(a))
                        .ok_or(ExceptionCode::IllegalDataValue)?;
                }
                r if r == u32::from(REG_BAUD) => {
                    if !(1..=4).contains(&v) {
                        return Err(ExceptionCode::IllegalDataValue);
                    }
                    baud = v;
                }
                _ => return Err(ExceptionCode::IllegalDataAddress),
            }
        }
        self.address = address;
        self.baud_code = baud;
        Ok(())
    }

    fn update(&mut self, now_ms: i64) {
        let house = self.house;
        self.energy.advance(now_ms, |t| {
            let f = house.flow(t);
            let mut r = [0.0; COUNTERS];
            let tariff = tariff(t);
            r[0] = f.power_w.abs();
            r[1 + tariff] = f.power_w.abs();
            r[5] = f.reactive_var.abs();
            r[6 + tariff] = f.reactive_var.abs();
            r
        });
        let f = house.flow(self.energy.last_ms());
        // Saturating float-to-int casts: the model's values are far inside every range.
        self.snapshot = Snapshot {
            frequency: (f.frequency_hz * 100.0).round() as u16,
            voltage: (f.voltage_v * 100.0).round() as u16,
            current: (f.current_a() * 1000.0).round() as u32,
            power: f.power_w.round() as i32,
            reactive: f.reactive_var.round() as i32,
            apparent: f.apparent_va().round() as i32,
            power_factor: (f.power_factor() * 1000.0).round() as i16,
            energy: self.energy.totals.map(|wh| (wh / 10.0).floor() as u32),
        };
    }

    /// One register, or `None` outside every block.
    fn word(&self, addr: u16) -> Option<u16> {
        if !BLOCKS.iter().any(|&(lo, hi)| (lo..=hi).contains(&addr)) {
            return None;
        }
        let s = &self.snapshot;
        let hi = |v: u32| (v >> 16) as u16;
        let lo = |v: u32| v as u16;
        let energy = |base: u16, first: usize| -> Option<u16> {
            // RequestCounts sit at even offsets from `base`, two words each.
            let off = addr.checked_sub(base)?;
            let i = first + usize::from(off / 2);
            let v = *s.energy.get(i)?;
            Some(if off % 2 == 0 { hi(v) } else { lo(v) })
        };
        let w = match addr {
            REG_ADDRESS => u16::from(self.address),
            REG_BAUD => self.baud_code,
            0x0130 => s.frequency,
            0x0131 => s.voltage,
            0x0139 => hi(s.current),
            0x013A => lo(s.current),
            0x0140 | 0x0146 => hi(s.power as u32),
            0x0141 | 0x0147 => lo(s.power as u32),
            0x0148 | 0x014E => hi(s.reactive as u32),
            0x0149 | 0x014F => lo(s.reactive as u32),
            0x0150 | 0x0156 => hi(s.apparent as u32),
            0x0151 | 0x0157 => lo(s.apparent as u32),
            0x0158 | 0x015B => s.power_factor as u16,
            0xA000..=0xA009 => energy(0xA000, 0)?,
            0xA01E..=0xA027 => energy(0xA01E, 5)?,
            _ => 0,
        };
        Some(w)
    }
}

/// Tariff index 0..=3 (T1..T4) at an instant: T1 by day, T2 by night (see the module doc).
/// The tariff the meter counts into at `now_ms` (0 = T1, 6:00-22:00 UTC; 1 = T2).
pub(crate) fn tariff(now_ms: i64) -> usize {
    let hour = now_ms.rem_euclid(86_400_000) / 3_600_000;
    if (6..22).contains(&hour) { 0 } else { 1 }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    /// 2024-06-01 00:00 UTC.
    const DAY: i64 = 1_717_200_000_000;
    const HOUR: i64 = 3_600_000;

    fn i32_at(regs: &[u16], off: usize) -> i32 {
        ((u32::from(regs[off]) << 16) | u32::from(regs[off + 1])) as i32
    }

    fn u32_at(regs: &[u16], off: usize) -> u32 {
        (u32::from(regs[off]) << 16) | u32::from(regs[off + 1])
    }

    /// Decode the two poll blocks by hand, as the vendor table says, into the truth's shape.
    fn decode(m: &We515) -> We515Values {
        let a = m.read_holding(0x0130, 44).unwrap();
        let b = m.read_holding(0xA000, 40).unwrap();
        let r = |addr: u16| usize::from(addr - 0x0130);
        let e = |addr: u16| f64::from(u32_at(&b, usize::from(addr - 0xA000))) * 10.0;
        We515Values {
            frequency_hz: f64::from(a[r(0x0130)]) * 0.01,
            voltage_v: f64::from(a[r(0x0131)]) * 0.01,
            current_a: f64::from(u32_at(&a, r(0x0139))) * 0.001,
            power_w: f64::from(i32_at(&a, r(0x0140))),
            reactive_power_var: f64::from(i32_at(&a, r(0x0148))),
            apparent_power_va: f64::from(i32_at(&a, r(0x0150))),
            power_factor: f64::from(a[r(0x0158)] as i16) * 0.001,
            energy_wh: e(0xA000),
            energy_tariff_wh: [e(0xA002), e(0xA004), e(0xA006), e(0xA008)],
            reactive_energy_varh: e(0xA01E),
            reactive_energy_tariff_varh: [e(0xA020), e(0xA022), e(0xA024), e(0xA026)],
        }
    }

    /// The first instant (minute grid) from `from` where `pred` holds, within a day.
    fn find(m: &mut We515, from: i64, pred: impl Fn(&We515Values) -> bool) -> (i64, We515Values) {
        (0..24 * 60)
            .map(|i| from + i * 60_000)
            .find_map(|t| {
                let v = m.values_at(t);
                pred(&v).then_some((t, v))
            })
            .expect("the household reaches this state within a day")
    }

    #[test]
    fn afternoon_export_reads_as_negative_i32_power() {
        let mut m = We515::new(1, DAY);
        let v = m.values_at(DAY + 14 * HOUR);
        assert!(v.power_w < -1000.0, "solar at 14:00 exports: {v:?}");
        assert_eq!(decode(&m), v);
        let regs = m.read_holding(0x0140, 2).unwrap();
        assert_eq!(
            regs[0], 0xFFFF,
            "a negative i32 of a few kW has an all-ones high word"
        );
        // The system total mirrors L1 on a single-phase meter.
        assert_eq!(m.read_holding(0x0146, 2).unwrap(), regs);
    }

    #[test]
    fn night_import_reads_as_positive_power() {
        let mut m = We515::new(2, DAY);
        let v = m.values_at(DAY + 2 * HOUR);
        assert!(v.power_w > 100.0 && v.power_w < 1000.0, "{v:?}");
        assert_eq!(decode(&m), v);
        assert!((200.0..260.0).contains(&v.voltage_v), "{v:?}");
        assert!((49.9..50.1).contains(&v.frequency_hz), "{v:?}");
        let s = v.power_w.hypot(v.reactive_power_var);
        assert!((v.apparent_power_va - s).abs() <= 1.0, "{v:?}");
        assert!((v.current_a - s / v.voltage_v).abs() < 0.01, "{v:?}");
    }

    #[test]
    fn leading_power_factor_reads_as_negative_i16() {
        let mut m = We515::new(1, DAY);
        let (_, v) = find(&mut m, DAY + HOUR, |v| v.power_factor < 0.0);
        assert!(v.reactive_power_var < 0.0, "{v:?}");
        assert!(v.power_factor > -1.0, "{v:?}");
        assert_eq!(decode(&m), v);
        let pf = m.read_holding(0x0158, 1).unwrap()[0];
        assert!(
            pf >= 0x8000,
            "a negative i16 has its top bit set: {pf:#06x}"
        );
        assert_eq!(m.read_holding(0x015B, 1).unwrap()[0], pf);
        // And lagging when the fridge runs.
        let (_, v) = find(&mut m, DAY + HOUR, |v| v.power_factor > 0.0);
        assert!(v.reactive_power_var > 0.0, "{v:?}");
        assert_eq!(decode(&m), v);
    }

    #[test]
    fn holes_inside_blocks_read_zero_and_outside_is_an_illegal_address() {
        let m = We515::new(1, DAY);
        let a = m.read_holding(0x0130, 44).unwrap();
        for hole in [
            0x0132u16, 0x0133, 0x0134, 0x0138, 0x013B, 0x0142, 0x0159, 0x015A,
        ] {
            assert_eq!(a[usize::from(hole - 0x0130)], 0, "hole {hole:#06x}");
        }
        let b = m.read_holding(0xA000, 40).unwrap();
        assert!(
            b[0x0A..0x1E].iter().all(|&w| w == 0),
            "0xA00A..0xA01D is a hole"
        );
        assert_eq!(m.read_holding(0x0110, 2).unwrap(), [1, 4]);
        for (addr, count) in [
            (0x0000, 1),
            (0x012F, 2),
            (0x015B, 2),
            (0x0112, 1),
            (0x9FFF, 1),
            (0xA027, 2),
            (0xFFFF, 2),
        ] {
            assert_eq!(
                m.read_holding(addr, count),
                Err(ExceptionCode::IllegalDataAddress),
                "{addr:#06x}+{count}"
            );
        }
        assert_eq!(
            m.read_holding(0x0130, 0),
            Err(ExceptionCode::IllegalDataValue)
        );
        assert_eq!(
            m.read_holding(0x0130, 126),
            Err(ExceptionCode::IllegalDataValue)
        );
    }

    #[test]
    fn address_and_baud_writes_are_validated_and_atomic() {
        let mut m = We515::new(1, DAY);
        m.write_single(REG_ADDRESS, 17).unwrap();
        assert_eq!(m.address(), 17);
        m.write_single(REG_BAUD, 2).unwrap();
        assert_eq!(m.read_holding(0x0110, 2).unwrap(), [17, 2]);
        for bad in [0, 248, 0x0101] {
            assert_eq!(
                m.write_single(REG_ADDRESS, bad),
                Err(ExceptionCode::IllegalDataValue)
            );
        }
        for bad in [0, 5] {
            assert_eq!(
                m.write_single(REG_BAUD, bad),
                Err(ExceptionCode::IllegalDataValue)
            );
        }
        // A good address with a bad baud code changes neither.
        assert_eq!(
            m.write_multiple(REG_ADDRESS, &[9, 7]),
            Err(ExceptionCode::IllegalDataValue)
        );
        assert_eq!((m.address(), m.baud_code()), (17, 2));
        m.write_multiple(REG_ADDRESS, &[9, 3]).unwrap();
        assert_eq!((m.address(), m.baud_code()), (9, 3));
        // Measurements are read-only; a write that runs past 0x0111 too.
        assert_eq!(
            m.write_single(0x0131, 23000),
            Err(ExceptionCode::IllegalDataAddress)
        );
        assert_eq!(
            m.write_multiple(REG_BAUD, &[3, 0]),
            Err(ExceptionCode::IllegalDataAddress)
        );
        assert_eq!(m.baud_code(), 3);
    }

    #[test]
    fn energy_only_grows_and_follows_power() {
        let mut m = We515::new(3, DAY);
        let start = m.values_at(DAY);
        let mut last = start;
        for i in 1..=48 {
            let v = m.values_at(DAY + i * HOUR / 2);
            assert!(v.energy_wh >= last.energy_wh, "at half hour {i}");
            for t in 0..4 {
                assert!(v.energy_tariff_wh[t] >= last.energy_tariff_wh[t]);
                assert!(v.reactive_energy_tariff_varh[t] >= last.reactive_energy_tariff_varh[t]);
            }
            assert!(v.reactive_energy_varh >= last.reactive_energy_varh);
            last = v;
        }
        // A day of a few hundred W at night and kW of export by day: several kWh, not MWh.
        let day_wh = last.energy_wh - start.energy_wh;
        assert!((3_000.0..40_000.0).contains(&day_wh), "{day_wh} Wh");
        // T1 (day) and T2 (night) share the growth; T3/T4 never move.
        let t1 = last.energy_tariff_wh[0] - start.energy_tariff_wh[0];
        let t2 = last.energy_tariff_wh[1] - start.energy_tariff_wh[1];
        assert!((t1 + t2 - day_wh).abs() <= 30.0, "{t1} + {t2} vs {day_wh}");
        assert!(t1 > t2 && t2 > 0.0);
        assert_eq!(last.energy_tariff_wh[2], start.energy_tariff_wh[2]);
        // Going back in time reads the latest state: counters never shrink.
        assert_eq!(m.values_at(DAY), last);
    }

    #[test]
    fn energy_counters_beyond_16_bits_use_both_words() {
        let m = We515::new(1, DAY);
        let b = m.read_holding(0xA000, 2).unwrap();
        assert!(b[0] > 0, "1500 kWh = 150000 × 0.01 kWh needs the high word");
        assert_eq!(f64::from(u32_at(&b, 0)) * 10.0, m.values().energy_wh);
    }
}
