//! Any bytes a verified webhook may carry → `parse_webhook`. It must never panic, and what it
//! returns must agree with the document: one group per change that names a business number, in
//! order, each with the `phone_number_id` of its own change; every message and automatic event
//! with an id and a time that is not negative; clicks tied to the message that carried them.
#![no_main]

use ctwa_relay::attribution::ClickVia;
use ctwa_relay::webhook::parse_webhook;
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

const RECEIVED_AT: i64 = 1_750_000_000;

/// The business number a change is for, read independently of the parser: a non-empty string
/// without NUL, or a number written as one.
fn phone_number_id_of(change: &Value) -> Option<String> {
    let id = match change
        .get("value")?
        .get("metadata")?
        .get("phone_number_id")?
    {
        Value::String(text) => text.clone(),
        Value::Number(number) => number.to_string(),
        _ => return None,
    };
    (!id.is_empty() && !id.contains('\0')).then_some(id)
}

fn non_empty_without_nul(text: &str) -> bool {
    !text.is_empty() && !text.contains('\0')
}

fuzz_target!(|data: &[u8]| {
    let parsed = parse_webhook(data, RECEIVED_AT);
    let document: Option<Value> = serde_json::from_slice(data).ok();
    let entries = document
        .as_ref()
        .and_then(|document| document.get("entry"))
        .and_then(Value::as_array);
    let Some(entries) = entries else {
        assert!(parsed.is_none(), "a body without an entry array parsed");
        return;
    };
    let groups = parsed.expect("a JSON body with an entry array parses");
    assert_eq!(
        parse_webhook(data, RECEIVED_AT).as_ref(),
        Some(&groups),
        "parsing is deterministic"
    );

    let changes: Vec<(&Value, String)> = entries
        .iter()
        .filter_map(|entry| entry.get("changes").and_then(Value::as_array))
        .flatten()
        .filter_map(|change| phone_number_id_of(change).map(|id| (change, id)))
        .collect();
    assert_eq!(
        groups.len(),
        changes.len(),
        "one group per change with a phone_number_id"
    );
    for (group, (change, phone_number_id)) in groups.iter().zip(&changes) {
        assert_eq!(&group.phone_number_id, phone_number_id);
        let value = &change["value"];
        let field = change.get("field").and_then(Value::as_str);
        let listed_messages = value
            .get("messages")
            .and_then(Value::as_array)
            .map_or(0, Vec::len);
        let listed_events = value
            .get("automatic_events")
            .and_then(Value::as_array)
            .map_or(0, Vec::len);
        match field {
            Some("messages") => assert!(group.messages.len() <= listed_messages),
            Some("automatic_events") => assert!(group.messages.is_empty()),
            _ => {
                assert!(
                    group.messages.is_empty(),
                    "{field:?} changes hold no inbound"
                );
                assert!(group.automatic_events.is_empty());
            }
        }
        assert!(group.automatic_events.len() <= listed_events);
        for message in &group.messages {
            assert!(non_empty_without_nul(&message.message_id));
            // Negative times read as absent: the attribution window and the event-age check
            // subtract them from other times.
            assert!(message.timestamp >= 0);
            let Some(click) = &message.click else {
                continue;
            };
            assert_eq!(click.message_id, message.message_id);
            assert_eq!(click.clicked_at, message.timestamp);
            assert_eq!(click.captured_at, RECEIVED_AT);
            assert_eq!(click.via, ClickVia::Referral);
        }
        for event in &group.automatic_events {
            assert!(non_empty_without_nul(&event.message_id));
            assert!(non_empty_without_nul(&event.event_name));
            assert_eq!(event.captured_at, RECEIVED_AT);
            assert!(event.timestamp >= 0);
            assert!(event.value.is_none_or(f64::is_finite));
        }
    }
});
