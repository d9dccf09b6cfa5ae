//! The admin API's bodies (SPEC §4.6): accounts and API keys.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::api::object_or_null;
use crate::domain::account::{Account, ApiKey};
use crate::routes::{double_option, rfc3339};
use crate::secret::Secret;

/// Account metadata in a request: an absent field is left as it is, `null` clears it.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct MetadataBody {
    /// The Meta dataset (pixel) conversions go to; digits only.
    #[serde(default, deserialize_with = "double_option")]
    #[schema(value_type = Option<String>, pattern = "^[0-9]{1,32}$")]
    pub meta_capi_dataset_id: Option<Option<String>>,
    /// Digits only.
    #[serde(default, deserialize_with = "double_option")]
    #[schema(value_type = Option<String>, pattern = "^[0-9]{1,32}$")]
    pub connected_facebook_page_id: Option<Option<String>>,
}

/// `POST /v1/admin/accounts`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CreateAccountBody {
    /// 1-64 letters, digits, `_`, `-` or `.`; generated when absent.
    #[schema(pattern = "^[A-Za-z0-9_.-]{1,64}$")]
    pub id: Option<String>,
    pub name: Option<String>,
    /// Meta's numeric id of the WhatsApp number; unique among accounts.
    #[schema(pattern = "^[0-9]{1,32}$")]
    pub phone_number_id: String,
    /// Meta's numeric id of the WhatsApp Business Account.
    #[schema(pattern = "^[0-9]{1,32}$")]
    pub waba_id: String,
    pub display_phone_number: Option<String>,
    /// Meta's system-user token, 1-4096 visible ASCII characters. Write-only: responses show
    /// `hasAccessToken` instead.
    #[schema(value_type = String, write_only, pattern = "^[!-~]{1,4096}$")]
    pub access_token: Secret,
    #[serde(default, deserialize_with = "object_or_null")]
    pub metadata: Option<MetadataBody>,
    /// Forward Meta's automatic events (purchases, leads detected in chats) as conversions.
    #[serde(default)]
    pub forward_automatic_events: bool,
}

/// `PATCH /v1/admin/accounts/{id}`: absent fields are left as they are.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct UpdateAccountBody {
    #[serde(default, deserialize_with = "double_option")]
    #[schema(value_type = Option<String>)]
    pub name: Option<Option<String>>,
    #[schema(pattern = "^[0-9]{1,32}$")]
    pub phone_number_id: Option<String>,
    #[schema(pattern = "^[0-9]{1,32}$")]
    pub waba_id: Option<String>,
    #[serde(default, deserialize_with = "double_option")]
    #[schema(value_type = Option<String>)]
    pub display_phone_number: Option<Option<String>>,
    /// 1-4096 visible ASCII characters; write-only.
    #[schema(value_type = Option<String>, write_only, pattern = "^[!-~]{1,4096}$")]
    pub access_token: Option<Secret>,
    #[serde(default, deserialize_with = "object_or_null")]
    pub metadata: Option<MetadataBody>,
    pub forward_automatic_events: Option<bool>,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct MetadataView {
    pub meta_capi_dataset_id: Option<String>,
    pub connected_facebook_page_id: Option<String>,
}

/// An account as the API shows it: the access token is write-only.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AccountView {
    pub id: String,
    pub name: Option<String>,
    pub phone_number_id: String,
    pub waba_id: String,
    pub display_phone_number: Option<String>,
    pub has_access_token: bool,
    pub metadata: MetadataView,
    pub forward_automatic_events: bool,
    /// RFC 3339, UTC.
    pub created_at: String,
    /// RFC 3339, UTC.
    pub updated_at: String,
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

/// `GET /v1/admin/accounts`.
#[derive(Debug, Serialize, ToSchema)]
pub struct AccountList {
    pub accounts: Vec<AccountView>,
}

/// `POST /v1/admin/api-keys`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CreateKeyBody {
    /// 1-200 characters, not blank.
    #[schema(min_length = 1, max_length = 200, pattern = "\\S")]
    pub name: String,
    /// The accounts the key may use; at least one, each registered.
    #[schema(min_items = 1)]
    pub account_ids: Vec<String>,
}

/// An API key as the API shows it: never its secret.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct KeyView {
    pub id: String,
    pub name: String,
    pub account_ids: Vec<String>,
    /// RFC 3339, UTC.
    pub created_at: String,
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

/// A key just created: the only answer that shows its secret.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CreatedKey {
    pub id: String,
    pub name: String,
    /// The bearer token; shown once, stored only as a hash.
    pub key: String,
    pub account_ids: Vec<String>,
    /// RFC 3339, UTC.
    pub created_at: String,
}

impl CreatedKey {
    pub fn new(key: &ApiKey, secret: &str) -> Self {
        let view = KeyView::from(key);
        Self {
            id: view.id,
            name: view.name,
            key: secret.to_string(),
            account_ids: view.account_ids,
            created_at: view.created_at,
        }
    }
}

/// `GET /v1/admin/api-keys`.
#[derive(Debug, Serialize, ToSchema)]
pub struct KeyList {
    pub keys: Vec<KeyView>,
}
