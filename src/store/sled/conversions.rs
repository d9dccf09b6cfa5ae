//! Conversion records, their history indexes and the outbox (sled).
//!
//! Keys (parts joined by NUL; `ms` is 8 bytes big-endian milliseconds):
//! - `conversion_records`: account, event name, event id → [`ConversionRecord`] (JSON)
//! - `conversion_history`: account, NUL, created ms ++ record key → record key
//! - `conversion_by_conversation`: conversation id, NUL, created ms ++ record key → record key
//! - `outbox`: next attempt ms ++ record key → (), for every queued record
//!
//! The record and its rules live in [`crate::domain::conversion_record`]; this file only keeps
//! records and their index entries in step. Every write method returns once durable.

use async_trait::async_trait;

use super::unit::{TreeName, Tx};
use super::{decode, encode, prefix, Store, StoreError, Trees};
use crate::domain::conversion_record::{Begin, ConversionRecord, ConversionStatus};
use crate::store::layout::{index_key, outbox_key, record_key};
use crate::store::ConversionStore;

/// Writes a record and keeps the indexes and the outbox in step with it, in one unit (one sled
/// transaction). `previous` is the record stored under the same key before.
///
/// Stores written by earlier builds, which wrote these trees one after another, can still hold
/// entries a crash left behind; the readers recognise them (their time no longer matches the
/// record) and skip them.
fn put(
    tx: &mut Tx<'_>,
    record: &ConversionRecord,
    previous: Option<&ConversionRecord>,
) -> Result<(), StoreError> {
    let record_key = record_key(record);
    let created_at_ms = record.created_at_ms();
    let outbox_entry = match (record.status(), record.next_attempt_at_ms()) {
        (ConversionStatus::Queued, Some(at)) => Some(outbox_key(at, &record_key)),
        _ => None,
    };
    if let Some(previous) = previous {
        if let Some(at) = previous.next_attempt_at_ms() {
            let previous_entry = outbox_key(at, &record_key);
            if outbox_entry.as_ref() != Some(&previous_entry) {
                tx.remove(TreeName::Outbox, previous_entry);
            }
        }
        if previous.created_at_ms() != created_at_ms {
            tx.remove(
                TreeName::ConversionHistory,
                index_key(previous.account_id(), previous.created_at_ms(), &record_key),
            );
            tx.remove(
                TreeName::ConversionByConversation,
                index_key(
                    previous.conversation_id(),
                    previous.created_at_ms(),
                    &record_key,
                ),
            );
        }
    }
    tx.insert(
        TreeName::ConversionHistory,
        index_key(record.account_id(), created_at_ms, &record_key),
        record_key.clone(),
    );
    tx.insert(
        TreeName::ConversionByConversation,
        index_key(record.conversation_id(), created_at_ms, &record_key),
        record_key.clone(),
    );
    if let Some(entry) = outbox_entry {
        tx.insert(TreeName::Outbox, entry, Vec::new());
    }
    tx.insert(TreeName::ConversionRecords, record_key, encode(record)?);
    Ok(())
}

fn stored(tx: &Tx<'_>, record_key: &[u8]) -> Result<Option<ConversionRecord>, StoreError> {
    tx.get(TreeName::ConversionRecords, record_key)?
        .map(|bytes| decode(&bytes))
        .transpose()
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
            Some(record) if Some(record.created_at_ms()) == created_at_ms => records.push(record),
            _ => {}
        }
    }
    Ok(records)
}

#[async_trait]
impl ConversionStore for Store {
    /// Records a conversion before it is sent, as [`ConversionRecord::begin`] decides against
    /// the record already stored under its key. Returns once what it answers is durable (also an
    /// existing record, which a concurrent request may have written a moment ago).
    async fn begin_conversion(&self, record: ConversionRecord) -> Result<Begin, StoreError> {
        self.commit(move |tx| {
            let previous = stored(tx, &record_key(&record))?;
            let begin = record.begin(previous.as_ref());
            if let Begin::Started(started) = &begin {
                put(tx, started, previous.as_ref())?;
            }
            Ok(begin)
        })
        .await
    }

    /// Stores a conversion's new state (an attempt in flight, an outcome, a new outbox time);
    /// returns once it is durable.
    async fn save_conversion(&self, record: ConversionRecord) -> Result<(), StoreError> {
        self.commit(move |tx| {
            let previous = stored(tx, &record_key(&record))?;
            put(tx, &record, previous.as_ref())
        })
        .await
    }

    /// Queued conversions whose next attempt is due, oldest first.
    async fn due_conversions(
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
                        if record.status() == ConversionStatus::Queued
                            && record.next_attempt_at_ms() == Some(at) =>
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

    async fn outbox_depth(&self) -> Result<u64, StoreError> {
        self.run(|inner| Ok(inner.trees.outbox.len() as u64)).await
    }

    /// The account's conversions, newest first.
    async fn conversion_history(
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
    async fn conversions_of_conversation(
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
    use std::time::Duration;

    use serde_json::Value;

    use super::*;
    use crate::domain::conversion_record::{ConversionSource, NewConversion};

    /// A queued record created at `created_at_ms`, due next at `next`.
    fn record(created_at_ms: i64, next: i64) -> ConversionRecord {
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
        let lease = Duration::from_millis((next - created_at_ms) as u64);
        record.start_attempt(created_at_ms, lease, false);
        record
    }

    fn put_alone(store: &Store, record: &ConversionRecord) {
        let mut tx = Tx::new(&store.inner);
        put(&mut tx, record, None).unwrap();
        tx.apply().unwrap();
    }

    /// What an earlier build's crash between its writes could leave behind: the new entries and
    /// the record written, the previous record's entries not yet removed.
    #[tokio::test]
    async fn entries_a_crash_left_behind_are_skipped_not_served() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_with_free_space(dir.path(), 0).unwrap();
        let previous = record(1_000, 1_500);
        let current = record(2_000, 50_000);
        put_alone(&store, &previous);
        // The new write, cut off before the previous entries were removed.
        put_alone(&store, &current);
        let trees = &store.inner.trees;
        assert_eq!(trees.outbox.len(), 2);

        assert!(store.due_conversions(10_000, 10).await.unwrap().is_empty());
        assert_eq!(trees.outbox.len(), 1, "the stale outbox entry is dropped");
        let due = store.due_conversions(60_000, 10).await.unwrap();
        assert_eq!(due, vec![current.clone()]);
        let history = store.conversion_history("acc".into(), 10).await.unwrap();
        assert_eq!(history, vec![current]);
    }

    /// `begin_conversion` keeps one record per key, and its entries follow the record.
    #[tokio::test]
    async fn a_retry_replaces_the_failed_record_and_its_entries() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_with_free_space(dir.path(), 0).unwrap();
        let mut failed = record(1_000, 1_500);
        failed.account_gone(1_200);
        assert!(matches!(
            store.begin_conversion(failed).await.unwrap(),
            Begin::Started(_)
        ));
        assert_eq!(store.outbox_depth().await.unwrap(), 0);
        let retry = record(2_000, 3_000);
        let Begin::Started(started) = store.begin_conversion(retry).await.unwrap() else {
            panic!("a failed record may be sent again");
        };
        assert_eq!(started.attempts(), 2);
        assert_eq!(store.outbox_depth().await.unwrap(), 1);
        let history = store.conversion_history("acc".into(), 10).await.unwrap();
        assert_eq!(history, vec![*started.clone()]);
        let of_conversation = store
            .conversions_of_conversation("conv".into(), 10)
            .await
            .unwrap();
        assert_eq!(of_conversation, vec![*started.clone()]);
        // Queued now: a repeat is answered from the record.
        let Begin::Existing(existing) = store.begin_conversion(record(4_000, 5_000)).await.unwrap()
        else {
            panic!("a queued record wins over a repeat");
        };
        assert_eq!(existing, started);
    }
}
