//! `wattbus azure`: IoT Hub tools.
//!
//! `sas` prints the MQTT username and password (a SAS token) azure-bridge would use, for
//! trying the connection with another client (`mosquitto_pub`, MQTTX) when the bridge cannot
//! connect. The token is a password: it is printed only to the terminal that asked.

use std::io::Read as _;
use std::path::PathBuf;

use anyhow::{Context as _, bail};
use azure_bridge::sas::{API_VERSION, ConnectionString, Credential};

#[derive(clap::Subcommand, Debug)]
pub enum AzureCommand {
    /// Print the username, password (SAS token) and client id for a device connection string.
    Sas {
        /// A file holding the connection string (`-` for standard input) [default: the
        /// config's azure_bridge.connection_string_file].
        #[arg(long)]
        connection_string_file: Option<PathBuf>,
        /// Config file, to find the connection string there.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// How long the token is valid, in seconds.
        #[arg(long, default_value_t = 3600)]
        expiry_s: u64,
    },
}

pub fn run(command: AzureCommand) -> anyhow::Result<()> {
    match command {
        AzureCommand::Sas {
            connection_string_file,
            config,
            expiry_s,
        } => {
            let text = match connection_string_file {
                Some(p) if p.as_os_str() == "-" => {
                    let mut s = String::new();
                    std::io::stdin()
                        .read_to_string(&mut s)
                        .context("cannot read standard input")?;
                    s
                }
                Some(p) => std::fs::read_to_string(&p)
                    .with_context(|| format!("cannot read {}", p.display()))?,
                None => {
                    let src = runtime::ConfigSource::load(config.as_deref())?;
                    let plan = src.resolve::<azure_bridge::AzureBridge>()?;
                    return print(&plan.hub.device, expiry_s);
                }
            };
            let cs = ConnectionString::parse(&text).context("the connection string")?;
            print(&cs, expiry_s)
        }
    }
}

fn print(cs: &ConnectionString, expiry_s: u64) -> anyhow::Result<()> {
    if expiry_s == 0 {
        bail!("--expiry-s must be positive");
    }
    let now = u64::try_from(proto::now_ms() / 1000).unwrap_or(0);
    let expiry = now.saturating_add(expiry_s);
    println!("host:      {} (port 8883, TLS; MQTT 3.1.1)", cs.host_name);
    println!("client id: {}", cs.device_id);
    println!("username:  {}", cs.username());
    match &cs.credential {
        Credential::X509 => {
            println!("password:  (none: the device's X.509 certificate authenticates it)")
        }
        _ => {
            println!("password:  {}", cs.password(expiry).unwrap_or_default());
            println!("expires:   {expiry} (Unix seconds; in {expiry_s} s)");
        }
    }
    println!(
        "telemetry: devices/{}/messages/events/  (api-version {API_VERSION})",
        cs.device_id
    );
    Ok(())
}
