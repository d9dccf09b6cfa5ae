//! Meta's webhook: the signature extractor and the lenient reading of payloads into changes.

pub mod payload;
pub mod signature;

pub use payload::parse_webhook;
pub use signature::{verify_signature, VerifiedWebhook};
