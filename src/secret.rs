//! A string that must never be printed: tokens, app secrets, API keys.

use secrecy::{ExposeSecret, SecretString};
use subtle::ConstantTimeEq;

/// A secret string over [`secrecy::SecretString`]: zeroed when dropped, `Debug` redacted, no
/// `Display`, no `Serialize` and no `==`. The value is only reachable through
/// [`Secret::expose`], so every place that reads it is easy to find; the one place that stores
/// it (the account record in `store::accounts`) writes it through an explicit field.
#[derive(Clone, Default)]
pub struct Secret(SecretString);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(SecretString::from(value.into()))
    }

    pub fn expose(&self) -> &str {
        self.0.expose_secret()
    }

    /// Compares with a candidate in time that does not depend on where they differ.
    pub fn matches(&self, candidate: &str) -> bool {
        let ours = self.expose().as_bytes();
        let theirs = candidate.as_bytes();
        // Length is not secret for our tokens; `ct_eq` on unequal lengths is false anyway.
        ours.len() == theirs.len() && bool::from(ours.ct_eq(theirs))
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret([REDACTED])")
    }
}

/// Reading a secret from a request body or a settings layer is fine; writing one out is not,
/// so there is no `Serialize`.
impl<'de> serde::Deserialize<'de> for Secret {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        SecretString::deserialize(deserializer).map(Secret)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_the_value() {
        let secret = Secret::new("hunter2");
        assert!(!format!("{secret:?}").contains("hunter2"));
        assert!(!format!("{:?}", Some(secret.clone())).contains("hunter2"));
    }

    #[test]
    fn matches_only_the_exact_value() {
        let secret = Secret::new("abc");
        assert!(secret.matches("abc"));
        assert!(!secret.matches("abd"));
        assert!(!secret.matches("ab"));
        assert!(!secret.matches("abcd"));
        assert!(!secret.matches(""));
        assert!(Secret::new("").matches(""));
    }

    /// Whether `T` implements `Serialize` or `PartialEq`, asked without naming the answer in
    /// a bound (autoref specialisation: the trait on `Probe<T>` wins when its bound holds, the
    /// one on `&Probe<T>` otherwise), so a derive added back makes these tests fail.
    struct Probe<T>(std::marker::PhantomData<T>);

    fn probe<T>() -> Probe<T> {
        Probe(std::marker::PhantomData)
    }

    trait SerializeYes {
        fn serializes(&self) -> bool {
            true
        }
    }
    impl<T: serde::Serialize> SerializeYes for Probe<T> {}
    trait SerializeNo {
        fn serializes(&self) -> bool {
            false
        }
    }
    impl<T> SerializeNo for &Probe<T> {}

    trait CompareYes {
        fn compares(&self) -> bool {
            true
        }
    }
    impl<T: PartialEq> CompareYes for Probe<T> {}
    trait CompareNo {
        fn compares(&self) -> bool {
            false
        }
    }
    impl<T> CompareNo for &Probe<T> {}

    #[test]
    fn neither_a_secret_nor_an_account_serializes_or_compares() {
        use crate::domain::account::Account;
        let (string, secret, account) =
            (&probe::<String>(), &probe::<Secret>(), &probe::<Account>());
        assert!(string.serializes() && string.compares());
        assert!(!secret.serializes() && !secret.compares());
        assert!(!account.serializes() && !account.compares());
    }

    #[test]
    fn deserializes_from_a_json_string() {
        let secret: Secret = serde_json::from_str("\"EAAG-token\"").unwrap();
        assert_eq!(secret.expose(), "EAAG-token");
    }
}
