//! The command line: `serve`, and admin subcommands that call a running server's admin API.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use serde_json::{json, Map, Value};
use url::Url;

#[derive(Debug, Parser)]
#[command(
    name = "ctwa-relay",
    version,
    about = "Click-to-WhatsApp attribution relay"
)]
pub struct Cli {
    /// TOML configuration file (environment variables override it).
    #[arg(long, global = true, env = "CTWA_CONFIG")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the HTTP server (the default).
    Serve,
    /// Manage accounts (one WhatsApp business number each).
    Accounts {
        #[command(subcommand)]
        command: AccountsCommand,
        #[command(flatten)]
        target: Target,
    },
    /// Manage API keys.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
        #[command(flatten)]
        target: Target,
    },
    /// Show the attribution of a phone number (or BSUID).
    Lookup {
        #[arg(long, required_unless_present = "bsuid")]
        phone: Option<String>,
        #[arg(long)]
        bsuid: Option<String>,
        #[arg(long)]
        account_id: Option<String>,
        #[command(flatten)]
        target: Target,
    },
    /// Copy a sled store into a new redb store (CTWA_STORE_ENGINE=redb), verified by counts.
    /// The server must not be running on either directory.
    MigrateStore {
        /// The sled store's data dir.
        #[arg(long)]
        from: PathBuf,
        /// A new or empty directory for the redb store.
        #[arg(long)]
        to: PathBuf,
    },
}

/// Which server to talk to. The admin token is read from `CTWA_ADMIN_TOKEN` only, so it never
/// shows in the process list.
#[derive(Debug, Args)]
pub struct Target {
    /// Base URL of the running server.
    #[arg(
        long,
        global = true,
        env = "CTWA_URL",
        default_value = "http://127.0.0.1:8080",
        value_parser = parse_server_url
    )]
    pub url: Url,
}

#[derive(Debug, Args)]
pub struct AccountFields {
    #[arg(long)]
    pub name: Option<String>,
    #[arg(long)]
    pub display_phone_number: Option<String>,
    /// Meta Pixel/Dataset id for conversions.
    #[arg(long)]
    pub dataset_id: Option<String>,
    /// Facebook Page paired with the number.
    #[arg(long)]
    pub page_id: Option<String>,
    /// Forward Meta's automatic events as conversions.
    #[arg(long)]
    pub forward_automatic_events: Option<bool>,
}

#[derive(Debug, Subcommand)]
pub enum AccountsCommand {
    /// Register an account.
    Add {
        #[arg(long)]
        id: Option<String>,
        #[arg(long)]
        phone_number_id: String,
        #[arg(long)]
        waba_id: String,
        /// The system-user access token (or set CTWA_ACCESS_TOKEN).
        #[arg(long, env = "CTWA_ACCESS_TOKEN", hide_env_values = true)]
        access_token: String,
        #[command(flatten)]
        fields: AccountFields,
    },
    List,
    Show {
        id: String,
    },
    Update {
        id: String,
        #[arg(long)]
        phone_number_id: Option<String>,
        #[arg(long)]
        waba_id: Option<String>,
        #[arg(long, env = "CTWA_ACCESS_TOKEN", hide_env_values = true)]
        access_token: Option<String>,
        #[command(flatten)]
        fields: AccountFields,
    },
    Remove {
        id: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Create a key scoped to accounts; the secret is printed once.
    Create {
        #[arg(long)]
        name: String,
        /// An account the key may use; repeat for several.
        #[arg(long = "account", required = true)]
        accounts: Vec<String>,
    },
    List,
    Revoke {
        id: String,
    },
}

fn account_fields(body: &mut Map<String, Value>, fields: AccountFields) {
    if let Some(name) = fields.name {
        body.insert("name".into(), json!(name));
    }
    if let Some(display) = fields.display_phone_number {
        body.insert("displayPhoneNumber".into(), json!(display));
    }
    let mut metadata = Map::new();
    if let Some(dataset_id) = fields.dataset_id {
        metadata.insert("metaCapiDatasetId".into(), json!(dataset_id));
    }
    if let Some(page_id) = fields.page_id {
        metadata.insert("connectedFacebookPageId".into(), json!(page_id));
    }
    if !metadata.is_empty() {
        body.insert("metadata".into(), Value::Object(metadata));
    }
    if let Some(forward) = fields.forward_automatic_events {
        body.insert("forwardAutomaticEvents".into(), json!(forward));
    }
}

/// One call to the admin API. The path is kept as segments and the query as pairs, so that
/// [`AdminRequest::url`] encodes every value: an id, a phone number or a BSUID with `+`, `&`,
/// `/` or spaces reaches the server as it was typed.
#[derive(Debug)]
struct AdminRequest {
    method: reqwest::Method,
    path: Vec<String>,
    query: Vec<(&'static str, String)>,
    body: Option<Value>,
}

impl AdminRequest {
    fn new(method: reqwest::Method, path: &[&str]) -> Self {
        Self {
            method,
            path: path.iter().map(|segment| segment.to_string()).collect(),
            query: Vec::new(),
            body: None,
        }
    }

    fn body(mut self, body: Value) -> Self {
        self.body = Some(body);
        self
    }

    /// The request's URL under `server`, which may carry a path prefix (`https://host/relay/`).
    fn url(&self, server: &Url) -> Url {
        let mut url = server.clone();
        url.path_segments_mut()
            .expect("the server URL is http(s), so it has a path")
            .pop_if_empty()
            .extend(&self.path);
        if !self.query.is_empty() {
            url.query_pairs_mut().extend_pairs(&self.query);
        }
        url
    }
}

/// The `--url` value: an http(s) URL, refused at parse time otherwise.
fn parse_server_url(value: &str) -> Result<Url, String> {
    match Url::parse(value) {
        Ok(url) if matches!(url.scheme(), "http" | "https") && url.has_host() => Ok(url),
        _ => Err(format!(
            "expected the server's http(s) URL, such as http://127.0.0.1:8080, got {value:?}"
        )),
    }
}

fn admin_request(command: Command) -> (Target, AdminRequest) {
    use reqwest::Method;
    match command {
        Command::Serve | Command::MigrateStore { .. } => {
            unreachable!("serve and migrate-store are not admin commands")
        }
        Command::Accounts { command, target } => {
            let request = match command {
                AccountsCommand::Add {
                    id,
                    phone_number_id,
                    waba_id,
                    access_token,
                    fields,
                } => {
                    let mut body = Map::new();
                    if let Some(id) = id {
                        body.insert("id".into(), json!(id));
                    }
                    body.insert("phoneNumberId".into(), json!(phone_number_id));
                    body.insert("wabaId".into(), json!(waba_id));
                    body.insert("accessToken".into(), json!(access_token));
                    account_fields(&mut body, fields);
                    AdminRequest::new(Method::POST, &["v1", "admin", "accounts"])
                        .body(Value::Object(body))
                }
                AccountsCommand::List => {
                    AdminRequest::new(Method::GET, &["v1", "admin", "accounts"])
                }
                AccountsCommand::Show { id } => {
                    AdminRequest::new(Method::GET, &["v1", "admin", "accounts", &id])
                }
                AccountsCommand::Update {
                    id,
                    phone_number_id,
                    waba_id,
                    access_token,
                    fields,
                } => {
                    let mut body = Map::new();
                    if let Some(phone_number_id) = phone_number_id {
                        body.insert("phoneNumberId".into(), json!(phone_number_id));
                    }
                    if let Some(waba_id) = waba_id {
                        body.insert("wabaId".into(), json!(waba_id));
                    }
                    if let Some(access_token) = access_token {
                        body.insert("accessToken".into(), json!(access_token));
                    }
                    account_fields(&mut body, fields);
                    AdminRequest::new(Method::PATCH, &["v1", "admin", "accounts", &id])
                        .body(Value::Object(body))
                }
                AccountsCommand::Remove { id } => {
                    AdminRequest::new(Method::DELETE, &["v1", "admin", "accounts", &id])
                }
            };
            (target, request)
        }
        Command::Keys { command, target } => {
            let request = match command {
                KeysCommand::Create { name, accounts } => {
                    AdminRequest::new(Method::POST, &["v1", "admin", "api-keys"])
                        .body(json!({"name": name, "accountIds": accounts}))
                }
                KeysCommand::List => AdminRequest::new(Method::GET, &["v1", "admin", "api-keys"]),
                KeysCommand::Revoke { id } => {
                    AdminRequest::new(Method::DELETE, &["v1", "admin", "api-keys", &id])
                }
            };
            (target, request)
        }
        Command::Lookup {
            phone,
            bsuid,
            account_id,
            target,
        } => {
            let mut request = AdminRequest::new(Method::GET, &["v1", "whatsapp", "attribution"]);
            let pairs = [
                ("phone", phone),
                ("bsuid", bsuid),
                ("accountId", account_id),
            ];
            for (name, value) in pairs {
                if let Some(value) = value {
                    request.query.push((name, value));
                }
            }
            (target, request)
        }
    }
}

/// Runs `migrate-store`: copies the sled store in `from` into a new redb store in `to` and
/// prints the count of every tree and table.
pub async fn migrate_store(from: PathBuf, to: PathBuf) -> anyhow::Result<()> {
    let target = to.clone();
    let report =
        tokio::task::spawn_blocking(move || crate::store::migrate::sled_to_redb(&from, &target))
            .await?
            .map_err(|error| anyhow::anyhow!(crate::error::error_chain(&error)))?;
    println!("{report}");
    println!(
        "migrated to {}: start with CTWA_STORE_ENGINE=redb and CTWA_DATA_DIR={}",
        to.display(),
        to.display()
    );
    Ok(())
}

/// Runs an admin subcommand; prints the server's JSON answer and fails on an error status.
pub async fn run_admin(command: Command) -> anyhow::Result<()> {
    let admin_token = std::env::var("CTWA_ADMIN_TOKEN")
        .map_err(|_| anyhow::anyhow!("set CTWA_ADMIN_TOKEN to the server's admin token"))?;
    let (target, admin_request) = admin_request(command);
    let url = admin_request.url(&target.url);
    let client = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(30))
        .build()?;
    let mut request = client
        .request(admin_request.method, url.clone())
        .bearer_auth(admin_token);
    if let Some(body) = admin_request.body {
        request = request.json(&body);
    }
    let response = request
        .send()
        .await
        .map_err(|error| anyhow::anyhow!("cannot reach {url}: {error}"))?;
    let status = response.status();
    let text = response.text().await?;
    let shown = match serde_json::from_str::<Value>(&text) {
        Ok(value) => serde_json::to_string_pretty(&value)?,
        Err(_) => text,
    };
    if status.is_success() {
        if !shown.is_empty() {
            println!("{shown}");
        }
        Ok(())
    } else {
        anyhow::bail!("the server answered {status}: {shown}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(url: &str) -> Url {
        parse_server_url(url).unwrap()
    }

    fn lookup(args: &[&str]) -> Command {
        let mut argv = vec!["ctwa-relay", "lookup"];
        argv.extend_from_slice(args);
        Cli::try_parse_from(argv).unwrap().command.unwrap()
    }

    #[test]
    fn query_values_are_form_encoded() {
        let (target, request) = admin_request(lookup(&[
            "--url",
            "http://127.0.0.1:8080",
            "--phone",
            "+1 650&x=y",
            "--bsuid",
            "US.a+b/c",
            "--account-id",
            "acc 1",
        ]));
        assert_eq!(
            request.url(&target.url).as_str(),
            "http://127.0.0.1:8080/v1/whatsapp/attribution?phone=%2B1+650%26x%3Dy&bsuid=US.a%2Bb%2Fc&accountId=acc+1"
        );
    }

    #[test]
    fn the_query_decodes_back_to_the_typed_values() {
        let (target, request) = admin_request(lookup(&["--bsuid", "a&phone=16505551234"]));
        let url = request.url(&target.url);
        let pairs: Vec<(String, String)> = url.query_pairs().into_owned().collect();
        assert_eq!(
            pairs,
            [("bsuid".to_string(), "a&phone=16505551234".to_string())]
        );
    }

    #[test]
    fn path_ids_are_one_encoded_segment() {
        let request = AdminRequest::new(
            reqwest::Method::GET,
            &["v1", "admin", "accounts", "a/b?c#d e"],
        );
        assert_eq!(
            request.url(&server("http://127.0.0.1:8080")).as_str(),
            "http://127.0.0.1:8080/v1/admin/accounts/a%2Fb%3Fc%23d%20e"
        );
    }

    #[test]
    fn a_server_url_keeps_its_path_prefix() {
        let request = AdminRequest::new(reqwest::Method::GET, &["v1", "admin", "api-keys"]);
        for base in ["https://relay.example/ctwa", "https://relay.example/ctwa/"] {
            assert_eq!(
                request.url(&server(base)).as_str(),
                "https://relay.example/ctwa/v1/admin/api-keys"
            );
        }
    }

    #[test]
    fn a_server_url_that_is_not_http_is_refused() {
        for bad in ["127.0.0.1:8080", "ftp://host", "localhost"] {
            assert!(parse_server_url(bad).is_err(), "{bad}");
        }
        let error = Cli::try_parse_from(["ctwa-relay", "accounts", "list", "--url", "nope"])
            .unwrap_err()
            .to_string();
        assert!(error.contains("http(s) URL"), "{error}");
    }
}
