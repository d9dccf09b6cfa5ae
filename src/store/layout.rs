//! The key encodings and stored record forms both embedded engines write, byte for byte
//! (`migrate-store` copies sled's trees into redb's tables unchanged, so they must agree): layout
//! 1, and redb's layout 2, which adds the compressed journal (`journal_v2`).
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

/// The zstd level journal bodies are compressed with (zstd's default): a one-message webhook
/// of ~700 bytes shrinks to about half, a batch of 100 messages to a tenth.
const JOURNAL_ZSTD_LEVEL: i32 = 3;

/// A journal entry of layout 2 (redb's `journal_v2` table): the time the webhook was received
/// (Unix seconds, 8 bytes big-endian), then its raw body as one zstd frame. Layout 1's `journal`
/// holds the body uncompressed after the same 8 bytes.
pub(crate) fn encode_journal_entry(received_at: i64, body: &[u8]) -> Result<Vec<u8>, StoreError> {
    thread_local! {
        /// One compression context per thread, reused: making one per body cost more than
        /// compressing it (~50 µs for a one-message webhook).
        static COMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Compressor<'static>>> =
            const { std::cell::RefCell::new(None) };
    }
    let failed = |error| StoreError::Io {
        context: "cannot compress a webhook body for the journal".into(),
        error,
    };
    COMPRESSOR.with(|cell| {
        let mut cell = cell.borrow_mut();
        let compressor = match cell.as_mut() {
            Some(compressor) => compressor,
            None => cell.insert(zstd::bulk::Compressor::new(JOURNAL_ZSTD_LEVEL).map_err(failed)?),
        };
        let mut entry = vec![0; 8 + zstd::zstd_safe::compress_bound(body.len())];
        entry[..8].copy_from_slice(&received_at.to_be_bytes());
        let written = compressor
            .compress_to_buffer(body, &mut entry[8..])
            .map_err(failed)?;
        entry.truncate(8 + written);
        Ok(entry)
    })
}

/// When a journal entry (of either layout) says its webhook was received.
pub(crate) fn journal_received_at(entry: &[u8]) -> Result<i64, StoreError> {
    entry
        .get(..8)
        .map(|eight| i64::from_be_bytes(eight.try_into().expect("eight bytes")))
        .ok_or_else(|| StoreError::Corrupt("a journal entry is truncated".into()))
}

/// Reads a journal entry: `compressed` for layout 2's `journal_v2`, not for layout 1's
/// `journal`.
pub(crate) fn decode_journal_entry(
    entry: &[u8],
    compressed: bool,
) -> Result<super::JournaledWebhook, StoreError> {
    let received_at = journal_received_at(entry)?;
    let body = match compressed {
        true => zstd::stream::decode_all(&entry[8..]).map_err(|error| {
            StoreError::Corrupt(format!(
                "a compressed journal entry does not decompress: {error}"
            ))
        })?,
        false => entry[8..].to_vec(),
    };
    Ok(super::JournaledWebhook { received_at, body })
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

    #[test]
    fn a_journal_entry_keeps_its_time_and_body_compressed() {
        let body = br#"{"object":"whatsapp_business_account","entry":[]}"#.repeat(20);
        let entry = encode_journal_entry(1_700_000_000, &body).unwrap();
        assert!(entry.len() < body.len() / 4, "{} bytes", entry.len());
        assert_eq!(journal_received_at(&entry).unwrap(), 1_700_000_000);
        let read = decode_journal_entry(&entry, true).unwrap();
        assert_eq!((read.received_at, read.body), (1_700_000_000, body.clone()));
        let mut raw = 7i64.to_be_bytes().to_vec();
        raw.extend_from_slice(b"not json");
        let read = decode_journal_entry(&raw, false).unwrap();
        assert_eq!(
            (read.received_at, read.body.as_slice()),
            (7, b"not json".as_slice())
        );
        assert!(decode_journal_entry(&raw, true).is_err());
        assert!(journal_received_at(b"short").is_err());
    }
}
