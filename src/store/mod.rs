//! The embedded store: sled, its trees and key encodings, and the flush discipline.
//!
//! Nothing outside this module touches sled. Every public method is `async` and runs its sled
//! calls on the blocking pool, so the executor is never blocked. Writes become durable only when
//! [`Store::durable`] returns: one flusher thread batches every waiting caller into one `flush()`
//! (group commit). sled 0.34's `flush_async` is deliberately not used: it deadlocks when several
//! flushes are awaited at once (spacejam/sled#1241).

mod accounts;
mod conversions;
mod ingest;

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, RwLock};

use tokio::sync::oneshot;

use crate::domain::account::{Account, ApiKey};

pub use conversions::{
    Begin, ConversionFailure, ConversionRecord, ConversionSource, ConversionStatus, NewConversion,
};
pub use ingest::{IngestReport, UserRecord, WebhookParser};

/// The on-disk layout this build reads and writes. Bump it with a migration when key encodings
/// or record shapes change incompatibly.
pub const LAYOUT_VERSION: u32 = 1;

const LAYOUT_KEY: &[u8] = b"layout_version";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the embedded store failed")]
    Sled(#[from] sled::Error),
    #[error("a stored record is corrupt: {0}")]
    Corrupt(String),
    #[error("the store at {path} has layout version {found}, this build reads version {expected}; run the matching ctwa-relay release or migrate the data first")]
    LayoutVersion {
        path: String,
        found: String,
        expected: u32,
    },
    #[error("flushing the store to disk failed: {0}")]
    Flush(String),
    #[error("the store's background task stopped")]
    TaskGone,
    #[error("{0}")]
    Conflict(String),
    /// The id belonged to a deleted account: its data is kept under it, so it is never reused.
    #[error("{0}")]
    AccountIdRetired(String),
}

/// One flusher thread that turns many "make my writes durable" requests into one `flush()`.
struct Flusher {
    requests: std::sync::mpsc::Sender<oneshot::Sender<Result<(), String>>>,
}

impl Flusher {
    fn spawn(db: sled::Db) -> std::io::Result<Self> {
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
                    let result = db.flush().map(|_| ()).map_err(|error| error.to_string());
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

/// Work for the writer thread.
type WriteJob = Box<dyn FnOnce() + Send>;

/// The one thread that changes attribution state (users, conversations, message ids, pending
/// events, accounts, conversion records). Running every read-modify-write on one thread keeps
/// them from interleaving without a lock that dozens of blocking threads would queue on.
struct Writer {
    jobs: std::sync::mpsc::Sender<WriteJob>,
}

impl Writer {
    fn spawn() -> std::io::Result<Self> {
        let (jobs, incoming) = std::sync::mpsc::channel::<WriteJob>();
        std::thread::Builder::new()
            .name("ctwa-writer".into())
            .spawn(move || {
                for job in incoming {
                    // A panicking job drops its reply, so its caller gets an error; the thread and
                    // the jobs behind it carry on. Each step is idempotent for a redelivery.
                    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
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
}

/// The handle to the store; cheap to clone.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

impl Store {
    /// Opens (or creates) the store in `path`, checks its layout version and loads the caches.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(path).map_err(|error| {
            StoreError::Flush(format!("cannot create {}: {error}", path.display()))
        })?;
        let db = sled::Config::new().path(path).open()?;
        let meta = db.open_tree("meta")?;
        match meta.get(LAYOUT_KEY)? {
            None => {
                meta.insert(LAYOUT_KEY, LAYOUT_VERSION.to_string().as_bytes())?;
                db.flush()?;
            }
            Some(found) if found.as_ref() == LAYOUT_VERSION.to_string().as_bytes() => {}
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
        let flusher = Flusher::spawn(db)
            .map_err(|error| StoreError::Flush(format!("cannot start the flusher: {error}")))?;
        let writer = Writer::spawn()
            .map_err(|error| StoreError::Flush(format!("cannot start the writer: {error}")))?;
        Ok(Self {
            inner: Arc::new(Inner {
                trees,
                writer,
                caches: RwLock::new(caches),
                flusher,
            }),
        })
    }

    /// Runs sled work on the blocking pool.
    async fn run<T, F>(&self, work: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Inner) -> Result<T, StoreError> + Send + 'static,
    {
        let inner = Arc::clone(&self.inner);
        tokio::task::spawn_blocking(move || work(&inner))
            .await
            .map_err(|_| StoreError::TaskGone)?
    }

    /// Runs a read-modify-write on the writer thread, after every one submitted before it.
    async fn write<T, F>(&self, work: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Inner) -> Result<T, StoreError> + Send + 'static,
    {
        let inner = Arc::clone(&self.inner);
        let (reply, answer) = oneshot::channel();
        let job: WriteJob = Box::new(move || {
            let _ = reply.send(work(&inner));
        });
        self.inner
            .writer
            .jobs
            .send(job)
            .map_err(|_| StoreError::TaskGone)?;
        answer.await.map_err(|_| StoreError::TaskGone)?
    }

    /// Returns once every write made before the call is on disk. Concurrent callers share one
    /// `flush()`.
    pub async fn durable(&self) -> Result<(), StoreError> {
        let (reply, done) = oneshot::channel();
        self.inner
            .flusher
            .requests
            .send(reply)
            .map_err(|_| StoreError::TaskGone)?;
        done.await
            .map_err(|_| StoreError::TaskGone)?
            .map_err(StoreError::Flush)
    }

    /// A synchronous flush, for the very end of shutdown.
    pub fn flush_blocking(&self) -> Result<(), StoreError> {
        self.inner.trees.db.flush()?;
        Ok(())
    }

    /// Readiness: a write, a durable flush and a read back.
    pub async fn check_ready(&self) -> Result<(), StoreError> {
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
}

/// Joins key parts with a NUL byte; parts are ids that never contain one.
pub(crate) fn key(parts: &[&str]) -> Vec<u8> {
    let mut out = Vec::with_capacity(parts.iter().map(|p| p.len() + 1).sum());
    for (index, part) in parts.iter().enumerate() {
        if index > 0 {
            out.push(0);
        }
        out.extend_from_slice(part.as_bytes());
    }
    out
}

/// The prefix of every key whose first parts are `parts`.
pub(crate) fn prefix(parts: &[&str]) -> Vec<u8> {
    let mut out = key(parts);
    out.push(0);
    out
}

pub(crate) fn encode<T: serde::Serialize>(value: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(value).map_err(|error| StoreError::Corrupt(error.to_string()))
}

pub(crate) fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|error| StoreError::Corrupt(error.to_string()))
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

    #[test]
    fn keys_join_parts_with_nul() {
        assert_eq!(key(&["a", "b"]), b"a\0b".to_vec());
        assert_eq!(prefix(&["a"]), b"a\0".to_vec());
    }
}
