//! The redb implementation of the storage seam (`CTWA_STORE_ENGINE=redb`): one database file,
//! `<data_dir>/ctwa.redb`, one table per sled tree with the same key encodings, and the records
//! as JSON (the layout of [`super::sled`]).
//!
//! Writes: one `ctwa-writer` thread takes every unit waiting (webhooks with their journal
//! entry, account changes, conversion writes), runs them one after another in ONE redb write
//! transaction, commits it once with `Durability::Immediate`, and only then answers them all
//! (group commit: one commit, two fsyncs, per batch). The commit is redb's two-phase commit with
//! quick repair: a power cut never rolls back an answered batch, and a restart after one needs
//! no full repair. A unit that fails is undone alone inside the batch (see [`unit`]), and
//! answered with its error; the others commit. So every unit is atomic, and durable before it
//! is answered.
//!
//! Reads run in their own read transactions on the blocking pool, in parallel with the writer.
//! Accounts and API keys are also held in memory, updated on the writer thread right after the
//! commit that changed them and before anyone is answered.
//!
//! After an I/O error (a full disk, most often) redb refuses every later operation on that
//! `Database` (`PreviousIo`). The writer then closes it and opens the file again in the process
//! (see [`unit::run_writer`]): the reopened database holds exactly what was committed, so the
//! store works again as soon as the disk takes writes, without a restart. A nearly full disk does
//! not stop the store opening: it serves reads, and `/readyz` says the disk is low
//! (`CTWA_MIN_FREE_MB`).

mod accounts;
mod attribution;
mod conversions;
mod open;
mod unit;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use redb::{Database, ReadTransaction, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::oneshot;

pub(crate) use super::layout::{decode, encode, key, prefix};
use super::{StoreError, StoreHealth};
use crate::domain::account::{Account, ApiKey};
pub(crate) use unit::TableName;
use unit::Tx;

pub use open::{DATABASE_FILE, ENGINE};

/// The on-disk layout this build reads and writes: sled's layout 1 (its key encodings and JSON
/// records) in redb tables, with new journal entries compressed in `journal_v2` (layout 2). A
/// layout-1 store is upgraded when it opens ([`open`]); bump this with a migration when the
/// layout changes again.
pub const LAYOUT_VERSION: u32 = 2;

/// The layout of sled stores, which `migrate-store` copies as they are: a layout-2 store reads
/// layout 1's tables.
pub const SLED_LAYOUT_VERSION: u32 = 1;

pub(crate) const LAYOUT_KEY: &[u8] = b"layout_version";
/// The next journal sequence number (8 bytes big-endian), written with every batch that used one.
pub(crate) const NEXT_SEQ_KEY: &[u8] = b"journal_next_seq";

/// How long `/healthz` waits for its probe of a failed store.
const LIVENESS_PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// The most units one batch (one commit) takes; more wait for the next one.
const MAX_BATCH: usize = 1024;

type Bytes = &'static [u8];

impl From<redb::Error> for StoreError {
    fn from(error: redb::Error) -> Self {
        StoreError::Redb(Box::new(error))
    }
}

macro_rules! from_redb {
    ($($kind:ty),*) => {$(
        impl From<$kind> for StoreError {
            fn from(error: $kind) -> Self {
                StoreError::from(redb::Error::from(error))
            }
        }
    )*};
}

from_redb!(
    redb::StorageError,
    redb::TableError,
    redb::TransactionError,
    redb::CommitError,
    redb::DatabaseError
);

#[derive(Default)]
struct Caches {
    accounts: HashMap<String, Account>,
    account_by_phone_number_id: HashMap<String, String>,
    api_keys_by_hash: HashMap<String, ApiKey>,
}

/// What the writer does after the batch's commit: `Ok` when it is durable, the failure's text
/// when not. Answers the unit's caller.
type Answer = Box<dyn FnOnce(Result<(), String>) + Send>;

/// What running a unit inside the batch gave: whether its writes stay, and how to answer.
struct Ran {
    keep: bool,
    answer: Answer,
}

/// A unit for the writer: run over the batch's transaction, or told that there is none.
type WriteJob = Box<dyn FnOnce(Result<&mut Tx<'_>, String>) -> Ran + Send>;

struct Inner {
    db: Arc<DbSlot>,
    caches: Arc<RwLock<Caches>>,
    jobs: Option<std::sync::mpsc::Sender<WriteJob>>,
    writer: Option<std::thread::JoinHandle<()>>,
    /// The last write or commit failure, kept until a probe (or, after the writer opened the
    /// database again, a durable commit) succeeds.
    failure: Arc<Mutex<Option<String>>>,
    /// The data dir, whose free space `/readyz` checks.
    path: PathBuf,
    /// `CTWA_MIN_FREE_MB` in bytes: below it `/readyz` answers 503 (0: never).
    min_free_bytes: u64,
}

/// The open database, shared by the readers and the writer, which closes it after an I/O error
/// and puts the one it opened again in its place.
pub(crate) struct DbSlot {
    current: RwLock<Option<Arc<Database>>>,
    /// Why no database is open, while none is.
    closed: Mutex<Option<Closed>>,
}

#[derive(Clone)]
struct Closed {
    why: String,
    /// Opening it again failed for a reason other than a lack of space: the process cannot
    /// recover by itself, and `/healthz` fails.
    stuck: bool,
}

impl DbSlot {
    fn new(db: Arc<Database>) -> Self {
        Self {
            current: RwLock::new(Some(db)),
            closed: Mutex::new(None),
        }
    }

    /// A read transaction on the open database; redb's `DatabaseClosed` while the writer is
    /// opening it again after an I/O error (the writer logs why).
    pub(crate) fn begin_read(&self) -> Result<ReadTransaction, redb::TransactionError> {
        let db = self
            .current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(Arc::clone);
        match db {
            Some(db) => db.begin_read(),
            None => Err(redb::TransactionError::Storage(
                redb::StorageError::DatabaseClosed,
            )),
        }
    }

    /// Takes the database out, so that it closes once the last reader lets go of it.
    fn close(&self, why: String) -> Option<Arc<Database>> {
        *self.closed.lock().unwrap_or_else(|p| p.into_inner()) = Some(Closed { why, stuck: false });
        self.current
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }

    /// Opening it again failed; `stuck` when not for a lack of space.
    fn reopen_failed(&self, why: String, stuck: bool) {
        *self.closed.lock().unwrap_or_else(|p| p.into_inner()) = Some(Closed { why, stuck });
    }

    /// Puts the reopened database in place.
    fn publish(&self, db: Arc<Database>) {
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Some(db);
        *self.closed.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// Why the process cannot recover the database by itself, if it cannot.
    fn stuck(&self) -> Option<String> {
        self.closed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .filter(|closed| closed.stuck)
            .map(|closed| closed.why.clone())
    }
}

impl Drop for Inner {
    /// Stops the writer after the units already sent, and waits for it, so that the database
    /// file is closed (and its lock released) when the store is dropped.
    fn drop(&mut self) {
        drop(self.jobs.take());
        if let Some(writer) = self.writer.take() {
            if writer.thread().id() != std::thread::current().id() {
                let _ = writer.join();
            }
        }
    }
}

/// The redb store; cheap to clone.
#[derive(Clone)]
pub struct RedbStore {
    inner: Arc<Inner>,
}

/// The name the engine's own files use for it.
type Store = RedbStore;

impl RedbStore {
    /// Opens (or creates) the store in `path`; see [`RedbStore::open_with_free_space`].
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        Self::open_with_free_space(path, 0)
    }

    /// Opens (or creates) the store in `path`, first refusing a directory that holds another
    /// engine's store, unrelated files, or a store whose data is missing. Checks the layout
    /// version and loads the caches. A file system with less than `min_free_bytes` available
    /// does not stop it: it logs a warning, and [`StoreHealth::check_ready`] fails while the
    /// free space stays below it (redb opens a cleanly closed store without allocating space).
    pub fn open_with_free_space(path: &Path, min_free_bytes: u64) -> Result<Self, StoreError> {
        Self::open_with(path, min_free_bytes, super::DEFAULT_CACHE_BYTES)
    }

    /// Like [`RedbStore::open_with_free_space`], with redb's cache bounded to `cache_bytes`
    /// (`CTWA_CACHE_MB`).
    pub fn open_with(
        path: &Path,
        min_free_bytes: u64,
        cache_bytes: u64,
    ) -> Result<Self, StoreError> {
        let db = Arc::new(open::open_checked(path, min_free_bytes, cache_bytes)?);
        let (caches, next_seq) = load_state(&db)?;
        let caches = Arc::new(RwLock::new(caches));
        let slot = Arc::new(DbSlot::new(Arc::clone(&db)));
        let failure = Arc::new(Mutex::new(None));
        // How the writer opens the database again after an I/O error: the caches and the
        // journal's next sequence number are read again from what was committed.
        let reopen: unit::Reopen = {
            let path = path.to_path_buf();
            let caches = Arc::clone(&caches);
            Box::new(move || {
                let db = open::reopen(&path, cache_bytes)?;
                let (loaded, next_seq) = load_state(&db)?;
                *caches.write().unwrap_or_else(|p| p.into_inner()) = loaded;
                Ok((Arc::new(db), next_seq))
            })
        };
        let writer_state = unit::Writer::new(
            path.to_path_buf(),
            db,
            Arc::clone(&slot),
            next_seq,
            reopen,
            Arc::clone(&failure),
        );
        let (jobs, incoming) = std::sync::mpsc::channel::<WriteJob>();
        let writer = std::thread::Builder::new()
            .name("ctwa-writer".into())
            .spawn(move || unit::run_writer(writer_state, incoming))
            .map_err(|error| StoreError::Io {
                context: "cannot start the store's writer thread".into(),
                error,
            })?;
        Ok(Self {
            inner: Arc::new(Inner {
                db: slot,
                caches,
                jobs: Some(jobs),
                writer: Some(writer),
                failure,
                path: path.to_path_buf(),
                min_free_bytes,
            }),
        })
    }

    /// Runs reads in one read transaction on the blocking pool.
    async fn read<T, F>(&self, work: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&ReadTransaction) -> Result<T, StoreError> + Send + 'static,
    {
        let db = Arc::clone(&self.inner.db);
        let outcome = crate::telemetry::spawn_blocking_in_span(move || work(&db.begin_read()?))
            .await
            .map_err(|_| StoreError::TaskGone)
            .and_then(|outcome| outcome);
        self.noted(outcome)
    }

    /// Runs a short read (a few point lookups, or a page of at most a few hundred entries) in
    /// one read transaction on the caller's own thread. Handing a read this small to the
    /// blocking pool cost more than the read: two thread switches per lookup were most of its
    /// CPU (BENCHMARKS.md). A read never waits for the writer (redb's readers see the last
    /// commit); a page missing from redb's cache is one disk read on this thread.
    fn read_now<T>(
        &self,
        work: impl FnOnce(&ReadTransaction) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let outcome = self
            .inner
            .db
            .begin_read()
            .map_err(StoreError::from)
            .and_then(|read| work(&read));
        self.noted(outcome)
    }

    /// Runs `work` as one unit in the writer's next batch; returns once the batch is committed
    /// and durable. When `work` fails its writes are undone and the error is returned.
    async fn unit<T, F>(&self, work: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Tx<'_>) -> Result<T, StoreError> + Send + 'static,
    {
        self.unit_then(work, |_, _| {}).await
    }

    /// [`Self::unit`], and `committed` runs on the writer right after the commit succeeded,
    /// before any caller is answered (it updates the caches).
    async fn unit_then<T, F, C>(&self, work: F, committed: C) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Tx<'_>) -> Result<T, StoreError> + Send + 'static,
        C: FnOnce(&T, &mut Caches) + Send + 'static,
    {
        let (reply, answer) = oneshot::channel::<Result<T, StoreError>>();
        let caches = Arc::clone(&self.inner.caches);
        // The unit runs in the caller's span, so its log lines carry the request id.
        let span = tracing::Span::current();
        let job: WriteJob = Box::new(move |tx| {
            let tx = match tx {
                Ok(tx) => tx,
                Err(failure) => {
                    let _ = reply.send(Err(StoreError::Flush(failure)));
                    return Ran {
                        keep: false,
                        answer: Box::new(|_| {}),
                    };
                }
            };
            match span.in_scope(|| work(tx)) {
                Ok(value) => Ran {
                    keep: true,
                    answer: Box::new(move |commit| {
                        let outcome = match commit {
                            Ok(()) => {
                                let mut caches = caches.write().unwrap_or_else(|p| p.into_inner());
                                committed(&value, &mut caches);
                                Ok(value)
                            }
                            Err(failure) => Err(StoreError::Flush(failure)),
                        };
                        let _ = reply.send(outcome);
                    }),
                },
                Err(error) => Ran {
                    keep: false,
                    answer: Box::new(move |_| {
                        let _ = reply.send(Err(error));
                    }),
                },
            }
        });
        let sent = match &self.inner.jobs {
            Some(jobs) => jobs.send(job).is_ok(),
            None => false,
        };
        let outcome = match sent {
            true => answer
                .await
                .map_err(|_| StoreError::TaskGone)
                .and_then(|outcome| outcome),
            false => Err(StoreError::TaskGone),
        };
        self.noted(outcome)
    }

    /// A write, a durable commit and a read back.
    async fn probe(&self) -> Result<(), StoreError> {
        let stamp = chrono::Utc::now().timestamp_millis().to_be_bytes();
        self.unit(move |tx| tx.insert(TableName::Meta, b"readyz", stamp))
            .await?;
        let read = self
            .read(|read| {
                let meta = read.open_table(table(TableName::Meta))?;
                Ok(meta.get(b"readyz".as_slice())?.map(|v| v.value().to_vec()))
            })
            .await?;
        match read {
            Some(value) if value == stamp => Ok(()),
            _ => Err(StoreError::Corrupt(
                "the readiness probe did not read back its own write".into(),
            )),
        }
    }

    /// True when `error` (from a probe) is the disk refusing writes, which the writer recovers
    /// from by itself once the disk takes them again.
    fn recovers_by_itself(&self, error: &StoreError) -> bool {
        if self.inner.db.stuck().is_some() {
            return false;
        }
        match error {
            StoreError::Flush(_) | StoreError::Io { .. } => true,
            StoreError::Redb(error) => matches!(
                **error,
                redb::Error::Io(_) | redb::Error::PreviousIo | redb::Error::DatabaseClosed
            ),
            _ => false,
        }
    }

    fn caches(&self) -> std::sync::RwLockReadGuard<'_, Caches> {
        self.inner.caches.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Remembers a failure that means the disk or redb refused a write or a commit.
    fn noted<T>(&self, outcome: Result<T, StoreError>) -> Result<T, StoreError> {
        if let Err(error) = &outcome {
            if error.is_store_failure() {
                let mut failure = self.inner.failure.lock().unwrap_or_else(|p| p.into_inner());
                if failure.is_none() {
                    let text = crate::error::error_chain(error);
                    tracing::error!(
                        error = %text,
                        "the store failed; after an I/O error the writer opens the database \
                         again, and /readyz answers 503 until a write, commit and read back \
                         succeed again"
                    );
                    *failure = Some(text);
                }
            }
        }
        outcome
    }
}

#[async_trait]
impl StoreHealth for RedbStore {
    fn failure(&self) -> Option<String> {
        self.inner
            .failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Liveness: cheap while nothing has failed. After a failure, a fresh probe (a write, a
    /// durable commit, a read back) decides: success forgets the failure. A probe that fails
    /// because the disk refuses writes (full, or an I/O error) still answers alive: the writer
    /// opens the database again by itself, so a restart would not help; `/readyz` fails
    /// meanwhile. Not alive: the writer is gone or hangs, the read back is wrong, or the
    /// database cannot be opened again for a reason other than a lack of space.
    async fn check_alive(&self) -> Result<(), StoreError> {
        if self.failure().is_none() {
            return Ok(());
        }
        let probe = tokio::time::timeout(LIVENESS_PROBE_TIMEOUT, self.probe()).await;
        match probe {
            Ok(Ok(())) => {
                let mut failure = self.inner.failure.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(previous) = failure.take() {
                    tracing::info!(previous = %previous, "the store works again");
                }
                Ok(())
            }
            Ok(Err(error)) if self.recovers_by_itself(&error) => {
                crate::error::log_store_failure(
                    &error,
                    "the store cannot write yet; it stays alive and retries by itself \
                     (/readyz answers 503 meanwhile)",
                );
                Ok(())
            }
            Ok(Err(error)) => Err(error),
            Err(_) => Err(StoreError::Flush(format!(
                "the probe did not finish within {} s",
                LIVENESS_PROBE_TIMEOUT.as_secs()
            ))),
        }
    }

    /// Readiness: the data dir's file system has at least `CTWA_MIN_FREE_MB` free, and a
    /// write, a durable commit and a read back succeed.
    async fn check_ready(&self) -> Result<(), StoreError> {
        open::check_free_space(&self.inner.path, self.inner.min_free_bytes)?;
        self.probe().await
    }

    /// Nothing to flush: every unit was durable (committed with `Durability::Immediate`) before
    /// it was answered. A store that failed and was not probed back to health says so, as a
    /// failed flush would.
    fn flush_blocking(&self) -> Result<(), StoreError> {
        match self.failure() {
            None => Ok(()),
            Some(failure) => Err(StoreError::Flush(failure)),
        }
    }
}

/// The accounts and API keys, and the journal's next sequence number, as committed.
fn load_state(db: &Database) -> Result<(Caches, u64), StoreError> {
    let read = db.begin_read()?;
    let caches = accounts::load_caches(&read)?;
    let next_seq = match read.open_table(table(TableName::Meta))?.get(NEXT_SEQ_KEY)? {
        Some(bytes) => be_u64(bytes.value(), "the journal's next sequence number")?,
        None => 0,
    };
    Ok((caches, next_seq))
}

/// The definition of one table: byte keys, byte values.
pub(crate) fn table(name: TableName) -> TableDefinition<'static, Bytes, Bytes> {
    TableDefinition::new(name.as_str())
}

/// Reads 8 bytes big-endian at the start of `bytes`.
fn be_u64(bytes: &[u8], what: &str) -> Result<u64, StoreError> {
    bytes
        .get(..8)
        .map(|eight| u64::from_be_bytes(eight.try_into().expect("eight bytes")))
        .ok_or_else(|| StoreError::Corrupt(format!("{what} is truncated")))
}

fn be_i64(bytes: &[u8], what: &str) -> Result<i64, StoreError> {
    be_u64(bytes, what).map(|value| value as i64)
}

/// Every entry of a read transaction's table whose key starts with `prefix`, in key order.
fn scan_prefix(
    table: &impl ReadableTable<Bytes, Bytes>,
    prefix: &[u8],
) -> Result<Vec<unit::Entry>, StoreError> {
    let mut entries = Vec::new();
    for item in table.range::<&[u8]>(prefix..)? {
        let (key, value) = item?;
        if !key.value().starts_with(prefix) {
            break;
        }
        entries.push((key.value().to_vec(), value.value().to_vec()));
    }
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;
    use redb::ReadableTableMetadata;

    #[tokio::test]
    async fn concurrent_units_are_batched_and_all_answered() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let units: Vec<_> = (0..64u32)
            .map(|index| {
                let store = store.clone();
                tokio::spawn(async move {
                    store
                        .unit(move |tx| {
                            tx.insert(TableName::Users, index.to_be_bytes(), b"{}")?;
                            Ok(index)
                        })
                        .await
                })
            })
            .collect();
        for (index, unit) in units.into_iter().enumerate() {
            assert_eq!(unit.await.unwrap().unwrap(), index as u32);
        }
        store.check_ready().await.unwrap();
        let count = store
            .read(|read| Ok(read.open_table(table(TableName::Users))?.len()?))
            .await
            .unwrap();
        assert_eq!(count, 64);
    }

    #[tokio::test]
    async fn a_failed_unit_is_undone_alone_and_its_batch_commits() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store
            .unit(|tx| tx.insert(TableName::Users, b"kept", b"before"))
            .await
            .unwrap();
        // Hold the writer, so the next three units are taken as one batch.
        let (release, held) = std::sync::mpsc::channel::<()>();
        let blocker = {
            let store = store.clone();
            tokio::spawn(async move {
                store
                    .unit(move |_| {
                        held.recv().unwrap();
                        Ok(())
                    })
                    .await
            })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        let first = {
            let store = store.clone();
            tokio::spawn(async move {
                store
                    .unit(|tx| tx.insert(TableName::Users, b"first", b"1"))
                    .await
            })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        let failing = {
            let store = store.clone();
            tokio::spawn(async move {
                store
                    .unit(|tx| {
                        tx.insert(TableName::Users, b"kept", b"overwritten")?;
                        tx.remove(TableName::Users, b"first")?;
                        tx.insert(TableName::Users, b"failed", b"x")?;
                        let seq = tx.next_journal_seq();
                        tx.insert(TableName::Journal, seq.to_be_bytes(), b"body")?;
                        Err::<(), _>(StoreError::Conflict("this unit fails".into()))
                    })
                    .await
            })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        let last = {
            let store = store.clone();
            tokio::spawn(async move {
                store
                    .unit(|tx| {
                        // Sees the first unit's write, not the failed unit's.
                        let first = tx.get(TableName::Users, b"first")?;
                        let kept = tx.get(TableName::Users, b"kept")?;
                        let seq = tx.next_journal_seq();
                        Ok((first, kept, seq))
                    })
                    .await
            })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        release.send(()).unwrap();
        blocker.await.unwrap().unwrap();
        first.await.unwrap().unwrap();
        let error = failing.await.unwrap().unwrap_err();
        assert!(matches!(error, StoreError::Conflict(_)), "{error}");
        let (first, kept, seq) = last.await.unwrap().unwrap();
        assert_eq!(first.as_deref(), Some(b"1".as_slice()));
        assert_eq!(kept.as_deref(), Some(b"before".as_slice()));
        assert_eq!(seq, 0, "the failed unit's sequence number is given again");
        let (users, journal) = store
            .read(|read| {
                let users = scan_prefix(&read.open_table(table(TableName::Users))?, b"")?;
                let journal = read.open_table(table(TableName::Journal))?.len()?;
                Ok((users, journal))
            })
            .await
            .unwrap();
        let users: Vec<(&[u8], &[u8])> = users
            .iter()
            .map(|(key, value)| (key.as_slice(), value.as_slice()))
            .collect();
        assert_eq!(
            users,
            vec![(b"first".as_slice(), b"1".as_slice()), (b"kept", b"before")]
        );
        assert_eq!(journal, 0);
        assert_eq!(store.failure(), None, "a unit's own error is not a failure");
    }

    #[tokio::test]
    async fn a_panicking_unit_is_undone_and_the_writer_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let outcome = store
            .unit(|tx| {
                tx.insert(TableName::Users, b"half", b"written")?;
                if tx.get(TableName::Users, b"half")?.is_some() {
                    panic!("a bug in a unit");
                }
                Ok(())
            })
            .await;
        assert!(matches!(outcome, Err(StoreError::TaskGone)));
        let half = store
            .unit(|tx| tx.get(TableName::Users, b"half"))
            .await
            .unwrap();
        assert_eq!(half, None);
    }

    #[tokio::test]
    async fn writes_and_the_journal_sequence_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            store
                .unit(|tx| {
                    let seq = tx.next_journal_seq();
                    tx.insert(TableName::Journal, seq.to_be_bytes(), b"body")?;
                    tx.insert(TableName::Users, b"user", b"{}")
                })
                .await
                .unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        let (user, seq) = store
            .unit(|tx| Ok((tx.get(TableName::Users, b"user")?, tx.next_journal_seq())))
            .await
            .unwrap();
        assert_eq!(user.as_deref(), Some(b"{}".as_slice()));
        assert_eq!(seq, 1);
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
        let _ = store.noted::<()>(Err(StoreError::Conflict("taken".into())));
        store.check_alive().await.unwrap();
        assert_eq!(store.failure(), None);
    }
}
