//! Black-box tests: the real server over HTTP on a random port.

mod helpers;

mod conversions;
mod health;
mod webhook_handshake;
mod webhook_signature;
mod webhook_samples;
