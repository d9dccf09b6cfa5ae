//! Black-box tests: the real server over HTTP on a random port.

mod helpers;
#[path = "../support/server.rs"]
mod server;

mod admin;
mod attribution;
mod cli;
mod conversion_delivery;
mod conversions;
mod dataset;
mod durability;
mod health;
mod hostile;
mod migrate_store;
mod openapi;
mod retention;
mod store_safety;
mod webhook_handshake;
mod webhook_samples;
mod webhook_signature;
