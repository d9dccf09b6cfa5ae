//! A WhatsApp user of one account, as attribution keeps it.

use serde::{Deserialize, Serialize};

/// A user, known by phone number (`wa_id`), by business-scoped user id (BSUID), or both, with
/// the conversations attribution opened for them, oldest first.
///
/// The serde form is the stored form; its field names do not change without a layout version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UserRecord {
    account_id: String,
    key: String,
    wa_id: Option<String>,
    bsuid: Option<String>,
    name: Option<String>,
    conversation_ids: Vec<String>,
}

impl UserRecord {
    /// A user first seen by phone (preferred) or BSUID; `None` when neither is given.
    pub fn first_seen(account_id: &str, wa_id: Option<&str>, bsuid: Option<&str>) -> Option<Self> {
        let key = match (wa_id, bsuid) {
            (Some(wa_id), _) => format!("wa:{wa_id}"),
            (None, Some(bsuid)) => format!("bsuid:{bsuid}"),
            (None, None) => return None,
        };
        Some(Self {
            account_id: account_id.to_string(),
            key,
            wa_id: None,
            bsuid: None,
            name: None,
            conversation_ids: Vec::new(),
        })
    }

    pub fn account_id(&self) -> &str {
        &self.account_id
    }

    /// The user's key within the account; stable once given.
    pub fn key(&self) -> &str {
        &self.key
    }

    pub fn wa_id(&self) -> Option<&str> {
        self.wa_id.as_deref()
    }

    pub fn bsuid(&self) -> Option<&str> {
        self.bsuid.as_deref()
    }

    pub fn name(&self) -> Option<&str> {
        self.name.as_deref()
    }

    pub fn conversation_ids(&self) -> &[String] {
        &self.conversation_ids
    }

    /// Learns the identifiers and profile name a message adds; a newer one replaces the old.
    pub fn learn(&mut self, wa_id: Option<&str>, bsuid: Option<&str>, profile_name: Option<&str>) {
        if let Some(wa_id) = wa_id {
            self.wa_id = Some(wa_id.to_string());
        }
        if let Some(bsuid) = bsuid {
            self.bsuid = Some(bsuid.to_string());
        }
        if let Some(name) = profile_name {
            self.name = Some(name.to_string());
        }
    }

    pub fn add_conversation(&mut self, conversation_id: String) {
        self.conversation_ids.push(conversation_id);
    }

    /// Drops a conversation merged into another one (its record stays, for its id).
    pub fn remove_conversation(&mut self, conversation_id: &str) {
        self.conversation_ids.retain(|id| id != conversation_id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_user_is_keyed_by_phone_first_and_learns_what_messages_add() {
        let mut user = UserRecord::first_seen("acc", Some("155"), Some("US.1")).unwrap();
        assert_eq!(user.key(), "wa:155");
        assert_eq!(user.wa_id(), None, "learned from the message, not the key");
        user.learn(Some("155"), Some("US.1"), Some("Ann"));
        user.learn(None, None, None);
        assert_eq!(
            (user.wa_id(), user.bsuid(), user.name()),
            (Some("155"), Some("US.1"), Some("Ann"))
        );
        let by_bsuid = UserRecord::first_seen("acc", None, Some("US.2")).unwrap();
        assert_eq!(by_bsuid.key(), "bsuid:US.2");
        assert!(UserRecord::first_seen("acc", None, None).is_none());
    }

    #[test]
    fn the_stored_form_keeps_its_field_names() {
        let stored = r#"{"account_id":"acc","key":"wa:1","wa_id":"1","bsuid":null,"name":"A","conversation_ids":["conv_1"]}"#;
        let user: UserRecord = serde_json::from_str(stored).unwrap();
        assert_eq!(user.conversation_ids(), ["conv_1".to_string()]);
        assert_eq!(serde_json::to_string(&user).unwrap(), stored);
    }
}
