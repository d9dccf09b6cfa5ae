//! The first-touch rules applied to stored state (SPEC §5.2): which user a message comes from,
//! which conversation it joins or opens, which click attributes it, and what automatic events
//! change. Written over the storage seam's [`AttributionUnit`], so every engine runs the same
//! rules and none holds any of them.

use crate::attribution::{
    self, AutomaticEvent, ChangeGroup, Conversation, InboundMessage, Placement,
};
use crate::domain::ids;
use crate::domain::user::UserRecord;
use crate::store::{AttributionUnit, SeenMessage, StoreError};

use super::IngestReport;

/// Applies every change of one webhook: the ones for a number with an account to its state,
/// the others held for replay when the account is added.
pub fn apply_webhook(
    unit: &mut dyn AttributionUnit,
    groups: Vec<ChangeGroup>,
    window_secs: i64,
) -> Result<IngestReport, StoreError> {
    let mut report = IngestReport::default();
    for group in groups {
        // Statuses, echoes and other changes without inbound items change nothing.
        if group.messages.is_empty() && group.automatic_events.is_empty() {
            continue;
        }
        match unit.account_for_number(&group.phone_number_id) {
            Some(account_id) => {
                report.absorb(apply_group(unit, &account_id, group, window_secs)?);
            }
            None => {
                unit.hold_for_number(&group.phone_number_id)?;
                report.unrouted_changes += 1;
            }
        }
    }
    Ok(report)
}

/// Processes every webhook held for `phone_number_id`, now that its account exists. `parse`
/// turns a journaled body and its receive time back into changes.
pub fn replay_held(
    unit: &mut dyn AttributionUnit,
    phone_number_id: &str,
    parse: fn(&[u8], i64) -> Option<Vec<ChangeGroup>>,
    window_secs: i64,
) -> Result<IngestReport, StoreError> {
    let mut report = IngestReport::default();
    let Some(account_id) = unit.account_for_number(phone_number_id) else {
        return Ok(report);
    };
    for held in unit.take_held_for_number(phone_number_id)? {
        for group in parse(&held.body, held.received_at).unwrap_or_default() {
            if group.phone_number_id == phone_number_id {
                report.absorb(apply_group(unit, &account_id, group, window_secs)?);
            }
        }
    }
    Ok(report)
}

/// Applies one change to the attribution state of an account.
///
/// A redelivered message finds its message-id marker and changes nothing; the rules are also
/// idempotent for a message applied twice, so the order of writes inside a unit does not matter.
pub fn apply_group(
    unit: &mut dyn AttributionUnit,
    account_id: &str,
    group: ChangeGroup,
    window_secs: i64,
) -> Result<IngestReport, StoreError> {
    let mut report = IngestReport::default();
    for message in group.messages {
        apply_message(unit, account_id, message, window_secs, &mut report)?;
    }
    for event in group.automatic_events {
        apply_automatic_event(unit, account_id, event, &mut report)?;
    }
    Ok(report)
}

fn apply_message(
    unit: &mut dyn AttributionUnit,
    account_id: &str,
    message: InboundMessage,
    window_secs: i64,
    report: &mut IngestReport,
) -> Result<(), StoreError> {
    if unit
        .seen_message(account_id, &message.message_id)?
        .is_some()
    {
        report.duplicate_messages += 1;
        return Ok(());
    }
    let Some(mut user) = resolve_user(unit, account_id, &message)? else {
        report.messages_without_user += 1;
        return Ok(());
    };
    report.messages += 1;
    let carries_ctwa_clid = message
        .click
        .as_ref()
        .is_some_and(|click| click.ctwa_clid.is_some());
    match (&message.click, carries_ctwa_clid) {
        (Some(_), true) => report.clicks_with_clid += 1,
        (Some(_), false) => report.clicks_without_clid += 1,
        (None, _) => {}
    }
    let mut conversations = Vec::with_capacity(user.conversation_ids().len());
    for id in user.conversation_ids() {
        if let Some(conversation) = unit.conversation(id)? {
            conversations.push(conversation);
        }
    }
    let (index, changed) = match message.click {
        // A click may start a conversation, or move others' clicks (rules 3 and 4, whatever
        // the arrival order).
        Some(click) => {
            let regrouping = attribution::place_click(
                &mut conversations,
                message.timestamp,
                click,
                window_secs,
                |started_at| {
                    Conversation::open(
                        ids::generate("conv"),
                        account_id.to_string(),
                        user.key().to_string(),
                        started_at,
                    )
                },
            );
            for &opened in &regrouping.opened {
                user.add_conversation(conversations[opened].id.clone());
                report.conversations_opened += 1;
            }
            for &merged in &regrouping.merged {
                user.remove_conversation(&conversations[merged].id);
            }
            for (message_id, conversation_id) in regrouping.moved {
                if let Some(seen) = unit.seen_message(account_id, &message_id)? {
                    unit.mark_message_seen(
                        account_id,
                        &message_id,
                        &SeenMessage {
                            timestamp: seen.timestamp,
                            conversation_id,
                        },
                    )?;
                }
            }
            (regrouping.joined, regrouping.changed)
        }
        None => {
            let index = match attribution::place_inbound(
                &conversations,
                message.timestamp,
                false,
                window_secs,
            ) {
                Placement::Existing(index) => index,
                Placement::New => {
                    let conversation = Conversation::open(
                        ids::generate("conv"),
                        account_id.to_string(),
                        user.key().to_string(),
                        message.timestamp,
                    );
                    user.add_conversation(conversation.id.clone());
                    conversations.push(conversation);
                    report.conversations_opened += 1;
                    conversations.len() - 1
                }
            };
            attribution::record_inbound(&mut conversations[index], message.timestamp, None);
            (index, vec![index])
        }
    };

    // Automatic events that arrived before this message.
    let conversation = &mut conversations[index];
    for event in unit.take_held_events(account_id, &message.message_id)? {
        if attribution::apply_automatic_event(conversation, event.clone(), message.timestamp) {
            report.automatic_events += 1;
            report.matched_automatic_events.push((
                account_id.to_string(),
                conversation.id.clone(),
                event,
            ));
        }
    }
    let conversation_id = conversation.id.clone();

    for changed in changed {
        unit.put_conversation(&conversations[changed])?;
    }
    unit.put_user(&user)?;
    unit.mark_message_seen(
        account_id,
        &message.message_id,
        &SeenMessage {
            timestamp: message.timestamp,
            conversation_id,
        },
    )
}

fn apply_automatic_event(
    unit: &mut dyn AttributionUnit,
    account_id: &str,
    event: AutomaticEvent,
    report: &mut IngestReport,
) -> Result<(), StoreError> {
    let Some(seen) = unit.seen_message(account_id, &event.message_id)? else {
        if unit.hold_event(account_id, &event)? {
            report.automatic_events_pending += 1;
        } else {
            report.duplicate_automatic_events += 1;
        }
        return Ok(());
    };
    let mut conversation = stored_conversation(unit, &seen.conversation_id)?;
    // A message without a click keeps its marker when its conversation merges into another.
    while let Some(merged_into) = conversation.merged_into.take() {
        conversation = stored_conversation(unit, &merged_into)?;
    }
    if !attribution::apply_automatic_event(&mut conversation, event.clone(), seen.timestamp) {
        report.duplicate_automatic_events += 1;
        return Ok(());
    }
    report.automatic_events += 1;
    unit.put_conversation(&conversation)?;
    report
        .matched_automatic_events
        .push((account_id.to_string(), conversation.id, event));
    Ok(())
}

fn stored_conversation(
    unit: &mut dyn AttributionUnit,
    id: &str,
) -> Result<Conversation, StoreError> {
    unit.conversation(id)?.ok_or_else(|| {
        StoreError::Corrupt(format!(
            "a message marker or a merged conversation points at missing conversation {id}"
        ))
    })
}

/// Finds the user a message comes from by phone, then by BSUID, creating one if new, and learns
/// any identifier or profile name the message adds. `None` when the message names no user.
fn resolve_user(
    unit: &mut dyn AttributionUnit,
    account_id: &str,
    message: &InboundMessage,
) -> Result<Option<UserRecord>, StoreError> {
    let by_phone = match &message.wa_id {
        Some(wa_id) => unit.user_by_phone(account_id, wa_id)?,
        None => None,
    };
    let known = match (by_phone, &message.bsuid) {
        (Some(user), _) => Some(user),
        (None, Some(bsuid)) => unit.user_by_bsuid(account_id, bsuid)?,
        (None, None) => None,
    };
    let Some(mut user) = known.or_else(|| {
        UserRecord::first_seen(
            account_id,
            message.wa_id.as_deref(),
            message.bsuid.as_deref(),
        )
    }) else {
        return Ok(None);
    };
    user.learn(
        message.wa_id.as_deref(),
        message.bsuid.as_deref(),
        message.profile_name.as_deref(),
    );
    Ok(Some(user))
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, HashMap};

    use proptest::prelude::*;

    use super::*;
    use crate::attribution::{Click, ClickVia};
    use crate::store::JournaledWebhook;

    /// The attribution state in memory: a second implementation of the seam's unit, which
    /// checks that the rules need nothing from an engine.
    #[derive(Default)]
    struct MemoryUnit {
        accounts: HashMap<String, String>,
        messages: HashMap<(String, String), SeenMessage>,
        users: HashMap<(String, String), UserRecord>,
        phone_index: HashMap<(String, String), String>,
        bsuid_index: HashMap<(String, String), String>,
        conversations: HashMap<String, Conversation>,
        events: BTreeMap<(String, String, String), AutomaticEvent>,
    }

    impl MemoryUnit {
        fn user_by(
            &self,
            index: &HashMap<(String, String), String>,
            account_id: &str,
            id: &str,
        ) -> Option<UserRecord> {
            let key = index.get(&(account_id.to_string(), id.to_string()))?;
            self.users
                .get(&(account_id.to_string(), key.clone()))
                .cloned()
        }
    }

    impl AttributionUnit for MemoryUnit {
        fn account_for_number(&mut self, phone_number_id: &str) -> Option<String> {
            self.accounts.get(phone_number_id).cloned()
        }
        fn hold_for_number(&mut self, _: &str) -> Result<(), StoreError> {
            Ok(())
        }
        fn take_held_for_number(&mut self, _: &str) -> Result<Vec<JournaledWebhook>, StoreError> {
            Ok(Vec::new())
        }
        fn seen_message(
            &mut self,
            account_id: &str,
            message_id: &str,
        ) -> Result<Option<SeenMessage>, StoreError> {
            Ok(self
                .messages
                .get(&(account_id.to_string(), message_id.to_string()))
                .cloned())
        }
        fn mark_message_seen(
            &mut self,
            account_id: &str,
            message_id: &str,
            seen: &SeenMessage,
        ) -> Result<(), StoreError> {
            self.messages.insert(
                (account_id.to_string(), message_id.to_string()),
                seen.clone(),
            );
            Ok(())
        }
        fn user_by_phone(
            &mut self,
            account_id: &str,
            wa_id: &str,
        ) -> Result<Option<UserRecord>, StoreError> {
            Ok(self.user_by(&self.phone_index, account_id, wa_id))
        }
        fn user_by_bsuid(
            &mut self,
            account_id: &str,
            bsuid: &str,
        ) -> Result<Option<UserRecord>, StoreError> {
            Ok(self.user_by(&self.bsuid_index, account_id, bsuid))
        }
        fn put_user(&mut self, user: &UserRecord) -> Result<(), StoreError> {
            let account_id = user.account_id().to_string();
            if let Some(wa_id) = user.wa_id() {
                self.phone_index.insert(
                    (account_id.clone(), wa_id.to_string()),
                    user.key().to_string(),
                );
            }
            if let Some(bsuid) = user.bsuid() {
                self.bsuid_index.insert(
                    (account_id.clone(), bsuid.to_string()),
                    user.key().to_string(),
                );
            }
            self.users
                .insert((account_id, user.key().to_string()), user.clone());
            Ok(())
        }
        fn conversation(&mut self, id: &str) -> Result<Option<Conversation>, StoreError> {
            Ok(self.conversations.get(id).cloned())
        }
        fn put_conversation(&mut self, conversation: &Conversation) -> Result<(), StoreError> {
            self.conversations
                .insert(conversation.id.clone(), conversation.clone());
            Ok(())
        }
        fn hold_event(
            &mut self,
            account_id: &str,
            event: &AutomaticEvent,
        ) -> Result<bool, StoreError> {
            let key = (
                account_id.to_string(),
                event.message_id.clone(),
                event.event_name.clone(),
            );
            Ok(self.events.insert(key, event.clone()).is_none())
        }
        fn take_held_events(
            &mut self,
            account_id: &str,
            message_id: &str,
        ) -> Result<Vec<AutomaticEvent>, StoreError> {
            let held: Vec<_> = self
                .events
                .keys()
                .filter(|(account, message, _)| account == account_id && message == message_id)
                .cloned()
                .collect();
            Ok(held
                .into_iter()
                .filter_map(|key| self.events.remove(&key))
                .collect())
        }
    }

    const WINDOW: i64 = 100;

    fn message(index: usize, wa_id: &str, timestamp: i64, clid: Option<bool>) -> InboundMessage {
        let message_id = format!("wamid.{index}");
        InboundMessage {
            message_id: message_id.clone(),
            wa_id: Some(wa_id.to_string()),
            bsuid: None,
            profile_name: None,
            timestamp,
            click: clid.map(|with_clid| Click {
                ctwa_clid: with_clid.then(|| format!("clid-{index}")),
                source_id: Some("ad".into()),
                source_type: Some("ad".into()),
                source_url: None,
                headline: None,
                body: None,
                media_type: None,
                image_url: None,
                video_url: None,
                thumbnail_url: None,
                welcome_message: None,
                message_id,
                clicked_at: timestamp,
                captured_at: timestamp,
                via: ClickVia::Referral,
            }),
        }
    }

    /// Each message in its own webhook, in the order given.
    fn feed(messages: &[InboundMessage]) -> MemoryUnit {
        let mut unit = MemoryUnit::default();
        unit.accounts.insert("pn".into(), "acc".into());
        for message in messages {
            let group = ChangeGroup {
                phone_number_id: "pn".into(),
                messages: vec![message.clone()],
                automatic_events: Vec::new(),
            };
            apply_webhook(&mut unit, vec![group], WINDOW).unwrap();
        }
        unit
    }

    /// What attribution decided, without the generated conversation ids. Per user key, for
    /// each conversation: its attribution click, the clicks with a click id it holds, and the
    /// Status-ad clicks (without one) it holds.
    type Attribution = BTreeMap<String, Vec<(Option<String>, Vec<String>, Vec<String>)>>;

    fn attribution_of(unit: &MemoryUnit) -> Attribution {
        let mut outcome = BTreeMap::new();
        for ((_, user_key), user) in &unit.users {
            let mut conversations: Vec<_> = user
                .conversation_ids()
                .iter()
                .map(|id| {
                    let conversation = &unit.conversations[id];
                    let clicks = |with_clid: bool| {
                        let mut clicks: Vec<String> = conversation
                            .clicks
                            .iter()
                            .filter(|click| click.ctwa_clid.is_some() == with_clid)
                            .map(|click| click.message_id.clone())
                            .collect();
                        clicks.sort();
                        clicks
                    };
                    let attributed = conversation
                        .attribution()
                        .map(|click| click.message_id.clone());
                    (attributed, clicks(true), clicks(false))
                })
                .collect();
            conversations.sort();
            outcome.insert(user_key.clone(), conversations);
        }
        outcome
    }

    /// Every message marker names the conversation, in its user's list, that holds the
    /// message's click; no conversation in a user's list is a merged one.
    fn assert_consistent(unit: &MemoryUnit) {
        for user in unit.users.values() {
            for id in user.conversation_ids() {
                let conversation = &unit.conversations[id];
                assert_eq!(conversation.merged_into, None, "{id} is merged but listed");
                for click in &conversation.clicks {
                    let seen = &unit.messages[&("acc".to_string(), click.message_id.clone())];
                    assert_eq!(&seen.conversation_id, id, "marker of {}", click.message_id);
                }
            }
        }
    }

    /// Up to sixteen messages from three users over six windows: organic messages, Status-ad
    /// clicks without a click id, and clicks with one (any number per user).
    fn messages() -> impl Strategy<Value = Vec<InboundMessage>> {
        prop::collection::vec(
            (
                prop::sample::select(vec!["155", "166", "177"]),
                0..6 * WINDOW,
                prop::option::of(prop::bool::weighted(0.8)),
            ),
            1..17,
        )
        .prop_map(|specs| {
            specs
                .into_iter()
                .enumerate()
                .map(|(index, (wa_id, timestamp, clid))| message(index, wa_id, timestamp, clid))
                .collect()
        })
    }

    /// The outcome SPEC §5.2 defines, computed from the messages alone: per user, a
    /// conversation starts at the earliest click with a click id, then at the first one more
    /// than a window after the previous start; each conversation holds the clicks from its
    /// start to the next (the first one also those before it), attributed to its start.
    fn canonical(messages: &[InboundMessage]) -> Attribution {
        let mut outcome = BTreeMap::new();
        let mut users: BTreeMap<String, Vec<&Click>> = BTreeMap::new();
        for message in messages {
            let user = format!("wa:{}", message.wa_id.as_deref().unwrap());
            users
                .entry(user)
                .or_default()
                .extend(message.click.as_ref());
        }
        for (user, mut clicks) in users {
            clicks
                .sort_by(|a, b| (a.clicked_at, &a.message_id).cmp(&(b.clicked_at, &b.message_id)));
            let mut starts: Vec<&Click> = Vec::new();
            for click in clicks.iter().filter(|click| click.ctwa_clid.is_some()) {
                if starts
                    .last()
                    .is_none_or(|start| click.clicked_at > start.clicked_at + WINDOW)
                {
                    starts.push(click);
                }
            }
            let segment = |at: i64| {
                starts
                    .iter()
                    .filter(|start| start.clicked_at <= at)
                    .count()
                    .saturating_sub(1)
            };
            let mut conversations = vec![(None, Vec::new(), Vec::new()); starts.len().max(1)];
            for (index, start) in starts.iter().enumerate() {
                conversations[index].0 = Some(start.message_id.clone());
            }
            for click in &clicks {
                let conversation = &mut conversations[segment(click.clicked_at)];
                match click.ctwa_clid {
                    Some(_) => conversation.1.push(click.message_id.clone()),
                    None => conversation.2.push(click.message_id.clone()),
                }
            }
            if starts.is_empty() {
                // Only Status-ad clicks: the earliest keeps its ad fields.
                conversations[0].0 = clicks.first().map(|click| click.message_id.clone());
            }
            for conversation in &mut conversations {
                conversation.1.sort();
                conversation.2.sort();
            }
            conversations.sort();
            outcome.insert(user, conversations);
        }
        outcome
    }

    fn in_timestamp_order(messages: &[InboundMessage]) -> Vec<InboundMessage> {
        let mut in_order = messages.to_vec();
        in_order.sort_by(|a, b| (a.timestamp, &a.message_id).cmp(&(b.timestamp, &b.message_id)));
        in_order
    }

    proptest! {
        /// SPEC §5.2 rule 3: reordering cannot change attribution. The same messages, delivered
        /// in timestamp order or in any other order, give every user the conversations the
        /// rules define (`canonical`), each attributed to the same click and holding the same
        /// clicks, with or without a click id; and every click's message marker names the
        /// conversation holding it.
        #[test]
        fn the_arrival_order_does_not_change_attribution(
            (in_order, shuffled) in messages().prop_flat_map(|messages| {
                (Just(in_timestamp_order(&messages)), Just(messages).prop_shuffle())
            })
        ) {
            let reordered = feed(&shuffled);
            assert_consistent(&reordered);
            let expected = canonical(&in_order);
            prop_assert_eq!(attribution_of(&feed(&in_order)), expected.clone());
            prop_assert_eq!(attribution_of(&reordered), expected);
        }
    }

    fn conversations_of(unit: &MemoryUnit) -> Vec<(Option<String>, Vec<String>, Vec<String>)> {
        attribution_of(unit)["wa:155"].clone()
    }

    fn attributed(id: &str, clicks: &[&str]) -> (Option<String>, Vec<String>, Vec<String>) {
        (
            Some(id.to_string()),
            clicks.iter().map(|click| click.to_string()).collect(),
            Vec::new(),
        )
    }

    /// With a window of 100, clicks A at 0, B at 314 and C at 351 make {A} and {B, C} in
    /// timestamp order (B is more than a window after A, C inside B's). Delivered A, C, B, C
    /// first opens its own conversation; the late B then takes C's conversation (keeping its
    /// id) and becomes its attribution.
    #[test]
    fn a_late_click_joins_the_conversation_of_a_click_inside_its_window() {
        let a = message(0, "155", 0, Some(true));
        let b = message(1, "155", 314, Some(true));
        let c = message(2, "155", 351, Some(true));
        let expected = vec![
            attributed("wamid.0", &["wamid.0"]),
            attributed("wamid.1", &["wamid.1", "wamid.2"]),
        ];
        assert_eq!(
            conversations_of(&feed(&[a.clone(), b.clone(), c.clone()])),
            expected
        );

        let before = feed(&[a.clone(), c.clone()]);
        let c_conversation = before.messages[&("acc".to_string(), "wamid.2".to_string())]
            .conversation_id
            .clone();
        let mut unit = before;
        let group = ChangeGroup {
            phone_number_id: "pn".into(),
            messages: vec![b],
            automatic_events: Vec::new(),
        };
        let report = apply_webhook(&mut unit, vec![group], WINDOW).unwrap();
        assert_eq!(report.conversations_opened, 0);
        assert_eq!(conversations_of(&unit), expected);
        let joined = &unit.conversations[&c_conversation];
        assert_eq!(joined.attribution().unwrap().message_id, "wamid.1");
        assert_eq!(joined.message_count, 2);
        assert_eq!((joined.started_at, joined.last_inbound_at), (314, 351));
        assert_consistent(&unit);
    }

    /// The cascade: B at 314, C at 351, D at 430. In timestamp order, {B, C} and {D} (D is more
    /// than a window after B). Delivered C, D, B: C and D share a conversation until B arrives;
    /// B then becomes its attribution, which leaves D outside the window: D moves, with its
    /// message, to a conversation of its own.
    #[test]
    fn a_late_click_can_push_a_later_click_into_a_conversation_of_its_own() {
        let b = message(1, "155", 314, Some(true));
        let c = message(2, "155", 351, Some(true));
        let d = message(3, "155", 430, Some(true));
        let expected = vec![
            attributed("wamid.1", &["wamid.1", "wamid.2"]),
            attributed("wamid.3", &["wamid.3"]),
        ];
        assert_eq!(
            conversations_of(&feed(&[b.clone(), c.clone(), d.clone()])),
            expected
        );

        let before = feed(&[c.clone(), d.clone()]);
        assert_eq!(
            conversations_of(&before),
            vec![attributed("wamid.2", &["wamid.2", "wamid.3"])]
        );
        let kept = before.messages[&("acc".to_string(), "wamid.2".to_string())]
            .conversation_id
            .clone();
        let mut unit = before;
        let group = ChangeGroup {
            phone_number_id: "pn".into(),
            messages: vec![b],
            automatic_events: Vec::new(),
        };
        let report = apply_webhook(&mut unit, vec![group], WINDOW).unwrap();
        assert_eq!(report.conversations_opened, 1);
        assert_eq!(conversations_of(&unit), expected);
        assert_consistent(&unit);
        let kept = &unit.conversations[&kept];
        assert_eq!(kept.attribution().unwrap().message_id, "wamid.1");
        assert_eq!(
            (kept.message_count, kept.started_at, kept.last_inbound_at),
            (2, 314, 351)
        );
        let d_conversation = &unit.conversations
            [&unit.messages[&("acc".to_string(), "wamid.3".to_string())].conversation_id];
        assert_eq!(d_conversation.message_count, 1);
        assert_eq!(
            (d_conversation.started_at, d_conversation.last_inbound_at),
            (430, 430)
        );
    }

    /// State written before clicks were re-partitioned can hold two conversations whose
    /// attributions share a segment ({A}, {B}, {C} for the clicks above). The next click of the
    /// user merges them: the earlier one keeps the segment, the other's clicks and counts move
    /// to it, and its record stays, pointing at it, for the ids clients hold and the markers of
    /// its messages without a click.
    #[test]
    fn a_conversation_left_without_a_segment_merges_into_the_one_that_holds_it() {
        let a = message(0, "155", 0, Some(true));
        let b = message(1, "155", 314, Some(true));
        let c = message(2, "155", 351, Some(true));
        let plain = message(3, "155", 360, None);
        let mut unit = feed(&[a, c, plain]);
        // What the rules used to write for a late B: a conversation of its own.
        let mut old_b = Conversation::open("conv_old_b".into(), "acc".into(), "wa:155".into(), 314);
        attribution::record_inbound(&mut old_b, 314, b.click.clone());
        unit.put_conversation(&old_b).unwrap();
        let mut user = unit.user_by_phone("acc", "155").unwrap().unwrap();
        user.add_conversation(old_b.id.clone());
        unit.put_user(&user).unwrap();
        let seen = |unit: &MemoryUnit, message_id: &str| {
            unit.messages[&("acc".to_string(), message_id.to_string())]
                .conversation_id
                .clone()
        };
        unit.mark_message_seen(
            "acc",
            "wamid.1",
            &SeenMessage {
                timestamp: 314,
                conversation_id: old_b.id.clone(),
            },
        )
        .unwrap();
        let old_c = seen(&unit, "wamid.2");
        assert_eq!(conversations_of(&unit).len(), 3);

        let e = message(4, "155", 340, Some(true));
        let event = AutomaticEvent {
            message_id: "wamid.3".into(),
            event_name: "LeadSubmitted".into(),
            timestamp: 360,
            ctwa_clid: None,
            value: None,
            currency: None,
            captured_at: 361,
        };
        let group = ChangeGroup {
            phone_number_id: "pn".into(),
            messages: vec![e],
            automatic_events: vec![event],
        };
        let report = apply_webhook(&mut unit, vec![group], WINDOW).unwrap();
        assert_eq!(report.conversations_opened, 0);
        assert_eq!(
            conversations_of(&unit),
            vec![
                attributed("wamid.0", &["wamid.0"]),
                attributed("wamid.1", &["wamid.1", "wamid.2", "wamid.4"]),
            ]
        );
        assert_consistent(&unit);
        let merged = &unit.conversations[&old_c];
        assert_eq!(merged.merged_into.as_deref(), Some("conv_old_b"));
        assert!(merged.clicks.is_empty() && merged.message_count == 0);
        assert_eq!(
            seen(&unit, "wamid.3"),
            old_c,
            "a plain message keeps its marker"
        );
        let kept = &unit.conversations["conv_old_b"];
        // B, E, C (moved) and the plain message (merged).
        assert_eq!(kept.message_count, 4);
        assert_eq!((kept.started_at, kept.last_inbound_at), (314, 360));
        // The event for the plain message follows the merge.
        assert_eq!(kept.automatic_events.len(), 1);
        assert_eq!(report.matched_automatic_events[0].1, "conv_old_b");
    }
}
