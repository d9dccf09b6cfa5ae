//! Conversion records, their history indexes and the outbox in redb. The keys are those of the
//! sled store (`store/sled/conversions.rs`; `ms` is 8 bytes big-endian milliseconds):
//! - `conversion_records`: account, event name, event id → [`ConversionRecord`] (JSON)
//! - `conversion_history`: account, NUL, created ms ++ record key → record key
//! - `conversion_by_conversation`: conversation id, NUL, created ms ++ record key → record key
//! - `outbox`: next attempt ms ++ record key → (), for every queued record
//!
//! A record and its index entries are written in one unit, so they never disagree; the readers
//! still skip entries that do not match their record, which a store carried over from sled may
//! hold.

use async_trait::async_trait;
use redb::{ReadTransaction, ReadableTable, ReadableTableMetadata};

use super::unit::{TableName, Tx};
use super::{be_i64, decode, encode, prefix, table, Store, StoreError};
use crate::domain::conversion_record::{Begin, ConversionRecord, ConversionStatus};
use crate::store::layout::{index_key, outbox_key, record_key};
use crate::store::ConversionStore;

/// Writes a record and keeps the indexes and the outbox in step with it. `previous` is the
/// record stored under the same key before.
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
                tx.remove(TableName::Outbox, previous_entry)?;
            }
        }
        if previous.created_at_ms() != created_at_ms {
            tx.remove(
                TableName::ConversionHistory,
                index_key(previous.account_id(), previous.created_at_ms(), &record_key),
            )?;
            tx.remove(
                TableName::ConversionByConversation,
                index_key(
                    previous.conversation_id(),
                    previous.created_at_ms(),
                    &record_key,
                ),
            )?;
        }
    }
    tx.insert(
        TableName::ConversionHistory,
        index_key(record.account_id(), created_at_ms, &record_key),
        &record_key,
    )?;
    tx.insert(
        TableName::ConversionByConversation,
        index_key(record.conversation_id(), created_at_ms, &record_key),
        &record_key,
    )?;
    if let Some(entry) = outbox_entry {
        tx.insert(TableName::Outbox, entry, [])?;
    }
    tx.insert(TableName::ConversionRecords, record_key, encode(record)?)
}

fn stored(tx: &mut Tx<'_>, record_key: &[u8]) -> Result<Option<ConversionRecord>, StoreError> {
    tx.get(TableName::ConversionRecords, record_key)?
        .map(|bytes| decode(&bytes))
        .transpose()
}

/// True when the outbox entry (`at`, `record`) is the record's current one.
fn is_due_entry(record: Option<&ConversionRecord>, at: i64) -> bool {
    matches!(record, Some(record)
        if record.status() == ConversionStatus::Queued && record.next_attempt_at_ms() == Some(at))
}

fn newest_first(
    read: &ReadTransaction,
    index: TableName,
    first: &str,
    limit: usize,
) -> Result<Vec<ConversionRecord>, StoreError> {
    let index = read.open_table(table(index))?;
    let records_table = read.open_table(table(TableName::ConversionRecords))?;
    let start = prefix(&[first]);
    // Every key with this prefix sorts below the prefix whose NUL became 1.
    let mut end = start.clone();
    *end.last_mut().expect("a prefix ends with NUL") = 1;
    let mut records = Vec::new();
    for item in index
        .range::<&[u8]>(start.as_slice()..end.as_slice())?
        .rev()
    {
        if records.len() >= limit {
            break;
        }
        let (entry, record_key) = item?;
        let created_at_ms = entry
            .value()
            .get(start.len()..start.len() + 8)
            .map(|ms| i64::from_be_bytes(ms.try_into().expect("eight bytes")));
        let Some(bytes) = records_table.get(record_key.value())? else {
            continue;
        };
        let record: ConversionRecord = decode(bytes.value())?;
        // An entry that is not this record's (a store carried over from sled may hold them).
        if Some(record.created_at_ms()) == created_at_ms {
            records.push(record);
        }
    }
    Ok(records)
}

#[async_trait]
impl ConversionStore for Store {
    /// Records a conversion before it is sent, as [`ConversionRecord::begin`] decides against
    /// the record already stored under its key; durable before it returns.
    async fn begin_conversion(&self, record: ConversionRecord) -> Result<Begin, StoreError> {
        self.unit(move |tx| {
            let previous = stored(tx, &record_key(&record))?;
            let begin = record.begin(previous.as_ref());
            if let Begin::Started(started) = &begin {
                put(tx, started, previous.as_ref())?;
            }
            Ok(begin)
        })
        .await
    }

    async fn save_conversion(&self, record: ConversionRecord) -> Result<(), StoreError> {
        self.unit(move |tx| {
            let previous = stored(tx, &record_key(&record))?;
            put(tx, &record, previous.as_ref())
        })
        .await
    }

    /// Queued conversions whose next attempt is due, oldest first. Stale outbox entries met on
    /// the way (their record moved on) are removed in a unit afterwards.
    async fn due_conversions(
        &self,
        now_ms: i64,
        limit: usize,
    ) -> Result<Vec<ConversionRecord>, StoreError> {
        let (due, stale) = self
            .read(move |read| {
                let outbox = read.open_table(table(TableName::Outbox))?;
                let records = read.open_table(table(TableName::ConversionRecords))?;
                let mut due = Vec::new();
                let mut stale = Vec::new();
                for item in outbox.iter()? {
                    if due.len() >= limit {
                        break;
                    }
                    let (outbox_entry, _) = item?;
                    let outbox_entry = outbox_entry.value();
                    let at = be_i64(outbox_entry, "an outbox key")?;
                    if at > now_ms {
                        break;
                    }
                    let record: Option<ConversionRecord> = records
                        .get(&outbox_entry[8..])?
                        .map(|bytes| decode(bytes.value()))
                        .transpose()?;
                    match is_due_entry(record.as_ref(), at) {
                        true => due.push(record.expect("a due entry has its record")),
                        false => stale.push(outbox_entry.to_vec()),
                    }
                }
                Ok((due, stale))
            })
            .await?;
        if !stale.is_empty() {
            self.unit(move |tx| {
                for entry in stale {
                    let at = be_i64(&entry, "an outbox key")?;
                    if !is_due_entry(stored(tx, &entry[8..])?.as_ref(), at) {
                        tx.remove(TableName::Outbox, &entry)?;
                    }
                }
                Ok(())
            })
            .await?;
        }
        Ok(due)
    }

    async fn outbox_depth(&self) -> Result<u64, StoreError> {
        self.read(|read| Ok(read.open_table(table(TableName::Outbox))?.len()?))
            .await
    }

    async fn conversion_history(
        &self,
        account_id: String,
        limit: usize,
    ) -> Result<Vec<ConversionRecord>, StoreError> {
        self.read_now(move |read| {
            newest_first(read, TableName::ConversionHistory, &account_id, limit)
        })
    }

    async fn conversions_of_conversation(
        &self,
        conversation_id: String,
        limit: usize,
    ) -> Result<Vec<ConversionRecord>, StoreError> {
        self.read_now(move |read| {
            newest_first(
                read,
                TableName::ConversionByConversation,
                &conversation_id,
                limit,
            )
        })
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

    /// What a crash between sled's separate writes could leave in a carried-over store: the new
    /// entries and the record, the previous record's entries not yet removed.
    #[tokio::test]
    async fn entries_that_are_not_their_records_are_skipped_not_served() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let previous = record(1_000, 1_500);
        let current = record(2_000, 50_000);
        for written in [previous, current.clone()] {
            store.unit(move |tx| put(tx, &written, None)).await.unwrap();
        }
        assert_eq!(store.outbox_depth().await.unwrap(), 2);
        assert!(store.due_conversions(10_000, 10).await.unwrap().is_empty());
        assert_eq!(
            store.outbox_depth().await.unwrap(),
            1,
            "the stale entry went"
        );
        let due = store.due_conversions(60_000, 10).await.unwrap();
        assert_eq!(due, vec![current.clone()]);
        let history = store.conversion_history("acc".into(), 10).await.unwrap();
        assert_eq!(history, vec![current]);
    }

    #[tokio::test]
    async fn a_retry_replaces_the_failed_record_and_its_entries() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut failed = record(1_000, 1_500);
        failed.account_gone(1_200);
        assert!(matches!(
            store.begin_conversion(failed).await.unwrap(),
            Begin::Started(_)
        ));
        assert_eq!(store.outbox_depth().await.unwrap(), 0);
        let Begin::Started(started) = store.begin_conversion(record(2_000, 3_000)).await.unwrap()
        else {
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
        let Begin::Existing(existing) = store.begin_conversion(record(4_000, 5_000)).await.unwrap()
        else {
            panic!("a queued record wins over a repeat");
        };
        assert_eq!(existing, started);
    }
}
