//! mosquitto, for the interop tests: the runtime against a broker nobody here wrote.
//!
//! The service suites run against wattbus's own broker in-process ([`crate::TestBroker`]); the
//! runtime's delivery tests and the end-to-end interop tests keep mosquitto, because what they
//! check is that the runtime works with what users may run instead of ours.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use proto::Segment;
use runtime::bus::{Bus, Identity};
use runtime::config::BusConfig;
use runtime::{Health, Secret};
use tokio::task::JoinHandle;

use crate::{free_port, seg, wait_until};

/// The bus config for the mosquitto under test: `MOSQUITTO_TEST_BROKER`
/// (`host:port:user:password`, exported by tests/run.sh), or else a mosquitto of this test
/// process's own ([`own_mosquitto`]), so `cargo test -p runtime` passes on its own wherever
/// mosquitto is installed.
///
/// A real broker nobody here wrote, so the runtime is tested against what users run. Everything
/// else is the default; a test that needs other settings (faster reconnects, say) overrides them
/// with `BusConfig { .., ..mosquitto() }`.
///
/// # Panics
///
/// When the variable is not of that form, or it is not set and mosquitto cannot be started.
pub fn mosquitto() -> BusConfig {
    let Ok(spec) = std::env::var("MOSQUITTO_TEST_BROKER") else {
        return BusConfig {
            host: "127.0.0.1".into(),
            port: own_mosquitto(),
            ..BusConfig::default()
        };
    };
    let p: Vec<&str> = spec.split(':').collect();
    assert!(
        p.len() == 4,
        "MOSQUITTO_TEST_BROKER={spec:?} is not host:port:user:password"
    );
    BusConfig {
        host: p[0].into(),
        port: p[1]
            .parse()
            .expect("MOSQUITTO_TEST_BROKER: the port is not a number"),
        username: Some(p[2].into()),
        password: Some(Secret::new(p[3])),
        ..BusConfig::default()
    }
}

/// The port of a mosquitto this test process started (once, on first use): anonymous,
/// loopback only, no persistence. It ends with the process: a shell holds the read end of a
/// pipe whose write end only this process has, and stops mosquitto (and removes its config)
/// once the pipe closes, however the process ended.
///
/// # Panics
///
/// When mosquitto is not installed or does not listen within 10 s.
pub fn own_mosquitto() -> u16 {
    static OWN: std::sync::OnceLock<(u16, std::sync::Mutex<Child>)> = std::sync::OnceLock::new();
    OWN.get_or_init(|| {
        let port = free_port();
        let dir = tempfile::tempdir().unwrap().keep();
        let conf = dir.join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nuser {}\n",
                current_user()
            ),
        )
        .unwrap();
        let child = Command::new("sh")
            .arg("-c")
            .arg(r#""$0" -c "$1" & m=$!; read _; kill $m; rm -rf "$2""#)
            .arg(mosquitto_bin())
            .arg(&conf)
            .arg(&dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("cannot run sh");
        let listening = wait_until(Duration::from_secs(10), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        assert!(
            listening,
            "mosquitto did not listen on port {port} within 10 s"
        );
        (port, std::sync::Mutex::new(child))
    })
    .0
}

fn current_user() -> String {
    Command::new("id")
        .arg("-un")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

fn mosquitto_bin() -> &'static str {
    ["mosquitto", "/usr/sbin/mosquitto"]
        .into_iter()
        .find(|b| Command::new(b).arg("-h").output().is_ok())
        .expect("mosquitto is not installed (tests/run.sh installs it; or `apt install mosquitto`)")
}

/// A connection to the mosquitto under test as `service`, connected, with the client id
/// `<name>-<site>`: tests share that mosquitto, and a client id in use by another test would
/// take over its connection.
///
/// # Panics
///
/// As [`mosquitto`], or when it is not connected within 10 s.
pub async fn mosquitto_client(site: &Segment, service: &str, name: &str) -> (Bus, JoinHandle<()>) {
    let id = Identity {
        service: seg(service),
        instance: seg(&format!("{name}-{site}")),
    };
    let (bus, task) =
        Bus::connect(&mosquitto(), site, &id, &Health::default()).expect("a valid bus config");
    assert!(
        bus.wait_connected(Duration::from_secs(10)).await,
        "cannot reach mosquitto"
    );
    (bus, task)
}

/// A mosquitto of a test's own, started on a port picked before it runs ([`LateBroker::port`]),
/// so a service can be started first and find no broker, as on a Pi where the broker's
/// container comes up last. Anonymous, loopback only, no persistence. Killed on drop.
pub struct LateBroker {
    child: Child,
    _dir: tempfile::TempDir,
}

impl LateBroker {
    /// A loopback port nothing listens on (yet).
    ///
    /// # Panics
    ///
    /// When no port can be bound.
    pub fn port() -> u16 {
        free_port()
    }

    /// The bus config for a broker on `port`, retrying fast (50–500 ms) so a test does not
    /// wait out the default backoff once the broker is there.
    pub fn bus(port: u16) -> BusConfig {
        BusConfig {
            host: "127.0.0.1".into(),
            port,
            reconnect_min_ms: 50,
            reconnect_max_ms: 500,
            ..BusConfig::default()
        }
    }

    /// Starts mosquitto on `port` and waits (up to 10 s) until it accepts connections.
    ///
    /// # Panics
    ///
    /// When mosquitto cannot be run (tests/run.sh installs it) or does not listen in time.
    pub fn start(port: u16) -> LateBroker {
        let dir = tempfile::tempdir().unwrap();
        let user = current_user();
        let conf = dir.path().join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nuser {user}\n"
            ),
        )
        .unwrap();
        let child = Command::new(mosquitto_bin())
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("cannot run mosquitto");
        let mut broker = LateBroker { child, _dir: dir };
        let listening = wait_until(Duration::from_secs(10), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        if !listening {
            broker.kill();
            panic!("mosquitto did not listen on port {port} within 10 s");
        }
        broker
    }

    fn kill(&mut self) {
        // Errors mean it is gone already.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for LateBroker {
    fn drop(&mut self) {
        self.kill();
    }
}
