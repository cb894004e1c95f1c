//! Where the sets are kept, through object_store: a local directory, Azure Blob storage or an
//! S3-compatible store, behind one set of operations on sets (list, write a part, verify,
//! read, delete).
//!
//! Parts are written streaming (gzip into 5 MiB blocks of a multipart upload, at most two in
//! flight), hashed as they go, and read back in 4 MiB ranges to verify: nothing holds a whole
//! part in memory.

use std::io::Write as _;
use std::path::{Path as FsPath, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use flate2::Compression;
use flate2::write::GzEncoder;
use futures_util::TryStreamExt as _;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt as _, PutPayload, WriteMultipart};
use proto::Segment;

use crate::config::{AzureCredential, Storage, StoragePlan};
use crate::manifest::{self, MANIFEST, Manifest, Part};

/// Uploads go in blocks of this size (S3's smallest part).
const BLOCK: usize = 5 << 20;
/// Compressed bytes collected before they are handed to the upload.
const FLUSH: usize = 256 << 10;
/// Reads for verification and restore.
const READ: u64 = 4 << 20;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{store}: {source}")]
    Store {
        store: String,
        #[source]
        source: object_store::Error,
    },
    #[error("cannot set up {what}: {reason}")]
    Setup { what: String, reason: String },
    #[error("{store}: {path} {problem}")]
    Corrupt {
        store: String,
        path: String,
        problem: String,
    },
    #[error("{0}")]
    Io(String),
}

impl StoreError {
    /// Whether this is worth retrying (the storage away or busy) rather than a setting or a
    /// damaged set.
    pub fn is_transient(&self) -> bool {
        match self {
            StoreError::Store { source, .. } => {
                let refused = matches!(
                    source,
                    object_store::Error::NotFound { .. }
                        | object_store::Error::Unauthenticated { .. }
                        | object_store::Error::PermissionDenied { .. }
                        | object_store::Error::NotImplemented { .. }
                );
                // Azure's and S3's refusals (an expired or wrong SAS, a wrong key or secret)
                // come back as a generic error with the service's status and code in its text.
                let text = source.to_string();
                let denied = [
                    "status: 401",
                    "status: 403",
                    "401 Unauthorized",
                    "403 Forbidden",
                    "AuthenticationFailed",
                    "AuthorizationFailure",
                    "AuthorizationPermissionMismatch",
                    "SignatureDoesNotMatch",
                    "InvalidAccessKeyId",
                    "AccessDenied",
                ]
                .iter()
                .any(|t| text.contains(t));
                !(refused || denied)
            }
            StoreError::Io(_) => true,
            StoreError::Setup { .. } | StoreError::Corrupt { .. } => false,
        }
    }
}

/// A set found under the prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    pub id: String,
    /// Its manifest exists: it was finished and verified.
    pub finished: bool,
}

#[derive(Clone)]
pub struct Store {
    inner: Arc<dyn ObjectStore>,
    prefix: Path,
    /// For a local directory: its root (unfinished uploads leave staging files that
    /// object_store does not list; they are removed with the set's directory).
    local_root: Option<PathBuf>,
    describe: String,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe)
    }
}

impl Store {
    /// Open the storage the plan names (no request is made yet).
    pub fn open(plan: &StoragePlan, site: &Segment, data_dir: &FsPath) -> Result<Self, StoreError> {
        let prefix_text = plan.prefix_for(site);
        let prefix = Path::parse(&prefix_text).map_err(|e| StoreError::Setup {
            what: format!("the prefix {prefix_text:?}"),
            reason: e.to_string(),
        })?;
        // reqwest (inside object_store) is built without a default crypto provider; ring is
        // the project's.
        let _ = rustls::crypto::ring::default_provider().install_default();
        // object_store retries a failed request itself: a few times within a minute, so that
        // a SAS near its expiry is still valid, and the run as a whole is retried later.
        let retry = object_store::RetryConfig {
            max_retries: 4,
            retry_timeout: Duration::from_secs(60),
            ..Default::default()
        };
        let (inner, local_root, describe): (Arc<dyn ObjectStore>, _, _) = match &plan.storage {
            Storage::Local { .. } => {
                let dir = plan
                    .local_dir(data_dir)
                    .unwrap_or_else(|| data_dir.join("backups"));
                std::fs::create_dir_all(&dir).map_err(|e| StoreError::Setup {
                    what: format!("the backup directory {}", dir.display()),
                    reason: e.to_string(),
                })?;
                let fs = object_store::local::LocalFileSystem::new_with_prefix(&dir)
                    .map_err(|e| StoreError::Setup {
                        what: format!("the backup directory {}", dir.display()),
                        reason: e.to_string(),
                    })?
                    .with_fsync(true)
                    .with_automatic_cleanup(true);
                let d = format!("local directory {}", dir.join(&prefix_text).display());
                (Arc::new(fs), Some(dir), d)
            }
            Storage::Azure {
                account,
                container,
                credential,
                endpoint,
                allow_http,
            } => {
                let mut b = object_store::azure::MicrosoftAzureBuilder::new()
                    .with_account(account)
                    .with_container_name(container)
                    .with_allow_http(*allow_http)
                    .with_retry(retry);
                if let Some(e) = endpoint {
                    b = b.with_endpoint(e.clone());
                }
                b = match credential {
                    AzureCredential::AccessKey(k) => b.with_access_key(k.expose()),
                    AzureCredential::Sas(s) => b.with_sas_authorization(sas_pairs(s.expose())),
                    AzureCredential::ServicePrincipal {
                        tenant_id,
                        client_id,
                        client_secret,
                    } => b.with_client_secret_authorization(
                        client_id,
                        client_secret.expose(),
                        tenant_id,
                    ),
                };
                let store = b.build().map_err(|e| StoreError::Setup {
                    what: format!("Azure container {account}/{container}"),
                    reason: e.to_string(),
                })?;
                (
                    Arc::new(store),
                    None,
                    format!("Azure container {account}/{container}, prefix {prefix_text}"),
                )
            }
            Storage::S3 {
                bucket,
                region,
                endpoint,
                allow_http,
                access_key_id,
                secret_access_key,
            } => {
                let mut b = object_store::aws::AmazonS3Builder::new()
                    .with_bucket_name(bucket)
                    .with_allow_http(*allow_http)
                    .with_retry(retry);
                if let Some(r) = region {
                    b = b.with_region(r);
                }
                if let Some(e) = endpoint {
                    b = b.with_endpoint(e);
                }
                if let (Some(id), Some(secret)) = (access_key_id, secret_access_key) {
                    b = b
                        .with_access_key_id(id)
                        .with_secret_access_key(secret.expose());
                }
                let store = b.build().map_err(|e| StoreError::Setup {
                    what: format!("S3 bucket {bucket}"),
                    reason: e.to_string(),
                })?;
                (
                    Arc::new(store),
                    None,
                    format!("S3 bucket {bucket}, prefix {prefix_text}"),
                )
            }
        };
        Ok(Self {
            inner,
            prefix,
            local_root,
            describe,
        })
    }

    /// `local directory /var/lib/wattbus/backups/home`, `Azure container acct/backups, prefix
    /// home`: for logs and errors (never a credential).
    pub fn describe(&self) -> &str {
        &self.describe
    }

    fn err(&self, source: object_store::Error) -> StoreError {
        StoreError::Store {
            store: self.describe.clone(),
            source,
        }
    }

    /// The object of `file` in set `id` (`file` may name a folder: `native/<name>`).
    fn path(&self, id: &str, file: &str) -> Path {
        file.split('/')
            .fold(self.prefix.clone().join(id), |p, part| p.join(part))
    }

    /// The objects of one set.
    async fn objects_of(&self, id: &str) -> Result<Vec<object_store::ObjectMeta>, StoreError> {
        let dir = self.prefix.clone().join(id);
        self.inner
            .list(Some(&dir))
            .try_collect()
            .await
            .map_err(|e| self.err(e))
    }

    /// Every part of `m` (and file of its native backup) present with the size it was
    /// uploaded with: checked right before the manifest is written (something else writing
    /// to the same prefix could have removed one since it was read back).
    pub async fn check_parts(&self, m: &Manifest) -> Result<(), StoreError> {
        let objects = self.objects_of(&m.id).await?;
        let files = m.parts.iter().map(|p| (p.file.as_str(), p.bytes)).chain(
            m.native
                .iter()
                .flat_map(|n| &n.files)
                .map(|f| (f.file.as_str(), f.bytes)),
        );
        for (file, bytes) in files {
            let path = self.path(&m.id, file);
            let found = objects.iter().find(|o| o.location == path);
            if found.map(|o| o.size) != Some(bytes) {
                return Err(StoreError::Corrupt {
                    store: self.describe.clone(),
                    path: format!("{}/{file}", m.id),
                    problem: format!(
                        "is {} right before the manifest (uploaded: {bytes} bytes): something else writes to this prefix?",
                        found.map_or("missing".to_string(), |o| format!("{} bytes", o.size)),
                    ),
                });
            }
        }
        Ok(())
    }

    /// Every set under the prefix, oldest first, finished or not.
    pub async fn list(&self) -> Result<Vec<Listed>, StoreError> {
        let objects: Vec<object_store::ObjectMeta> = self
            .inner
            .list(Some(&self.prefix))
            .try_collect()
            .await
            .map_err(|e| self.err(e))?;
        let depth = self.prefix.parts().count();
        let mut sets: std::collections::BTreeMap<String, bool> = Default::default();
        for o in &objects {
            let parts: Vec<String> = o
                .location
                .parts()
                .skip(depth)
                .map(|p| p.as_ref().to_string())
                .collect();
            if let [id, file] = parts.as_slice()
                && manifest::valid_id(id)
            {
                let finished = sets.entry(id.clone()).or_insert(false);
                *finished |= file == MANIFEST;
            }
        }
        // A local set whose only file is a staging file (killed mid-upload) is not listed by
        // object_store; its directory is.
        if let Some(root) = &self.local_root {
            let dir = root.join(self.prefix.as_ref());
            if let Ok(entries) = std::fs::read_dir(&dir) {
                for e in entries.flatten() {
                    if let Some(id) = e.file_name().to_str()
                        && manifest::valid_id(id)
                    {
                        sets.entry(id.to_string()).or_insert(false);
                    }
                }
            }
        }
        Ok(sets
            .into_iter()
            .map(|(id, finished)| Listed { id, finished })
            .collect())
    }

    pub async fn manifest(&self, id: &str) -> Result<Manifest, StoreError> {
        let path = self.path(id, MANIFEST);
        let bytes = self
            .inner
            .get(&path)
            .await
            .map_err(|e| self.err(e))?
            .bytes()
            .await
            .map_err(|e| self.err(e))?;
        let m = Manifest::from_json(&bytes).map_err(|problem| StoreError::Corrupt {
            store: self.describe.clone(),
            path: path.to_string(),
            problem,
        })?;
        if m.id != id {
            return Err(StoreError::Corrupt {
                store: self.describe.clone(),
                path: path.to_string(),
                problem: format!("names set {:?}", m.id),
            });
        }
        Ok(m)
    }

    /// Write the manifest (the set's commit) and read it back.
    pub async fn put_manifest(&self, m: &Manifest) -> Result<(), StoreError> {
        let path = self.path(&m.id, MANIFEST);
        let json = serde_json::to_vec_pretty(m).map_err(|e| StoreError::Io(e.to_string()))?;
        self.inner
            .put(&path, PutPayload::from(json.clone()))
            .await
            .map_err(|e| self.err(e))?;
        let back = self.manifest(&m.id).await?;
        if &back != m {
            return Err(StoreError::Corrupt {
                store: self.describe.clone(),
                path: path.to_string(),
                problem: "reads back different from what was written".into(),
            });
        }
        Ok(())
    }

    /// Start writing part `file` of set `id`: what is written is gzip'd.
    pub async fn part_writer(&self, id: &str, file: &str) -> Result<PartWriter, StoreError> {
        self.writer(id, file, true).await
    }

    /// Start writing `file` of set `id` as it is given (a native backup's files).
    pub async fn file_writer(&self, id: &str, file: &str) -> Result<PartWriter, StoreError> {
        self.writer(id, file, false).await
    }

    async fn writer(&self, id: &str, file: &str, gzip: bool) -> Result<PartWriter, StoreError> {
        let path = self.path(id, file);
        let upload = self
            .inner
            .put_multipart(&path)
            .await
            .map_err(|e| self.err(e))?;
        Ok(PartWriter {
            store: self.clone(),
            upload: Some(WriteMultipart::new_with_chunk_size(upload, BLOCK)),
            gz: Some(if gzip {
                Sink::Gzip(GzEncoder::new(
                    Vec::with_capacity(FLUSH * 2),
                    Compression::new(6),
                ))
            } else {
                Sink::Plain(Vec::with_capacity(FLUSH * 2))
            }),
            sha: ring::digest::Context::new(&ring::digest::SHA256),
            bytes: 0,
            path,
        })
    }

    /// Read part `part` of set `id` back whole, a range at a time, and compare its size and
    /// SHA-256 with the manifest's. `each` sees every range.
    pub async fn read_part(
        &self,
        id: &str,
        part: &Part,
        each: impl FnMut(&[u8]) -> Result<(), String>,
    ) -> Result<(), StoreError> {
        self.read_file(id, &part.file, part.bytes, &part.sha256, each)
            .await
    }

    /// Read `file` of set `id` back whole, a range at a time, checking that it has `bytes`
    /// bytes and SHA-256 `sha256`. `each` sees every range.
    pub async fn read_file(
        &self,
        id: &str,
        file: &str,
        bytes: u64,
        sha256: &str,
        mut each: impl FnMut(&[u8]) -> Result<(), String>,
    ) -> Result<(), StoreError> {
        let mut r = self.reader(id, file, bytes, sha256).await?;
        while let Some(bytes) = r.next().await? {
            each(&bytes).map_err(|problem| r.corrupt(problem))?;
        }
        Ok(())
    }

    /// Read part `part` of set `id` a range at a time: [`PartReader::next`] until `None`,
    /// which checks the size and SHA-256 against the manifest at the end.
    pub async fn part_reader(&self, id: &str, part: &Part) -> Result<PartReader, StoreError> {
        self.reader(id, &part.file, part.bytes, &part.sha256).await
    }

    async fn reader(
        &self,
        id: &str,
        file: &str,
        bytes: u64,
        sha256: &str,
    ) -> Result<PartReader, StoreError> {
        let path = self.path(id, file);
        let meta = self.inner.head(&path).await.map_err(|e| self.err(e))?;
        let r = PartReader {
            store: self.clone(),
            path,
            size: meta.size,
            at: 0,
            sha: ring::digest::Context::new(&ring::digest::SHA256),
            expected: sha256.to_string(),
        };
        if meta.size != bytes {
            return Err(r.corrupt(format!("is {} bytes; the manifest says {bytes}", meta.size)));
        }
        Ok(r)
    }

    /// Delete set `id`: the manifest first, so that a deletion cut short leaves an unfinished
    /// set (cleaned up later), never a manifest naming parts that are gone.
    pub async fn delete_set(&self, id: &str) -> Result<(), StoreError> {
        if !manifest::valid_id(id) {
            return Err(StoreError::Io(format!("{id:?} is not a set id")));
        }
        match self.inner.delete(&self.path(id, MANIFEST)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => return Err(self.err(e)),
        }
        for o in self.objects_of(id).await? {
            match self.inner.delete(&o.location).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(self.err(e)),
            }
        }
        if let Some(root) = &self.local_root {
            let path = root.join(self.prefix.clone().join(id).as_ref());
            match std::fs::remove_dir_all(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(StoreError::Io(format!(
                        "cannot remove {}: {e}",
                        path.display()
                    )));
                }
            }
        }
        Ok(())
    }
}

/// `sv=…&sig=…` as the pairs object_store signs requests with (values URL-decoded).
fn sas_pairs(query: &str) -> Vec<(String, String)> {
    query
        .trim_start_matches('?')
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let (Some(h), Some(l)) = (hexval(b[i + 1]), hexval(b[i + 2]))
        {
            out.push(h * 16 + l);
            i += 3;
            continue;
        }
        out.push(if b[i] == b'+' { b' ' } else { b[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn hexval(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// A part being read back.
pub struct PartReader {
    store: Store,
    path: Path,
    size: u64,
    at: u64,
    sha: ring::digest::Context,
    expected: String,
}

impl std::fmt::Debug for PartReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PartReader({}, {}/{})", self.path, self.at, self.size)
    }
}

impl PartReader {
    fn corrupt(&self, problem: String) -> StoreError {
        StoreError::Corrupt {
            store: self.store.describe.clone(),
            path: self.path.to_string(),
            problem,
        }
    }

    /// The next range, or `None` at the end once the SHA-256 matched.
    pub async fn next(&mut self) -> Result<Option<bytes::Bytes>, StoreError> {
        if self.at > self.size {
            return Ok(None);
        }
        if self.at == self.size {
            let sha = std::mem::replace(
                &mut self.sha,
                ring::digest::Context::new(&ring::digest::SHA256),
            );
            let got = hex(sha.finish().as_ref());
            if got != self.expected {
                return Err(self.corrupt(format!(
                    "has SHA-256 {got}; the manifest says {}",
                    self.expected
                )));
            }
            // Checked once; later calls have nothing more.
            self.size = 0;
            self.at = 1;
            self.expected.clear();
            return Ok(None);
        }
        let end = (self.at + READ).min(self.size);
        let bytes = self
            .store
            .inner
            .get_range(&self.path, self.at..end)
            .await
            .map_err(|e| self.store.err(e))?;
        if bytes.is_empty() {
            return Err(self.corrupt("ended early".into()));
        }
        self.sha.update(&bytes);
        self.at += bytes.len() as u64;
        Ok(Some(bytes))
    }
}

/// What a writer collects before a block goes to the upload.
enum Sink {
    Gzip(GzEncoder<Vec<u8>>),
    Plain(Vec<u8>),
}

impl Sink {
    fn buffer(&mut self) -> &mut Vec<u8> {
        match self {
            Sink::Gzip(gz) => gz.get_mut(),
            Sink::Plain(v) => v,
        }
    }
}

/// One part being written: line protocol in, gzip'd blocks out to the upload (or, for a
/// native backup's files, the bytes as they are).
pub struct PartWriter {
    store: Store,
    upload: Option<WriteMultipart>,
    gz: Option<Sink>,
    sha: ring::digest::Context,
    bytes: u64,
    path: Path,
}

impl std::fmt::Debug for PartWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PartWriter({}, {} bytes)", self.path, self.bytes)
    }
}

impl PartWriter {
    pub async fn write(&mut self, text: &[u8]) -> Result<(), StoreError> {
        let Some(gz) = self.gz.as_mut() else {
            return Err(StoreError::Io("part already finished".into()));
        };
        match gz {
            // Into a Vec: cannot fail but for memory.
            Sink::Gzip(gz) => gz
                .write_all(text)
                .map_err(|e| StoreError::Io(e.to_string()))?,
            Sink::Plain(v) => v.extend_from_slice(text),
        }
        if gz.buffer().len() >= FLUSH {
            let block = std::mem::take(gz.buffer());
            self.send(&block).await?;
        }
        Ok(())
    }

    async fn send(&mut self, block: &[u8]) -> Result<(), StoreError> {
        let Some(upload) = self.upload.as_mut() else {
            return Err(StoreError::Io("part already finished".into()));
        };
        self.sha.update(block);
        self.bytes += block.len() as u64;
        upload.write(block);
        upload
            .wait_for_capacity(2)
            .await
            .map_err(|e| self.store.err(e))
    }

    /// Finish the upload: the part's stored size and SHA-256 (hex).
    pub async fn finish(mut self) -> Result<(u64, String), StoreError> {
        let gz = self
            .gz
            .take()
            .ok_or_else(|| StoreError::Io("part already finished".into()))?;
        let rest = match gz {
            Sink::Gzip(gz) => gz.finish().map_err(|e| StoreError::Io(e.to_string()))?,
            Sink::Plain(v) => v,
        };
        self.send(&rest).await?;
        let upload = self
            .upload
            .take()
            .ok_or_else(|| StoreError::Io("part already finished".into()))?;
        upload.finish().await.map_err(|e| self.store.err(e))?;
        let sha = std::mem::replace(
            &mut self.sha,
            ring::digest::Context::new(&ring::digest::SHA256),
        );
        Ok((self.bytes, hex(sha.finish().as_ref())))
    }

    /// Give the upload up (its blocks are discarded where the store allows).
    pub async fn abort(mut self) {
        if let Some(upload) = self.upload.take()
            && let Err(e) = upload.abort().await
        {
            tracing::debug!(error = %runtime::telemetry::chain(&e), part = %self.path, "Could not abort an upload; the set is cleaned up on the next run.");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sas_query_strings_become_decoded_pairs() {
        let p = sas_pairs("?sv=2022-11-02&se=2027-01-01T00%3A00%3A00Z&sig=a%2Bb%3D&sp=rwdl");
        assert_eq!(
            p,
            vec![
                ("sv".into(), "2022-11-02".into()),
                ("se".into(), "2027-01-01T00:00:00Z".into()),
                ("sig".into(), "a+b=".into()),
                ("sp".into(), "rwdl".into()),
            ]
        );
    }

    #[tokio::test]
    async fn a_part_round_trips_through_a_local_directory_and_damage_is_found() {
        let dir = tempfile::tempdir().expect("tempdir");
        let plan = StoragePlan {
            storage: Storage::Local {
                dir: Some(dir.path().to_path_buf()),
            },
            prefix: None,
        };
        let site = Segment::new("home").expect("valid");
        let store = Store::open(&plan, &site, dir.path()).expect("opens");
        let id = "20260101T000000Z-full";
        let mut w = store.part_writer(id, "0001.lp.gz").await.expect("upload");
        let line = b"power,device=a power_w=1.5 1\n";
        for _ in 0..200_000 {
            w.write(line).await.expect("write");
        }
        let (bytes, sha) = w.finish().await.expect("finish");
        let part = Part {
            file: "0001.lp.gz".into(),
            retention_policy: "autogen".into(),
            measurement: "power".into(),
            fields: Default::default(),
            tags: vec![],
            points: 200_000,
            bytes,
            sha256: sha.clone(),
            skipped: 0,
        };
        let mut gz = flate2::write::GzDecoder::new(Vec::new());
        store
            .read_part(id, &part, |b| gz.write_all(b).map_err(|e| e.to_string()))
            .await
            .expect("verifies");
        let text = gz.finish().expect("gzip");
        assert_eq!(text.len(), line.len() * 200_000);
        assert_eq!(
            store.list().await.expect("list"),
            vec![Listed {
                id: id.into(),
                finished: false
            }]
        );
        // One byte changed on the disk: found.
        let file = dir.path().join("home").join(id).join("0001.lp.gz");
        let mut data = std::fs::read(&file).expect("read");
        let mid = data.len() / 2;
        data[mid] ^= 1;
        std::fs::write(&file, &data).expect("write");
        let e = store
            .read_part(id, &part, |_| Ok(()))
            .await
            .expect_err("damage found");
        assert!(e.to_string().contains("SHA-256"), "{e}");
        store.delete_set(id).await.expect("deleted");
        assert!(store.list().await.expect("list").is_empty());
        assert!(!dir.path().join("home").join(id).exists());
    }
}
