//! Test scaffolding that several test suites need the same way, kept once so they cannot drift.
//!
//! Brokers:
//! - [`TestBroker`]: wattbus's own broker, started inside the test process on a port of its own,
//!   with authentication and topic ACLs on and one user per client the test runs, each with the
//!   role a deployment would give it. The services' suites (serial-ingest, modbus-ingest,
//!   rms-processor) run against one, fresh per test, so `cargo test -p <service>` needs
//!   nothing outside the process. [`BrokerPlan`]: one whose port and users are known before
//!   it starts, for a service that starts before its broker.
//! - [`mosquitto`], [`mosquitto_client`] and [`LateBroker`]: mosquitto, for the interop tests
//!   only (the runtime's own tests, tests/tests): there the point is a broker nobody here
//!   wrote.
//!
//! On a broker:
//! - [`TestService`] (started by a [`ServiceBuilder`]): a service's `run_on` on a bus connection of
//!   its own, with a data directory, shutdown and health as `wattbus run` gives it; stopped
//!   cleanly or crashed.
//! - [`Watch`]: everything published on a filter, decoded, as a `reader` (Grafana,
//!   `wattbus tail`) sees it; collected until a condition holds.
//! - [`Sink`]: a sink group that acknowledges everything it receives, so producers' journals
//!   drain as they would with influx-writer behind them.
//!
//! Around them:
//! - [`seg`] and [`site`]: segments, and a site of a test's own (topics that say which test
//!   they belong to; on a shared mosquitto, what keeps tests apart).
//! - [`eventually`] (async) and [`wait_until`] (blocking): bounded polling for conditions
//!   nothing signals (a counter moving, a file appearing, a child printing a line).
//! - [`counter`]: a process-wide counter's value, for asserting what a service counted.
//! - [`Socat`]: a virtual serial cable (a socat PTY pair), as a user would make one to try a
//!   serial service without hardware.
//! - [`free_port`]: a loopback port for a server a test starts, that nothing else takes first.
//! - [`init_test_log`]: the log on stderr when `TEST_LOG` is set, silence otherwise.
//! - [`logged`] and [`capture`]: what code logged on this thread, for tests of log floods.
//!
//! Only a dev-dependency: nothing here belongs in a service binary.

// Test support: a failed setup step must panic with its reason, not return an error.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod broker;
mod log;
mod mosquitto;
mod service;
mod socat;
mod watch;

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use proto::Segment;
use runtime::telemetry::Counter;

pub use crate::broker::{BrokerPlan, Role, TestBroker, WATCH_USER};
pub use crate::log::{Log, capture, logged};
pub use crate::mosquitto::{LateBroker, mosquitto, mosquitto_client};
pub use crate::service::{ServiceBuilder, TestService};
pub use crate::socat::{Socat, SocatBuilder};
pub use crate::watch::{Sink, Watch};

/// A loopback port nothing listens on, for a server a test starts a moment later.
///
/// Not the kernel's pick (`bind` to port 0): that comes from the ephemeral range, where the
/// outgoing connections of every process on the machine take their local ports too, so one of
/// them can hold the port by the time the server binds it (a broker "did not listen" under
/// load). These come from 20000–31999, below Linux's ephemeral range (32768–60999), and one
/// process never hands out the same port twice.
///
/// # Panics
///
/// When no port in that range can be bound.
pub fn free_port() -> u16 {
    const FIRST: u32 = 20_000;
    const SPAN: u32 = 12_000;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    // Processes start at different places, so test binaries run one after another (or a
    // bench beside them) do not walk the same ports.
    let start = std::process::id().wrapping_mul(7_919) % SPAN;
    loop {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        assert!(
            n < SPAN,
            "no free loopback port left in {FIRST}..{}",
            FIRST + SPAN
        );
        let port = u16::try_from(FIRST + (start + n) % SPAN).expect("below 32000");
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// A segment from a literal; tests name devices, services and sites with known-good text.
///
/// # Panics
///
/// When `s` is not a valid segment: a typo in the test.
pub fn seg(s: &str) -> Segment {
    Segment::new(s).unwrap()
}

/// A site of the test's own, `<test>-<pid>`: tests share one broker (and test binaries run side
/// by side), and a site is what keeps their topics apart.
pub fn site(test: &str) -> Segment {
    seg(&format!("{test}-{}", std::process::id()))
}

/// Polls `cond` every 20 ms until it holds or `timeout` passes; says whether it held.
///
/// For conditions no event announces (a child process's output, a file appearing). Checks once
/// more at the deadline, so a slow poll cannot turn a success into a timeout. Blocks the thread:
/// for async tests, poll with tokio instead.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    cond()
}

/// Polls `cond` every 20 ms until it holds or `timeout` passes; says whether it held.
///
/// The async [`wait_until`], for conditions that need an `.await` (a producer's pending count)
/// or that must not block the runtime a service under test runs on. Checks once more at the
/// deadline, so a slow poll cannot turn a success into a timeout.
pub async fn eventually(timeout: Duration, mut cond: impl AsyncFnMut() -> bool) -> bool {
    let end = tokio::time::Instant::now() + timeout;
    while tokio::time::Instant::now() < end {
        if cond().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    cond().await
}

/// The value of the process-wide counter `name` with exactly these labels (0 if nothing has
/// counted it yet).
///
/// Counters are process-wide, so a test reads those whose labels are its own (its port, bus
/// or device names).
pub fn counter(name: &'static str, labels: &[(&'static str, &str)]) -> u64 {
    // The help text is the first registration's; a reader's is never shown.
    Counter::new(name, "", labels).get()
}

/// Logs to stderr at the level in `TEST_LOG` (e.g. `TEST_LOG=debug`), if set; once per
/// process. Off by default: a passing test prints nothing.
pub fn init_test_log() {
    if let Ok(level) = std::env::var("TEST_LOG") {
        // An error means it is initialised already (by an earlier test of this process).
        let _ = runtime::telemetry::init_logging(&runtime::config::LogConfig {
            level,
            ..Default::default()
        });
    }
}
