//! Identifiers: generated ones and the rule for ones a caller chooses.

/// A new random identifier such as `conv_1f0c…`, 96 bits of randomness.
pub fn generate(prefix: &str) -> String {
    let bytes: [u8; 12] = rand::random();
    format!("{prefix}_{}", hex::encode(bytes))
}

/// Ids chosen by callers (account ids) are 1–64 characters of `[A-Za-z0-9_.-]`, so they can be
/// used in URLs and as parts of store keys.
pub fn is_valid_caller_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

/// Meta's numeric ids (`phone_number_id`, WABA id, dataset id): digits, 1–32 of them.
pub fn is_valid_meta_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 32 && id.bytes().all(|b| b.is_ascii_digit())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_ids_are_valid_and_distinct() {
        let a = generate("acc");
        let b = generate("acc");
        assert_ne!(a, b);
        assert!(a.starts_with("acc_"));
        assert!(is_valid_caller_id(&a));
    }

    #[test]
    fn caller_ids_refuse_separators_and_slashes() {
        assert!(is_valid_caller_id("account_abc123"));
        assert!(!is_valid_caller_id(""));
        assert!(!is_valid_caller_id("a/b"));
        assert!(!is_valid_caller_id("a\0b"));
        assert!(!is_valid_caller_id(&"x".repeat(65)));
    }

    #[test]
    fn meta_ids_are_digits() {
        assert!(is_valid_meta_id("106540352242922"));
        assert!(!is_valid_meta_id("10654035224292a"));
        assert!(!is_valid_meta_id(""));
    }
}
