//! Conversion records, their history indexes and the outbox.
//!
//! Keys (parts joined by NUL; `ms` is 8 bytes big-endian milliseconds):
//! - `conversion_records`: account, event name, event id → [`ConversionRecord`]
//! - `conversion_history`: account, NUL, created ms ++ record key → record key
//! - `conversion_by_conversation`: conversation id, NUL, created ms ++ record key → record key
//! - `outbox`: next attempt ms ++ record key → (), for every queued record

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{decode, encode, key, prefix, Store, StoreError, Trees};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConversionStatus {
    /// Recorded and not delivered yet: being sent, or waiting in the outbox.
    Queued,
    Sent,
    Failed,
    /// Still undelivered when the event became older than Meta accepts.
    Expired,
}

impl ConversionStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            ConversionStatus::Queued => "queued",
            ConversionStatus::Sent => "sent",
            ConversionStatus::Failed => "failed",
            ConversionStatus::Expired => "expired",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConversionSource {
    Api,
    AutomaticEvent,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConversionFailure {
    pub code: String,
    pub message: String,
    pub meta_code: Option<i64>,
    pub meta_subcode: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConversionRecord {
    pub account_id: String,
    pub event_name: String,
    pub event_id: String,
    pub conversation_id: String,
    pub event_time: i64,
    pub source: ConversionSource,
    pub dataset_id: String,
    /// The exact body sent to Meta (customer data only as hashes); the token is not in it.
    pub request_body: Value,
    pub status: ConversionStatus,
    pub attempts: u32,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
    /// When the outbox may try next; while a request is sending, a lease past its budget.
    pub next_attempt_at_ms: Option<i64>,
    pub events_received: i64,
    pub events_failed: i64,
    pub trace_id: Option<String>,
    pub duration_ms: u64,
    pub error: Option<ConversionFailure>,
    pub warnings: Vec<String>,
}

impl ConversionRecord {
    fn record_key(&self) -> Vec<u8> {
        key(&[&self.account_id, &self.event_name, &self.event_id])
    }
}

/// What [`Store::begin_conversion`] found.
pub enum Begin {
    /// The record is stored as queued; the caller sends it.
    Started,
    /// The same (account, event name, event id) is already sent or queued: nothing is sent.
    Existing(Box<ConversionRecord>),
}

fn index_key(first: &str, created_at_ms: i64, record_key: &[u8]) -> Vec<u8> {
    let mut index_key = prefix(&[first]);
    index_key.extend_from_slice(&created_at_ms.to_be_bytes());
    index_key.extend_from_slice(record_key);
    index_key
}

fn outbox_key(next_attempt_at_ms: i64, record_key: &[u8]) -> Vec<u8> {
    let mut outbox_key = next_attempt_at_ms.to_be_bytes().to_vec();
    outbox_key.extend_from_slice(record_key);
    outbox_key
}

/// Writes a record and keeps the indexes and the outbox in step with it.
fn put(
    trees: &Trees,
    record: &ConversionRecord,
    previous: Option<&ConversionRecord>,
) -> Result<(), StoreError> {
    let record_key = record.record_key();
    if let Some(previous) = previous {
        if let Some(at) = previous.next_attempt_at_ms {
            trees.outbox.remove(outbox_key(at, &record_key))?;
        }
        if previous.created_at_ms != record.created_at_ms {
            trees.conversion_history.remove(index_key(
                &previous.account_id,
                previous.created_at_ms,
                &record_key,
            ))?;
            trees.conversion_by_conversation.remove(index_key(
                &previous.conversation_id,
                previous.created_at_ms,
                &record_key,
            ))?;
        }
    }
    trees
        .conversion_records
        .insert(&record_key, encode(record)?)?;
    trees.conversion_history.insert(
        index_key(&record.account_id, record.created_at_ms, &record_key),
        record_key.as_slice(),
    )?;
    trees.conversion_by_conversation.insert(
        index_key(&record.conversation_id, record.created_at_ms, &record_key),
        record_key.as_slice(),
    )?;
    if let (ConversionStatus::Queued, Some(at)) = (record.status, record.next_attempt_at_ms) {
        trees.outbox.insert(outbox_key(at, &record_key), &[])?;
    }
    Ok(())
}

fn get(trees: &Trees, record_key: &[u8]) -> Result<Option<ConversionRecord>, StoreError> {
    trees
        .conversion_records
        .get(record_key)?
        .map(|bytes| decode(&bytes))
        .transpose()
}

fn newest_first(
    trees: &Trees,
    index: &sled::Tree,
    first: &str,
    limit: usize,
) -> Result<Vec<ConversionRecord>, StoreError> {
    let mut records = Vec::new();
    for item in index.scan_prefix(prefix(&[first])).rev() {
        if records.len() >= limit {
            break;
        }
        let (_, record_key) = item?;
        if let Some(record) = get(trees, &record_key)? {
            records.push(record);
        }
    }
    Ok(records)
}

impl Store {
    /// Records a conversion before it is sent, unless the same (account, event name, event id)
    /// is already sent or queued. A failed or expired one may be sent again.
    pub async fn begin_conversion(&self, record: ConversionRecord) -> Result<Begin, StoreError> {
        self.write(move |inner| {
            let previous = get(&inner.trees, &record.record_key())?;
            if let Some(previous) = &previous {
                if matches!(
                    previous.status,
                    ConversionStatus::Sent | ConversionStatus::Queued
                ) {
                    return Ok(Begin::Existing(Box::new(previous.clone())));
                }
            }
            put(&inner.trees, &record, previous.as_ref())?;
            Ok(Begin::Started)
        })
        .await
    }

    /// Stores a conversion's new state (an outcome, a new outbox time).
    pub async fn save_conversion(&self, record: ConversionRecord) -> Result<(), StoreError> {
        self.write(move |inner| {
            let previous = get(&inner.trees, &record.record_key())?;
            put(&inner.trees, &record, previous.as_ref())
        })
        .await
    }

    /// Queued conversions whose next attempt is due, oldest first.
    pub async fn due_conversions(
        &self,
        now_ms: i64,
        limit: usize,
    ) -> Result<Vec<ConversionRecord>, StoreError> {
        self.run(move |inner| {
            let trees = &inner.trees;
            let mut due = Vec::new();
            for item in trees.outbox.iter() {
                if due.len() >= limit {
                    break;
                }
                let (outbox_entry, _) = item?;
                if outbox_entry.len() < 8 {
                    return Err(StoreError::Corrupt("an outbox key is truncated".into()));
                }
                let at = i64::from_be_bytes(outbox_entry[..8].try_into().expect("eight bytes"));
                if at > now_ms {
                    break;
                }
                match get(trees, &outbox_entry[8..])? {
                    Some(record) if record.status == ConversionStatus::Queued => due.push(record),
                    // A stale entry (the record moved on): drop it.
                    _ => {
                        trees.outbox.remove(&outbox_entry)?;
                    }
                }
            }
            Ok(due)
        })
        .await
    }

    pub async fn outbox_depth(&self) -> Result<u64, StoreError> {
        self.run(|inner| Ok(inner.trees.outbox.len() as u64)).await
    }

    /// The account's conversions, newest first.
    pub async fn conversion_history(
        &self,
        account_id: String,
        limit: usize,
    ) -> Result<Vec<ConversionRecord>, StoreError> {
        self.run(move |inner| {
            newest_first(
                &inner.trees,
                &inner.trees.conversion_history,
                &account_id,
                limit,
            )
        })
        .await
    }

    /// A conversation's conversions, newest first.
    pub async fn conversions_of_conversation(
        &self,
        conversation_id: String,
        limit: usize,
    ) -> Result<Vec<ConversionRecord>, StoreError> {
        self.run(move |inner| {
            newest_first(
                &inner.trees,
                &inner.trees.conversion_by_conversation,
                &conversation_id,
                limit,
            )
        })
        .await
    }
}
