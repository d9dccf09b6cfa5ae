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
/// milliseconds. A negative value is no time at all and reads as absent, so the receive time
/// stands in and the differences taken later (attribution window, event age) cannot overflow.
pub fn timestamp(value: Option<&Value>) -> Option<i64> {
    let seconds = match value? {
        Value::String(text) => text.trim().parse::<i64>().ok()?,
        Value::Number(number) => number
            .as_i64()
            .or_else(|| number.as_f64().map(|float| float as i64))?,
        _ => return None,
    };
    if seconds < 0 {
        return None;
    }
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
    use proptest::prelude::*;
    use serde_json::json;

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

    #[test]
    fn negative_timestamps_read_as_absent() {
        // i64::MIN here used to reach the attribution window and the event-age check, whose
        // subtractions overflow.
        assert_eq!(timestamp(Some(&Value::from(i64::MIN))), None);
        assert_eq!(timestamp(Some(&Value::from("-1"))), None);
        assert_eq!(timestamp(Some(&Value::from(-1e300))), None);
        assert_eq!(timestamp(Some(&Value::from(0))), Some(0));
        let body = br#"{"entry":[{"changes":[{"field":"messages","value":{
            "metadata":{"phone_number_id":"1"},
            "messages":[{"from":"155","id":"wamid.A","timestamp":"-9223372036854775808",
              "referral":{"ctwa_clid":"C"}}],
            "automatic_events":[{"id":"wamid.A","event_name":"Purchase",
              "timestamp":-9223372036854775808}]}}]}]}"#;
        let groups = parse_webhook(body, 500).unwrap();
        assert_eq!(groups[0].messages[0].timestamp, 500);
        assert_eq!(
            groups[0].messages[0].click.as_ref().unwrap().clicked_at,
            500
        );
        assert_eq!(groups[0].automatic_events[0].timestamp, 500);
    }

    const RECEIVED_AT: i64 = 1_750_000_000;

    /// Any small JSON value: what a field holds when it is not what Meta documents.
    fn junk() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<f64>().prop_map(Value::from),
            "[a-z0-9 \\x00]{0,6}".prop_map(Value::from),
        ];
        leaf.prop_recursive(2, 12, 3, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..3).prop_map(Value::from),
                prop::collection::btree_map("[a-z_]{1,6}", inner, 0..3)
                    .prop_map(|map| Value::Object(map.into_iter().collect())),
            ]
        })
    }

    fn id_value() -> impl Strategy<Value = Value> {
        prop_oneof![
            6 => "[0-9A-Za-z._=-]{1,12}".prop_map(Value::from),
            1 => any::<u64>().prop_map(Value::from),
            1 => Just(Value::from("")),
            1 => Just(Value::from("1\0")),
            1 => junk(),
        ]
    }

    fn timestamp_value() -> impl Strategy<Value = Value> {
        prop_oneof![
            3 => (0i64..100_000_000_000).prop_map(|seconds| Value::from(seconds.to_string())),
            1 => any::<i64>().prop_map(Value::from),
            1 => any::<i64>().prop_map(|seconds| Value::from(seconds.to_string())),
            1 => any::<f64>().prop_map(Value::from),
            1 => junk(),
        ]
    }

    /// An object holding the fields that are `Some`.
    fn object(fields: Vec<(&str, Option<Value>)>) -> Value {
        Value::Object(
            fields
                .into_iter()
                .filter_map(|(name, value)| Some((name.to_string(), value?)))
                .collect(),
        )
    }

    fn referral() -> impl Strategy<Value = Value> {
        prop_oneof![
            3 => (
                prop::option::of(id_value()),
                prop::option::of(id_value()),
                prop::option::of(junk()),
            )
                .prop_map(|(ctwa_clid, source_id, welcome_message)| {
                    object(vec![
                        ("ctwa_clid", ctwa_clid),
                        ("source_id", source_id),
                        ("welcome_message", welcome_message),
                    ])
                }),
            1 => junk(),
        ]
    }

    fn message() -> impl Strategy<Value = Value> {
        prop_oneof![
            5 => (
                prop::option::of(id_value()),
                prop::option::of(id_value()),
                prop::option::of(id_value()),
                prop::option::of(timestamp_value()),
                prop::option::of(prop_oneof![
                    Just(Value::from("text")),
                    Just(Value::from("system")),
                    junk(),
                ]),
                prop::option::of(referral()),
            )
                .prop_map(|(id, from, from_user_id, timestamp, kind, referral)| {
                    object(vec![
                        ("id", id),
                        ("from", from),
                        ("from_user_id", from_user_id),
                        ("timestamp", timestamp),
                        ("type", kind),
                        ("referral", referral),
                    ])
                }),
            1 => junk(),
        ]
    }

    fn contact() -> impl Strategy<Value = Value> {
        (
            prop::option::of(id_value()),
            prop::option::of(id_value()),
            prop::option::of(junk()),
        )
            .prop_map(|(wa_id, user_id, profile)| {
                object(vec![
                    ("wa_id", wa_id),
                    ("user_id", user_id),
                    ("profile", profile),
                ])
            })
    }

    fn automatic_event() -> impl Strategy<Value = Value> {
        let custom_data = (
            prop::option::of(prop_oneof![
                any::<f64>().prop_map(Value::from),
                any::<i64>().prop_map(|value| Value::from(value.to_string())),
                Just(Value::from("1e400")),
                junk(),
            ]),
            prop::option::of(id_value()),
        )
            .prop_map(|(value, currency)| object(vec![("value", value), ("currency", currency)]));
        prop_oneof![
            4 => (
                prop::option::of(id_value()),
                prop::option::of(prop_oneof![Just(Value::from("Purchase")), id_value()]),
                prop::option::of(timestamp_value()),
                prop::option::of(id_value()),
                prop::option::of(custom_data),
            )
                .prop_map(|(id, event_name, timestamp, ctwa_clid, custom_data)| {
                    object(vec![
                        ("id", id),
                        ("event_name", event_name),
                        ("timestamp", timestamp),
                        ("ctwa_clid", ctwa_clid),
                        ("custom_data", custom_data),
                    ])
                }),
            1 => junk(),
        ]
    }

    fn change() -> impl Strategy<Value = Value> {
        prop_oneof![
            6 => (
                prop::option::of(prop_oneof![
                    Just(Value::from("messages")),
                    Just(Value::from("automatic_events")),
                    Just(Value::from("history")),
                    junk(),
                ]),
                prop::option::of(id_value()),
                prop::collection::vec(message(), 0..4),
                prop::collection::vec(contact(), 0..3),
                prop::collection::vec(automatic_event(), 0..3),
            )
                .prop_map(|(field, phone_number_id, messages, contacts, automatic_events)| {
                    object(vec![
                        ("field", field),
                        (
                            "value",
                            Some(json!({
                                "metadata": object(vec![("phone_number_id", phone_number_id)]),
                                "messages": messages,
                                "contacts": contacts,
                                "automatic_events": automatic_events,
                            })),
                        ),
                    ])
                }),
            1 => junk(),
        ]
    }

    fn webhook() -> impl Strategy<Value = Value> {
        let entry = prop_oneof![
            5 => prop::collection::vec(change(), 0..4)
                .prop_map(|changes| json!({"id": "WABA", "changes": changes})),
            1 => junk(),
        ];
        prop::collection::vec(entry, 0..4)
            .prop_map(|entries| json!({"object": "whatsapp_business_account", "entry": entries}))
    }

    /// An id as the parser must read it, decided here without the parser's helpers.
    fn expected_id(value: Option<&Value>) -> Option<String> {
        let id = match value? {
            Value::String(text) => text.clone(),
            Value::Number(number) => number.to_string(),
            _ => return None,
        };
        (!id.is_empty() && !id.contains('\0')).then_some(id)
    }

    proptest! {
        /// Every change that names a business number becomes one group, in order, with that
        /// number; every message and automatic event with an id is kept, in order; clicks
        /// belong to their message; no timestamp is negative.
        #[test]
        fn groups_follow_the_document(document in webhook()) {
            let raw = serde_json::to_vec(&document).unwrap();
            // The expectations are read from the bytes the parser reads: serde_json does not
            // round-trip every f64 exactly (4.0207418936572845e-159 reads back one unit lower).
            let document: Value = serde_json::from_slice(&raw).unwrap();
            let groups = parse_webhook(&raw, RECEIVED_AT).expect("a webhook-shaped body");
            let changes: Vec<(&Value, String)> = document["entry"]
                .as_array()
                .unwrap()
                .iter()
                .filter_map(|entry| entry.get("changes").and_then(Value::as_array))
                .flatten()
                .filter_map(|change| {
                    let id = expected_id(change.get("value")?.get("metadata")?.get("phone_number_id"));
                    Some((change, id?))
                })
                .collect();
            prop_assert_eq!(groups.len(), changes.len());
            for (group, (change, phone_number_id)) in groups.iter().zip(changes) {
                prop_assert_eq!(&group.phone_number_id, &phone_number_id);
                let field = change.get("field").and_then(Value::as_str);
                let value = &change["value"];
                let expected_messages: Vec<(String, &Value)> = match field {
                    Some("messages") => array(value.get("messages"))
                        .iter()
                        .filter(|message| message.get("type").and_then(Value::as_str) != Some("system"))
                        .filter_map(|message| Some((expected_id(message.get("id"))?, message)))
                        .collect(),
                    _ => Vec::new(),
                };
                let message_ids: Vec<&str> =
                    group.messages.iter().map(|message| message.message_id.as_str()).collect();
                let expected_ids: Vec<&str> =
                    expected_messages.iter().map(|(id, _)| id.as_str()).collect();
                prop_assert_eq!(message_ids, expected_ids);
                for (message, (_, raw_message)) in group.messages.iter().zip(&expected_messages) {
                    prop_assert!(message.timestamp >= 0);
                    let referral_is_object = raw_message.get("referral").is_some_and(Value::is_object);
                    prop_assert_eq!(message.click.is_some(), referral_is_object);
                    if let Some(click) = &message.click {
                        prop_assert_eq!(&click.message_id, &message.message_id);
                        prop_assert_eq!(click.clicked_at, message.timestamp);
                        prop_assert_eq!(click.captured_at, RECEIVED_AT);
                    }
                }
                let expected_events: Vec<String> = match field {
                    Some("messages" | "automatic_events") => array(value.get("automatic_events"))
                        .iter()
                        .filter(|event| expected_id(event.get("event_name")).is_some())
                        .filter_map(|event| expected_id(event.get("id")))
                        .collect(),
                    _ => Vec::new(),
                };
                let event_ids: Vec<String> =
                    group.automatic_events.iter().map(|event| event.message_id.clone()).collect();
                prop_assert_eq!(event_ids, expected_events);
                for event in &group.automatic_events {
                    prop_assert!(event.timestamp >= 0);
                    prop_assert!(event.value.is_none_or(f64::is_finite));
                    prop_assert_eq!(event.captured_at, RECEIVED_AT);
                }
            }
        }

        /// A webhook cut short or with one byte changed (what a broken proxy delivers) parses
        /// when it is still a JSON object with an `entry` array, and is refused otherwise,
        /// without panicking.
        #[test]
        fn damaged_bodies_never_panic(
            document in webhook(),
            cut in any::<prop::sample::Index>(),
            flip in any::<prop::sample::Index>(),
            byte in any::<u8>(),
        ) {
            let mut raw = serde_json::to_vec(&document).unwrap();
            let at = flip.index(raw.len());
            raw[at] = byte;
            raw.truncate(cut.index(raw.len() + 1));
            let parsed = parse_webhook(&raw, RECEIVED_AT);
            let has_entry_array = serde_json::from_slice::<Value>(&raw)
                .ok()
                .is_some_and(|value| value.get("entry").is_some_and(Value::is_array));
            prop_assert_eq!(parsed.is_some(), has_entry_array);
        }
    }
}
