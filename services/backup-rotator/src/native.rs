//! Native mode: InfluxDB's own backup tool, run with every full set where it is installed,
//! its files stored in the set under `native/` beside the line protocol.
//!
//! - InfluxDB 1.x: `influxd backup -portable -database DB -host RPC DIR` over the RPC port
//!   (`bind-address`, 127.0.0.1:8088 by default; no authentication on that port, so keep it
//!   local).
//! - InfluxDB 2.x: `influx backup --host URL [--org ORG --bucket BUCKET] DIR`, with the token
//!   in `INFLUX_TOKEN` (never on the command line, where `ps` shows it). It needs an operator
//!   token (influxdb #25893), far more than the read-only token the line protocol needs.
//!
//! Why only with full sets: the tool copies whole shards, a day's worth or more, so an hourly
//! run would store the same shards again and again. Why a failure of the tool does not fail
//! the set: the line protocol is the backup wattbus restores and verifies; the native files
//! are an extra for InfluxDB's own restore. A failure is an ERROR, counted, and said in the
//! manifest and the status readings (`native_ok`).
//!
//! The tool writes into a scratch directory (emptied before and after each run, so a kill
//! leaves nothing that grows), from which each file is uploaded as it is and read back.

use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use crate::config::InfluxPlan;
use crate::manifest::{self, NativeFile};
use crate::store::{Store, StoreError};

/// Which of InfluxDB's tools.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Tool {
    /// InfluxDB 1.x: `influxd backup -portable`.
    Influxd,
    /// InfluxDB 2.x: `influx backup`.
    Influx,
}

impl Tool {
    pub const fn as_str(self) -> &'static str {
        match self {
            Tool::Influxd => "influxd",
            Tool::Influx => "influx",
        }
    }
}

/// `[backup_rotator.native]`, resolved.
#[derive(Debug, Clone)]
pub struct NativePlan {
    pub tool: Tool,
    /// The program, found on PATH or as configured.
    pub command: PathBuf,
    /// influxd: the RPC address.
    pub rpc: String,
    /// influx: only this bucket of this organisation (default: everything, with metadata).
    pub org: Option<String>,
    pub bucket: Option<String>,
    pub timeout: Duration,
    /// The scratch directory (`None`: `<data_dir>/backup-rotator/<instance>/native`).
    pub dir: Option<PathBuf>,
}

/// The most of the tool's output an error carries.
const OUTPUT_TAIL: usize = 1500;

/// Run the tool into `dir` (emptied first): the files it wrote, by name.
pub async fn take(
    plan: &NativePlan,
    influx: &InfluxPlan,
    token: Option<&str>,
    dir: &Path,
) -> Result<Vec<(String, PathBuf)>, String> {
    clear(dir)?;
    if plan.tool == Tool::Influxd {
        // influxd backup retries a closed port for many minutes, saying little: ask first.
        let connect = tokio::net::TcpStream::connect(plan.rpc.as_str());
        match tokio::time::timeout(Duration::from_secs(10), connect).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(rpc_closed(&plan.rpc, &e.to_string())),
            Err(_) => return Err(rpc_closed(&plan.rpc, "no answer within 10 s")),
        }
    }
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let mut cmd = command(plan, influx, token, dir);
    let program = plan.command.display().to_string();
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot start {program}: {e}"))?;
    // Its output is read as it comes and only the end kept: a tool that talks a lot (influxd
    // logs every shard) must not fill a Pi's memory.
    let (out_tail, err_tail) = (Tail::default(), Tail::default());
    let out = child
        .stdout
        .take()
        .map(|o| tokio::spawn(keep_tail(o, out_tail.clone())));
    let err = child
        .stderr
        .take()
        .map(|e| tokio::spawn(keep_tail(e, err_tail.clone())));
    let status = tokio::time::timeout(plan.timeout, child.wait())
        .await
        .map_err(|_| {
            format!(
                "{program} did not finish within {} s (killed)",
                plan.timeout.as_secs()
            )
        })?
        .map_err(|e| format!("{program}: {e}"))?;
    if !status.success() {
        // A child the tool left behind may hold its output open: what was said within a
        // moment is enough.
        for reader in [err, out].into_iter().flatten() {
            let abort = reader.abort_handle();
            if tokio::time::timeout(Duration::from_secs(2), reader)
                .await
                .is_err()
            {
                abort.abort();
            }
        }
        let mut text = String::new();
        // stderr last: a tool says why it failed there, and the end is what is kept.
        for t in [out_tail, err_tail] {
            let kept = t.lock().map(|b| b.clone()).unwrap_or_default();
            text.push_str(String::from_utf8_lossy(&kept).trim());
            text.push('\n');
        }
        return Err(format!(
            "{program} {} ({status}): {}",
            plan.tool.as_str(),
            tail(text.trim())
        ));
    }
    for reader in [out, err].into_iter().flatten() {
        reader.abort();
    }
    let mut files = Vec::new();
    let entries =
        std::fs::read_dir(dir).map_err(|e| format!("cannot read {}: {e}", dir.display()))?;
    for e in entries {
        let e = e.map_err(|e| format!("cannot read {}: {e}", dir.display()))?;
        let name = e.file_name().to_string_lossy().into_owned();
        let is_file = e.file_type().map(|t| t.is_file()).unwrap_or(false);
        if !is_file || manifest::native_file(&name).is_none() {
            return Err(format!(
                "{program} wrote {name:?}, which wattbus does not store (a directory, or a name with unusual characters)"
            ));
        }
        files.push((name, e.path()));
    }
    if files.is_empty() {
        return Err(format!("{program} wrote no files"));
    }
    files.sort();
    Ok(files)
}

fn rpc_closed(rpc: &str, why: &str) -> String {
    format!(
        "InfluxDB's RPC port {rpc} does not answer ({why}): set `bind-address` in influxdb.conf (in a container INFLUXDB_BIND_ADDRESS=:8088, published to this host only) and native.rpc to match"
    )
}

/// The tool's command line, writing into `dir`.
fn command(
    plan: &NativePlan,
    influx: &InfluxPlan,
    token: Option<&str>,
    dir: &Path,
) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(&plan.command);
    match plan.tool {
        Tool::Influxd => {
            cmd.args(["backup", "-portable", "-database", &influx.database])
                .args(["-host", &plan.rpc]);
        }
        Tool::Influx => {
            cmd.args(["backup", "--host", &influx.url]);
            if let Some(org) = &plan.org {
                cmd.args(["--org", org]);
            }
            if let Some(bucket) = &plan.bucket {
                cmd.args(["--bucket", bucket]);
            }
            // The token through the environment: the command line is visible to every user.
            if let Some(t) = token {
                cmd.env("INFLUX_TOKEN", t);
            }
        }
    }
    cmd.arg(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    cmd
}

/// The end of what a tool said on one of its outputs.
type Tail = std::sync::Arc<std::sync::Mutex<Vec<u8>>>;

/// Read `r` to its end, keeping only about the last `OUTPUT_TAIL` bytes in `kept`.
async fn keep_tail(mut r: impl tokio::io::AsyncRead + Unpin, kept: Tail) {
    use tokio::io::AsyncReadExt as _;
    let mut buf = [0u8; 8192];
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                let Ok(mut k) = kept.lock() else { return };
                k.extend_from_slice(&buf[..n]);
                if k.len() > OUTPUT_TAIL * 2 {
                    let cut = k.len() - OUTPUT_TAIL;
                    k.drain(..cut);
                }
            }
        }
    }
}

/// The last `OUTPUT_TAIL` bytes of a tool's output (its error is at the end).
fn tail(text: &str) -> &str {
    let mut start = text.len().saturating_sub(OUTPUT_TAIL);
    while !text.is_char_boundary(start) {
        start += 1;
    }
    &text[start..]
}

/// Remove the scratch directory (what a run, or a killed one, left).
pub fn clear(dir: &Path) -> Result<(), String> {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(format!("cannot empty {}: {e}", dir.display())),
    }
}

/// Why the tool's files are not all stored.
#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    /// Reading a file the tool wrote (the scratch disk): the native backup fails, the set
    /// does not.
    #[error("{0}")]
    Local(String),
    /// The storage: the set fails like any upload.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Upload the tool's files into set `id`, each read back (size and SHA-256) before the next.
pub async fn upload(
    store: &Store,
    id: &str,
    files: &[(String, PathBuf)],
) -> Result<Vec<NativeFile>, UploadError> {
    let mut out = Vec::with_capacity(files.len());
    let mut buf = vec![0u8; 1 << 20];
    for (name, path) in files {
        let object = manifest::native_file(name)
            .ok_or_else(|| UploadError::Local(format!("{name:?} is not a name wattbus stores")))?;
        let io = |e: std::io::Error| UploadError::Local(format!("{}: {e}", path.display()));
        let mut f = std::fs::File::open(path).map_err(io)?;
        let mut w = store.file_writer(id, &object).await?;
        loop {
            // A MiB at a time from the local disk: short enough not to stall the runtime.
            let n = match f.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    w.abort().await;
                    return Err(io(e));
                }
            };
            if let Err(e) = w.write(&buf[..n]).await {
                w.abort().await;
                return Err(e.into());
            }
        }
        let (bytes, sha256) = w.finish().await?;
        store
            .read_file(id, &object, bytes, &sha256, |_| Ok(()))
            .await?;
        out.push(NativeFile {
            file: object,
            bytes,
            sha256,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(tool: Tool) -> NativePlan {
        NativePlan {
            tool,
            command: PathBuf::from("/usr/bin/x"),
            rpc: "127.0.0.1:8088".into(),
            org: Some("home".into()),
            bucket: Some("wattbus".into()),
            timeout: Duration::from_secs(60),
            dir: None,
        }
    }

    fn args(cmd: &tokio::process::Command) -> Vec<String> {
        cmd.as_std()
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect()
    }

    #[test]
    fn the_command_lines_as_influxdb_documents_them_and_the_token_never_on_one() {
        let influx = InfluxPlan {
            url: "https://nas:8086".into(),
            database: "wattbus".into(),
            auth: None,
            timeout: Duration::from_secs(30),
            chunk_rows: 100,
        };
        let dir = Path::new("/scratch");
        let c = command(&plan(Tool::Influxd), &influx, None, dir);
        assert_eq!(
            args(&c),
            [
                "backup",
                "-portable",
                "-database",
                "wattbus",
                "-host",
                "127.0.0.1:8088",
                "/scratch"
            ]
        );
        let c = command(&plan(Tool::Influx), &influx, Some("s3cret"), dir);
        assert_eq!(
            args(&c),
            [
                "backup",
                "--host",
                "https://nas:8086",
                "--org",
                "home",
                "--bucket",
                "wattbus",
                "/scratch"
            ]
        );
        assert!(!args(&c).iter().any(|a| a.contains("s3cret")));
        let env: Vec<(String, String)> = c
            .as_std()
            .get_envs()
            .filter_map(|(k, v)| {
                Some((
                    k.to_string_lossy().into_owned(),
                    v?.to_string_lossy().into_owned(),
                ))
            })
            .collect();
        assert_eq!(env, [("INFLUX_TOKEN".to_string(), "s3cret".to_string())]);
    }

    /// A tool script, written by a shell rather than by this process: a file this process
    /// holds open for writing is inherited by every child another test thread forks meanwhile,
    /// and exec'ing it then fails with ETXTBSY ("Text file busy") until that child execs.
    fn script(dir: &Path, body: &str) -> PathBuf {
        let path = dir.join("tool.sh");
        let written = std::process::Command::new("sh")
            .args([
                "-c",
                "printf '%s\\n' '#!/bin/sh' \"$1\" > \"$2\" && chmod 755 \"$2\"",
                "sh",
            ])
            .arg(body)
            .arg(&path)
            .status()
            .unwrap();
        assert!(written.success());
        path
    }

    fn influx() -> InfluxPlan {
        InfluxPlan {
            url: "http://127.0.0.1:1".into(),
            database: "wattbus".into(),
            auth: None,
            timeout: Duration::from_secs(30),
            chunk_rows: 100,
        }
    }

    #[tokio::test]
    async fn a_talkative_failing_tool_with_a_child_left_behind_gives_the_end_of_what_it_said_at_once()
     {
        let dir = tempfile::tempdir().unwrap();
        // 20 MB of chatter, then the reason; a background child keeps the output open.
        let tool = script(
            dir.path(),
            "head -c 20000000 /dev/zero | tr '\\0' x\necho; echo 'the reason' >&2\n(sleep 60 &)\nexit 3",
        );
        let mut p = plan(Tool::Influx);
        p.command = tool;
        let started = std::time::Instant::now();
        let e = take(&p, &influx(), None, &dir.path().join("scratch"))
            .await
            .unwrap_err();
        assert!(e.contains("the reason"), "{}", tail(&e));
        assert!(e.len() < 3 * OUTPUT_TAIL, "{} bytes", e.len());
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "waited for the child left behind"
        );
    }

    #[tokio::test]
    async fn only_plain_files_with_plain_names_are_taken() {
        let dir = tempfile::tempdir().unwrap();
        let scratch = dir.path().join("scratch");
        let mut p = plan(Tool::Influx);
        // The tool gets the scratch directory as its last argument.
        for (body, ok) in [
            (
                "for d; do :; done; echo x > \"$d/20261204T000000Z.meta\"",
                true,
            ),
            ("for d; do :; done; mkdir \"$d/sub\"", false),
            ("for d; do :; done; ln -s /etc/passwd \"$d/a.meta\"", false),
            ("for d; do :; done; echo x > \"$d/with space\"", false),
            ("exit 0", false),
        ] {
            p.command = script(dir.path(), body);
            let got = take(&p, &influx(), None, &scratch).await;
            assert_eq!(got.is_ok(), ok, "{body}: {got:?}");
        }
    }

    #[test]
    fn an_error_keeps_the_end_of_the_output() {
        let long = format!("{}the reason", "é".repeat(2000));
        let t = tail(&long);
        assert!(t.ends_with("the reason"));
        assert!(t.len() <= OUTPUT_TAIL);
    }
}
