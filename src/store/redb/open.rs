//! Opening the redb store safely: never start empty over existing data (SPEC §3), never open
//! another engine's store. A nearly full disk does not stop it opening (unlike sled, which
//! writes a snapshot while it opens): redb opens a store closed cleanly, or one whose last commit
//! saved its allocator state (quick repair, every commit here), by rewriting its header in place,
//! which needs no new space. When opening does fail for lack of space (a full repair after an
//! unclean stop writes), the error says so; the failed write changed nothing that was committed,
//! so the store opens as it was once space is freed.
//!
//! The directory holds `ctwa.redb` and the marker `ctwa-store.json` (the same file the sled
//! store writes, naming this engine). A new store is created, its tables and layout version
//! committed durably, and only then the marker written and fsynced with its directory. So a
//! marker naming redb whose database is missing, empty, or without a layout version means data
//! was lost, and the store is refused rather than started empty.

use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::time::Duration;

use redb::{Database, ReadableDatabase, ReadableTableMetadata};

use super::unit::TableName;
use super::{table, StoreError, LAYOUT_KEY, LAYOUT_VERSION};
use crate::store::MARKER_FILE;

/// The database file in the data dir.
pub const DATABASE_FILE: &str = "ctwa.redb";

/// The engine named in the marker: redb's file format follows its major version.
pub const ENGINE: &str = "redb-3";

/// What the operator can do when the store is refused. RELIABILITY.md repeats it.
const RECOVERY: &str = "To recover: stop here and leave the directory as it is. Restore it from \
    your latest backup and start again; or, to start over with an EMPTY store and lose what it \
    held, move it aside (for example `mv DIR DIR.damaged`) and start again, keeping the moved copy \
    for salvage.";

/// Files the sled store creates.
fn is_sled_file(name: &str) -> bool {
    name == "db" || name == "conf" || name == "blobs" || name.starts_with("snap.")
}

/// The directory's contents before redb opens it.
#[derive(Debug, Default)]
struct Survey {
    marker: Option<String>,
    /// The length of `ctwa.redb`, when it exists.
    database_len: Option<u64>,
    sled_files: Vec<String>,
    /// Everything else (`lost+found`, dotfiles and the marker's temporary file aside).
    unrelated: Vec<String>,
}

impl Survey {
    fn of(path: &Path) -> Result<Self, StoreError> {
        let mut survey = Survey::default();
        let entries = std::fs::read_dir(path)
            .map_err(|error| io_error(format!("cannot list {}", path.display()), error))?;
        for entry in entries {
            let entry = entry
                .map_err(|error| io_error(format!("cannot list {}", path.display()), error))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name == MARKER_FILE {
                let text = std::fs::read_to_string(entry.path()).map_err(|error| {
                    io_error(format!("cannot read {}", entry.path().display()), error)
                })?;
                survey.marker = Some(text);
            } else if name == DATABASE_FILE {
                let length = entry.metadata().map(|metadata| metadata.len()).unwrap_or(0);
                survey.database_len = Some(length);
            } else if is_sled_file(&name) {
                survey.sled_files.push(name);
            } else if name != "lost+found"
                && !name.starts_with('.')
                && name != format!("{MARKER_FILE}.tmp")
            {
                survey.unrelated.push(name);
            }
        }
        survey.sled_files.sort();
        survey.unrelated.sort();
        Ok(survey)
    }

    fn describe(&self) -> String {
        let mut found = Vec::new();
        if let Some(marker) = &self.marker {
            found.push(format!("the marker {MARKER_FILE} ({})", marker.trim()));
        }
        match self.database_len {
            Some(length) => found.push(format!("{DATABASE_FILE} ({length} bytes)")),
            None => found.push(format!("no {DATABASE_FILE}")),
        }
        found.join(" and ")
    }
}

fn io_error(context: String, error: std::io::Error) -> StoreError {
    StoreError::Io { context, error }
}

fn damaged(path: &Path, found: String) -> StoreError {
    StoreError::Damaged {
        path: path.display().to_string(),
        found,
        recovery: RECOVERY.replace("DIR", &path.display().to_string()),
    }
}

/// Checks the directory before redb touches it.
fn survey_before_open(path: &Path) -> Result<Survey, StoreError> {
    let survey = Survey::of(path)?;
    let foreign = |marker: String| StoreError::ForeignStore {
        path: path.display().to_string(),
        marker,
    };
    if let Some(marker) = &survey.marker {
        if !marker.contains(&format!("\"engine\":\"{ENGINE}\"")) {
            let hint = match marker.contains("\"engine\":\"sled-") {
                true => {
                    "; it is a sled store: start with CTWA_STORE_ENGINE=sled to serve it \
                     (CTWA_STORE_ENGINE=redb opens only redb stores)"
                }
                false => "",
            };
            return Err(foreign(format!("{}{hint}", marker.trim())));
        }
    }
    if !survey.sled_files.is_empty() {
        return Err(foreign(format!(
            "sled's files {}; start with CTWA_STORE_ENGINE=sled to serve it \
             (CTWA_STORE_ENGINE=redb opens only redb stores)",
            survey.sled_files.join(", ")
        )));
    }
    if survey.marker.is_none() && survey.database_len.is_none() && !survey.unrelated.is_empty() {
        return Err(StoreError::NotAStore {
            path: path.display().to_string(),
            entries: survey.unrelated.join(", "),
        });
    }
    if survey.marker.is_some() && survey.database_len.unwrap_or(0) == 0 {
        return Err(damaged(
            path,
            format!(
                "{}, so the database this marker was written for is missing or empty",
                survey.describe()
            ),
        ));
    }
    Ok(survey)
}

/// `Err(LowFreeSpace)` when the file system of `path` has less than `min_free_bytes` available
/// (`CTWA_MIN_FREE_MB`; 0: never). Readiness fails on it; at start-up it is only a warning.
pub(super) fn check_free_space(path: &Path, min_free_bytes: u64) -> Result<(), StoreError> {
    if min_free_bytes == 0 {
        return Ok(());
    }
    let stats = rustix::fs::statvfs(path).map_err(|error| {
        io_error(
            format!("cannot read the free space of {}", path.display()),
            error.into(),
        )
    })?;
    let free_bytes = stats.f_bavail.saturating_mul(stats.f_frsize);
    if free_bytes >= min_free_bytes {
        return Ok(());
    }
    Err(StoreError::LowFreeSpace {
        path: path.display().to_string(),
        free_mib: free_bytes as f64 / (1024.0 * 1024.0),
        min_free_mb: min_free_bytes / (1024 * 1024),
    })
}

/// True when `error` comes from the disk having no room: ENOSPC, EDQUOT, or EFBIG (a file-size
/// limit).
pub(super) fn for_lack_of_space(error: &StoreError) -> bool {
    let io = match error {
        StoreError::Io { error, .. } => error,
        StoreError::Redb(error) => match &**error {
            redb::Error::Io(error) => error,
            _ => return false,
        },
        _ => return false,
    };
    matches!(
        io.kind(),
        std::io::ErrorKind::StorageFull
            | std::io::ErrorKind::QuotaExceeded
            | std::io::ErrorKind::FileTooLarge
    )
}

/// The error for opening that failed for lack of space: what happened, that nothing was lost,
/// and what to do.
fn no_room_to_open(path: &Path, error: StoreError) -> StoreError {
    let text = crate::error::error_chain(&error);
    StoreError::Io {
        context: format!(
            "the store in {} could not be opened: the file system is full ({text}). redb writes \
             while it opens (its header; after an unclean stop without saved allocator state, \
             its repair), and that write failed. The write changed nothing that was committed: \
             the store opens with all its data once there is space. Free some space or grow \
             the disk, then start again",
            path.display()
        ),
        error: std::io::Error::new(std::io::ErrorKind::StorageFull, text),
    }
}

/// Opens redb in `path` after the checks above; creates the tables, layout version and marker
/// of a new store, and checks the layout version of an existing one. Less free space than
/// `min_free_bytes` is logged as a warning, not refused.
pub(super) fn open_checked(
    path: &Path,
    min_free_bytes: u64,
    cache_bytes: u64,
) -> Result<Database, StoreError> {
    std::fs::create_dir_all(path).map_err(|error| StoreError::Io {
        context: format!("cannot create {}", path.display()),
        error,
    })?;
    let survey = survey_before_open(path)?;
    if let Err(low) = check_free_space(path, min_free_bytes) {
        tracing::warn!(
            "{}; the store opens and serves reads, and /readyz answers 503 until there is more \
             free space",
            crate::error::error_chain(&low)
        );
    }
    match open_surveyed(path, &survey, cache_bytes) {
        Err(error) if for_lack_of_space(&error) => Err(no_room_to_open(path, error)),
        other => other,
    }
}

/// Opens the database again in the same process after an I/O error closed it (redb answers
/// `PreviousIo` to everything after one). The old `Database` must be dropped first; a reader
/// that still holds it for a moment keeps the file locked, so `DatabaseAlreadyOpen` is retried
/// for up to a second.
pub(super) fn reopen(path: &Path, cache_bytes: u64) -> Result<Database, StoreError> {
    let file = path.join(DATABASE_FILE);
    let mut builder = Database::builder();
    builder.set_cache_size(usize::try_from(cache_bytes).unwrap_or(usize::MAX));
    let mut attempts = 0;
    loop {
        match builder.open(&file) {
            Ok(db) => return Ok(db),
            Err(redb::DatabaseError::DatabaseAlreadyOpen) if attempts < 100 => {
                attempts += 1;
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(error) => {
                let error = StoreError::from(error);
                return Err(match for_lack_of_space(&error) {
                    true => no_room_to_open(path, error),
                    false => error,
                });
            }
        }
    }
}

fn open_surveyed(path: &Path, survey: &Survey, cache_bytes: u64) -> Result<Database, StoreError> {
    let file = path.join(DATABASE_FILE);
    let mut builder = Database::builder();
    builder.set_cache_size(usize::try_from(cache_bytes).unwrap_or(usize::MAX));
    let opened = match survey.database_len {
        Some(_) => builder.open(&file),
        None => builder.create(&file),
    };
    let db = match opened {
        Ok(db) => db,
        Err(redb::DatabaseError::Storage(redb::StorageError::Corrupted(what))) => {
            return Err(damaged(
                path,
                format!(
                    "{}, and redb reports it corrupted: {what}",
                    survey.describe()
                ),
            ))
        }
        // redb's answer to a file whose header is not a redb header.
        Err(redb::DatabaseError::Storage(redb::StorageError::Io(error)))
            if error.kind() == std::io::ErrorKind::InvalidData =>
        {
            return Err(damaged(
                path,
                format!(
                    "{}, and redb cannot read it as a database: {error}",
                    survey.describe()
                ),
            ))
        }
        Err(redb::DatabaseError::DatabaseAlreadyOpen) => {
            return Err(StoreError::Io {
                context: format!(
                    "{} is already open in another process or store; stop the other ctwa-relay \
                     using {} first",
                    file.display(),
                    path.display()
                ),
                error: std::io::Error::new(std::io::ErrorKind::WouldBlock, "database locked"),
            })
        }
        Err(error) => return Err(error.into()),
    };
    let read = db.begin_read()?;
    let layout = match read.open_table(table(TableName::Meta)) {
        Ok(meta) => meta
            .get(LAYOUT_KEY)?
            .map(|value| String::from_utf8_lossy(value.value()).into_owned()),
        Err(redb::TableError::TableDoesNotExist(_)) => None,
        Err(error) => return Err(error.into()),
    };
    drop(read);
    match layout {
        None => {
            if survey.marker.is_some() || holds_data(&db)? {
                return Err(damaged(
                    path,
                    format!(
                        "{}, but the database has no layout version (meta/layout_version), so \
                         the data written before is missing",
                        survey.describe()
                    ),
                ));
            }
            commit_layout(&db)?;
            write_marker(path)?;
            sync_directory(path)?;
        }
        Some(found) if found == LAYOUT_VERSION.to_string() => {
            // Created, but stopped before its marker was written: write it now.
            if survey.marker.is_none() {
                write_marker(path)?;
                sync_directory(path)?;
            }
        }
        Some(found) if found == "1" => {
            commit_layout(&db)?;
            tracing::info!(
                path = %path.display(),
                "the store's layout was upgraded from 1 to {LAYOUT_VERSION}: new webhooks are \
                 journaled compressed (journal_v2); the uncompressed journal is read and pruned \
                 as before"
            );
            write_marker(path)?;
            sync_directory(path)?;
        }
        Some(found) => {
            return Err(StoreError::LayoutVersion {
                path: path.display().to_string(),
                found,
                expected: LAYOUT_VERSION,
            })
        }
    }
    Ok(db)
}

/// True when any table of a database without a layout version holds an entry.
fn holds_data(db: &Database) -> Result<bool, StoreError> {
    let read = db.begin_read()?;
    for name in TableName::ALL {
        match read.open_table(table(name)) {
            Ok(table) if !table.is_empty()? => return Ok(true),
            Ok(_) | Err(redb::TableError::TableDoesNotExist(_)) => {}
            Err(error) => return Err(error.into()),
        }
    }
    Ok(false)
}

/// Creates every table this layout has (those that exist are kept) and records the layout
/// version, in one durable commit: a new store's first commit, and the upgrade of a layout-1
/// store. Layout 2 reads layout 1's `journal` as it is, so an upgrade rewrites nothing; a crash
/// before the commit leaves the store as it was, and the next start does it again.
fn commit_layout(db: &Database) -> Result<(), StoreError> {
    let mut txn = db.begin_write()?;
    txn.set_quick_repair(true);
    for name in TableName::ALL {
        txn.open_table(table(name))?;
    }
    txn.open_table(table(TableName::Meta))?
        .insert(LAYOUT_KEY, LAYOUT_VERSION.to_string().as_bytes())?;
    txn.commit()?;
    Ok(())
}

fn write_marker(path: &Path) -> Result<(), StoreError> {
    let marker = path.join(MARKER_FILE);
    let temporary = path.join(format!("{MARKER_FILE}.tmp"));
    let text = format!(
        "{{\"engine\":\"{ENGINE}\",\"layoutVersion\":{LAYOUT_VERSION},\"createdAt\":\"{}\"}}\n",
        chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
    );
    let written = File::create(&temporary)
        .and_then(|mut file| {
            file.write_all(text.as_bytes())?;
            file.sync_all()
        })
        .and_then(|()| std::fs::rename(&temporary, &marker));
    written.map_err(|error| io_error(format!("cannot write {}", marker.display()), error))
}

fn sync_directory(path: &Path) -> Result<(), StoreError> {
    File::open(path)
        .and_then(|directory| directory.sync_all())
        .map_err(|error| io_error(format!("cannot fsync {}", path.display()), error))
}

#[cfg(test)]
mod tests {
    use super::super::RedbStore;
    use super::*;
    use crate::store::StoreHealth;

    fn refusal(outcome: Result<RedbStore, StoreError>) -> String {
        match outcome {
            Ok(_) => panic!("the store opened"),
            Err(error) => crate::error::error_chain(&error),
        }
    }

    async fn store_with_a_record(path: &Path) {
        let store = RedbStore::open(path).unwrap();
        store
            .unit(|tx| tx.insert(TableName::Users, b"user", b"{}"))
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn a_fresh_path_and_an_empty_directory_open_and_get_a_durable_marker() {
        let dir = tempfile::tempdir().unwrap();
        let fresh = dir.path().join("new").join("store");
        RedbStore::open(&fresh)
            .unwrap()
            .check_ready()
            .await
            .unwrap();
        let marker = std::fs::read_to_string(fresh.join(MARKER_FILE)).unwrap();
        assert!(marker.contains("\"engine\":\"redb-3\""), "{marker}");
        assert!(marker.contains("\"layoutVersion\":2"), "{marker}");
        let empty = tempfile::tempdir().unwrap();
        std::fs::create_dir(empty.path().join("lost+found")).unwrap();
        RedbStore::open(empty.path()).unwrap();
        assert!(empty.path().join(MARKER_FILE).exists());
        assert!(empty.path().join(DATABASE_FILE).exists());
    }

    #[tokio::test]
    async fn a_sled_store_is_refused_with_the_setting_that_opens_it() {
        let dir = tempfile::tempdir().unwrap();
        drop(crate::store::SledStore::open(dir.path()).unwrap());
        std::thread::sleep(std::time::Duration::from_millis(200));
        let message = refusal(RedbStore::open(dir.path()));
        assert!(message.contains("does not read"), "{message}");
        assert!(message.contains("sled-0.34"), "{message}");
        assert!(message.contains("CTWA_STORE_ENGINE=sled"), "{message}");
        assert!(!dir.path().join(DATABASE_FILE).exists());
        // sled's files without a marker (a store from before the marker) are refused the same way.
        std::fs::remove_file(dir.path().join(MARKER_FILE)).unwrap();
        let message = refusal(RedbStore::open(dir.path()));
        assert!(message.contains("sled's files"), "{message}");
        assert!(message.contains("CTWA_STORE_ENGINE=sled"), "{message}");
        assert!(!dir.path().join(DATABASE_FILE).exists());
    }

    #[tokio::test]
    async fn a_store_of_another_engine_is_not_opened() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join(MARKER_FILE),
            "{\"engine\":\"fjall-2\",\"layoutVersion\":2}",
        )
        .unwrap();
        let message = refusal(RedbStore::open(dir.path()));
        assert!(message.contains("does not read"), "{message}");
        assert!(message.contains("fjall-2"), "{message}");
        assert!(!dir.path().join(DATABASE_FILE).exists());
    }

    #[tokio::test]
    async fn a_directory_of_unrelated_files_is_not_made_into_a_store() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("notes.txt"), b"not a store").unwrap();
        let message = refusal(RedbStore::open(dir.path()));
        assert!(
            message.contains("not a ctwa-relay store (notes.txt)"),
            "{message}"
        );
        assert!(!dir.path().join(DATABASE_FILE).exists());
    }

    #[tokio::test]
    async fn a_marker_without_its_database_is_refused_not_started_empty() {
        for truncate in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            store_with_a_record(dir.path()).await;
            let file = dir.path().join(DATABASE_FILE);
            match truncate {
                true => std::fs::write(&file, b"").unwrap(),
                false => std::fs::remove_file(&file).unwrap(),
            }
            let message = refusal(RedbStore::open(dir.path()));
            assert!(message.contains("cannot be opened safely"), "{message}");
            assert!(message.contains("missing or empty"), "{message}");
            assert!(message.contains("backup"), "{message}");
            assert!(message.contains("move it aside"), "{message}");
            let left = std::fs::metadata(&file).map(|m| m.len()).unwrap_or(0);
            assert_eq!(left, 0, "nothing was created over the evidence");
        }
    }

    #[tokio::test]
    async fn a_marker_whose_database_has_no_layout_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        store_with_a_record(dir.path()).await;
        let file = dir.path().join(DATABASE_FILE);
        // A database that is there but empty: what starting afresh over the old one would give.
        std::fs::remove_file(&file).unwrap();
        drop(Database::create(&file).unwrap());
        let message = refusal(RedbStore::open(dir.path()));
        assert!(message.contains("no layout version"), "{message}");
        assert!(message.contains("cannot be opened safely"), "{message}");
    }

    #[tokio::test]
    async fn a_database_without_its_marker_gets_one_and_keeps_its_data() {
        let dir = tempfile::tempdir().unwrap();
        store_with_a_record(dir.path()).await;
        std::fs::remove_file(dir.path().join(MARKER_FILE)).unwrap();
        let store = RedbStore::open(dir.path()).unwrap();
        assert!(dir.path().join(MARKER_FILE).exists());
        let user = store
            .unit(|tx| tx.get(TableName::Users, b"user"))
            .await
            .unwrap();
        assert!(user.is_some());
    }

    #[tokio::test]
    async fn a_newer_layout_is_refused_with_a_clear_message() {
        let dir = tempfile::tempdir().unwrap();
        drop(RedbStore::open(dir.path()).unwrap());
        {
            let db = Database::open(dir.path().join(DATABASE_FILE)).unwrap();
            let txn = db.begin_write().unwrap();
            txn.open_table(table(TableName::Meta))
                .unwrap()
                .insert(LAYOUT_KEY, b"99".as_slice())
                .unwrap();
            txn.commit().unwrap();
        }
        let message = refusal(RedbStore::open(dir.path()));
        assert!(message.contains("layout version 99"), "{message}");
    }

    #[tokio::test]
    async fn a_corrupt_database_is_refused_as_damaged() {
        let dir = tempfile::tempdir().unwrap();
        store_with_a_record(dir.path()).await;
        let file = dir.path().join(DATABASE_FILE);
        let mut bytes = std::fs::read(&file).unwrap();
        // The file header: its magic number.
        bytes[..16].iter_mut().for_each(|byte| *byte ^= 0xff);
        std::fs::write(&file, bytes).unwrap();
        let message = refusal(RedbStore::open(dir.path()));
        assert!(message.contains("cannot be opened safely"), "{message}");
        assert!(message.contains("redb cannot read it"), "{message}");
        assert!(message.contains("ctwa.redb ("), "{message}");
        assert!(message.contains("backup"), "{message}");
    }

    #[tokio::test]
    async fn an_open_store_is_not_opened_twice() {
        let dir = tempfile::tempdir().unwrap();
        let _store = RedbStore::open(dir.path()).unwrap();
        let message = refusal(RedbStore::open(dir.path()));
        assert!(message.contains("already open"), "{message}");
    }

    #[tokio::test]
    async fn free_space_below_the_floor_opens_and_fails_readiness_with_the_figures() {
        let dir = tempfile::tempdir().unwrap();
        check_free_space(dir.path(), 1).unwrap();
        let low = check_free_space(dir.path(), u64::MAX)
            .unwrap_err()
            .to_string();
        assert!(low.contains("CTWA_MIN_FREE_MB"), "{low}");
        assert!(low.contains("free some space"), "{low}");
        store_with_a_record(dir.path()).await;
        let store = RedbStore::open_with_free_space(dir.path(), u64::MAX).unwrap();
        let user = store
            .read(|read| {
                let users = read.open_table(table(TableName::Users))?;
                Ok(users.get(b"user".as_slice())?.is_some())
            })
            .await
            .unwrap();
        assert!(user, "the store opened with its data");
        let unready = store.check_ready().await.unwrap_err();
        assert!(
            matches!(unready, StoreError::LowFreeSpace { .. }),
            "{unready}"
        );
        assert!(!unready.is_store_failure(), "low space alone is no failure");
        store.check_alive().await.unwrap();
        assert_eq!(store.failure(), None);
    }

    #[test]
    fn a_full_disk_is_told_apart_from_other_io_errors() {
        let full = |kind| StoreError::Io {
            context: "x".into(),
            error: std::io::Error::from(kind),
        };
        assert!(for_lack_of_space(&full(std::io::ErrorKind::StorageFull)));
        assert!(for_lack_of_space(&full(std::io::ErrorKind::QuotaExceeded)));
        assert!(!for_lack_of_space(&full(
            std::io::ErrorKind::PermissionDenied
        )));
        let redb_full = StoreError::from(redb::Error::Io(std::io::Error::from_raw_os_error(28)));
        assert!(for_lack_of_space(&redb_full));
        let message = crate::error::error_chain(&no_room_to_open(Path::new("/data"), redb_full));
        assert!(
            message.contains("could not be opened: the file system is full"),
            "{message}"
        );
        assert!(
            message.contains("changed nothing that was committed"),
            "{message}"
        );
        assert!(message.contains("Free some space"), "{message}");
        let eio = StoreError::from(redb::Error::Io(std::io::Error::from_raw_os_error(5)));
        assert!(!for_lack_of_space(&eio));
    }
}
