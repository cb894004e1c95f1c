//! Virtual serial cables (socat PTY pairs).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::wait_until;

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
