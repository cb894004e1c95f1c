//! wattbus's own broker, inside the test process.
//!
//! What a deployment runs (`broker::start`, rumqttd with wattbus's patches), configured as a
//! deployment configures it: authentication on, and one `[[broker.users]]` entry per client with
//! the role it needs (docs/broker.md): a service's user is named like the service, a sink's user
//! is its sink group, and a test's observers log in as the reader [`WATCH_USER`]. So a test
//! client that publishes or subscribes beyond its role is refused exactly as it would be on a
//! Pi, and a test passes only if the service works within the grants it will really have.
//!
//! **One broker per test.** Starting one is cheap (well under a second, a handful of threads
//! that idle once the test's clients are gone, a fraction of a MiB), so every test gets a
//! fresh broker: no retained
//! status, sink registration or filter of another test, and no need for client ids or sites
//! that differ between tests.
//!
//! **Its lifetime.** rumqttd has no stop API (see the `broker` crate doc), so a broker's threads
//! live until the test binary exits, idle once the test's clients are gone. Nothing reaches
//! it by accident: its port is handed out once per process ([`crate::free_port`]) and held by
//! the broker for good, so no later test or process gets it. Dropping a [`TestBroker`] therefore
//! stops nothing; keep it anyway for as long as the test uses it, which says so.
//!
//! **Its port.** Chosen by [`crate::free_port`] rather than the kernel (port 0): the broker's
//! config refuses port 0, because rumqttd does not report the port it bound, and the readiness
//! probe and every client need it.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

pub use broker::Role;
use proto::Segment;
use runtime::Health;
use runtime::Secret;
use runtime::bus::{Bus, Identity};
use runtime::config::BusConfig;
use tokio::task::JoinHandle;

use crate::{free_port, seg};

/// The reader every broker here has, for [`crate::Watch`]: it may subscribe to anything under
/// `wattbus/` and publish nothing, like Grafana or `wattbus tail`.
pub const WATCH_USER: &str = "watch";

/// How long a start may take before the test fails: generous, for a loaded machine.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// Starts on a fresh port this many times before giving up: a port can be taken by another
/// process between [`free_port`] and the broker's bind.
const START_ATTEMPTS: usize = 3;

/// A broker, its port and its users, before it runs: for a test that starts a service first
/// and its broker later, as on a Pi whose broker container comes up last.
#[derive(Debug, Clone)]
pub struct BrokerPlan {
    port: u16,
    users: Vec<(String, Role)>,
}

/// wattbus's broker running in this process (see the module doc).
#[derive(Debug)]
pub struct TestBroker {
    plan: BrokerPlan,
}

impl BrokerPlan {
    /// The bus config a client logging in as `user` uses: this broker's address, the user's
    /// password, and a quick reconnect (50–500 ms), so a client that starts before the broker
    /// does not wait out the default backoff (up to 30 s) once it is there.
    ///
    /// # Panics
    ///
    /// When `user` is not one of the broker's users: the test forgot to grant it.
    pub fn bus(&self, user: &str) -> BusConfig {
        assert!(
            self.role(user).is_some(),
            "{user:?} is not a user of this broker; users: {:?}",
            self.users.iter().map(|(u, _)| u).collect::<Vec<_>>()
        );
        BusConfig {
            host: Ipv4Addr::LOCALHOST.to_string(),
            port: self.port,
            username: Some(user.to_string()),
            password: Some(Secret::new(password(user))),
            reconnect_min_ms: 50,
            reconnect_max_ms: 500,
            ..BusConfig::default()
        }
    }

    /// The port the broker listens on, once started.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `user`'s role, if it is one of the broker's users.
    pub fn role(&self, user: &str) -> Option<Role> {
        self.users.iter().find(|(u, _)| u == user).map(|(_, r)| *r)
    }

    /// Starts the broker on the planned port and returns once it accepts connections.
    ///
    /// # Panics
    ///
    /// When it cannot listen there within 10 s.
    pub async fn start(self) -> TestBroker {
        if let Err(e) = self.try_start().await {
            panic!(
                "the test broker did not start on 127.0.0.1:{}: {e}",
                self.port
            );
        }
        TestBroker { plan: self }
    }

    async fn try_start(&self) -> Result<(), broker::Error> {
        let config = broker::Config {
            listen: SocketAddr::from((Ipv4Addr::LOCALHOST, self.port)),
            users: self
                .users
                .iter()
                .map(|(name, role)| broker::User::new(name, &password(name), *role))
                .collect(),
            // The process's own metrics are enough; nothing here scrapes the broker.
            health_listen: None,
            ..broker::Config::default()
        };
        let mut started = broker::start(&config)?;
        started.wait_ready(READY_TIMEOUT).await
    }
}

impl TestBroker {
    /// Starts a broker whose users are `users` (name and role) and [`WATCH_USER`], on a free
    /// loopback port; returns once it accepts connections.
    ///
    /// Most of the wait is the readiness probe's 20 ms interval (the listener binds on its
    /// thread a moment after the first probe). Each broker keeps five threads (router,
    /// listener, timer, meters, supervisor) that idle once the test's clients are gone.
    ///
    /// # Panics
    ///
    /// When it cannot listen within 10 s on any of three ports, or when a user is named twice
    /// or is not a valid topic level.
    pub async fn start(users: &[(&str, Role)]) -> TestBroker {
        let mut last = None;
        for _ in 0..START_ATTEMPTS {
            let plan = TestBroker::plan(users);
            match plan.try_start().await {
                Ok(()) => return TestBroker { plan },
                // A config error is the test's; it would fail on every port.
                Err(e @ broker::Error::Config(_)) => panic!("the test broker's config: {e}"),
                Err(e) => last = Some((plan.port, e)),
            }
        }
        let (port, e) = last.expect("at least one attempt");
        panic!("the test broker did not start (last on 127.0.0.1:{port}): {e}");
    }

    /// A broker's port and users, chosen now and started later ([`BrokerPlan::start`]).
    pub fn plan(users: &[(&str, Role)]) -> BrokerPlan {
        let mut all: Vec<(String, Role)> = users.iter().map(|(u, r)| (u.to_string(), *r)).collect();
        if !all.iter().any(|(u, _)| u == WATCH_USER) {
            all.push((WATCH_USER.to_string(), Role::Reader));
        }
        BrokerPlan {
            port: free_port(),
            users: all,
        }
    }

    /// See [`BrokerPlan::bus`].
    pub fn bus(&self, user: &str) -> BusConfig {
        self.plan.bus(user)
    }

    /// See [`BrokerPlan::port`].
    pub fn port(&self) -> u16 {
        self.plan.port
    }

    /// A connection of `user` as the service `user` with client id `instance` (which, for the
    /// broker to accept it, is `user` or starts with `user-`), connected. A reader connects as
    /// `wattbus tail` does, announcing no status (it may publish nothing); every other role
    /// announces its status and leaves a last will, as a service does.
    ///
    /// # Panics
    ///
    /// When it is not connected within 10 s.
    pub async fn connect_as(
        &self,
        site: &Segment,
        user: &str,
        instance: &str,
    ) -> (Bus, JoinHandle<()>) {
        let cfg = self.bus(user);
        // The service is the user: dead letters go to `dead/<service>`, which is the one
        // dead-letter topic a user may publish.
        let id = Identity {
            service: seg(user),
            instance: seg(instance),
        };
        let health = Health::default();
        let opened = if self.plan.role(user) == Some(Role::Reader) {
            Bus::observe(&cfg, site, &id, &health)
        } else {
            Bus::connect(&cfg, site, &id, &health)
        };
        let (bus, task) = opened.expect("a valid bus config");
        assert!(
            bus.wait_connected(Duration::from_secs(10)).await,
            "{instance} (user {user}) did not connect to the test broker on port {} within 10 s",
            self.port()
        );
        (bus, task)
    }

    /// [`TestBroker::connect_as`] with the user's name as client id: a test's one connection of
    /// that user.
    pub async fn connect(&self, site: &Segment, user: &str) -> (Bus, JoinHandle<()>) {
        self.connect_as(site, user, user).await
    }
}

/// A user's password: its own, so a client given one user's config cannot log in as another.
fn password(user: &str) -> String {
    format!("{user}-test-password")
}
