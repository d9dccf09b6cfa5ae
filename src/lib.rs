//! ctwa-relay: Meta's WhatsApp webhooks in, first-touch Click-to-WhatsApp attribution kept,
//! conversion events out to the Conversions API for Business Messaging.
#![forbid(unsafe_code)]

pub mod api;
pub mod attribution;
pub mod auth;
pub mod cli;
pub mod clock;
pub mod conversions;
pub mod domain;
pub mod error;
pub mod graph;
pub mod ingest;
pub mod json_body;
pub mod metrics;
pub mod routes;
pub mod secret;
pub mod settings;
pub mod startup;
pub mod store;
pub mod telemetry;
pub mod webhook;
