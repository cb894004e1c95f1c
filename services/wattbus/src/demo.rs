//! `wattbus demo`: the broker, every service and simulated devices in one process.
//!
//! Nothing to install and nothing to configure: the broker listens on a free loopback port
//! with a generated password (authentication stays on, as everywhere), journals go to a
//! temporary directory, the influx-writer stores every reading in CSV files under
//! `./wattbus-demo-readings` (or in InfluxDB with `--influx-url`), and a console sink shows
//! each reading as it is stored and acknowledged — the same delivery contract the real sinks
//! use, so what you see is the journal being trimmed by acknowledgements.
//!
//! Besides the household meters, simulated devices sit on in-process PTY pairs, each speaking
//! its wire protocol byte for byte: three streaming CT sensors (Project Prime style, 2 kHz; the
//! first with a voltage channel), a PowMon-style request/response sensor and a fridge monitor
//! printing `key=value` lines (docs/serial-protocols.md), and two ORNO WE-515 meters on one
//! Modbus RTU line paced like RS485 at 9600 8E1. serial-ingest and modbus-ingest open the PTYs
//! exactly as they would open `/dev/ttyUSB0`; rms-processor turns the streamed samples into RMS
//! current, power and energy.
//!
//! The broker is a child process (module `child_broker`): if it fails, the services keep their
//! journals, it is restarted, and they replay. Every service logs in as a broker user of its
//! own, as in a real deployment (COMMON.md §1).
//!
//! Stopping (Ctrl-C, SIGTERM or `--duration-s`) goes in dependency order: the services stop
//! and flush through the broker; then the simulated devices, so no service sees its device
//! vanish while it is still running; then the broker.

mod child_broker;

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use proto::{Filter, Measurement, Segment};
use runtime::bus::{Bus, Identity};
use runtime::config::{BusConfig, InboxConfig, StreamConfig};
use runtime::delivery::Inbox;

use runtime::{Common, Context, Health, Secret};

#[derive(clap::Args, Debug)]
pub struct DemoOptions {
    /// Stop after this many seconds (default: run until Ctrl-C).
    #[arg(long)]
    duration_s: Option<u64>,
    /// Broker port on 127.0.0.1 (default: a free one).
    #[arg(long)]
    port: Option<u16>,
    /// Where journals go (default: a fresh temporary directory, removed at the end).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Simulated meters.
    #[arg(long, default_value_t = 2)]
    meters: u32,
    /// Where the readings files go (when no InfluxDB is given).
    #[arg(long, default_value = "wattbus-demo-readings")]
    readings_dir: PathBuf,
    /// Also write to this InfluxDB, e.g. http://127.0.0.1:8086 (then no files unless
    /// --files is given).
    #[arg(long)]
    influx_url: Option<String>,
    /// InfluxDB 1.x database (selects the v1 API).
    #[arg(long)]
    influx_database: Option<String>,
    /// InfluxDB 2.x/3.x organisation and bucket (v2 API); the token is read from
    /// $INFLUX_TOKEN.
    #[arg(long)]
    influx_org: Option<String>,
    #[arg(long)]
    influx_bucket: Option<String>,
    /// Write files even when InfluxDB is given.
    #[arg(long)]
    files: bool,
    /// Leave out the simulated serial devices (CT sensors, PowMon, fridge monitor).
    #[arg(long)]
    no_serial: bool,
}

/// The writer's configuration from the demo's flags.
fn writer_config(opts: &DemoOptions) -> anyhow::Result<influx_writer::Plan> {
    use influx_writer::config::{FilesConfig, InfluxConfig, WriteApi};
    let influx = match &opts.influx_url {
        None => None,
        Some(url) => Some(match (&opts.influx_database, &opts.influx_bucket) {
            (Some(db), None) => InfluxConfig {
                url: url.clone(),
                api: WriteApi::V1,
                database: Some(db.clone()),
                ..InfluxConfig::default()
            },
            (None, Some(bucket)) => InfluxConfig {
                url: url.clone(),
                api: WriteApi::V2,
                org: Some(opts.influx_org.clone().unwrap_or_else(|| "wattbus".into())),
                bucket: Some(bucket.clone()),
                token: std::env::var("INFLUX_TOKEN").ok().map(Secret::new),
                ..InfluxConfig::default()
            },
            _ => anyhow::bail!(
                "with --influx-url give either --influx-database (InfluxDB 1.x) or --influx-bucket (2.x/3.x)"
            ),
        }),
    };
    let cfg = influx_writer::Config {
        influx,
        files: FilesConfig {
            enabled: opts.files.then_some(true),
            dir: Some(opts.readings_dir.clone()),
            ..FilesConfig::default()
        },
        flush_interval_ms: 1000,
        health_listen: None,
        ..influx_writer::Config::default()
    };
    Ok(cfg.resolve("demo")?)
}

/// The demo's sink group: the simulator's journal waits for it.
const CONSOLE: &str = "demo-console";

/// The broker user the printed `mosquitto_sub` hint logs in as: it may read everything and
/// publish nothing.
const READER: &str = "reader";

/// Each service's broker user (its client id, and for a sink its group) and role.
fn users(writer_group: &Segment) -> anyhow::Result<Vec<child_broker::Login>> {
    use broker::Role;
    [
        ("simulator", Role::Producer),
        ("serial-ingest", Role::Producer),
        ("modbus-ingest", Role::Producer),
        ("rms-processor", Role::Processor),
        ("plug-bridge", Role::Actuator),
        ("node-health", Role::Producer),
        (plugs::TASMOTA, Role::Tasmota),
        (writer_group.as_str(), Role::Sink),
        (CONSOLE, Role::Sink),
        (READER, Role::Reader),
    ]
    .into_iter()
    .map(|(name, role)| child_broker::Login::generate(name, role))
    .collect()
}

/// What every service of the demo shares, and how each logs in as itself.
#[derive(Clone)]
struct Services {
    ctx: Context,
    users: Vec<child_broker::Login>,
}

impl Services {
    /// The context of the service that logs in as `user`.
    fn ctx(&self, user: &str) -> anyhow::Result<Context> {
        let u = self
            .users
            .iter()
            .find(|u| u.name == user)
            .with_context(|| format!("the demo has no broker user {user:?}"))?;
        let mut ctx = self.ctx.clone();
        ctx.common.bus.username = Some(u.name.clone());
        ctx.common.bus.password = Some(u.password.clone());
        Ok(ctx)
    }
}

pub async fn run(opts: DemoOptions) -> anyhow::Result<()> {
    runtime::telemetry::init_logging(&runtime::config::LogConfig {
        level: "warn,rumqttd=off".into(),
        ..Default::default()
    })?;
    // Held together while read, so the three are distinct (a port freed and asked for again
    // can come back the same, and the broker then refuses two listeners on one address).
    let [free, free_v5, free_health] = free_ports()?;
    let port = opts.port.unwrap_or(free);
    let (data_dir, temporary) = match opts.data_dir.clone() {
        Some(d) => (d, false),
        None => (
            std::env::temp_dir().join(format!("wattbus-demo-{}", std::process::id())),
            true,
        ),
    };
    std::fs::create_dir_all(&data_dir)
        .with_context(|| format!("cannot create {}", data_dir.display()))?;
    let writer_cfg = writer_config(&opts)?;
    let users = users(&writer_cfg.group)?;

    let site = Segment::new("demo")?;
    let common = Common {
        site: site.clone(),
        data_dir: data_dir.clone(),
        bus: BusConfig {
            host: "127.0.0.1".into(),
            port,
            ..BusConfig::default()
        },
        ..Common::default()
    };
    let (trigger, shutdown) = runtime::shutdown::channel();
    let health = Health::default();
    let services = Services {
        ctx: Context {
            common: common.clone(),
            health: health.clone(),
            shutdown: shutdown.clone(),
        },
        users: users.clone(),
    };

    let broker = child_broker::Supervised::start(
        &data_dir.join("broker"),
        child_broker::Ports {
            mqtt: port,
            mqtt_v5: free_v5,
            health: free_health,
        },
        &users,
    )
    .await?;

    println!(
        "wattbus demo — broker on 127.0.0.1:{port}, site \"demo\", journals in {}",
        data_dir.display()
    );
    println!("Watch the raw bus from another terminal:");
    let reader = services.ctx(READER)?;
    println!(
        "  mosquitto_sub -h 127.0.0.1 -p {port} -u {READER} -P {} -t 'wattbus/v1/#' -v",
        reader
            .common
            .bus
            .password
            .as_ref()
            .map(Secret::expose)
            .unwrap_or_default()
    );
    println!("Stop with Ctrl-C.\n");

    if let Some(i) = &writer_cfg.influx {
        println!("Readings are written to InfluxDB at {}.", i.url);
    }
    if writer_cfg.files_enabled() {
        println!(
            "Readings are written to CSV files in {}/ (a new file every 16 MiB or 24 h).",
            opts.readings_dir.display()
        );
    }
    let sim_cfg = simulators::Config {
        devices: opts.meters.clamp(1, 50),
        stream: StreamConfig {
            wait_for: vec![Segment::new(CONSOLE)?, writer_cfg.group.clone()],
            ack_timeout_ms: 3000,
            ..StreamConfig::default()
        },
        health_listen: None,
        ..simulators::Config::default()
    };
    // The console subscribes first, so the first readings are not missed (they would be
    // replayed, which is the contract working, but looks like a fault to a newcomer).
    let (subscribed_tx, subscribed) = tokio::sync::oneshot::channel();
    let console_ctx = services.ctx(CONSOLE)?;
    let console_task = tokio::spawn(console(
        console_ctx.common,
        health.clone(),
        shutdown.clone(),
        subscribed_tx,
    ));
    // Not subscribed within 10 s: the first readings are replayed later, nothing worse.
    let _in_time = tokio::time::timeout(Duration::from_secs(10), subscribed).await;
    let sinks = vec![Segment::new(CONSOLE)?, writer_cfg.group.clone()];
    // Through `runtime::service::run`, as `wattbus run` does: core metrics and `wattbus_up`.
    let writer_task = tokio::spawn(runtime::service::run::<influx_writer::InfluxWriter>(
        writer_cfg.clone(),
        services.ctx(writer_cfg.group.as_str())?,
    ));
    let sim_task = tokio::spawn(runtime::service::run::<simulators::Simulator>(
        sim_cfg.resolve("demo")?,
        services.ctx("simulator")?,
    ));
    let serial = if opts.no_serial {
        None
    } else {
        let s = serial::start(&services, &sinks).await?;
        println!(
            "Simulated serial devices on PTYs: {} (CT sensors streaming at 2 kHz), {} (two ORNO WE-515 on RS485, 9600 8E1), {} (PowMon), {} (fridge monitor).",
            s.ct_paths.join(", "),
            s.rs485_path,
            s.powmon_path,
            s.lines_path
        );
        Some(s)
    };

    // This machine's own health, as a node of a real site publishes it.
    let node_plan = node_health::Config {
        // One machine: its name whatever it is, a stock hostname too.
        node: Some(node_health::config::hostname_node(std::path::Path::new(
            "/proc",
        ))),
        stream: StreamConfig {
            wait_for: sinks.clone(),
            ack_timeout_ms: 3000,
            ..StreamConfig::default()
        },
        health_listen: None,
        ..node_health::Config::default()
    }
    .resolve(node_health::SECTION)?;
    println!(
        "This machine's health (CPU, memory, disk, temperature where there is a sensor) every {} s as device {}.",
        node_plan.interval.as_secs(),
        node_plan.node
    );
    let node_task = tokio::spawn(runtime::service::run::<node_health::NodeHealth>(
        node_plan,
        services.ctx("node-health")?,
    ));

    let plugs = plugs::start(&services, &sinks).await?;
    println!(
        "Simulated smart plugs: {} (myStrom) and {} (Shelly Gen2), polled by plug-bridge; switch one with a command on wattbus/v1/demo/cmd/<plug>.",
        plugs.mystrom_url, plugs.shelly_url
    );

    if let Some(s) = opts.duration_s {
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(s)) => trigger.fire(),
            _ = runtime::shutdown::fire_on_signal(&trigger) => {}
        }
    } else {
        runtime::shutdown::fire_on_signal(&trigger).await;
    }
    let stored = console_task.await.context("console task failed")??;
    sim_task.await.context("simulator task failed")??;
    node_task.await.context("node-health task failed")??;
    plugs.stop().await?;
    if let Some(s) = serial {
        s.stop().await?;
    }
    writer_task.await.context("influx-writer task failed")??;
    broker.stop().await;
    println!("\nDemo stopped: {stored} readings stored and acknowledged by the console sink.");
    if opts.influx_url.is_none() || opts.files {
        println!("Readings files: {}/", opts.readings_dir.display());
    }
    if temporary && let Err(e) = std::fs::remove_dir_all(&data_dir) {
        tracing::warn!(dir = %data_dir.display(), error = %runtime::telemetry::chain(&e), "Cannot remove the demo's temporary directory.");
    }
    Ok(())
}

mod plugs {
    //! The demo's smart plugs (simulated, answering as myStrom, Shelly and Tasmota document
    //! their APIs) and plug-bridge polling them.

    use anyhow::Context as _;
    use proto::Segment;
    use runtime::config::StreamConfig;
    use simulators::plugs::{SimPlug, Vendor};
    use simulators::tasmota::SimTasmota;
    use tokio::task::JoinHandle;

    /// The simulated Tasmota's MQTT topic, which is also its broker user's name.
    pub const TASMOTA: &str = "tasmota_demo";

    pub struct Running {
        pub mystrom_url: String,
        pub shelly_url: String,
        servers: Vec<JoinHandle<()>>,
        bridge: JoinHandle<Result<(), plug_bridge::Error>>,
        tasmota: (runtime::bus::Bus, JoinHandle<()>),
    }

    impl Running {
        pub async fn stop(self) -> anyhow::Result<()> {
            self.bridge.await.context("plug-bridge task failed")??;
            for s in self.servers {
                s.abort();
            }
            let (bus, task) = self.tasmota;
            bus.close(task).await;
            Ok(())
        }
    }

    pub async fn start(services: &super::Services, sinks: &[Segment]) -> anyhow::Result<Running> {
        let mut urls = Vec::new();
        let mut servers = Vec::new();
        // A kettle now and then would be noisier; a lamp and a fridge-sized load.
        for (kind, load_w) in [(Vendor::Mystrom, 60.0), (Vendor::Shelly, 120.0)] {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            urls.push(format!("http://{}", listener.local_addr()?));
            servers.push(tokio::spawn(
                SimPlug::new(kind, load_w, None).serve(listener),
            ));
        }
        // A washing machine's plug that speaks MQTT itself, on the demo's broker as its own
        // user.
        let ctx = services.ctx(TASMOTA)?;
        let id = runtime::bus::Identity {
            service: Segment::new(TASMOTA)?,
            instance: Segment::new(TASMOTA)?,
        };
        let (bus, task) =
            runtime::bus::Bus::observe(&ctx.common.bus, &ctx.common.site, &id, &ctx.health)?;
        servers.push(tokio::spawn(
            SimTasmota::new(TASMOTA, 500.0).run(bus.clone()),
        ));
        let toml = format!(
            "[plug_bridge]\npoll_ms = 1000\n\
             [[plug_bridge.plugs]]\nid = \"lamp-plug\"\nkind = \"mystrom\"\nurl = \"{}\"\n\
             [[plug_bridge.plugs]]\nid = \"fridge-plug\"\nkind = \"shelly\"\nurl = \"{}\"\n\
             [[plug_bridge.plugs]]\nid = \"washer-plug\"\nkind = \"tasmota\"\ntopic = \"{TASMOTA}\"\n",
            urls[0], urls[1]
        );
        let src = runtime::ConfigSource::from_parts(None, Some(&toml))?;
        let mut plan = src.resolve::<plug_bridge::PlugBridge>()?;
        plan.health_listen = None;
        plan.stream = StreamConfig {
            wait_for: sinks.to_vec(),
            ack_timeout_ms: 3000,
            ..StreamConfig::default()
        };
        let bridge = tokio::spawn(runtime::service::run::<plug_bridge::PlugBridge>(
            plan,
            services.ctx("plug-bridge")?,
        ));
        Ok(Running {
            mystrom_url: urls[0].clone(),
            shelly_url: urls[1].clone(),
            servers,
            bridge,
            tasmota: (bus, task),
        })
    }
}

mod serial {
    //! The demo's serial devices and the two services that read them.

    use anyhow::Context as _;
    use proto::Segment;
    use runtime::ConfigSource;
    use runtime::shutdown::ShutdownTrigger;
    use simulators::hardware::{self, CT_AMPS_PER_COUNT, VOLTS_PER_COUNT};
    use simulators::modbus::{LineTiming, RtuOptions, serve_rtu};
    use simulators::serial::{pty_pair, run_powmon, run_prime, run_sensor};
    use tokio::task::JoinHandle;

    pub struct Running {
        pub ct_paths: Vec<String>,
        pub rs485_path: String,
        pub powmon_path: String,
        pub lines_path: String,
        devices: Vec<JoinHandle<Result<(), simulators::serial::DriverError>>>,
        /// The devices stop after the services: a service that saw its device vanish while it
        /// was still running would report a fault (a failed Modbus link) at every Ctrl-C.
        stop_devices: ShutdownTrigger,
        services: Vec<JoinHandle<anyhow::Result<()>>>,
    }

    impl Running {
        /// Wait for the services (they stop on the demo's shutdown), then stop the devices.
        pub async fn stop(self) -> anyhow::Result<()> {
            let mut result = Ok(());
            for s in self.services {
                let ended = s
                    .await
                    .context("serial service task failed")
                    .and_then(|r| r);
                if result.is_ok() {
                    result = ended;
                }
            }
            self.stop_devices.fire();
            for d in self.devices {
                // A device whose host went away first ends with `Gone`: not a demo failure.
                if let Ok(Err(e)) = d.await {
                    tracing::debug!(error = %runtime::telemetry::chain(&e), "Simulated device ended.");
                }
            }
            result
        }
    }

    /// A simulated device's driver, not started yet.
    type Driver = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<(), simulators::serial::DriverError>> + Send>,
    >;

    /// Start the devices on PTY pairs, then serial-ingest, rms-processor and modbus-ingest on
    /// them.
    /// `sinks`: the groups whose acknowledgement the readings wait for.
    pub async fn start(services: &super::Services, sinks: &[Segment]) -> anyhow::Result<Running> {
        let ctx = &services.ctx;
        let (stop_devices, devices_shutdown) = runtime::shutdown::channel();
        // The devices start once the services are connected (below); until then, only
        // their PTYs exist.
        let mut drivers: Vec<Driver> = Vec::new();
        let now = proto::now_ms();
        // The same devices as compose's demo profile serves over TCP (simulators::hardware).
        let mut ct_paths = Vec::new();
        for model in hardware::ct_sensors(now)? {
            let (dev, path) = pty_pair().context("cannot create a PTY pair for a CT sensor")?;
            drivers.push(Box::pin(run_prime(model, dev, devices_shutdown.clone())));
            ct_paths.push(path);
        }
        let (dev, powmon_path) = pty_pair().context("cannot create a PTY pair for PowMon")?;
        drivers.push(Box::pin(run_powmon(
            hardware::powmon()?,
            dev,
            devices_shutdown.clone(),
        )));
        // Two ORNO WE-515 meters on one RS485 line (9600 8E1, paced like the real wire): the
        // house, which exports in the afternoon (negative power), and a heat pump. Their
        // counters start afresh with each demo (no registers file).
        let (dev, rs485_path) =
            pty_pair().context("cannot create a PTY pair for the RS485 line")?;
        let (meters, _) = hardware::meters(now, &simulators::Registers::empty());
        drivers.push(Box::pin(serve_rtu(
            dev,
            RtuOptions {
                pace: Some(LineTiming::RS485_9600_8E1),
            },
            meters,
            devices_shutdown.clone(),
        )));
        let (dev, lines_path) = pty_pair().context("cannot create a PTY pair for the sensor")?;
        drivers.push(Box::pin(run_sensor(
            hardware::fridge_monitor()?,
            hardware::FRIDGE_MONITOR_INTERVAL,
            dev,
            devices_shutdown.clone(),
        )));

        let wait_for = sinks
            .iter()
            .map(|s| format!("\"{s}\""))
            .collect::<Vec<_>>()
            .join(", ");
        // rms-processor publishes its readings at each checkpoint (with the energy counters
        // they show saved first): every second, so the demo shows each within a second.
        let mut toml = format!(
            "[rms_processor]\ncheckpoint_interval_ms = 1000\n\
             [serial_ingest.meas_stream]\nwait_for = [{wait_for}]\nack_timeout_ms = 3000\n\
             [rms_processor.stream]\nwait_for = [{wait_for}]\nack_timeout_ms = 3000\n\
             [modbus_ingest.stream]\nwait_for = [{wait_for}]\nack_timeout_ms = 3000\n\
             [[modbus_ingest.buses]]\nname = \"rs485\"\ntransport = \"rtu\"\n\
             path = \"{rs485_path}\"\nbaud = 9600\nparity = \"even\"\n\
             [[modbus_ingest.buses.devices]]\nname = \"house\"\nslave = 1\n\
             profile = \"orno-we-515\"\npoll = {{ fast = 1000, slow = 10000 }}\n\
             [[modbus_ingest.buses.devices]]\nname = \"heat-pump\"\nslave = 2\n\
             profile = \"orno-we-515\"\npoll = {{ fast = 1000, slow = 10000 }}\n"
        );
        for (i, path) in ct_paths.iter().enumerate() {
            // Two channels at 2 kHz need 250000 baud on a real Uno (docs/serial-protocols.md).
            let (baud, channels) = if i == 0 {
                (
                    250_000,
                    format!(
                        "{{ name = \"ct1\", unit = \"a\", scale = {CT_AMPS_PER_COUNT} }}, \
                         {{ name = \"v1\", unit = \"v\", scale = {VOLTS_PER_COUNT} }}"
                    ),
                )
            } else {
                (
                    115_200,
                    format!("{{ name = \"ct1\", unit = \"a\", scale = {CT_AMPS_PER_COUNT} }}"),
                )
            };
            toml.push_str(&format!(
                "[[serial_ingest.ports]]\npath = \"{path}\"\ndevice = \"ct-{n}\"\n\
                 protocol = \"stream\"\nbaud = {baud}\nsample_rate_hz = 2000.0\n\
                 channels = [{channels}]\n",
                n = i + 1
            ));
        }
        toml.push_str(
            "[[rms_processor.channels]]\ndevice = \"ct-1\"\nchannel = \"ct1\"\nvoltage = \"v1\"\n",
        );
        toml.push_str(&format!(
            "[[serial_ingest.ports]]\npath = \"{powmon_path}\"\ndevice = \"powmon\"\n\
             protocol = \"request-response\"\n\
             channels = [{{ name = \"fridge\" }}, {{ name = \"kettle\" }}]\n\
             [[serial_ingest.ports]]\npath = \"{lines_path}\"\ndevice = \"kitchen\"\n\
             protocol = \"lines\"\nchannels = [\n\
             {{ key = \"fridge\", channel = \"fridge\", measurement = \"temperature\", field = \"temperature_c\" }},\n\
             {{ key = \"freezer\", channel = \"freezer\", measurement = \"temperature\", field = \"temperature_c\" }},\n]\n"
        ));
        // The checks the two services set once connected and running, registered now so the
        // wait below cannot pass before the services have even started.
        for name in [
            "serial-ingest",
            "rms-processor",
            "modbus-ingest",
            "bus:serial-ingest",
            "bus:rms-processor",
            "bus:modbus-ingest",
        ] {
            ctx.health.check(name);
        }
        let src = ConfigSource::from_parts(None, Some(&toml))?;
        let mut tasks = Vec::new();
        for name in ["serial-ingest", "rms-processor", "modbus-ingest"] {
            let run = crate::services::find(name)?.embedded(&src, services.ctx(name)?)?;
            tasks.push(tokio::spawn(run));
        }
        // Readings taken before a service's broker connection is up are journaled and
        // replayed a few seconds later: the contract at work, but it reads like a fault in a
        // first demo. So the devices start once every service says it is ready.
        for _ in 0..100 {
            if ctx.health.is_ready() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        let devices = drivers.into_iter().map(tokio::spawn).collect();
        Ok(Running {
            ct_paths,
            rs485_path,
            powmon_path,
            lines_path,
            devices,
            stop_devices,
            services: tasks,
        })
    }
}

/// The demo's sink: prints each reading and acknowledges it.
async fn console(
    common: Common,
    health: Health,
    shutdown: runtime::Shutdown,
    subscribed: tokio::sync::oneshot::Sender<()>,
) -> anyhow::Result<u64> {
    let id = Identity {
        service: Segment::new(CONSOLE)?,
        instance: Segment::new(CONSOLE)?,
    };
    let (bus, bus_task) = Bus::connect(&common.bus, &common.site, &id, &health)?;
    let (mut inbox, ack_task) = Inbox::<Measurement>::subscribe(
        &bus,
        &Filter::measurements(Some(&common.site), None),
        &id.instance,
        &InboxConfig::default(),
    );
    let acker = inbox.acker();
    if bus.wait_subscribed(Duration::from_secs(10)).await {
        let _ = subscribed.send(());
    }
    let mut stored = Stored::default();
    // The simulator's journal and replay figures, read from the process's core metrics.
    let simulator = runtime::telemetry::core::Core::of("simulator");
    let (waiting, _oldest) = simulator.journal("meas");
    let replayed = simulator.replayed("meas", CONSOLE);
    let mut report = tokio::time::interval(Duration::from_secs(10));
    report.tick().await;
    loop {
        let delivery = tokio::select! {
            () = shutdown.wait() => break,
            _ = report.tick() => {
                println!(
                    "  delivery: {} readings stored and acknowledged; {} waiting in the simulator's journal; {} replayed",
                    stored.count(),
                    waiting.get(),
                    replayed.get()
                );
                tracing::info!(
                    stored = stored.count(),
                    missing = stored.missing(),
                    "Console sink: readings so far (missing: numbers skipped within a producer's stream, not yet replayed)."
                );
                continue;
            }
            d = inbox.recv() => match d { Some(d) => d, None => break },
        };
        let m = &delivery.message;
        let fields: Vec<String> = m
            .fields
            .iter()
            .map(|(k, v)| format!("{k}={}", readable(*v)))
            .collect();
        let replay = !stored.insert(m.origin.as_ref());
        let tags: String = m.tags.iter().map(|(k, v)| format!(" {k}={v}")).collect();
        println!(
            "{}  {}/{}{}  {}  [{}]{}",
            clock(m.ts_ms),
            m.device,
            m.channel,
            if tags.is_empty() {
                String::new()
            } else {
                format!(" {{{}}}", tags.trim_start())
            },
            fields.join("  "),
            serde_json::to_value(m.quality)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default(),
            if replay {
                "  (replayed, already stored)"
            } else {
                ""
            }
        );
        if let Some(token) = &delivery.token {
            acker.ack(token);
        }
    }
    drop(inbox);
    drop(acker);
    if let Err(e) = ack_task.await {
        tracing::warn!(error = %runtime::telemetry::chain(&e), "The console's acknowledgement task ended abnormally.");
    }
    bus.close(bus_task).await;
    for ((producer, stream), seqs) in &stored.streams {
        tracing::info!(
            %producer,
            %stream,
            first = seqs.first(),
            last = seqs.last(),
            stored = seqs.count,
            missing = seqs.missing(),
            "Console sink: readings stored from this stream."
        );
    }
    Ok(stored.count())
}

/// What the console has stored, per producer stream, to tell a replay from a new reading and
/// to see whether any reading is missing.
#[derive(Debug, Default)]
struct Stored {
    streams: BTreeMap<(Segment, Segment), Seqs>,
    /// Readings without an origin (not journaled, so never replayed).
    untracked: u64,
}

impl Stored {
    /// Records a reading; `false` if it was stored before (a replay).
    fn insert(&mut self, origin: Option<&proto::Origin>) -> bool {
        match origin {
            Some(o) => self
                .streams
                .entry((o.producer.clone(), o.stream.clone()))
                .or_default()
                .insert(o.seq),
            None => {
                self.untracked += 1;
                true
            }
        }
    }

    fn count(&self) -> u64 {
        self.untracked + self.streams.values().map(|s| s.count).sum::<u64>()
    }

    fn missing(&self) -> u64 {
        self.streams.values().map(Seqs::missing).sum()
    }
}

/// Seqs seen from one stream, as merged ranges: memory grows with the gaps, not the readings
/// (the console runs for days). Within one run of a producer its seqs go up by one, so a gap
/// is a reading not (yet) stored; across a producer's restart they jump (the journal reserves
/// them in blocks), so with a reused `--data-dir` a gap can also be such a jump.
#[derive(Debug, Default)]
struct Seqs {
    /// First seq → last seq of each run of seqs seen, disjoint and not adjacent.
    ranges: BTreeMap<u64, u64>,
    count: u64,
}

impl Seqs {
    /// `false` if `seq` was seen before.
    fn insert(&mut self, seq: u64) -> bool {
        let before = self.ranges.range(..=seq).next_back().map(|(&a, &b)| (a, b));
        if before.is_some_and(|(_, last)| last >= seq) {
            return false;
        }
        let after = seq
            .checked_add(1)
            .and_then(|next| self.ranges.get(&next).map(|&last| (next, last)));
        let first = match before {
            Some((first, last)) if last + 1 == seq => first,
            _ => seq,
        };
        let last = match after {
            Some((next, last)) => {
                self.ranges.remove(&next);
                last
            }
            None => seq,
        };
        self.ranges.insert(first, last);
        self.count += 1;
        true
    }

    fn first(&self) -> u64 {
        self.ranges.keys().next().copied().unwrap_or(0)
    }

    fn last(&self) -> u64 {
        self.ranges.values().next_back().copied().unwrap_or(0)
    }

    /// Seqs between the first and the last seen that were not.
    fn missing(&self) -> u64 {
        if self.ranges.is_empty() {
            return 0;
        }
        (self.last() - self.first() + 1) - self.count
    }
}

/// A value for a person: at most four significant digits, no trailing zeros (what is stored
/// keeps every digit).
fn readable(v: f64) -> String {
    if v == 0.0 || !v.is_finite() {
        return format!("{v}");
    }
    let digits = (3 - v.abs().log10().floor() as i32).clamp(0, 6) as usize;
    let s = format!("{v:.digits$}");
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

/// `HH:MM:SS` (UTC) of a Unix ms timestamp.
fn clock(ts_ms: i64) -> String {
    let s = ts_ms.div_euclid(1000).rem_euclid(86_400);
    format!("{:02}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
}

/// Three distinct loopback ports nothing listens on (all bound at once, then let go).
fn free_ports() -> anyhow::Result<[u16; 3]> {
    let bind = || TcpListener::bind("127.0.0.1:0").context("cannot find a free port");
    let held = [bind()?, bind()?, bind()?];
    let mut ports = [0; 3];
    for (port, l) in ports.iter_mut().zip(&held) {
        *port = l.local_addr()?.port();
    }
    Ok(ports)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seqs_tell_replays_and_gaps_in_a_few_ranges() {
        let mut s = Seqs::default();
        for seq in [1, 2, 3, 7, 8, 5] {
            assert!(s.insert(seq), "{seq}");
        }
        assert!(!s.insert(2) && !s.insert(7), "replays");
        assert_eq!((s.first(), s.last(), s.count, s.missing()), (1, 8, 6, 2));
        assert!(s.insert(4) && s.insert(6));
        assert_eq!(s.missing(), 0);
        assert_eq!(s.ranges.len(), 1, "{:?}", s.ranges);
        for seq in 9..100_000 {
            s.insert(seq);
        }
        assert_eq!((s.ranges.len(), s.count, s.missing()), (1, 99_999, 0));
    }
}
