//! The one client for Meta's Graph API: Conversions API events and dataset provisioning.
//!
//! The access token travels only in the `Authorization` header, never in a URL or a log line.

use std::time::Duration;

use reqwest::StatusCode;
use serde::Deserialize;
use serde_json::Value;

use crate::secret::Secret;
use crate::settings::Settings;

/// What a failure says about the event, and so whether sending it again is safe (SPEC §5.5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// Meta did not take the event (it refused it for now, or the request never left): retry.
    Transient,
    /// Meta refused the event for good: do not retry.
    Permanent,
    /// The request may have reached Meta but its answer was lost (a timeout, a connection broken
    /// after the request was written). Meta does not deduplicate, so a resend may double-count.
    Unanswered,
    /// Meta answered success with a body that cannot be read: it very likely took the event.
    Unreadable,
}

/// Meta's error object: `{"error": {...}}`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct MetaError {
    #[serde(default)]
    pub message: String,
    pub code: i64,
    #[serde(default)]
    pub error_subcode: Option<i64>,
    #[serde(default)]
    pub error_user_title: Option<String>,
    #[serde(default)]
    pub error_user_msg: Option<String>,
    #[serde(default)]
    pub fbtrace_id: Option<String>,
}

#[derive(Deserialize)]
struct MetaErrorEnvelope {
    error: MetaError,
}

#[derive(Debug, thiserror::Error)]
pub enum GraphError {
    #[error("Meta answered HTTP {http_status} with error code {}: {}", .error.code, .error.message)]
    Meta {
        http_status: u16,
        error: Box<MetaError>,
    },
    #[error("Meta answered HTTP {status} without an error object")]
    Status { status: u16 },
    #[error("Meta did not answer within {0:?}")]
    Timeout(Duration),
    #[error("cannot connect to the Graph API: {0}")]
    Connect(String),
    #[error("the connection to the Graph API broke before Meta answered: {0}")]
    Interrupted(String),
    #[error("Meta's answer could not be read: {0}")]
    Malformed(String),
    /// The request could not even be built (for example a token that is not a valid header
    /// value): it never left, and it would fail the same way again.
    #[error("the request to the Graph API could not be built: {0}")]
    Unsendable(String),
}

impl GraphError {
    pub fn class(&self) -> ErrorClass {
        match self {
            GraphError::Meta { http_status, error } => {
                let transient_code =
                    matches!(error.code, 1 | 2 | 4 | 17 | 341 | 368 | 613 | 80000..=80014);
                let known_permanent = matches!(error.code, 3 | 10 | 100 | 190 | 200..=299);
                if transient_code || (!known_permanent && *http_status >= 500) {
                    ErrorClass::Transient
                } else {
                    ErrorClass::Permanent
                }
            }
            GraphError::Status { status } if *status >= 500 || *status == 429 => {
                ErrorClass::Transient
            }
            GraphError::Status { .. } | GraphError::Unsendable(_) => ErrorClass::Permanent,
            GraphError::Connect(_) => ErrorClass::Transient,
            GraphError::Timeout(_) | GraphError::Interrupted(_) => ErrorClass::Unanswered,
            // A success status with a body we cannot read: Meta may have taken the event, and it
            // does not deduplicate, so this is not retried automatically.
            GraphError::Malformed(_) => ErrorClass::Unreadable,
        }
    }

    /// The short machine code reported in `failures[].code`: Meta's code when Meta gave one.
    pub fn code(&self) -> String {
        match self {
            GraphError::Meta { error, .. } => error.code.to_string(),
            GraphError::Status { status } => format!("http_{status}"),
            GraphError::Timeout(_) => "timeout".into(),
            GraphError::Connect(_) => "connection_error".into(),
            GraphError::Interrupted(_) => "connection_interrupted".into(),
            GraphError::Malformed(_) => "malformed_response".into(),
            GraphError::Unsendable(_) => "request_not_sent".into(),
        }
    }

    pub fn meta_code(&self) -> Option<i64> {
        match self {
            GraphError::Meta { error, .. } => Some(error.code),
            _ => None,
        }
    }

    pub fn meta_subcode(&self) -> Option<i64> {
        match self {
            GraphError::Meta { error, .. } => error.error_subcode,
            _ => None,
        }
    }

    pub fn trace_id(&self) -> Option<String> {
        match self {
            GraphError::Meta { error, .. } => error.fbtrace_id.clone(),
            _ => None,
        }
    }

    /// What the business should do about it, in one or two sentences.
    pub fn actionable_message(&self) -> String {
        let GraphError::Meta { error, .. } = self else {
            return match self {
                GraphError::Malformed(_) => format!(
                    "{self}. Meta very likely received the event, so it is not sent again: check Events Manager, and send it with a new eventId only if it is missing there"
                ),
                GraphError::Timeout(_) | GraphError::Interrupted(_) => format!(
                    "{self}. Meta may or may not have received the event; it is sent once more after a guard interval and flagged possibleDuplicate"
                ),
                GraphError::Unsendable(_) => format!(
                    "{self}. Nothing was sent; check the account's access token (it must be plain ASCII), then send the event again"
                ),
                _ => format!("{self}. The event will be retried"),
            };
        };
        let meta = match (&error.error_user_msg, error.message.is_empty()) {
            (Some(user_message), _) => user_message.clone(),
            (None, false) => error.message.clone(),
            (None, true) => "no message".into(),
        };
        let advice = match (error.code, error.error_subcode) {
            (100, Some(33)) => "The account's access token cannot reach the dataset (it belongs to another Business). Share the dataset with the WhatsApp Business Account's Business in Business Manager, or use a dataset owned by that Business".to_string(),
            (100, Some(2804066)) => "The event name is not accepted for business messaging. Use one of Meta's business-messaging events, e.g. LeadSubmitted instead of Lead".to_string(),
            (100, Some(2804003)) => "The event is older than 7 days; Meta no longer accepts it. Send conversions within 7 days of the event".to_string(),
            (100, Some(2804087)) => "Meta refused the click id (ctwa_clid). It must be the verbatim value from the ad click's webhook; synthetic click ids are refused on ad-connected datasets".to_string(),
            (100, _) if error.message.contains("missing permissions") || error.message.contains("cannot be loaded") => "The access token cannot reach this object. Share the dataset with the WhatsApp Business Account's Business, or use a dataset owned by that Business".to_string(),
            (100, _) => "Meta refused a parameter of the event; the message says which".to_string(),
            (190, _) => "The account's access token is expired or invalid. Update the account's accessToken with a valid system-user token".to_string(),
            (10 | 200..=299 | 3, _) => "The access token lacks a permission or capability needed to send events to this dataset (ads_management / business_management on the dataset)".to_string(),
            _ => "Meta refused the event".to_string(),
        };
        format!("{advice}. Meta said: {meta}")
    }
}

/// Meta's answer to a successful events POST.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct EventsReceived {
    pub events_received: i64,
    #[serde(default)]
    pub messages: Vec<Value>,
    #[serde(default)]
    pub fbtrace_id: Option<String>,
}

#[derive(Clone)]
pub struct GraphClient {
    http: reqwest::Client,
    base_url: String,
    version: String,
    timeout: Duration,
}

impl GraphClient {
    pub fn new(settings: &Settings) -> reqwest::Result<Self> {
        let http = reqwest::Client::builder()
            .connect_timeout(settings.graph_timeout.min(Duration::from_secs(5)))
            .timeout(settings.graph_timeout)
            .pool_idle_timeout(Duration::from_secs(60))
            .user_agent(concat!("ctwa-relay/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Self {
            http,
            base_url: settings
                .graph_url
                .as_str()
                .trim_end_matches('/')
                .to_string(),
            version: settings.graph_version.clone(),
            timeout: settings.graph_timeout,
        })
    }

    /// `{base}/{version}/{dataset_id}/events`.
    pub fn events_url(&self, dataset_id: &str) -> String {
        format!("{}/{}/{}/events", self.base_url, self.version, dataset_id)
    }

    fn dataset_url(&self, waba_id: &str) -> String {
        format!("{}/{}/{}/dataset", self.base_url, self.version, waba_id)
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// POSTs one events request. `timeout` may shorten the configured one (a request budget).
    pub async fn send_events(
        &self,
        dataset_id: &str,
        access_token: &Secret,
        body: &Value,
        timeout: Duration,
    ) -> Result<EventsReceived, GraphError> {
        let request = self
            .http
            .post(self.events_url(dataset_id))
            .bearer_auth(access_token.expose())
            .timeout(timeout)
            .json(body);
        let (status, text) = self.execute(request, timeout).await?;
        serde_json::from_str::<EventsReceived>(&text).map_err(|error| {
            GraphError::Malformed(format!(
                "HTTP {status} with a body that is not an events answer ({error})"
            ))
        })
    }

    /// The dataset linked to a WABA, if any.
    pub async fn get_dataset(
        &self,
        waba_id: &str,
        access_token: &Secret,
    ) -> Result<Option<String>, GraphError> {
        let request = self
            .http
            .get(self.dataset_url(waba_id))
            .bearer_auth(access_token.expose());
        let (_, text) = self.execute(request, self.timeout).await?;
        dataset_id_from(&text)
    }

    /// Creates (or returns) the dataset of a WABA.
    pub async fn create_dataset(
        &self,
        waba_id: &str,
        access_token: &Secret,
    ) -> Result<String, GraphError> {
        let request = self
            .http
            .post(self.dataset_url(waba_id))
            .bearer_auth(access_token.expose());
        let (_, text) = self.execute(request, self.timeout).await?;
        dataset_id_from(&text)?
            .ok_or_else(|| GraphError::Malformed("the dataset creation answer has no id".into()))
    }

    async fn execute(
        &self,
        request: reqwest::RequestBuilder,
        timeout: Duration,
    ) -> Result<(StatusCode, String), GraphError> {
        let response = request
            .send()
            .await
            .map_err(|error| transport_error(error, timeout))?;
        let status = response.status();
        let text = match response.text().await {
            Ok(text) => text,
            // Meta answered success and took the request; only its body was lost.
            Err(error) if status.is_success() => {
                return Err(GraphError::Malformed(format!(
                    "HTTP {status} whose body could not be read ({})",
                    error.without_url()
                )))
            }
            Err(_) => {
                return Err(GraphError::Status {
                    status: status.as_u16(),
                })
            }
        };
        if status.is_success() {
            return Ok((status, text));
        }
        match serde_json::from_str::<MetaErrorEnvelope>(&text) {
            Ok(envelope) => Err(GraphError::Meta {
                http_status: status.as_u16(),
                error: Box::new(envelope.error),
            }),
            Err(_) => Err(GraphError::Status {
                status: status.as_u16(),
            }),
        }
    }
}

/// A failure before Meta's status line arrived. Only a failure to connect proves the request
/// never left; anything later (a timeout, a reset) may have reached Meta.
fn transport_error(error: reqwest::Error, timeout: Duration) -> GraphError {
    // Without the URL: it is ours, not news, and the error text stays short.
    if error.is_builder() {
        GraphError::Unsendable(crate::error::error_chain(&error.without_url()))
    } else if error.is_connect() {
        GraphError::Connect(error.without_url().to_string())
    } else if error.is_timeout() {
        GraphError::Timeout(timeout)
    } else {
        // reqwest's own message is just "error sending request"; the causes say what broke.
        GraphError::Interrupted(crate::error::error_chain(&error.without_url()))
    }
}

/// Meta does not document the dataset answer: accept `{"id"}` and `{"data":[{"id"}]}`.
fn dataset_id_from(text: &str) -> Result<Option<String>, GraphError> {
    let value: Value =
        serde_json::from_str(text).map_err(|error| GraphError::Malformed(error.to_string()))?;
    let id = value.get("id").or_else(|| {
        value
            .get("data")
            .and_then(|data| data.get(0))
            .and_then(|first| first.get("id"))
    });
    Ok(id.and_then(|id| match id {
        Value::String(text) if !text.is_empty() => Some(text.clone()),
        Value::Number(number) => Some(number.to_string()),
        _ => None,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(http_status: u16, code: i64, subcode: Option<i64>) -> GraphError {
        GraphError::Meta {
            http_status,
            error: Box::new(MetaError {
                message: "m".into(),
                code,
                error_subcode: subcode,
                error_user_title: None,
                error_user_msg: None,
                fbtrace_id: Some("T".into()),
            }),
        }
    }

    #[test]
    fn classification_follows_the_spec() {
        for code in [1, 2, 4, 17, 341, 368, 613, 80000, 80014] {
            assert_eq!(
                meta(400, code, None).class(),
                ErrorClass::Transient,
                "{code}"
            );
        }
        for (code, subcode) in [
            (100, Some(33)),
            (100, Some(2804066)),
            (100, Some(2804003)),
            (100, Some(2804087)),
            (190, Some(460)),
            (10, None),
            (200, None),
            (299, None),
        ] {
            assert_eq!(
                meta(400, code, subcode).class(),
                ErrorClass::Permanent,
                "{code}"
            );
        }
        assert_eq!(meta(500, 100, None).class(), ErrorClass::Permanent);
        assert_eq!(meta(500, 12345, None).class(), ErrorClass::Transient);
        assert_eq!(
            GraphError::Status { status: 503 }.class(),
            ErrorClass::Transient
        );
        assert_eq!(
            GraphError::Status { status: 404 }.class(),
            ErrorClass::Permanent
        );
        assert_eq!(
            GraphError::Connect("refused".into()).class(),
            ErrorClass::Transient
        );
        // Issue 6: a timeout or a broken connection may have reached Meta, and a success that
        // cannot be read almost surely did; neither is retried like a refusal.
        assert_eq!(
            GraphError::Timeout(Duration::from_secs(1)).class(),
            ErrorClass::Unanswered
        );
        assert_eq!(
            GraphError::Interrupted("reset".into()).class(),
            ErrorClass::Unanswered
        );
        assert_eq!(
            GraphError::Malformed("x".into()).class(),
            ErrorClass::Unreadable
        );
    }

    /// A token that is not a valid header value makes a request that cannot be built: it never
    /// left, so its outcome is known (a permanent failure), never "unanswered".
    #[tokio::test]
    async fn a_request_that_cannot_be_built_was_not_sent() {
        // A closed port: if the request were sent, this would be a connect error instead.
        let settings = Settings {
            graph_url: "http://127.0.0.1:9".parse().unwrap(),
            ..Settings::default()
        };
        let client = GraphClient::new(&settings).unwrap();
        let error = client
            .send_events(
                "1",
                &crate::secret::Secret::new("bad\ntoken"),
                &serde_json::json!({"data": []}),
                Duration::from_secs(1),
            )
            .await
            .unwrap_err();
        assert!(matches!(error, GraphError::Unsendable(_)), "{error:?}");
        assert_eq!(error.class(), ErrorClass::Permanent);
        assert_eq!(error.code(), "request_not_sent");
        assert!(error.actionable_message().contains("Nothing was sent"));
    }

    #[test]
    fn dataset_answers_in_both_shapes() {
        assert_eq!(
            dataset_id_from(r#"{"id":"123"}"#).unwrap().as_deref(),
            Some("123")
        );
        assert_eq!(
            dataset_id_from(r#"{"data":[{"id":"456"}]}"#)
                .unwrap()
                .as_deref(),
            Some("456")
        );
        assert_eq!(dataset_id_from(r#"{"data":[]}"#).unwrap(), None);
        assert!(dataset_id_from("nope").is_err());
    }

    #[test]
    fn messages_say_what_to_do() {
        assert!(meta(400, 100, Some(33))
            .actionable_message()
            .contains("Share the dataset"));
        assert!(meta(400, 190, None)
            .actionable_message()
            .contains("accessToken"));
        assert!(meta(400, 100, Some(2804066))
            .actionable_message()
            .contains("LeadSubmitted"));
    }
}
