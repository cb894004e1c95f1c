//! azure-bridge's figures (docs/BENCHMARKS.md): readings per billed 4 KB IoT Hub message
//! unit, packed against one reading per message (the Prime seed's way); outbox bytes per
//! reading while the hub is away; and the outage a 1 GB outbox covers for a site of 10
//! meters read at 1 Hz.
//!
//! The readings are shaped like modbus-ingest's from an ORNO WE-515 (six fields with the
//! decimals a meter gives), through azure-bridge's own packer and outbox on disk.

use std::collections::BTreeMap;

use azure_bridge::outbox::Outbox;
use azure_bridge::pack::{Packer, Refused};
use proto::{Measurement, Origin, Quality, Segment};

const METERS: usize = 10;
const UNIT: usize = 4096;

fn seg(s: &str) -> Segment {
    Segment::new(s).unwrap_or_else(|_| unreachable!("valid segment: {s}"))
}

/// A value as a register gives it: an integer times the register's decimal scale, which
/// modbus-ingest multiplies exactly (`decode.rs`), so `23145 × 0.01` is `231.45`.
fn register(raw: i64, decimals: i32) -> f64 {
    raw as f64 / 10f64.powi(decimals)
}

/// Second `second` of meter `meter`: its `power` group every second (the WE-515 profile's
/// fields at their register resolution), and its `energy` group once a minute.
fn readings(meter: usize, second: i64, seq: &mut u64) -> Vec<Measurement> {
    let t = second as f64;
    let power_w = (800.0 + 400.0 * (t / 60.0 + meter as f64).sin()).round() as i64;
    let volts = 23_000 + (second * 7 + meter as i64 * 13) % 200; // 0.01 V
    let mut make = |measurement: &str, fields: Vec<(&str, f64)>| {
        *seq += 1;
        Measurement {
            origin: Some(Origin {
                producer: seg("modbus-ingest"),
                stream: seg("meas"),
                seq: *seq,
                epoch: None,
            }),
            site: seg("home"),
            device: seg(&format!("we515-{meter}")),
            channel: seg("main"),
            measurement: seg(measurement),
            ts_ms: 1_796_000_000_000 + second * 1000 + (meter as i64 * 37) % 1000,
            quality: Quality::Good,
            fields: fields
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect::<BTreeMap<_, _>>(),
            tags: BTreeMap::new(),
        }
    };
    let mut out = vec![make(
        "power",
        vec![
            ("frequency_hz", register(4995 + second % 9, 2)),
            ("voltage_v", register(volts, 2)),
            ("current_a", register(power_w * 100_000 / volts, 3)),
            ("power_w", register(power_w, 0)),
            ("reactive_power_var", register(power_w / 9, 0)),
            ("apparent_power_va", register(power_w * 105 / 100, 0)),
            ("power_factor", register(950 + second % 40, 3)),
        ],
    )];
    if second % 60 == 0 {
        let wh = 12_345_670 + second * 13; // 10 Wh resolution
        out.push(make(
            "energy",
            vec![
                ("energy_wh", register(wh / 10 * 10, 0)),
                ("import_energy_wh", register(wh / 10 * 10, 0)),
                ("export_energy_wh", register(0, 0)),
                ("reactive_energy_varh", register(wh / 90 * 10, 0)),
            ],
        ));
    }
    out
}

fn main() -> anyhow::Result<()> {
    // One reading per message, as the Prime seed sent them: the reading's own JSON.
    let one = readings(0, 1, &mut 0).remove(0);
    let one_bytes = one.encode_json_len();
    let units_one = one_bytes.div_ceil(UNIT).max(1);

    // Packed: one hour of 10 meters at 1 Hz through the packer and the outbox on disk, with
    // messages of one unit and of the default 64 KiB (16 units).
    let default_bytes = azure_bridge::Config::default().max_message_bytes;
    let small = pack_hour(UNIT)?;
    let big = pack_hour(default_bytes)?;
    let per_unit = |r: &Run| r.readings as f64 / r.units as f64;
    let site_rate = big.readings as f64 / 3600.0;
    let per_reading_disk = big.outbox_bytes as f64 / big.readings as f64;
    let gib = 1024.0 * 1024.0 * 1024.0;
    let outage_days = gib / per_reading_disk / site_rate / 86_400.0;
    let per_day = site_rate * 86_400.0;
    let s1_unit_per_day = 400_000.0;
    println!(
        "{}",
        serde_json::json!({
            "one_reading_per_message_bytes": one_bytes,
            "one_reading_per_message_units": units_one,
            "messages_of_4kb": {"messages": small.messages, "readings": small.readings, "units": small.units, "readings_per_unit": per_unit(&small)},
            "messages_of_default_bytes": {"max_message_bytes": default_bytes, "messages": big.messages, "readings": big.readings, "units": big.units, "readings_per_unit": per_unit(&big), "body_bytes_mean": big.body_bytes as f64 / big.messages as f64},
            "gain_over_one_per_message": per_unit(&big) * units_one as f64,
            "site_readings_per_day": per_day,
            "units_per_day_one_per_message": per_day * units_one as f64,
            "units_per_day_packed": per_day / per_unit(&big),
            "share_of_one_s1_unit_daily_quota_one_per_message": per_day * units_one as f64 / s1_unit_per_day,
            "share_of_one_s1_unit_daily_quota_packed": per_day / per_unit(&big) / s1_unit_per_day,
            "outbox_bytes_per_reading": per_reading_disk,
            "outbox_1gib_outage_days_10_meters_1hz": outage_days,
            "packing_and_fsync_seconds_for_one_hour": big.seconds,
        })
    );
    Ok(())
}

struct Run {
    messages: u64,
    readings: u64,
    units: u64,
    body_bytes: u64,
    outbox_bytes: u64,
    seconds: f64,
}

/// One hour of the site through a packer of `max` bytes and an outbox on disk.
fn pack_hour(max: usize) -> anyhow::Result<Run> {
    let dir = tempfile::tempdir()?;
    let (mut outbox, _, _) = Outbox::open(dir.path(), 4 << 30)?;
    let mut packer = Packer::new(seg("home"), max);
    let mut run = Run {
        messages: 0,
        readings: 0,
        units: 0,
        body_bytes: 0,
        outbox_bytes: 0,
        seconds: 0.0,
    };
    let mut seq = 0u64;
    let started = std::time::Instant::now();
    let mut store = |packer: &mut Packer, run: &mut Run| -> anyhow::Result<()> {
        let (stored, _) = outbox.append(packer)?;
        run.messages += 1;
        run.readings += stored.meta.readings;
        run.body_bytes += stored.body.len() as u64;
        run.units += stored.body.len().div_ceil(UNIT) as u64;
        Ok(())
    };
    for second in 0..3600 {
        for m in (0..METERS).flat_map(|meter| readings(meter, second, &mut seq)) {
            match packer.push(&m) {
                Ok(()) => {}
                Err(Refused::Full) => {
                    store(&mut packer, &mut run)?;
                    packer.push(&m).map_err(|e| anyhow::anyhow!("{e:?}"))?;
                }
                Err(e) => anyhow::bail!("{e:?}"),
            }
        }
    }
    if !packer.is_empty() {
        store(&mut packer, &mut run)?;
    }
    run.seconds = started.elapsed().as_secs_f64();
    run.outbox_bytes = outbox.bytes();
    Ok(run)
}

trait JsonLen {
    fn encode_json_len(&self) -> usize;
}

impl JsonLen for Measurement {
    fn encode_json_len(&self) -> usize {
        serde_json::to_vec(self).map_or(0, |v| v.len())
    }
}
