//! Accounts (one WhatsApp business number each) and API keys, as the store keeps them.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::secret::Secret;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AccountMetadata {
    pub meta_capi_dataset_id: Option<String>,
    pub connected_facebook_page_id: Option<String>,
}

/// No `Serialize` and no `==`: the access token is a [`Secret`]. The store writes the record
/// through its own explicit form (`store::accounts::AccountRecord`), and responses through views.
#[derive(Debug, Clone)]
pub struct Account {
    pub id: String,
    pub name: Option<String>,
    pub phone_number_id: String,
    pub waba_id: String,
    pub display_phone_number: Option<String>,
    /// Write-only through the API: responses say whether one is set, never what it is.
    pub access_token: Secret,
    pub metadata: AccountMetadata,
    /// Forward Meta's `automatic_events` as conversions (off by default).
    pub forward_automatic_events: bool,
    pub created_at: i64,
    pub updated_at: i64,
}

/// An API key as stored: the SHA-256 of the secret, never the secret.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ApiKey {
    pub id: String,
    pub name: String,
    pub key_hash: String,
    pub account_ids: Vec<String>,
    pub created_at: i64,
}

impl ApiKey {
    pub fn can_see(&self, account_id: &str) -> bool {
        self.account_ids.iter().any(|id| id == account_id)
    }
}

/// A new API key secret: `ctwa_` and 32 random bytes in hex.
pub fn generate_api_key_secret() -> Secret {
    let bytes: [u8; 32] = rand::random();
    Secret::new(format!("ctwa_{}", hex::encode(bytes)))
}

/// The stored form of an API key secret. Keys are 256-bit random values, so a fast hash is
/// enough: there is nothing to brute-force.
pub fn hash_api_key(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}
