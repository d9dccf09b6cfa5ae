//! Conversations and first-touch attribution (SPEC §5.2), as pure functions over plain data.
//!
//! Nothing here knows about HTTP or the store: the store reads a user's conversations, asks
//! these functions what changes, and writes the result back on its writer thread.

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

/// Chooses the conversation of an inbound message (rules 1 and 4).
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
}
