// Test code: a failed setup step should panic with its reason.
#![allow(clippy::unwrap_used, clippy::expect_used)]

//! `wattbus demo --data-dir D` killed -9 and started again, several times and at different
//! moments, as a Pi loses power or an OOM killer strikes: every CT reading stored carries its
//! own device's current, and each device's energy counter is counted once — it grows by that
//! device's own power over each window and by nothing else, and never goes down.
//!
//! The demo's three simulated CT clamps carry distinct currents (5 A, 0.8 A and 2.17 A), so a
//! reading labelled with another device cannot pass for its own. What is checked is what the
//! demo's influx-writer stored in its CSV files, the readings a user keeps.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use wattbus_e2e::{Proc, wait_until, wattbus_bin};

/// A CT device of the demo: its RMS current (100, 16 and 40 ADC counts of fundamental, the
/// third with 30% 3rd and 15% 5th harmonics, at 0.05 A per count), the field its energy is
/// integrated from and the energy field.
struct Ct {
    device: &'static str,
    amps: f64,
    power: &'static str,
    energy: &'static str,
}

fn cts() -> [Ct; 3] {
    [
        Ct {
            device: "ct-1",
            amps: 5.0,
            power: "power_w",
            energy: "energy_import_wh",
        },
        Ct {
            device: "ct-2",
            amps: 0.8,
            power: "apparent_power_va",
            energy: "apparent_energy_vah",
        },
        Ct {
            device: "ct-3",
            amps: 2.0 * (1.0f64 + 0.09 + 0.0225).sqrt(),
            power: "apparent_power_va",
            energy: "apparent_energy_vah",
        },
    ]
}

/// Every value stored: (device, channel, ts_ms) → field → every copy of it (a replay
/// stores a reading again).
type Stored = BTreeMap<(String, String, i64), BTreeMap<String, Vec<f64>>>;

/// Split one CSV line (RFC 4180 quoting).
fn split_csv(line: &str) -> Vec<String> {
    let mut out = vec![String::new()];
    let mut quoted = false;
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match (c, quoted) {
            ('"', true) if chars.peek() == Some(&'"') => {
                chars.next();
                out.last_mut().unwrap().push('"');
            }
            ('"', _) => quoted = !quoted,
            (',', false) => out.push(String::new()),
            (c, _) => out.last_mut().unwrap().push(c),
        }
    }
    out
}

/// `2026-11-24T10:15:00.123Z` to Unix ms.
fn parse_time(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() != 24 || b[23] != b'Z' {
        return None;
    }
    let n = |r: std::ops::Range<usize>| s.get(r)?.parse::<i64>().ok();
    let (y, mo, d) = (n(0..4)?, n(5..7)?, n(8..10)?);
    let (h, mi, sec, ms) = (n(11..13)?, n(14..16)?, n(17..19)?, n(20..23)?);
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if mo <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (mo + if mo > 2 { -3 } else { 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(((days * 24 + h) * 60 + mi) * 60_000 + sec * 1000 + ms)
}

/// Every complete row of every CSV file in `dir`. A row cut short by the kill (no line end
/// yet) is left out: its value may be cut mid-digits.
fn stored(dir: &Path) -> Stored {
    let mut out = Stored::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in entries.flatten() {
        if e.path().extension().is_none_or(|x| x != "csv") {
            continue;
        }
        let Ok(text) = std::fs::read_to_string(e.path()) else {
            continue;
        };
        let mut lines: Vec<&str> = text.split('\n').collect();
        lines.pop(); // after the last line end: empty, or a partial row
        let Some(header) = lines.first() else {
            continue;
        };
        let header = split_csv(header);
        let col = |name: &str| header.iter().position(|h| h == name);
        let (Some(t), Some(d), Some(c), Some(f), Some(v)) = (
            col("time"),
            col("device"),
            col("channel"),
            col("field"),
            col("value"),
        ) else {
            continue;
        };
        for line in &lines[1..] {
            let row = split_csv(line);
            if row.len() != header.len() {
                continue;
            }
            let (Some(ts), Ok(value)) = (parse_time(&row[t]), row[v].parse::<f64>()) else {
                continue;
            };
            out.entry((row[d].clone(), row[c].clone(), ts))
                .or_default()
                .entry(row[f].clone())
                .or_default()
                .push(value);
        }
    }
    out
}

/// Distinct CT windows stored so far.
fn ct_windows(dir: &Path) -> usize {
    stored(dir)
        .keys()
        .filter(|(d, _, _)| d.starts_with("ct-"))
        .collect::<BTreeSet<_>>()
        .len()
}

fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

#[test]
fn demo_killed_and_restarted_keeps_each_ct_reading_with_its_own_device_and_counts_energy_once() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let readings = dir.path().join("readings");
    // When each run is killed: once this many more CT windows are stored (`None`: as soon as
    // the simulated devices are started, before any reading of the run). After a restart the
    // processor first waits up to 15 s for the frames it never acknowledged (they died with
    // the process), so each run lasts at least that long.
    let runs: [(Option<usize>, bool); 6] = [
        (Some(6), true),
        (None, true),
        (Some(2), true),
        (Some(10), true),
        (Some(1), true),
        (Some(6), false),
    ];
    for (run, (more, kill)) in runs.into_iter().enumerate() {
        let log = dir.path().join(format!("demo-{run}.log"));
        let mut demo = Proc::spawn(
            "demo",
            Command::new(wattbus_bin()).args([
                "demo",
                "--meters",
                "1",
                "--data-dir",
                data.to_str().unwrap(),
                "--readings-dir",
                readings.to_str().unwrap(),
            ]),
            &log,
        );
        let reached = match more {
            None => wait_until(Duration::from_secs(60), || {
                std::fs::read_to_string(&log)
                    .is_ok_and(|t| t.contains("Simulated serial devices on PTYs"))
            }),
            Some(n) => {
                let before = ct_windows(&readings);
                wait_until(Duration::from_secs(120), || {
                    ct_windows(&readings) >= before + n
                })
            }
        };
        assert!(
            reached && demo.is_running(),
            "run {run}: the demo did not get there:\n{}",
            log_tail(&log)
        );
        if kill {
            demo.kill9();
        } else {
            let status = demo.terminate(Duration::from_secs(60));
            assert!(
                status.is_some_and(|s| s.success()),
                "run {run}: {status:?}\n{}",
                log_tail(&log)
            );
        }
    }

    let all = stored(&readings);
    // The CT devices have one series each, ct1: a window of ct-1 (current and voltage)
    // labelled ct-2 would add a `ct-2/v1` series, and the other way round a nominal-voltage
    // field on ct-1.
    let series: BTreeSet<(&str, &str)> = all
        .keys()
        .filter(|(d, _, _)| d.starts_with("ct-"))
        .map(|(d, c, _)| (d.as_str(), c.as_str()))
        .collect();
    assert_eq!(
        series,
        [("ct-1", "ct1"), ("ct-2", "ct1"), ("ct-3", "ct1")].into(),
        "CT series stored"
    );
    for ct in cts() {
        let readings: Vec<(i64, &BTreeMap<String, Vec<f64>>)> = all
            .iter()
            .filter(|((d, _, _), _)| d == ct.device)
            .map(|((_, _, ts), f)| (*ts, f))
            .collect();
        assert!(
            readings.len() >= 10,
            "{}: {} readings",
            ct.device,
            readings.len()
        );
        let value = |ts: i64, f: &BTreeMap<String, Vec<f64>>, field: &str| -> f64 {
            let copies = f
                .get(field)
                .unwrap_or_else(|| panic!("{} at {ts}: no {field}: {f:?}", ct.device));
            // A reading stored twice (replayed after a restart) is the same reading twice:
            // its energy was not counted again.
            assert!(
                copies.windows(2).all(|c| c[0] == c[1]),
                "{} at {ts}: {field} stored as {copies:?}",
                ct.device
            );
            copies[0]
        };
        for (ts, f) in &readings {
            let amps = value(*ts, f, "current_a");
            // 5%: each reading on its own (a short window on a loaded machine is legitimate);
            // the devices' currents are 2.5 to 6 times apart.
            assert!(
                (amps - ct.amps).abs() / ct.amps < 0.05,
                "{} at {ts}: {amps} A is not its own current ({} A): {f:?}",
                ct.device,
                ct.amps
            );
            let other = if ct.energy == "energy_import_wh" {
                "apparent_energy_vah"
            } else {
                "energy_import_wh"
            };
            assert!(!f.contains_key(other), "{} at {ts}: {f:?}", ct.device);
        }
        // The counter integrates each window's own power over the window's length. Windows
        // never overlap, so a window is at most as long as the time since the reading before
        // it, and at most the 1 s interval: each step is at most power × min(gap, 1 s) (plus
        // 2 ms for timestamps rounded to the ms), and at least nothing — across every restart
        // too. Another device's window counted here would add another device's power.
        let mut counted = 0.0;
        let mut bound = 0.0;
        for pair in readings.windows(2) {
            let ((t0, f0), (t1, f1)) = (pair[0], pair[1]);
            let de = value(t1, f1, ct.energy) - value(t0, f0, ct.energy);
            let power = value(t1, f1, ct.power);
            let own = power * ((t1 - t0).min(1000) + 2) as f64 / 3_600_000.0;
            assert!(
                de >= 0.0,
                "{}: the counter went down by {} at {t1}",
                ct.device,
                -de
            );
            assert!(
                de <= own + 1e-9,
                "{}: +{de} at {t1}; its own {power} over the window gives at most {own}",
                ct.device
            );
            counted += de;
            bound += own;
        }
        // And it falls short of that bound only by windows cut short at a hole (lines the
        // simulated device could not write in time on a loaded machine): not by whole
        // windows left out.
        assert!(
            counted >= 0.8 * bound,
            "{}: counted {counted}, the readings' power integrates to {bound}",
            ct.device
        );
    }
}
