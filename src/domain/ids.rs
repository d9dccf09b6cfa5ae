//! Identifiers: generated ones and the rule for ones a caller chooses.

/// A new identifier such as `conv_019a1f0c…`: the creation time in milliseconds (48 bits), then
/// 80 random bits, in hex. Ids made later sort later, so a store inserts new conversations at
/// the end of its key order instead of at random places (a B-tree then rewrites one page per
/// batch of new conversations, not one per conversation); the random part keeps them unique
/// and unguessable.
pub fn generate(prefix: &str) -> String {
    let millis = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| since.as_millis() as u64);
    let mut bytes = [0u8; 16];
    bytes[..6].copy_from_slice(&millis.to_be_bytes()[2..]);
    bytes[6..].copy_from_slice(&rand::random::<[u8; 10]>());
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
        assert_eq!(a.len(), "acc_".len() + 32);
    }

    #[test]
    fn generated_ids_sort_by_creation_time() {
        let earlier = generate("conv");
        std::thread::sleep(std::time::Duration::from_millis(2));
        let later = generate("conv");
        assert!(earlier < later, "{earlier} then {later}");
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
