//! The admin API (SPEC §4.6): accounts and API keys. Admin token only.

use std::sync::Arc;

use actix_web::{web, HttpResponse};

use crate::api::admin::{
    AccountList, AccountView, CreateAccountBody, CreateKeyBody, CreatedKey, KeyList, KeyView,
    MetadataBody, UpdateAccountBody,
};
use crate::api::errors::ErrorBody;
use crate::auth::Caller;
use crate::clock::Clock;
use crate::domain::account::{
    generate_api_key_secret, hash_api_key, Account, AccountMetadata, ApiKey,
};
use crate::domain::ids;
use crate::error::{ApiError, Code};
use crate::ingest;
use crate::json_body::JsonBody;
use crate::secret::Secret;
use crate::store::Store;

fn check_meta_id(field: &'static str, value: &str) -> Result<(), ApiError> {
    if ids::is_valid_meta_id(value) {
        return Ok(());
    }
    Err(ApiError::new(Code::InvalidField).message(format!(
        "{field} must be Meta's numeric id (digits only), got {value:?}"
    )))
}

/// The token goes into an `Authorization` header on every Graph call, so it must be one: visible
/// ASCII, no spaces (a control character or non-ASCII letter would make every call fail).
fn check_access_token(token: &Secret) -> Result<(), ApiError> {
    let token = token.expose();
    if token.is_empty() || token.len() > 4096 || !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(ApiError::new(Code::InvalidField).message(
            "accessToken must be a non-empty token of visible ASCII characters without spaces",
        ));
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

/// What the admin routes use: the store, the clock, and ingestion (a new or renumbered account
/// replays the webhooks held for its number).
pub struct Admin {
    pub store: Store,
    pub clock: Clock,
    pub ingest: Arc<ingest::Service>,
}

#[utoipa::path(
    post,
    path = "/v1/admin/accounts",
    tag = "admin",
    security(("bearer" = [])),
    request_body = CreateAccountBody,
    responses(
        (status = 201, description = "The account; webhooks held for its number are processed.", body = AccountView),
        (status = 403, description = "An API key, not the admin token (`forbidden`).", body = ErrorBody),
        (status = 409, description = "The phoneNumberId or id is taken (`conflict`), or the id belonged to a deleted account (`account_id_retired`).", body = ErrorBody),
    ),
)]
pub async fn create_account(
    admin: web::Data<Admin>,
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
    let now = admin.clock.now_secs();
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
    let account = admin.store.create_account(account).await?;
    admin
        .ingest
        .replay_held(account.phone_number_id.clone())
        .await?;
    Ok(HttpResponse::Created().json(AccountView::from(&account)))
}

#[utoipa::path(
    get,
    path = "/v1/admin/accounts",
    tag = "admin",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Every account.", body = AccountList),
        (status = 403, description = "An API key, not the admin token (`forbidden`).", body = ErrorBody),
    ),
)]
pub async fn list_accounts(
    admin: web::Data<Admin>,
    caller: Caller,
) -> Result<HttpResponse, ApiError> {
    caller.require_admin()?;
    let accounts = admin
        .store
        .accounts()
        .iter()
        .map(AccountView::from)
        .collect();
    Ok(HttpResponse::Ok().json(AccountList { accounts }))
}

#[utoipa::path(
    get,
    path = "/v1/admin/accounts/{id}",
    tag = "admin",
    security(("bearer" = [])),
    params(("id" = String, Path, description = "The account id.")),
    responses(
        (status = 200, description = "The account.", body = AccountView),
        (status = 403, description = "An API key, not the admin token (`forbidden`).", body = ErrorBody),
        (status = 404, description = "No such account (`account_not_found`).", body = ErrorBody),
    ),
)]
pub async fn get_account(
    caller: Caller,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    caller.require_admin()?;
    let account = caller.account(&path)?;
    Ok(HttpResponse::Ok().json(AccountView::from(&account)))
}

#[utoipa::path(
    patch,
    path = "/v1/admin/accounts/{id}",
    tag = "admin",
    security(("bearer" = [])),
    params(("id" = String, Path, description = "The account id.")),
    request_body = UpdateAccountBody,
    responses(
        (status = 200, description = "The updated account.", body = AccountView),
        (status = 403, description = "An API key, not the admin token (`forbidden`).", body = ErrorBody),
        (status = 404, description = "No such account (`account_not_found`).", body = ErrorBody),
        (status = 409, description = "The phoneNumberId belongs to another account (`conflict`).", body = ErrorBody),
    ),
)]
pub async fn update_account(
    admin: web::Data<Admin>,
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
    account.updated_at = admin.clock.now_secs();
    let account = admin.store.update_account(account).await?;
    admin
        .ingest
        .replay_held(account.phone_number_id.clone())
        .await?;
    Ok(HttpResponse::Ok().json(AccountView::from(&account)))
}

/// Deletes an account: every API key scoped to it loses it (a key left with none is revoked), and
/// its id is retired. Its conversations and conversions are kept under that id, readable with
/// the admin token; a new account must use another id.
#[utoipa::path(
    delete,
    path = "/v1/admin/accounts/{id}",
    tag = "admin",
    security(("bearer" = [])),
    params(("id" = String, Path, description = "The account id.")),
    responses(
        (status = 204, description = "Deleted; its keys lose it, its id is retired, its data is kept."),
        (status = 403, description = "An API key, not the admin token (`forbidden`).", body = ErrorBody),
        (status = 404, description = "No such account (`account_not_found`).", body = ErrorBody),
    ),
)]
pub async fn delete_account(
    admin: web::Data<Admin>,
    caller: Caller,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    caller.require_admin()?;
    let id = path.into_inner();
    let Some(deletion) = admin
        .store
        .delete_account(id.clone(), admin.clock.now_secs())
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

#[utoipa::path(
    post,
    path = "/v1/admin/api-keys",
    tag = "admin",
    security(("bearer" = [])),
    request_body = CreateKeyBody,
    responses(
        (status = 201, description = "The key, with its secret shown this once.", body = CreatedKey),
        (status = 403, description = "An API key, not the admin token (`forbidden`).", body = ErrorBody),
    ),
)]
pub async fn create_key(
    admin: web::Data<Admin>,
    caller: Caller,
    body: JsonBody<CreateKeyBody>,
) -> Result<HttpResponse, ApiError> {
    caller.require_admin()?;
    let body = body.into_inner();
    let name = body.name.trim().to_string();
    if name.is_empty() || name.chars().count() > 200 {
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
        .find(|id| admin.store.account(id).is_none())
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
        created_at: admin.clock.now_secs(),
    };
    let key = admin.store.create_api_key(key).await?;
    Ok(HttpResponse::Created().json(CreatedKey::new(&key, secret.expose())))
}

#[utoipa::path(
    get,
    path = "/v1/admin/api-keys",
    tag = "admin",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Every key, without secrets.", body = KeyList),
        (status = 403, description = "An API key, not the admin token (`forbidden`).", body = ErrorBody),
    ),
)]
pub async fn list_keys(admin: web::Data<Admin>, caller: Caller) -> Result<HttpResponse, ApiError> {
    caller.require_admin()?;
    let keys = admin.store.api_keys().iter().map(KeyView::from).collect();
    Ok(HttpResponse::Ok().json(KeyList { keys }))
}

#[utoipa::path(
    delete,
    path = "/v1/admin/api-keys/{id}",
    tag = "admin",
    security(("bearer" = [])),
    params(("id" = String, Path, description = "The key id.")),
    responses(
        (status = 204, description = "Revoked; the next request with it is refused."),
        (status = 403, description = "An API key, not the admin token (`forbidden`).", body = ErrorBody),
        (status = 404, description = "No such key (`key_not_found`).", body = ErrorBody),
    ),
)]
pub async fn revoke_key(
    admin: web::Data<Admin>,
    caller: Caller,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    caller.require_admin()?;
    if !admin.store.revoke_api_key(path.into_inner()).await? {
        return Err(ApiError::new(Code::KeyNotFound));
    }
    Ok(HttpResponse::NoContent().finish())
}
