//! The `POST /v1/whatsapp/conversions` request: its body as Zernio names it, and the rules of
//! SPEC §4.4 that turn it into a [`ValidConversion`]. Pure (no store, no clock), so the parser
//! that faces the internet can be fuzzed and property-tested on its own.

use serde::Deserialize;

use crate::conversions::payload::normalise_and_hash;
use crate::domain::conversion::{
    parse_event_time, parse_value, Currency, EventId, EventName, FieldError,
};
use crate::domain::phone::PhoneDigits;
use crate::error::ApiError;

/// The request body, as Zernio names it. Unknown fields are ignored.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConversionBody {
    account_id: String,
    event_name: String,
    event_id: String,
    event_time: Option<i64>,
    conversation_id: Option<String>,
    phone_e164: Option<String>,
    value: Option<f64>,
    currency: Option<String>,
    content_ids: Option<Vec<String>>,
    email: Option<String>,
    external_id: Option<String>,
    test_code: Option<String>,
    #[serde(default)]
    dry_run: bool,
}

/// How the conversation is found: by its id (preferred) or by the user's phone.
#[derive(Debug)]
pub enum Lookup {
    Conversation(String),
    Phone(PhoneDigits),
}

/// A request that passed every rule of SPEC §4.4; customer data is hashed already.
#[derive(Debug)]
pub struct ValidConversion {
    pub account_id: String,
    pub event_name: EventName,
    pub event_id: EventId,
    pub event_time: i64,
    pub lookup: Lookup,
    pub value: Option<f64>,
    pub currency: Option<Currency>,
    pub content_ids: Vec<String>,
    pub email_hash: Option<String>,
    pub external_id_hash: Option<String>,
    pub test_code: Option<String>,
    pub dry_run: bool,
}

fn field_error(error: FieldError) -> ApiError {
    ApiError::bad_request(error.code, error.message)
}

/// Applies SPEC §4.4 to a request body: `event_names` is the configured allowlist, `now_secs`
/// the current unix time that bounds `eventTime`.
pub fn validate(
    body: ConversionBody,
    event_names: &[String],
    now_secs: i64,
) -> Result<ValidConversion, ApiError> {
    if body.account_id.trim().is_empty() {
        return Err(ApiError::bad_request(
            "invalid_account_id",
            "accountId must not be empty",
        ));
    }
    let event_name = EventName::parse(&body.event_name, event_names).map_err(field_error)?;
    let event_id = EventId::parse(&body.event_id).map_err(field_error)?;
    let event_time = parse_event_time(body.event_time, now_secs).map_err(field_error)?;
    let lookup = match (body.conversation_id, body.phone_e164) {
        (Some(id), _) if !id.trim().is_empty() => Lookup::Conversation(id),
        (_, Some(phone)) if !phone.trim().is_empty() => {
            Lookup::Phone(PhoneDigits::parse(&phone).map_err(|message| {
                ApiError::bad_request("invalid_phone", format!("phoneE164: {message}"))
            })?)
        }
        _ => {
            return Err(ApiError::bad_request(
                "missing_conversation",
                "give conversationId (preferred) or phoneE164 to identify the conversation",
            ))
        }
    };
    let value = body
        .value
        .map(parse_value)
        .transpose()
        .map_err(field_error)?;
    let currency = body
        .currency
        .as_deref()
        .map(Currency::parse)
        .transpose()
        .map_err(field_error)?;
    if value.is_some() && currency.is_none() {
        return Err(ApiError::bad_request(
            "missing_currency",
            "currency is required with value",
        ));
    }
    if event_name.as_str() == "Purchase" {
        if value.is_none() {
            return Err(ApiError::bad_request(
                "missing_value",
                "Purchase events need value and currency",
            ));
        }
        if currency.is_none() {
            return Err(ApiError::bad_request(
                "missing_currency",
                "Purchase events need value and currency",
            ));
        }
    }
    let content_ids = body.content_ids.unwrap_or_default();
    if content_ids.len() > 1000 || content_ids.iter().any(|id| id.is_empty() || id.len() > 256) {
        return Err(ApiError::bad_request(
            "invalid_content_ids",
            "contentIds must hold at most 1000 non-empty ids of up to 256 characters",
        ));
    }
    let email_hash = match body.email.as_deref().map(str::trim) {
        None | Some("") => None,
        Some(email) if email.contains('@') || email.len() == 64 => Some(normalise_and_hash(email)),
        Some(_) => {
            return Err(ApiError::bad_request(
                "invalid_email",
                "email must be an e-mail address",
            ))
        }
    };
    let external_id_hash = match body.external_id.as_deref().map(str::trim) {
        None | Some("") => None,
        Some(external_id) => Some(normalise_and_hash(external_id)),
    };
    Ok(ValidConversion {
        account_id: body.account_id,
        event_name,
        event_id,
        event_time,
        lookup,
        value,
        currency,
        content_ids,
        email_hash,
        external_id_hash,
        test_code: body.test_code.filter(|code| !code.trim().is_empty()),
        dry_run: body.dry_run,
    })
}
