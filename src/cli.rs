//! The command line: `serve`, and admin subcommands that call a running server's admin API.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use serde_json::{json, Map, Value};

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
        default_value = "http://127.0.0.1:8080"
    )]
    pub url: String,
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

/// Runs an admin subcommand; prints the server's JSON answer and fails on an error status.
pub async fn run_admin(command: Command) -> anyhow::Result<()> {
    let admin_token = std::env::var("CTWA_ADMIN_TOKEN")
        .map_err(|_| anyhow::anyhow!("set CTWA_ADMIN_TOKEN to the server's admin token"))?;
    let (target, method, path, body) = match command {
        Command::Serve => unreachable!("serve is not an admin command"),
        Command::Accounts { command, target } => match command {
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
                (
                    target,
                    reqwest::Method::POST,
                    "/v1/admin/accounts".to_string(),
                    Some(Value::Object(body)),
                )
            }
            AccountsCommand::List => (
                target,
                reqwest::Method::GET,
                "/v1/admin/accounts".into(),
                None,
            ),
            AccountsCommand::Show { id } => (
                target,
                reqwest::Method::GET,
                format!("/v1/admin/accounts/{id}"),
                None,
            ),
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
                (
                    target,
                    reqwest::Method::PATCH,
                    format!("/v1/admin/accounts/{id}"),
                    Some(Value::Object(body)),
                )
            }
            AccountsCommand::Remove { id } => (
                target,
                reqwest::Method::DELETE,
                format!("/v1/admin/accounts/{id}"),
                None,
            ),
        },
        Command::Keys { command, target } => match command {
            KeysCommand::Create { name, accounts } => (
                target,
                reqwest::Method::POST,
                "/v1/admin/api-keys".into(),
                Some(json!({"name": name, "accountIds": accounts})),
            ),
            KeysCommand::List => (
                target,
                reqwest::Method::GET,
                "/v1/admin/api-keys".into(),
                None,
            ),
            KeysCommand::Revoke { id } => (
                target,
                reqwest::Method::DELETE,
                format!("/v1/admin/api-keys/{id}"),
                None,
            ),
        },
        Command::Lookup {
            phone,
            bsuid,
            account_id,
            target,
        } => {
            let mut query = Vec::new();
            if let Some(phone) = phone {
                query.push(format!("phone={phone}"));
            }
            if let Some(bsuid) = bsuid {
                query.push(format!("bsuid={bsuid}"));
            }
            if let Some(account_id) = account_id {
                query.push(format!("accountId={account_id}"));
            }
            (
                target,
                reqwest::Method::GET,
                format!("/v1/whatsapp/attribution?{}", query.join("&")),
                None,
            )
        }
    };
    let url = format!("{}{}", target.url.trim_end_matches('/'), path);
    let client = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(30))
        .build()?;
    let mut request = client.request(method, &url).bearer_auth(admin_token);
    if let Some(body) = body {
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
