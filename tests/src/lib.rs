//! Harness for end-to-end tests: real processes, real ports, real kills.
//!
//! Tests start the `wattbus` binary and the `probe` binary as child processes, so that a
//! `kill -9` is a real crash, and talk to real brokers (ours, and mosquitto for interop).

// Test harness: a failure to set up a test should panic with its reason.
#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod iothub;
pub mod receiver;
pub mod servers;

use std::io::Write as _;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The `wattbus` binary of this workspace (built by `cargo build`, which the test command runs
/// first; `cargo test` alone does not build other packages' binaries).
pub fn wattbus_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    // target/<profile>/deps/<test> → target/<profile>/wattbus; a bench binary of this
    // package sits beside it (target/<profile>/<bench>).
    let mut dir = exe.parent().expect("target dir");
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir = dir.parent().expect("target dir");
    }
    let bin = dir.join("wattbus");
    assert!(
        bin.is_file(),
        "{} is missing: run `cargo build -p wattbus` first (tests/run.sh does)",
        bin.display()
    );
    bin
}

pub use wattbus_testkit::free_port;

/// Poll `cond` every 20 ms until it holds or `timeout` passes.
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

/// Wait until a probe consumer's log says its subscriptions are confirmed.
pub fn wait_subscribed(log: &Path) -> bool {
    wait_until(Duration::from_secs(30), || {
        std::fs::read_to_string(log).is_ok_and(|t| t.contains("{\"subscribed\":true}"))
    })
}

pub fn port_open(port: u16) -> bool {
    TcpStream::connect(("127.0.0.1", port)).is_ok()
}

/// A child process, killed when dropped.
#[derive(Debug)]
pub struct Proc {
    pub name: String,
    child: Child,
}

impl Proc {
    pub fn spawn(name: &str, cmd: &mut Command, log: &Path) -> Proc {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("log file");
        let err = out.try_clone().expect("log file");
        let child = cmd
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Proc {
            name: name.to_string(),
            child,
        }
    }

    /// Its process id (for `/proc/<pid>/…`).
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// A crash: SIGKILL, no chance to flush.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// A polite stop: SIGTERM, then wait for the exit status.
    pub fn terminate(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        self.wait(timeout)
    }

    pub fn wait(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.is_running() {
            self.kill9();
        }
    }
}

/// A broker config for tests: one user, v4 (and optionally v5) on loopback, no health port.
pub struct BrokerSetup {
    pub port: u16,
    pub port_v5: u16,
    pub user: String,
    pub password: String,
    pub config: PathBuf,
}

impl BrokerSetup {
    pub fn new(dir: &Path) -> BrokerSetup {
        let (port, port_v5) = (free_port(), free_port());
        let password = "correct-horse-battery".to_string();
        let secret = dir.join("broker-password");
        std::fs::write(&secret, format!("{password}\n")).expect("write secret");
        let config = dir.join("broker.toml");
        let mut f = std::fs::File::create(&config).expect("config");
        writeln!(
            f,
            "data_dir = \"{data}\"\n[log]\nlevel = \"info,rumqttd=warn\"\n[broker]\nlisten = \"127.0.0.1:{port}\"\nlisten_v5 = \"127.0.0.1:{port_v5}\"\nhealth_listen = \"127.0.0.1:{health}\"\n[[broker.users]]\nusername = \"probe\"\npassword_file = \"{secret}\"\nrole = \"admin\"\n",
            data = dir.display(),
            health = free_port(),
            secret = secret.display()
        )
        .expect("config");
        BrokerSetup {
            port,
            port_v5,
            user: "probe".into(),
            password,
            config,
        }
    }

    /// A config for services on this broker: site `lab`, data under `dir`, the bus user, the
    /// simulator's health port free. `extra` is added to the `[log]`, `[bus]` and `[simulator]`
    /// sections, in that order.
    pub fn service_config(&self, dir: &Path, extra: [&str; 3]) -> PathBuf {
        let path = dir.join("service.toml");
        let text = format!(
            "site = \"lab\"\ndata_dir = \"{data}\"\n[log]\n{log}\n[bus]\nport = {port}\nusername = \"{user}\"\npassword_file = \"{secret}\"\n{bus}\n[simulator]\nhealth_listen = \"127.0.0.1:{health}\"\n{sim}\n",
            data = dir.display(),
            log = extra[0],
            port = self.port,
            user = self.user,
            secret = dir.join("broker-password").display(),
            bus = extra[1],
            health = free_port(),
            sim = extra[2],
        );
        std::fs::write(&path, text).expect("write service config");
        path
    }

    pub fn start(&self, log: &Path) -> Proc {
        let mut p = Proc::spawn(
            "broker",
            Command::new(wattbus_bin())
                .args(["run", "broker", "--config"])
                .arg(&self.config),
            log,
        );
        let up = wait_until(Duration::from_secs(30), || {
            port_open(self.port) || !p.is_running()
        }) && port_open(self.port);
        assert!(
            up,
            "broker did not listen on {} ({}); its log:\n{}",
            self.port,
            if p.is_running() {
                "still running"
            } else {
                "exited"
            },
            std::fs::read_to_string(log).unwrap_or_default()
        );
        p
    }
}

/// Run `cmd` to its end; it must succeed (its stderr is the failure message).
pub fn run_ok(cmd: &mut std::process::Command) -> std::process::Output {
    let out = cmd.output().expect("the command could not be started");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A tmpfs mounted for a test (a small disk to fill), unmounted (lazily: a killed child may
/// hold a file) on drop. Needs root, or a user and mount namespace (`unshare -m
/// --map-root-user`, see tests/tests/full_disk.rs).
pub struct Tmpfs(PathBuf);

impl Tmpfs {
    pub fn mount(at: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(at).expect("mount point");
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0755")])
            .arg("wattbus-full-disk")
            .arg(at)
            .output()
            .expect("cannot run mount");
        assert!(
            out.status.success(),
            "cannot mount a tmpfs at {}: {} (a full-disk test needs root, or a kernel that \
             allows mounts in user namespaces)",
            at.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs(at.to_path_buf())
    }

    /// More room: the disk after someone freed space.
    pub fn resize(&self, size: &str) {
        let out = Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.0)
            .output()
            .expect("cannot run mount");
        assert!(
            out.status.success(),
            "remount: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        // Nothing to do if it fails: the mount namespace or the temp dir goes away anyway.
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// For a test that mounts a [`Tmpfs`]: as root, `false` (go on). Otherwise the test binary
/// runs `test` again in a user and mount namespace (`unshare -m --map-root-user`), where the
/// mount is allowed, asserts that it passed there, and returns `true` (the caller returns).
/// `marker` is an environment variable (not `WATTBUS_…`: children would read it as config)
/// that tells the re-run it is the re-run.
pub fn rerun_in_mount_namespace(test: &str, marker: &str) -> bool {
    if is_root() || std::env::var_os(marker).is_some() {
        return false;
    }
    let status = Command::new("unshare")
        .args(["-m", "--map-root-user"])
        .arg(std::env::current_exe().expect("test binary"))
        .args(["--exact", test, "--nocapture"])
        .env(marker, "1")
        .status()
        .expect("not root, and cannot run `unshare -m --map-root-user` to get a mount namespace");
    assert!(status.success(), "{test} failed in its namespace: {status}");
    true
}

pub fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// A line of `/proc/<pid>/status` in kB (`VmRSS:`, `VmHWM:`), for the benchmarks.
pub fn status_kb(pid: u32, key: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with(key))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// CPU time (user + system) a process used so far, in seconds, for the benchmarks.
pub fn cpu_seconds(pid: u32) -> f64 {
    let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the command name (which may hold spaces) in parentheses.
    let rest = s.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = [11, 12]
        .iter()
        .filter_map(|&i| f.get(i).and_then(|v| v.parse::<f64>().ok()))
        .sum();
    ticks / 100.0
}
