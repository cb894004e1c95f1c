//! The demo's broker: `wattbus run broker` as a child process, supervised.
//!
//! Defence in depth. In one process, a broker that fails takes every service with it (the
//! release build aborts on a panic, and a rumqttd panic once did exactly that); as a child it
//! takes only itself, and the services reconnect and replay from their journals what no sink
//! had acknowledged. So:
//!
//! - The child runs this very binary (`current_exe`) as `run broker --config <file>`, with a
//!   config generated into `<data dir>/broker/` (directory 0700, files 0600): one broker user
//!   per service, each password in a file of its own, none on a command line (`ps` shows those
//!   to every user of the machine).
//! - It is supervised: an exit the demo did not ask for is logged as ERROR with its exit status,
//!   counted (`wattbus_demo_broker_restarts_total`), and followed by a restart on the same
//!   ports after a backoff (200 ms doubling to 10 s, back to 200 ms after a minute up).
//! - It never outlives the demo. Its stdin is a pipe whose write end only the demo holds; the
//!   child stops at end of file (`--stop-on-stdin-eof`), and the kernel closes that end when the
//!   demo ends in any way, `kill -9` included. (`PR_SET_PDEATHSIG` needs `unsafe`, which the
//!   workspace forbids.) A normal stop closes the pipe itself, after the services have flushed.
//! - It runs in a process group of its own, so a Ctrl-C at the terminal reaches the demo only:
//!   the broker must stay up while the services stop through it.

use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use anyhow::Context as _;
use broker::Role;
use runtime::Secret;
use runtime::backoff::{Backoff, Retries};
use runtime::telemetry::Counter;
use tokio::process::{Child, Command};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// The demo broker's log per subscription filter: at most (count + 1) × bytes = 768 KiB. The
/// busiest filter, the CT sensors' raw frames (~70 KB/s), keeps about 10 s of them.
const SEGMENT_BYTES: usize = 256 * 1024;
const SEGMENT_COUNT: usize = 2;

/// Pause before restarting a broker that exited: 200 ms, doubling per quick failure to 10 s.
const RESTART: Backoff = Backoff::constant(Duration::from_millis(200), Duration::from_secs(10));
/// A broker up this long has recovered: the next failure restarts it after 200 ms again.
const HEALTHY_AFTER: Duration = Duration::from_secs(60);
/// How long the broker gets to exit once its stdin is closed.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a first start may take to listen.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// One broker user of the demo and its generated password.
#[derive(Debug, Clone)]
pub struct Login {
    /// The service's client id; for a sink, its sink group.
    pub name: String,
    pub role: Role,
    pub password: Secret,
}

impl Login {
    pub fn generate(name: &str, role: Role) -> anyhow::Result<Self> {
        Ok(Self {
            name: name.to_string(),
            role,
            password: Secret::new(password()?),
        })
    }
}

/// 128 random bits from the kernel, as hex: a password nobody chooses and nobody needs to type.
fn password() -> anyhow::Result<String> {
    let mut bytes = [0u8; 16];
    std::io::Read::read_exact(
        &mut std::fs::File::open("/dev/urandom").context("cannot open /dev/urandom")?,
        &mut bytes,
    )
    .context("cannot read /dev/urandom")?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Where the broker listens.
#[derive(Debug, Clone, Copy)]
pub struct Ports {
    pub mqtt: u16,
    /// MQTT 5, on loopback: the `[broker]` section cannot switch it off yet.
    pub mqtt_v5: u16,
    pub health: u16,
}

/// The running child and its supervisor.
#[derive(Debug)]
pub struct Supervised {
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

impl Supervised {
    /// Write the config into `dir`, start the broker, and return once it accepts
    /// connections; from then on it is restarted whenever it exits.
    pub async fn start(dir: &Path, ports: Ports, users: &[Login]) -> anyhow::Result<Self> {
        let config = write_config(dir, ports, users)?;
        let exe = std::env::current_exe().context("cannot find the wattbus binary")?;
        let mut child = spawn(&exe, &config)?;
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if healthy(ports.health).await {
                break;
            }
            if let Some(status) = child.try_wait().context("cannot watch the broker")? {
                anyhow::bail!(
                    "the demo's broker exited ({status}) before listening on 127.0.0.1:{} \
                     (its own error is above)",
                    ports.mqtt
                );
            }
            if Instant::now() > deadline {
                anyhow::bail!(
                    "the demo's broker was not ready (127.0.0.1:{}, /healthz on {}) within {START_TIMEOUT:?}",
                    ports.mqtt,
                    ports.health
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(supervise(exe, config, child, stopped));
        Ok(Self { stop, task })
    }

    /// Stop the broker (close its stdin, wait, kill if it does not go) and its supervisor.
    pub async fn stop(self) {
        // An error means the supervisor already ended; nothing left to stop.
        let _already_ended = self.stop.send(());
        if let Err(e) = self.task.await {
            tracing::warn!(error = %runtime::telemetry::chain(&e), "The broker's supervisor ended abnormally.");
        }
    }
}

/// Whether the broker's `/healthz` answers 200: every listener accepts connections. (Probing
/// the MQTT port itself would do, but rumqttd logs each probe as a failed connection.)
async fn healthy(port: u16) -> bool {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let probe = async {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            .await?;
        let mut status = [0u8; 12];
        s.read_exact(&mut status).await?;
        std::io::Result::Ok(status.ends_with(b" 200"))
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(1), probe).await,
        Ok(Ok(true))
    )
}

fn restarts() -> Counter {
    Counter::new(
        "wattbus_demo_broker_restarts_total",
        "Times the demo restarted its broker after it exited unasked.",
        &[],
    )
}

async fn supervise(exe: PathBuf, config: PathBuf, first: Child, mut stop: oneshot::Receiver<()>) {
    let restarts = restarts();
    let mut restart = Retries::new(RESTART);
    let mut child = Some(first);
    loop {
        let mut running = match child.take() {
            Some(c) => c,
            None => match spawn(&exe, &config) {
                Ok(c) => c,
                Err(e) => {
                    let backoff = restart.failed_exactly();
                    tracing::error!(error = %runtime::telemetry::chain(e.as_ref()), retry_ms = backoff.as_millis() as u64, "Cannot start the demo's broker; services wait for it.");
                    tokio::select! {
                        _ = &mut stop => return,
                        () = tokio::time::sleep(backoff) => {}
                    }
                    continue;
                }
            },
        };
        // Held here, not in `running`: `Child::wait` closes the stdin it holds before waiting,
        // which the broker would take as the demo's end.
        let stdin = running.stdin.take();
        let started = Instant::now();
        tokio::select! {
            status = running.wait() => {
                drop(stdin);
                if started.elapsed() >= HEALTHY_AFTER {
                    restart.succeeded();
                }
                let backoff = restart.failed_exactly();
                restarts.inc();
                tracing::error!(
                    status = %describe(status),
                    up_s = started.elapsed().as_secs(),
                    restart_in_ms = backoff.as_millis() as u64,
                    "The demo's broker exited; restarting it. The services reconnect and replay what no sink has acknowledged."
                );
                tokio::select! {
                    _ = &mut stop => return,
                    () = tokio::time::sleep(backoff) => {}
                }
            }
            _ = &mut stop => {
                drop(stdin);
                stop_child(running).await;
                return;
            }
        }
    }
}

/// Wait for the child whose stdin was just closed; kill it if it does not stop in time.
async fn stop_child(mut child: Child) {
    match tokio::time::timeout(STOP_TIMEOUT, child.wait()).await {
        Ok(Ok(status)) if status.success() => {}
        Ok(status) => {
            tracing::warn!(status = %describe(status), "The demo's broker stopped with an error.");
        }
        Err(_) => {
            tracing::warn!(
                timeout_s = STOP_TIMEOUT.as_secs(),
                "The demo's broker did not stop in time; killing it."
            );
            if let Err(e) = child.kill().await {
                tracing::warn!(error = %runtime::telemetry::chain(&e), "Cannot kill the demo's broker.");
            }
        }
    }
}

fn describe(status: std::io::Result<ExitStatus>) -> String {
    match status {
        Ok(s) => s.to_string(),
        Err(e) => format!("unknown ({e})"),
    }
}

fn spawn(exe: &Path, config: &Path) -> anyhow::Result<Child> {
    let mut cmd = Command::new(exe);
    cmd.args(["run", "broker", "--stop-on-stdin-eof", "--config"])
        .arg(config)
        // Held open by the demo and never written: its end of file is the signal to stop.
        .stdin(Stdio::piped())
        // The demo's stdout is the console; the broker's log lines go to stderr with the demo's.
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .process_group(0)
        .kill_on_drop(true);
    // The generated file is the whole configuration: a WATTBUS_* override meant for the demo
    // (or left in the shell) must not reconfigure the broker behind it.
    for (key, _) in std::env::vars_os() {
        if key
            .to_str()
            .is_some_and(|k| k.starts_with(runtime::config::ENV_PREFIX))
        {
            cmd.env_remove(key);
        }
    }
    cmd.spawn()
        .with_context(|| format!("cannot start {} run broker", exe.display()))
}

/// The broker's config file (and a password file per user) in `dir`; returns its path.
fn write_config(dir: &Path, ports: Ports, users: &[Login]) -> anyhow::Result<PathBuf> {
    let secrets = dir.join("users");
    for d in [dir, &secrets] {
        private_dir(d)?;
    }
    let mut text = format!(
        "# Generated by `wattbus demo` for its broker; rewritten at every start.\n\
         [log]\n\
         level = \"warn,rumqttd=off\"\n\
         [broker]\n\
         listen = \"127.0.0.1:{mqtt}\"\n\
         # MQTT 5 for tools that need it, on loopback only.\n\
         listen_v5 = \"127.0.0.1:{v5}\"\n\
         health_listen = \"127.0.0.1:{health}\"\n\
         # The router keeps up to (segment_count + 1) x segment_bytes per subscription filter.\n\
         # The demo's sinks keep up within seconds and the journals replay anything older, so\n\
         # a small log does; with the defaults (5 MiB a filter) the readings' log alone took\n\
         # over ten minutes to fill, and the broker's memory grew all that time.\n\
         segment_bytes = {SEGMENT_BYTES}\n\
         segment_count = {SEGMENT_COUNT}\n",
        mqtt = ports.mqtt,
        v5 = ports.mqtt_v5,
        health = ports.health,
    );
    for user in users {
        let file = secrets.join(&user.name);
        private_file(&file, user.password.expose())?;
        let role = format!("role = \"{}\"\n", user.role.as_str());
        text.push_str(&format!(
            "[[broker.users]]\nusername = {}\npassword_file = {}\n{role}",
            toml_string(&user.name),
            toml_string(path_text(&file)?),
        ));
    }
    let config = dir.join("broker.toml");
    private_file(&config, &text)?;
    Ok(config)
}

/// A TOML basic string: JSON's escapes are all TOML escapes too.
fn toml_string(s: &str) -> String {
    serde_json::Value::from(s).to_string()
}

fn path_text(p: &Path) -> anyhow::Result<&str> {
    p.to_str()
        .with_context(|| format!("{} is not valid UTF-8", p.display()))
}

/// A directory only its owner can enter (0700), made if needed.
fn private_dir(dir: &Path) -> anyhow::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("cannot create {}", dir.display()))?;
    // It may have existed with other permissions (a --data-dir from before).
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("cannot make {} private", dir.display()))
}

/// `text` into `path`, readable by its owner only (0600) from the moment it exists.
fn private_file(path: &Path, text: &str) -> anyhow::Result<()> {
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(path)?;
        // A file from before keeps its mode through `open`; make it private too.
        f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        f.write_all(text.as_bytes())?;
        f.sync_all()
    };
    write().with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_config_is_private_valid_and_holds_no_password() {
        let dir = tempfile::tempdir().unwrap();
        let broker_dir = dir.path().join("broker \"quoted\"");
        let users = [
            Login::generate("serial-ingest", Role::Producer).unwrap(),
            Login::generate("influx-writer", Role::Sink).unwrap(),
        ];
        let ports = Ports {
            mqtt: 18830,
            mqtt_v5: 18840,
            health: 19100,
        };
        let path = write_config(&broker_dir, ports, &users).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&broker_dir), 0o700);
        assert_eq!(mode(&broker_dir.join("users")), 0o700);
        assert_eq!(mode(&path), 0o600);
        let text = std::fs::read_to_string(&path).unwrap();
        for u in &users {
            assert!(!text.contains(u.password.expose()), "{text}");
            let file = broker_dir.join("users").join(&u.name);
            assert_eq!(mode(&file), 0o600);
            assert_eq!(std::fs::read_to_string(file).unwrap(), u.password.expose());
        }
        // What `wattbus run broker` will load.
        let src = runtime::ConfigSource::from_parts(Some(path), None).unwrap();
        let cfg: broker::Config = src.section("broker").unwrap();
        assert_eq!(cfg.listen.to_string(), "127.0.0.1:18830");
        assert_eq!((cfg.segment_bytes, cfg.segment_count), (262_144, 2));
        assert_eq!(cfg.users.len(), 2);
        assert!(text.contains("role = \"producer\""), "{text}");
    }
}
