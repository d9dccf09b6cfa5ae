//! Types of the business domain. Request-facing types parse and cannot hold invalid values;
//! records are the plain data the store keeps.

pub mod account;
pub mod conversion;
pub mod conversion_record;
pub mod ids;
pub mod phone;
pub mod user;
