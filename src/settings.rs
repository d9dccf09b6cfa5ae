//! One settings tree, layered by figment: built-in defaults, then an optional TOML file, then
//! `CTWA_*` environment variables (the environment wins). The file's key `name` is the
//! variable `CTWA_NAME`. Everything is parsed into typed fields and checked once, at load time,
//! and an invalid value is named where it was written: `CTWA_LISTEN`, or `listen in ctwa.toml`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::providers::{Format, Serialized, Toml};
use figment::value::{Dict, Map, Value};
use figment::{Figment, Metadata, Profile, Provider, Source};
use serde::{Deserialize, Serialize};
use url::Url;

use crate::secret::Secret;

/// Meta's business-messaging event catalogue (SPEC §5.4), the default allowlist.
pub const DEFAULT_EVENT_NAMES: [&str; 14] = [
    "LeadSubmitted",
    "QualifiedLead",
    "Purchase",
    "AddToCart",
    "InitiateCheckout",
    "ViewContent",
    "OrderCreated",
    "OrderShipped",
    "OrderDelivered",
    "OrderCanceled",
    "OrderReturned",
    "CartAbandoned",
    "RatingProvided",
    "ReviewProvided",
];

/// The largest `CTWA_MIN_FREE_MB` accepted; a bigger value is almost surely bytes, not MiB.
const MAX_MIN_FREE_MB: u64 = 1024 * 1024;
/// Bounds of `cache_mb`: below 8 MiB the engines thrash, above 64 GiB is a typo.
const MIN_CACHE_MB: u64 = 8;
const MAX_CACHE_MB: u64 = 64 * 1024;

/// The embedded engine behind the storage seam.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreEngine {
    /// The engine of the store already in the data directory; redb for a new one.
    Auto,
    Sled,
    Redb,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone)]
pub struct Settings {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub app_secrets: Vec<Secret>,
    pub verify_token: Option<Secret>,
    pub admin_token: Option<Secret>,
    /// Graph API base URL, http or https with a host.
    pub graph_url: Url,
    pub graph_version: String,
    pub event_names: Vec<String>,
    pub attribution_window_days: u32,
    pub partner_agent: Option<String>,
    pub log_format: LogFormat,
    /// HTTP worker threads; 0 means one per core.
    pub workers: usize,
    /// Body limit of the `/v1` JSON API.
    pub api_body_limit: usize,
    /// Timeout of one Graph API request.
    pub graph_timeout: Duration,
    /// How long a conversion request may spend retrying transient Meta failures before it is
    /// answered 202 and left to the outbox.
    pub delivery_budget: Duration,
    /// How often the outbox worker looks for due conversions.
    pub outbox_poll_interval: Duration,
    /// The outbox waits this long after the first failed attempt, doubling each time…
    pub outbox_backoff_base: Duration,
    /// …up to this.
    pub outbox_backoff_max: Duration,
    /// A conversion whose Graph call may have reached Meta without an answer (a timeout, a
    /// broken connection, a crash mid-send) is sent once more, flagged `possibleDuplicate`, no
    /// earlier than this after that call.
    pub unknown_resend_after: Duration,
    /// Journaled webhook bodies older than this are deleted (bodies still held for an unknown
    /// number are kept); `None` keeps them forever.
    pub journal_retention_days: Option<u32>,
    /// The free space (MiB) the data dir's file system should keep; 0 turns the check off.
    /// sled refuses to open below it: it writes a snapshot while it opens, and a partial one
    /// leaves it unopenable. redb opens anyway (it opens a cleanly closed store, or one whose
    /// last commit saved its allocator state, without allocating space), logs a warning, serves
    /// reads, and `/readyz` answers 503 while the free space stays below it; writes that do not
    /// fit fail with 503 and are never acknowledged.
    pub min_free_mb: u64,
    /// The engine that opens the store in `data_dir`; each refuses the other's store.
    pub store_engine: StoreEngine,
    /// The embedded engine's page cache (MiB): memory is bounded by this, not by the data.
    pub cache_mb: u64,
}

impl Default for Settings {
    fn default() -> Self {
        RawSettings::default()
            .into_settings(variable_name)
            .expect("the built-in defaults are valid")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    /// The cause is the `source` (`main` prints causes after the message).
    #[error("cannot read the configuration file {path}")]
    ReadFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the configuration file {path} is not valid: {message}")]
    ParseFile { path: PathBuf, message: String },
    /// `key` names the value where it was written: `CTWA_LISTEN`, or `listen in ctwa.toml`.
    #[error("{key} is not valid: {message}")]
    Invalid { key: String, message: String },
}

/// The settings as they are written: TOML key names and plain values, every key with its
/// default. The serialised defaults are therefore also the list of keys that the file may hold
/// and the environment may set. [`RawSettings::into_settings`] parses them into [`Settings`].
#[derive(Serialize, Deserialize)]
struct RawSettings {
    listen: String,
    data_dir: PathBuf,
    app_secrets: StringOrList,
    verify_token: String,
    admin_token: String,
    graph_url: String,
    graph_version: String,
    event_names: StringOrList,
    attribution_window_days: u32,
    partner_agent: String,
    log_format: String,
    workers: usize,
    api_body_limit: usize,
    graph_timeout_ms: u64,
    delivery_budget_ms: u64,
    unknown_resend_after_ms: u64,
    outbox_poll_interval_ms: u64,
    outbox_backoff_base_ms: u64,
    outbox_backoff_max_ms: u64,
    /// 0 keeps the journal forever.
    journal_retention_days: u32,
    min_free_mb: u64,
    store_engine: String,
    cache_mb: u64,
}

impl Default for RawSettings {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".into(),
            data_dir: PathBuf::from("./ctwa-data"),
            app_secrets: StringOrList::Many(Vec::new()),
            verify_token: String::new(),
            admin_token: String::new(),
            graph_url: "https://graph.facebook.com".into(),
            graph_version: "v25.0".into(),
            event_names: StringOrList::Many(
                DEFAULT_EVENT_NAMES
                    .iter()
                    .map(|name| name.to_string())
                    .collect(),
            ),
            attribution_window_days: 7,
            partner_agent: String::new(),
            log_format: "text".into(),
            workers: 0,
            api_body_limit: 64 * 1024,
            graph_timeout_ms: 1500,
            delivery_budget_ms: 5_000,
            unknown_resend_after_ms: 300_000,
            outbox_poll_interval_ms: 5_000,
            outbox_backoff_base_ms: 30_000,
            outbox_backoff_max_ms: 3_600_000,
            journal_retention_days: 30,
            min_free_mb: 64,
            store_engine: "auto".into(),
            cache_mb: 128,
        }
    }
}

/// A list written as a TOML array or as one comma-separated string (the only form a variable
/// has); items are trimmed and empty ones dropped.
#[derive(Serialize, Deserialize)]
#[serde(
    untagged,
    expecting = "a list of strings, or one string of comma-separated items"
)]
enum StringOrList {
    One(String),
    Many(Vec<String>),
}

impl StringOrList {
    fn into_list(self) -> Vec<String> {
        let items = match self {
            StringOrList::One(joined) => joined.split(',').map(str::to_string).collect(),
            StringOrList::Many(items) => items,
        };
        items
            .into_iter()
            .map(|item| item.trim().to_string())
            .filter(|item| !item.is_empty())
            .collect()
    }
}

impl Settings {
    /// Loads defaults, then `config_file` if given, then the process environment.
    pub fn load(config_file: Option<&Path>) -> Result<Self, SettingsError> {
        Self::load_from(config_file, |name| std::env::var(name).ok())
    }

    /// Like [`Settings::load`], with the environment given as a lookup function (for tests).
    pub fn load_from(
        config_file: Option<&Path>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, SettingsError> {
        let defaults = Value::serialize(RawSettings::default())
            .ok()
            .and_then(Value::into_dict)
            .expect("the defaults serialise to a table");
        let mut figment = Figment::from(Serialized::defaults(RawSettings::default()));
        if let Some(path) = config_file {
            check_file(path, &defaults)?;
            figment = figment.merge(Toml::file_exact(path));
        }
        figment = figment.merge(Environment::read(&defaults, env)?);
        let raw: RawSettings = figment.extract().map_err(|error| {
            let key = error.path.join(".");
            SettingsError::Invalid {
                key: written_name(&key, error.metadata.as_ref()),
                message: error.kind.to_string(),
            }
        })?;
        raw.into_settings(|key| written_name(key, figment.find_metadata(key)))
    }

    /// [`Settings::cache_mb`] in bytes.
    pub fn cache_bytes(&self) -> u64 {
        self.cache_mb * 1024 * 1024
    }

    /// [`Settings::min_free_mb`] in bytes.
    pub fn min_free_bytes(&self) -> u64 {
        self.min_free_mb * 1024 * 1024
    }

    pub fn attribution_window_secs(&self) -> i64 {
        i64::from(self.attribution_window_days) * 86_400
    }

    /// Features that stay off until a variable is set, for the one start-up notice.
    pub fn disabled_features(&self) -> Vec<&'static str> {
        let mut off = Vec::new();
        if self.app_secrets.is_empty() {
            off.push("webhook POSTs are refused with 503 until CTWA_APP_SECRETS is set");
        }
        if self.verify_token.is_none() {
            off.push("the webhook handshake is refused with 403 until CTWA_VERIFY_TOKEN is set");
        }
        if self.admin_token.is_none() {
            off.push("the admin API is closed until CTWA_ADMIN_TOKEN is set");
        }
        off
    }
}

impl RawSettings {
    /// Parses and checks every value. `name` says how a key is named in an error: the
    /// variable, or the key and the file, whichever layer gave the value.
    fn into_settings(self, name: impl Fn(&str) -> String) -> Result<Settings, SettingsError> {
        let invalid = |key: &str, message: String| SettingsError::Invalid {
            key: name(key),
            message,
        };
        let check = |valid: bool, key: &str, message: String| match valid {
            true => Ok(()),
            false => Err(invalid(key, message)),
        };
        let listen = self.listen.parse().map_err(|_| {
            let example = "expected an address such as 127.0.0.1:8080";
            invalid("listen", format!("{example}, got {:?}", self.listen))
        })?;
        let data_dir_set = !self.data_dir.as_os_str().is_empty();
        check(data_dir_set, "data_dir", "must not be empty".into())?;
        let graph_url = Url::parse(&self.graph_url)
            .ok()
            .filter(|url| matches!(url.scheme(), "http" | "https") && url.has_host())
            .ok_or_else(|| {
                let got = &self.graph_url;
                invalid("graph_url", format!("expected an http(s) URL, got {got:?}"))
            })?;
        let version = &self.graph_version;
        let version_ok = version.len() > 1
            && version.starts_with('v')
            && version[1..].chars().all(|c| c.is_ascii_digit() || c == '.');
        let message = format!("expected a version such as v25.0, got {version:?}");
        check(version_ok, "graph_version", message)?;
        let event_names = self.event_names.into_list();
        let message = "the allowlist must name at least one event".into();
        check(!event_names.is_empty(), "event_names", message)?;
        let not_a_name =
            |name: &&String| !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if let Some(bad) = event_names.iter().find(not_a_name) {
            return Err(invalid(
                "event_names",
                format!("{bad:?} is not an event name"),
            ));
        }
        let days = self.attribution_window_days;
        let message = "must be between 1 and 90 days".into();
        check((1..=90).contains(&days), "attribution_window_days", message)?;
        let log_format = match self.log_format.trim().to_ascii_lowercase().as_str() {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            other => {
                let message = format!("expected text or json, got {other:?}");
                return Err(invalid("log_format", message));
            }
        };
        let store_engine = match self.store_engine.trim().to_ascii_lowercase().as_str() {
            "auto" => StoreEngine::Auto,
            "sled" => StoreEngine::Sled,
            "redb" => StoreEngine::Redb,
            other => {
                let message = format!("expected auto, sled or redb, got {other:?}");
                return Err(invalid("store_engine", message));
            }
        };
        let message = "must be at least 1024 bytes".into();
        check(self.api_body_limit >= 1024, "api_body_limit", message)?;
        let message = "must be greater than zero";
        check(
            self.graph_timeout_ms > 0,
            "graph_timeout_ms",
            message.into(),
        )?;
        check(
            self.outbox_poll_interval_ms > 0,
            "outbox_poll_interval_ms",
            message.into(),
        )?;
        let (base, max) = (self.outbox_backoff_base_ms, self.outbox_backoff_max_ms);
        let max_name = name("outbox_backoff_max_ms");
        let message = format!("{message} and not above {max_name} ({max} ms)");
        check(base > 0 && base <= max, "outbox_backoff_base_ms", message)?;
        let message = format!(
            "is in MiB and must not exceed {MAX_MIN_FREE_MB} (1 TiB); got {}",
            self.min_free_mb
        );
        check(self.min_free_mb <= MAX_MIN_FREE_MB, "min_free_mb", message)?;
        check(
            (MIN_CACHE_MB..=MAX_CACHE_MB).contains(&self.cache_mb),
            "cache_mb",
            format!(
                "is in MiB and must be between {MIN_CACHE_MB} and {MAX_CACHE_MB}; got {}",
                self.cache_mb
            ),
        )?;
        Ok(Settings {
            listen,
            data_dir: self.data_dir,
            app_secrets: self
                .app_secrets
                .into_list()
                .into_iter()
                .map(Secret::new)
                .collect(),
            verify_token: Some(self.verify_token)
                .filter(|token| !token.is_empty())
                .map(Secret::new),
            admin_token: Some(self.admin_token)
                .filter(|token| !token.is_empty())
                .map(Secret::new),
            graph_url,
            graph_version: self.graph_version,
            event_names,
            attribution_window_days: self.attribution_window_days,
            partner_agent: Some(self.partner_agent).filter(|agent| !agent.trim().is_empty()),
            log_format,
            workers: self.workers,
            api_body_limit: self.api_body_limit,
            graph_timeout: Duration::from_millis(self.graph_timeout_ms),
            delivery_budget: Duration::from_millis(self.delivery_budget_ms),
            outbox_poll_interval: Duration::from_millis(self.outbox_poll_interval_ms),
            outbox_backoff_base: Duration::from_millis(self.outbox_backoff_base_ms),
            outbox_backoff_max: Duration::from_millis(self.outbox_backoff_max_ms),
            unknown_resend_after: Duration::from_millis(self.unknown_resend_after_ms),
            journal_retention_days: Some(self.journal_retention_days).filter(|days| *days > 0),
            min_free_mb: self.min_free_mb,
            store_engine,
            cache_mb: self.cache_mb,
        })
    }
}

/// Refuses a file that cannot be read, is not TOML, or holds a key that is not a setting (so a
/// typo does not pass silently).
fn check_file(path: &Path, defaults: &Dict) -> Result<(), SettingsError> {
    let text = std::fs::read_to_string(path).map_err(|source| SettingsError::ReadFile {
        path: path.to_path_buf(),
        source,
    })?;
    let table: toml::Table = toml::from_str(&text).map_err(|error| SettingsError::ParseFile {
        path: path.to_path_buf(),
        message: error.message().to_string(),
    })?;
    match table.keys().find(|key| !defaults.contains_key(*key)) {
        None => Ok(()),
        Some(unknown) => Err(SettingsError::ParseFile {
            path: path.to_path_buf(),
            message: format!(
                "unknown key {unknown:?}; the keys are {}",
                defaults.keys().cloned().collect::<Vec<_>>().join(", ")
            ),
        }),
    }
}

/// The environment variable of a file key: `listen` is `CTWA_LISTEN`.
fn variable_name(key: &str) -> String {
    format!("CTWA_{}", key.to_ascii_uppercase())
}

/// How to name `key` in an error, given the metadata of the layer that gave its value: the key
/// and the file for a value from the file, the variable otherwise.
fn written_name(key: &str, layer: Option<&Metadata>) -> String {
    match layer.and_then(|metadata| metadata.source.as_ref()) {
        Some(Source::File(path)) => format!("{key} in {}", path.display()),
        _ => variable_name(key),
    }
}

/// The `CTWA_*` variable of every settings key, as a figment layer. figment's own `Env`
/// provider reads a value as a TOML-like literal (`0123` becomes the number 123, `true` a
/// bool, `[a]` an array), which would change tokens and secrets; this layer keeps text as
/// text and reads a whole number only where the key's default is a number.
struct Environment(Dict);

impl Environment {
    fn read(defaults: &Dict, env: impl Fn(&str) -> Option<String>) -> Result<Self, SettingsError> {
        let mut values = Dict::new();
        for (key, default) in defaults {
            let name = variable_name(key);
            let Some(text) = env(&name) else {
                continue;
            };
            let value = match default {
                Value::Num(..) => match text.trim().parse::<u64>() {
                    Ok(number) => Value::from(number),
                    Err(_) => {
                        return Err(SettingsError::Invalid {
                            key: name,
                            message: format!("expected a whole number, got {text:?}"),
                        })
                    }
                },
                _ => Value::from(text),
            };
            values.insert(key.clone(), value);
        }
        Ok(Self(values))
    }
}

impl Provider for Environment {
    fn metadata(&self) -> Metadata {
        Metadata::named("environment variable")
            .interpolater(|_: &Profile, keys: &[&str]| variable_name(&keys.join(".")))
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        Ok(Profile::Default.collect(self.0.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |key| map.get(key).cloned()
    }

    /// A TOML file in a fresh directory; the directory lives as long as the returned guard.
    fn file_of(text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ctwa.toml");
        std::fs::write(&path, text).unwrap();
        (dir, path)
    }

    #[test]
    fn defaults_need_no_configuration() {
        let settings = Settings::load_from(None, env_of(&[])).unwrap();
        assert_eq!(settings.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(settings.graph_version, "v25.0");
        assert_eq!(settings.event_names.len(), 14);
        assert_eq!(settings.attribution_window_days, 7);
        assert_eq!(settings.disabled_features().len(), 3);
        assert_eq!(settings.journal_retention_days, Some(30));
    }

    #[test]
    fn the_defaults_are_those_of_the_readme() {
        let settings = Settings::default();
        assert_eq!(settings.data_dir, PathBuf::from("./ctwa-data"));
        assert_eq!(settings.graph_url.as_str(), "https://graph.facebook.com/");
        assert_eq!(settings.event_names, DEFAULT_EVENT_NAMES);
        assert_eq!(settings.log_format, LogFormat::Text);
        assert_eq!(settings.workers, 0);
        assert_eq!(settings.api_body_limit, 65_536);
        assert_eq!(settings.graph_timeout, Duration::from_millis(1500));
        assert_eq!(settings.delivery_budget, Duration::from_secs(5));
        assert_eq!(settings.outbox_poll_interval, Duration::from_secs(5));
        assert_eq!(settings.outbox_backoff_base, Duration::from_secs(30));
        assert_eq!(settings.outbox_backoff_max, Duration::from_secs(3600));
        assert_eq!(settings.unknown_resend_after, Duration::from_secs(300));
        assert_eq!(settings.min_free_mb, 64);
        assert!(settings.app_secrets.is_empty());
        assert!(settings.verify_token.is_none() && settings.admin_token.is_none());
        assert!(settings.partner_agent.is_none());
    }

    #[test]
    fn debug_output_never_shows_a_secret() {
        let settings = Settings::load_from(
            None,
            env_of(&[
                ("CTWA_APP_SECRETS", "app-secret-1,app-secret-2"),
                ("CTWA_VERIFY_TOKEN", "verify-token-3"),
                ("CTWA_ADMIN_TOKEN", "admin-token-4"),
            ]),
        )
        .unwrap();
        let shown = format!("{settings:?}");
        for secret in [
            "app-secret-1",
            "app-secret-2",
            "verify-token-3",
            "admin-token-4",
        ] {
            assert!(!shown.contains(secret), "{secret} leaked: {shown}");
        }
        assert!(shown.contains("REDACTED"));
    }

    #[test]
    fn the_free_space_floor_is_64_mib_unless_set() {
        let default = Settings::load_from(None, env_of(&[])).unwrap();
        assert_eq!(default.min_free_mb, 64);
        assert_eq!(default.min_free_bytes(), 64 * 1024 * 1024);
        assert!(format!("{default:?}").contains("min_free_mb: 64"));
        let off = Settings::load_from(None, env_of(&[("CTWA_MIN_FREE_MB", "0")])).unwrap();
        assert_eq!(off.min_free_bytes(), 0);
    }

    #[test]
    fn the_cache_is_128_mib_unless_set_and_bounded() {
        assert_eq!(Settings::default().cache_mb, 128);
        assert_eq!(Settings::default().cache_bytes(), 128 * 1024 * 1024);
        let settings = Settings::load_from(None, env_of(&[("CTWA_CACHE_MB", "32")])).unwrap();
        assert_eq!(settings.cache_mb, 32);
        let error = Settings::load_from(None, env_of(&[("CTWA_CACHE_MB", "4")]))
            .unwrap_err()
            .to_string();
        assert!(error.contains("CTWA_CACHE_MB"), "{error}");
        assert!(error.contains("between 8 and 65536"), "{error}");
    }

    #[test]
    fn the_store_engine_is_auto_unless_set() {
        let default = Settings::load_from(None, env_of(&[])).unwrap();
        assert_eq!(default.store_engine, StoreEngine::Auto);
        let sled = Settings::load_from(None, env_of(&[("CTWA_STORE_ENGINE", "sled")])).unwrap();
        assert_eq!(sled.store_engine, StoreEngine::Sled);
        let redb = Settings::load_from(None, env_of(&[("CTWA_STORE_ENGINE", " REDB ")])).unwrap();
        assert_eq!(redb.store_engine, StoreEngine::Redb);
        let (_dir, path) = file_of("store_engine = \"redb\"\n");
        let from_file = Settings::load_from(Some(&path), env_of(&[])).unwrap();
        assert_eq!(from_file.store_engine, StoreEngine::Redb);
        let error =
            Settings::load_from(None, env_of(&[("CTWA_STORE_ENGINE", "fjall")])).unwrap_err();
        let shown = error.to_string();
        assert!(shown.contains("CTWA_STORE_ENGINE"), "{shown}");
        assert!(
            shown.contains("expected auto, sled or redb, got \"fjall\""),
            "{shown}"
        );
        let (_dir, path) = file_of("store_engine = \"rocks\"\n");
        let shown = Settings::load_from(Some(&path), env_of(&[]))
            .unwrap_err()
            .to_string();
        assert!(shown.contains("store_engine in"), "{shown}");
    }

    #[test]
    fn zero_retention_keeps_the_journal_forever() {
        let settings =
            Settings::load_from(None, env_of(&[("CTWA_JOURNAL_RETENTION_DAYS", "0")])).unwrap();
        assert_eq!(settings.journal_retention_days, None);
    }

    #[test]
    fn environment_wins_over_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ctwa.toml");
        std::fs::write(
            &path,
            "listen = \"0.0.0.0:9000\"\napp_secrets = [\"one\", \"two\"]\ngraph_version = \"v26.0\"\n",
        )
        .unwrap();
        let settings =
            Settings::load_from(Some(&path), env_of(&[("CTWA_LISTEN", "127.0.0.1:7000")])).unwrap();
        assert_eq!(settings.listen.to_string(), "127.0.0.1:7000");
        assert_eq!(settings.graph_version, "v26.0");
        assert_eq!(settings.app_secrets.len(), 2);
    }

    #[test]
    fn every_key_of_the_file_is_read_and_typed() {
        let (_dir, path) = file_of(
            r#"
            listen = "0.0.0.0:9000"
            data_dir = "/var/lib/ctwa"
            app_secrets = "one, two"
            verify_token = "verify"
            admin_token = "admin"
            graph_url = "http://127.0.0.1:9999/"
            graph_version = "v26.0"
            event_names = ["Purchase", "LeadSubmitted"]
            attribution_window_days = 28
            partner_agent = "agency"
            log_format = "JSON"
            workers = 3
            api_body_limit = 2048
            graph_timeout_ms = 250
            delivery_budget_ms = 1000
            unknown_resend_after_ms = 60000
            outbox_poll_interval_ms = 100
            outbox_backoff_base_ms = 200
            outbox_backoff_max_ms = 800
            journal_retention_days = 0
            min_free_mb = 0
            "#,
        );
        let settings = Settings::load_from(Some(&path), env_of(&[])).unwrap();
        assert_eq!(
            settings.listen,
            "0.0.0.0:9000".parse::<SocketAddr>().unwrap()
        );
        assert_eq!(settings.data_dir, PathBuf::from("/var/lib/ctwa"));
        let secrets: Vec<&str> = settings.app_secrets.iter().map(Secret::expose).collect();
        assert_eq!(secrets, ["one", "two"]);
        assert!(settings.verify_token.unwrap().matches("verify"));
        assert!(settings.admin_token.unwrap().matches("admin"));
        assert_eq!(settings.graph_url.as_str(), "http://127.0.0.1:9999/");
        assert_eq!(settings.graph_version, "v26.0");
        assert_eq!(settings.event_names, ["Purchase", "LeadSubmitted"]);
        assert_eq!(settings.attribution_window_days, 28);
        assert_eq!(settings.partner_agent.as_deref(), Some("agency"));
        assert_eq!(settings.log_format, LogFormat::Json);
        assert_eq!(settings.workers, 3);
        assert_eq!(settings.api_body_limit, 2048);
        assert_eq!(settings.graph_timeout, Duration::from_millis(250));
        assert_eq!(settings.delivery_budget, Duration::from_secs(1));
        assert_eq!(settings.unknown_resend_after, Duration::from_secs(60));
        assert_eq!(settings.outbox_poll_interval, Duration::from_millis(100));
        assert_eq!(settings.outbox_backoff_base, Duration::from_millis(200));
        assert_eq!(settings.outbox_backoff_max, Duration::from_millis(800));
        assert_eq!(settings.journal_retention_days, None);
        assert_eq!(settings.min_free_mb, 0);
    }

    #[test]
    fn every_variable_is_read_and_typed() {
        let settings = Settings::load_from(
            None,
            env_of(&[
                ("CTWA_LISTEN", "[::1]:9001"),
                ("CTWA_DATA_DIR", "/srv/ctwa"),
                ("CTWA_GRAPH_URL", "https://graph.example.test"),
                ("CTWA_EVENT_NAMES", "Purchase"),
                ("CTWA_ATTRIBUTION_WINDOW_DAYS", " 90 "),
                ("CTWA_PARTNER_AGENT", " "),
                ("CTWA_WORKERS", "2"),
                ("CTWA_API_BODY_LIMIT", "1024"),
                ("CTWA_GRAPH_TIMEOUT_MS", "10"),
                ("CTWA_DELIVERY_BUDGET_MS", "20"),
                ("CTWA_UNKNOWN_RESEND_AFTER_MS", "30"),
                ("CTWA_OUTBOX_POLL_INTERVAL_MS", "40"),
                ("CTWA_OUTBOX_BACKOFF_BASE_MS", "50"),
                ("CTWA_OUTBOX_BACKOFF_MAX_MS", "60"),
                ("CTWA_JOURNAL_RETENTION_DAYS", "7"),
            ]),
        )
        .unwrap();
        assert_eq!(settings.listen, "[::1]:9001".parse::<SocketAddr>().unwrap());
        assert_eq!(settings.data_dir, PathBuf::from("/srv/ctwa"));
        assert_eq!(settings.graph_url.host_str(), Some("graph.example.test"));
        assert_eq!(settings.event_names, ["Purchase"]);
        assert_eq!(settings.attribution_window_days, 90);
        assert_eq!(settings.partner_agent, None);
        assert_eq!(settings.workers, 2);
        assert_eq!(settings.api_body_limit, 1024);
        assert_eq!(settings.graph_timeout, Duration::from_millis(10));
        assert_eq!(settings.delivery_budget, Duration::from_millis(20));
        assert_eq!(settings.unknown_resend_after, Duration::from_millis(30));
        assert_eq!(settings.outbox_poll_interval, Duration::from_millis(40));
        assert_eq!(settings.outbox_backoff_base, Duration::from_millis(50));
        assert_eq!(settings.outbox_backoff_max, Duration::from_millis(60));
        assert_eq!(settings.journal_retention_days, Some(7));
    }

    #[test]
    fn tokens_that_look_like_numbers_or_lists_stay_text() {
        let settings = Settings::load_from(
            None,
            env_of(&[
                ("CTWA_APP_SECRETS", "0123,true"),
                ("CTWA_VERIFY_TOKEN", "007"),
                ("CTWA_ADMIN_TOKEN", "[admin]"),
                ("CTWA_PARTNER_AGENT", "\"quoted\""),
            ]),
        )
        .unwrap();
        let secrets: Vec<&str> = settings.app_secrets.iter().map(Secret::expose).collect();
        assert_eq!(secrets, ["0123", "true"]);
        assert_eq!(settings.verify_token.unwrap().expose(), "007");
        assert_eq!(settings.admin_token.unwrap().expose(), "[admin]");
        assert_eq!(settings.partner_agent.as_deref(), Some("\"quoted\""));
    }

    #[test]
    fn empty_tokens_leave_their_feature_off() {
        let settings = Settings::load_from(
            None,
            env_of(&[("CTWA_VERIFY_TOKEN", ""), ("CTWA_ADMIN_TOKEN", "")]),
        )
        .unwrap();
        assert!(settings.verify_token.is_none());
        assert!(settings.admin_token.is_none());
    }

    #[test]
    fn comma_separated_secrets_are_split_and_trimmed() {
        let settings =
            Settings::load_from(None, env_of(&[("CTWA_APP_SECRETS", " old , new ")])).unwrap();
        let exposed: Vec<&str> = settings.app_secrets.iter().map(Secret::expose).collect();
        assert_eq!(exposed, ["old", "new"]);
    }

    #[test]
    fn empty_items_of_a_file_list_are_dropped() {
        let (_dir, path) = file_of("app_secrets = [\" one \", \"\"]\n");
        let settings = Settings::load_from(Some(&path), env_of(&[])).unwrap();
        let secrets: Vec<&str> = settings.app_secrets.iter().map(Secret::expose).collect();
        assert_eq!(secrets, ["one"]);
    }

    #[test]
    fn unknown_file_keys_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ctwa.toml");
        std::fs::write(&path, "lisen = \"0.0.0.0:9000\"\n").unwrap();
        let error = Settings::load_from(Some(&path), env_of(&[])).unwrap_err();
        assert!(error.to_string().contains("lisen"), "{error}");
    }

    #[test]
    fn a_missing_or_broken_file_is_refused_with_its_path() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("absent.toml");
        let error = Settings::load_from(Some(&missing), env_of(&[])).unwrap_err();
        assert!(matches!(error, SettingsError::ReadFile { .. }), "{error}");
        assert!(error.to_string().contains("absent.toml"), "{error}");
        let (_dir, broken) = file_of("listen = \n");
        let error = Settings::load_from(Some(&broken), env_of(&[])).unwrap_err();
        assert!(matches!(error, SettingsError::ParseFile { .. }), "{error}");
        assert!(error.to_string().contains("ctwa.toml"), "{error}");
    }

    #[test]
    fn invalid_values_name_their_variable() {
        for (key, value) in [
            ("CTWA_LISTEN", "localhost"),
            ("CTWA_GRAPH_URL", "graph.facebook.com"),
            ("CTWA_GRAPH_VERSION", "25"),
            ("CTWA_ATTRIBUTION_WINDOW_DAYS", "0"),
            ("CTWA_ATTRIBUTION_WINDOW_DAYS", "seven"),
            ("CTWA_LOG_FORMAT", "yaml"),
            ("CTWA_EVENT_NAMES", " , "),
            ("CTWA_MIN_FREE_MB", "64MB"),
            ("CTWA_MIN_FREE_MB", "67108864"),
        ] {
            let error = Settings::load_from(None, env_of(&[(key, value)])).unwrap_err();
            assert!(error.to_string().contains(key), "{key}={value}: {error}");
        }
    }

    #[test]
    fn more_invalid_variables_are_named() {
        for (key, value) in [
            ("CTWA_GRAPH_URL", "http://"),
            ("CTWA_GRAPH_URL", "ftp://graph.facebook.com"),
            ("CTWA_DATA_DIR", ""),
            ("CTWA_EVENT_NAMES", "Purchase,Not-An-Event"),
            ("CTWA_API_BODY_LIMIT", "1023"),
            ("CTWA_GRAPH_TIMEOUT_MS", "0"),
            ("CTWA_OUTBOX_POLL_INTERVAL_MS", "0"),
            ("CTWA_OUTBOX_BACKOFF_BASE_MS", "0"),
            ("CTWA_OUTBOX_BACKOFF_BASE_MS", "3600001"),
            ("CTWA_WORKERS", "-1"),
            ("CTWA_ATTRIBUTION_WINDOW_DAYS", "4294967296"),
        ] {
            let error = Settings::load_from(None, env_of(&[(key, value)])).unwrap_err();
            assert!(error.to_string().contains(key), "{key}={value}: {error}");
        }
    }

    #[test]
    fn invalid_file_values_name_their_key_and_the_file() {
        for (line, key) in [
            ("listen = \"localhost\"", "listen"),
            ("graph_url = \"graph.facebook.com\"", "graph_url"),
            ("attribution_window_days = 0", "attribution_window_days"),
            (
                "attribution_window_days = \"seven\"",
                "attribution_window_days",
            ),
            ("attribution_window_days = -1", "attribution_window_days"),
            ("log_format = \"yaml\"", "log_format"),
            ("event_names = []", "event_names"),
            ("graph_timeout_ms = 0", "graph_timeout_ms"),
            (
                "outbox_backoff_base_ms = 7200000\noutbox_backoff_max_ms = 3600000",
                "outbox_backoff_base_ms",
            ),
            ("min_free_mb = 67108864", "min_free_mb"),
        ] {
            let (_dir, path) = file_of(line);
            let error = Settings::load_from(Some(&path), env_of(&[])).unwrap_err();
            let shown = error.to_string();
            let expected = format!("{key} in {}", path.display());
            assert!(shown.contains(&expected), "{line}: {shown}");
            assert!(!shown.contains("CTWA_"), "{line} names a variable: {shown}");
        }
    }

    #[test]
    fn a_bad_variable_over_a_good_file_names_the_variable() {
        let (_dir, path) = file_of("attribution_window_days = 14\nlisten = \"0.0.0.0:9000\"\n");
        for (key, value) in [
            ("CTWA_ATTRIBUTION_WINDOW_DAYS", "91"),
            ("CTWA_LISTEN", "0.0.0.0"),
        ] {
            let error = Settings::load_from(Some(&path), env_of(&[(key, value)])).unwrap_err();
            let shown = error.to_string();
            assert!(shown.starts_with(key), "{key}={value}: {shown}");
            assert!(!shown.contains("ctwa.toml"), "{key}={value}: {shown}");
        }
    }

    #[test]
    fn a_good_variable_over_a_bad_file_value_wins() {
        let (_dir, path) = file_of("attribution_window_days = 0\n");
        let settings = Settings::load_from(
            Some(&path),
            env_of(&[("CTWA_ATTRIBUTION_WINDOW_DAYS", "3")]),
        )
        .unwrap();
        assert_eq!(settings.attribution_window_days, 3);
    }
}
