//! Any bytes a client may POST to `/v1/whatsapp/conversions` → the route's JSON reading
//! (`JsonBody`: raw JSON, nesting limit, the body type), then the rules of SPEC §4.4
//! (`conversions::request::validate`). It must never panic; within the nesting limit serde_json's
//! recursion limit never bites; a refusal is a 400 with a code; an accepted request satisfies
//! every rule and carries the caller's values.
#![no_main]

use ctwa_relay::conversions::request::{validate, ConversionBody, Lookup, ValidConversion};
use ctwa_relay::domain::conversion::{MAX_EVENT_AGE_SECS, MAX_FUTURE_SKEW_SECS};
use ctwa_relay::json_body::{nesting_exceeds, MAX_JSON_NESTING};
use ctwa_relay::settings::DEFAULT_EVENT_NAMES;
use libfuzzer_sys::fuzz_target;
use serde_json::value::RawValue;
use serde_json::Value;

/// The clock the corpus is written against (2025-06-15).
const NOW: i64 = 1_750_000_000;

fn is_sha256_hex(text: &str) -> bool {
    text.len() == 64 && text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn non_blank_string(document: &Value, field: &str) -> bool {
    document
        .get(field)
        .and_then(Value::as_str)
        .is_some_and(|text| !text.trim().is_empty())
}

fuzz_target!(|data: &[u8]| {
    // The route's own path (`JsonBody`): the whole body as raw JSON (which checks UTF-8 in
    // unknown fields too), the nesting limit, then the body type.
    let Ok(raw) = serde_json::from_slice::<Box<RawValue>>(data) else {
        return;
    };
    let json = raw.get();
    if nesting_exceeds(json.as_bytes(), MAX_JSON_NESTING) {
        return;
    }
    // Within the limit, serde_json's own recursion limit (128) is never what stops a read.
    let document = serde_json::from_str::<Value>(json);
    if let Err(error) = &document {
        assert!(!error.to_string().contains("recursion limit"), "{error}");
    }
    let Ok(body) = serde_json::from_str::<ConversionBody>(json) else {
        return;
    };
    let allowlist: Vec<String> = DEFAULT_EVENT_NAMES.iter().map(|n| n.to_string()).collect();
    let conversion = match validate(body, &allowlist, NOW) {
        Ok(conversion) => conversion,
        Err(error) => {
            assert_eq!(error.status().as_u16(), 400, "{error:?}");
            assert!(!error.code().as_str().is_empty() && !error.text().is_empty());
            return;
        }
    };
    keeps_the_rules(&conversion, &allowlist);
    // A number out of f64's range in an unknown field is skipped by the body type but refused
    // by `Value`; such a body is only checked against the rules.
    if let Ok(document) = document {
        carries_the_callers_values(&conversion, &document);
    }
});

fn keeps_the_rules(conversion: &ValidConversion, allowlist: &[String]) {
    assert!(!conversion.account_id.trim().is_empty());
    assert!(allowlist
        .iter()
        .any(|name| name == conversion.event_name.as_str()));
    let event_id = conversion.event_id.as_str();
    assert!((1..=256).contains(&event_id.chars().count()) && !event_id.contains('\0'));
    let event_time = conversion.event_time;
    assert!((NOW - MAX_EVENT_AGE_SECS..=NOW + MAX_FUTURE_SKEW_SECS).contains(&event_time));
    assert!(event_time < 10_000_000_000);
    match &conversion.lookup {
        Lookup::Conversation(id) => assert!(!id.trim().is_empty()),
        Lookup::Phone(phone) => {
            let digits = phone.as_str();
            assert!((7..=15).contains(&digits.len()));
            assert!(digits.bytes().all(|b| b.is_ascii_digit()));
        }
    }
    if let Some(value) = conversion.value {
        assert!(value.is_finite() && value >= 0.0);
        assert!(conversion.currency.is_some(), "value without currency");
    }
    if let Some(currency) = &conversion.currency {
        let code = currency.as_str();
        assert!(code.len() == 3 && code.bytes().all(|b| b.is_ascii_uppercase()));
    }
    if conversion.event_name.as_str() == "Purchase" {
        assert!(conversion.value.is_some() && conversion.currency.is_some());
    }
    assert!(conversion.content_ids.len() <= 1000);
    assert!(conversion
        .content_ids
        .iter()
        .all(|id| !id.is_empty() && id.len() <= 256));
    for hash in [&conversion.email_hash, &conversion.external_id_hash]
        .into_iter()
        .flatten()
    {
        assert!(is_sha256_hex(hash), "{hash}");
    }
    if let Some(code) = &conversion.test_code {
        assert!(!code.trim().is_empty());
    }
}

fn carries_the_callers_values(conversion: &ValidConversion, document: &Value) {
    assert_eq!(document["accountId"], conversion.account_id.as_str());
    assert_eq!(document["eventName"], conversion.event_name.as_str());
    assert_eq!(document["eventId"], conversion.event_id.as_str());
    match document.get("eventTime") {
        None | Some(Value::Null) => assert_eq!(conversion.event_time, NOW),
        Some(given) => assert_eq!(given.as_i64(), Some(conversion.event_time)),
    }
    match &conversion.lookup {
        Lookup::Conversation(id) => assert_eq!(document["conversationId"], id.as_str()),
        Lookup::Phone(phone) => {
            assert!(!non_blank_string(document, "conversationId"));
            assert_eq!(document["phoneE164"], phone.as_str());
        }
    }
    if let Some(currency) = &conversion.currency {
        let given = document["currency"].as_str().expect("currency was given");
        assert!(given.trim().eq_ignore_ascii_case(currency.as_str()));
    }
    assert_eq!(
        conversion.email_hash.is_some(),
        non_blank_string(document, "email")
    );
    assert_eq!(
        conversion.external_id_hash.is_some(),
        non_blank_string(document, "externalId")
    );
}
