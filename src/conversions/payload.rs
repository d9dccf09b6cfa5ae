//! The exact Conversions API body (SPEC §5.3) and customer-data hashing (PROTOCOLS §3).

use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

/// Everything that goes into one business-messaging event.
#[derive(Debug, Clone, PartialEq)]
pub struct MetaEvent<'a> {
    pub event_name: &'a str,
    pub event_time: i64,
    pub event_id: &'a str,
    /// Verbatim, never hashed.
    pub ctwa_clid: &'a str,
    /// Verbatim, never hashed.
    pub waba_id: &'a str,
    pub email_hash: Option<&'a str>,
    pub external_id_hash: Option<&'a str>,
    pub value: Option<f64>,
    pub currency: Option<&'a str>,
    pub content_ids: &'a [String],
    /// Set when reporting one of Meta's automatic events.
    pub automatic_event: bool,
}

/// `{"data":[event], "test_event_code"?, "partner_agent"?}`; absent optional fields are omitted.
pub fn events_request_body(
    event: &MetaEvent<'_>,
    test_event_code: Option<&str>,
    partner_agent: Option<&str>,
) -> Value {
    let mut user_data = Map::new();
    user_data.insert("ctwa_clid".into(), json!(event.ctwa_clid));
    user_data.insert("whatsapp_business_account_id".into(), json!(event.waba_id));
    if let Some(email_hash) = event.email_hash {
        user_data.insert("em".into(), json!([email_hash]));
    }
    if let Some(external_id_hash) = event.external_id_hash {
        user_data.insert("external_id".into(), json!([external_id_hash]));
    }
    let mut custom_data = Map::new();
    if let Some(value) = event.value {
        custom_data.insert("value".into(), json!(value));
    }
    if let Some(currency) = event.currency {
        custom_data.insert("currency".into(), json!(currency));
    }
    if !event.content_ids.is_empty() {
        custom_data.insert("content_ids".into(), json!(event.content_ids));
    }
    let mut data = Map::new();
    data.insert("event_name".into(), json!(event.event_name));
    data.insert("event_time".into(), json!(event.event_time));
    data.insert("event_id".into(), json!(event.event_id));
    data.insert("action_source".into(), json!("business_messaging"));
    data.insert("messaging_channel".into(), json!("whatsapp"));
    data.insert("user_data".into(), Value::Object(user_data));
    if !custom_data.is_empty() {
        data.insert("custom_data".into(), Value::Object(custom_data));
    }
    if event.automatic_event {
        data.insert(
            "messaging_outcome_data".into(),
            json!({"outcome_type": "automatic_events"}),
        );
    }
    let mut body = Map::new();
    body.insert("data".into(), json!([Value::Object(data)]));
    if let Some(code) = test_event_code {
        body.insert("test_event_code".into(), json!(code));
    }
    if let Some(agent) = partner_agent {
        body.insert("partner_agent".into(), json!(agent));
    }
    Value::Object(body)
}

fn is_sha256_hex(value: &str) -> bool {
    value.len() == 64
        && value
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Trims, lower-cases and SHA-256-hashes a customer identifier; a value that is already 64
/// lowercase hex characters is taken as a hash and left alone.
pub fn normalise_and_hash(value: &str) -> String {
    let trimmed = value.trim();
    if is_sha256_hex(trimmed) {
        return trimmed.to_string();
    }
    hex::encode(Sha256::digest(trimmed.to_lowercase().as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn meta_hashing_vectors() {
        assert_eq!(
            normalise_and_hash("John_Smith@gmail.com"),
            "62a14e44f765419d10fea99367361a727c12365e2520f32218d505ed9aa0f62f"
        );
        assert_eq!(
            normalise_and_hash("  john_smith@gmail.com \n"),
            "62a14e44f765419d10fea99367361a727c12365e2520f32218d505ed9aa0f62f"
        );
        assert_eq!(
            normalise_and_hash("16505551212"),
            "e323ec626319ca94ee8bff2e4c87cf613be6ea19919ed1364124e16807ab3176"
        );
    }

    #[test]
    fn an_existing_hash_is_not_hashed_again() {
        let hash = "62a14e44f765419d10fea99367361a727c12365e2520f32218d505ed9aa0f62f";
        assert_eq!(normalise_and_hash(hash), hash);
        // Upper-case hex is not a Meta hash: it is normalised and hashed.
        assert_ne!(
            normalise_and_hash(&hash.to_uppercase()),
            hash.to_uppercase()
        );
    }

    #[test]
    fn optional_fields_are_omitted() {
        let event = MetaEvent {
            event_name: "LeadSubmitted",
            event_time: 1,
            event_id: "e",
            ctwa_clid: "C",
            waba_id: "W",
            email_hash: None,
            external_id_hash: None,
            value: None,
            currency: None,
            content_ids: &[],
            automatic_event: false,
        };
        let body = events_request_body(&event, None, None);
        assert_eq!(
            body,
            json!({"data":[{"event_name":"LeadSubmitted","event_time":1,"event_id":"e",
                "action_source":"business_messaging","messaging_channel":"whatsapp",
                "user_data":{"ctwa_clid":"C","whatsapp_business_account_id":"W"}}]})
        );
    }

    proptest! {
        #[test]
        fn hashes_are_64_lowercase_hex_and_idempotent(value in "[ -~]{0,40}") {
            let hash = normalise_and_hash(&value);
            prop_assert!(is_sha256_hex(&hash));
            prop_assert_eq!(normalise_and_hash(&hash), hash.clone());
            prop_assert_eq!(normalise_and_hash(&value.to_uppercase()), normalise_and_hash(&value.to_lowercase()));
        }
    }
}
