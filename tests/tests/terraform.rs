//! terraform/ without Azure: `terraform init` cannot reach its registry here, so `validate`
//! and `plan` cannot run. What can: checkov's policies (every failed check fails this test,
//! every skipped one must be one we chose and give its reason), python-hcl2's reading of what
//! the files say (tests/terraform/check.py: hardening, the private container, a lifecycle
//! backstop that cannot outrun the rotator, the SAS's permissions), the config snippet the
//! `wattbus_toml` output prints accepted by `wattbus config check`, and `terraform fmt`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use wattbus_e2e::wattbus_bin;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} is not set: run the suite with tests/run.sh, which installs checkov and python-hcl2")
    })
}

#[test]
fn checkov_passes_with_only_the_skips_we_chose_each_with_its_reason() {
    let o = Command::new(env("WBTEST_CHECKOV"))
        .args([
            "-d",
            "terraform",
            "--framework",
            "terraform",
            "--skip-download",
        ])
        .args(["-o", "json"])
        .current_dir(repo())
        .env("BC_SKIP_MAPPING", "TRUE")
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| {
        panic!(
            "checkov's JSON: {e}\n{out}\n{}",
            String::from_utf8_lossy(&o.stderr)
        )
    });
    let results = &v["results"];
    let ids = |key: &str| -> BTreeSet<String> {
        results[key]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["check_id"].as_str().unwrap().to_string())
            .collect()
    };
    let failed: Vec<String> = results["failed_checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| format!("{} {} ({})", c["check_id"], c["check_name"], c["resource"]))
        .collect();
    assert!(failed.is_empty(), "checkov failed: {failed:#?}");
    // The hardening a backup account needs, each seen and passed.
    let passed = ids("passed_checks");
    for id in [
        "CKV_AZURE_44",  // TLS 1.2 at least
        "CKV_AZURE_3",   // HTTPS only
        "CKV_AZURE_190", // no public blobs
        "CKV2_AZURE_47", // no anonymous access
        "CKV_AZURE_34",  // the container private
        "CKV2_AZURE_38", // soft delete
        "CKV_AZURE_206", // replication
        "CKV2_AZURE_41", // a SAS expiration policy
    ] {
        assert!(passed.contains(id), "{id} did not pass: {passed:?}");
    }
    // Skips are decisions: a new one is a change someone must make here too, with a reason.
    let skipped = ids("skipped_checks");
    assert_eq!(
        skipped,
        [
            "CKV2_AZURE_1",
            "CKV2_AZURE_21",
            "CKV2_AZURE_33",
            "CKV2_AZURE_40",
            "CKV_AZURE_33",
            "CKV_AZURE_35",
            "CKV_AZURE_59"
        ]
        .into_iter()
        .map(String::from)
        .collect::<BTreeSet<_>>()
    );
    for c in results["skipped_checks"].as_array().unwrap() {
        let reason = c["check_result"]["suppress_comment"].as_str().unwrap_or("");
        assert!(
            reason.len() > 20,
            "{} skipped without a reason",
            c["check_id"]
        );
    }
}

#[test]
fn the_files_say_what_users_rely_on_and_the_config_they_print_is_valid() {
    let o = Command::new(env("WBTEST_TF_PYTHON"))
        .arg(repo().join("tests/terraform/check.py"))
        .arg(repo().join("terraform"))
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let snippet = v["wattbus_toml"].as_str().unwrap();

    // What `terraform output -raw wattbus_toml` prints, with the SAS file it names.
    let dir = tempfile::tempdir().unwrap();
    let sas = dir.path().join("backup_sas");
    std::fs::write(
        &sas,
        "?sv=2022-11-02&sr=c&sp=racwdl&se=2027-12-01T00%3A00%3A00Z&spr=https&sig=abc%3D\n",
    )
    .unwrap();
    let text = snippet.replace("/run/secrets/backup_sas", sas.to_str().unwrap());
    let file = dir.path().join("wattbus.toml");
    std::fs::write(&file, &text).unwrap();
    let o = Command::new(wattbus_bin())
        .args(["config", "check"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "the wattbus_toml output is not a valid config:\n{text}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    // And the SAS is never printed back.
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(!all.contains("sig=abc"), "{all}");
}

/// `terraform fmt -check` where the terraform binary is installed (it is not a Debian package,
/// and its registry is out of reach): said in the test's output when it is not.
#[test]
fn terraform_files_are_formatted() {
    let Ok(o) = Command::new("terraform")
        .args(["fmt", "-check", "-recursive", "-diff"])
        .current_dir(repo().join("terraform"))
        .output()
    else {
        eprintln!(
            "NOT CHECKED: no terraform binary on this machine, so `terraform fmt -check` did not run"
        );
        return;
    };
    assert!(
        o.status.success(),
        "terraform fmt -check: {}",
        String::from_utf8_lossy(&o.stdout)
    );
}
