//! The `POST /v1/whatsapp/conversions` request: its body as Zernio names it, and the rules of
//! SPEC §4.4 that turn it into a [`ValidConversion`]. Pure (no store, no clock), so the parser
//! that faces the internet can be fuzzed and property-tested on its own.

use crate::conversions::payload::normalise_and_hash;
use crate::domain::conversion::{
    parse_event_time, parse_value, Currency, EventId, EventName, FieldError,
};
use crate::domain::phone::PhoneDigits;
use crate::error::{ApiError, Code};

/// The request body, as Zernio names it; a DTO of the API, so the document describes it.
pub use crate::api::conversions::ConversionBody;

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
    ApiError::new(error.code).message(error.message)
}

/// Applies SPEC §4.4 to a request body: `event_names` is the configured allowlist, `now_secs`
/// the current unix time that bounds `eventTime`.
pub fn validate(
    body: ConversionBody,
    event_names: &[String],
    now_secs: i64,
) -> Result<ValidConversion, ApiError> {
    if body.account_id.trim().is_empty() {
        return Err(ApiError::new(Code::InvalidAccountId));
    }
    let event_name = EventName::parse(&body.event_name, event_names).map_err(field_error)?;
    let event_id = EventId::parse(&body.event_id).map_err(field_error)?;
    let event_time = parse_event_time(body.event_time, now_secs).map_err(field_error)?;
    let lookup = match (body.conversation_id, body.phone_e164) {
        (Some(id), _) if !id.trim().is_empty() => Lookup::Conversation(id),
        (_, Some(phone)) if !phone.trim().is_empty() => {
            Lookup::Phone(PhoneDigits::parse(&phone).map_err(|message| {
                ApiError::new(Code::InvalidPhone).message(format!("phoneE164: {message}"))
            })?)
        }
        _ => return Err(ApiError::new(Code::MissingConversation)),
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
        return Err(ApiError::new(Code::MissingCurrency));
    }
    if event_name.as_str() == "Purchase" {
        if value.is_none() {
            return Err(ApiError::new(Code::MissingValue));
        }
        if currency.is_none() {
            return Err(ApiError::new(Code::MissingCurrency)
                .message("Purchase events need value and currency"));
        }
    }
    let content_ids = body.content_ids.unwrap_or_default();
    if content_ids.len() > 1000 || content_ids.iter().any(|id| id.is_empty() || id.len() > 256) {
        return Err(ApiError::new(Code::InvalidContentIds));
    }
    let email_hash = match body.email.as_deref().map(str::trim) {
        None | Some("") => None,
        Some(email) if email.contains('@') || email.len() == 64 => Some(normalise_and_hash(email)),
        Some(_) => return Err(ApiError::new(Code::InvalidEmail)),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::conversion::{MAX_EVENT_AGE_SECS, MAX_FUTURE_SKEW_SECS};
    use crate::settings::DEFAULT_EVENT_NAMES;
    use proptest::prelude::*;

    const NOW: i64 = 1_750_000_000;

    fn allowlist() -> Vec<String> {
        DEFAULT_EVENT_NAMES
            .iter()
            .map(|name| name.to_string())
            .collect()
    }

    fn body(json: serde_json::Value) -> ConversionBody {
        serde_json::from_value(json).expect("a well-formed body")
    }

    #[test]
    fn the_fixture_request_is_valid_and_hashed() {
        let raw = include_str!("../../fixtures/conversions/purchase_request.json");
        let conversion = validate(serde_json::from_str(raw).unwrap(), &allowlist(), NOW).unwrap();
        assert_eq!(conversion.event_name.as_str(), "Purchase");
        assert_eq!(conversion.event_time, NOW);
        assert_eq!(conversion.currency.unwrap().as_str(), "USD");
        assert_eq!(
            conversion.email_hash.as_deref(),
            Some("62a14e44f765419d10fea99367361a727c12365e2520f32218d505ed9aa0f62f")
        );
        assert!(matches!(conversion.lookup, Lookup::Conversation(id) if id == "<CONVERSATION_ID>"));
    }

    #[test]
    fn event_times_at_the_ends_of_i64_are_refused_without_overflow() {
        for (event_time, code) in [
            (i64::MIN, "event_time_too_old"),
            (i64::MIN + 1, "event_time_too_old"),
            (-1, "event_time_too_old"),
            (i64::MAX, "event_time_in_milliseconds"),
        ] {
            let error = validate(
                body(
                    serde_json::json!({"accountId": "a", "eventName": "LeadSubmitted",
                    "eventId": "e", "conversationId": "c", "eventTime": event_time}),
                ),
                &allowlist(),
                NOW,
            )
            .unwrap_err();
            assert_eq!(error.code(), code, "{event_time}");
        }
    }

    fn event_time() -> impl Strategy<Value = Option<i64>> {
        prop::option::of(prop_oneof![
            any::<i64>(),
            Just(i64::MIN),
            Just(i64::MAX),
            NOW - MAX_EVENT_AGE_SECS - 5..NOW - MAX_EVENT_AGE_SECS + 5,
            NOW + MAX_FUTURE_SKEW_SECS - 5..NOW + MAX_FUTURE_SKEW_SECS + 5,
            NOW - 10 * 86_400..NOW + 1_000,
            NOW * 1000 - 5..NOW * 1000 + 5,
        ])
    }

    fn currency() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("USD".to_string()),
            Just(" brl ".to_string()),
            Just("eUr".to_string()),
            Just("XXX".to_string()),
            Just("XAU".to_string()),
            "[A-Za-z]{2,4}",
            "\\PC{0,4}",
        ]
    }

    fn value() -> impl Strategy<Value = f64> {
        prop_oneof![
            0.0..1e7_f64,
            -1e3..0.0_f64,
            any::<f64>(),
            Just(-0.0),
            Just(f64::NAN),
            Just(f64::INFINITY),
            Just(f64::NEG_INFINITY),
        ]
    }

    fn content_ids() -> impl Strategy<Value = Vec<String>> {
        let id = prop_oneof![
            "[a-z0-9-]{1,12}",
            Just(String::new()),
            (250usize..260).prop_map(|n| "x".repeat(n)),
            (60usize..70).prop_map(|n| "é".repeat(n)),
        ];
        prop_oneof![
            prop::collection::vec(id, 0..5),
            (999usize..1002).prop_map(|n| vec!["sku".to_string(); n]),
        ]
    }

    prop_compose! {
        fn conversion_body()(
            account_id in prop_oneof![1 => Just(String::new()), 1 => Just(" \t".to_string()), 8 => "[a-z_]{1,10}"],
            event_name in prop_oneof![
                8 => prop::sample::select(DEFAULT_EVENT_NAMES.to_vec()).prop_map(str::to_string),
                1 => Just("Lead".to_string()),
                1 => Just("purchase".to_string()),
                1 => "\\PC{0,12}",
            ],
            event_id in prop_oneof![
                8 => "[a-z0-9-]{1,16}",
                1 => Just(String::new()),
                1 => Just("a\0b".to_string()),
                2 => (254usize..259).prop_map(|n| "é".repeat(n)),
                2 => "\\PC{0,40}",
            ],
            event_time in event_time(),
            conversation_id in prop::option::of(prop_oneof![Just(String::new()), Just("  ".to_string()), "conv_[a-z0-9]{1,8}"]),
            phone_e164 in prop::option::of(prop_oneof![
                "[0-9]{5,17}",
                "\\+[0-9]{11}",
                " [0-9]{11}",
                "[0-9 ()-]{7,15}",
                Just(String::new()),
            ]),
            (value, currency) in (prop::option::of(value()), prop::option::of(currency())),
            content_ids in prop::option::of(content_ids()),
            email in prop::option::of(prop_oneof![
                "[a-z._]{1,8}@[a-z]{1,8}\\.com",
                " [A-Z]{1,4}@[A-Z]{1,4}\\.COM ",
                "[0-9a-f]{64}",
                "[ -~]{0,70}",
            ]),
            external_id in prop::option::of(prop_oneof![Just(" ".to_string()), "[ -~]{0,20}"]),
            test_code in prop::option::of(prop_oneof![Just(" ".to_string()), "TEST[0-9]{1,5}"]),
            dry_run in any::<bool>(),
        ) -> ConversionBody {
            ConversionBody {
                account_id, event_name, event_id, event_time, conversation_id, phone_e164,
                value, currency, content_ids, email, external_id, test_code, dry_run,
            }
        }
    }

    fn is_sha256_hex(text: &str) -> bool {
        text.len() == 64 && text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    }

    fn non_blank(text: &Option<String>) -> bool {
        text.as_deref().is_some_and(|text| !text.trim().is_empty())
    }

    /// SPEC §4.4, read straight off the table, for one request.
    fn follows_the_spec(body: &ConversionBody) -> bool {
        let event_id_chars = body.event_id.chars().count();
        let lookup_found = if non_blank(&body.conversation_id) {
            true
        } else if non_blank(&body.phone_e164) {
            let phone = body.phone_e164.as_deref().unwrap_or_default();
            (7..=15).contains(&phone.len()) && phone.bytes().all(|b| b.is_ascii_digit())
        } else {
            false
        };
        let content_ids = body.content_ids.as_deref().unwrap_or_default();
        !body.account_id.trim().is_empty()
            && DEFAULT_EVENT_NAMES.contains(&body.event_name.as_str())
            && (1..=256).contains(&event_id_chars)
            && !body.event_id.contains('\0')
            && body.event_time.is_none_or(|time| {
                (..10_000_000_000).contains(&time)
                    && (NOW - MAX_EVENT_AGE_SECS..=NOW + MAX_FUTURE_SKEW_SECS).contains(&time)
            })
            && lookup_found
            && body
                .value
                .is_none_or(|value| value.is_finite() && value >= 0.0)
            && body
                .currency
                .as_deref()
                .is_none_or(|code| Currency::parse(code).is_ok())
            && (body.value.is_none() || body.currency.is_some())
            && (body.event_name != "Purchase" || (body.value.is_some() && body.currency.is_some()))
            && content_ids.len() <= 1000
            && content_ids.iter().all(|id| (1..=256).contains(&id.len()))
            && body
                .email
                .as_deref()
                .map(str::trim)
                .is_none_or(|email| email.is_empty() || email.contains('@') || email.len() == 64)
    }

    proptest! {
        #[test]
        fn accepted_exactly_when_the_spec_allows_and_then_faithful(body in conversion_body()) {
            let expected = follows_the_spec(&body);
            let given_event_id = body.event_id.clone();
            let given_event_time = body.event_time;
            let given_email = body.email.clone();
            let given_external_id = body.external_id.clone();
            let given_value = body.value;
            let result = validate(body, &allowlist(), NOW);
            prop_assert_eq!(result.is_ok(), expected, "{:?}", result);
            let conversion = match result {
                Ok(conversion) => conversion,
                Err(error) => {
                    prop_assert_eq!(error.status().as_u16(), 400);
                    return Ok(());
                }
            };
            prop_assert_eq!(conversion.event_id.as_str(), given_event_id.as_str());
            prop_assert_eq!(conversion.event_time, given_event_time.unwrap_or(NOW));
            prop_assert!(conversion.event_time >= NOW - MAX_EVENT_AGE_SECS);
            prop_assert!(conversion.event_time <= NOW + MAX_FUTURE_SKEW_SECS);
            prop_assert_eq!(conversion.value.map(f64::to_bits), given_value.map(f64::to_bits));
            if let Some(currency) = &conversion.currency {
                prop_assert_eq!(currency.as_str().len(), 3);
                prop_assert!(currency.as_str().bytes().all(|b| b.is_ascii_uppercase()));
            }
            if let Lookup::Phone(phone) = &conversion.lookup {
                prop_assert!(phone.as_str().bytes().all(|b| b.is_ascii_digit()));
            }
            prop_assert_eq!(conversion.email_hash.is_some(), non_blank(&given_email));
            prop_assert_eq!(conversion.external_id_hash.is_some(), non_blank(&given_external_id));
            for hash in [&conversion.email_hash, &conversion.external_id_hash].into_iter().flatten() {
                prop_assert!(is_sha256_hex(hash), "{}", hash);
            }
            prop_assert!(conversion.test_code.as_deref().is_none_or(|code| !code.trim().is_empty()));
        }

        /// Every field of the JSON body given a value of any type: serde reads it or refuses it,
        /// and whatever passes keeps the rules.
        #[test]
        fn bodies_of_any_field_types_are_read_or_refused(
            fields in prop::collection::vec(
                (prop::sample::select(FIELDS.to_vec()), prop::option::of(json_leaf())),
                0..16,
            )
        ) {
            let document: serde_json::Map<String, serde_json::Value> = fields
                .into_iter()
                .filter_map(|(name, value)| Some((name.to_string(), value?)))
                .collect();
            let raw = serde_json::to_vec(&document).unwrap();
            let Ok(body) = serde_json::from_slice::<ConversionBody>(&raw) else {
                return Ok(());
            };
            if let Ok(conversion) = validate(body, &allowlist(), NOW) {
                prop_assert!(!conversion.account_id.trim().is_empty());
                prop_assert_eq!(&document["eventId"], conversion.event_id.as_str());
                let given_time = document.get("eventTime").and_then(serde_json::Value::as_i64);
                prop_assert_eq!(conversion.event_time, given_time.unwrap_or(NOW));
                prop_assert!(conversion.value.is_none_or(|value| value.is_finite() && value >= 0.0));
            }
        }
    }

    const FIELDS: [&str; 14] = [
        "accountId",
        "eventName",
        "eventId",
        "eventTime",
        "conversationId",
        "phoneE164",
        "value",
        "currency",
        "contentIds",
        "email",
        "externalId",
        "testCode",
        "dryRun",
        "unknownField",
    ];

    fn json_leaf() -> impl Strategy<Value = serde_json::Value> {
        use serde_json::Value;
        prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            (NOW - 10 * 86_400..NOW + 1_000).prop_map(Value::from),
            any::<f64>().prop_map(Value::from),
            prop_oneof![
                Just("LeadSubmitted"),
                Just("Purchase"),
                Just("acc"),
                Just("usd"),
                Just("16505551234"),
                Just("a@b.c"),
                Just(" "),
                Just(""),
            ]
            .prop_map(Value::from),
            prop::collection::vec("[a-z]{0,3}", 0..3).prop_map(Value::from),
        ]
    }
}
