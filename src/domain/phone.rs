//! Phone numbers as WhatsApp ids: digits only, with country code.

/// 7–15 digits (E.164 without the `+`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PhoneDigits(String);

impl PhoneDigits {
    /// Digits only, as in the contract: a `+`, spaces or punctuation are refused with a hint
    /// rather than guessed at.
    pub fn parse(input: &str) -> Result<Self, String> {
        if !(7..=15).contains(&input.len()) || !input.bytes().all(|b| b.is_ascii_digit()) {
            let hint = if input.starts_with('+') {
                " (drop the leading '+')"
            } else {
                ""
            };
            return Err(format!(
                "expected 7-15 digits with country code and no '+' or spaces, got {input:?}{hint}"
            ));
        }
        Ok(Self(input.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn accepts_digits_only() {
        assert_eq!(
            PhoneDigits::parse("16505551234").unwrap().as_str(),
            "16505551234"
        );
        let plus = PhoneDigits::parse("+16505551234").unwrap_err();
        assert!(plus.contains("drop the leading '+'"), "{plus}");
    }

    #[test]
    fn refuses_formatting_and_bad_lengths() {
        for bad in [
            "(650)555-1212",
            "165 0555",
            "123456",
            "1234567890123456",
            "",
            "+1650555",
            " 16505551234",
        ] {
            assert!(PhoneDigits::parse(bad).is_err(), "{bad}");
        }
    }

    proptest! {
        #[test]
        fn anything_accepted_is_seven_to_fifteen_digits(input in "\\PC{0,20}") {
            if let Ok(phone) = PhoneDigits::parse(&input) {
                prop_assert!((7..=15).contains(&phone.as_str().len()));
                prop_assert!(phone.as_str().bytes().all(|b| b.is_ascii_digit()));
            }
        }
    }
}
