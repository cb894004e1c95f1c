//! `wattbus config check [file]`.

use std::path::PathBuf;

use runtime::ConfigSource;

use crate::services::{check_all, config_path};

pub fn run(file: Option<PathBuf>) -> anyhow::Result<()> {
    let path = config_path(file);
    let src = ConfigSource::load(path.as_deref())?;
    check_all(&src)?;
    match src.file() {
        Some(f) => println!("{}: OK", f.display()),
        None => println!("no config file; built-in defaults and WATTBUS_* environment: OK"),
    }
    Ok(())
}
