//! The webhook journal and the attribution state in sled, and the unit of work the ingest
//! rules run over.
//!
//! Keys (parts joined by NUL):
//! - `journal`: sequence (8 bytes BE) → receive time (8 bytes BE) ++ raw body
//! - `unparseable`: sequence → (), for bodies that are not webhooks
//! - `unrouted`: phone number id, NUL, sequence → (), for bodies held for a number without account
//! - `users`: account, user key → [`UserRecord`]
//! - `phone_index`: phone digits, account → user key
//! - `bsuid_index`: BSUID, account → user key
//! - `conversations`: conversation id → [`Conversation`]
//! - `messages`: account, wamid → message timestamp (8 bytes BE) ++ conversation id
//! - `pending_events`: account, wamid, event name → [`AutomaticEvent`] whose message is unseen

use async_trait::async_trait;
use bytes::Bytes;

use super::unit::{TreeName, Tx};
use super::{decode, encode, key, prefix, Store, StoreError, Trees};
use crate::attribution::{AutomaticEvent, Conversation};
use crate::domain::user::UserRecord;
use crate::ingest::IngestReport;
use crate::store::{
    AccountFilter, AttributionStore, AttributionUnit, JournaledWebhook, SeenMessage, UnitOfWork,
};

#[async_trait]
impl AttributionStore for Store {
    /// Journals a verified body and runs `apply` in the same unit on the writer thread (one sled
    /// transaction), then waits for it to be durable. If the rules fail, only their writes are
    /// undone: the body stays journaled (it can be replayed once the cause is fixed) and the
    /// caller gets the error, so Meta is answered 5xx and redelivers. Every write of a unit is on
    /// the writer thread, so the sled transactions never wait for plain writes made elsewhere.
    async fn record_webhook(
        &self,
        raw: Bytes,
        received_at: i64,
        apply: Option<UnitOfWork>,
    ) -> Result<(u64, IngestReport), StoreError> {
        let recorded = self
            .commit(move |tx| {
                let seq = tx.trees().db.generate_id()?;
                let mut entry = Vec::with_capacity(8 + raw.len());
                entry.extend_from_slice(&received_at.to_be_bytes());
                entry.extend_from_slice(&raw);
                tx.insert(TreeName::Journal, seq.to_be_bytes(), entry);
                let Some(apply) = apply else {
                    tx.insert(TreeName::Unparseable, seq.to_be_bytes(), Vec::new());
                    return Ok(Ok((seq, IngestReport::default())));
                };
                let journaled = tx.savepoint();
                let applied = apply(&mut SledUnit {
                    tx,
                    journal_seq: Some(seq),
                });
                if applied.is_err() {
                    tx.rollback_to(journaled);
                }
                Ok(applied.map(|report| (seq, report)))
            })
            .await?;
        recorded
    }

    async fn attribution_unit(&self, work: UnitOfWork) -> Result<IngestReport, StoreError> {
        self.commit(move |tx| {
            work(&mut SledUnit {
                tx,
                journal_seq: None,
            })
        })
        .await
    }

    async fn prune_journal(&self, cutoff: i64, limit: usize) -> Result<u64, StoreError> {
        let removed = self
            .run(move |inner| {
                let trees = &inner.trees;
                let mut held = std::collections::HashSet::new();
                for item in trees.unrouted.iter() {
                    let (unrouted_key, _) = item?;
                    if unrouted_key.len() >= 8 {
                        held.insert(unrouted_key[unrouted_key.len() - 8..].to_vec());
                    }
                }
                let mut removed = 0;
                for item in trees.journal.iter() {
                    let (seq, entry) = item?;
                    if entry.len() < 8 {
                        return Err(StoreError::Corrupt("a journal entry is truncated".into()));
                    }
                    let received_at =
                        i64::from_be_bytes(entry[..8].try_into().expect("eight bytes"));
                    // Entries are in arrival order: the first young one ends the pass.
                    if received_at >= cutoff || removed as usize >= limit {
                        break;
                    }
                    if held.contains(seq.as_ref()) {
                        continue;
                    }
                    trees.journal.remove(&seq)?;
                    trees.unparseable.remove(&seq)?;
                    removed += 1;
                }
                Ok(removed)
            })
            .await?;
        self.durable().await?;
        Ok(removed)
    }

    async fn conversation(&self, id: String) -> Result<Option<Conversation>, StoreError> {
        self.run(move |inner| {
            inner
                .trees
                .conversations
                .get(id.as_bytes())?
                .map(|bytes| decode(&bytes))
                .transpose()
        })
        .await
    }

    async fn user(
        &self,
        account_id: String,
        user_key: String,
    ) -> Result<Option<UserRecord>, StoreError> {
        self.run(move |inner| {
            inner
                .trees
                .users
                .get(key(&[&account_id, &user_key]))?
                .map(|bytes| decode(&bytes))
                .transpose()
        })
        .await
    }

    async fn users_with_conversations(
        &self,
        phone: Option<String>,
        bsuid: Option<String>,
        visible: AccountFilter,
    ) -> Result<Vec<(UserRecord, Vec<Conversation>)>, StoreError> {
        self.run(move |inner| {
            let trees = &inner.trees;
            let mut user_keys: Vec<(String, String)> = Vec::new();
            let indexes = [(&trees.phone_index, phone), (&trees.bsuid_index, bsuid)];
            for (index, id) in indexes {
                let Some(id) = id else { continue };
                let id_prefix = prefix(&[&id]);
                for item in index.scan_prefix(&id_prefix) {
                    let (index_key, user_key) = item?;
                    let account_id = String::from_utf8_lossy(&index_key[id_prefix.len()..]);
                    let user_key = String::from_utf8_lossy(&user_key).into_owned();
                    let pair = (account_id.into_owned(), user_key);
                    if visible(&pair.0) && !user_keys.contains(&pair) {
                        user_keys.push(pair);
                    }
                }
            }
            let mut results = Vec::new();
            for (account_id, user_key) in user_keys {
                let Some(bytes) = trees.users.get(key(&[&account_id, &user_key]))? else {
                    continue;
                };
                let user: UserRecord = decode(&bytes)?;
                let mut conversations = load_conversations(trees, user.conversation_ids())?;
                conversations
                    .sort_by_key(|conversation| std::cmp::Reverse(conversation.started_at));
                results.push((user, conversations));
            }
            Ok(results)
        })
        .await
    }

    async fn phone_conversations(
        &self,
        account_id: String,
        phone: String,
    ) -> Result<Option<Vec<Conversation>>, StoreError> {
        self.run(move |inner| {
            let trees = &inner.trees;
            let Some(user_key) = trees.phone_index.get(key(&[&phone, &account_id]))? else {
                return Ok(None);
            };
            let user_key = String::from_utf8_lossy(&user_key).into_owned();
            let Some(bytes) = trees.users.get(key(&[&account_id, &user_key]))? else {
                return Ok(None);
            };
            let user: UserRecord = decode(&bytes)?;
            load_conversations(trees, user.conversation_ids()).map(Some)
        })
        .await
    }
}

fn load_conversations(trees: &Trees, ids: &[String]) -> Result<Vec<Conversation>, StoreError> {
    let mut conversations = Vec::with_capacity(ids.len());
    for id in ids {
        if let Some(bytes) = trees.conversations.get(id.as_bytes())? {
            conversations.push(decode(&bytes)?);
        }
    }
    Ok(conversations)
}

fn journal_entry(entry: &[u8]) -> Result<JournaledWebhook, StoreError> {
    if entry.len() < 8 {
        return Err(StoreError::Corrupt("a journal entry is truncated".into()));
    }
    Ok(JournaledWebhook {
        received_at: i64::from_be_bytes(entry[..8].try_into().expect("eight bytes")),
        body: entry[8..].to_vec(),
    })
}

/// The attribution state as one unit of work sees it.
struct SledUnit<'u, 'a> {
    tx: &'u mut Tx<'a>,
    /// The journal entry of the webhook this unit records, if it records one.
    journal_seq: Option<u64>,
}

impl SledUnit<'_, '_> {
    fn user_by_index(
        &mut self,
        index: TreeName,
        id: &str,
        account_id: &str,
    ) -> Result<Option<UserRecord>, StoreError> {
        let Some(user_key) = self.tx.get(index, &key(&[id, account_id]))? else {
            return Ok(None);
        };
        let user_key = String::from_utf8_lossy(&user_key).into_owned();
        match self
            .tx
            .get(TreeName::Users, &key(&[account_id, &user_key]))?
        {
            Some(bytes) => Ok(Some(decode(&bytes)?)),
            None => Err(StoreError::Corrupt(format!(
                "an index points at missing user {user_key}"
            ))),
        }
    }
}

impl AttributionUnit for SledUnit<'_, '_> {
    fn account_for_number(&mut self, phone_number_id: &str) -> Option<String> {
        let caches = self.tx.inner.caches.read().expect("cache lock poisoned");
        caches
            .account_by_phone_number_id
            .get(phone_number_id)
            .cloned()
    }

    fn hold_for_number(&mut self, phone_number_id: &str) -> Result<(), StoreError> {
        let seq = self.journal_seq.ok_or_else(|| {
            StoreError::Corrupt("only a unit that records a webhook can hold it".into())
        })?;
        let mut held_key = prefix(&[phone_number_id]);
        held_key.extend_from_slice(&seq.to_be_bytes());
        self.tx.insert(TreeName::Unrouted, held_key, Vec::new());
        Ok(())
    }

    fn take_held_for_number(
        &mut self,
        phone_number_id: &str,
    ) -> Result<Vec<JournaledWebhook>, StoreError> {
        let held_prefix = prefix(&[phone_number_id]);
        let mut held = Vec::new();
        for (held_key, _) in self.tx.scan_prefix(TreeName::Unrouted, &held_prefix)? {
            let seq = &held_key[held_prefix.len()..];
            if let Some(entry) = self.tx.trees().journal.get(seq)? {
                held.push(journal_entry(&entry)?);
            }
            self.tx.remove(TreeName::Unrouted, held_key);
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
            .get(TreeName::Messages, &key(&[account_id, message_id]))?
        else {
            return Ok(None);
        };
        if marker.len() < 8 {
            return Err(StoreError::Corrupt("a message marker is truncated".into()));
        }
        Ok(Some(SeenMessage {
            timestamp: i64::from_be_bytes(marker[..8].try_into().expect("eight bytes")),
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
            .insert(TreeName::Messages, key(&[account_id, message_id]), marker);
        Ok(())
    }

    fn user_by_phone(
        &mut self,
        account_id: &str,
        wa_id: &str,
    ) -> Result<Option<UserRecord>, StoreError> {
        self.user_by_index(TreeName::PhoneIndex, wa_id, account_id)
    }

    fn user_by_bsuid(
        &mut self,
        account_id: &str,
        bsuid: &str,
    ) -> Result<Option<UserRecord>, StoreError> {
        self.user_by_index(TreeName::BsuidIndex, bsuid, account_id)
    }

    fn put_user(&mut self, user: &UserRecord) -> Result<(), StoreError> {
        let user_key = key(&[user.account_id(), user.key()]);
        let previous: Option<UserRecord> = self
            .tx
            .get(TreeName::Users, &user_key)?
            .map(|bytes| decode(&bytes))
            .transpose()?;
        let indexes = [
            (
                TreeName::PhoneIndex,
                user.wa_id(),
                previous.as_ref().and_then(UserRecord::wa_id),
            ),
            (
                TreeName::BsuidIndex,
                user.bsuid(),
                previous.as_ref().and_then(UserRecord::bsuid),
            ),
        ];
        for (index, id, indexed) in indexes {
            if let Some(id) = id {
                if Some(id) != indexed {
                    self.tx
                        .insert(index, key(&[id, user.account_id()]), user.key().as_bytes());
                }
            }
        }
        self.tx.insert(TreeName::Users, user_key, encode(user)?);
        Ok(())
    }

    fn conversation(&mut self, id: &str) -> Result<Option<Conversation>, StoreError> {
        self.tx
            .get(TreeName::Conversations, id.as_bytes())?
            .map(|bytes| decode(&bytes))
            .transpose()
    }

    fn put_conversation(&mut self, conversation: &Conversation) -> Result<(), StoreError> {
        self.tx.insert(
            TreeName::Conversations,
            conversation.id.as_bytes(),
            encode(conversation)?,
        );
        Ok(())
    }

    fn hold_event(&mut self, account_id: &str, event: &AutomaticEvent) -> Result<bool, StoreError> {
        let held_key = key(&[account_id, &event.message_id, &event.event_name]);
        let known = self.tx.contains_key(TreeName::PendingEvents, &held_key)?;
        self.tx
            .insert(TreeName::PendingEvents, held_key, encode(event)?);
        Ok(!known)
    }

    fn take_held_events(
        &mut self,
        account_id: &str,
        message_id: &str,
    ) -> Result<Vec<AutomaticEvent>, StoreError> {
        let held_prefix = prefix(&[account_id, message_id]);
        let mut events = Vec::new();
        for (held_key, bytes) in self.tx.scan_prefix(TreeName::PendingEvents, &held_prefix)? {
            events.push(decode(&bytes)?);
            self.tx.remove(TreeName::PendingEvents, held_key);
        }
        Ok(events)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::sled::SledStore;

    /// A webhook whose rules fail: the body stays journaled (durably), the rules' writes are
    /// undone, and the caller gets the error.
    #[tokio::test]
    async fn a_webhook_whose_rules_fail_stays_journaled_without_their_writes() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path()).unwrap();
        let failing: UnitOfWork = Box::new(|unit| {
            unit.mark_message_seen(
                "acc",
                "wamid.1",
                &SeenMessage {
                    timestamp: 1,
                    conversation_id: "conv".into(),
                },
            )?;
            Err(StoreError::Corrupt("the rules failed".into()))
        });
        let outcome = store
            .record_webhook(Bytes::from_static(b"{}"), 7, Some(failing))
            .await;
        assert!(
            matches!(outcome, Err(StoreError::Corrupt(_))),
            "{outcome:?}"
        );
        let trees = &store.inner.trees;
        assert_eq!(trees.journal.len(), 1);
        let (_, entry) = trees.journal.first().unwrap().unwrap();
        assert_eq!(journal_entry(&entry).unwrap().body, b"{}");
        assert!(trees.messages.is_empty(), "the rules' write was undone");
    }
}
