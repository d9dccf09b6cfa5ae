//! The admin API (SPEC §4.6): accounts and API keys. Admin token only.

use actix_web::{web, HttpResponse};
use serde::{Deserialize, Serialize};

use crate::auth::Caller;
use crate::domain::account::{
    generate_api_key_secret, hash_api_key, Account, AccountMetadata, ApiKey,
};
use crate::domain::ids;
use crate::error::{ApiError, Code};
use crate::json_body::JsonBody;
use crate::routes::{double_option, rfc3339};
use crate::secret::Secret;
use crate::startup::AppState;
use crate::webhook::parse_webhook;

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MetadataBody {
    #[serde(default, deserialize_with = "double_option")]
    meta_capi_dataset_id: Option<Option<String>>,
    #[serde(default, deserialize_with = "double_option")]
    connected_facebook_page_id: Option<Option<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CreateAccountBody {
    id: Option<String>,
    name: Option<String>,
    phone_number_id: String,
    waba_id: String,
    display_phone_number: Option<String>,
    access_token: Secret,
    metadata: Option<MetadataBody>,
    #[serde(default)]
    forward_automatic_events: bool,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UpdateAccountBody {
    #[serde(default, deserialize_with = "double_option")]
    name: Option<Option<String>>,
    phone_number_id: Option<String>,
    waba_id: Option<String>,
    #[serde(default, deserialize_with = "double_option")]
    display_phone_number: Option<Option<String>>,
    access_token: Option<Secret>,
    metadata: Option<MetadataBody>,
    forward_automatic_events: Option<bool>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MetadataView {
    meta_capi_dataset_id: Option<String>,
    connected_facebook_page_id: Option<String>,
}

/// An account as the API shows it: the access token is write-only.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AccountView {
    id: String,
    name: Option<String>,
    phone_number_id: String,
    waba_id: String,
    display_phone_number: Option<String>,
    has_access_token: bool,
    metadata: MetadataView,
    forward_automatic_events: bool,
    created_at: String,
    updated_at: String,
}

impl From<&Account> for AccountView {
    fn from(account: &Account) -> Self {
        Self {
            id: account.id.clone(),
            name: account.name.clone(),
            phone_number_id: account.phone_number_id.clone(),
            waba_id: account.waba_id.clone(),
            display_phone_number: account.display_phone_number.clone(),
            has_access_token: !account.access_token.expose().is_empty(),
            metadata: MetadataView {
                meta_capi_dataset_id: account.metadata.meta_capi_dataset_id.clone(),
                connected_facebook_page_id: account.metadata.connected_facebook_page_id.clone(),
            },
            forward_automatic_events: account.forward_automatic_events,
            created_at: rfc3339(account.created_at),
            updated_at: rfc3339(account.updated_at),
        }
    }
}

fn check_meta_id(field: &'static str, value: &str) -> Result<(), ApiError> {
    if ids::is_valid_meta_id(value) {
        return Ok(());
    }
    Err(ApiError::new(Code::InvalidField).message(format!(
        "{field} must be Meta's numeric id (digits only), got {value:?}"
    )))
}

fn check_access_token(token: &Secret) -> Result<(), ApiError> {
    let token = token.expose();
    if token.trim().is_empty() || token.len() > 4096 || token.chars().any(char::is_whitespace) {
        return Err(ApiError::new(Code::InvalidField)
            .message("accessToken must be a non-empty token without spaces"));
    }
    Ok(())
}

fn apply_metadata(metadata: &mut AccountMetadata, body: MetadataBody) -> Result<(), ApiError> {
    if let Some(dataset_id) = body.meta_capi_dataset_id {
        if let Some(dataset_id) = &dataset_id {
            check_meta_id("metadata.metaCapiDatasetId", dataset_id)?;
        }
        metadata.meta_capi_dataset_id = dataset_id;
    }
    if let Some(page_id) = body.connected_facebook_page_id {
        if let Some(page_id) = &page_id {
            check_meta_id("metadata.connectedFacebookPageId", page_id)?;
        }
        metadata.connected_facebook_page_id = page_id;
    }
    Ok(())
}

/// Processes webhook changes that arrived for this number before its account existed.
async fn replay_held_changes(state: &AppState, phone_number_id: &str) -> Result<(), ApiError> {
    let mut report = state
        .store
        .replay_unrouted(
            phone_number_id.to_string(),
            parse_webhook,
            state.settings.attribution_window_secs(),
        )
        .await?;
    let matched = std::mem::take(&mut report.matched_automatic_events);
    crate::conversions::forward_automatic_events(state, matched).await?;
    state.store.durable().await?;
    state.metrics.record_ingest(&report);
    if report.messages > 0 || report.automatic_events > 0 {
        tracing::info!(
            phone_number_id,
            messages = report.messages,
            automatic_events = report.automatic_events,
            "replayed webhook changes held for the new account"
        );
    }
    Ok(())
}

pub async fn create_account(
    state: web::Data<AppState>,
    caller: Caller,
    body: JsonBody<CreateAccountBody>,
) -> Result<HttpResponse, ApiError> {
    caller.require_admin()?;
    let body = body.into_inner();
    let id = match body.id {
        Some(id) if !ids::is_valid_caller_id(&id) => {
            return Err(ApiError::new(Code::InvalidField)
                .message("id must be 1-64 characters of letters, digits, '_', '-' or '.'"))
        }
        Some(id) => id,
        None => ids::generate("acc"),
    };
    check_meta_id("phoneNumberId", &body.phone_number_id)?;
    check_meta_id("wabaId", &body.waba_id)?;
    check_access_token(&body.access_token)?;
    let mut metadata = AccountMetadata::default();
    if let Some(metadata_body) = body.metadata {
        apply_metadata(&mut metadata, metadata_body)?;
    }
    let now = state.clock.now_secs();
    let account = Account {
        id,
        name: body.name.filter(|name| !name.trim().is_empty()),
        phone_number_id: body.phone_number_id,
        waba_id: body.waba_id,
        display_phone_number: body.display_phone_number,
        access_token: body.access_token,
        metadata,
        forward_automatic_events: body.forward_automatic_events,
        created_at: now,
        updated_at: now,
    };
    let account = state.store.create_account(account).await?;
    replay_held_changes(&state, &account.phone_number_id).await?;
    Ok(HttpResponse::Created().json(AccountView::from(&account)))
}

pub async fn list_accounts(
    state: web::Data<AppState>,
    caller: Caller,
) -> Result<HttpResponse, ApiError> {
    caller.require_admin()?;
    let accounts: Vec<AccountView> = state
        .store
        .accounts()
        .iter()
        .map(AccountView::from)
        .collect();
    Ok(HttpResponse::Ok().json(serde_json::json!({ "accounts": accounts })))
}

pub async fn get_account(
    state: web::Data<AppState>,
    caller: Caller,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    caller.require_admin()?;
    let account = caller.account(&path)?;
    Ok(HttpResponse::Ok().json(AccountView::from(&account)))
}

pub async fn update_account(
    state: web::Data<AppState>,
    caller: Caller,
    path: web::Path<String>,
    body: JsonBody<UpdateAccountBody>,
) -> Result<HttpResponse, ApiError> {
    caller.require_admin()?;
    let mut account = caller.account(&path)?;
    let body = body.into_inner();
    if let Some(name) = body.name {
        account.name = name.filter(|name| !name.trim().is_empty());
    }
    if let Some(phone_number_id) = body.phone_number_id {
        check_meta_id("phoneNumberId", &phone_number_id)?;
        account.phone_number_id = phone_number_id;
    }
    if let Some(waba_id) = body.waba_id {
        check_meta_id("wabaId", &waba_id)?;
        account.waba_id = waba_id;
    }
    if let Some(display_phone_number) = body.display_phone_number {
        account.display_phone_number = display_phone_number;
    }
    if let Some(access_token) = body.access_token {
        check_access_token(&access_token)?;
        account.access_token = access_token;
    }
    if let Some(metadata) = body.metadata {
        apply_metadata(&mut account.metadata, metadata)?;
    }
    if let Some(forward) = body.forward_automatic_events {
        account.forward_automatic_events = forward;
    }
    account.updated_at = state.clock.now_secs();
    let account = state.store.update_account(account).await?;
    replay_held_changes(&state, &account.phone_number_id).await?;
    Ok(HttpResponse::Ok().json(AccountView::from(&account)))
}

/// Deletes an account: every API key scoped to it loses it (a key left with none is revoked), and
/// its id is retired. Its conversations and conversions are kept under that id, readable with
/// the admin token; a new account must use another id.
pub async fn delete_account(
    state: web::Data<AppState>,
    caller: Caller,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    caller.require_admin()?;
    let id = path.into_inner();
    let Some(deletion) = state
        .store
        .delete_account(id.clone(), state.clock.now_secs())
        .await?
    else {
        return Err(ApiError::new(Code::AccountNotFound).message("no such account"));
    };
    tracing::info!(
        account_id = %id,
        narrowed_keys = deletion.narrowed_keys,
        revoked_keys = deletion.revoked_keys,
        "account deleted; its id is retired and its data kept"
    );
    Ok(HttpResponse::NoContent().finish())
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CreateKeyBody {
    name: String,
    account_ids: Vec<String>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct KeyView {
    id: String,
    name: String,
    account_ids: Vec<String>,
    created_at: String,
}

impl From<&ApiKey> for KeyView {
    fn from(key: &ApiKey) -> Self {
        Self {
            id: key.id.clone(),
            name: key.name.clone(),
            account_ids: key.account_ids.clone(),
            created_at: rfc3339(key.created_at),
        }
    }
}

pub async fn create_key(
    state: web::Data<AppState>,
    caller: Caller,
    body: JsonBody<CreateKeyBody>,
) -> Result<HttpResponse, ApiError> {
    caller.require_admin()?;
    let body = body.into_inner();
    let name = body.name.trim().to_string();
    if name.is_empty() || name.len() > 200 {
        return Err(ApiError::new(Code::InvalidField).message("name must be 1-200 characters"));
    }
    if body.account_ids.is_empty() {
        return Err(
            ApiError::new(Code::InvalidField).message("accountIds must name at least one account")
        );
    }
    if let Some(unknown) = body
        .account_ids
        .iter()
        .find(|id| state.store.account(id).is_none())
    {
        return Err(ApiError::new(Code::UnknownAccount).message(format!(
            "accountIds names {unknown:?}, which is not a registered account"
        )));
    }
    let secret = generate_api_key_secret();
    let key = ApiKey {
        id: ids::generate("key"),
        name,
        key_hash: hash_api_key(secret.expose()),
        account_ids: body.account_ids,
        created_at: state.clock.now_secs(),
    };
    let key = state.store.create_api_key(key).await?;
    let mut view = serde_json::to_value(KeyView::from(&key)).expect("a key view serialises");
    view["key"] = serde_json::Value::String(secret.expose().to_string());
    Ok(HttpResponse::Created().json(view))
}

pub async fn list_keys(
    state: web::Data<AppState>,
    caller: Caller,
) -> Result<HttpResponse, ApiError> {
    caller.require_admin()?;
    let keys: Vec<KeyView> = state.store.api_keys().iter().map(KeyView::from).collect();
    Ok(HttpResponse::Ok().json(serde_json::json!({ "keys": keys })))
}

pub async fn revoke_key(
    state: web::Data<AppState>,
    caller: Caller,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    caller.require_admin()?;
    if !state.store.revoke_api_key(path.into_inner()).await? {
        return Err(ApiError::new(Code::KeyNotFound));
    }
    Ok(HttpResponse::NoContent().finish())
}
