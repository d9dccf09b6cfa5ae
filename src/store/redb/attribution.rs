//! The webhook journal and the attribution state in redb, and the unit of work the ingest rules
//! run over. The keys are those of the sled store (`store/sled/attribution.rs`):
//! - `journal_v2` (layout 2): sequence (8 bytes BE) → receive time (8 bytes BE) ++ the raw body
//!   as one zstd frame ([`super::super::layout::encode_journal_entry`])
//! - `journal` (layout 1, a store from before layout 2 or carried over from sled): the same with
//!   the body uncompressed; read, pruned, never written
//! - `unparseable`: sequence → (), for bodies that are not webhooks
//! - `unrouted`: phone number id, NUL, sequence → (), for bodies held for a number without account
//! - `users`: account, user key → [`UserRecord`]
//! - `phone_index`: phone digits, account → user key
//! - `bsuid_index`: BSUID, account → user key
//! - `conversations`: conversation id → [`Conversation`]
//! - `messages`: account, wamid → message timestamp (8 bytes BE) ++ conversation id
//! - `pending_events`: account, wamid, event name → [`AutomaticEvent`] whose message is unseen
//!
//! A webhook's journal entry is written in the same unit as its attribution changes, so one
//! commit makes a batch of webhooks durable together with everything they changed.

use async_trait::async_trait;
use bytes::Bytes;
use redb::ReadTransaction;

use super::super::layout::{decode_journal_entry, encode_journal_entry, journal_received_at};
use super::unit::{TableName, Tx};
use super::{be_i64, decode, encode, key, prefix, scan_prefix, table, Store, StoreError};
use crate::attribution::{AutomaticEvent, Conversation};
use crate::domain::user::UserRecord;
use crate::ingest::IngestReport;
use crate::store::{
    AccountFilter, AttributionStore, AttributionUnit, JournaledWebhook, SeenMessage, UnitOfWork,
};

/// How many journal entries `prune_journal` reads at a time.
const PRUNE_PAGE: usize = 512;

/// Bodies up to this size are compressed on the caller's thread; larger ones on the blocking
/// pool. Never on the writer, whose time every webhook of a batch waits for.
const COMPRESS_INLINE_LIMIT: usize = 64 * 1024;

/// The journal tables, oldest layout first: (table, whether its bodies are compressed).
const JOURNALS: [(TableName, bool); 2] =
    [(TableName::Journal, false), (TableName::JournalV2, true)];

#[async_trait]
impl AttributionStore for Store {
    /// Appends the body to the journal and runs `apply` in one unit of the writer's next batch;
    /// returns once the batch is committed. When `apply` fails its writes are undone but the
    /// journal entry is kept (as the sled store keeps it), and its error is returned once the
    /// entry is durable.
    async fn record_webhook(
        &self,
        raw: Bytes,
        received_at: i64,
        apply: Option<UnitOfWork>,
    ) -> Result<(u64, IngestReport), StoreError> {
        let entry = if raw.len() <= COMPRESS_INLINE_LIMIT {
            encode_journal_entry(received_at, &raw)?
        } else {
            crate::telemetry::spawn_blocking_in_span(move || {
                encode_journal_entry(received_at, &raw)
            })
            .await
            .map_err(|_| StoreError::TaskGone)??
        };
        let outcome = self
            .unit(move |tx| {
                let seq = tx.next_journal_seq();
                tx.insert(TableName::JournalV2, seq.to_be_bytes(), entry)?;
                match apply {
                    Some(apply) => tx.undone_on_error(|tx| {
                        apply(&mut RedbUnit {
                            tx,
                            journal_seq: Some(seq),
                        })
                        .map(|report| (seq, report))
                    }),
                    None => {
                        tx.insert(TableName::Unparseable, seq.to_be_bytes(), [])?;
                        Ok(Ok((seq, IngestReport::default())))
                    }
                }
            })
            .await?;
        self.noted(outcome)
    }

    async fn attribution_unit(&self, work: UnitOfWork) -> Result<IngestReport, StoreError> {
        self.unit(move |tx| {
            work(&mut RedbUnit {
                tx,
                journal_seq: None,
            })
        })
        .await
    }

    async fn prune_journal(&self, cutoff: i64, limit: usize) -> Result<u64, StoreError> {
        self.unit(move |tx| {
            let mut held = std::collections::HashSet::new();
            for (unrouted_key, _) in tx.scan_prefix(TableName::Unrouted, b"")? {
                if unrouted_key.len() >= 8 {
                    held.insert(unrouted_key[unrouted_key.len() - 8..].to_vec());
                }
            }
            let mut removed = 0u64;
            for (journal, _) in JOURNALS {
                prune_table(tx, journal, cutoff, limit, &held, &mut removed)?;
            }
            Ok(removed)
        })
        .await
    }

    async fn conversation(&self, id: String) -> Result<Option<Conversation>, StoreError> {
        self.read_now(move |read| {
            let conversations = read.open_table(table(TableName::Conversations))?;
            let found = conversations.get(id.as_bytes())?;
            found.map(|bytes| decode(bytes.value())).transpose()
        })
    }

    async fn user(
        &self,
        account_id: String,
        user_key: String,
    ) -> Result<Option<UserRecord>, StoreError> {
        self.read_now(move |read| {
            let users = read.open_table(table(TableName::Users))?;
            let found = users.get(key(&[&account_id, &user_key]).as_slice())?;
            found.map(|bytes| decode(bytes.value())).transpose()
        })
    }

    async fn users_with_conversations(
        &self,
        phone: Option<String>,
        bsuid: Option<String>,
        visible: AccountFilter,
    ) -> Result<Vec<(UserRecord, Vec<Conversation>)>, StoreError> {
        self.read_now(move |read| {
            let mut user_keys: Vec<(String, String)> = Vec::new();
            let indexes = [
                (TableName::PhoneIndex, phone),
                (TableName::BsuidIndex, bsuid),
            ];
            for (index, id) in indexes {
                let Some(id) = id else { continue };
                let id_prefix = prefix(&[&id]);
                for (index_key, user_key) in
                    scan_prefix(&read.open_table(table(index))?, &id_prefix)?
                {
                    let account_id = String::from_utf8_lossy(&index_key[id_prefix.len()..]);
                    let user_key = String::from_utf8_lossy(&user_key).into_owned();
                    let pair = (account_id.into_owned(), user_key);
                    if visible(&pair.0) && !user_keys.contains(&pair) {
                        user_keys.push(pair);
                    }
                }
            }
            let users = read.open_table(table(TableName::Users))?;
            let mut results = Vec::new();
            for (account_id, user_key) in user_keys {
                let Some(bytes) = users.get(key(&[&account_id, &user_key]).as_slice())? else {
                    continue;
                };
                let user: UserRecord = decode(bytes.value())?;
                let mut conversations = load_conversations(read, user.conversation_ids())?;
                conversations
                    .sort_by_key(|conversation| std::cmp::Reverse(conversation.started_at));
                results.push((user, conversations));
            }
            Ok(results)
        })
    }

    async fn phone_conversations(
        &self,
        account_id: String,
        phone: String,
    ) -> Result<Option<Vec<Conversation>>, StoreError> {
        self.read_now(move |read| {
            let phone_index = read.open_table(table(TableName::PhoneIndex))?;
            let Some(user_key) = phone_index.get(key(&[&phone, &account_id]).as_slice())? else {
                return Ok(None);
            };
            let user_key = String::from_utf8_lossy(user_key.value()).into_owned();
            let users = read.open_table(table(TableName::Users))?;
            let Some(bytes) = users.get(key(&[&account_id, &user_key]).as_slice())? else {
                return Ok(None);
            };
            let user: UserRecord = decode(bytes.value())?;
            load_conversations(read, user.conversation_ids()).map(Some)
        })
    }
}

fn load_conversations(
    read: &ReadTransaction,
    ids: &[String],
) -> Result<Vec<Conversation>, StoreError> {
    let table = read.open_table(table(TableName::Conversations))?;
    let mut conversations = Vec::with_capacity(ids.len());
    for id in ids {
        if let Some(bytes) = table.get(id.as_bytes())? {
            conversations.push(decode(bytes.value())?);
        }
    }
    Ok(conversations)
}

/// Removes `journal`'s entries received before `cutoff` (arrival order: the first young one ends
/// the pass) that are not held for a number without an account, with their `unparseable` marks,
/// until `removed` reaches `limit`.
fn prune_table(
    tx: &mut Tx<'_>,
    journal: TableName,
    cutoff: i64,
    limit: usize,
    held: &std::collections::HashSet<Vec<u8>>,
    removed: &mut u64,
) -> Result<(), StoreError> {
    let mut start = Vec::new();
    loop {
        let page = tx.range_from(journal, &start, PRUNE_PAGE)?;
        let Some((last, _)) = page.last() else {
            return Ok(());
        };
        start = last.clone();
        start.push(0);
        let full = page.len() == PRUNE_PAGE;
        for (seq, entry) in page {
            if journal_received_at(&entry)? >= cutoff || *removed as usize >= limit {
                return Ok(());
            }
            if held.contains(&seq) {
                continue;
            }
            tx.remove(journal, &seq)?;
            tx.remove(TableName::Unparseable, &seq)?;
            *removed += 1;
        }
        if !full {
            return Ok(());
        }
    }
}

/// The attribution state as one unit of work sees it: the batch's write transaction.
struct RedbUnit<'u, 't> {
    tx: &'u mut Tx<'t>,
    /// The journal entry of the webhook this unit records, if it records one.
    journal_seq: Option<u64>,
}

impl RedbUnit<'_, '_> {
    fn user_by_index(
        &mut self,
        index: TableName,
        id: &str,
        account_id: &str,
    ) -> Result<Option<UserRecord>, StoreError> {
        let Some(user_key) = self.tx.get(index, &key(&[id, account_id]))? else {
            return Ok(None);
        };
        let user_key = String::from_utf8_lossy(&user_key).into_owned();
        match self
            .tx
            .get(TableName::Users, &key(&[account_id, &user_key]))?
        {
            Some(bytes) => Ok(Some(decode(&bytes)?)),
            None => Err(StoreError::Corrupt(format!(
                "an index points at missing user {user_key}"
            ))),
        }
    }
}

impl AttributionUnit for RedbUnit<'_, '_> {
    /// Read in the batch's transaction, so an account created earlier in the batch is found.
    fn account_for_number(&mut self, phone_number_id: &str) -> Option<String> {
        match self.tx.get(
            TableName::AccountByPhoneNumberId,
            phone_number_id.as_bytes(),
        ) {
            Ok(found) => found.map(|id| String::from_utf8_lossy(&id).into_owned()),
            Err(error) => {
                // The unit's next read or write meets the same failure and fails the unit.
                tracing::error!(error = %crate::error::error_chain(&error), "cannot read an account");
                None
            }
        }
    }

    fn hold_for_number(&mut self, phone_number_id: &str) -> Result<(), StoreError> {
        let seq = self.journal_seq.ok_or_else(|| {
            StoreError::Corrupt("only a unit that records a webhook can hold it".into())
        })?;
        let mut held_key = prefix(&[phone_number_id]);
        held_key.extend_from_slice(&seq.to_be_bytes());
        self.tx.insert(TableName::Unrouted, held_key, [])
    }

    fn take_held_for_number(
        &mut self,
        phone_number_id: &str,
    ) -> Result<Vec<JournaledWebhook>, StoreError> {
        let held_prefix = prefix(&[phone_number_id]);
        let mut held = Vec::new();
        for (held_key, _) in self.tx.scan_prefix(TableName::Unrouted, &held_prefix)? {
            let seq = &held_key[held_prefix.len()..];
            for (journal, compressed) in JOURNALS {
                if let Some(entry) = self.tx.get(journal, seq)? {
                    held.push(decode_journal_entry(&entry, compressed)?);
                    break;
                }
            }
            self.tx.remove(TableName::Unrouted, held_key)?;
        }
        Ok(held)
    }

    fn seen_message(
        &mut self,
        account_id: &str,
        message_id: &str,
    ) -> Result<Option<SeenMessage>, StoreError> {
        let Some(marker) = self
            .tx
            .get(TableName::Messages, &key(&[account_id, message_id]))?
        else {
            return Ok(None);
        };
        Ok(Some(SeenMessage {
            timestamp: be_i64(&marker, "a message marker")?,
            conversation_id: String::from_utf8_lossy(&marker[8..]).into_owned(),
        }))
    }

    fn mark_message_seen(
        &mut self,
        account_id: &str,
        message_id: &str,
        seen: &SeenMessage,
    ) -> Result<(), StoreError> {
        let mut marker = Vec::with_capacity(8 + seen.conversation_id.len());
        marker.extend_from_slice(&seen.timestamp.to_be_bytes());
        marker.extend_from_slice(seen.conversation_id.as_bytes());
        self.tx
            .insert(TableName::Messages, key(&[account_id, message_id]), marker)
    }

    fn user_by_phone(
        &mut self,
        account_id: &str,
        wa_id: &str,
    ) -> Result<Option<UserRecord>, StoreError> {
        self.user_by_index(TableName::PhoneIndex, wa_id, account_id)
    }

    fn user_by_bsuid(
        &mut self,
        account_id: &str,
        bsuid: &str,
    ) -> Result<Option<UserRecord>, StoreError> {
        self.user_by_index(TableName::BsuidIndex, bsuid, account_id)
    }

    fn put_user(&mut self, user: &UserRecord) -> Result<(), StoreError> {
        let user_key = key(&[user.account_id(), user.key()]);
        let previous: Option<UserRecord> = self
            .tx
            .get(TableName::Users, &user_key)?
            .map(|bytes| decode(&bytes))
            .transpose()?;
        let indexes = [
            (
                TableName::PhoneIndex,
                user.wa_id(),
                previous.as_ref().and_then(UserRecord::wa_id),
            ),
            (
                TableName::BsuidIndex,
                user.bsuid(),
                previous.as_ref().and_then(UserRecord::bsuid),
            ),
        ];
        for (index, id, indexed) in indexes {
            if let Some(id) = id {
                if Some(id) != indexed {
                    self.tx
                        .insert(index, key(&[id, user.account_id()]), user.key().as_bytes())?;
                }
            }
        }
        self.tx.insert(TableName::Users, user_key, encode(user)?)
    }

    fn conversation(&mut self, id: &str) -> Result<Option<Conversation>, StoreError> {
        self.tx
            .get(TableName::Conversations, id.as_bytes())?
            .map(|bytes| decode(&bytes))
            .transpose()
    }

    fn put_conversation(&mut self, conversation: &Conversation) -> Result<(), StoreError> {
        self.tx.insert(
            TableName::Conversations,
            conversation.id.as_bytes(),
            encode(conversation)?,
        )
    }

    fn hold_event(&mut self, account_id: &str, event: &AutomaticEvent) -> Result<bool, StoreError> {
        let held_key = key(&[account_id, &event.message_id, &event.event_name]);
        let known = self.tx.contains_key(TableName::PendingEvents, &held_key)?;
        self.tx
            .insert(TableName::PendingEvents, held_key, encode(event)?)?;
        Ok(!known)
    }

    fn take_held_events(
        &mut self,
        account_id: &str,
        message_id: &str,
    ) -> Result<Vec<AutomaticEvent>, StoreError> {
        let held_prefix = prefix(&[account_id, message_id]);
        let mut events = Vec::new();
        for (held_key, bytes) in self
            .tx
            .scan_prefix(TableName::PendingEvents, &held_prefix)?
        {
            events.push(decode(&bytes)?);
            self.tx.remove(TableName::PendingEvents, held_key)?;
        }
        Ok(events)
    }
}

#[cfg(test)]
mod tests {
    use redb::ReadableTableMetadata;

    use super::*;

    fn count(store: &Store, name: TableName) -> u64 {
        let read = store.inner.db.begin_read().unwrap();
        read.open_table(table(name)).unwrap().len().unwrap()
    }

    #[tokio::test]
    async fn a_webhook_whose_rules_fail_stays_journaled_and_its_changes_are_undone() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let failing: UnitOfWork = Box::new(|unit| {
            unit.put_conversation(&Conversation::open(
                "conv".into(),
                "acc".into(),
                "u".into(),
                1,
            ))?;
            Err(StoreError::Corrupt("a rule failed".into()))
        });
        let error = store
            .record_webhook(Bytes::from_static(b"{}"), 1, Some(failing))
            .await
            .unwrap_err();
        assert!(matches!(error, StoreError::Corrupt(_)), "{error}");
        assert_eq!(count(&store, TableName::JournalV2), 1);
        assert_eq!(count(&store, TableName::Conversations), 0);
        let (seq, _) = store
            .record_webhook(Bytes::from_static(b"not json"), 2, None)
            .await
            .unwrap();
        assert_eq!(seq, 1);
        assert_eq!(count(&store, TableName::JournalV2), 2);
        assert_eq!(count(&store, TableName::Unparseable), 1);
    }

    #[tokio::test]
    async fn a_layout_1_store_is_upgraded_and_its_uncompressed_journal_still_read_and_pruned() {
        let dir = tempfile::tempdir().unwrap();
        drop(Store::open(dir.path()).unwrap());
        // Make it a layout-1 store, as sled's or an older build's: raw bodies in `journal`.
        {
            let db = redb::Database::open(dir.path().join(super::super::DATABASE_FILE)).unwrap();
            let txn = db.begin_write().unwrap();
            txn.delete_table(table(TableName::JournalV2)).unwrap();
            {
                let mut journal = txn.open_table(table(TableName::Journal)).unwrap();
                for (seq, received_at, body) in [(0u64, 10i64, "held"), (1, 11, "old")] {
                    let mut entry = received_at.to_be_bytes().to_vec();
                    entry.extend_from_slice(body.as_bytes());
                    journal
                        .insert(seq.to_be_bytes().as_slice(), entry.as_slice())
                        .unwrap();
                }
                let mut held = prefix(&["pn"]);
                held.extend_from_slice(&0u64.to_be_bytes());
                txn.open_table(table(TableName::Unrouted))
                    .unwrap()
                    .insert(held.as_slice(), [].as_slice())
                    .unwrap();
                let mut meta = txn.open_table(table(TableName::Meta)).unwrap();
                meta.insert(super::super::LAYOUT_KEY, b"1".as_slice())
                    .unwrap();
                meta.insert(super::super::NEXT_SEQ_KEY, 2u64.to_be_bytes().as_slice())
                    .unwrap();
            }
            txn.commit().unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        let marker = std::fs::read_to_string(dir.path().join(crate::store::MARKER_FILE)).unwrap();
        assert!(marker.contains("\"layoutVersion\":2"), "{marker}");
        let (seq, _) = store
            .record_webhook(Bytes::from_static(b"new"), 12, None)
            .await
            .unwrap();
        assert_eq!(seq, 2);
        assert_eq!(count(&store, TableName::Journal), 2);
        assert_eq!(count(&store, TableName::JournalV2), 1);

        // Pruning reaches both journals: the old uncompressed entry goes, the held one stays.
        assert_eq!(store.prune_journal(20, 100).await.unwrap(), 2);
        assert_eq!(count(&store, TableName::Journal), 1);
        assert_eq!(count(&store, TableName::JournalV2), 0);
        let (taken, given) = std::sync::mpsc::channel();
        store
            .attribution_unit(Box::new(move |unit| {
                taken.send(unit.take_held_for_number("pn")?).unwrap();
                Ok(IngestReport::default())
            }))
            .await
            .unwrap();
        let held = given.recv().unwrap();
        assert_eq!(held.len(), 1);
        assert_eq!(
            (held[0].received_at, held[0].body.as_slice()),
            (10, b"held".as_slice())
        );
    }

    #[tokio::test]
    async fn journal_bodies_are_stored_compressed_and_replayed_whole() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let body = std::fs::read("fixtures/meta/wa_02_text_ctwa_referral.json").unwrap();
        store
            .record_webhook(Bytes::from(body.clone()), 5, None)
            .await
            .unwrap();
        let read = store.inner.db.begin_read().unwrap();
        let journal = read.open_table(table(TableName::JournalV2)).unwrap();
        let entry = journal.get(0u64.to_be_bytes().as_slice()).unwrap().unwrap();
        assert!(
            entry.value().len() < 8 + body.len(),
            "{} bytes",
            entry.value().len()
        );
        let decoded = decode_journal_entry(entry.value(), true).unwrap();
        assert_eq!((decoded.received_at, decoded.body), (5, body));
    }
}
