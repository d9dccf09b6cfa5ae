//! Opening the store safely: never start empty over existing data (SPEC §3).
//!
//! sled 0.34 can, after a power cut, find a 0-byte `conf` and quietly create a new empty store
//! over the old files, panic while it recovers ("tried to serialize Uninitialized"), or report
//! corruption. And with a nearly full disk, the snapshot it writes while opening can be left
//! partial, after which it never opens again. So before sled touches anything this module looks
//! at what the directory holds and how much space is free, it catches a panic inside sled, and
//! after a fresh store is created it writes a durable marker file, so that a later start knows a
//! store existed here even when sled reads it as empty.

use std::cell::RefCell;
use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::sync::Once;

use super::StoreError;

/// The file that says "a ctwa-relay store was created here". Written once, fsynced with its
/// directory, after the new store's layout version is on disk.
pub const MARKER_FILE: &str = "ctwa-store.json";

/// The engine named in the marker; a store written by another engine is never opened as sled.
const ENGINE: &str = "sled-0.34";

/// What the operator can do when the store is refused. RELIABILITY.md repeats it.
const RECOVERY: &str = "To recover: stop here and leave the directory as it is. Restore it from \
    your latest backup and start again; or, to start over with an EMPTY store and lose what it \
    held, move it aside (for example `mv DIR DIR.damaged`) and start again, keeping the moved copy \
    for salvage.";

/// The directory's contents before sled opens it.
#[derive(Debug, Default)]
struct Survey {
    /// The marker's text, when the marker exists.
    marker: Option<String>,
    /// Files and directories sled creates: `db`, `conf`, `blobs`, `snap.*`.
    sled_files: Vec<String>,
    /// The length of `conf`, when it exists. sled treats 8 bytes or fewer as "no store here".
    conf_len: Option<u64>,
    /// Everything else (`lost+found` and dotfiles aside).
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
            } else if name == "conf" {
                let length = entry.metadata().map(|metadata| metadata.len()).unwrap_or(0);
                survey.conf_len = Some(length);
                survey.sled_files.push(format!("conf ({length} bytes)"));
            } else if name == "db" || name == "blobs" || name.starts_with("snap.") {
                survey.sled_files.push(name);
            } else if name != "lost+found" && !name.starts_with('.') {
                survey.unrelated.push(name);
            }
        }
        survey.sled_files.sort();
        survey.unrelated.sort();
        Ok(survey)
    }

    /// True when anything shows that a store existed here before this start.
    fn store_existed(&self) -> bool {
        self.marker.is_some() || !self.sled_files.is_empty()
    }

    /// What was found, in words, for the refusal message.
    fn describe(&self) -> String {
        let mut found = Vec::new();
        if let Some(marker) = &self.marker {
            found.push(format!("the marker {MARKER_FILE} ({})", marker.trim()));
        }
        if !self.sled_files.is_empty() {
            found.push(format!("sled's files {}", self.sled_files.join(", ")));
        }
        match found.is_empty() {
            true => "no store files".to_string(),
            false => found.join(" and "),
        }
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

/// Checks the directory before sled touches it; returns what it holds.
fn survey_before_open(path: &Path) -> Result<Survey, StoreError> {
    let survey = Survey::of(path)?;
    if let Some(marker) = &survey.marker {
        if !marker.contains(&format!("\"engine\":\"{ENGINE}\"")) {
            return Err(StoreError::ForeignStore {
                path: path.display().to_string(),
                marker: marker.trim().to_string(),
            });
        }
    }
    if !survey.store_existed() && !survey.unrelated.is_empty() {
        return Err(StoreError::NotAStore {
            path: path.display().to_string(),
            entries: survey.unrelated.join(", "),
        });
    }
    if !survey.store_existed() {
        return Ok(survey);
    }
    // sled treats a missing or short `conf` as "no store here" and starts a new, empty one over
    // whatever else the directory holds; refuse before it rewrites anything.
    match survey.conf_len {
        Some(length) if length > 8 => Ok(survey),
        _ => Err(damaged(
            path,
            format!(
                "{}, but sled's `conf` is missing or too short to read, so sled would start an \
                 empty store over the old files (when only `conf` was lost, copying `conf` from a \
                 new empty store made by this release into a copy of the directory may bring \
                 the data back; ctwa-relay refuses again if it does not)",
                survey.describe()
            ),
        )),
    }
}

/// Refuses to open when the file system of `path` has less than `min_free_bytes` available:
/// sled writes a snapshot while it opens, and a partial one leaves the store unopenable.
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
    Err(StoreError::LowDiskSpace {
        path: path.display().to_string(),
        free_mib: free_bytes as f64 / (1024.0 * 1024.0),
        min_free_mb: min_free_bytes / (1024 * 1024),
    })
}

thread_local! {
    /// Set while this thread runs sled's open: a panic then is captured here instead of printed.
    static CAPTURED_PANIC: RefCell<Option<Option<String>>> = const { RefCell::new(None) };
}

static QUIET_PANIC_HOOK: Once = Once::new();

/// Wraps the panic hook once, so that a panic inside sled's open is captured for the refusal
/// message rather than printed with a backtrace; every other panic goes to the previous hook.
fn install_quiet_panic_hook() {
    QUIET_PANIC_HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let captured = CAPTURED_PANIC.with(|slot| {
                let mut slot = slot.borrow_mut();
                match slot.as_mut() {
                    Some(message) => {
                        *message = Some(format!("{} ({})", panic_text(info), location(info)));
                        true
                    }
                    None => false,
                }
            });
            if !captured {
                previous(info);
            }
        }));
    });
}

fn panic_text(info: &std::panic::PanicHookInfo<'_>) -> String {
    match (
        info.payload().downcast_ref::<&str>(),
        info.payload().downcast_ref::<String>(),
    ) {
        (Some(text), _) => text.to_string(),
        (_, Some(text)) => text.clone(),
        _ => "a panic without a message".to_string(),
    }
}

fn location(info: &std::panic::PanicHookInfo<'_>) -> String {
    match info.location() {
        Some(location) => format!("{}:{}", location.file(), location.line()),
        None => "unknown location".to_string(),
    }
}

/// Runs sled's open (`open`), turning a panic inside it into a refusal.
fn open_sled(
    path: &Path,
    survey: &Survey,
    open: impl FnOnce() -> sled::Result<sled::Db> + std::panic::UnwindSafe,
) -> Result<sled::Db, StoreError> {
    install_quiet_panic_hook();
    CAPTURED_PANIC.with(|slot| *slot.borrow_mut() = Some(None));
    let outcome = std::panic::catch_unwind(open);
    let captured = CAPTURED_PANIC.with(|slot| slot.borrow_mut().take().flatten());
    match outcome {
        Ok(Ok(db)) => Ok(db),
        Ok(Err(sled::Error::Corruption { .. })) => Err(damaged(
            path,
            format!(
                "{}, and sled reports corrupted data in them",
                survey.describe()
            ),
        )),
        Ok(Err(error)) => Err(StoreError::Sled(error)),
        Err(_) => Err(damaged(
            path,
            format!(
                "{}, and sled panicked while reading them: {}; the store is damaged",
                survey.describe(),
                captured.unwrap_or_else(|| "no message".into())
            ),
        )),
    }
}

/// Opens sled in `path` after the checks above. The caller then asks [`Opened::reads_as_empty`]
/// when the store lacks its layout key.
pub(super) fn open_checked(
    path: &Path,
    min_free_bytes: u64,
    cache_bytes: u64,
) -> Result<Opened, StoreError> {
    let survey = survey_before_open(path)?;
    check_free_space(path, min_free_bytes)?;
    let db = open_sled(path, &survey, || {
        sled::Config::new()
            .path(path)
            .cache_capacity(cache_bytes)
            .open()
    })?;
    Ok(Opened { db, survey })
}

pub(super) struct Opened {
    pub db: sled::Db,
    survey: Survey,
}

impl Opened {
    /// The refusal for a store that existed here but that sled reads without a layout version.
    pub fn reads_as_empty(&self, path: &Path) -> Option<StoreError> {
        if !self.survey.store_existed() {
            return None;
        }
        Some(damaged(
            path,
            format!(
                "{}, but sled opens them as an empty store (no meta/layout_version), so the data \
                 written before is missing",
                self.survey.describe()
            ),
        ))
    }

    /// Makes a store's existence durable: sled's `conf` (which sled writes without an fsync),
    /// then the marker, then the directory entries. Cheap, and idempotent on every start.
    pub fn make_existence_durable(&self, path: &Path) -> Result<(), StoreError> {
        let conf = path.join("conf");
        File::open(&conf)
            .and_then(|file| file.sync_all())
            .map_err(|error| io_error(format!("cannot fsync {}", conf.display()), error))?;
        if self.survey.marker.is_none() {
            write_marker(path)?;
        }
        sync_directory(path)
    }
}

fn write_marker(path: &Path) -> Result<(), StoreError> {
    let marker = path.join(MARKER_FILE);
    let temporary = path.join(format!("{MARKER_FILE}.tmp"));
    let text = format!(
        "{{\"engine\":\"{ENGINE}\",\"layoutVersion\":{},\"createdAt\":\"{}\"}}\n",
        super::LAYOUT_VERSION,
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
    use super::*;

    #[test]
    fn a_panic_inside_sled_becomes_a_refusal_that_says_the_store_is_damaged() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("db"), b"old").unwrap();
        let survey = Survey::of(dir.path()).unwrap();
        let refusal = open_sled(dir.path(), &survey, || {
            panic!("tried to serialize Uninitialized")
        })
        .err()
        .unwrap()
        .to_string();
        assert!(refusal.contains("sled panicked"), "{refusal}");
        assert!(
            refusal.contains("tried to serialize Uninitialized"),
            "{refusal}"
        );
        assert!(refusal.contains("the store is damaged"), "{refusal}");
        assert!(refusal.contains("backup"), "{refusal}");
        // Panics outside sled's open still reach the previous hook and unwind as before.
        assert!(std::panic::catch_unwind(|| panic!("elsewhere")).is_err());
        assert!(CAPTURED_PANIC.with(|slot| slot.borrow().is_none()));
    }

    #[test]
    fn free_space_below_the_floor_is_refused_with_the_figures() {
        let dir = tempfile::tempdir().unwrap();
        check_free_space(dir.path(), 1).unwrap();
        check_free_space(dir.path(), 0).unwrap();
        let refusal = check_free_space(dir.path(), u64::MAX)
            .unwrap_err()
            .to_string();
        assert!(
            refusal.contains("MiB is free on the file system of"),
            "{refusal}"
        );
        assert!(refusal.contains("CTWA_MIN_FREE_MB"), "{refusal}");
        assert!(
            refusal.contains("free some space or grow the disk"),
            "{refusal}"
        );
    }

    #[test]
    fn lost_found_and_dotfiles_are_not_counted_as_unrelated_files() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("lost+found")).unwrap();
        std::fs::write(dir.path().join(".keep"), b"").unwrap();
        let survey = survey_before_open(dir.path()).unwrap();
        assert!(!survey.store_existed());
        assert!(survey.unrelated.is_empty());
    }
}
