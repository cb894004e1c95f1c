//! A service under test, run as `wattbus run <service>` runs it.

use std::fmt::Debug;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use proto::Segment;
use runtime::bus::{Bus, Identity};
use runtime::config::{BusConfig, Common};
use runtime::shutdown::ShutdownTrigger;
use runtime::{Context, Health};
use tokio::task::JoinHandle;

use crate::init_test_log;

/// How long a service may take to end after shutdown is requested. Well inside the 8 s grace
/// a deployment gives (`shutdown_grace_ms`): a service that needs more loses its last flush.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a connection may take, and a service to become ready.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// A service's `run_on` on a bus connection of its own, with what `wattbus run` would give it:
/// its config's site and bus, a data directory, a shutdown signal, and the process's health.
pub struct TestService<E> {
    task: JoinHandle<Result<(), E>>,
    bus: Bus,
    bus_task: JoinHandle<()>,
    stop: ShutdownTrigger,
    health: Health,
    /// Removed when the service is dropped, unless the test gave its own directory.
    _data: Option<tempfile::TempDir>,
}

/// How to start a [`TestService`].
pub struct ServiceBuilder {
    bus: BusConfig,
    site: Segment,
    id: Identity,
    data_dir: Option<PathBuf>,
    health: Health,
    wait_connected: bool,
}

impl ServiceBuilder {
    /// A service that logs in with `bus` on `site` as `id` (its `identity(&config)`).
    pub fn new(bus: BusConfig, site: &Segment, id: Identity) -> ServiceBuilder {
        ServiceBuilder {
            bus,
            site: site.clone(),
            id,
            data_dir: None,
            health: Health::default(),
            wait_connected: true,
        }
    }

    /// Keep the service's state in `dir` (to start it again on the same journals, as after a
    /// crash) rather than in a temporary directory of its own.
    pub fn data_dir(mut self, dir: &Path) -> Self {
        self.data_dir = Some(dir.to_path_buf());
        self
    }

    /// The process's health, for checks registered before the service starts (so that it
    /// cannot look ready before it has run).
    pub fn health(mut self, health: Health) -> Self {
        self.health = health;
        self
    }

    /// Start it at once, connected or not, as a service on a Pi whose broker comes up later.
    /// By default it starts once its connection is up.
    pub fn before_broker(mut self) -> Self {
        self.wait_connected = false;
        self
    }

    /// Connects and runs `run(bus, ctx)` (the service's `run_on`) on a task of its own.
    ///
    /// # Panics
    ///
    /// When the connection is not up within 10 s (unless [`ServiceBuilder::before_broker`]).
    pub async fn start<E, F, Fut>(self, run: F) -> TestService<E>
    where
        F: FnOnce(Bus, Context) -> Fut,
        Fut: Future<Output = Result<(), E>> + Send + 'static,
        E: Send + 'static,
    {
        init_test_log();
        let (bus, bus_task) = Bus::connect(&self.bus, &self.site, &self.id, &self.health)
            .expect("a valid bus config");
        if self.wait_connected {
            assert!(
                bus.wait_connected(START_TIMEOUT).await,
                "{} did not connect to {}:{} within {START_TIMEOUT:?}",
                self.id.instance,
                self.bus.host,
                self.bus.port
            );
        }
        let (data, data_dir) = match self.data_dir {
            Some(dir) => (None, dir),
            None => {
                let dir = tempfile::tempdir().expect("a temporary directory");
                let path = dir.path().to_path_buf();
                (Some(dir), path)
            }
        };
        let (stop, shutdown) = runtime::shutdown::channel();
        let ctx = Context {
            common: Common {
                site: self.site,
                data_dir,
                bus: self.bus,
                ..Common::default()
            },
            health: self.health.clone(),
            shutdown,
        };
        let task = tokio::spawn(run(bus.clone(), ctx));
        TestService {
            task,
            bus,
            bus_task,
            stop,
            health: self.health,
            _data: data,
        }
    }
}

impl<E: Debug> TestService<E> {
    /// The process's health: the service's own checks and its connection's.
    pub fn health(&self) -> &Health {
        &self.health
    }

    /// The service's connection.
    pub fn bus(&self) -> &Bus {
        &self.bus
    }

    /// Waits until the service is ready.
    ///
    /// # Panics
    ///
    /// When it ends first (with what it returned), or is not ready within 10 s.
    pub async fn wait_ready(&mut self) {
        let ready = crate::eventually(START_TIMEOUT, async || {
            self.health.is_ready() || self.task.is_finished()
        })
        .await;
        if self.task.is_finished() {
            panic!(
                "the service ended as it started: {:?}",
                (&mut self.task).await
            );
        }
        assert!(ready, "the service was not ready within {START_TIMEOUT:?}");
    }

    /// A clean stop: shutdown requested, `run_on` returns `Ok` within 5 s, then the connection
    /// closes cleanly (offline status, last acknowledgements out).
    ///
    /// # Panics
    ///
    /// When it does not stop in time, or returns an error or panics.
    pub async fn stop(self) {
        self.stop.fire();
        let ended = tokio::time::timeout(STOP_TIMEOUT, self.task)
            .await
            .unwrap_or_else(|_| {
                panic!("the service did not stop within {STOP_TIMEOUT:?} of shutdown")
            });
        match ended {
            Ok(Ok(())) => {}
            Ok(Err(e)) => panic!("the service stopped with an error: {e:?}"),
            Err(e) => panic!("the service panicked or was cancelled: {e}"),
        }
        self.bus.close(self.bus_task).await;
    }

    /// A crash: the service stops mid-flight, nothing flushed or checkpointed, and its
    /// connection drops without a clean close (the broker publishes its last will).
    ///
    /// In a real crash the process is gone; here tasks the service spawned (a journal's, say)
    /// live on in this process until told to stop, so shutdown is requested after the abort,
    /// which only they can still see. A test that restarts the service on the same data
    /// directory waits for them to let go of it.
    pub async fn crash(self) {
        self.task.abort();
        // Cancelled, or finished by chance just before: a crash either way.
        let _ = self.task.await;
        self.bus_task.abort();
        let _ = self.bus_task.await;
        self.stop.fire();
    }
}
