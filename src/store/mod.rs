//! The storage seam: what the use cases need from storage, in their words.
//!
//! The services (`ingest::Service`, `conversions::Service`, the admin routes) hold a [`Store`],
//! a shared `dyn` handle to an implementation of these traits, and never see an engine, a key
//! encoding or a table. [`sled::SledStore`] is the implementation today; another embedded engine
//! or PostgreSQL implements the same traits and nothing above this module changes.
//!
//! The rules every implementation keeps:
//! - **Durable on return.** Every write method returns only once its writes are durable (on
//!   disk, or committed); callers never flush. Implementations batch concurrent callers into one
//!   flush (group commit).
//! - **Atomic units.** Each write method is one unit of work: all of its writes become visible
//!   and durable together, or none do. [`AttributionStore::record_webhook`] and
//!   [`AttributionStore::attribution_unit`] run a caller's closure over an [`AttributionUnit`] and
//!   commit what it wrote as one unit.
//! - **Serialised units.** Units that change attribution state, conversion records or accounts
//!   run one after another (or under isolation that gives the same result), so a
//!   read-modify-write never interleaves with another.
//! - **Never on the executor.** Blocking engine calls run off the async executor.

pub(crate) mod layout;
pub mod migrate;
pub mod redb;
pub mod sled;

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;

use crate::attribution::{AutomaticEvent, Conversation};
use crate::domain::account::{Account, ApiKey};
use crate::domain::conversion_record::{Begin, ConversionRecord};
use crate::domain::user::UserRecord;
use crate::ingest::IngestReport;

pub use self::redb::RedbStore;
pub use self::sled::{SledStore, MARKER_FILE};

/// An embedded engine that can hold a store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    Sled,
    Redb,
}

/// The engine whose store `path` already holds: by its `ctwa-store.json` marker, or, for stores
/// older than the marker, by the engine's own files. `None` for a new or empty directory, and for
/// one that holds something else (the engine that opens it then refuses it with a message).
pub fn existing_engine(path: &std::path::Path) -> Option<Engine> {
    if let Ok(marker) = std::fs::read_to_string(path.join(MARKER_FILE)) {
        let engine = serde_json::from_str::<serde_json::Value>(&marker)
            .ok()?
            .get("engine")?
            .as_str()?
            .to_string();
        return match engine.split('-').next() {
            Some("sled") => Some(Engine::Sled),
            Some("redb") => Some(Engine::Redb),
            _ => None,
        };
    }
    let has = |name: &str| path.join(name).exists();
    if has(self::redb::DATABASE_FILE) {
        Some(Engine::Redb)
    } else if has("db") || has("conf") || has("blobs") {
        Some(Engine::Sled)
    } else {
        None
    }
}

/// The engines' page cache when nothing sets `CTWA_CACHE_MB` (the setting's default).
pub const DEFAULT_CACHE_BYTES: u64 = 128 * 1024 * 1024;

/// The shared handle every service holds.
pub type Store = Arc<dyn Storage>;

/// Everything a store implementation provides.
pub trait Storage: AccountStore + AttributionStore + ConversionStore + StoreHealth {}

impl<T: AccountStore + AttributionStore + ConversionStore + StoreHealth> Storage for T {}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the embedded store failed")]
    Sled(#[from] ::sled::Error),
    /// Boxed: redb's error is large, and every store result carries this enum.
    #[error("the embedded store (redb) failed")]
    Redb(#[source] Box<::redb::Error>),
    #[error("a stored record is corrupt: {0}")]
    Corrupt(String),
    /// A record that does not decode (or, never expected, does not encode).
    #[error("a stored record cannot be read or written as JSON")]
    Encoding(#[from] serde_json::Error),
    #[error("the store at {path} has layout version {found}, this build reads version {expected}; run the matching ctwa-relay release or migrate the data first")]
    LayoutVersion {
        path: String,
        found: String,
        expected: u32,
    },
    #[error("flushing the store to disk failed: {0}")]
    Flush(String),
    #[error("{context}")]
    Io {
        context: String,
        #[source]
        error: std::io::Error,
    },
    #[error("the store in {path} cannot be opened safely: found {found}. ctwa-relay refuses to start rather than serve an empty or partial store. {recovery}")]
    Damaged {
        path: String,
        found: String,
        recovery: String,
    },
    #[error("{path} holds a store that this build does not read ({marker}); run the release that wrote it, or point CTWA_DATA_DIR at another directory")]
    ForeignStore { path: String, marker: String },
    #[error("{path} holds files that are not a ctwa-relay store ({entries}); point CTWA_DATA_DIR at an empty or new directory, or at an existing store")]
    NotAStore { path: String, entries: String },
    /// sled's refusal to open: it writes a snapshot while it opens.
    #[error("only {free_mib:.2} MiB is free on the file system of {path}, below CTWA_MIN_FREE_MB ({min_free_mb} MiB): sled writes a snapshot while it opens, and one cut short by a full disk can leave the store unopenable; free some space or grow the disk, then start again")]
    LowDiskSpace {
        path: String,
        free_mib: f64,
        min_free_mb: u64,
    },
    /// redb below `CTWA_MIN_FREE_MB`: it opens and serves reads, and readiness fails on this.
    /// Not a store failure.
    #[error("only {free_mib:.2} MiB is free on the file system of {path}, below CTWA_MIN_FREE_MB ({min_free_mb} MiB): writes that do not fit fail and nothing is acknowledged that is not durable; reads still work; free some space or grow the disk")]
    LowFreeSpace {
        path: String,
        free_mib: f64,
        min_free_mb: u64,
    },
    #[error("the store's background task stopped")]
    TaskGone,
    #[error("{0}")]
    Conflict(String),
    /// The id belonged to a deleted account: its data is kept under it, so it is never reused.
    #[error("{0}")]
    AccountIdRetired(String),
}

impl StoreError {
    /// True for errors that mean the disk or the engine refused to write, flush or read: the
    /// ones that make the store "failed" until a probe succeeds. Conflicts and bad records are
    /// not.
    pub fn is_store_failure(&self) -> bool {
        match self {
            StoreError::Sled(error) => matches!(
                error,
                ::sled::Error::Io(_)
                    | ::sled::Error::Corruption { .. }
                    | ::sled::Error::ReportableBug(_)
            ),
            StoreError::Redb(error) => matches!(
                **error,
                ::redb::Error::Io(_)
                    | ::redb::Error::Corrupted(_)
                    | ::redb::Error::PreviousIo
                    | ::redb::Error::DatabaseClosed
                    | ::redb::Error::LockPoisoned(_)
            ),
            StoreError::Flush(_) | StoreError::Io { .. } | StoreError::TaskGone => true,
            _ => false,
        }
    }
}

/// What deleting an account did to the API keys scoped to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AccountDeletion {
    /// Keys that still reach other accounts and lost only this one.
    pub narrowed_keys: usize,
    /// Keys that reached this account only, and were revoked.
    pub revoked_keys: usize,
}

/// Accounts and API keys. Reads are synchronous: both are small and read on every request, so
/// implementations keep them in memory and update that copy as soon as a write is applied.
#[async_trait]
pub trait AccountStore: Send + Sync {
    fn account(&self, id: &str) -> Option<Account>;
    fn account_by_phone_number_id(&self, phone_number_id: &str) -> Option<Account>;
    /// Every account, ordered by id.
    fn accounts(&self) -> Vec<Account>;
    /// Inserts a new account; `Conflict` when its id or `phone_number_id` is taken,
    /// `AccountIdRetired` when the id belonged to a deleted account.
    async fn create_account(&self, account: Account) -> Result<Account, StoreError>;
    /// Replaces an account; `Conflict` if a changed `phone_number_id` belongs to another one.
    async fn update_account(&self, account: Account) -> Result<Account, StoreError>;
    /// Deletes an account and retires its id for good; keys scoped to it lose it, and a key
    /// left with no account is revoked. Its users, conversations and conversions stay.
    /// `None` if there was no such account.
    async fn delete_account(
        &self,
        id: String,
        deleted_at: i64,
    ) -> Result<Option<AccountDeletion>, StoreError>;
    fn api_key_by_hash(&self, key_hash: &str) -> Option<ApiKey>;
    /// Every API key (hashes only), oldest first.
    fn api_keys(&self) -> Vec<ApiKey>;
    /// Stores a new key; `Conflict` if one of its accounts was deleted after the caller checked.
    async fn create_api_key(&self, api_key: ApiKey) -> Result<ApiKey, StoreError>;
    /// Revokes a key; false when there was none.
    async fn revoke_api_key(&self, id: String) -> Result<bool, StoreError>;
}

/// Where a message already went: its timestamp and conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeenMessage {
    pub timestamp: i64,
    pub conversation_id: String,
}

/// A journaled webhook body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JournaledWebhook {
    pub received_at: i64,
    pub body: Vec<u8>,
}

/// The reads and writes of one unit of work on the attribution state (users, conversations,
/// message ids, automatic events waiting for their message, webhooks held for a number without
/// an account). Reads see the unit's own writes. Nothing is visible to others, or durable,
/// until the store commits the unit.
pub trait AttributionUnit {
    /// The id of the account that owns this business number.
    fn account_for_number(&mut self, phone_number_id: &str) -> Option<String>;
    /// Holds the webhook this unit records for a number without an account, to be replayed
    /// when the account is added. Only in [`AttributionStore::record_webhook`].
    fn hold_for_number(&mut self, phone_number_id: &str) -> Result<(), StoreError>;
    /// Takes the journaled webhooks held for this number, oldest first.
    fn take_held_for_number(
        &mut self,
        phone_number_id: &str,
    ) -> Result<Vec<JournaledWebhook>, StoreError>;

    fn seen_message(
        &mut self,
        account_id: &str,
        message_id: &str,
    ) -> Result<Option<SeenMessage>, StoreError>;
    fn mark_message_seen(
        &mut self,
        account_id: &str,
        message_id: &str,
        seen: &SeenMessage,
    ) -> Result<(), StoreError>;

    fn user_by_phone(
        &mut self,
        account_id: &str,
        wa_id: &str,
    ) -> Result<Option<UserRecord>, StoreError>;
    fn user_by_bsuid(
        &mut self,
        account_id: &str,
        bsuid: &str,
    ) -> Result<Option<UserRecord>, StoreError>;
    /// Stores a user and makes it findable by its phone and BSUID.
    fn put_user(&mut self, user: &UserRecord) -> Result<(), StoreError>;

    fn conversation(&mut self, id: &str) -> Result<Option<Conversation>, StoreError>;
    fn put_conversation(&mut self, conversation: &Conversation) -> Result<(), StoreError>;

    /// Keeps an automatic event whose message is not seen yet; false when it was already held.
    fn hold_event(&mut self, account_id: &str, event: &AutomaticEvent) -> Result<bool, StoreError>;
    /// Takes the events held for this message.
    fn take_held_events(
        &mut self,
        account_id: &str,
        message_id: &str,
    ) -> Result<Vec<AutomaticEvent>, StoreError>;
}

/// Work on the attribution state, run by the store as one unit.
pub type UnitOfWork =
    Box<dyn FnOnce(&mut dyn AttributionUnit) -> Result<IngestReport, StoreError> + Send>;

/// Which accounts a lookup may return.
pub type AccountFilter = Box<dyn Fn(&str) -> bool + Send>;

/// The webhook journal and the attribution state.
#[async_trait]
pub trait AttributionStore: Send + Sync {
    /// Appends a verified body to the journal, then runs `apply` as one unit; returns the
    /// journal sequence number and the unit's report once both are durable. Without `apply`
    /// the body is journaled as one that is not a webhook (kept and counted, never replayed).
    async fn record_webhook(
        &self,
        body: Bytes,
        received_at: i64,
        apply: Option<UnitOfWork>,
    ) -> Result<(u64, IngestReport), StoreError>;
    /// Runs `work` as one unit; returns once it is durable.
    async fn attribution_unit(&self, work: UnitOfWork) -> Result<IngestReport, StoreError>;
    /// Deletes journal entries received before `cutoff` (unix seconds), except bodies still
    /// held for a number without an account. At most `limit` per call; returns how many went.
    async fn prune_journal(&self, cutoff: i64, limit: usize) -> Result<u64, StoreError>;

    async fn conversation(&self, id: String) -> Result<Option<Conversation>, StoreError>;
    async fn user(
        &self,
        account_id: String,
        user_key: String,
    ) -> Result<Option<UserRecord>, StoreError>;
    /// Every user known by this phone number or BSUID on the accounts `visible` accepts, with
    /// their conversations, newest first.
    async fn users_with_conversations(
        &self,
        phone: Option<String>,
        bsuid: Option<String>,
        visible: AccountFilter,
    ) -> Result<Vec<(UserRecord, Vec<Conversation>)>, StoreError>;
    /// The conversations of the user this phone names on the account; `None` when the phone
    /// has no user there.
    async fn phone_conversations(
        &self,
        account_id: String,
        phone: String,
    ) -> Result<Option<Vec<Conversation>>, StoreError>;
}

/// Conversion records, their history and the outbox of the ones still to deliver.
#[async_trait]
pub trait ConversionStore: Send + Sync {
    /// Records a conversion before it is sent, as [`ConversionRecord::begin`] decides against
    /// the record already kept under the same (account, event name, event id).
    async fn begin_conversion(&self, record: ConversionRecord) -> Result<Begin, StoreError>;
    /// Stores a conversion's new state (an attempt in flight, an outcome, a new outbox time).
    async fn save_conversion(&self, record: ConversionRecord) -> Result<(), StoreError>;
    /// Queued conversions whose next attempt is due at `now_ms`, oldest first.
    async fn due_conversions(
        &self,
        now_ms: i64,
        limit: usize,
    ) -> Result<Vec<ConversionRecord>, StoreError>;
    async fn outbox_depth(&self) -> Result<u64, StoreError>;
    /// The account's conversions, newest first.
    async fn conversion_history(
        &self,
        account_id: String,
        limit: usize,
    ) -> Result<Vec<ConversionRecord>, StoreError>;
    /// A conversation's conversions, newest first.
    async fn conversions_of_conversation(
        &self,
        conversation_id: String,
        limit: usize,
    ) -> Result<Vec<ConversionRecord>, StoreError>;
}

/// Liveness, readiness and the last flush at shutdown.
#[async_trait]
pub trait StoreHealth: Send + Sync {
    /// The failure remembered since the last successful probe, if any.
    fn failure(&self) -> Option<String>;
    /// Cheap while nothing has failed; after a failure, a fresh readiness probe decides.
    async fn check_alive(&self) -> Result<(), StoreError>;
    /// A write, a durable flush and a read back.
    async fn check_ready(&self) -> Result<(), StoreError>;
    /// A synchronous flush, for the very end of shutdown.
    fn flush_blocking(&self) -> Result<(), StoreError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_existing_engine_is_read_from_the_marker_or_the_engine_files() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(existing_engine(dir.path()), None, "an empty directory");
        std::fs::write(dir.path().join("conf"), b"").unwrap();
        assert_eq!(
            existing_engine(dir.path()),
            Some(Engine::Sled),
            "sled before the marker"
        );
        std::fs::write(
            dir.path().join(MARKER_FILE),
            r#"{"engine":"redb-3","layoutVersion":1}"#,
        )
        .unwrap();
        assert_eq!(
            existing_engine(dir.path()),
            Some(Engine::Redb),
            "the marker wins"
        );
        std::fs::write(
            dir.path().join(MARKER_FILE),
            r#"{"engine":"sled-0.34","layoutVersion":1}"#,
        )
        .unwrap();
        assert_eq!(existing_engine(dir.path()), Some(Engine::Sled));
        std::fs::write(dir.path().join(MARKER_FILE), r#"{"engine":"fjall-2"}"#).unwrap();
        assert_eq!(
            existing_engine(dir.path()),
            None,
            "another engine: refused by the opener"
        );
        let redb_only = tempfile::tempdir().unwrap();
        std::fs::write(redb_only.path().join(self::redb::DATABASE_FILE), b"").unwrap();
        assert_eq!(existing_engine(redb_only.path()), Some(Engine::Redb));
    }
}
