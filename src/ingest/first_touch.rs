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
    if unit.seen_message(account_id, &message.message_id)?.is_some() {
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
                user.key().to_string(),
                message.timestamp,
            );
            user.add_conversation(conversation.id.clone());
            conversations.push(conversation);
            report.conversations_opened += 1;
            conversations.len() - 1
        }
    };
    let conversation = &mut conversations[index];
    attribution::record_inbound(conversation, message.timestamp, message.click);

    // Automatic events that arrived before this message.
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

    unit.put_conversation(conversation)?;
    unit.put_user(&user)?;
    unit.mark_message_seen(
        account_id,
        &message.message_id,
        &SeenMessage {
            timestamp: message.timestamp,
            conversation_id: conversation.id.clone(),
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
    let Some(mut conversation) = unit.conversation(&seen.conversation_id)? else {
        return Err(StoreError::Corrupt(format!(
            "message marker points at missing conversation {}",
            seen.conversation_id
        )));
    };
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
        UserRecord::first_seen(account_id, message.wa_id.as_deref(), message.bsuid.as_deref())
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
