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
    /// Meta may have taken it but never said so (its answer was lost twice, or could not be
    /// read): never sent again automatically; an operator checks Events Manager.
    Unknown,
}

impl ConversionStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            ConversionStatus::Queued => "queued",
            ConversionStatus::Sent => "sent",
            ConversionStatus::Failed => "failed",
            ConversionStatus::Expired => "expired",
            ConversionStatus::Unknown => "unknown",
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
    /// Graph calls started for this record, by requests and the outbox.
    pub attempts: u32,
    /// Graph calls started by the outbox; its backoff doubles with these only.
    #[serde(default)]
    pub outbox_attempts: u32,
    /// Set (durably) just before a Graph call and cleared with its outcome: a record found with
    /// it set and its lease passed was cut off mid-send, so Meta may have it.
    #[serde(default)]
    pub in_flight_since_ms: Option<i64>,
    /// Attempts whose outcome stayed unknown (cut off, timed out, connection broken).
    #[serde(default)]
    pub unknown_outcomes: u32,
    /// Sent again after an attempt with an unknown outcome: Meta may count it twice.
    #[serde(default)]
    pub possible_duplicate: bool,
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

/// A conversion as its source describes it, before any attempt.
pub struct NewConversion {
    pub account_id: String,
    pub event_name: String,
    pub event_id: String,
    pub conversation_id: String,
    pub event_time: i64,
    pub source: ConversionSource,
    pub dataset_id: String,
    pub request_body: Value,
    pub warnings: Vec<String>,
}

impl ConversionRecord {
    /// A new queued record, due at once.
    pub fn queued(new: NewConversion, now_ms: i64) -> Self {
        Self {
            account_id: new.account_id,
            event_name: new.event_name,
            event_id: new.event_id,
            conversation_id: new.conversation_id,
            event_time: new.event_time,
            source: new.source,
            dataset_id: new.dataset_id,
            request_body: new.request_body,
            status: ConversionStatus::Queued,
            attempts: 0,
            outbox_attempts: 0,
            in_flight_since_ms: None,
            unknown_outcomes: 0,
            possible_duplicate: false,
            created_at_ms: now_ms,
            updated_at_ms: now_ms,
            next_attempt_at_ms: Some(now_ms),
            events_received: 0,
            events_failed: 0,
            trace_id: None,
            duration_ms: 0,
            error: None,
            warnings: new.warnings,
        }
    }

    /// A new try of an event whose earlier record failed or expired. Meta may still hold a copy
    /// from an earlier attempt whose outcome was unknown, so the attempts, that count and the
    /// `possibleDuplicate` flag carry over: the try is flagged, and one more unknown outcome
    /// makes it `unknown` at once.
    fn continue_from(&mut self, previous: &ConversionRecord) {
        self.attempts += previous.attempts;
        self.unknown_outcomes = previous.unknown_outcomes;
        self.possible_duplicate = previous.possible_duplicate || previous.unknown_outcomes > 0;
    }

    fn record_key(&self) -> Vec<u8> {
        key(&[&self.account_id, &self.event_name, &self.event_id])
    }
}

/// What [`Store::begin_conversion`] found.
pub enum Begin {
    /// The record is stored as queued (continuing a failed or expired one with the same key);
    /// the caller sends it.
    Started(Box<ConversionRecord>),
    /// The same (account, event name, event id) is already sent, queued or of unknown outcome:
    /// nothing is sent.
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
///
/// The trees are written one after another, and a crash can keep any prefix of those writes, so
/// the order matters: the new index and outbox entries first, then the record, then the removal
/// of the previous record's entries. A crash can then leave only stale entries, which the readers
/// recognise (their time no longer matches the record) and skip, never a queued record the outbox
/// cannot find.
fn put(
    trees: &Trees,
    record: &ConversionRecord,
    previous: Option<&ConversionRecord>,
) -> Result<(), StoreError> {
    let record_key = record.record_key();
    let history_key = index_key(&record.account_id, record.created_at_ms, &record_key);
    let conversation_key = index_key(&record.conversation_id, record.created_at_ms, &record_key);
    let outbox_entry = match (record.status, record.next_attempt_at_ms) {
        (ConversionStatus::Queued, Some(at)) => Some(outbox_key(at, &record_key)),
        _ => None,
    };
    trees
        .conversion_history
        .insert(history_key.as_slice(), record_key.as_slice())?;
    trees
        .conversion_by_conversation
        .insert(conversation_key.as_slice(), record_key.as_slice())?;
    if let Some(entry) = &outbox_entry {
        trees.outbox.insert(entry.as_slice(), &[])?;
    }
    trees
        .conversion_records
        .insert(&record_key, encode(record)?)?;
    let Some(previous) = previous else {
        return Ok(());
    };
    if let Some(at) = previous.next_attempt_at_ms {
        let previous_entry = outbox_key(at, &record_key);
        if outbox_entry.as_ref() != Some(&previous_entry) {
            trees.outbox.remove(previous_entry)?;
        }
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
    let start = prefix(&[first]);
    for item in index.scan_prefix(&start).rev() {
        if records.len() >= limit {
            break;
        }
        let (entry, record_key) = item?;
        let created_at_ms = entry
            .get(start.len()..start.len() + 8)
            .map(|ms| i64::from_be_bytes(ms.try_into().expect("eight bytes")));
        match get(trees, &record_key)? {
            // An entry left by a crash before the previous one's removal: not this record's.
            Some(record) if Some(record.created_at_ms) == created_at_ms => records.push(record),
            _ => {}
        }
    }
    Ok(records)
}

impl Store {
    /// Records a conversion before it is sent, unless the same (account, event name, event id)
    /// is already sent, queued or of unknown outcome. A failed or expired one may be sent again.
    /// The caller makes the record durable before it sends.
    pub async fn begin_conversion(
        &self,
        mut record: ConversionRecord,
    ) -> Result<Begin, StoreError> {
        self.write(move |inner| {
            let previous = get(&inner.trees, &record.record_key())?;
            if let Some(previous) = &previous {
                if matches!(
                    previous.status,
                    ConversionStatus::Sent | ConversionStatus::Queued | ConversionStatus::Unknown
                ) {
                    return Ok(Begin::Existing(Box::new(previous.clone())));
                }
                record.continue_from(previous);
            }
            put(&inner.trees, &record, previous.as_ref())?;
            Ok(Begin::Started(Box::new(record)))
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
                    Some(record)
                        if record.status == ConversionStatus::Queued
                            && record.next_attempt_at_ms == Some(at) =>
                    {
                        due.push(record)
                    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn record(status: ConversionStatus, created_at_ms: i64, next: Option<i64>) -> ConversionRecord {
        let mut record = ConversionRecord::queued(
            NewConversion {
                account_id: "acc".into(),
                event_name: "Purchase".into(),
                event_id: "e1".into(),
                conversation_id: "conv".into(),
                event_time: 0,
                source: ConversionSource::Api,
                dataset_id: "ds".into(),
                request_body: Value::Null,
                warnings: Vec::new(),
            },
            created_at_ms,
        );
        record.status = status;
        record.next_attempt_at_ms = next;
        record
    }

    /// What a crash between `put`'s writes can leave behind: the new entries and the record
    /// written, the previous record's entries not yet removed.
    #[tokio::test]
    async fn entries_a_crash_left_behind_are_skipped_not_served() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_with_free_space(dir.path(), 0).unwrap();
        let previous = record(ConversionStatus::Failed, 1_000, Some(1_500));
        let current = record(ConversionStatus::Queued, 2_000, Some(50_000));
        let trees = &store.inner.trees;
        put(trees, &previous, None).unwrap();
        trees
            .outbox
            .insert(outbox_key(1_500, &previous.record_key()), &[])
            .unwrap();
        // The new write, cut off before the previous entries were removed.
        put(trees, &current, None).unwrap();

        assert!(store.due_conversions(10_000, 10).await.unwrap().is_empty());
        assert_eq!(trees.outbox.len(), 1, "the stale outbox entry is dropped");
        let due = store.due_conversions(60_000, 10).await.unwrap();
        assert_eq!(due, vec![current.clone()]);
        let history = store.conversion_history("acc".into(), 10).await.unwrap();
        assert_eq!(history, vec![current]);
    }
}
