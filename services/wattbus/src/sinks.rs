//! `wattbus sinks list | forget <group>`: the sink groups producers wait for.
//!
//! Every sink group registers itself (retained, `wattbus/v1/<site>/sink/<group>`) and every
//! producer whose stream it consumes keeps that stream's readings until the group has stored
//! them (docs/ARCHITECTURE.md, "Sink registration"). A group that is gone for good would hold
//! readings forever, up to each journal's `max_bytes`: `forget` replaces its registration with
//! a retained withdrawal, which running producers apply at once and stopped ones when they
//! next connect.

use std::path::{Path, PathBuf};
use std::time::Duration;

use proto::{Filter, Payload, Segment, SinkRegistration, Topic};
use runtime::bus::{Bus, Identity, Message, Overflow, QoS};
use runtime::{ConfigSource, Health};
use tokio::sync::mpsc;

#[derive(clap::Subcommand, Debug)]
pub enum SinksCommand {
    /// The sink groups registered on the broker, and those this machine's journals wait for.
    List {
        /// Config file [default: $WATTBUS_CONFIG, else /etc/wattbus/wattbus.toml if present].
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Stop producers waiting for a sink group that is gone for good (stop it first). Needs a
    /// broker user allowed to publish the group's registration: the group's own, or an admin.
    Forget {
        group: String,
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Do not ask for confirmation (for scripts).
        #[arg(long)]
        yes: bool,
    },
}

/// Retained messages follow the SUBACK at once; this much quiet means all have arrived.
const QUIET: Duration = Duration::from_millis(500);

pub async fn run(command: SinksCommand) -> anyhow::Result<()> {
    match command {
        SinksCommand::List { config } => {
            let (_src, common) = load(config)?;
            let bus = Connection::open(&common).await?;
            let topic = Filter::<SinkRegistration>::sink_registrations(&common.site);
            let got = bus.retained(topic.as_str()).await?;
            bus.close().await;
            println!("Registered on the broker (site {}):", common.site);
            if got.is_empty() {
                println!("  none: no sink group has registered; producers hold every reading.");
            }
            for msg in &got {
                println!("  {}", describe(msg));
            }
            let journals = common.data_dir.join("journal");
            println!("Waited for by the journals in {}:", journals.display());
            let learned = learned_by_journal(&journals);
            if learned.is_empty() {
                println!("  none learned here.");
            }
            for (stream, groups) in learned {
                println!("  {stream}: {}", groups.join(", "));
            }
            Ok(())
        }
        SinksCommand::Forget { group, config, yes } => {
            let group = Segment::new(group.clone())
                .map_err(|e| anyhow::anyhow!("{group:?} is not a sink group name: it {e}"))?;
            let (_src, common) = load(config)?;
            println!(
                "Producers on site {} will stop waiting for sink group {group}: readings it has \
                 not stored are trimmed once the other groups have stored them. If it is still \
                 running, it registers again when it next connects: stop it first.",
                common.site
            );
            if !yes && !crate::energy::confirmed("forgetting")? {
                println!("Nothing changed.");
                return Ok(());
            }
            let bus = Connection::open(&common).await?;
            let topic = Topic::sink_registration(&common.site, &group);
            bus.bus
                .send(&topic, &SinkRegistration::withdrawn(group.clone()), true)
                .await?;
            // Read it back: a broker that refused the publish (an ACL) closes the connection,
            // and the old registration is still there.
            let got = bus.retained(topic.as_str()).await?;
            let closed = *bus.bus.connection().borrow() > 1;
            let user = common.bus.username.as_deref().unwrap_or("(anonymous)");
            bus.close().await;
            let kept = got
                .iter()
                .any(|m| SinkRegistration::decode(&m.payload).is_ok_and(|r| !r.is_withdrawn()));
            if kept || closed {
                anyhow::bail!(
                    "the broker kept the registration of {group}: is broker user {user} allowed \
                     to publish {} (the group's own user, or an admin)?",
                    topic.as_str()
                );
            }
            println!("Forgotten. Producers no longer wait for {group}.");
            Ok(())
        }
    }
}

fn load(config: Option<PathBuf>) -> anyhow::Result<(ConfigSource, runtime::Common)> {
    let src = ConfigSource::load(crate::services::config_path(config).as_deref())?;
    let common = src.common()?;
    runtime::telemetry::init_logging(&common.log)?;
    Ok((src, common))
}

/// One line for a registration.
fn describe(msg: &Message) -> String {
    let group = proto::parse(&msg.topic)
        .and_then(|p| p.rest.into_iter().next())
        .map_or_else(|| msg.topic.clone(), String::from);
    if msg.payload.is_empty() {
        return format!("{group}: cleared");
    }
    match SinkRegistration::decode(&msg.payload) {
        Ok(r) if r.is_withdrawn() => format!("{group}: withdrawn (producers do not wait for it)"),
        Ok(r) => format!("{group}: consumes {}", r.filters.join(", ")),
        Err(e) => format!("{group}: INVALID ({e})"),
    }
}

/// `<producer>/<stream>` → the groups its journal learned, from `<journals>/*/*/sinks`.
fn learned_by_journal(journals: &Path) -> Vec<(String, Vec<String>)> {
    let mut out = Vec::new();
    let dirs = |p: &Path| -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(p)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.is_dir())
            .collect();
        v.sort();
        v
    };
    for producer in dirs(journals) {
        for stream in dirs(&producer) {
            let name = |p: &Path| p.file_name().map(|n| n.to_string_lossy().into_owned());
            let (Some(p), Some(s)) = (name(&producer), name(&stream)) else {
                continue;
            };
            // What the producer waits for: a damaged line, or a file it cannot read, is a
            // stand-in group (`runtime::learned::stand_in`).
            let groups = match runtime::learned::load(&stream) {
                Ok(l) if l.groups.is_empty() && l.bad_lines.is_empty() => continue,
                Ok(l) => l
                    .groups
                    .into_iter()
                    .map(String::from)
                    .chain(l.bad_lines.iter().map(|n| {
                        format!(
                            "{} (line {n} damaged)",
                            runtime::learned::stand_in(Some(*n))
                        )
                    }))
                    .collect(),
                Err(e) => vec![format!(
                    "{} (cannot read: {e})",
                    runtime::learned::stand_in(None)
                )],
            };
            out.push((format!("{p}/{s}"), groups));
        }
    }
    out
}

/// A short-lived connection for a tool.
struct Connection {
    bus: Bus,
    task: tokio::task::JoinHandle<()>,
}

impl Connection {
    async fn open(common: &runtime::Common) -> anyhow::Result<Connection> {
        let id = Identity {
            service: Segment::new("sinks")?,
            instance: Segment::new(format!("wattbus-sinks-{}", std::process::id()))?,
        };
        let (bus, task) = Bus::observe(&common.bus, &common.site, &id, &Health::default())?;
        if !bus.wait_connected(Duration::from_secs(10)).await {
            bus.close(task).await;
            anyhow::bail!(
                "cannot reach the broker at {}:{} within 10 s",
                common.bus.host,
                common.bus.port
            );
        }
        Ok(Connection { bus, task })
    }

    /// The retained messages matching `filter`.
    async fn retained(&self, filter: &str) -> anyhow::Result<Vec<Message>> {
        let mut rx: mpsc::Receiver<Message> =
            self.bus
                .subscribe(filter.to_string(), QoS::AtLeastOnce, Overflow::Wait);
        anyhow::ensure!(
            self.bus.wait_subscribed(Duration::from_secs(10)).await,
            "the broker did not confirm the subscription to {filter} within 10 s"
        );
        let mut got = Vec::new();
        let end = tokio::time::Instant::now() + Duration::from_secs(5);
        while tokio::time::Instant::now() < end
            && let Ok(Some(msg)) = tokio::time::timeout(QUIET, rx.recv()).await
        {
            if msg.retain {
                got.push(msg);
            }
        }
        Ok(got)
    }

    async fn close(self) {
        self.bus.close(self.task).await;
    }
}
