//! Black-box tests: the real server over HTTP on a random port.

mod helpers;

mod conversion_delivery;
mod conversions;
mod dataset;
mod health;
mod webhook_handshake;
mod webhook_signature;
mod webhook_samples;
