//! `verify_signature`, the check inside the `VerifiedWebhook` extractor, over arbitrary secrets,
//! header and body. The input is `secrets \0 header \0 body`, the secrets one per line, so the
//! corpus can hold real webhook bodies with their real signatures.
//!
//! Properties: the verdict on the given header is exactly "it is `sha256=` and the hex of
//! HMAC-SHA256(body) under one of the secrets"; a header computed that way is accepted; the same
//! header over a changed body, a changed digest, a truncated or extended digest, another
//! prefix, or a secret that is not configured, is refused; nothing panics.
#![no_main]

use ctwa_relay::secret::Secret;
use ctwa_relay::webhook::verify_signature;
use hmac::{Hmac, Mac};
use libfuzzer_sys::fuzz_target;
use sha2::Sha256;

fn hex_digest(secret: &str, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("any key length");
    mac.update(body);
    hex::encode(mac.finalize().into_bytes())
}

fuzz_target!(|data: &[u8]| {
    let mut parts = data.splitn(3, |&byte| byte == 0);
    let secrets_part = parts.next().unwrap_or_default();
    let header_part = parts.next().unwrap_or_default();
    let body = parts.next().unwrap_or_default();
    let secret_texts: Vec<String> = String::from_utf8_lossy(secrets_part)
        .split('\n')
        .filter(|secret| !secret.is_empty())
        // Deployments configure one secret, two while rotating; more only slows the search.
        .take(4)
        .map(str::to_string)
        .collect();
    let secrets: Vec<Secret> = secret_texts.iter().map(Secret::new).collect();
    let header = String::from_utf8_lossy(header_part);

    // The given header: the verdict agrees with an independent reading of the rule.
    let expected = header.trim().strip_prefix("sha256=").is_some_and(|digest| {
        secret_texts
            .iter()
            .any(|secret| digest.eq_ignore_ascii_case(&hex_digest(secret, body)))
    });
    assert_eq!(
        verify_signature(&secrets, &header, body),
        expected,
        "verdict on {header:?}"
    );

    // A secret that is configured nowhere: longer than each configured one and ending in a
    // byte HMAC's zero padding cannot supply.
    let stranger = format!("{}\u{1}", secret_texts.concat());
    assert!(!verify_signature(
        &secrets,
        &format!("sha256={}", hex_digest(&stranger, body)),
        body
    ));

    for secret in &secret_texts {
        let digest = hex_digest(secret, body);
        let good = format!("sha256={digest}");
        assert!(verify_signature(&secrets, &good, body), "a true signature");

        let mut appended = body.to_vec();
        appended.push(b'\n');
        assert!(!verify_signature(&secrets, &good, &appended));
        if let Some(last) = body.len().checked_sub(1) {
            assert!(!verify_signature(&secrets, &good, &body[..last]));
            let mut flipped = body.to_vec();
            flipped[data.len() % body.len()] ^= 1 << (data.len() % 8);
            assert!(!verify_signature(&secrets, &good, &flipped));
        }

        let mut digest_bytes = hex::decode(&digest).expect("our own hex");
        let changed_at = data.len() % digest_bytes.len();
        digest_bytes[changed_at] ^= 0x80;
        let bad_digest = format!("sha256={}", hex::encode(&digest_bytes));
        assert!(!verify_signature(&secrets, &bad_digest, body));
        assert!(!verify_signature(&secrets, &good[..good.len() - 2], body));
        assert!(!verify_signature(&secrets, &format!("{good}00"), body));
        assert!(!verify_signature(&secrets, &format!("sha1={digest}"), body));
        assert!(!verify_signature(&secrets, &digest, body));
    }
});
