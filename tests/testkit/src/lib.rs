//! Test scaffolding that several test suites need the same way, kept once so they cannot drift.
//!
//! - [`mosquitto`]: the broker every bus test talks to, the mosquitto that tests/run.sh starts.
//! - [`seg`] and [`site`]: segments, and a site of a test's own so tests sharing that broker
//!   never see each other's messages.
//! - [`wait_until`]: bounded polling for conditions nothing signals (a file appearing, a child
//!   printing a line).
//! - [`Socat`]: a virtual serial cable (a socat PTY pair), as a user would make one to try a
//!   serial service without hardware.
//! - [`free_port`]: a loopback port for a server a test starts, that nothing else takes first.
//! - [`LateBroker`]: a mosquitto of a test's own on a port chosen before it runs, for a service
//!   that starts before its broker.
//!
//! Only a dev-dependency: nothing here belongs in a service binary.

// Test support: a failed setup step must panic with its reason, not return an error.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use proto::Segment;
use runtime::Secret;
use runtime::config::BusConfig;

/// The bus config for the mosquitto under test, from `MOSQUITTO_TEST_BROKER`
/// (`host:port:user:password`, exported by tests/run.sh).
///
/// A real broker nobody here wrote, so the runtime is tested against what users run. Everything
/// else is the default; a test that needs other settings (faster reconnects, say) overrides them
/// with `BusConfig { .., ..mosquitto() }`.
///
/// # Panics
///
/// When the variable is not set or not of that form: the suite was not started by tests/run.sh.
pub fn mosquitto() -> BusConfig {
    let spec = std::env::var("MOSQUITTO_TEST_BROKER").expect(
        "MOSQUITTO_TEST_BROKER is not set: run the suite with tests/run.sh, which starts mosquitto",
    );
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
        let user = Command::new("id")
            .arg("-un")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default();
        let conf = dir.path().join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nuser {user}\n"
            ),
        )
        .unwrap();
        let bin = ["mosquitto", "/usr/sbin/mosquitto"]
            .into_iter()
            .find(|b| Command::new(b).arg("-h").output().is_ok())
            .expect("mosquitto is not installed (tests/run.sh installs it)");
        let child = Command::new(bin)
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

/// A virtual serial cable: a PTY pair made by socat, with links `<dir>/<name>-dev` (the end a
/// service opens, as it would open `/dev/ttyACM0`) and `<dir>/<name>-sim` (the end a simulated
/// device or test plays on).
///
/// Killing it is pulling the plug: both PTYs go away at once. It is killed (and its links
/// removed) on drop, so a failed test leaves no socat behind.
pub struct Socat {
    /// `None` once killed: [`Socat::kill`] acts once, because by a second call a replacement
    /// pair may own the same link names.
    child: Option<Child>,
    dev: PathBuf,
    sim: PathBuf,
}

/// Options for a [`Socat`] pair; from [`Socat::builder`].
pub struct SocatBuilder {
    dev: PathBuf,
    sim: PathBuf,
    /// socat's `ignoreeof` on the service's end.
    ignoreeof: bool,
}

impl SocatBuilder {
    /// Sets `ignoreeof` on the service's end: for a service that closes and reopens its port
    /// (to resync after garbage), which socat would otherwise take for the end of the line.
    pub fn ignoreeof(mut self) -> SocatBuilder {
        self.ignoreeof = true;
        self
    }

    /// Runs socat and waits (up to 10 s) until both links point at their PTYs.
    ///
    /// # Panics
    ///
    /// When socat cannot be run or does not make its links in time.
    pub fn start(self) -> Socat {
        let dev_opts = if self.ignoreeof {
            "pty,raw,echo=0,ignoreeof"
        } else {
            "pty,raw,echo=0"
        };
        let child = Command::new("socat")
            .args(["-d", "-d"])
            .arg(format!("{dev_opts},link={}", self.dev.display()))
            .arg(format!("pty,raw,echo=0,link={}", self.sim.display()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("cannot run socat: install it (apt-get install socat; tests/run.sh checks)");
        let mut socat = Socat {
            child: Some(child),
            dev: self.dev,
            sim: self.sim,
        };
        // socat says nothing useful on stdout: its links appearing is the only signal. `exists`
        // follows the link, so a stale link from an earlier pair does not count.
        if !wait_until(Duration::from_secs(10), || {
            socat.dev.exists() && socat.sim.exists()
        }) {
            socat.kill();
            panic!(
                "socat did not create {:?} and {:?} within 10 s",
                socat.dev, socat.sim
            );
        }
        socat
    }
}

impl Socat {
    /// A pair linked as `<dir>/<name>-dev` and `<dir>/<name>-sim`, with default options.
    ///
    /// # Panics
    ///
    /// As [`SocatBuilder::start`].
    pub fn start(dir: &Path, name: &str) -> Socat {
        Socat::builder(dir, name).start()
    }

    /// Options for a pair linked as `<dir>/<name>-dev` and `<dir>/<name>-sim`.
    pub fn builder(dir: &Path, name: &str) -> SocatBuilder {
        SocatBuilder {
            dev: dir.join(format!("{name}-dev")),
            sim: dir.join(format!("{name}-sim")),
            ignoreeof: false,
        }
    }

    /// The service's end.
    pub fn dev(&self) -> &Path {
        &self.dev
    }

    /// The device's end.
    pub fn sim(&self) -> &Path {
        &self.sim
    }

    /// The service's end as text, for configs and metric labels.
    pub fn dev_str(&self) -> String {
        self.dev.display().to_string()
    }

    /// The device's end as text, for configs and command lines.
    pub fn sim_str(&self) -> String {
        self.sim.display().to_string()
    }

    /// The device's end opened read-write as a plain file, for playing a device byte by byte.
    ///
    /// # Panics
    ///
    /// When it cannot be opened (killed already, say).
    pub fn sim_file(&self) -> File {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&self.sim)
            .unwrap_or_else(|e| panic!("cannot open {:?}: {e}", self.sim))
    }

    /// Pulls the plug: kills socat and removes its links, so both ends read EIO or end of file
    /// from now on. Acts once only: by a second call a replacement pair may have the same links.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            // Errors mean it is gone already, which is what we want.
            let _ = child.kill();
            let _ = child.wait();
            let _ = std::fs::remove_file(&self.dev);
            let _ = std::fs::remove_file(&self.sim);
        }
    }
}

impl Drop for Socat {
    fn drop(&mut self) {
        self.kill();
    }
}
