//! The Raspberry Pi binaries, cross-compiled by compose/build-pi.sh (aarch64 for 64-bit Pi
//! OS, armv7 for 32-bit) and run here under qemu-user: they start, check a configuration
//! (and refuse a broken one the way the x86 binary does), and run a short demo end to end:
//! the broker as a child process, the services, simulated meters publishing, readings stored
//! and acknowledged. Serial ports are out of reach here: qemu-user 7.2 does not implement a
//! serial ioctl tokio-serial needs ("Function not implemented" opening a PTY, which a real Pi
//! kernel does), so the demo's serial sensors are left out and its Modbus RTU meters are not
//! asserted.
//!
//! tests/run.sh builds them (unoptimised, for time) into $WBTEST_PI_DIST/<arch>/.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::process::{Command, Output};

/// (directory under dist, qemu binary, the cross sysroot qemu loads the C library from)
const ARCHS: [(&str, &str, &str); 2] = [
    ("arm64", "qemu-aarch64-static", "/usr/aarch64-linux-gnu"),
    ("armv7", "qemu-arm-static", "/usr/arm-linux-gnueabihf"),
];

fn binary(arch: &str) -> PathBuf {
    let dist = std::env::var("WBTEST_PI_DIST").expect(
        "WBTEST_PI_DIST is not set: run the suite with tests/run.sh, which cross-compiles the Pi binaries",
    );
    let bin = PathBuf::from(dist).join(arch).join("wattbus");
    assert!(bin.is_file(), "{} was not built", bin.display());
    bin
}

fn run(arch: (&str, &str, &str), args: &[&str]) -> Output {
    let (dir, qemu, sysroot) = arch;
    Command::new(qemu)
        .args(["-L", sysroot])
        // For what the binary starts itself (the demo's broker), through binfmt_misc.
        .env("QEMU_LD_PREFIX", sysroot)
        .arg(binary(dir))
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {qemu} (apt-get install qemu-user-static): {e}"))
}

fn text(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr)
}

#[test]
fn the_pi_binaries_are_for_the_pi() {
    for (dir, _, _) in ARCHS {
        let o = Command::new("file").arg(binary(dir)).output().unwrap();
        let what = text(&o);
        let expect = if dir == "arm64" {
            "ARM aarch64"
        } else {
            "ARM, EABI5"
        };
        assert!(what.contains(expect), "{dir}: {what}");
    }
}

#[test]
fn the_pi_binaries_start_and_check_a_configuration() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.toml");
    std::fs::write(
        &good,
        "site = \"pi\"\n[broker]\nallow_anonymous = false\n\
         [[broker.users]]\nusername = \"w\"\npassword = \"secret-pw\"\nrole = \"admin\"\n",
    )
    .unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "site = \"pi\"\n[influx_writer]\nbatch_points = 0\n").unwrap();
    for arch in ARCHS {
        let o = run(arch, &["--version"]);
        assert!(o.status.success(), "{}: {}", arch.0, text(&o));
        assert!(text(&o).starts_with("wattbus "), "{}: {}", arch.0, text(&o));

        let o = run(arch, &["config", "check", good.to_str().unwrap()]);
        assert!(o.status.success(), "{}: {}", arch.0, text(&o));

        let o = run(arch, &["config", "check", bad.to_str().unwrap()]);
        assert_eq!(o.status.code(), Some(64), "{}: {}", arch.0, text(&o));
        assert!(
            text(&o).contains("influx_writer.batch_points") && text(&o).contains("bad.toml"),
            "{}: {}",
            arch.0,
            text(&o)
        );
    }
}

#[test]
fn a_short_demo_runs_on_the_pi_binaries() {
    for arch in ARCHS {
        let dir = tempfile::tempdir().unwrap();
        let readings = dir.path().join("readings");
        let o = run(
            arch,
            &[
                "demo",
                "--duration-s",
                "20",
                "--data-dir",
                dir.path().join("data").to_str().unwrap(),
                "--readings-dir",
                readings.to_str().unwrap(),
                "--no-serial",
            ],
        );
        let out = text(&o);
        assert!(o.status.success(), "{}: {out}", arch.0);
        for what in ["sim-meter-1/main", "sim-meter-2/main"] {
            assert!(
                out.contains(what),
                "{}: no {what} reading in\n{out}",
                arch.0
            );
        }
        let stored: u64 = out
            .lines()
            .find_map(|l| l.strip_prefix("Demo stopped: "))
            .and_then(|l| l.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{}: no summary in\n{out}", arch.0));
        assert!(stored > 0, "{}: nothing stored\n{out}", arch.0);
        let stored = std::fs::read_dir(&readings).unwrap().count();
        assert!(stored > 0, "{}: no readings file written", arch.0);
    }
}
