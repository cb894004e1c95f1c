//! Simulated hardware served over TCP, for `modbus-ingest` and `serial-ingest` running in
//! other processes or containers (compose's `demo` profile): the devices `wattbus demo` puts
//! on in-process PTYs, reached the way many installations reach real ones over a network.
//!
//! - Two ORNO WE-515 meters (slaves 1 and 2: a house that exports in the afternoon, and a
//!   heat pump) behind a transparent RS485-to-Ethernet gateway: Modbus RTU frames over TCP,
//!   paced like the 9600 8E1 line behind it (`transport = "rtu-over-tcp"`).
//! - Five serial devices, each on its own TCP port as a serial device server (ser2net in raw
//!   mode, an ESP-Link) hands a port over: three streaming CT sensors (Project Prime style,
//!   2 kHz; the first also measures the mains voltage), a PowMon and a fridge monitor
//!   (`path = "tcp://host:port"` in serial-ingest). One host at a time per device, as with a
//!   serial port; each new connection meets a freshly started sketch, as an Arduino resets
//!   when its port is opened.
//!
//! The meters' energy counters are kept on disk like a real meter keeps its own (a
//! reservation, see `register`), so `docker compose down` / `up` never makes them go back.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use runtime::Shutdown;
use serde::Deserialize;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

use crate::modbus::{
    LineTiming, MeterBus, RtuOptions, SlaveHandle, WE515_COUNTERS, We515, serve_rtu_over_tcp,
    we515_tariff,
};
use crate::register::{RESERVE, RegisterError, Registers};
use crate::serial::{
    DriverError, Load, PowMon, PowMonConfig, PowMonConfigError, Prime, PrimeConfig,
    PrimeConfigError, Sensor, SensorConfig, SensorConfigError, Waveform, run_powmon, run_prime,
    run_sensor,
};

/// Amps per ADC count of the simulated CT sensors (a 30 A clamp on a 10-bit ADC).
pub const CT_AMPS_PER_COUNT: f64 = 0.05;
/// Volts per ADC count of the simulated mains voltage sensor.
pub const VOLTS_PER_COUNT: f64 = 2.0;
/// How often the fridge monitor prints a line.
pub const FRIDGE_MONITOR_INTERVAL: Duration = Duration::from_secs(2);
/// The meters on the RS485 line: slave id, name, model seed.
pub const METERS: [(u8, &str, u64); 2] = [(1, "house", 11), (2, "heat-pump", 12)];
/// The serial devices in port order from [`HardwareConfig::serial_port`].
pub const SERIAL_DEVICES: [&str; 5] = ["ct-1", "ct-2", "ct-3", "powmon", "kitchen"];
/// A bound on how fast any meter counter can grow (W or var), for its reservation.
const METER_MAX_RATE: f64 = 15_000.0;
/// How often the meters' counters are checked against their reservation.
const COVER_EVERY: Duration = Duration::from_secs(1);

/// `[simulator.hardware]`: absent, no hardware is simulated.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HardwareConfig {
    /// Address the device ports listen on ("0.0.0.0" in a container).
    pub listen: IpAddr,
    /// The RS485-to-Ethernet gateway with the two WE-515 meters.
    pub modbus_port: u16,
    /// The first serial device's port; the others follow ([`SERIAL_DEVICES`]).
    pub serial_port: u16,
}

impl Default for HardwareConfig {
    fn default() -> Self {
        Self {
            listen: IpAddr::from([127, 0, 0, 1]),
            modbus_port: 5020,
            serial_port: 4001,
        }
    }
}

impl HardwareConfig {
    pub(crate) fn check(&self, section: &str) -> Result<(), runtime::ConfigError> {
        let defaults = Self::default();
        let last = u32::from(self.serial_port) + SERIAL_DEVICES.len() as u32 - 1;
        if self.serial_port == 0 || last > u32::from(u16::MAX) {
            return Err(runtime::ConfigError::new(
                format!("{section}.serial_port"),
                format!(
                    "must be between 1 and {}: the {} serial devices take that port and the next",
                    u16::MAX as usize + 1 - SERIAL_DEVICES.len(),
                    SERIAL_DEVICES.len()
                ),
            ));
        }
        if self.modbus_port == 0 {
            return Err(runtime::ConfigError::new(
                format!("{section}.modbus_port"),
                "must be between 1 and 65535",
            ));
        }
        if (self.serial_port..=last as u16).contains(&self.modbus_port) {
            // Name the one that was moved off its default.
            let key = if self.modbus_port == defaults.modbus_port {
                "serial_port"
            } else {
                "modbus_port"
            };
            return Err(runtime::ConfigError::new(
                format!("{section}.{key}"),
                format!(
                    "the gateway's modbus_port {} falls among the serial devices' ports {}..={last}",
                    self.modbus_port, self.serial_port
                ),
            ));
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HardwareError {
    #[error("cannot listen on {addr} for the simulated {what}")]
    Listen {
        addr: SocketAddr,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Register(#[from] RegisterError),
    #[error("cannot write the simulated meters' registers to {path}")]
    Registers {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("a built-in simulated device is invalid: {0}")]
    Model(String),
}

impl From<PrimeConfigError> for HardwareError {
    fn from(e: PrimeConfigError) -> Self {
        Self::Model(e.to_string())
    }
}
impl From<PowMonConfigError> for HardwareError {
    fn from(e: PowMonConfigError) -> Self {
        Self::Model(e.to_string())
    }
}
impl From<SensorConfigError> for HardwareError {
    fn from(e: SensorConfigError) -> Self {
        Self::Model(e.to_string())
    }
}

/// The three CT sensors, started at `now_ms`: a heater whose sensor also measures the mains
/// voltage (a ZMPT101B on the second channel: real power and power factor), a fridge, and a
/// PC whose switch-mode supply draws harmonics (apparent power from the nominal voltage).
pub fn ct_sensors(now_ms: i64) -> Result<Vec<Prime>, PrimeConfigError> {
    let wave = |rms: f64, phase: f64, h3: f64, h5: f64| Waveform {
        rms_counts: rms,
        phase_rad: phase,
        harmonic3: h3,
        harmonic5: h5,
        noise_counts: 0.5,
        ..Waveform::default()
    };
    let sensors = [
        // 5 A lagging the voltage by 30°; 230 V at 2 V per count.
        vec![
            wave(100.0, -std::f64::consts::FRAC_PI_6, 0.0, 0.0),
            wave(115.0, 0.0, 0.0, 0.0),
        ],
        vec![wave(16.0, 0.0, 0.0, 0.0)],
        vec![wave(40.0, 0.0, 0.3, 0.15)],
    ];
    sensors
        .into_iter()
        .enumerate()
        .map(|(i, channels)| {
            Prime::new(
                PrimeConfig {
                    channels,
                    ..PrimeConfig::default()
                },
                i as u64 + 1,
                now_ms,
            )
        })
        .collect()
}

/// The PowMon: a fridge and a kettle.
pub fn powmon() -> Result<PowMon, PowMonConfigError> {
    PowMon::new(PowMonConfig {
        sensors: vec![Load::fridge(), Load::kettle()],
        ..PowMonConfig::default()
    })
}

/// The fridge monitor: a fridge and a freezer, a line every [`FRIDGE_MONITOR_INTERVAL`].
pub fn fridge_monitor() -> Result<Sensor, SensorConfigError> {
    Sensor::new(SensorConfig::default(), 7)
}

/// The two meters of [`METERS`] on one bus, their counters continuing from `registers`
/// (those of a meter never saved start where its model starts), and a handle on each.
pub fn meters(now_ms: i64, registers: &Registers) -> (MeterBus, Vec<(&'static str, SlaveHandle)>) {
    let bus = MeterBus::new();
    let mut handles = Vec::new();
    for (slave, name, seed) in METERS {
        let fresh = We515::new(seed, now_ms);
        let mut counters = fresh.counters();
        let mut saved = false;
        for (i, c) in counters.iter_mut().enumerate() {
            if let Some(v) = registers.get(&register_key(name, i)) {
                *c = v;
                saved = true;
            }
        }
        let meter = if saved {
            We515::resume(seed, now_ms, counters)
        } else {
            fresh
        };
        handles.push((name, bus.add(slave, meter)));
    }
    (bus, handles)
}

fn register_key(meter: &str, counter: usize) -> String {
    format!("{meter}.{counter}")
}

/// Start serving the simulated hardware: every port is bound and the registers file read
/// before this returns (an error here is the caller's to report), then the devices run until
/// shutdown in the task returned, which saves the meters' exact counters as it ends.
pub async fn start(
    config: &HardwareConfig,
    registers_path: &Path,
    shutdown: Shutdown,
) -> Result<tokio::task::JoinHandle<()>, HardwareError> {
    let bind = |port: u16, what: &'static str| {
        let addr = SocketAddr::new(config.listen, port);
        async move {
            TcpListener::bind(addr)
                .await
                .map_err(|source| HardwareError::Listen { addr, what, source })
        }
    };
    let gateway = bind(config.modbus_port, "RS485 gateway").await?;
    let mut serial = Vec::new();
    for (i, name) in SERIAL_DEVICES.iter().enumerate() {
        serial.push((*name, bind(config.serial_port + i as u16, name).await?));
    }
    // Every built-in model is checked once here, so a connection never meets a broken one.
    ct_sensors(0)?;
    powmon()?;
    fridge_monitor()?;
    let mut registers = Registers::open(registers_path)?;
    let (bus, handles) = meters(proto::now_ms(), &registers);
    // Covered before the first poll can be served.
    cover(&handles, &mut registers, proto::now_ms()).map_err(|source| {
        HardwareError::Registers {
            path: registers_path.to_path_buf(),
            source,
        }
    })?;
    tracing::info!(
        listen = %config.listen,
        modbus_port = config.modbus_port,
        serial_ports = %format!("{}..={}", config.serial_port, config.serial_port + SERIAL_DEVICES.len() as u16 - 1),
        "Simulated hardware: two WE-515 meters behind an RTU-over-TCP gateway; CT sensors, a PowMon and a fridge monitor on serial-over-TCP ports."
    );
    let mut tasks = JoinSet::new();
    {
        let shutdown = shutdown.clone();
        tasks.spawn(async move {
            let options = RtuOptions {
                pace: Some(LineTiming::RS485_9600_8E1),
            };
            if let Err(e) = serve_rtu_over_tcp(gateway, options, bus, shutdown).await {
                tracing::error!(error = %runtime::telemetry::chain(&e), "The simulated RS485 gateway stopped accepting connections.");
            }
        });
    }
    for (i, (name, listener)) in serial.into_iter().enumerate() {
        tasks.spawn(serve_device(name, i, listener, shutdown.clone()));
    }
    Ok(tokio::spawn(keep_registers(
        handles, registers, tasks, shutdown,
    )))
}

/// Keep the registers file ahead of the meters until shutdown, then save them exactly once
/// every device has stopped.
async fn keep_registers(
    handles: Vec<(&'static str, SlaveHandle)>,
    mut registers: Registers,
    mut tasks: JoinSet<()>,
    shutdown: Shutdown,
) {
    let mut every = tokio::time::interval(COVER_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut cover_failed = false;
    loop {
        tokio::select! {
            () = shutdown.wait() => break,
            _ = every.tick() => {}
        }
        match cover(&handles, &mut registers, proto::now_ms()) {
            Ok(()) => cover_failed = false,
            Err(e) if !cover_failed => {
                cover_failed = true;
                tracing::warn!(error = %runtime::telemetry::chain(&e), "Cannot save the simulated meters' energy registers: after a crash they may restart below the last reading.");
            }
            Err(_) => {}
        }
    }
    while tasks.join_next().await.is_some() {}
    let exact: Vec<(String, f64)> = handles
        .iter()
        .flat_map(|(name, handle)| {
            counters_at(handle, None)
                .into_iter()
                .enumerate()
                .map(move |(i, v)| (register_key(name, i), v))
        })
        .collect();
    if let Err(e) = registers.save_exact(exact) {
        tracing::warn!(error = %runtime::telemetry::chain(&e), "Cannot save the simulated meters' energy registers at stop.");
    }
}

/// A meter's counters, advanced to `now_ms` first if given.
fn counters_at(handle: &SlaveHandle, now_ms: Option<i64>) -> [f64; WE515_COUNTERS] {
    handle
        .with_meter(|m| {
            m.as_we515_mut().map(|w| {
                if let Some(now) = now_ms {
                    w.values_at(now);
                }
                w.counters()
            })
        })
        .unwrap_or([0.0; WE515_COUNTERS])
}

/// Make sure the registers file covers every counter a poll may read before the next look.
///
/// Only the tariff the meter counts into grows (with its total). The file is written when a
/// counter has less than half of [`RESERVE`] at [`METER_MAX_RATE`] left above it, so a look
/// delayed by up to half a minute (a stalled machine) still finds it covered: each tariff in
/// use now or within [`RESERVE`] (two across a 06:00/22:00 switch) with a full [`RESERVE`]
/// of headroom, the others exactly, and each total as the sum of its tariffs (or, from a file
/// where it was already above them, with headroom of its own). After a `kill -9` the meters
/// then resume at or above any value served, every total still the sum of its tariffs.
fn cover(
    handles: &[(&'static str, SlaveHandle)],
    registers: &mut Registers,
    now_ms: i64,
) -> std::io::Result<()> {
    let reserve_ms = i64::try_from(RESERVE.as_millis()).unwrap_or(i64::MAX / 4);
    let headroom = METER_MAX_RATE * RESERVE.as_secs_f64() / 3600.0;
    let margin = headroom / 2.0;
    let in_use = [we515_tariff(now_ms), we515_tariff(now_ms + reserve_ms)];
    let mut values = Vec::new();
    let mut short = false;
    for (name, handle) in handles {
        let v = counters_at(handle, Some(now_ms));
        // Import: total 0, tariffs 1..=4; reactive: total 5, tariffs 6..=9.
        for total in [0, 5] {
            let mut sum = 0.0;
            for t in 0..4 {
                let i = total + 1 + t;
                let key = register_key(name, i);
                let saved = registers.get(&key);
                let value = if in_use.contains(&t) {
                    short |= saved.is_none_or(|s| s < v[i] + margin);
                    // Never below a reservation a poll may already have read up to.
                    saved.map_or(v[i] + headroom, |s| s.max(v[i] + headroom))
                } else {
                    short |= saved.is_none_or(|s| s < v[i]);
                    v[i]
                };
                sum += value;
                values.push((key, value));
            }
            let key = register_key(name, total);
            short |= registers.get(&key).is_none_or(|s| s < v[total] + margin);
            // The model keeps a total equal to the sum of its tariffs (to float rounding);
            // one resumed from a file where it was above them grows on its own headroom.
            let value = if v[total] > sum - headroom + 1e-6 {
                sum.max(v[total] + headroom)
            } else {
                sum
            };
            values.push((key, value));
        }
    }
    if short {
        registers.save_exact(values)
    } else {
        Ok(())
    }
}

/// One serial device on its own TCP port: one host at a time; a second connection while one
/// is served is closed at once (as a second open of a serial port fails).
async fn serve_device(name: &'static str, index: usize, listener: TcpListener, shutdown: Shutdown) {
    let mut session: Option<tokio::task::JoinHandle<()>> = None;
    // Accept failures in a row: the first is a WARN, the rest of the episode DEBUG.
    let mut failing = 0u64;
    loop {
        let accepted = tokio::select! {
            () = shutdown.wait() => break,
            a = listener.accept() => a,
        };
        let (stream, peer) = match accepted {
            Ok(a) => {
                failing = 0;
                a
            }
            Err(e) => {
                if failing == 0 {
                    tracing::warn!(device = name, error = %runtime::telemetry::chain(&e), "Cannot accept a connection to a simulated device; trying again.");
                } else {
                    tracing::debug!(device = name, error = %runtime::telemetry::chain(&e), failing, "Still cannot accept a connection.");
                }
                failing += 1;
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        if session.as_ref().is_some_and(|s| !s.is_finished()) {
            tracing::info!(device = name, %peer, "A second host asked for a simulated device that is in use: refused.");
            drop(stream);
            continue;
        }
        let _ = stream.set_nodelay(true);
        tracing::debug!(device = name, %peer, "A host opened a simulated device.");
        session = Some(tokio::spawn(run_device(index, stream, shutdown.clone())));
    }
    if let Some(s) = session {
        let _ = s.await;
    }
}

/// A freshly started sketch for device `index` of [`SERIAL_DEVICES`] on one connection.
async fn run_device(index: usize, stream: TcpStream, shutdown: Shutdown) {
    let now = proto::now_ms();
    let result: Result<(), DriverError> = match index {
        0..=2 => match ct_sensors(now).map(|mut v| v.swap_remove(index)) {
            Ok(model) => run_prime(model, stream, shutdown).await,
            Err(e) => {
                return tracing::error!(error = %runtime::telemetry::chain(&e), "Built-in CT sensor is invalid.");
            }
        },
        3 => match powmon() {
            Ok(model) => run_powmon(model, stream, shutdown).await,
            Err(e) => {
                return tracing::error!(error = %runtime::telemetry::chain(&e), "Built-in PowMon is invalid.");
            }
        },
        _ => match fridge_monitor() {
            Ok(model) => run_sensor(model, FRIDGE_MONITOR_INTERVAL, stream, shutdown).await,
            Err(e) => {
                return tracing::error!(error = %runtime::telemetry::chain(&e), "Built-in fridge monitor is invalid.");
            }
        },
    };
    if let Err(e) = result {
        tracing::debug!(error = %runtime::telemetry::chain(&e), "A host closed a simulated device.");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meters_continue_from_their_saved_registers_and_fresh_ones_from_the_model() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meter-registers");
        let now = 1_717_250_400_000;
        let (_, fresh) = meters(now, &Registers::open(&path).unwrap());
        let model = counters_at(&fresh[0].1, None);
        assert!(model[0] > 1_000_000.0, "a used meter: {model:?}");
        let mut r = Registers::open(&path).unwrap();
        let saved: Vec<(String, f64)> = (0..WE515_COUNTERS)
            .map(|i| (register_key("house", i), 5_000_000.0 + i as f64))
            .collect();
        r.save_exact(saved).unwrap();
        let (_, resumed) = meters(now + 3_600_000, &Registers::open(&path).unwrap());
        let house = counters_at(&resumed[0].1, None);
        assert_eq!(house[0], 5_000_000.0);
        assert_eq!(house[9], 5_000_009.0);
        // An hour later the register has grown from there, never from the model's start.
        let later = counters_at(&resumed[0].1, Some(now + 2 * 3_600_000));
        assert!(later[0] > 5_000_000.0 && later[0] < 5_000_000.0 + METER_MAX_RATE);
        // The meter never saved starts where its model starts.
        assert_eq!(
            counters_at(&resumed[1].1, None),
            counters_at(&meters(now + 3_600_000, &Registers::empty()).1[1].1, None)
        );
    }

    /// The file a `kill -9` would leave, after a look at `at` (Unix ms) on meters started a
    /// minute before.
    fn reservation_at(at: i64) -> (Registers, [f64; WE515_COUNTERS]) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meter-registers");
        let mut r = Registers::open(&path).unwrap();
        let (_, handles) = meters(at - 60_000, &r);
        cover(&handles, &mut r, at).unwrap();
        let served = counters_at(&handles[0].1, None);
        (Registers::open(&path).unwrap(), served)
    }

    #[test]
    fn a_reservation_covers_the_tariff_in_use_and_keeps_the_totals_adding_up() {
        let day = 1_717_250_400_000 - 1_717_250_400_000 % 86_400_000;
        let margin = METER_MAX_RATE * RESERVE.as_secs_f64() / 3600.0 / 2.0;
        // Noon: T1 in use; half a minute before 22:00: T1 now, T2 within the reservation.
        for (at, in_use) in [
            (day + 12 * 3_600_000, &[1][..]),
            (day + 22 * 3_600_000 - 30_000, &[1, 2][..]),
        ] {
            let (saved, served) = reservation_at(at);
            let g = |i: usize| saved.get(&register_key("house", i)).unwrap();
            for i in 1..=4 {
                if in_use.contains(&i) {
                    assert!(g(i) >= served[i] + margin, "T{i} reserved at {at}");
                    assert!(g(i + 5) >= served[i + 5] + margin, "reactive T{i} too");
                } else {
                    assert_eq!(g(i), served[i], "T{i}, not in use, saved as it is");
                }
            }
            assert!(g(0) >= served[0] + margin && g(5) >= served[5] + margin);
            for (total, first) in [(0, 1), (5, 6)] {
                let tariffs: f64 = (first..first + 4).map(g).sum();
                assert!(
                    (g(total) - tariffs).abs() < 1e-6,
                    "counter {total} at {at}: {} is not the sum of its tariffs {tariffs}",
                    g(total)
                );
            }
        }
    }

    #[test]
    fn a_covered_meter_is_not_written_again_and_a_failed_write_is_tried_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub").join("meter-registers");
        let mut r = Registers::open(&path).unwrap();
        let noon = 1_717_243_200_000;
        let (_, handles) = meters(noon - 60_000, &r);
        // The directory cannot be made: the write fails, and nothing counts as saved.
        std::fs::write(dir.path().join("sub"), "a file in the way").unwrap();
        assert!(cover(&handles, &mut r, noon).is_err());
        assert_eq!(r.get("house.0"), None);
        std::fs::remove_file(dir.path().join("sub")).unwrap();
        cover(&handles, &mut r, noon + 1000).unwrap();
        let written = std::fs::read_to_string(&path).unwrap();
        // A second later the reservation still covers: the file is not written again.
        std::fs::write(&path, "# sentinel\n").unwrap();
        cover(&handles, &mut r, noon + 2000).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "# sentinel\n");
        assert!(written.contains("house.0 "), "{written}");
    }

    #[test]
    fn a_total_resumed_above_its_tariffs_is_covered_on_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meter-registers");
        // A hand-edited file: the house's total far above the tariffs of a fresh model.
        std::fs::write(&path, "house.0 9000000\n").unwrap();
        let mut r = Registers::open(&path).unwrap();
        let noon = 1_717_243_200_000;
        let (_, handles) = meters(noon - 60_000, &r);
        cover(&handles, &mut r, noon).unwrap();
        let served = counters_at(&handles[0].1, Some(noon + 1_000));
        let saved = Registers::open(&path).unwrap().get("house.0").unwrap();
        assert!(served[0] >= 9_000_000.0, "{served:?}");
        assert!(saved > served[0], "{saved} does not cover {}", served[0]);
    }

    #[test]
    fn the_ports_may_not_overlap() {
        let ok = HardwareConfig::default();
        assert!(ok.check("simulator.hardware").is_ok());
        let clash = HardwareConfig {
            modbus_port: 4003,
            ..ok.clone()
        };
        let e = clash.check("simulator.hardware").unwrap_err();
        assert_eq!(e.key, "simulator.hardware.modbus_port");
        let moved = HardwareConfig {
            serial_port: 5018,
            ..ok.clone()
        };
        assert_eq!(
            moved.check("simulator.hardware").unwrap_err().key,
            "simulator.hardware.serial_port"
        );
        let zero = HardwareConfig {
            modbus_port: 0,
            ..ok.clone()
        };
        assert!(
            zero.check("s.h")
                .unwrap_err()
                .to_string()
                .contains("between 1 and 65535")
        );
        let no_room = HardwareConfig {
            serial_port: 65_533,
            ..ok
        };
        assert_eq!(
            no_room.check("simulator.hardware").unwrap_err().key,
            "simulator.hardware.serial_port"
        );
    }
}
