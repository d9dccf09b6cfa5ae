//! Webhook ingestion into attribution state, and the lookups that read it back.
//!
//! Keys (parts joined by NUL):
//! - `users`: account, user key → [`UserRecord`]
//! - `phone_index`: phone digits, account → user key
//! - `bsuid_index`: BSUID, account → user key
//! - `conversations`: conversation id → [`Conversation`]
//! - `messages`: account, wamid → message timestamp (8 bytes BE) ++ conversation id
//! - `pending_events`: account, wamid, event name → [`AutomaticEvent`] whose message is unseen

use serde::{Deserialize, Serialize};

use super::{decode, encode, key, prefix, Store, StoreError, Trees};
use crate::attribution::{
    self, AutomaticEvent, ChangeGroup, Conversation, InboundMessage, Placement,
};
use crate::domain::ids;

/// A WhatsApp user of one account.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UserRecord {
    pub account_id: String,
    pub key: String,
    pub wa_id: Option<String>,
    pub bsuid: Option<String>,
    pub name: Option<String>,
    pub conversation_ids: Vec<String>,
}

/// Reads a webhook body (and its receive time) into changes; `None` when it is not JSON or not
/// shaped like a webhook.
pub type WebhookParser = fn(&[u8], i64) -> Option<Vec<ChangeGroup>>;

/// What ingestion did, for metrics and logs.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct IngestReport {
    pub journal_seq: u64,
    pub unparseable: bool,
    pub unrouted_changes: u64,
    pub messages: u64,
    pub duplicate_messages: u64,
    pub messages_without_user: u64,
    pub clicks_with_clid: u64,
    pub clicks_without_clid: u64,
    pub conversations_opened: u64,
    pub automatic_events: u64,
    pub automatic_events_pending: u64,
    pub duplicate_automatic_events: u64,
    /// Automatic events newly kept on a conversation, for accounts that forward them.
    pub matched_automatic_events: Vec<(String, String, AutomaticEvent)>,
}

impl IngestReport {
    fn absorb(&mut self, other: IngestReport) {
        self.unrouted_changes += other.unrouted_changes;
        self.messages += other.messages;
        self.duplicate_messages += other.duplicate_messages;
        self.messages_without_user += other.messages_without_user;
        self.clicks_with_clid += other.clicks_with_clid;
        self.clicks_without_clid += other.clicks_without_clid;
        self.conversations_opened += other.conversations_opened;
        self.automatic_events += other.automatic_events;
        self.automatic_events_pending += other.automatic_events_pending;
        self.duplicate_automatic_events += other.duplicate_automatic_events;
        self.matched_automatic_events
            .extend(other.matched_automatic_events);
    }
}

impl Store {
    /// Journals a verified webhook body, then applies every change whose business number has an
    /// account; the others are marked unrouted for replay when the account is added. The caller
    /// makes it durable with [`Store::durable`] before answering.
    pub async fn record_webhook(
        &self,
        raw: bytes::Bytes,
        received_at: i64,
        parse: WebhookParser,
        window_secs: i64,
    ) -> Result<IngestReport, StoreError> {
        // Journaling and parsing run in parallel on the blocking pool; only applying the
        // changes goes through the writer thread.
        let (seq, groups) = self
            .run(move |inner| {
                let trees = &inner.trees;
                let seq = trees.db.generate_id()?;
                let mut entry = Vec::with_capacity(8 + raw.len());
                entry.extend_from_slice(&received_at.to_be_bytes());
                entry.extend_from_slice(&raw);
                trees.journal.insert(seq.to_be_bytes(), entry)?;
                let groups = parse(&raw, received_at);
                if groups.is_none() {
                    trees.unparseable.insert(seq.to_be_bytes(), &[])?;
                }
                Ok((seq, groups))
            })
            .await?;
        let Some(groups) = groups else {
            return Ok(IngestReport {
                journal_seq: seq,
                unparseable: true,
                ..IngestReport::default()
            });
        };
        let store = self.clone();
        self.write(move |inner| {
            let trees = &inner.trees;
            let mut report = IngestReport {
                journal_seq: seq,
                ..IngestReport::default()
            };
            for group in groups {
                // Statuses, echoes and other changes without inbound items change nothing.
                if group.messages.is_empty() && group.automatic_events.is_empty() {
                    continue;
                }
                match store.account_by_phone_number_id(&group.phone_number_id) {
                    Some(account) => {
                        let group_report = ingest_group(trees, &account.id, group, window_secs)?;
                        report.absorb(group_report);
                    }
                    None => {
                        let mut unrouted_key = prefix(&[&group.phone_number_id]);
                        unrouted_key.extend_from_slice(&seq.to_be_bytes());
                        trees.unrouted.insert(unrouted_key, &[])?;
                        report.unrouted_changes += 1;
                    }
                }
            }
            Ok(report)
        })
        .await
    }

    /// Processes every journaled change held for `phone_number_id`, now that its account exists.
    /// `parse` turns a journaled body and its receive time back into changes.
    pub async fn replay_unrouted(
        &self,
        phone_number_id: String,
        parse: WebhookParser,
        window_secs: i64,
    ) -> Result<IngestReport, StoreError> {
        let store = self.clone();
        self.write(move |inner| {
            let trees = &inner.trees;
            let Some(account) = store.account_by_phone_number_id(&phone_number_id) else {
                return Ok(IngestReport::default());
            };
            let mut report = IngestReport::default();
            let held_prefix = prefix(&[&phone_number_id]);
            for item in trees.unrouted.scan_prefix(&held_prefix) {
                let (unrouted_key, _) = item?;
                let seq = &unrouted_key[held_prefix.len()..];
                if let Some(entry) = trees.journal.get(seq)? {
                    if entry.len() < 8 {
                        return Err(StoreError::Corrupt("a journal entry is truncated".into()));
                    }
                    let received_at =
                        i64::from_be_bytes(entry[..8].try_into().expect("eight bytes"));
                    for group in parse(&entry[8..], received_at).unwrap_or_default() {
                        if group.phone_number_id == phone_number_id {
                            report.absorb(ingest_group(trees, &account.id, group, window_secs)?);
                        }
                    }
                }
                trees.unrouted.remove(&unrouted_key)?;
            }
            Ok(report)
        })
        .await
    }

    /// Deletes journal entries received before `cutoff` (unix seconds), except bodies still held
    /// for a number without an account. At most `limit` per call; returns how many went.
    pub async fn prune_journal(&self, cutoff: i64, limit: usize) -> Result<u64, StoreError> {
        self.run(move |inner| {
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
                let received_at = i64::from_be_bytes(entry[..8].try_into().expect("eight bytes"));
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
        .await
    }

    pub async fn conversation(&self, id: String) -> Result<Option<Conversation>, StoreError> {
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

    pub async fn user(
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

    /// Every user known by this phone number or BSUID, with their conversations (newest first),
    /// on the accounts `visible` accepts.
    pub async fn users_with_conversations(
        &self,
        phone: Option<String>,
        bsuid: Option<String>,
        visible: impl Fn(&str) -> bool + Send + 'static,
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
                let mut conversations = load_conversations(trees, &user.conversation_ids)?;
                conversations
                    .sort_by_key(|conversation| std::cmp::Reverse(conversation.started_at));
                results.push((user, conversations));
            }
            Ok(results)
        })
        .await
    }

    /// The conversations of the user this phone number names on the account; `None` when the
    /// phone has no user there.
    pub async fn phone_conversations(
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
            load_conversations(trees, &user.conversation_ids).map(Some)
        })
        .await
    }

    /// SPEC §5.2 rule 6: the phone's conversation on this account whose click-id attribution is
    /// the most recent. `Ok(None)` when the phone has conversations but none with a click id is
    /// told apart by the caller through [`Store::users_with_conversations`].
    pub async fn most_recent_attributed_conversation(
        &self,
        account_id: String,
        phone: String,
    ) -> Result<(bool, Option<Conversation>), StoreError> {
        self.run(move |inner| {
            let trees = &inner.trees;
            let Some(user_key) = trees.phone_index.get(key(&[&phone, &account_id]))? else {
                return Ok((false, None));
            };
            let user_key = String::from_utf8_lossy(&user_key).into_owned();
            let Some(bytes) = trees.users.get(key(&[&account_id, &user_key]))? else {
                return Ok((false, None));
            };
            let user: UserRecord = decode(&bytes)?;
            let conversations = load_conversations(trees, &user.conversation_ids)?;
            let chosen = attribution::most_recent_attributed(&conversations).cloned();
            Ok((!conversations.is_empty(), chosen))
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

/// Applies one change to the attribution state. Runs on the writer thread.
///
/// Each message writes its conversation and user first and its message-id marker last, so a
/// crash between them makes the redelivered message run again instead of being skipped as a
/// duplicate; the attribution rules are idempotent for a repeated message.
fn ingest_group(
    trees: &Trees,
    account_id: &str,
    group: ChangeGroup,
    window_secs: i64,
) -> Result<IngestReport, StoreError> {
    let mut report = IngestReport::default();
    for message in group.messages {
        ingest_message(trees, account_id, message, window_secs, &mut report)?;
    }
    for event in group.automatic_events {
        ingest_automatic_event(trees, account_id, event, &mut report)?;
    }
    Ok(report)
}

fn ingest_message(
    trees: &Trees,
    account_id: &str,
    message: InboundMessage,
    window_secs: i64,
    report: &mut IngestReport,
) -> Result<(), StoreError> {
    let message_key = key(&[account_id, &message.message_id]);
    if trees.messages.contains_key(&message_key)? {
        report.duplicate_messages += 1;
        return Ok(());
    }
    let Some(mut user) = resolve_user(trees, account_id, &message)? else {
        report.messages_without_user += 1;
        return Ok(());
    };
    report.messages += 1;
    match message
        .click
        .as_ref()
        .map(|click| click.ctwa_clid.is_some())
    {
        Some(true) => report.clicks_with_clid += 1,
        Some(false) => report.clicks_without_clid += 1,
        None => {}
    }
    let mut conversations = load_conversations(trees, &user.conversation_ids)?;
    let carries_ctwa_clid = message
        .click
        .as_ref()
        .is_some_and(|click| click.ctwa_clid.is_some());
    let index = match attribution::place_inbound(
        &conversations,
        message.timestamp,
        carries_ctwa_clid,
        window_secs,
    ) {
        Placement::Existing(index) => index,
        Placement::New => {
            let conversation = Conversation::open(
                ids::generate("conv"),
                account_id.to_string(),
                user.key.clone(),
                message.timestamp,
            );
            user.conversation_ids.push(conversation.id.clone());
            conversations.push(conversation);
            report.conversations_opened += 1;
            conversations.len() - 1
        }
    };
    let conversation = &mut conversations[index];
    attribution::record_inbound(conversation, message.timestamp, message.click);

    // Automatic events that arrived before this message.
    let pending_prefix = prefix(&[account_id, &message.message_id]);
    for item in trees.pending_events.scan_prefix(&pending_prefix) {
        let (pending_key, bytes) = item?;
        let event: AutomaticEvent = decode(&bytes)?;
        if attribution::apply_automatic_event(conversation, event.clone(), message.timestamp) {
            report.automatic_events += 1;
            report.matched_automatic_events.push((
                account_id.to_string(),
                conversation.id.clone(),
                event,
            ));
        }
        trees.pending_events.remove(pending_key)?;
    }

    trees
        .conversations
        .insert(conversation.id.as_bytes(), encode(&*conversation)?)?;
    trees
        .users
        .insert(key(&[account_id, &user.key]), encode(&user)?)?;
    let mut marker = Vec::with_capacity(8 + conversation.id.len());
    marker.extend_from_slice(&message.timestamp.to_be_bytes());
    marker.extend_from_slice(conversation.id.as_bytes());
    trees.messages.insert(message_key, marker)?;
    Ok(())
}

fn ingest_automatic_event(
    trees: &Trees,
    account_id: &str,
    event: AutomaticEvent,
    report: &mut IngestReport,
) -> Result<(), StoreError> {
    let Some(marker) = trees.messages.get(key(&[account_id, &event.message_id]))? else {
        let pending_key = key(&[account_id, &event.message_id, &event.event_name]);
        if trees
            .pending_events
            .insert(pending_key, encode(&event)?)?
            .is_some()
        {
            report.duplicate_automatic_events += 1;
        } else {
            report.automatic_events_pending += 1;
        }
        return Ok(());
    };
    if marker.len() < 8 {
        return Err(StoreError::Corrupt("a message marker is truncated".into()));
    }
    let message_timestamp = i64::from_be_bytes(marker[..8].try_into().expect("eight bytes"));
    let conversation_id = String::from_utf8_lossy(&marker[8..]).into_owned();
    let Some(bytes) = trees.conversations.get(conversation_id.as_bytes())? else {
        return Err(StoreError::Corrupt(format!(
            "message marker points at missing conversation {conversation_id}"
        )));
    };
    let mut conversation: Conversation = decode(&bytes)?;
    if !attribution::apply_automatic_event(&mut conversation, event.clone(), message_timestamp) {
        report.duplicate_automatic_events += 1;
        return Ok(());
    }
    report.automatic_events += 1;
    trees
        .conversations
        .insert(conversation.id.as_bytes(), encode(&conversation)?)?;
    report
        .matched_automatic_events
        .push((account_id.to_string(), conversation.id, event));
    Ok(())
}

/// Finds the user a message comes from by phone, then by BSUID, creating one if new, and learns
/// any identifier or profile name the message adds. `None` when the message names no user.
fn resolve_user(
    trees: &Trees,
    account_id: &str,
    message: &InboundMessage,
) -> Result<Option<UserRecord>, StoreError> {
    let by_phone = match &message.wa_id {
        Some(wa_id) => trees.phone_index.get(key(&[wa_id, account_id]))?,
        None => None,
    };
    let by_bsuid = match (&by_phone, &message.bsuid) {
        (None, Some(bsuid)) => trees.bsuid_index.get(key(&[bsuid, account_id]))?,
        _ => None,
    };
    let known_key = by_phone
        .or(by_bsuid)
        .map(|bytes| String::from_utf8_lossy(&bytes).into_owned());
    let mut user = match known_key {
        Some(user_key) => match trees.users.get(key(&[account_id, &user_key]))? {
            Some(bytes) => decode(&bytes)?,
            None => {
                return Err(StoreError::Corrupt(format!(
                    "an index points at missing user {user_key}"
                )))
            }
        },
        None => {
            let user_key = match (&message.wa_id, &message.bsuid) {
                (Some(wa_id), _) => format!("wa:{wa_id}"),
                (None, Some(bsuid)) => format!("bsuid:{bsuid}"),
                (None, None) => return Ok(None),
            };
            UserRecord {
                account_id: account_id.to_string(),
                key: user_key,
                wa_id: None,
                bsuid: None,
                name: None,
                conversation_ids: Vec::new(),
            }
        }
    };
    if let Some(wa_id) = &message.wa_id {
        if user.wa_id.as_ref() != Some(wa_id) {
            user.wa_id = Some(wa_id.clone());
            trees
                .phone_index
                .insert(key(&[wa_id, account_id]), user.key.as_bytes())?;
        }
    }
    if let Some(bsuid) = &message.bsuid {
        if user.bsuid.as_ref() != Some(bsuid) {
            user.bsuid = Some(bsuid.clone());
            trees
                .bsuid_index
                .insert(key(&[bsuid, account_id]), user.key.as_bytes())?;
        }
    }
    if message.profile_name.is_some() {
        user.name = message.profile_name.clone();
    }
    Ok(Some(user))
}
