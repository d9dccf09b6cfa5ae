//! `X-Hub-Signature-256` verification over the raw body, inside an extractor so that no
//! handler can read a webhook body that was not verified.

use std::future::Future;
use std::pin::Pin;

use actix_web::http::StatusCode;
use actix_web::web::{self, Bytes};
use actix_web::{dev::Payload, FromRequest, HttpRequest};
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::error::{ApiError, Code};
use crate::ingest::{self, Rejection};
use crate::secret::Secret;

pub const SIGNATURE_HEADER: &str = "x-hub-signature-256";

/// True when `header` is `sha256=<hex>` of HMAC-SHA256 over `body` with any of `secrets`.
/// The comparison is constant-time (`Mac::verify_slice`).
pub fn verify_signature(secrets: &[Secret], header: &str, body: &[u8]) -> bool {
    let Some(hex_digest) = header.trim().strip_prefix("sha256=") else {
        return false;
    };
    let Ok(expected) = hex::decode(hex_digest) else {
        return false;
    };
    secrets.iter().any(|secret| {
        let mut mac = Hmac::<Sha256>::new_from_slice(secret.expose().as_bytes())
            .expect("HMAC accepts keys of any length");
        mac.update(body);
        mac.verify_slice(&expected).is_ok()
    })
}

/// A webhook body whose signature matched one of the configured app secrets. Needs the
/// [`ingest::Service`](crate::ingest::Service) registered as app data.
pub struct VerifiedWebhook(pub Bytes);

impl FromRequest for VerifiedWebhook {
    type Error = ApiError;
    type Future = Pin<Box<dyn Future<Output = Result<Self, Self::Error>>>>;

    fn from_request(request: &HttpRequest, payload: &mut Payload) -> Self::Future {
        let service = request
            .app_data::<web::Data<ingest::Service>>()
            .cloned()
            .expect("the ingest service is registered");
        let header = request
            .headers()
            .get(SIGNATURE_HEADER)
            .map(|value| value.to_str().unwrap_or("").to_string());
        let body = Bytes::from_request(request, payload);
        Box::pin(async move {
            let metrics = service.metrics();
            metrics.webhook_received();
            // Refused before the body is read when no secret could ever verify it.
            if !service.accepts_webhooks() {
                metrics.webhook_rejected(Rejection::NotConfigured.reason());
                return Err(ApiError::new(Code::WebhookNotConfigured));
            }
            let body = match body.await {
                Ok(body) => body,
                Err(error) => {
                    let status = error.as_response_error().status_code();
                    if status == StatusCode::PAYLOAD_TOO_LARGE {
                        metrics.webhook_rejected("too_large");
                        return Err(ApiError::new(Code::PayloadTooLarge)
                            .message("webhook bodies are limited to 4 MiB"));
                    }
                    metrics.webhook_rejected("unreadable");
                    return Err(ApiError::new(Code::UnreadableBody)
                        .message(format!("the request body could not be read: {error}")));
                }
            };
            match service.verify(header.as_deref(), &body) {
                Ok(()) => Ok(VerifiedWebhook(body)),
                Err(Rejection::NotConfigured) => Err(ApiError::new(Code::WebhookNotConfigured)),
                Err(Rejection::MissingSignature) => Err(ApiError::new(Code::MissingSignature)),
                Err(Rejection::InvalidSignature) => Err(ApiError::new(Code::InvalidSignature)),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sign(secret: &str, body: &[u8]) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
        mac.update(body);
        format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
    }

    #[test]
    fn meta_vectors() {
        assert_eq!(
            sign("secret", b"test"),
            "sha256=0329a06b62cd16b33eb6792be8c60b158d89a2ee3a876fce9a881ebb488c0914"
        );
        let body = br#"{"object":"whatsapp_business_account","entry":[]}"#;
        assert!(verify_signature(
            &[Secret::new("test_app_secret")],
            "sha256=dec6a680679a968e7e0319355b23599cbfc54502c0784668e9618baa0c633756",
            body
        ));
    }

    #[test]
    fn any_configured_secret_verifies() {
        let secrets = [Secret::new("old"), Secret::new("new")];
        assert!(verify_signature(&secrets, &sign("new", b"x"), b"x"));
        assert!(verify_signature(&secrets, &sign("old", b"x"), b"x"));
        assert!(!verify_signature(&secrets, &sign("other", b"x"), b"x"));
    }

    #[test]
    fn malformed_headers_fail() {
        let secrets = [Secret::new("s")];
        let good = sign("s", b"x");
        assert!(!verify_signature(
            &secrets,
            good.trim_start_matches("sha256="),
            b"x"
        ));
        assert!(!verify_signature(&secrets, "sha256=zz", b"x"));
        assert!(!verify_signature(&secrets, "sha256=", b"x"));
        assert!(!verify_signature(&secrets, &good, b"y"));
    }

    proptest! {
        /// The header Meta would send verifies under whichever configured secret made it; the
        /// same header over a body changed in one bit, one byte longer or shorter, and a digest
        /// changed in one bit, cut short or extended, are all refused.
        #[test]
        fn a_true_signature_verifies_and_any_change_is_refused(
            secret_texts in prop::collection::vec("[ -~]{1,40}", 1..4),
            signer in any::<prop::sample::Index>(),
            body in prop::collection::vec(any::<u8>(), 0..300),
            at in any::<prop::sample::Index>(),
            bit in 0..8u32,
        ) {
            let secrets: Vec<Secret> = secret_texts.iter().map(Secret::new).collect();
            let header = sign(&secret_texts[signer.index(secret_texts.len())], &body);
            prop_assert!(verify_signature(&secrets, &header, &body));

            let mut longer = body.clone();
            longer.push(b' ');
            prop_assert!(!verify_signature(&secrets, &header, &longer));
            if !body.is_empty() {
                let mut flipped = body.clone();
                flipped[at.index(body.len())] ^= 1 << bit;
                prop_assert!(!verify_signature(&secrets, &header, &flipped));
                prop_assert!(!verify_signature(&secrets, &header, &body[..body.len() - 1]));
            }

            let mut digest = hex::decode(&header["sha256=".len()..]).unwrap();
            let digest_at = at.index(digest.len());
            digest[digest_at] ^= 1 << bit;
            let changed = format!("sha256={}", hex::encode(&digest));
            prop_assert!(!verify_signature(&secrets, &changed, &body));
            prop_assert!(!verify_signature(&secrets, &header[..header.len() - 2], &body));
            let extended = format!("{header}00");
            prop_assert!(!verify_signature(&secrets, &extended, &body));
            prop_assert!(!verify_signature(&secrets, &header.replace("sha256=", "sha1="), &body));
        }

        /// Headers nobody computed from the body are refused, whatever bytes they hold.
        #[test]
        fn made_up_headers_are_refused(
            header in prop_oneof![
                any::<String>(),
                "sha256=[0-9a-f]{64}",
                "sha256=[0-9a-fA-F]{0,70}",
                " *sha256=[0-9a-f]{64}\\PC{0,3}",
            ],
            body in prop::collection::vec(any::<u8>(), 0..64),
        ) {
            let secrets = [Secret::new("test_app_secret"), Secret::new("")];
            prop_assert!(!verify_signature(&secrets, &header, &body));
            prop_assert!(!verify_signature(&[], &header, &body));
        }
    }
}
