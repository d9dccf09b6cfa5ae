//! One settings tree: built-in defaults, then an optional TOML file, then `CTWA_*` environment
//! variables (the environment wins). Everything is validated once, at load time.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone)]
pub struct Settings {
    pub listen: String,
    pub data_dir: PathBuf,
    pub app_secrets: Vec<Secret>,
    pub verify_token: Option<Secret>,
    pub admin_token: Option<Secret>,
    pub graph_url: String,
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
    /// The store refuses to open when the data dir's file system has less free space than this
    /// (MiB): sled writes a snapshot while it opens, and a partial one leaves it unopenable.
    /// 0 turns the check off.
    pub min_free_mb: u64,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".into(),
            data_dir: PathBuf::from("./ctwa-data"),
            app_secrets: Vec::new(),
            verify_token: None,
            admin_token: None,
            graph_url: "https://graph.facebook.com".into(),
            graph_version: "v25.0".into(),
            event_names: DEFAULT_EVENT_NAMES
                .iter()
                .map(|name| name.to_string())
                .collect(),
            attribution_window_days: 7,
            partner_agent: None,
            log_format: LogFormat::Text,
            workers: 0,
            api_body_limit: 64 * 1024,
            graph_timeout: Duration::from_millis(1500),
            delivery_budget: Duration::from_secs(5),
            outbox_poll_interval: Duration::from_secs(5),
            outbox_backoff_base: Duration::from_secs(30),
            outbox_backoff_max: Duration::from_secs(3600),
            unknown_resend_after: Duration::from_secs(300),
            journal_retention_days: Some(30),
            min_free_mb: 64,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("cannot read the configuration file {path}: {source}")]
    ReadFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the configuration file {path} is not valid: {message}")]
    ParseFile { path: PathBuf, message: String },
    #[error("{key} is not valid: {message}")]
    Invalid { key: &'static str, message: String },
}

/// The file form: every key optional, unknown keys refused so that typos do not pass silently.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileSettings {
    listen: Option<String>,
    data_dir: Option<PathBuf>,
    app_secrets: Option<StringOrList>,
    verify_token: Option<String>,
    admin_token: Option<String>,
    graph_url: Option<String>,
    graph_version: Option<String>,
    event_names: Option<StringOrList>,
    attribution_window_days: Option<u32>,
    partner_agent: Option<String>,
    log_format: Option<String>,
    workers: Option<usize>,
    api_body_limit: Option<usize>,
    graph_timeout_ms: Option<u64>,
    delivery_budget_ms: Option<u64>,
    unknown_resend_after_ms: Option<u64>,
    outbox_poll_interval_ms: Option<u64>,
    outbox_backoff_base_ms: Option<u64>,
    outbox_backoff_max_ms: Option<u64>,
    journal_retention_days: Option<u32>,
    min_free_mb: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum StringOrList {
    One(String),
    Many(Vec<String>),
}

impl StringOrList {
    fn into_list(self) -> Vec<String> {
        match self {
            StringOrList::One(joined) => split_list(&joined),
            StringOrList::Many(items) => items
                .into_iter()
                .map(|item| item.trim().to_string())
                .filter(|item| !item.is_empty())
                .collect(),
        }
    }
}

fn split_list(joined: &str) -> Vec<String> {
    joined
        .split(',')
        .map(|item| item.trim().to_string())
        .filter(|item| !item.is_empty())
        .collect()
}

impl Settings {
    /// Loads defaults, then `config_file` if given, then the process environment.
    pub fn load(config_file: Option<&Path>) -> Result<Self, SettingsError> {
        Self::load_from(config_file, |key| std::env::var(key).ok())
    }

    /// Like [`Settings::load`], with the environment given as a lookup function (for tests).
    pub fn load_from(
        config_file: Option<&Path>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, SettingsError> {
        let file = match config_file {
            None => FileSettings::default(),
            Some(path) => {
                let text =
                    std::fs::read_to_string(path).map_err(|source| SettingsError::ReadFile {
                        path: path.to_path_buf(),
                        source,
                    })?;
                toml::from_str(&text).map_err(|error| SettingsError::ParseFile {
                    path: path.to_path_buf(),
                    message: error.message().to_string(),
                })?
            }
        };
        let mut settings = Settings::default();
        settings.apply_file(file)?;
        settings.apply_env(env)?;
        settings.validate()?;
        Ok(settings)
    }

    fn apply_file(&mut self, file: FileSettings) -> Result<(), SettingsError> {
        if let Some(value) = file.listen {
            self.listen = value;
        }
        if let Some(value) = file.data_dir {
            self.data_dir = value;
        }
        if let Some(value) = file.app_secrets {
            self.app_secrets = value.into_list().into_iter().map(Secret::new).collect();
        }
        if let Some(value) = file.verify_token {
            self.verify_token = non_empty_secret(value);
        }
        if let Some(value) = file.admin_token {
            self.admin_token = non_empty_secret(value);
        }
        if let Some(value) = file.graph_url {
            self.graph_url = value;
        }
        if let Some(value) = file.graph_version {
            self.graph_version = value;
        }
        if let Some(value) = file.event_names {
            self.event_names = value.into_list();
        }
        if let Some(value) = file.attribution_window_days {
            self.attribution_window_days = value;
        }
        if let Some(value) = file.partner_agent {
            self.partner_agent = Some(value).filter(|agent| !agent.trim().is_empty());
        }
        if let Some(value) = file.log_format {
            self.log_format = parse_log_format(&value)?;
        }
        if let Some(value) = file.workers {
            self.workers = value;
        }
        if let Some(value) = file.api_body_limit {
            self.api_body_limit = value;
        }
        if let Some(value) = file.graph_timeout_ms {
            self.graph_timeout = Duration::from_millis(value);
        }
        if let Some(value) = file.delivery_budget_ms {
            self.delivery_budget = Duration::from_millis(value);
        }
        if let Some(value) = file.unknown_resend_after_ms {
            self.unknown_resend_after = Duration::from_millis(value);
        }
        if let Some(value) = file.outbox_poll_interval_ms {
            self.outbox_poll_interval = Duration::from_millis(value);
        }
        if let Some(value) = file.outbox_backoff_base_ms {
            self.outbox_backoff_base = Duration::from_millis(value);
        }
        if let Some(value) = file.outbox_backoff_max_ms {
            self.outbox_backoff_max = Duration::from_millis(value);
        }
        if let Some(value) = file.journal_retention_days {
            self.journal_retention_days = Some(value).filter(|days| *days > 0);
        }
        if let Some(value) = file.min_free_mb {
            self.min_free_mb = value;
        }
        Ok(())
    }

    fn apply_env(&mut self, env: impl Fn(&str) -> Option<String>) -> Result<(), SettingsError> {
        if let Some(value) = env("CTWA_LISTEN") {
            self.listen = value;
        }
        if let Some(value) = env("CTWA_DATA_DIR") {
            self.data_dir = PathBuf::from(value);
        }
        if let Some(value) = env("CTWA_APP_SECRETS") {
            self.app_secrets = split_list(&value).into_iter().map(Secret::new).collect();
        }
        if let Some(value) = env("CTWA_VERIFY_TOKEN") {
            self.verify_token = non_empty_secret(value);
        }
        if let Some(value) = env("CTWA_ADMIN_TOKEN") {
            self.admin_token = non_empty_secret(value);
        }
        if let Some(value) = env("CTWA_GRAPH_URL") {
            self.graph_url = value;
        }
        if let Some(value) = env("CTWA_GRAPH_VERSION") {
            self.graph_version = value;
        }
        if let Some(value) = env("CTWA_EVENT_NAMES") {
            self.event_names = split_list(&value);
        }
        if let Some(value) = env("CTWA_ATTRIBUTION_WINDOW_DAYS") {
            self.attribution_window_days = parse_number("CTWA_ATTRIBUTION_WINDOW_DAYS", &value)?;
        }
        if let Some(value) = env("CTWA_PARTNER_AGENT") {
            self.partner_agent = Some(value).filter(|agent| !agent.trim().is_empty());
        }
        if let Some(value) = env("CTWA_LOG_FORMAT") {
            self.log_format = parse_log_format(&value)?;
        }
        if let Some(value) = env("CTWA_WORKERS") {
            self.workers = parse_number("CTWA_WORKERS", &value)?;
        }
        if let Some(value) = env("CTWA_API_BODY_LIMIT") {
            self.api_body_limit = parse_number("CTWA_API_BODY_LIMIT", &value)?;
        }
        if let Some(value) = env("CTWA_GRAPH_TIMEOUT_MS") {
            self.graph_timeout =
                Duration::from_millis(parse_number("CTWA_GRAPH_TIMEOUT_MS", &value)?);
        }
        if let Some(value) = env("CTWA_DELIVERY_BUDGET_MS") {
            self.delivery_budget =
                Duration::from_millis(parse_number("CTWA_DELIVERY_BUDGET_MS", &value)?);
        }
        if let Some(value) = env("CTWA_UNKNOWN_RESEND_AFTER_MS") {
            self.unknown_resend_after =
                Duration::from_millis(parse_number("CTWA_UNKNOWN_RESEND_AFTER_MS", &value)?);
        }
        if let Some(value) = env("CTWA_OUTBOX_POLL_INTERVAL_MS") {
            self.outbox_poll_interval =
                Duration::from_millis(parse_number("CTWA_OUTBOX_POLL_INTERVAL_MS", &value)?);
        }
        if let Some(value) = env("CTWA_OUTBOX_BACKOFF_BASE_MS") {
            self.outbox_backoff_base =
                Duration::from_millis(parse_number("CTWA_OUTBOX_BACKOFF_BASE_MS", &value)?);
        }
        if let Some(value) = env("CTWA_JOURNAL_RETENTION_DAYS") {
            let days: u32 = parse_number("CTWA_JOURNAL_RETENTION_DAYS", &value)?;
            self.journal_retention_days = Some(days).filter(|days| *days > 0);
        }
        if let Some(value) = env("CTWA_MIN_FREE_MB") {
            self.min_free_mb = parse_number("CTWA_MIN_FREE_MB", &value)?;
        }
        if let Some(value) = env("CTWA_OUTBOX_BACKOFF_MAX_MS") {
            self.outbox_backoff_max =
                Duration::from_millis(parse_number("CTWA_OUTBOX_BACKOFF_MAX_MS", &value)?);
        }
        Ok(())
    }

    fn validate(&self) -> Result<(), SettingsError> {
        self.listen
            .parse::<SocketAddr>()
            .map_err(|_| SettingsError::Invalid {
                key: "CTWA_LISTEN",
                message: format!(
                    "expected an address such as 127.0.0.1:8080, got {:?}",
                    self.listen
                ),
            })?;
        if self.data_dir.as_os_str().is_empty() {
            return Err(SettingsError::Invalid {
                key: "CTWA_DATA_DIR",
                message: "must not be empty".into(),
            });
        }
        if self
            .app_secrets
            .iter()
            .any(|secret| secret.expose().is_empty())
        {
            return Err(SettingsError::Invalid {
                key: "CTWA_APP_SECRETS",
                message: "contains an empty secret".into(),
            });
        }
        let graph_url_ok = (self.graph_url.starts_with("http://")
            || self.graph_url.starts_with("https://"))
            && self.graph_url.len() > "https://".len();
        if !graph_url_ok {
            return Err(SettingsError::Invalid {
                key: "CTWA_GRAPH_URL",
                message: format!("expected an http(s) URL, got {:?}", self.graph_url),
            });
        }
        let version_ok = self.graph_version.len() > 1
            && self.graph_version.starts_with('v')
            && self.graph_version[1..]
                .chars()
                .all(|c| c.is_ascii_digit() || c == '.');
        if !version_ok {
            return Err(SettingsError::Invalid {
                key: "CTWA_GRAPH_VERSION",
                message: format!(
                    "expected a version such as v25.0, got {:?}",
                    self.graph_version
                ),
            });
        }
        if self.event_names.is_empty() {
            return Err(SettingsError::Invalid {
                key: "CTWA_EVENT_NAMES",
                message: "the allowlist must name at least one event".into(),
            });
        }
        if let Some(bad) = self
            .event_names
            .iter()
            .find(|name| !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
        {
            return Err(SettingsError::Invalid {
                key: "CTWA_EVENT_NAMES",
                message: format!("{bad:?} is not an event name"),
            });
        }
        if self.attribution_window_days == 0 || self.attribution_window_days > 90 {
            return Err(SettingsError::Invalid {
                key: "CTWA_ATTRIBUTION_WINDOW_DAYS",
                message: "must be between 1 and 90 days".into(),
            });
        }
        if self.api_body_limit < 1024 {
            return Err(SettingsError::Invalid {
                key: "CTWA_API_BODY_LIMIT",
                message: "must be at least 1024 bytes".into(),
            });
        }
        if self.graph_timeout.is_zero() {
            return Err(SettingsError::Invalid {
                key: "CTWA_GRAPH_TIMEOUT_MS",
                message: "must be greater than zero".into(),
            });
        }
        if self.outbox_poll_interval.is_zero() {
            return Err(SettingsError::Invalid {
                key: "CTWA_OUTBOX_POLL_INTERVAL_MS",
                message: "must be greater than zero".into(),
            });
        }
        if self.outbox_backoff_base.is_zero() || self.outbox_backoff_max < self.outbox_backoff_base
        {
            return Err(SettingsError::Invalid {
                key: "CTWA_OUTBOX_BACKOFF_BASE_MS",
                message: "must be greater than zero and not above CTWA_OUTBOX_BACKOFF_MAX_MS"
                    .into(),
            });
        }
        if self.min_free_mb > MAX_MIN_FREE_MB {
            return Err(SettingsError::Invalid {
                key: "CTWA_MIN_FREE_MB",
                message: format!(
                    "is in MiB and must not exceed {MAX_MIN_FREE_MB} (1 TiB); got {}",
                    self.min_free_mb
                ),
            });
        }
        Ok(())
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

fn non_empty_secret(value: String) -> Option<Secret> {
    Some(value).filter(|v| !v.is_empty()).map(Secret::new)
}

fn parse_log_format(value: &str) -> Result<LogFormat, SettingsError> {
    match value.trim().to_ascii_lowercase().as_str() {
        "text" => Ok(LogFormat::Text),
        "json" => Ok(LogFormat::Json),
        other => Err(SettingsError::Invalid {
            key: "CTWA_LOG_FORMAT",
            message: format!("expected text or json, got {other:?}"),
        }),
    }
}

fn parse_number<T: std::str::FromStr>(key: &'static str, value: &str) -> Result<T, SettingsError> {
    value.trim().parse().map_err(|_| SettingsError::Invalid {
        key,
        message: format!("expected a whole number, got {value:?}"),
    })
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

    #[test]
    fn defaults_need_no_configuration() {
        let settings = Settings::load_from(None, env_of(&[])).unwrap();
        assert_eq!(settings.listen, "127.0.0.1:8080");
        assert_eq!(settings.graph_version, "v25.0");
        assert_eq!(settings.event_names.len(), 14);
        assert_eq!(settings.attribution_window_days, 7);
        assert_eq!(settings.disabled_features().len(), 3);
        assert_eq!(settings.journal_retention_days, Some(30));
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
        assert_eq!(settings.listen, "127.0.0.1:7000");
        assert_eq!(settings.graph_version, "v26.0");
        assert_eq!(settings.app_secrets.len(), 2);
    }

    #[test]
    fn comma_separated_secrets_are_split_and_trimmed() {
        let settings =
            Settings::load_from(None, env_of(&[("CTWA_APP_SECRETS", " old , new ")])).unwrap();
        let exposed: Vec<&str> = settings.app_secrets.iter().map(Secret::expose).collect();
        assert_eq!(exposed, ["old", "new"]);
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
}
