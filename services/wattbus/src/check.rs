//! `wattbus config check [file…]`.

use std::path::PathBuf;

use runtime::ConfigSource;

use crate::services::{check_all, config_paths};

pub fn run(files: Vec<PathBuf>) -> anyhow::Result<()> {
    let paths = config_paths(files);
    let src = ConfigSource::load_layers(&paths)?;
    check_all(&src)?;
    if paths.len() <= 1 {
        match src.file() {
            Some(f) => println!("{}: OK", f.display()),
            None => println!("no config file; built-in defaults and WATTBUS_* environment: OK"),
        }
    } else {
        let names: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
        println!("{}: OK", names.join(" + "));
    }
    Ok(())
}
