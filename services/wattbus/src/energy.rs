//! `wattbus energy`: show and reset rms-processor's and plug-bridge's energy counters.
//!
//! The counters only grow (docs/rms-processor.md, "Energy"); a reset is the one way down, and
//! it is explicit: done by a person with this command, counted in `resets`, dated in
//! `since_ms`, and carried by every reading after it as `energy_resets`. The processor holds a
//! lock on its counters while it runs, so a reset is refused until it is stopped — a reset
//! made under a running processor would be overwritten at its next checkpoint.

use std::io::{BufRead as _, IsTerminal as _, Write as _};
use std::path::PathBuf;

use anyhow::Context as _;
use rms_processor::energy::Energy;
use runtime::{ConfigError, ConfigSource};

#[derive(clap::Subcommand, Debug)]
pub enum EnergyCommand {
    /// Print every channel's counters.
    Show {
        /// Config file [default: $WATTBUS_CONFIG, else /etc/wattbus/wattbus.toml if present].
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Print plug-bridge's counters, one per plug.
    Plugs {
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Start one plug's counter again from zero (stop plug-bridge first).
    ResetPlug {
        /// The plug's id, as in [[plug_bridge.plugs]].
        plug: String,
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Do not ask for confirmation (for scripts).
        #[arg(long)]
        yes: bool,
    },
    /// Start one channel's counters again from zero (stop rms-processor first).
    Reset {
        /// `<device>/<channel>` as shown by `wattbus energy show` (a channel without a voltage
        /// channel has its apparent energy under `<device>/<channel>/vah`).
        channel: String,
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Do not ask for confirmation (for scripts).
        #[arg(long)]
        yes: bool,
    },
}

pub fn run(command: EnergyCommand) -> anyhow::Result<()> {
    match command {
        EnergyCommand::Plugs { config } => {
            let energy = open_plugs(config)?;
            println!("{}", energy.path().display());
            for (plug, c) in energy.counters() {
                println!(
                    "  {plug}: {:.3} Wh (at most; exact after a clean stop), {} resets, {} restarts of the plug's own counter, counting since {}",
                    c.ceiling_wh,
                    c.resets,
                    c.restarts,
                    since(c.since_ms)
                );
            }
            Ok(())
        }
        EnergyCommand::ResetPlug { plug, config, yes } => {
            let mut energy = open_plugs(config)?;
            let Some(before) = energy.counter(&plug).cloned() else {
                let known: Vec<&str> = energy.counters().map(|(k, _)| k).collect();
                return Err(unknown("(plug)", &plug, energy.path(), &known));
            };
            println!(
                "{plug}: {:.3} Wh will start again from 0 (reset #{}).",
                before.ceiling_wh,
                before.resets + 1
            );
            if !yes && !confirmed("resetting")? {
                println!("Nothing changed.");
                return Ok(());
            }
            energy.reset(&plug, proto::now_ms());
            energy.save(false)?;
            let after = energy.counter(&plug).map_or(0, |c| c.resets);
            println!(
                "Reset. {plug} counts from {} on; its readings carry energy_resets = {after}.",
                since(proto::now_ms())
            );
            Ok(())
        }
        EnergyCommand::Show { config } => {
            let energy = open(config)?;
            println!("{}", energy.path().display());
            for (channel, c) in energy.channels() {
                println!(
                    "  {channel}: import {:.3} Wh, export {:.3} Wh, {} resets, counting since {}",
                    c.import_wh,
                    c.export_wh,
                    c.resets,
                    since(c.since_ms)
                );
            }
            Ok(())
        }
        EnergyCommand::Reset {
            channel,
            config,
            yes,
        } => {
            let mut energy = open(config)?;
            let Some(before) = energy.get(&channel) else {
                let known: Vec<&str> = energy.channels().map(|(k, _)| k).collect();
                return Err(unknown("(channel)", &channel, energy.path(), &known));
            };
            println!(
                "{channel}: import {:.3} Wh, export {:.3} Wh will start again from 0 (reset #{}).",
                before.import_wh,
                before.export_wh,
                before.resets + 1
            );
            if !yes && !confirmed("resetting")? {
                println!("Nothing changed.");
                return Ok(());
            }
            let after = energy.reset(&channel, proto::now_ms());
            energy.save()?;
            println!(
                "Reset. {channel} counts from {} on; readings carry energy_resets = {}.",
                since(after.since_ms),
                after.resets
            );
            Ok(())
        }
    }
}

/// The energy file of the configured rms-processor, locked.
fn open(config: Option<PathBuf>) -> anyhow::Result<Energy> {
    let src = ConfigSource::load(crate::services::config_path(config).as_deref())?;
    let common = src.common()?;
    let cfg = src.resolve::<rms_processor::RmsProcessor>()?;
    let path = cfg.energy_path(&common.data_dir);
    if !path.exists() {
        anyhow::bail!(
            "no energy counters at {} yet (has rms-processor run with this config?)",
            path.display()
        );
    }
    Energy::load(&path).context("cannot open the energy counters")
}

/// No counters for `name` in the file at `path`: the error names the ones there are.
fn unknown(what: &str, name: &str, path: &std::path::Path, known: &[&str]) -> anyhow::Error {
    let known = if known.is_empty() {
        "none yet".to_string()
    } else {
        known.join(", ")
    };
    ConfigError::new(
        what,
        format!(
            "no counters for {name:?} in {}; known: {known}",
            path.display()
        ),
    )
    .into()
}

/// plug-bridge's energy file, locked (refused while plug-bridge runs: it holds the lock, and
/// would overwrite a reset at its next save).
fn open_plugs(config: Option<PathBuf>) -> anyhow::Result<plug_bridge::energy::PlugEnergy> {
    let src = ConfigSource::load(crate::services::config_path(config).as_deref())?;
    let common = src.common()?;
    let plan = src.resolve::<plug_bridge::PlugBridge>()?;
    let path = plan.energy_file(&common.data_dir);
    if !path.exists() {
        anyhow::bail!(
            "no plug energy counters at {} yet (has plug-bridge run with this config?)",
            path.display()
        );
    }
    plug_bridge::energy::PlugEnergy::load(&path).context("cannot open the plug energy counters")
}

/// Asks the person at the terminal to type `yes` before `doing` (e.g. "resetting").
pub(crate) fn confirmed(doing: &str) -> anyhow::Result<bool> {
    let stdin = std::io::stdin();
    if !stdin.is_terminal() {
        anyhow::bail!("not {doing} without confirmation: stdin is not a terminal (use --yes)");
    }
    print!("Type yes to go ahead: ");
    std::io::stdout().flush()?;
    let mut answer = String::new();
    stdin.lock().read_line(&mut answer)?;
    Ok(answer.trim() == "yes")
}

/// A Unix ms time as `YYYY-MM-DD HH:MM:SS UTC`.
fn since(ms: i64) -> String {
    let (y, m, d, h, mi, s) = proto::utc::civil(ms.div_euclid(1000));
    format!("{y:04}-{m:02}-{d:02} {h:02}:{mi:02}:{s:02} UTC")
}

#[cfg(test)]
mod tests {
    #[test]
    fn dates_read_as_a_person_writes_them() {
        assert_eq!(super::since(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(super::since(1_764_000_000_000), "2025-11-24 16:00:00 UTC");
        assert_eq!(super::since(951_825_600_000), "2000-02-29 12:00:00 UTC");
    }
}
