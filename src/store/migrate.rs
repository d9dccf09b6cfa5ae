//! `ctwa-relay migrate-store`: carries a sled store over to a new redb store.
//!
//! Both engines keep the same trees/tables (redb's [`TableName`]s are sled's tree names), the
//! same key encodings and the same JSON records (layout version 1), so the migration copies
//! every sled tree into the redb table of the same name, [`BATCH`] entries per write
//! transaction. The source is opened through [`SledStore::open`], so it passes every check the
//! server makes (a damaged or foreign store is refused, and sled's file lock refuses a store a
//! running server holds); it is held open, read only, until the copy is verified.
//!
//! The target must be a new or empty directory. Its database gets the layout version (and the
//! journal's next sequence number) only after every table's count matches its tree's and a
//! few values per table were compared, in one last commit; the marker is written after that by
//! [`RedbStore::open`], which also proves the result opens. So an interrupted migration leaves a
//! database with data but no layout version, which redb's open refuses as damaged, and a rerun
//! refuses the non-empty target until it is removed.

use std::fmt;
use std::path::Path;
use std::time::{Duration, Instant};

use ::redb::{Database, ReadableDatabase, ReadableTableMetadata};

use super::redb::{table, TableName, DATABASE_FILE, LAYOUT_KEY, NEXT_SEQ_KEY, SLED_LAYOUT_VERSION};
use super::{RedbStore, SledStore, StoreError, MARKER_FILE};

/// Entries copied per redb write transaction.
const BATCH: usize = 10_000;

/// How many keys per table are compared value for value after the copy.
const SPOT_CHECKS: usize = 5;

/// One tree and its table after the copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableCount {
    pub name: &'static str,
    pub sled: u64,
    pub redb: u64,
}

/// What [`sled_to_redb`] copied and checked.
#[derive(Debug, Clone)]
pub struct MigrationReport {
    /// Every table, in [`TableName::ALL`] order. `meta` counts sled's entries, and redb's
    /// without the journal's next sequence number, which sled keeps elsewhere.
    pub tables: Vec<TableCount>,
    /// Values compared key by key after the copy, over all tables.
    pub spot_checked: usize,
    /// The journal's next sequence number written to the new store.
    pub journal_next_seq: u64,
    pub elapsed: Duration,
}

impl MigrationReport {
    /// Entries copied over all tables.
    pub fn total(&self) -> u64 {
        self.tables.iter().map(|count| count.sled).sum()
    }
}

impl fmt::Display for MigrationReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{:<28} {:>12} {:>12}", "tree/table", "sled", "redb")?;
        for count in &self.tables {
            let mark = if count.sled == count.redb {
                ""
            } else {
                "  MISMATCH"
            };
            writeln!(
                f,
                "{:<28} {:>12} {:>12}{mark}",
                count.name, count.sled, count.redb
            )?;
        }
        writeln!(f, "{:<28} {:>12}", "total", self.total())?;
        write!(
            f,
            "counts match; {} values compared; journal_next_seq {}; {:.1} s",
            self.spot_checked,
            self.journal_next_seq,
            self.elapsed.as_secs_f64()
        )
    }
}

fn refused(context: String, kind: std::io::ErrorKind, why: &str) -> StoreError {
    StoreError::Io {
        context,
        error: std::io::Error::new(kind, why.to_string()),
    }
}

/// Copies the sled store in `from` into a new redb store in `to`, verifies it by counts and
/// spot checks, and only then makes it a store redb opens. Blocking.
pub fn sled_to_redb(from: &Path, to: &Path) -> Result<MigrationReport, StoreError> {
    let started = Instant::now();
    check_source(from)?;
    check_target(to)?;
    // The server's own open: refuses a damaged, foreign or locked store, loads its records.
    let source = SledStore::open(from).map_err(|error| match error {
        StoreError::Sled(sled::Error::Io(error))
            // sled reports its file lock as an `Other` error with this text.
            if error.to_string().contains("could not acquire lock") =>
        {
            StoreError::Io {
                context: format!(
                    "--from {} is open in another process (a running ctwa-relay?); stop it, \
                     then run migrate-store again",
                    from.display()
                ),
                error,
            }
        }
        error => error,
    })?;
    let sled_db = source.database();
    check_tree_names(&sled_db, from)?;

    std::fs::create_dir_all(to).map_err(|error| StoreError::Io {
        context: format!("cannot create {}", to.display()),
        error,
    })?;
    let db = Database::create(to.join(DATABASE_FILE))?;

    let mut next_seq = 0u64;
    let mut tables = Vec::with_capacity(TableName::ALL.len());
    let mut samples = Vec::new();
    for name in layout_1_tables() {
        let tree = sled_db.open_tree(name.as_str())?;
        let expected = tree.len() as u64;
        let sample_every = (expected as usize / SPOT_CHECKS).max(1);
        let mut copied = 0u64;
        let mut entries = tree.iter();
        loop {
            let txn = db.begin_write()?;
            let mut written = 0;
            {
                let mut target = txn.open_table(table(name))?;
                for entry in entries.by_ref() {
                    let (key, value) = entry?;
                    if name == TableName::Meta && key.as_ref() == LAYOUT_KEY {
                        // Written last, after the checks.
                        check_layout(&value, from)?;
                    } else {
                        target.insert(key.as_ref(), value.as_ref())?;
                        if copied.is_multiple_of(sample_every as u64) || copied + 1 == expected {
                            samples.push((name, key.to_vec()));
                        }
                    }
                    if name == TableName::Journal {
                        let seq = journal_seq(&key)?;
                        next_seq = next_seq.max(seq + 1);
                    }
                    copied += 1;
                    written += 1;
                    if written == BATCH {
                        break;
                    }
                }
            }
            txn.commit()?;
            if written < BATCH {
                break;
            }
        }
        tables.push(TableCount {
            name: name.as_str(),
            sled: copied,
            redb: 0,
        });
    }

    // Verify before the store gets its layout version: counts, then values.
    let read = db.begin_read()?;
    for count in &mut tables {
        let name = layout_1_tables()
            .find(|name| name.as_str() == count.name)
            .expect("a table of the list");
        let held = read.open_table(table(name))?.len()?;
        // The layout version is written last, below; sled's is counted in `count.sled`.
        count.redb = match name {
            TableName::Meta => held + 1,
            _ => held,
        };
        let tree = sled_db.open_tree(name.as_str())?;
        if count.sled != tree.len() as u64 {
            return Err(StoreError::Corrupt(format!(
                "the sled tree {} changed during the migration ({} entries copied, {} now); \
                 is a server running on {}? Stop it, remove {} and run migrate-store again",
                count.name,
                count.sled,
                tree.len(),
                from.display(),
                to.display()
            )));
        }
        if count.redb != count.sled {
            return Err(StoreError::Corrupt(format!(
                "the redb table {} holds {} entries after the copy, the sled tree {}; the \
                 target {} is incomplete and will not open: remove it and run migrate-store again",
                count.name,
                count.redb,
                count.sled,
                to.display()
            )));
        }
    }
    for (name, key) in &samples {
        let sled_value = sled_db.open_tree(name.as_str())?.get(key)?;
        let table = read.open_table(table(*name))?;
        let redb_value = table.get(key.as_slice())?;
        let redb_value = redb_value.as_ref().map(|value| value.value());
        if sled_value.as_deref() != redb_value {
            return Err(StoreError::Corrupt(format!(
                "the value of a key in {} differs between sled and redb after the copy; the \
                 target {} is incomplete and will not open: remove it and run migrate-store again",
                name.as_str(),
                to.display()
            )));
        }
    }
    drop(read);

    // The last commit makes it a store: the layout version and the journal's next number. It is
    // sled's layout 1, as copied; redb's open below upgrades it to the current layout.
    let txn = db.begin_write()?;
    {
        let mut meta = txn.open_table(table(TableName::Meta))?;
        meta.insert(LAYOUT_KEY, SLED_LAYOUT_VERSION.to_string().as_bytes())?;
        meta.insert(NEXT_SEQ_KEY, next_seq.to_be_bytes().as_slice())?;
    }
    txn.commit()?;
    drop(db);
    drop(sled_db);
    drop(source);

    // redb's own open writes the marker (fsynced with the directory) and loads the records.
    drop(RedbStore::open(to)?);
    Ok(MigrationReport {
        tables,
        spot_checked: samples.len(),
        journal_next_seq: next_seq,
        elapsed: started.elapsed(),
    })
}

/// The source must hold a sled store: opening a missing or empty directory would create one.
fn check_source(from: &Path) -> Result<(), StoreError> {
    if !from.is_dir() {
        return Err(refused(
            format!(
                "--from {} is not a directory; give the data dir (CTWA_DATA_DIR) of the sled store \
                 to migrate",
                from.display()
            ),
            std::io::ErrorKind::NotFound,
            "no such directory",
        ));
    }
    let marker = std::fs::read_to_string(from.join(MARKER_FILE)).unwrap_or_default();
    if marker.contains(&format!("\"engine\":\"{}\"", super::redb::ENGINE)) {
        return Err(refused(
            format!(
                "--from {} is already a redb store: there is nothing to migrate; serve it with \
                 CTWA_STORE_ENGINE=redb",
                from.display()
            ),
            std::io::ErrorKind::InvalidInput,
            "already redb",
        ));
    }
    if !from.join(MARKER_FILE).exists() && !from.join("conf").exists() {
        return Err(refused(
            format!(
                "--from {} holds no sled store (neither {MARKER_FILE} nor sled's conf); give the \
                 data dir (CTWA_DATA_DIR) of the sled store to migrate",
                from.display()
            ),
            std::io::ErrorKind::NotFound,
            "no sled store",
        ));
    }
    Ok(())
}

/// The target must be new or empty, so that nothing is overwritten and a failed run is redone
/// from scratch.
fn check_target(to: &Path) -> Result<(), StoreError> {
    let entries = match std::fs::read_dir(to) {
        Ok(entries) => entries,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(error) => {
            return Err(StoreError::Io {
                context: format!("cannot list --to {}", to.display()),
                error,
            })
        }
    };
    let mut found = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|error| StoreError::Io {
            context: format!("cannot list --to {}", to.display()),
            error,
        })?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name != "lost+found" {
            found.push(name);
        }
    }
    if found.is_empty() {
        return Ok(());
    }
    found.sort();
    Err(refused(
        format!(
            "--to {} is not empty ({}); migrate-store writes only into a new or empty directory. \
             If it is the target of an earlier, interrupted migration, remove it (`rm -r {}`) \
             and run migrate-store again; otherwise choose another path",
            to.display(),
            found.join(", "),
            to.display()
        ),
        std::io::ErrorKind::AlreadyExists,
        "target not empty",
    ))
}

/// Refuses a sled store holding a tree redb has no table for: it would be left behind.
/// The tables of layout 1: sled's trees, each copied into the redb table of the same name.
fn layout_1_tables() -> impl Iterator<Item = TableName> {
    TableName::ALL.into_iter().filter(|name| name.in_layout_1())
}

fn check_tree_names(db: &sled::Db, from: &Path) -> Result<(), StoreError> {
    let default = db.name();
    for name in db.tree_names() {
        if name == default {
            continue;
        }
        let known = layout_1_tables().any(|table| table.as_str().as_bytes() == name.as_ref());
        if !known {
            return Err(StoreError::Corrupt(format!(
                "the sled store in {} holds a tree {:?} that this release does not know; \
                 migrate it with the release that wrote it",
                from.display(),
                String::from_utf8_lossy(&name)
            )));
        }
    }
    if !db.is_empty() {
        return Err(StoreError::Corrupt(format!(
            "the sled store in {} holds entries outside its trees; migrate it with the release \
             that wrote it",
            from.display()
        )));
    }
    Ok(())
}

fn check_layout(value: &[u8], from: &Path) -> Result<(), StoreError> {
    if value == SLED_LAYOUT_VERSION.to_string().as_bytes() {
        return Ok(());
    }
    Err(StoreError::LayoutVersion {
        path: from.display().to_string(),
        found: String::from_utf8_lossy(value).into_owned(),
        expected: SLED_LAYOUT_VERSION,
    })
}

fn journal_seq(key: &[u8]) -> Result<u64, StoreError> {
    key.try_into()
        .map(u64::from_be_bytes)
        .map_err(|_| StoreError::Corrupt("a journal key is not 8 bytes".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// More entries than one batch, in several trees, written straight into sled's trees.
    fn sled_store_with(path: &Path, journal_entries: u64) {
        let store = SledStore::open(path).unwrap();
        let db = store.database();
        let journal = db.open_tree("journal").unwrap();
        for seq in 0..journal_entries {
            journal
                .insert((seq * 3).to_be_bytes(), format!("body {seq}").as_bytes())
                .unwrap();
        }
        let users = db.open_tree("users").unwrap();
        users.insert(b"15550001111", b"{\"user\":1}").unwrap();
        db.open_tree("meta")
            .unwrap()
            .insert(b"readyz", b"1")
            .unwrap();
        db.flush().unwrap();
        drop(db);
        drop(store);
    }

    fn open_sled_again(path: &Path) -> SledStore {
        // The dropped store's flusher thread lets go of sled's lock a moment later.
        for _ in 0..50 {
            if let Ok(store) = SledStore::open(path) {
                return store;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        SledStore::open(path).unwrap()
    }

    #[test]
    fn every_tree_is_copied_in_batches_and_the_journal_continues_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let from = dir.path().join("sled");
        let to = dir.path().join("redb");
        sled_store_with(&from, BATCH as u64 * 2 + 7);
        drop(open_sled_again(&from));
        std::thread::sleep(Duration::from_millis(300));

        let report = sled_to_redb(&from, &to).unwrap();
        let count = |name: &str| {
            report
                .tables
                .iter()
                .find(|count| count.name == name)
                .cloned()
                .unwrap()
        };
        let journal = count("journal");
        assert_eq!((journal.sled, journal.redb), (20_007, 20_007));
        assert_eq!((count("users").sled, count("users").redb), (1, 1));
        // layout_version and readyz.
        assert_eq!((count("meta").sled, count("meta").redb), (2, 2));
        assert_eq!(report.tables.len(), layout_1_tables().count());
        assert_eq!(report.journal_next_seq, 20_006 * 3 + 1);
        assert!(report.spot_checked >= SPOT_CHECKS + 2, "{report}");
        assert!(report.to_string().contains("counts match"));

        let db = Database::open(to.join(DATABASE_FILE)).unwrap();
        let read = db.begin_read().unwrap();
        let meta = read.open_table(table(TableName::Meta)).unwrap();
        let next = meta.get(NEXT_SEQ_KEY).unwrap().unwrap();
        assert_eq!(next.value(), (20_006u64 * 3 + 1).to_be_bytes().as_slice());
        let journal = read.open_table(table(TableName::Journal)).unwrap();
        let last = journal
            .get((20_006u64 * 3).to_be_bytes().as_slice())
            .unwrap();
        assert_eq!(last.unwrap().value(), b"body 20006");
        drop((next, meta, journal, read, db));
        assert!(to.join(MARKER_FILE).exists());
        RedbStore::open(&to).unwrap();
        // The source is left as it was, and still opens as sled.
        assert_eq!(
            open_sled_again(&from)
                .database()
                .open_tree("journal")
                .unwrap()
                .len(),
            20_007
        );
    }

    #[test]
    fn a_copy_cut_short_before_its_layout_version_is_refused_by_redb() {
        let dir = tempfile::tempdir().unwrap();
        // What an interrupted migration leaves: data, no layout version, no marker.
        let db = Database::create(dir.path().join(DATABASE_FILE)).unwrap();
        let txn = db.begin_write().unwrap();
        txn.open_table(table(TableName::Journal))
            .unwrap()
            .insert(0u64.to_be_bytes().as_slice(), b"body".as_slice())
            .unwrap();
        txn.commit().unwrap();
        drop(db);
        let refusal = match RedbStore::open(dir.path()) {
            Ok(_) => panic!("a partial migration opened"),
            Err(error) => error.to_string(),
        };
        assert!(refusal.contains("no layout version"), "{refusal}");
        assert!(!dir.path().join(MARKER_FILE).exists());
        // And migrate-store will not write over it.
        let message = check_target(dir.path()).unwrap_err().to_string();
        assert!(message.contains("is not empty (ctwa.redb)"), "{message}");
    }
}
