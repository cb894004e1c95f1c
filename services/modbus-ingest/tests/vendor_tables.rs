//! The shipped profiles against the vendors' register tables.
//!
//! For each profile: a handful of key registers as the vendor table gives them (address,
//! function, type, scale to the published unit, field), and a response built word by word from
//! the table decoding to known values through the planner and decoder, as the service will.
//! The tables are cited in each profile's `meter.source`, and the profile's comments repeat the
//! vendor's type and unit for every entry.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use modbus_ingest::decode::{ValueError, decode_response};
use modbus_ingest::plan::plan;
use modbus_ingest::profile::{Function, Profile, Profiles, Register, ValueType, WordOrder};

fn profile(model: &str) -> Profile {
    let set = Profiles::builtin().expect("built-in profiles are valid");
    set.get(model).expect("profile is shipped").clone()
}

/// The register at `address`, failing the test if the profile has none.
fn at(p: &Profile, address: u16) -> &Register {
    p.registers
        .iter()
        .find(|r| r.address == address)
        .unwrap_or_else(|| panic!("{} has no register at {address:#06x}", p.meter.model))
}

#[track_caller]
fn check(r: &Register, function: Function, t: ValueType, scale: f64, field: &str, channel: &str) {
    assert_eq!(r.function, function, "{:#06x}", r.address);
    assert_eq!(r.value_type, t, "{:#06x}", r.address);
    assert_eq!(r.word_order, WordOrder::Big, "{:#06x}", r.address);
    assert_eq!(r.scale, scale, "{:#06x}", r.address);
    assert_eq!(r.field, field, "{:#06x}", r.address);
    assert_eq!(r.channel.as_str(), channel, "{:#06x}", r.address);
}

/// Every register the profile reads, decoded from `words` (address → word) for a meter that
/// answers every planned request; unmapped addresses (holes) read as 0.
fn read_all(p: &Profile, words: &[(u16, u16)]) -> Vec<(Register, Result<f64, ValueError>)> {
    let requests = plan(&p.registers, |_| true, p.limits).expect("plan");
    let mut out = Vec::new();
    for req in &requests {
        let response: Vec<u16> = (0..req.count)
            .map(|i| {
                let a = req.start + i;
                words.iter().find(|(w, _)| *w == a).map_or(0, |(_, v)| *v)
            })
            .collect();
        for (i, value) in decode_response(&p.registers, req, &response).expect("length") {
            out.push((p.registers[i].clone(), value));
        }
    }
    out
}

fn value(read: &[(Register, Result<f64, ValueError>)], field: &str, channel: &str) -> f64 {
    let (_, v) = read
        .iter()
        .find(|(r, _)| r.field == field && r.channel.as_str() == channel && r.tags.is_empty())
        .unwrap_or_else(|| panic!("no {field} on {channel}"));
    v.clone().expect("decodes")
}

fn f32_words(address: u16, v: f32) -> [(u16, u16); 2] {
    let b = v.to_bits();
    [(address, (b >> 16) as u16), (address + 1, b as u16)]
}

fn close(a: f64, b: f64) {
    assert!((a - b).abs() < 1e-9 * b.abs().max(1.0), "{a} != {b}");
}

#[test]
fn orno_we515_matches_the_vendor_table() {
    let p = profile("orno-we-515");
    assert_eq!(p.meter.vendor, "ORNO");
    let h = Function::Holding;
    // 0x0130 UINT 0.01 Hz; 0x0131 UINT 0.01 V; 0x0139 UINT32 0.001 A.
    check(
        at(&p, 0x0130),
        h,
        ValueType::U16,
        0.01,
        "frequency_hz",
        "total",
    );
    check(at(&p, 0x0131), h, ValueType::U16, 0.01, "voltage_v", "l1");
    check(at(&p, 0x0139), h, ValueType::U32, 0.001, "current_a", "l1");
    // 0x0140 INT32 0.001 kW = 1 W, signed; 0x0148 INT32 kvar; 0x0150 INT32 kVA.
    check(at(&p, 0x0140), h, ValueType::I32, 1.0, "power_w", "l1");
    check(at(&p, 0x0146), h, ValueType::I32, 1.0, "power_w", "total");
    check(
        at(&p, 0x0148),
        h,
        ValueType::I32,
        1.0,
        "reactive_power_var",
        "l1",
    );
    check(
        at(&p, 0x0150),
        h,
        ValueType::I32,
        1.0,
        "apparent_power_va",
        "l1",
    );
    // 0x0158 INT16 0.001 power factor, signed; 0x015B system PF.
    check(
        at(&p, 0x0158),
        h,
        ValueType::I16,
        0.001,
        "power_factor",
        "l1",
    );
    check(
        at(&p, 0x015B),
        h,
        ValueType::I16,
        0.001,
        "power_factor",
        "total",
    );
    // 0xA000 UINT32 0.01 kWh = 10 Wh, tariffs T1–T4 at 0xA002..0xA008; reactive at 0xA01E.
    check(
        at(&p, 0xA000),
        h,
        ValueType::U32,
        10.0,
        "energy_wh",
        "total",
    );
    for (i, a) in [0xA002, 0xA004, 0xA006, 0xA008].into_iter().enumerate() {
        let r = at(&p, a);
        check(r, h, ValueType::U32, 10.0, "energy_wh", "total");
        let tariff = r.tags.iter().next().map(|(k, v)| (k.as_str(), v.as_str()));
        assert_eq!(tariff, Some(("tariff", format!("t{}", i + 1).as_str())));
    }
    check(
        at(&p, 0xA01E),
        h,
        ValueType::U32,
        10.0,
        "reactive_energy_varh",
        "total",
    );
    check(
        at(&p, 0xA026),
        h,
        ValueType::U32,
        10.0,
        "reactive_energy_varh",
        "total",
    );
    assert!(
        p.registers
            .iter()
            .all(|r| r.poll == "fast" || r.poll == "slow")
    );
    assert_eq!(at(&p, 0xA000).poll, "slow");
    assert_eq!(at(&p, 0x0140).poll, "fast");
}

#[test]
fn orno_we515_decodes_export_and_a_leading_power_factor() {
    let p = profile("orno-we-515");
    let read = read_all(
        &p,
        &[
            (0x0130, 5001),  // 50.01 Hz
            (0x0131, 23012), // 230.12 V
            (0x0139, 0x0000),
            (0x013A, 5432), // 5.432 A
            // -1234 W (exporting) = 0xFFFF_FB2E; mbmd's unsigned read makes it 4 294 966 062.
            (0x0140, 0xFFFF),
            (0x0141, 0xFB2E),
            (0x0146, 0xFFFF),
            (0x0147, 0xFB2E),
            // -870 = 0xFC9A: power factor 0.870 leading.
            (0x0158, 0xFC9A),
            (0x015B, 0xFC9A),
            // 1234.56 kWh = 123456 × 0.01 kWh = 0x0001_E240.
            (0xA000, 0x0001),
            (0xA001, 0xE240),
        ],
    );
    assert_eq!(read.len(), p.registers.len());
    close(value(&read, "frequency_hz", "total"), 50.01);
    close(value(&read, "voltage_v", "l1"), 230.12);
    close(value(&read, "current_a", "l1"), 5.432);
    assert_eq!(value(&read, "power_w", "l1"), -1234.0);
    assert_eq!(value(&read, "power_w", "total"), -1234.0);
    close(value(&read, "power_factor", "l1"), -0.87);
    close(value(&read, "power_factor", "total"), -0.87);
    assert_eq!(value(&read, "energy_wh", "total"), 1_234_560.0);
}

#[test]
fn orno_we517_matches_the_vendor_table() {
    let p = profile("orno-we-517");
    assert_eq!(Profiles::builtin().unwrap().get("orno-we-516"), Some(&p));
    let h = Function::Holding;
    check(at(&p, 0x000E), h, ValueType::F32, 1.0, "voltage_v", "l1");
    check(at(&p, 0x0012), h, ValueType::F32, 1.0, "voltage_v", "l3");
    check(
        at(&p, 0x0014),
        h,
        ValueType::F32,
        1.0,
        "frequency_hz",
        "total",
    );
    check(at(&p, 0x0016), h, ValueType::F32, 1.0, "current_a", "l1");
    // Power in kW, kvar, kVA: total first, then L1..L3.
    check(
        at(&p, 0x001C),
        h,
        ValueType::F32,
        1000.0,
        "power_w",
        "total",
    );
    check(at(&p, 0x001E), h, ValueType::F32, 1000.0, "power_w", "l1");
    check(
        at(&p, 0x0024),
        h,
        ValueType::F32,
        1000.0,
        "reactive_power_var",
        "total",
    );
    check(
        at(&p, 0x002C),
        h,
        ValueType::F32,
        1000.0,
        "apparent_power_va",
        "total",
    );
    check(
        at(&p, 0x0034),
        h,
        ValueType::F32,
        1.0,
        "power_factor",
        "total",
    );
    check(at(&p, 0x003A), h, ValueType::F32, 1.0, "power_factor", "l3");
    // Energy in kWh: total, forward (import) and reverse (export).
    check(
        at(&p, 0x0100),
        h,
        ValueType::F32,
        1000.0,
        "energy_wh",
        "total",
    );
    check(
        at(&p, 0x0108),
        h,
        ValueType::F32,
        1000.0,
        "energy_import_wh",
        "total",
    );
    check(
        at(&p, 0x0110),
        h,
        ValueType::F32,
        1000.0,
        "energy_export_wh",
        "total",
    );
}

#[test]
fn orno_we517_decodes_floats_in_kilo_units() {
    let p = profile("orno-we-517");
    let mut words = Vec::new();
    words.extend(f32_words(0x000E, 231.5));
    words.extend(f32_words(0x001E, -2.5)); // L1 exporting 2.5 kW
    words.extend(f32_words(0x0036, -0.5)); // L1 PF
    words.extend(f32_words(0x0108, 1234.5)); // kWh imported
    let read = read_all(&p, &words);
    close(value(&read, "voltage_v", "l1"), 231.5);
    close(value(&read, "power_w", "l1"), -2500.0);
    close(value(&read, "power_factor", "l1"), -0.5);
    close(value(&read, "energy_import_wh", "total"), 1_234_500.0);
    close(value(&read, "voltage_v", "l2"), 0.0);
}

#[test]
fn eastron_sdm120_matches_the_vendor_table() {
    let p = profile("eastron-sdm120");
    let i = Function::Input;
    check(at(&p, 0x0000), i, ValueType::F32, 1.0, "voltage_v", "l1");
    check(at(&p, 0x0006), i, ValueType::F32, 1.0, "current_a", "l1");
    check(at(&p, 0x000C), i, ValueType::F32, 1.0, "power_w", "l1");
    check(
        at(&p, 0x0012),
        i,
        ValueType::F32,
        1.0,
        "apparent_power_va",
        "l1",
    );
    check(
        at(&p, 0x0018),
        i,
        ValueType::F32,
        1.0,
        "reactive_power_var",
        "l1",
    );
    check(at(&p, 0x001E), i, ValueType::F32, 1.0, "power_factor", "l1");
    check(
        at(&p, 0x0046),
        i,
        ValueType::F32,
        1.0,
        "frequency_hz",
        "total",
    );
    check(
        at(&p, 0x0048),
        i,
        ValueType::F32,
        1000.0,
        "energy_import_wh",
        "total",
    );
    check(
        at(&p, 0x004A),
        i,
        ValueType::F32,
        1000.0,
        "energy_export_wh",
        "total",
    );
    check(
        at(&p, 0x0156),
        i,
        ValueType::F32,
        1000.0,
        "energy_wh",
        "total",
    );
    assert!(p.registers.iter().all(|r| r.function == Function::Input));
}

#[test]
fn eastron_sdm120_decodes_and_flags_a_nan() {
    let p = profile("eastron-sdm120");
    let mut words = Vec::new();
    words.extend(f32_words(0x0000, 229.75));
    words.extend(f32_words(0x000C, -1500.0));
    words.extend(f32_words(0x001E, -0.96));
    words.extend(f32_words(0x0046, 49.98));
    words.extend(f32_words(0x0048, 10.25));
    words.extend([(0x0006, 0x7FC0), (0x0007, 0x0000)]); // current: NaN
    let read = read_all(&p, &words);
    close(value(&read, "voltage_v", "l1"), 229.75);
    assert_eq!(value(&read, "power_w", "l1"), -1500.0);
    // The decimals the meter shows, not the f32's binary widening (-0.9599999785423279).
    assert_eq!(value(&read, "power_factor", "l1"), -0.96);
    assert_eq!(value(&read, "frequency_hz", "total"), 49.98);
    close(value(&read, "energy_import_wh", "total"), 10_250.0);
    let current = read.iter().find(|(r, _)| r.field == "current_a").unwrap();
    assert!(matches!(current.1, Err(ValueError::NotFinite(v)) if v.is_nan()));
}

#[test]
fn eastron_sdm630_matches_the_vendor_table() {
    let p = profile("eastron-sdm630");
    let i = Function::Input;
    check(at(&p, 0x0000), i, ValueType::F32, 1.0, "voltage_v", "l1");
    check(at(&p, 0x0004), i, ValueType::F32, 1.0, "voltage_v", "l3");
    check(at(&p, 0x000A), i, ValueType::F32, 1.0, "current_a", "l3");
    check(at(&p, 0x000C), i, ValueType::F32, 1.0, "power_w", "l1");
    check(at(&p, 0x0010), i, ValueType::F32, 1.0, "power_w", "l3");
    check(at(&p, 0x0022), i, ValueType::F32, 1.0, "power_factor", "l3");
    check(at(&p, 0x0034), i, ValueType::F32, 1.0, "power_w", "total");
    check(
        at(&p, 0x003E),
        i,
        ValueType::F32,
        1.0,
        "power_factor",
        "total",
    );
    check(
        at(&p, 0x0046),
        i,
        ValueType::F32,
        1.0,
        "frequency_hz",
        "total",
    );
    check(
        at(&p, 0x0048),
        i,
        ValueType::F32,
        1000.0,
        "energy_import_wh",
        "total",
    );
    check(
        at(&p, 0x004A),
        i,
        ValueType::F32,
        1000.0,
        "energy_export_wh",
        "total",
    );
    check(
        at(&p, 0x0156),
        i,
        ValueType::F32,
        1000.0,
        "energy_wh",
        "total",
    );
    check(
        at(&p, 0x015A),
        i,
        ValueType::F32,
        1000.0,
        "energy_import_wh",
        "l1",
    );
    check(
        at(&p, 0x0164),
        i,
        ValueType::F32,
        1000.0,
        "energy_export_wh",
        "l3",
    );
}

#[test]
fn eastron_sdm630_decodes_three_phases() {
    let p = profile("eastron-sdm630");
    let mut words = Vec::new();
    words.extend(f32_words(0x0000, 230.0));
    words.extend(f32_words(0x0002, 231.0));
    words.extend(f32_words(0x0004, 232.0));
    words.extend(f32_words(0x0034, -4200.0));
    words.extend(f32_words(0x0156, 99.5));
    let read = read_all(&p, &words);
    assert_eq!(value(&read, "voltage_v", "l1"), 230.0);
    assert_eq!(value(&read, "voltage_v", "l2"), 231.0);
    assert_eq!(value(&read, "voltage_v", "l3"), 232.0);
    assert_eq!(value(&read, "power_w", "total"), -4200.0);
    assert_eq!(value(&read, "energy_wh", "total"), 99_500.0);
}

#[test]
fn shipped_profiles_plan_into_few_requests() {
    // (model, requests with every class due, requests for the fast class alone)
    for (model, all, fast) in [
        ("orno-we-515", 2, 1),
        ("orno-we-517", 2, 1),
        ("eastron-sdm120", 3, 2),
        ("eastron-sdm630", 3, 2),
    ] {
        let p = profile(model);
        let n = |pred: &dyn Fn(&Register) -> bool| plan(&p.registers, pred, p.limits).unwrap();
        let every = n(&|_| true);
        let quick = n(&|r| r.poll == "fast");
        assert_eq!((every.len(), quick.len()), (all, fast), "{model}");
        assert!(every.iter().all(|r| r.count <= p.limits.max_registers));
    }
}
