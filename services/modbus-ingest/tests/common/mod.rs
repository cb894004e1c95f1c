//! Helpers shared by the service tests: the broker (mosquitto, started by tests/run.sh:
//! MOSQUITTO_TEST_BROKER=host:port:user:password) and the socat PTY pair come from
//! wattbus-testkit; here: a PTY pair set up for this service, the service run on its own bus
//! connection, and a watch on everything published for a site.
// Each test binary uses its own subset of these.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use modbus_ingest::{Config, SECTION};
use proto::{Filter, Measurement, Payload, Segment};
use runtime::bus::{Bus, Identity, Message, Overflow, QoS};
use runtime::config::Common;
use runtime::shutdown::ShutdownTrigger;
use runtime::telemetry::Counter;
use runtime::{ConfigSource, Context, Health};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use wattbus_testkit::{Socat, mosquitto, seg};

/// A PTY pair for an RTU bus: `dev()` for the service, `sim()` for the Modbus peer.
///
/// ignoreeof on the service's end: the service closes and reopens its end to resync after
/// garbage; socat must not take that close for the end of the line.
pub fn rtu_pty(dir: &std::path::Path) -> Socat {
    Socat::builder(dir, "rtu").ignoreeof().start()
}

/// The service, running on its own bus connection.
pub struct Service {
    trigger: ShutdownTrigger,
    task: JoinHandle<Result<(), modbus_ingest::Error>>,
    _data: tempfile::TempDir,
}

impl Service {
    pub async fn start(site: &Segment, toml_text: &str) -> Service {
        Service::start_on(site, toml_text, mosquitto(), true).await
    }

    /// Starts the service on the broker `bus` describes; with `connected`, only once the
    /// connection is up (else at once, as a service on a Pi whose broker comes up later).
    pub async fn start_on(
        site: &Segment,
        toml_text: &str,
        bus_cfg: runtime::config::BusConfig,
        connected: bool,
    ) -> Service {
        if let Ok(level) = std::env::var("TEST_LOG") {
            let _ = runtime::telemetry::init_logging(&runtime::config::LogConfig {
                level,
                ..Default::default()
            });
        }
        let config: Config = ConfigSource::from_parts(None, Some(toml_text))
            .unwrap()
            .section(SECTION)
            .unwrap();
        let mut plan = config.resolve(SECTION).unwrap();
        plan.instance = seg(&format!("mi-{site}"));
        let (bus, bus_task) = Bus::connect(
            &bus_cfg,
            site,
            &modbus_ingest::identity(&plan),
            &Health::default(),
        )
        .unwrap();
        if connected {
            assert!(bus.wait_connected(Duration::from_secs(10)).await);
        }
        let data = tempfile::tempdir().unwrap();
        let (trigger, shutdown) = runtime::shutdown::channel();
        let ctx = Context {
            common: Common {
                site: site.clone(),
                data_dir: data.path().to_path_buf(),
                bus: bus_cfg,
                ..Common::default()
            },
            health: Health::default(),
            shutdown,
        };
        let task = tokio::spawn(async move {
            let r = modbus_ingest::run_on(&bus, &plan, &ctx).await;
            bus.close(bus_task).await;
            r
        });
        Service {
            trigger,
            task,
            _data: data,
        }
    }

    pub async fn stop(self) {
        self.trigger.fire();
        let r = tokio::time::timeout(Duration::from_secs(5), self.task)
            .await
            .expect("modbus-ingest did not stop within 5 s of shutdown");
        r.unwrap().unwrap();
    }
}

/// Every measurement published for `site`.
pub struct Watch {
    rx: mpsc::Receiver<Message>,
    _bus: (Bus, JoinHandle<()>),
}

impl Watch {
    pub async fn new(site: &Segment) -> Watch {
        let id = Identity {
            service: seg("test"),
            instance: seg(&format!("watch-{site}")),
        };
        let (bus, task) = Bus::connect(&mosquitto(), site, &id, &Health::default()).unwrap();
        assert!(bus.wait_connected(Duration::from_secs(10)).await);
        let filter = Filter::measurements(Some(site), None);
        let rx = bus.subscribe(
            filter.as_str().to_string(),
            QoS::AtLeastOnce,
            Overflow::Wait,
        );
        assert!(bus.wait_subscribed(Duration::from_secs(10)).await);
        Watch {
            rx,
            _bus: (bus, task),
        }
    }

    /// Collects until `done` holds, or fails after `wait`.
    pub async fn until(
        &mut self,
        wait: Duration,
        mut done: impl FnMut(&[Measurement]) -> bool,
    ) -> Vec<Measurement> {
        let until = tokio::time::Instant::now() + wait;
        let mut got = Vec::new();
        while !done(&got) {
            let left = until.saturating_duration_since(tokio::time::Instant::now());
            match tokio::time::timeout(left, self.rx.recv()).await {
                Ok(Some(msg)) => got.push(Measurement::decode(&msg.payload).unwrap()),
                _ => panic!("condition not met within {wait:?}; got {got:#?}"),
            }
        }
        got
    }

    /// Everything that arrives within `wait`.
    pub async fn during(&mut self, wait: Duration) -> Vec<Measurement> {
        let until = tokio::time::Instant::now() + wait;
        let mut got = Vec::new();
        while let Ok(Some(msg)) = tokio::time::timeout_at(until, self.rx.recv()).await {
            got.push(Measurement::decode(&msg.payload).unwrap());
        }
        got
    }
}

pub fn is(m: &Measurement, device: &str, measurement: &str, channel: &str) -> bool {
    m.device.as_str() == device
        && m.measurement.as_str() == measurement
        && m.channel.as_str() == channel
        && m.tags.is_empty()
}

pub fn count(got: &[Measurement], device: &str, measurement: &str, channel: &str) -> usize {
    got.iter()
        .filter(|m| is(m, device, measurement, channel))
        .count()
}

pub fn counter(name: &'static str, bus: &str, device: &str) -> u64 {
    Counter::new(name, "test", &[("bus", bus), ("device", device)]).get()
}

pub fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-9
}
