//! Conversations and first-touch attribution (SPEC §5.2), as pure functions over plain data.
//!
//! Nothing here knows about HTTP or the store: the ingest rules (`ingest::first_touch`) read a
//! user's conversations in a unit of work, ask these functions what changes, and write the
//! result back in the same unit.

use serde::{Deserialize, Serialize};

/// How a click reached a conversation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClickVia {
    /// A `referral` object on an inbound message.
    Referral,
    /// The `ctwa_clid` of an `automatic_events` item filled a conversation that had none.
    AutomaticEvent,
}

/// One ad click: a `referral` on an inbound message, with every field Meta sent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Click {
    /// Stored verbatim: never trimmed, hashed or re-cased.
    pub ctwa_clid: Option<String>,
    pub source_id: Option<String>,
    pub source_type: Option<String>,
    pub source_url: Option<String>,
    pub headline: Option<String>,
    pub body: Option<String>,
    pub media_type: Option<String>,
    pub image_url: Option<String>,
    pub video_url: Option<String>,
    pub thumbnail_url: Option<String>,
    pub welcome_message: Option<String>,
    /// The wamid of the message that carried the referral.
    pub message_id: String,
    /// The message's own timestamp (unix seconds).
    pub clicked_at: i64,
    /// When ctwa-relay received it (unix seconds).
    pub captured_at: i64,
    pub via: ClickVia,
}

/// An `automatic_events` item Meta detected in the chat (a lead or a purchase).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AutomaticEvent {
    /// The wamid of the message that triggered the event.
    pub message_id: String,
    pub event_name: String,
    pub timestamp: i64,
    pub ctwa_clid: Option<String>,
    /// The real amount: Meta sends the value multiplied by 1000.
    pub value: Option<f64>,
    pub currency: Option<String>,
    pub captured_at: i64,
}

impl AutomaticEvent {
    pub fn same_event(&self, other: &AutomaticEvent) -> bool {
        self.message_id == other.message_id && self.event_name == other.event_name
    }
}

/// The thread between one account and one user that attribution is tracked on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Conversation {
    pub id: String,
    pub account_id: String,
    /// The store's key for the user within the account.
    pub user_key: String,
    /// Timestamp of the earliest inbound message seen (unix seconds).
    pub started_at: i64,
    /// Timestamp of the latest inbound message seen (unix seconds).
    pub last_inbound_at: i64,
    pub message_count: u64,
    /// Every click, in the order received.
    pub clicks: Vec<Click>,
    pub automatic_events: Vec<AutomaticEvent>,
    /// Set when a late click re-partitioned the user's clicks and this conversation's segment
    /// became another one's: the id of that conversation. The record stays so that its id (held
    /// by clients, conversion records and the markers of its messages) still names a
    /// conversation; it holds nothing else any more and is no longer in the user's list.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub merged_into: Option<String>,
}

impl Conversation {
    pub fn open(id: String, account_id: String, user_key: String, timestamp: i64) -> Self {
        Self {
            id,
            account_id,
            user_key,
            started_at: timestamp,
            last_inbound_at: timestamp,
            message_count: 0,
            clicks: Vec::new(),
            automatic_events: Vec::new(),
            merged_into: None,
        }
    }

    /// First touch: the earliest click carrying a `ctwa_clid`; when no click has one, the earliest
    /// click (a Status-placement ad keeps its ad fields with no click id). Ties break on the
    /// message id so the answer never depends on arrival order.
    pub fn attribution(&self) -> Option<&Click> {
        self.ctwa_attribution().or_else(|| {
            self.clicks
                .iter()
                .min_by(|a, b| (a.clicked_at, &a.message_id).cmp(&(b.clicked_at, &b.message_id)))
        })
    }

    /// The earliest click that carries a `ctwa_clid`, if any.
    pub fn ctwa_attribution(&self) -> Option<&Click> {
        self.clicks
            .iter()
            .filter(|click| click.ctwa_clid.is_some())
            .min_by(|a, b| (a.clicked_at, &a.message_id).cmp(&(b.clicked_at, &b.message_id)))
    }
}

/// An inbound user message, as read from a webhook.
#[derive(Debug, Clone, PartialEq)]
pub struct InboundMessage {
    pub message_id: String,
    /// `messages[].from`: phone digits; absent for users who hide their number.
    pub wa_id: Option<String>,
    /// The business-scoped user id, for users known by username.
    pub bsuid: Option<String>,
    pub profile_name: Option<String>,
    pub timestamp: i64,
    pub click: Option<Click>,
}

/// Everything one webhook `change` holds for one business number.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ChangeGroup {
    pub phone_number_id: String,
    pub messages: Vec<InboundMessage>,
    pub automatic_events: Vec<AutomaticEvent>,
}

/// Where an inbound message goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// Into the conversation at this index of the slice given to [`place_inbound`].
    Existing(usize),
    /// Into a new conversation.
    New,
}

/// Chooses the conversation of an inbound message (rules 1 and 4). Ingestion places messages
/// that carry a click with [`place_click`], which also re-partitions the user's clicks; this
/// places the others.
///
/// The message belongs to the conversation that was current at its timestamp: the latest one
/// started at or before it, or the earliest one if the message predates them all (a reordered
/// delivery). A message carrying a `ctwa_clid` opens a new conversation when that conversation's
/// click-id attribution is older than the window, measured from its `clicked_at` to the message.
pub fn place_inbound(
    conversations: &[Conversation],
    message_timestamp: i64,
    carries_ctwa_clid: bool,
    window_secs: i64,
) -> Placement {
    let current = conversations
        .iter()
        .enumerate()
        .filter(|(_, conversation)| conversation.started_at <= message_timestamp)
        .max_by_key(|(_, conversation)| conversation.started_at)
        .or_else(|| {
            conversations
                .iter()
                .enumerate()
                .min_by_key(|(_, conversation)| conversation.started_at)
        });
    let Some((index, conversation)) = current else {
        return Placement::New;
    };
    if carries_ctwa_clid {
        if let Some(attribution) = conversation.ctwa_attribution() {
            // Either way round: a click delivered late is as far from the attribution as one
            // delivered in order.
            if (message_timestamp - attribution.clicked_at).abs() > window_secs {
                return Placement::New;
            }
        }
    }
    Placement::Existing(index)
}

/// Records an inbound message (and its click, if any) on its conversation (rule 2).
///
/// Recording the same message twice (a redelivery after a crash) does not add its click twice.
pub fn record_inbound(
    conversation: &mut Conversation,
    message_timestamp: i64,
    click: Option<Click>,
) {
    if let Some(click) = &click {
        if conversation
            .clicks
            .iter()
            .any(|known| known.message_id == click.message_id && known.via == click.via)
        {
            return;
        }
    }
    conversation.started_at = conversation.started_at.min(message_timestamp);
    conversation.last_inbound_at = conversation.last_inbound_at.max(message_timestamp);
    conversation.message_count += 1;
    if let Some(click) = click {
        conversation.clicks.push(click);
    }
}

/// The timestamps at which a user's conversations start, as processing every click in
/// timestamp order decides them (rules 3 and 4): the earliest click carrying a `ctwa_clid`
/// starts the first, and each later one starts at the first such click more than the window
/// after the previous start. Depends only on the set of clicks, never on their arrival order.
pub fn conversation_starts<'a>(
    clicks: impl IntoIterator<Item = &'a Click>,
    window_secs: i64,
) -> Vec<i64> {
    let mut clicked: Vec<i64> = clicks
        .into_iter()
        .filter(|click| click.ctwa_clid.is_some())
        .map(|click| click.clicked_at)
        .collect();
    clicked.sort_unstable();
    let mut starts: Vec<i64> = Vec::new();
    for clicked_at in clicked {
        match starts.last() {
            Some(&start) if clicked_at - start <= window_secs => {}
            _ => starts.push(clicked_at),
        }
    }
    starts
}

/// The segment (index into `starts`) a timestamp falls in; anything before the first start
/// belongs to the first segment.
fn segment_of(starts: &[i64], timestamp: i64) -> usize {
    starts
        .partition_point(|&start| start <= timestamp)
        .saturating_sub(1)
}

/// What [`place_click`] did to a user's conversations.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Regrouping {
    /// Index of the conversation the message joined.
    pub joined: usize,
    /// Indices of the conversations opened (appended to the slice).
    pub opened: Vec<usize>,
    /// Indices of the conversations whose segment became another one's: each now holds only
    /// `merged_into`, and leaves the user's list.
    pub merged: Vec<usize>,
    /// Indices of every conversation that changed (including opened and merged ones).
    pub changed: Vec<usize>,
    /// Messages that moved to another conversation: (message id, its conversation id now).
    pub moved: Vec<(String, String)>,
}

/// Places an inbound message that carries a click (rules 1 to 4), in a way that does not
/// depend on arrival order: the user's conversations are re-partitioned as if every click had
/// arrived in timestamp order.
///
/// `conversations` are the user's (without merged ones). The segments are those of
/// [`conversation_starts`] over all their clicks and this one. Each segment keeps the
/// conversation whose click-id attribution lies in it (the earliest, if several do: only state
/// written before this rule existed can have several); the first segment may also keep a
/// conversation without any click id (organic, or Status-ad clicks only). A segment nobody
/// keeps gets a conversation from `open` (given its start). Every click moves to the
/// conversation of its segment, with its message (counted there, its automatic events with
/// it), so the conversation ids clients hold stay valid whenever their attribution click
/// still starts a segment. A conversation left without a segment is merged into the one its
/// attribution (or start) now falls in: its remaining message count, its time bounds and its
/// automatic events go there, and it keeps only `merged_into`. Messages without a click
/// cannot be told apart per conversation: they stay where they are, except in merged ones; a
/// conversation that gave messages away narrows its time bounds to its clicks only when it
/// holds no other message.
pub fn place_click(
    conversations: &mut Vec<Conversation>,
    message_timestamp: i64,
    click: Click,
    window_secs: i64,
    mut open: impl FnMut(i64) -> Conversation,
) -> Regrouping {
    // A redelivered click changes nothing.
    if let Some(joined) = conversations.iter().position(|conversation| {
        conversation
            .clicks
            .iter()
            .any(|known| known.message_id == click.message_id && known.via == click.via)
    }) {
        return Regrouping {
            joined,
            ..Regrouping::default()
        };
    }
    let starts = conversation_starts(
        conversations
            .iter()
            .flat_map(|conversation| &conversation.clicks)
            .chain(std::iter::once(&click)),
        window_secs,
    );
    let segments = starts.len().max(1);
    let known = conversations.len();
    // Where each conversation stood: its attribution, or its start when it has none.
    let anchors: Vec<i64> = conversations
        .iter()
        .map(|conversation| {
            conversation
                .ctwa_attribution()
                .map_or(conversation.started_at, |click| click.clicked_at)
        })
        .collect();

    // Which conversation keeps each segment.
    let mut owner: Vec<Option<usize>> = vec![None; segments];
    let mut attributed: Vec<(i64, &str, usize)> = conversations
        .iter()
        .enumerate()
        .filter_map(|(index, conversation)| {
            conversation
                .ctwa_attribution()
                .map(|click| (click.clicked_at, click.message_id.as_str(), index))
        })
        .collect();
    attributed.sort_unstable();
    for (clicked_at, _, index) in attributed {
        owner[segment_of(&starts, clicked_at)].get_or_insert(index);
    }
    if owner[0].is_none() {
        owner[0] = conversations
            .iter()
            .position(|conversation| conversation.ctwa_attribution().is_none());
    }
    let mut regrouping = Regrouping::default();
    for (segment, kept_by) in owner.iter_mut().enumerate() {
        if kept_by.is_none() {
            let start = starts.get(segment).copied().unwrap_or(message_timestamp);
            conversations.push(open(start));
            regrouping.opened.push(conversations.len() - 1);
            *kept_by = Some(conversations.len() - 1);
        }
    }
    let owner: Vec<usize> = owner.into_iter().flatten().collect();
    let mut changed = vec![false; conversations.len()];
    for &index in &regrouping.opened {
        changed[index] = true;
    }

    // Every click to the conversation of its segment, with its message.
    for from in 0..known {
        let (staying, leaving): (Vec<Click>, Vec<Click>) =
            std::mem::take(&mut conversations[from].clicks)
                .into_iter()
                .partition(|click| owner[segment_of(&starts, click.clicked_at)] == from);
        conversations[from].clicks = staying;
        let mut moved_messages: Vec<(String, i64, usize)> = Vec::new();
        for click in leaving {
            let to = owner[segment_of(&starts, click.clicked_at)];
            if !moved_messages
                .iter()
                .any(|(message_id, _, _)| *message_id == click.message_id)
            {
                moved_messages.push((click.message_id.clone(), click.clicked_at, to));
            }
            conversations[to].clicks.push(click);
            changed[from] = true;
            changed[to] = true;
        }
        let gave_away = !moved_messages.is_empty();
        for (message_id, timestamp, to) in moved_messages {
            let source = &mut conversations[from];
            source.message_count = source.message_count.saturating_sub(1);
            let (events, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut source.automatic_events)
                .into_iter()
                .partition(|event| event.message_id == message_id);
            source.automatic_events = kept;
            let target = &mut conversations[to];
            target.message_count += 1;
            target.started_at = target.started_at.min(timestamp);
            target.last_inbound_at = target.last_inbound_at.max(timestamp);
            target.automatic_events.extend(events);
            regrouping.moved.push((message_id, target.id.clone()));
        }
        if gave_away && owner.contains(&from) {
            narrow_to_clicks(&mut conversations[from]);
        }
    }

    // Conversations left without a segment merge into the one that now holds it.
    for from in 0..known {
        if owner.contains(&from) {
            continue;
        }
        let to = owner[segment_of(&starts, anchors[from])];
        let source = &mut conversations[from];
        let message_count = std::mem::take(&mut source.message_count);
        let events = std::mem::take(&mut source.automatic_events);
        let (started_at, last_inbound_at) = (source.started_at, source.last_inbound_at);
        // Its clicks moved above; whatever is left (none, unless state was inconsistent) too.
        let clicks = std::mem::take(&mut source.clicks);
        let target_id = conversations[to].id.clone();
        conversations[from].merged_into = Some(target_id);
        let target = &mut conversations[to];
        target.message_count += message_count;
        target.started_at = target.started_at.min(started_at);
        target.last_inbound_at = target.last_inbound_at.max(last_inbound_at);
        target.clicks.extend(clicks);
        for event in events {
            if !target
                .automatic_events
                .iter()
                .any(|known| known.same_event(&event))
            {
                target.automatic_events.push(event);
            }
        }
        regrouping.merged.push(from);
        changed[from] = true;
        changed[to] = true;
    }

    let joined = owner[segment_of(&starts, click.clicked_at)];
    record_inbound(&mut conversations[joined], message_timestamp, Some(click));
    changed[joined] = true;
    regrouping.joined = joined;
    regrouping.changed = (0..conversations.len())
        .filter(|&index| changed[index])
        .collect();
    regrouping
}

/// After a conversation gave messages away, its time bounds are those of its clicks when it
/// holds no other message; otherwise they stay (its messages without a click are not known).
fn narrow_to_clicks(conversation: &mut Conversation) {
    let mut messages: Vec<(&str, i64)> = conversation
        .clicks
        .iter()
        .map(|click| (click.message_id.as_str(), click.clicked_at))
        .collect();
    messages.sort_unstable();
    messages.dedup_by_key(|(message_id, _)| *message_id);
    let (Some(first), Some(last)) = (
        messages.iter().map(|(_, at)| *at).min(),
        messages.iter().map(|(_, at)| *at).max(),
    ) else {
        return;
    };
    if conversation.message_count <= messages.len() as u64 {
        conversation.started_at = first;
        conversation.last_inbound_at = last;
    }
}

/// Keeps an automatic event on its conversation and, when the conversation has no click id yet,
/// makes the event's `ctwa_clid` its attribution (rule 5). Returns false for a duplicate.
///
/// `message_timestamp` is the timestamp of the message the event points at; the filled click
/// keeps the ad fields of a Status-ad click when there is one.
pub fn apply_automatic_event(
    conversation: &mut Conversation,
    event: AutomaticEvent,
    message_timestamp: i64,
) -> bool {
    if conversation
        .automatic_events
        .iter()
        .any(|known| known.same_event(&event))
    {
        return false;
    }
    if conversation.ctwa_attribution().is_none() {
        if let Some(ctwa_clid) = &event.ctwa_clid {
            let filled = match conversation.attribution() {
                Some(status_ad_click) => Click {
                    ctwa_clid: Some(ctwa_clid.clone()),
                    via: ClickVia::AutomaticEvent,
                    captured_at: event.captured_at,
                    ..status_ad_click.clone()
                },
                None => Click {
                    ctwa_clid: Some(ctwa_clid.clone()),
                    source_id: None,
                    source_type: None,
                    source_url: None,
                    headline: None,
                    body: None,
                    media_type: None,
                    image_url: None,
                    video_url: None,
                    thumbnail_url: None,
                    welcome_message: None,
                    message_id: event.message_id.clone(),
                    clicked_at: message_timestamp,
                    captured_at: event.captured_at,
                    via: ClickVia::AutomaticEvent,
                },
            };
            conversation.clicks.push(filled);
        }
    }
    conversation.automatic_events.push(event);
    true
}

/// Rule 6: among conversations, the one whose click-id attribution was clicked last.
pub fn most_recent_attributed<'a>(
    conversations: impl IntoIterator<Item = &'a Conversation>,
) -> Option<&'a Conversation> {
    conversations
        .into_iter()
        .filter_map(|conversation| {
            conversation
                .ctwa_attribution()
                .map(|click| (click.clicked_at, conversation))
        })
        .max_by(|(a_time, a), (b_time, b)| (a_time, &a.id).cmp(&(b_time, &b.id)))
        .map(|(_, conversation)| conversation)
}

#[cfg(test)]
mod tests {
    use super::*;

    const WEEK: i64 = 7 * 86_400;

    fn click(message_id: &str, clicked_at: i64, ctwa_clid: Option<&str>) -> Click {
        Click {
            ctwa_clid: ctwa_clid.map(str::to_string),
            source_id: Some("ad-1".into()),
            source_type: Some("ad".into()),
            source_url: None,
            headline: Some("Chat with us".into()),
            body: None,
            media_type: None,
            image_url: None,
            video_url: None,
            thumbnail_url: None,
            welcome_message: None,
            message_id: message_id.into(),
            clicked_at,
            captured_at: clicked_at + 1,
            via: ClickVia::Referral,
        }
    }

    fn conversation(id: &str, started_at: i64) -> Conversation {
        Conversation::open(id.into(), "acc".into(), "wa:1".into(), started_at)
    }

    fn event(message_id: &str, ctwa_clid: Option<&str>) -> AutomaticEvent {
        AutomaticEvent {
            message_id: message_id.into(),
            event_name: "LeadSubmitted".into(),
            timestamp: 500,
            ctwa_clid: ctwa_clid.map(str::to_string),
            value: None,
            currency: None,
            captured_at: 501,
        }
    }

    #[test]
    fn first_message_opens_a_conversation() {
        assert_eq!(place_inbound(&[], 100, true, WEEK), Placement::New);
    }

    #[test]
    fn earliest_click_wins_whatever_the_arrival_order() {
        let mut conv = conversation("c", 200);
        record_inbound(&mut conv, 200, Some(click("late", 200, Some("B"))));
        record_inbound(&mut conv, 100, Some(click("early", 100, Some("A"))));
        assert_eq!(conv.attribution().unwrap().ctwa_clid.as_deref(), Some("A"));
        assert_eq!(conv.started_at, 100);
        assert_eq!(conv.last_inbound_at, 200);
    }

    #[test]
    fn click_id_beats_an_earlier_status_ad_click() {
        let mut conv = conversation("c", 100);
        record_inbound(&mut conv, 100, Some(click("status", 100, None)));
        assert_eq!(conv.attribution().unwrap().ctwa_clid, None);
        assert_eq!(conv.attribution().unwrap().message_id, "status");
        record_inbound(&mut conv, 150, Some(click("ad", 150, Some("A"))));
        assert_eq!(conv.attribution().unwrap().ctwa_clid.as_deref(), Some("A"));
    }

    #[test]
    fn a_second_click_inside_the_window_stays_in_the_conversation() {
        let mut conv = conversation("c", 100);
        record_inbound(&mut conv, 100, Some(click("m1", 100, Some("A"))));
        let placement = place_inbound(std::slice::from_ref(&conv), 100 + WEEK, true, WEEK);
        assert_eq!(placement, Placement::Existing(0));
    }

    #[test]
    fn a_second_click_after_the_window_opens_a_new_conversation() {
        let mut conv = conversation("c", 100);
        record_inbound(&mut conv, 100, Some(click("m1", 100, Some("A"))));
        let placement = place_inbound(std::slice::from_ref(&conv), 101 + WEEK, true, WEEK);
        assert_eq!(placement, Placement::New);
        // A plain message after the window still continues the conversation.
        let placement = place_inbound(std::slice::from_ref(&conv), 101 + WEEK, false, WEEK);
        assert_eq!(placement, Placement::Existing(0));
    }

    #[test]
    fn a_click_delivered_after_a_later_window_still_opens_its_own_conversation() {
        let mut later = conversation("later", 100 + 8 * 86_400);
        record_inbound(
            &mut later,
            100 + 8 * 86_400,
            Some(click("m2", 100 + 8 * 86_400, Some("B"))),
        );
        let placement = place_inbound(std::slice::from_ref(&later), 100, true, WEEK);
        assert_eq!(placement, Placement::New);
        // Inside the window it joins the conversation (and becomes its first touch).
        let placement = place_inbound(std::slice::from_ref(&later), 200 + WEEK, true, WEEK);
        assert_eq!(placement, Placement::Existing(0));
    }

    #[test]
    fn messages_go_to_the_conversation_current_at_their_timestamp() {
        let conversations = [conversation("old", 100), conversation("new", 10_000)];
        assert_eq!(
            place_inbound(&conversations, 5_000, false, WEEK),
            Placement::Existing(0)
        );
        assert_eq!(
            place_inbound(&conversations, 20_000, false, WEEK),
            Placement::Existing(1)
        );
        assert_eq!(
            place_inbound(&conversations, 50, false, WEEK),
            Placement::Existing(0)
        );
    }

    #[test]
    fn automatic_event_fills_a_missing_click_id_and_keeps_the_ad_fields() {
        let mut conv = conversation("c", 100);
        record_inbound(&mut conv, 100, Some(click("m1", 100, None)));
        assert!(apply_automatic_event(
            &mut conv,
            event("m1", Some("AUTO")),
            100
        ));
        let attribution = conv.attribution().unwrap();
        assert_eq!(attribution.ctwa_clid.as_deref(), Some("AUTO"));
        assert_eq!(attribution.via, ClickVia::AutomaticEvent);
        assert_eq!(attribution.source_id.as_deref(), Some("ad-1"));
        assert_eq!(conv.automatic_events.len(), 1);
    }

    #[test]
    fn automatic_event_does_not_replace_an_existing_click_id() {
        let mut conv = conversation("c", 100);
        record_inbound(&mut conv, 100, Some(click("m1", 100, Some("REFERRAL"))));
        assert!(apply_automatic_event(
            &mut conv,
            event("m1", Some("AUTO")),
            100
        ));
        assert_eq!(
            conv.attribution().unwrap().ctwa_clid.as_deref(),
            Some("REFERRAL")
        );
        assert_eq!(conv.clicks.len(), 1);
    }

    #[test]
    fn automatic_event_on_an_organic_chat_attributes_it() {
        let mut conv = conversation("c", 100);
        record_inbound(&mut conv, 100, None);
        assert!(apply_automatic_event(
            &mut conv,
            event("m1", Some("AUTO")),
            100
        ));
        let attribution = conv.attribution().unwrap();
        assert_eq!(attribution.ctwa_clid.as_deref(), Some("AUTO"));
        assert_eq!(attribution.clicked_at, 100);
        assert_eq!(attribution.source_id, None);
    }

    #[test]
    fn duplicate_automatic_events_change_nothing() {
        let mut conv = conversation("c", 100);
        assert!(apply_automatic_event(
            &mut conv,
            event("m1", Some("AUTO")),
            100
        ));
        let before = conv.clone();
        assert!(!apply_automatic_event(
            &mut conv,
            event("m1", Some("AUTO")),
            100
        ));
        assert_eq!(conv, before);
    }

    #[test]
    fn phone_lookup_takes_the_latest_click_id_attribution() {
        let mut first = conversation("first", 100);
        record_inbound(&mut first, 100, Some(click("m1", 100, Some("A"))));
        let mut second = conversation("second", 100 + 2 * WEEK);
        record_inbound(
            &mut second,
            100 + 2 * WEEK,
            Some(click("m2", 100 + 2 * WEEK, Some("B"))),
        );
        let mut organic = conversation("organic", 100 + 3 * WEEK);
        record_inbound(&mut organic, 100 + 3 * WEEK, None);
        let all = [first, second, organic];
        assert_eq!(most_recent_attributed(&all).unwrap().id, "second");
    }

    #[test]
    fn conversations_start_where_timestamp_order_would_start_them() {
        let clicks = [
            click("d", 430, Some("D")),
            click("b", 314, Some("B")),
            click("status", 200, None),
            click("a", 0, Some("A")),
            click("c", 351, Some("C")),
        ];
        assert_eq!(conversation_starts(&clicks, 100), vec![0, 314, 430]);
        assert_eq!(conversation_starts(&clicks[..2], 100), vec![314, 430]);
        assert_eq!(conversation_starts(&clicks[2..3], 100), Vec::<i64>::new());
    }

    fn open_at(started_at: i64) -> Conversation {
        conversation(&format!("new-{started_at}"), started_at)
    }

    #[test]
    fn a_late_click_moves_the_clicks_it_now_starts_a_conversation_for() {
        // C and D share a conversation until B arrives: then {B, C} and {D}.
        let mut conv = conversation("kept", 351);
        record_inbound(&mut conv, 351, Some(click("c", 351, Some("C"))));
        record_inbound(&mut conv, 430, Some(click("d", 430, Some("D"))));
        let mut conversations = vec![conv];
        let regrouping = place_click(
            &mut conversations,
            314,
            click("b", 314, Some("B")),
            100,
            open_at,
        );
        assert_eq!(regrouping.joined, 0);
        assert_eq!(regrouping.opened, vec![1]);
        assert_eq!(regrouping.merged, Vec::<usize>::new());
        assert_eq!(regrouping.changed, vec![0, 1]);
        assert_eq!(
            regrouping.moved,
            vec![("d".to_string(), "new-430".to_string())]
        );
        let [kept, opened] = &conversations[..] else {
            panic!("two conversations")
        };
        assert_eq!(kept.attribution().unwrap().message_id, "b");
        assert_eq!(
            (kept.message_count, kept.started_at, kept.last_inbound_at),
            (2, 314, 351)
        );
        assert_eq!(opened.attribution().unwrap().message_id, "d");
        assert_eq!((opened.message_count, opened.started_at), (1, 430));

        // With a message without a click among them, its bounds cannot be narrowed.
        let mut conv = conversation("kept", 351);
        record_inbound(&mut conv, 351, Some(click("c", 351, Some("C"))));
        record_inbound(&mut conv, 360, None);
        record_inbound(&mut conv, 430, Some(click("d", 430, Some("D"))));
        let mut conversations = vec![conv];
        place_click(
            &mut conversations,
            314,
            click("b", 314, Some("B")),
            100,
            open_at,
        );
        let kept = &conversations[0];
        assert_eq!(
            (kept.message_count, kept.started_at, kept.last_inbound_at),
            (3, 314, 430)
        );
    }

    #[test]
    fn a_status_ad_click_goes_to_the_conversation_of_its_segment() {
        let mut first = conversation("first", 0);
        record_inbound(&mut first, 0, Some(click("a", 0, Some("A"))));
        let mut second = conversation("second", 314);
        record_inbound(&mut second, 314, Some(click("b", 314, Some("B"))));
        let mut conversations = vec![second, first];
        let late = place_click(&mut conversations, 90, click("s1", 90, None), 100, open_at);
        let early = place_click(&mut conversations, -5, click("s2", -5, None), 100, open_at);
        let after = place_click(
            &mut conversations,
            900,
            click("s3", 900, None),
            100,
            open_at,
        );
        assert_eq!((late.joined, early.joined, after.joined), (1, 1, 0));
        assert_eq!(conversations.len(), 2, "a Status-ad click opens nothing");
        // A redelivered click changes nothing.
        let again = place_click(&mut conversations, 90, click("s1", 90, None), 100, open_at);
        assert_eq!((again.joined, again.changed.len()), (1, 0));
        assert_eq!(conversations[1].message_count, 3);
    }
}
