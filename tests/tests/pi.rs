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
use std::time::Duration;

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
    for (dir_name, qemu, sysroot) in ARCHS {
        let dir = tempfile::tempdir().unwrap();
        let readings = dir.path().join("readings");
        let out_path = dir.path().join("demo.out");
        let out = std::fs::File::create(&out_path).unwrap();
        let mut child = Command::new(qemu)
            .args(["-L", sysroot])
            .env("QEMU_LD_PREFIX", sysroot)
            .arg(binary(dir_name))
            .args(["demo", "--no-serial", "--data-dir"])
            .arg(dir.path().join("data"))
            .arg("--readings-dir")
            .arg(&readings)
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap();
        // Until both simulated meters have readings in the files (emulated and unoptimised,
        // this takes its time on a busy machine), then a stop as Ctrl-C would do it.
        let stored = |device: &str| {
            std::fs::read_dir(&readings).ok().is_some_and(|files| {
                files
                    .flatten()
                    .any(|f| std::fs::read_to_string(f.path()).is_ok_and(|t| t.contains(device)))
            })
        };
        let got = wattbus_e2e::wait_until(Duration::from_secs(300), || {
            stored("sim-meter-1") && stored("sim-meter-2")
        });
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let status = child.wait().unwrap();
        let text = std::fs::read_to_string(&out_path).unwrap();
        assert!(got, "{dir_name}: no readings stored\n{text}");
        assert!(status.success(), "{dir_name}: {status}\n{text}");
        let acknowledged: u64 = text
            .lines()
            .find_map(|l| l.strip_prefix("Demo stopped: "))
            .and_then(|l| l.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{dir_name}: no summary in\n{text}"));
        assert!(acknowledged > 0, "{dir_name}: nothing acknowledged\n{text}");
    }
}
