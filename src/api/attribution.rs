//! The lookups' bodies (SPEC §4.5): a conversation in Zernio's shape, with its attribution as
//! `metadata.ctwa_*`, every click, and its recent conversions. Absent values are `null`.

use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::api::conversions::HistoryItem;
use crate::attribution::{AutomaticEvent, Click, ClickVia, Conversation};
use crate::domain::user::UserRecord;
use crate::routes::rfc3339;

/// The WhatsApp user of a conversation.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct UserView {
    /// The phone number as WhatsApp gives it (digits).
    pub wa_id: Option<String>,
    /// The business-scoped user id.
    pub bsuid: Option<String>,
    /// The profile name.
    pub name: Option<String>,
}

impl From<&UserRecord> for UserView {
    fn from(user: &UserRecord) -> Self {
        Self {
            wa_id: user.wa_id().map(str::to_string),
            bsuid: user.bsuid().map(str::to_string),
            name: user.name().map(str::to_string),
        }
    }
}

/// How a click was learned: a message's referral, or one of Meta's automatic events.
#[derive(Debug, Clone, Copy, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ClickViaView {
    Referral,
    AutomaticEvent,
}

impl From<ClickVia> for ClickViaView {
    fn from(via: ClickVia) -> Self {
        match via {
            ClickVia::Referral => Self::Referral,
            ClickVia::AutomaticEvent => Self::AutomaticEvent,
        }
    }
}

/// One ad click seen in the conversation.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClickView {
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
    pub message_id: String,
    /// RFC 3339 UTC.
    pub clicked_at: String,
    /// RFC 3339 UTC.
    pub captured_at: String,
    pub via: ClickViaView,
}

impl From<&Click> for ClickView {
    fn from(click: &Click) -> Self {
        Self {
            ctwa_clid: click.ctwa_clid.clone(),
            source_id: click.source_id.clone(),
            source_type: click.source_type.clone(),
            source_url: click.source_url.clone(),
            headline: click.headline.clone(),
            body: click.body.clone(),
            media_type: click.media_type.clone(),
            image_url: click.image_url.clone(),
            video_url: click.video_url.clone(),
            thumbnail_url: click.thumbnail_url.clone(),
            welcome_message: click.welcome_message.clone(),
            message_id: click.message_id.clone(),
            clicked_at: rfc3339(click.clicked_at),
            captured_at: rfc3339(click.captured_at),
            via: click.via.into(),
        }
    }
}

/// One of Meta's automatic events (a purchase or lead Meta detected in the chat).
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AutomaticEventView {
    pub message_id: String,
    pub event_name: String,
    /// RFC 3339 UTC.
    pub timestamp: String,
    pub ctwa_clid: Option<String>,
    pub value: Option<f64>,
    pub currency: Option<String>,
    /// RFC 3339 UTC.
    pub captured_at: String,
}

impl From<&AutomaticEvent> for AutomaticEventView {
    fn from(event: &AutomaticEvent) -> Self {
        Self {
            message_id: event.message_id.clone(),
            event_name: event.event_name.clone(),
            timestamp: rfc3339(event.timestamp),
            ctwa_clid: event.ctwa_clid.clone(),
            value: event.value,
            currency: event.currency.clone(),
            captured_at: rfc3339(event.captured_at),
        }
    }
}

/// The conversation's attribution (its first-touch click), under Zernio's `ctwa_*` names.
#[derive(Debug, Default, Serialize, ToSchema)]
pub struct CtwaMetadata {
    pub ctwa_clid: Option<String>,
    pub ctwa_source_id: Option<String>,
    pub ctwa_source_type: Option<String>,
    pub ctwa_source_url: Option<String>,
    pub ctwa_headline: Option<String>,
    pub ctwa_body: Option<String>,
    pub ctwa_media_type: Option<String>,
    pub ctwa_image_url: Option<String>,
    pub ctwa_video_url: Option<String>,
    pub ctwa_thumbnail_url: Option<String>,
    pub ctwa_welcome_message: Option<String>,
    /// RFC 3339 UTC.
    pub ctwa_clicked_at: Option<String>,
    /// RFC 3339 UTC.
    pub ctwa_captured_at: Option<String>,
    pub ctwa_message_id: Option<String>,
    pub ctwa_via: Option<ClickViaView>,
}

impl From<Option<&Click>> for CtwaMetadata {
    fn from(attribution: Option<&Click>) -> Self {
        let Some(click) = attribution else {
            return Self::default();
        };
        Self {
            ctwa_clid: click.ctwa_clid.clone(),
            ctwa_source_id: click.source_id.clone(),
            ctwa_source_type: click.source_type.clone(),
            ctwa_source_url: click.source_url.clone(),
            ctwa_headline: click.headline.clone(),
            ctwa_body: click.body.clone(),
            ctwa_media_type: click.media_type.clone(),
            ctwa_image_url: click.image_url.clone(),
            ctwa_video_url: click.video_url.clone(),
            ctwa_thumbnail_url: click.thumbnail_url.clone(),
            ctwa_welcome_message: click.welcome_message.clone(),
            ctwa_clicked_at: Some(rfc3339(click.clicked_at)),
            ctwa_captured_at: Some(rfc3339(click.captured_at)),
            ctwa_message_id: Some(click.message_id.clone()),
            ctwa_via: Some(click.via.into()),
        }
    }
}

/// A conversation in Zernio's shape.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConversationView {
    pub id: String,
    pub account_id: String,
    pub user: Option<UserView>,
    /// RFC 3339 UTC.
    pub started_at: String,
    /// RFC 3339 UTC.
    pub last_inbound_at: String,
    pub message_count: u64,
    pub metadata: CtwaMetadata,
    /// Every click seen, oldest first.
    pub clicks: Vec<ClickView>,
    pub automatic_events: Vec<AutomaticEventView>,
    /// Its latest conversions (up to 10), newest first.
    pub recent_conversions: Vec<HistoryItem>,
}

impl ConversationView {
    pub fn new(
        conversation: &Conversation,
        user: Option<&UserRecord>,
        recent_conversions: Vec<HistoryItem>,
    ) -> Self {
        Self {
            id: conversation.id.clone(),
            account_id: conversation.account_id.clone(),
            user: user.map(UserView::from),
            started_at: rfc3339(conversation.started_at),
            last_inbound_at: rfc3339(conversation.last_inbound_at),
            message_count: conversation.message_count,
            metadata: CtwaMetadata::from(conversation.attribution()),
            clicks: conversation.clicks.iter().map(ClickView::from).collect(),
            automatic_events: conversation
                .automatic_events
                .iter()
                .map(AutomaticEventView::from)
                .collect(),
            recent_conversions,
        }
    }
}

/// One user matching the lookup, with their conversations on one account.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AttributionResult {
    pub account_id: String,
    pub user: UserView,
    /// Newest first.
    pub conversations: Vec<ConversationView>,
}

/// `GET /v1/whatsapp/attribution`.
#[derive(Debug, Serialize, ToSchema)]
pub struct AttributionAnswer {
    /// The phone looked up, as digits.
    pub phone: Option<String>,
    pub bsuid: Option<String>,
    pub results: Vec<AttributionResult>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(rename_all = "camelCase")]
#[into_params(parameter_in = Query)]
pub struct AttributionQuery {
    /// Digits with the country code (7-15); `phone` or `bsuid` is required.
    #[param(pattern = "^[0-9]{7,15}$")]
    pub phone: Option<String>,
    /// A business-scoped user id.
    pub bsuid: Option<String>,
    /// Only this account.
    pub account_id: Option<String>,
}
