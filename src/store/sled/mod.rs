//! The sled implementation of the storage seam: its trees, key encodings, units of work and
//! the flush discipline.
//!
//! Nothing outside this module touches sled. Every public method is `async` and runs its sled
//! calls on the blocking pool, so the executor is never blocked. Writes become durable only when
//! [`Store::durable`] returns: one flusher thread batches every waiting caller into one `flush()`
//! (group commit). sled 0.34's `flush_async` is deliberately not used: it deadlocks when several
//! flushes are awaited at once (spacejam/sled#1241).

mod accounts;
mod attribution;
mod conversions;
mod open;
mod unit;

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio::sync::oneshot;

use crate::domain::account::{Account, ApiKey};

pub use open::MARKER_FILE;

use async_trait::async_trait;

pub(crate) use super::layout::{decode, encode, key, prefix};
use super::{StoreError, StoreHealth};
use unit::Tx;

/// The on-disk layout this build reads and writes. Bump it with a migration when key encodings
/// or record shapes change incompatibly.
pub const LAYOUT_VERSION: u32 = 1;

const LAYOUT_KEY: &[u8] = b"layout_version";

/// How long `/healthz` waits for its probe of a failed store.
const LIVENESS_PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// sled's `flush()` and, after it, an fsync of its `db` file.
///
/// On Linux sled makes its log durable with `sync_file_range`, which writes the data pages but
/// not the file's new size or newly allocated blocks; only a background `sync_all` every 500 ms
/// covers those. A power cut in between leaves a store that reopens empty, unreadable or without
/// acknowledged writes (RELIABILITY.md has the measurements). The fsync closes that gap.
#[derive(Clone)]
struct DiskFlush {
    db: sled::Db,
    log_file: Arc<std::fs::File>,
}

impl DiskFlush {
    fn new(db: sled::Db, path: &Path) -> Result<Self, StoreError> {
        let log_path = path.join("db");
        let log_file = std::fs::File::open(&log_path).map_err(|error| StoreError::Io {
            context: format!("cannot open {} to sync it", log_path.display()),
            error,
        })?;
        Ok(Self {
            db,
            log_file: Arc::new(log_file),
        })
    }

    fn flush(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        self.log_file.sync_all().map_err(|error| StoreError::Io {
            context: "syncing the store's db file to disk failed".into(),
            error,
        })
    }
}

/// One flusher thread that turns many "make my writes durable" requests into one `flush()`.
struct Flusher {
    requests: std::sync::mpsc::Sender<oneshot::Sender<Result<(), String>>>,
}

impl Flusher {
    fn spawn(disk: DiskFlush) -> std::io::Result<Self> {
        let (requests, incoming) =
            std::sync::mpsc::channel::<oneshot::Sender<Result<(), String>>>();
        std::thread::Builder::new()
            .name("ctwa-flusher".into())
            .spawn(move || {
                // Every request in a batch was sent after its writes finished, and the flush starts
                // after the batch is taken, so one flush covers them all.
                while let Ok(first) = incoming.recv() {
                    let mut waiting = vec![first];
                    waiting.extend(incoming.try_iter());
                    let result = disk
                        .flush()
                        .map_err(|error| crate::error::error_chain(&error));
                    for waiter in waiting {
                        let _ = waiter.send(result.clone());
                    }
                }
            })?;
        Ok(Self { requests })
    }
}

pub(crate) struct Trees {
    db: sled::Db,
    meta: sled::Tree,
    accounts: sled::Tree,
    account_by_phone_number_id: sled::Tree,
    /// Ids of deleted accounts (tombstones): never given to a new account.
    retired_accounts: sled::Tree,
    api_keys: sled::Tree,
    users: sled::Tree,
    phone_index: sled::Tree,
    bsuid_index: sled::Tree,
    conversations: sled::Tree,
    messages: sled::Tree,
    pending_events: sled::Tree,
    journal: sled::Tree,
    unrouted: sled::Tree,
    unparseable: sled::Tree,
    conversion_records: sled::Tree,
    conversion_history: sled::Tree,
    conversion_by_conversation: sled::Tree,
    outbox: sled::Tree,
}

#[derive(Default)]
struct Caches {
    accounts: HashMap<String, Account>,
    account_by_phone_number_id: HashMap<String, String>,
    api_keys_by_hash: HashMap<String, ApiKey>,
}

/// What a unit leaves behind once it ran: it answers its caller when its batch was applied.
type Completion = Box<dyn FnOnce(Result<(), sled::Error>) + Send>;

/// A unit of work for the writer thread: it runs over the batch's [`Tx`] and says how to answer.
type UnitJob = Box<dyn FnOnce(&mut Tx<'_>) -> Completion + Send>;

/// The most units the writer applies in one sled transaction.
const MAX_BATCH: usize = 256;

/// The one thread that changes state (users, conversations, message ids, pending events,
/// the journal of webhooks, accounts, conversion records). Running every read-modify-write on one
/// thread keeps them from interleaving without a lock that dozens of blocking threads would queue
/// on. It takes every unit waiting, runs them one after another over one [`Tx`] (a unit that
/// fails is rolled back alone), and applies their writes in one sled transaction: a crash keeps
/// each unit whole or not at all, and a burst of webhooks costs one transaction, not one each.
struct Writer {
    jobs: std::sync::mpsc::Sender<(Arc<Inner>, UnitJob)>,
}

impl Writer {
    fn spawn() -> std::io::Result<Self> {
        let (jobs, incoming) = std::sync::mpsc::channel::<(Arc<Inner>, UnitJob)>();
        std::thread::Builder::new()
            .name("ctwa-writer".into())
            .spawn(move || {
                while let Ok((inner, first)) = incoming.recv() {
                    let mut batch = vec![first];
                    batch.extend(incoming.try_iter().take(MAX_BATCH - 1).map(|(_, job)| job));
                    let mut tx = Tx::new(&inner);
                    let mut completions = Vec::with_capacity(batch.len());
                    for job in batch {
                        tx.begin_unit();
                        // A panicking unit drops its reply, so its caller gets an error; its
                        // writes are undone and the units behind it carry on.
                        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                            job(&mut tx)
                        })) {
                            Ok(completion) => completions.push(completion),
                            Err(_) => tx.rollback_unit(),
                        }
                    }
                    let applied = tx.apply();
                    for completion in completions {
                        completion(applied.clone());
                    }
                }
            })?;
        Ok(Self { jobs })
    }
}

struct Inner {
    trees: Trees,
    writer: Writer,
    caches: RwLock<Caches>,
    flusher: Flusher,
    /// For the synchronous flush at shutdown.
    disk: DiskFlush,
    /// The last write or flush failure, kept until a readiness probe succeeds. sled 0.34 keeps an
    /// I/O error for good, so once set this usually stays set until the process restarts.
    failure: Mutex<Option<String>>,
}

/// The sled store; cheap to clone.
#[derive(Clone)]
pub struct SledStore {
    inner: Arc<Inner>,
}

/// The name the engine's own files use for it.
type Store = SledStore;

impl SledStore {
    /// Opens (or creates) the store in `path`, checks its layout version and loads the caches.
    /// Refuses a store that existed but cannot be read or reads as empty (see [`open`]).
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        Self::open_with_free_space(path, 0)
    }

    /// Like [`Store::open`], and first refuses to start when the data dir's file system has less
    /// than `min_free_bytes` available.
    pub fn open_with_free_space(path: &Path, min_free_bytes: u64) -> Result<Self, StoreError> {
        Self::open_with(path, min_free_bytes, super::DEFAULT_CACHE_BYTES)
    }

    /// Like [`SledStore::open_with_free_space`], with sled's page cache bounded to
    /// `cache_bytes` (`CTWA_CACHE_MB`).
    pub fn open_with(
        path: &Path,
        min_free_bytes: u64,
        cache_bytes: u64,
    ) -> Result<Self, StoreError> {
        std::fs::create_dir_all(path).map_err(|error| StoreError::Io {
            context: format!("cannot create {}", path.display()),
            error,
        })?;
        let opened = open::open_checked(path, min_free_bytes, cache_bytes)?;
        let db = opened.db.clone();
        let meta = db.open_tree("meta")?;
        match meta.get(LAYOUT_KEY)? {
            None => {
                if let Some(refusal) = opened.reads_as_empty(path) {
                    return Err(refusal);
                }
                meta.insert(LAYOUT_KEY, LAYOUT_VERSION.to_string().as_bytes())?;
                DiskFlush::new(db.clone(), path)?.flush()?;
                opened.make_existence_durable(path)?;
            }
            Some(found) if found.as_ref() == LAYOUT_VERSION.to_string().as_bytes() => {
                // Stores created before the marker existed get it now.
                opened.make_existence_durable(path)?;
            }
            Some(found) => {
                return Err(StoreError::LayoutVersion {
                    path: path.display().to_string(),
                    found: String::from_utf8_lossy(&found).into_owned(),
                    expected: LAYOUT_VERSION,
                })
            }
        }
        let trees = Trees {
            meta,
            accounts: db.open_tree("accounts")?,
            account_by_phone_number_id: db.open_tree("account_by_phone_number_id")?,
            retired_accounts: db.open_tree("retired_accounts")?,
            api_keys: db.open_tree("api_keys")?,
            users: db.open_tree("users")?,
            phone_index: db.open_tree("phone_index")?,
            bsuid_index: db.open_tree("bsuid_index")?,
            conversations: db.open_tree("conversations")?,
            messages: db.open_tree("messages")?,
            pending_events: db.open_tree("pending_events")?,
            journal: db.open_tree("journal")?,
            unrouted: db.open_tree("unrouted")?,
            unparseable: db.open_tree("unparseable")?,
            conversion_records: db.open_tree("conversion_records")?,
            conversion_history: db.open_tree("conversion_history")?,
            conversion_by_conversation: db.open_tree("conversion_by_conversation")?,
            outbox: db.open_tree("outbox")?,
            db: db.clone(),
        };
        let caches = accounts::load_caches(&trees)?;
        let disk = DiskFlush::new(db, path)?;
        let flusher = Flusher::spawn(disk.clone())
            .map_err(|error| StoreError::Flush(format!("cannot start the flusher: {error}")))?;
        let writer = Writer::spawn()
            .map_err(|error| StoreError::Flush(format!("cannot start the writer: {error}")))?;
        Ok(Self {
            inner: Arc::new(Inner {
                trees,
                writer,
                caches: RwLock::new(caches),
                flusher,
                disk,
                failure: Mutex::new(None),
            }),
        })
    }

    /// The open database, for `store::migrate`, which copies every tree.
    pub(crate) fn database(&self) -> sled::Db {
        self.inner.trees.db.clone()
    }

    /// Runs sled work on the blocking pool.
    async fn run<T, F>(&self, work: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Inner) -> Result<T, StoreError> + Send + 'static,
    {
        let inner = Arc::clone(&self.inner);
        let outcome = crate::telemetry::spawn_blocking_in_span(move || work(&inner))
            .await
            .map_err(|_| StoreError::TaskGone)
            .and_then(|outcome| outcome);
        self.noted(outcome)
    }

    /// Runs `work` on the writer thread as one unit, after every unit submitted before it: its
    /// writes are buffered in the batch's [`Tx`] (undone alone if it fails) and applied with the
    /// batch in one sled transaction, all or nothing. Not yet durable: see [`Self::commit`].
    async fn apply_unit<T, F>(&self, work: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Tx<'_>) -> Result<T, StoreError> + Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        // The unit runs in the caller's span, so its log lines carry the request id.
        let span = tracing::Span::current();
        let job: UnitJob = Box::new(move |tx| match span.in_scope(|| work(tx)) {
            Ok(value) => Box::new(move |applied: Result<(), sled::Error>| {
                let _ = reply.send(applied.map(|()| value).map_err(StoreError::Sled));
            }),
            Err(error) => {
                tx.rollback_unit();
                Box::new(move |_| {
                    let _ = reply.send(Err(error));
                })
            }
        });
        let outcome = match self.inner.writer.jobs.send((Arc::clone(&self.inner), job)) {
            Ok(()) => answer
                .await
                .map_err(|_| StoreError::TaskGone)
                .and_then(|outcome| outcome),
            Err(_) => Err(StoreError::TaskGone),
        };
        self.noted(outcome)
    }

    /// [`Self::apply_unit`], then durable before it returns: the seam's convention for writes.
    async fn commit<T, F>(&self, work: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Tx<'_>) -> Result<T, StoreError> + Send + 'static,
    {
        let value = self.apply_unit(work).await?;
        self.durable().await?;
        Ok(value)
    }

    /// Returns once every write made before the call is on disk. Concurrent callers share one
    /// `flush()`.
    pub async fn durable(&self) -> Result<(), StoreError> {
        let (reply, done) = oneshot::channel();
        let outcome = match self.inner.flusher.requests.send(reply) {
            Ok(()) => done
                .await
                .map_err(|_| StoreError::TaskGone)
                .and_then(|flushed| flushed.map_err(StoreError::Flush)),
            Err(_) => Err(StoreError::TaskGone),
        };
        self.noted(outcome)
    }

    /// Remembers a failure that means the disk or sled refused a write or a flush.
    fn noted<T>(&self, outcome: Result<T, StoreError>) -> Result<T, StoreError> {
        if let Err(error) = &outcome {
            if error.is_store_failure() {
                let mut failure = self.inner.failure.lock().unwrap_or_else(|p| p.into_inner());
                if failure.is_none() {
                    let text = crate::error::error_chain(error);
                    tracing::error!(
                        error = %text,
                        "the store failed; /healthz answers 503 until a write, flush and read \
                         back succeed again"
                    );
                    *failure = Some(text);
                }
            }
        }
        outcome
    }
}

#[async_trait]
impl StoreHealth for SledStore {
    /// The failure remembered since the last successful probe, if any.
    fn failure(&self) -> Option<String> {
        self.inner
            .failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Liveness: cheap while nothing has failed. After a write or flush failed, a fresh readiness
    /// probe decides: success forgets the failure, another failure is returned.
    async fn check_alive(&self) -> Result<(), StoreError> {
        if self.failure().is_none() {
            return Ok(());
        }
        let probe = tokio::time::timeout(LIVENESS_PROBE_TIMEOUT, self.check_ready()).await;
        match probe {
            Ok(Ok(())) => {
                let mut failure = self.inner.failure.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(previous) = failure.take() {
                    tracing::info!(previous = %previous, "the store works again");
                }
                Ok(())
            }
            Ok(Err(error)) => Err(error),
            Err(_) => Err(StoreError::Flush(format!(
                "the probe did not finish within {} s",
                LIVENESS_PROBE_TIMEOUT.as_secs()
            ))),
        }
    }

    /// Readiness: a write, a durable flush and a read back.
    async fn check_ready(&self) -> Result<(), StoreError> {
        let stamp = chrono::Utc::now().timestamp_millis().to_be_bytes();
        self.run(move |inner| {
            inner.trees.meta.insert(b"readyz", &stamp)?;
            Ok(())
        })
        .await?;
        self.durable().await?;
        let read = self
            .run(|inner| Ok(inner.trees.meta.get(b"readyz")?))
            .await?;
        match read {
            Some(value) if value.as_ref() == stamp => Ok(()),
            _ => Err(StoreError::Corrupt(
                "the readiness probe did not read back its own write".into(),
            )),
        }
    }

    /// A synchronous flush, for the very end of shutdown.
    fn flush_blocking(&self) -> Result<(), StoreError> {
        let outcome = self.inner.disk.flush();
        self.noted(outcome)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_newer_layout_is_refused_with_a_clear_message() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = sled::open(dir.path()).unwrap();
            db.open_tree("meta")
                .unwrap()
                .insert(LAYOUT_KEY, b"99")
                .unwrap();
            db.flush().unwrap();
        }
        // sled releases its file lock from a background thread after the drop; wait for it.
        let mut outcome = Store::open(dir.path());
        for _ in 0..100 {
            if !matches!(outcome, Err(StoreError::Sled(_))) {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
            outcome = Store::open(dir.path());
        }
        let message = outcome.err().unwrap().to_string();
        assert!(message.contains("layout version 99"), "{message}");
    }

    #[tokio::test]
    async fn concurrent_durable_calls_all_return() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let waits: Vec<_> = (0..64)
            .map(|_| {
                let store = store.clone();
                tokio::spawn(async move { store.durable().await })
            })
            .collect();
        for wait in waits {
            wait.await.unwrap().unwrap();
        }
        store.check_ready().await.unwrap();
    }

    /// sled releases its file lock from a background thread after a drop; retry while it does.
    fn open_when_unlocked(path: &Path) -> Result<Store, StoreError> {
        let mut outcome = Store::open(path);
        for _ in 0..100 {
            let locked = matches!(&outcome, Err(StoreError::Sled(sled::Error::Io(error)))
                if error.to_string().contains("could not acquire lock"));
            if !locked {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
            outcome = Store::open(path);
        }
        outcome
    }

    async fn store_with_a_record(path: &Path) {
        let store = Store::open(path).unwrap();
        store
            .run(|inner| {
                inner.trees.users.insert(b"user", b"{}")?;
                Ok(())
            })
            .await
            .unwrap();
        store.durable().await.unwrap();
    }

    fn refusal(outcome: Result<Store, StoreError>) -> String {
        match outcome {
            Ok(_) => panic!("the store opened"),
            Err(error) => crate::error::error_chain(&error),
        }
    }

    #[tokio::test]
    async fn a_fresh_path_and_an_empty_directory_open_and_get_a_durable_marker() {
        let dir = tempfile::tempdir().unwrap();
        let fresh = dir.path().join("new").join("store");
        Store::open(&fresh).unwrap().check_ready().await.unwrap();
        let marker = std::fs::read_to_string(fresh.join(MARKER_FILE)).unwrap();
        assert!(marker.contains("\"engine\":\"sled-0.34\""), "{marker}");
        let empty = tempfile::tempdir().unwrap();
        Store::open(empty.path()).unwrap();
        assert!(empty.path().join(MARKER_FILE).exists());
    }

    #[tokio::test]
    async fn a_store_reopens_with_its_data() {
        let dir = tempfile::tempdir().unwrap();
        store_with_a_record(dir.path()).await;
        let store = open_when_unlocked(dir.path()).unwrap();
        let user = store
            .run(|inner| Ok(inner.trees.users.get(b"user")?))
            .await
            .unwrap();
        assert!(user.is_some());
    }

    #[tokio::test]
    async fn a_store_whose_conf_was_zeroed_is_refused_before_sled_rewrites_it() {
        let dir = tempfile::tempdir().unwrap();
        store_with_a_record(dir.path()).await;
        std::thread::sleep(std::time::Duration::from_millis(200));
        std::fs::write(dir.path().join("conf"), b"").unwrap();
        let message = refusal(open_when_unlocked(dir.path()));
        assert!(message.contains("cannot be opened safely"), "{message}");
        assert!(message.contains("conf (0 bytes)"), "{message}");
        assert!(
            message.contains(&dir.path().display().to_string()),
            "{message}"
        );
        assert!(message.contains("backup"), "{message}");
        assert!(message.contains("move it aside"), "{message}");
        // Nothing was rewritten: the evidence is left for a restore or salvage.
        assert_eq!(std::fs::metadata(dir.path().join("conf")).unwrap().len(), 0);
    }

    #[tokio::test]
    async fn sled_files_without_a_marker_that_read_as_empty_are_refused() {
        // A store from before the marker existed, whose log was lost: sled opens it empty.
        let dir = tempfile::tempdir().unwrap();
        {
            let db = sled::open(dir.path()).unwrap();
            db.flush().unwrap();
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
        let message = refusal(open_when_unlocked(dir.path()));
        assert!(
            message.contains("sled opens them as an empty store"),
            "{message}"
        );
        assert!(!dir.path().join(MARKER_FILE).exists());
    }

    #[tokio::test]
    async fn a_marker_whose_store_reads_as_empty_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        store_with_a_record(dir.path()).await;
        std::thread::sleep(std::time::Duration::from_millis(200));
        // The log is gone but sled's conf survived: sled would open an empty store.
        std::fs::remove_file(dir.path().join("db")).unwrap();
        let message = refusal(open_when_unlocked(dir.path()));
        assert!(message.contains("the marker ctwa-store.json"), "{message}");
        assert!(
            message.contains("sled opens them as an empty store"),
            "{message}"
        );
    }

    #[tokio::test]
    async fn a_corrupt_snapshot_is_refused_as_damaged() {
        let dir = tempfile::tempdir().unwrap();
        store_with_a_record(dir.path()).await;
        std::thread::sleep(std::time::Duration::from_millis(200));
        // The second open writes a snapshot.
        drop(open_when_unlocked(dir.path()).unwrap());
        std::thread::sleep(std::time::Duration::from_millis(200));
        let snapshot = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|entry| entry.unwrap().path())
            .find(|path| {
                path.file_name()
                    .unwrap()
                    .to_string_lossy()
                    .starts_with("snap.")
            })
            .expect("sled wrote a snapshot");
        let mut bytes = std::fs::read(&snapshot).unwrap();
        bytes[0] ^= 0xff;
        std::fs::write(&snapshot, bytes).unwrap();
        let message = refusal(open_when_unlocked(dir.path()));
        assert!(message.contains("sled reports corrupted data"), "{message}");
        assert!(message.contains("backup"), "{message}");
    }

    #[tokio::test]
    async fn a_directory_of_unrelated_files_is_not_made_into_a_store() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("notes.txt"), b"not a store").unwrap();
        let message = refusal(Store::open(dir.path()));
        assert!(
            message.contains("not a ctwa-relay store (notes.txt)"),
            "{message}"
        );
        assert!(!dir.path().join("db").exists());
    }

    #[tokio::test]
    async fn a_store_of_another_engine_is_not_opened() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join(MARKER_FILE),
            "{\"engine\":\"fjall-2\",\"layoutVersion\":2}",
        )
        .unwrap();
        let message = refusal(Store::open(dir.path()));
        assert!(message.contains("does not read"), "{message}");
        assert!(!dir.path().join("db").exists());
    }

    #[tokio::test]
    async fn a_failure_is_remembered_until_a_probe_succeeds() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store.check_alive().await.unwrap();
        let failed: Result<(), StoreError> =
            store.noted(Err(StoreError::Flush("disk full".into())));
        assert!(failed.is_err());
        assert_eq!(
            store.failure().as_deref(),
            Some("flushing the store to disk failed: disk full")
        );
        // Conflicts and corrupt records are not store failures.
        let _ = store.noted::<()>(Err(StoreError::Conflict("taken".into())));
        // The disk works again here, so the probe succeeds and the failure is forgotten.
        store.check_alive().await.unwrap();
        assert_eq!(store.failure(), None);
        let _ = store.noted::<()>(Err(StoreError::Conflict("taken".into())));
        assert_eq!(store.failure(), None);
    }
}
