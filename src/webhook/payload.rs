//! Reads a webhook body into [`ChangeGroup`]s, leniently: every entry, change and item is
//! visited; unknown fields, types and change `field`s are ignored; one malformed item is skipped
//! without losing its neighbours.

use serde_json::Value;

use crate::attribution::{AutomaticEvent, ChangeGroup, Click, ClickVia, InboundMessage};

/// `None` when the body is not JSON or not shaped like a webhook (no `entry` array).
pub fn parse_webhook(raw: &[u8], received_at: i64) -> Option<Vec<ChangeGroup>> {
    let document: Value = serde_json::from_slice(raw).ok()?;
    let entries = document.get("entry")?.as_array()?;
    let mut groups = Vec::new();
    for entry in entries {
        let Some(changes) = entry.get("changes").and_then(Value::as_array) else {
            continue;
        };
        for change in changes {
            if let Some(group) = read_change(change, received_at) {
                groups.push(group);
            }
        }
    }
    Some(groups)
}

fn read_change(change: &Value, received_at: i64) -> Option<ChangeGroup> {
    let field = change.get("field").and_then(Value::as_str).unwrap_or("");
    let value = change.get("value")?;
    let phone_number_id = id_string(value.get("metadata")?.get("phone_number_id")?)?;
    let mut group = ChangeGroup {
        phone_number_id,
        ..ChangeGroup::default()
    };
    match field {
        // `statuses` travel in `messages` changes too; they report our own outbound messages
        // and are ignored. Echoes and history are the business's side: never inbound.
        "messages" => {
            let contacts = array(value.get("contacts"));
            for message in array(value.get("messages")) {
                if let Some(inbound) = read_message(message, contacts, received_at) {
                    group.messages.push(inbound);
                }
            }
            group.automatic_events = read_automatic_events(value, received_at);
        }
        "automatic_events" => group.automatic_events = read_automatic_events(value, received_at),
        _ => {}
    }
    Some(group)
}

fn array(value: Option<&Value>) -> &[Value] {
    value.and_then(Value::as_array).map_or(&[], Vec::as_slice)
}

/// A string field, or a number written as one; empty and NUL-bearing values are dropped.
fn id_string(value: &Value) -> Option<String> {
    let text = match value {
        Value::String(text) => text.clone(),
        Value::Number(number) => number.to_string(),
        _ => return None,
    };
    (!text.is_empty() && !text.contains('\0')).then_some(text)
}

fn text(value: &Value, field: &str) -> Option<String> {
    value.get(field).and_then(id_string)
}

/// Unix seconds from a string or a number; a value too large to be seconds is read as
/// milliseconds.
pub fn timestamp(value: Option<&Value>) -> Option<i64> {
    let seconds = match value? {
        Value::String(text) => text.trim().parse::<i64>().ok()?,
        Value::Number(number) => number
            .as_i64()
            .or_else(|| number.as_f64().map(|float| float as i64))?,
        _ => return None,
    };
    Some(if seconds >= 100_000_000_000 {
        seconds / 1000
    } else {
        seconds
    })
}

fn read_message(message: &Value, contacts: &[Value], received_at: i64) -> Option<InboundMessage> {
    let message_id = text(message, "id")?;
    // System notices (a user changed number) are not messages the user wrote.
    if message.get("type").and_then(Value::as_str) == Some("system") {
        return None;
    }
    let wa_id = text(message, "from");
    let contact = contacts
        .iter()
        .find(|contact| {
            let same_phone = wa_id.is_some() && text(contact, "wa_id") == wa_id;
            let same_user = text(message, "from_user_id").is_some()
                && text(contact, "user_id") == text(message, "from_user_id");
            same_phone || same_user
        })
        .or(match contacts {
            [only] => Some(only),
            _ => None,
        });
    let bsuid = text(message, "from_user_id")
        .or_else(|| contact.and_then(|contact| text(contact, "user_id")));
    let profile_name = contact
        .and_then(|contact| contact.get("profile"))
        .and_then(|profile| text(profile, "name"));
    let message_timestamp = timestamp(message.get("timestamp")).unwrap_or(received_at);
    let click = message
        .get("referral")
        .filter(|referral| referral.is_object())
        .map(|referral| Click {
            ctwa_clid: text(referral, "ctwa_clid"),
            source_id: text(referral, "source_id"),
            source_type: text(referral, "source_type"),
            source_url: text(referral, "source_url"),
            headline: text(referral, "headline"),
            body: text(referral, "body"),
            media_type: text(referral, "media_type"),
            image_url: text(referral, "image_url"),
            video_url: text(referral, "video_url"),
            thumbnail_url: text(referral, "thumbnail_url"),
            welcome_message: referral
                .get("welcome_message")
                .and_then(|welcome| text(welcome, "text")),
            message_id: message_id.clone(),
            clicked_at: message_timestamp,
            captured_at: received_at,
            via: ClickVia::Referral,
        });
    Some(InboundMessage {
        message_id,
        wa_id,
        bsuid,
        profile_name,
        timestamp: message_timestamp,
        click,
    })
}

fn read_automatic_events(value: &Value, received_at: i64) -> Vec<AutomaticEvent> {
    array(value.get("automatic_events"))
        .iter()
        .filter_map(|event| {
            let custom_data = event.get("custom_data");
            Some(AutomaticEvent {
                message_id: text(event, "id")?,
                event_name: text(event, "event_name")?,
                timestamp: timestamp(event.get("timestamp")).unwrap_or(received_at),
                ctwa_clid: text(event, "ctwa_clid"),
                // Meta sends the amount multiplied by 1000.
                value: custom_data
                    .and_then(|data| data.get("value"))
                    .and_then(|value| match value {
                        Value::Number(number) => number.as_f64(),
                        Value::String(text) => text.trim().parse::<f64>().ok(),
                        _ => None,
                    })
                    .filter(|value| value.is_finite())
                    .map(|value| value / 1000.0),
                currency: custom_data.and_then(|data| text(data, "currency")),
                captured_at: received_at,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn not_json_or_not_a_webhook_is_none() {
        assert!(parse_webhook(b"{not json", 0).is_none());
        assert!(parse_webhook(b"[1,2]", 0).is_none());
        assert!(parse_webhook(br#"{"object":"page"}"#, 0).is_none());
        assert_eq!(
            parse_webhook(br#"{"object":"whatsapp_business_account","entry":[]}"#, 0),
            Some(vec![])
        );
    }

    #[test]
    fn timestamps_as_strings_numbers_and_milliseconds() {
        assert_eq!(
            timestamp(Some(&Value::from("1750275992"))),
            Some(1750275992)
        );
        assert_eq!(timestamp(Some(&Value::from(1750275992))), Some(1750275992));
        assert_eq!(
            timestamp(Some(&Value::from(1750275992123_i64))),
            Some(1750275992)
        );
        assert_eq!(timestamp(Some(&Value::from("soon"))), None);
    }

    #[test]
    fn referral_fields_are_kept_verbatim() {
        let body = br#"{"entry":[{"changes":[{"field":"messages","value":{
            "metadata":{"phone_number_id":"1"},
            "contacts":[{"wa_id":"155","profile":{"name":"Ann"}}],
            "messages":[{"from":"155","id":"wamid.A","timestamp":"100","type":"image",
              "referral":{"ctwa_clid":" Ab-_ ","source_id":120,"image":{"id":"x"},"ref":"r",
                          "welcome_message":{"text":"Hi"}}}]}}]}]}"#;
        let groups = parse_webhook(body, 500).unwrap();
        let message = &groups[0].messages[0];
        let click = message.click.as_ref().unwrap();
        assert_eq!(click.ctwa_clid.as_deref(), Some(" Ab-_ "));
        assert_eq!(click.source_id.as_deref(), Some("120"));
        assert_eq!(click.welcome_message.as_deref(), Some("Hi"));
        assert_eq!(click.clicked_at, 100);
        assert_eq!(click.captured_at, 500);
        assert_eq!(message.profile_name.as_deref(), Some("Ann"));
    }

    #[test]
    fn a_malformed_item_does_not_hide_its_neighbours() {
        let body = br#"{"entry":[{"changes":[{"field":"messages","value":{
            "metadata":{"phone_number_id":"1"},
            "messages":[{"from":"155"},7,{"from":"155","id":"wamid.B","timestamp":"100"}]}},
            {"field":"messages","value":{"no_metadata":true}}]}]}"#;
        let groups = parse_webhook(body, 500).unwrap();
        assert_eq!(groups.len(), 1);
        assert_eq!(groups[0].messages.len(), 1);
        assert_eq!(groups[0].messages[0].message_id, "wamid.B");
    }

    #[test]
    fn echoes_and_history_are_not_inbound() {
        for field in ["smb_message_echoes", "history"] {
            let body = format!(
                r#"{{"entry":[{{"changes":[{{"field":"{field}","value":{{
                "metadata":{{"phone_number_id":"1"}},
                "messages":[{{"from":"155","id":"wamid.C","timestamp":"100"}}],
                "message_echoes":[{{"from":"1","to":"155","id":"wamid.D"}}]}}}}]}}]}}"#
            );
            let groups = parse_webhook(body.as_bytes(), 0).unwrap();
            assert!(groups[0].messages.is_empty(), "{field}");
        }
    }

    #[test]
    fn automatic_event_values_are_divided_by_1000() {
        let body = br#"{"entry":[{"changes":[{"field":"automatic_events","value":{
            "metadata":{"phone_number_id":"1"},
            "automatic_events":[{"id":"wamid.E","event_name":"Purchase","timestamp":1749069089,
              "ctwa_clid":"C","custom_data":{"currency":"USD","value":25000}}]}}]}]}"#;
        let groups = parse_webhook(body, 0).unwrap();
        let event = &groups[0].automatic_events[0];
        assert_eq!(event.value, Some(25.0));
        assert_eq!(event.currency.as_deref(), Some("USD"));
        assert_eq!(event.timestamp, 1749069089);
    }
}
