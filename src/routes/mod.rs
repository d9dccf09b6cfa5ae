//! Thin HTTP handlers: read the request into domain types, call the store or a service, map
//! the outcome to a response.

pub mod admin;
pub mod attribution;
pub mod conversions;
pub mod health;
pub mod webhook;

/// RFC 3339 in UTC, to the second, for unix-seconds timestamps.
pub fn rfc3339(unix_seconds: i64) -> String {
    chrono::DateTime::from_timestamp(unix_seconds, 0)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// Deserialises a field that may be absent (outer `None`), `null` (inner `None`) or a value.
pub fn double_option<'de, D, T>(deserializer: D) -> Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: serde::Deserialize<'de>,
{
    use serde::Deserialize;
    Option::<T>::deserialize(deserializer).map(Some)
}
