//! Layout 1: the key encodings and stored record forms both embedded engines write, byte for
//! byte (`migrate-store` copies sled's trees into redb's tables unchanged, so they must agree).
//! The engines own their trees or tables and how they write them; what the bytes are is here.

use serde::{Deserialize, Serialize};

use super::StoreError;
use crate::domain::account::{Account, AccountMetadata};
use crate::domain::conversion_record::ConversionRecord;
use crate::secret::Secret;

/// Joins key parts with a NUL byte; parts are ids that never contain one.
pub(crate) fn key(parts: &[&str]) -> Vec<u8> {
    let mut out = Vec::with_capacity(parts.iter().map(|p| p.len() + 1).sum());
    for (index, part) in parts.iter().enumerate() {
        if index > 0 {
            out.push(0);
        }
        out.extend_from_slice(part.as_bytes());
    }
    out
}

/// The prefix of every key whose first parts are `parts`.
pub(crate) fn prefix(parts: &[&str]) -> Vec<u8> {
    let mut out = key(parts);
    out.push(0);
    out
}

pub(crate) fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, StoreError> {
    Ok(serde_json::to_vec(value)?)
}

pub(crate) fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, StoreError> {
    Ok(serde_json::from_slice(bytes)?)
}

/// An account as the `accounts` tree or table holds it: JSON with the field names and order of
/// the first layout, the access token in plain text. This is the one place that writes a token
/// out; `Account` itself has no `Serialize`, so a token cannot leak through a log line or a
/// response.
#[derive(Serialize, Deserialize)]
struct AccountRecord {
    id: String,
    name: Option<String>,
    phone_number_id: String,
    waba_id: String,
    display_phone_number: Option<String>,
    access_token: String,
    metadata: AccountMetadata,
    #[serde(default)]
    forward_automatic_events: bool,
    created_at: i64,
    updated_at: i64,
}

pub(crate) fn encode_account(account: &Account) -> Result<Vec<u8>, StoreError> {
    encode(&AccountRecord {
        id: account.id.clone(),
        name: account.name.clone(),
        phone_number_id: account.phone_number_id.clone(),
        waba_id: account.waba_id.clone(),
        display_phone_number: account.display_phone_number.clone(),
        access_token: account.access_token.expose().to_string(),
        metadata: account.metadata.clone(),
        forward_automatic_events: account.forward_automatic_events,
        created_at: account.created_at,
        updated_at: account.updated_at,
    })
}

pub(crate) fn decode_account(bytes: &[u8]) -> Result<Account, StoreError> {
    let record: AccountRecord = decode(bytes)?;
    Ok(Account {
        id: record.id,
        name: record.name,
        phone_number_id: record.phone_number_id,
        waba_id: record.waba_id,
        display_phone_number: record.display_phone_number,
        access_token: Secret::new(record.access_token),
        metadata: record.metadata,
        forward_automatic_events: record.forward_automatic_events,
        created_at: record.created_at,
        updated_at: record.updated_at,
    })
}

/// The tombstone of a deleted account: its id is never given to a new account, because the
/// deleted account's conversations and conversions stay in the store under that id.
#[derive(Debug, Serialize)]
pub(crate) struct RetiredAccount {
    pub id: String,
    pub phone_number_id: String,
    pub deleted_at: i64,
}

/// A conversion record's key: account, event name, event id.
pub(crate) fn record_key(record: &ConversionRecord) -> Vec<u8> {
    key(&[record.account_id(), record.event_name(), record.event_id()])
}

/// A history index key: the account or conversation, NUL, created ms (8 bytes BE), record key.
pub(crate) fn index_key(first: &str, created_at_ms: i64, record_key: &[u8]) -> Vec<u8> {
    let mut index_key = prefix(&[first]);
    index_key.extend_from_slice(&created_at_ms.to_be_bytes());
    index_key.extend_from_slice(record_key);
    index_key
}

/// An outbox key: the next attempt's ms (8 bytes BE), then the record key.
pub(crate) fn outbox_key(next_attempt_at_ms: i64, record_key: &[u8]) -> Vec<u8> {
    let mut outbox_key = next_attempt_at_ms.to_be_bytes().to_vec();
    outbox_key.extend_from_slice(record_key);
    outbox_key
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_join_parts_with_nul() {
        assert_eq!(key(&["a", "b"]), b"a\0b".to_vec());
        assert_eq!(prefix(&["a"]), b"a\0".to_vec());
    }
}
