//! The parts of a conversion request, parsed into types that cannot hold invalid values
//! (SPEC §4.4). Each failure names its machine code and says what to fix.

use crate::error::Code;

/// A refused field: the `code` of the 400 answer and a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub code: Code,
    pub message: String,
}

impl FieldError {
    fn new(code: Code, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

/// An event name from the configured allowlist (Meta's business-messaging catalogue).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventName(String);

impl EventName {
    pub fn parse(name: &str, allowlist: &[String]) -> Result<Self, FieldError> {
        if allowlist.iter().any(|allowed| allowed == name) {
            return Ok(Self(name.to_string()));
        }
        let hint = match name {
            "Lead" => " Use LeadSubmitted, Meta's business-messaging lead event, instead of the web pixel's Lead.",
            _ => "",
        };
        Err(FieldError::new(
            Code::InvalidEventName,
            format!(
                "eventName {name:?} is not accepted for business messaging.{hint} Allowed: {}",
                allowlist.join(", ")
            ),
        ))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The caller's dedup key: 1–256 characters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventId(String);

impl EventId {
    pub fn parse(id: &str) -> Result<Self, FieldError> {
        let length = id.chars().count();
        if length == 0 || length > 256 || id.contains('\0') {
            return Err(FieldError::new(
                Code::InvalidEventId,
                "eventId must be 1-256 characters",
            ));
        }
        Ok(Self(id.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

pub const MAX_EVENT_AGE_SECS: i64 = 7 * 86_400;
pub const MAX_FUTURE_SKEW_SECS: i64 = 300;

/// Unix seconds Meta will accept: not older than 7 days, not over 5 minutes ahead, and not
/// milliseconds by mistake.
pub fn parse_event_time(event_time: Option<i64>, now: i64) -> Result<i64, FieldError> {
    let Some(event_time) = event_time else {
        return Ok(now);
    };
    if event_time >= 10_000_000_000 {
        return Err(FieldError::new(
            Code::EventTimeInMilliseconds,
            format!("eventTime {event_time} looks like milliseconds; send unix seconds"),
        ));
    }
    // Saturating: an eventTime near i64::MIN must read as too old, not wrap into the future.
    if now.saturating_sub(event_time) > MAX_EVENT_AGE_SECS {
        return Err(FieldError::new(
            Code::EventTimeTooOld,
            "eventTime is more than 7 days old; Meta rejects such events (and the whole request with them)",
        ));
    }
    if event_time.saturating_sub(now) > MAX_FUTURE_SKEW_SECS {
        return Err(FieldError::new(
            Code::EventTimeInFuture,
            "eventTime is more than 5 minutes in the future; check the sender's clock",
        ));
    }
    Ok(event_time)
}

/// Active ISO 4217 currency codes (funds, metals and test codes excluded).
const ISO_4217: [&str; 164] = [
    "AED", "AFN", "ALL", "AMD", "ANG", "AOA", "ARS", "AUD", "AWG", "AZN", "BAM", "BBD", "BDT",
    "BGN", "BHD", "BIF", "BMD", "BND", "BOB", "BRL", "BSD", "BTN", "BWP", "BYN", "BZD", "CAD",
    "CDF", "CHF", "CLP", "CNY", "COP", "CRC", "CUC", "CUP", "CVE", "CZK", "DJF", "DKK", "DOP",
    "DZD", "EGP", "ERN", "ETB", "EUR", "FJD", "FKP", "GBP", "GEL", "GHS", "GIP", "GMD", "GNF",
    "GTQ", "GYD", "HKD", "HNL", "HTG", "HUF", "IDR", "ILS", "INR", "IQD", "IRR", "ISK", "JMD",
    "JOD", "JPY", "KES", "KGS", "KHR", "KMF", "KPW", "KRW", "KWD", "KYD", "KZT", "LAK", "LBP",
    "LKR", "LRD", "LSL", "LYD", "MAD", "MDL", "MGA", "MKD", "MMK", "MNT", "MOP", "MRU", "MUR",
    "MVR", "MWK", "MXN", "MYR", "MZN", "NAD", "NGN", "NIO", "NOK", "NPR", "NZD", "OMR", "PAB",
    "PEN", "PGK", "PHP", "PKR", "PLN", "PYG", "QAR", "RON", "RSD", "RUB", "RWF", "SAR", "SBD",
    "SCR", "SDG", "SEK", "SGD", "SHP", "SLE", "SLL", "SOS", "SRD", "SSP", "STN", "SVC", "SYP",
    "SZL", "THB", "TJS", "TMT", "TND", "TOP", "TRY", "TTD", "TWD", "TZS", "UAH", "UGX", "USD",
    "UYU", "UYW", "UZS", "VED", "VES", "VND", "VUV", "WST", "XAF", "XCD", "XCG", "XOF", "XPF",
    "YER", "ZAR", "ZMW", "ZWG", "ZWL", "BOV", "CLF", "MXV",
];

/// An ISO 4217 code, upper-cased.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Currency(String);

impl Currency {
    pub fn parse(code: &str) -> Result<Self, FieldError> {
        let upper = code.trim().to_ascii_uppercase();
        if upper.len() == 3 && ISO_4217.contains(&upper.as_str()) {
            return Ok(Self(upper));
        }
        Err(FieldError::new(
            Code::InvalidCurrency,
            format!("currency {code:?} is not an ISO 4217 code such as USD, EUR or BRL"),
        ))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A conversion value: finite and not negative.
pub fn parse_value(value: f64) -> Result<f64, FieldError> {
    if value.is_finite() && value >= 0.0 {
        return Ok(value);
    }
    Err(FieldError::new(
        Code::InvalidValue,
        "value must be a finite number >= 0",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::settings::DEFAULT_EVENT_NAMES;
    use proptest::prelude::*;

    fn allowlist() -> Vec<String> {
        DEFAULT_EVENT_NAMES
            .iter()
            .map(|name| name.to_string())
            .collect()
    }

    #[test]
    fn lead_gets_a_hint() {
        let error = EventName::parse("Lead", &allowlist()).unwrap_err();
        assert_eq!(error.code, "invalid_event_name");
        assert!(error.message.contains("LeadSubmitted"));
        assert!(EventName::parse("LeadSubmitted", &allowlist()).is_ok());
        assert!(EventName::parse("Contact", &allowlist()).is_err());
    }

    #[test]
    fn event_time_limits() {
        let now = 1_800_000_000;
        assert_eq!(parse_event_time(None, now), Ok(now));
        assert_eq!(
            parse_event_time(Some(now - MAX_EVENT_AGE_SECS), now),
            Ok(now - MAX_EVENT_AGE_SECS)
        );
        assert_eq!(
            parse_event_time(Some(now - MAX_EVENT_AGE_SECS - 1), now)
                .unwrap_err()
                .code,
            "event_time_too_old"
        );
        assert_eq!(
            parse_event_time(Some(now + 301), now).unwrap_err().code,
            "event_time_in_future"
        );
        assert_eq!(
            parse_event_time(Some(now * 1000), now).unwrap_err().code,
            "event_time_in_milliseconds"
        );
    }

    #[test]
    fn currencies_are_real_codes() {
        assert_eq!(Currency::parse("usd").unwrap().as_str(), "USD");
        assert_eq!(Currency::parse("BRL").unwrap().as_str(), "BRL");
        for bad in ["US", "USDD", "ABC", "XAU", "XXX", ""] {
            assert!(Currency::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn event_ids_are_bounded() {
        assert!(EventId::parse("").is_err());
        assert!(EventId::parse(&"é".repeat(256)).is_ok());
        assert!(EventId::parse(&"x".repeat(257)).is_err());
    }

    proptest! {
        #[test]
        fn any_accepted_currency_is_three_upper_letters(code in "[a-zA-Z]{0,4}") {
            if let Ok(currency) = Currency::parse(&code) {
                prop_assert_eq!(currency.as_str().len(), 3);
                prop_assert!(currency.as_str().bytes().all(|b| b.is_ascii_uppercase()));
            }
        }
    }
}
