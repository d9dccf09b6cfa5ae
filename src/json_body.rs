//! The JSON body extractor of the `/v1` API: `web::Json` (body limit, content type, gzip and the
//! error envelope of [`json_error`], all from the app's `JsonConfig`) plus a nesting limit
//! (SPEC §5.7).
//!
//! serde skips unknown fields without any depth limit, so a body nested thousands of levels deep
//! inside an unknown field used to be accepted. [`JsonBody`] reads the body as a `RawValue`
//! first (serde_json validates it without recursing), refuses it if it nests deeper than
//! [`MAX_JSON_NESTING`], and only then deserialises it into the handler's type.

use std::future::Future;
use std::ops::Deref;
use std::pin::Pin;

use actix_web::dev::Payload;
use actix_web::error::JsonPayloadError;
use actix_web::{web, FromRequest, HttpRequest};
use serde::de::DeserializeOwned;
use serde_json::value::RawValue;

use crate::error::{ApiError, Code};

/// Arrays and objects a `/v1` body may open inside one another. The API's own bodies need 3.
pub const MAX_JSON_NESTING: usize = 64;

/// A `/v1` JSON body; use it instead of `web::Json` so the nesting limit applies.
#[derive(Debug)]
pub struct JsonBody<T>(pub T);

impl<T> JsonBody<T> {
    pub fn into_inner(self) -> T {
        self.0
    }
}

impl<T> Deref for JsonBody<T> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.0
    }
}

impl<T: DeserializeOwned + 'static> FromRequest for JsonBody<T> {
    type Error = actix_web::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self, Self::Error>>>>;

    fn from_request(request: &HttpRequest, payload: &mut Payload) -> Self::Future {
        let raw = web::Json::<Box<RawValue>>::from_request(request, payload);
        let request = request.clone();
        Box::pin(async move {
            let raw = raw.await?.into_inner();
            if nesting_exceeds(raw.get().as_bytes(), MAX_JSON_NESTING) {
                return Err(ApiError::new(Code::TooDeeplyNested)
                    .message(format!(
                        "the JSON body nests arrays and objects more than {MAX_JSON_NESTING} levels deep; send a flatter body"
                    ))
                    .into());
            }
            // serde reads a struct from an array too, field by position; the API's bodies are
            // objects only.
            if !raw.get().trim_start().starts_with('{') {
                return Err(ApiError::new(Code::InvalidField)
                    .message("the body must be a JSON object")
                    .into());
            }
            serde_json::from_str(raw.get())
                .map(JsonBody)
                .map_err(|error| json_error(JsonPayloadError::Deserialize(error), &request))
        })
    }
}

/// True if `json` opens more than `limit` arrays or objects inside one another. One pass over the
/// bytes; brackets inside strings, escaped quotes included, do not count.
pub fn nesting_exceeds(json: &[u8], limit: usize) -> bool {
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    for &byte in json {
        if in_string {
            match byte {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match byte {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > limit {
                    return true;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    false
}

/// The `JsonConfig` error handler: every JSON body error in the API's envelope.
pub fn json_error(error: JsonPayloadError, _: &HttpRequest) -> actix_web::Error {
    let api_error = match &error {
        JsonPayloadError::Overflow { limit }
        | JsonPayloadError::OverflowKnownLength { limit, .. } => {
            ApiError::new(Code::PayloadTooLarge)
                .message(format!("the JSON body is larger than {limit} bytes"))
        }
        JsonPayloadError::ContentType => ApiError::new(Code::UnsupportedMediaType)
            .message("send the body with Content-Type: application/json"),
        JsonPayloadError::Deserialize(inner) if inner.is_data() => {
            let message = inner.to_string();
            let code = if message.starts_with("missing field") {
                Code::MissingField
            } else {
                Code::InvalidField
            };
            ApiError::new(code).message(message)
        }
        JsonPayloadError::Deserialize(inner) => ApiError::new(Code::MalformedJson)
            .message(format!("the body is not valid JSON: {inner}")),
        other => ApiError::new(Code::UnreadableBody).message(other.to_string()),
    };
    api_error.into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::Value;

    fn nested(depth: usize) -> String {
        format!("{}{}", "[".repeat(depth), "]".repeat(depth))
    }

    #[test]
    fn nesting_up_to_the_limit_passes_and_one_more_level_does_not() {
        assert!(!nesting_exceeds(nested(64).as_bytes(), 64));
        assert!(nesting_exceeds(nested(65).as_bytes(), 64));
        assert!(!nesting_exceeds(br#"{"a":{"b":[1,{"c":2}]}}"#, 4));
        assert!(nesting_exceeds(br#"{"a":{"b":[1,{"c":2}]}}"#, 3));
        assert!(!nesting_exceeds(b"", 0));
        assert!(!nesting_exceeds(b"12", 0));
        assert!(nesting_exceeds(b"{}", 0));
    }

    #[test]
    fn siblings_do_not_add_up() {
        let siblings = format!("[{}]", vec![nested(3); 1000].join(","));
        assert!(!nesting_exceeds(siblings.as_bytes(), 4));
        assert!(nesting_exceeds(siblings.as_bytes(), 3));
    }

    #[test]
    fn brackets_inside_strings_do_not_count() {
        let text = format!(r#"{{"note":"{}"}}"#, "[{".repeat(10_000));
        assert!(!nesting_exceeds(text.as_bytes(), 1));
        assert!(!nesting_exceeds(br#"{"a]}":"}]["}"#, 1));
    }

    #[test]
    fn escaped_quotes_and_backslashes_are_read_correctly() {
        // `\"` does not end the string, so the brackets after it are still inside it.
        assert!(!nesting_exceeds(br#"["a\"[[[[", 1]"#, 1));
        // `\\` is a whole escape: the quote after it ends the string, and `[[` is real nesting.
        assert!(nesting_exceeds(br#"["a\\", [[1]]]"#, 2));
        assert!(!nesting_exceeds(br#"["a\\", [[1]]]"#, 3));
        // `\\\"` is a backslash, then an escaped quote: still inside the string.
        assert!(!nesting_exceeds(br#"["\\\"[[[", 1]"#, 1));
        // A unicode escape is not a quote.
        assert!(!nesting_exceeds(br#"["\u0022[[[", 1]"#, 1));
    }

    fn depth_of(value: &Value) -> usize {
        match value {
            Value::Array(items) => 1 + items.iter().map(depth_of).max().unwrap_or(0),
            Value::Object(map) => 1 + map.values().map(depth_of).max().unwrap_or(0),
            _ => 0,
        }
    }

    fn any_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            // Strings full of the characters that matter: brackets, quotes, backslashes.
            r#"[\[\]{}"\\a-z ]{0,12}"#.prop_map(Value::from),
        ];
        leaf.prop_recursive(12, 96, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::from),
                prop::collection::btree_map(r#"[\[\]{}"\\a-z]{0,6}"#, inner, 0..6)
                    .prop_map(|map| Value::Object(map.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #[test]
        fn the_scanner_agrees_with_the_parsed_depth(value in any_json(), limit in 0usize..14) {
            let text = serde_json::to_string(&value).unwrap();
            prop_assert_eq!(
                nesting_exceeds(text.as_bytes(), limit),
                depth_of(&value) > limit,
                "{}", text
            );
        }
    }
}
