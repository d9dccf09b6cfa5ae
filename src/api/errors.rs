//! The error body every 4xx and 5xx carries, as the document describes it.

use std::borrow::Cow;

use serde::Serialize;
use utoipa::openapi::schema::{ObjectBuilder, Schema, SchemaType, Type};
use utoipa::openapi::RefOr;
use utoipa::{PartialSchema, ToSchema};

use crate::error::Code;

/// `{"error": "<human message>", "code": "<machine code>"}` (SPEC §4).
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    /// What went wrong and what to do about it, for a person.
    pub error: String,
    /// What went wrong, for a program: one of the catalogue's codes, never renamed.
    pub code: Code,
}

/// A 502 from Meta: the error body with Meta's own code, subcode and trace id.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct MetaErrorBody {
    pub error: String,
    /// Always `meta_error`.
    pub code: Code,
    /// Meta's `error.code`, when Meta answered one.
    pub meta_code: Option<i64>,
    /// Meta's `error.error_subcode`.
    pub meta_subcode: Option<i64>,
    /// Meta's `fbtrace_id`, for Meta's support.
    pub trace_id: Option<String>,
}

impl PartialSchema for Code {
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new()
            .schema_type(SchemaType::Type(Type::String))
            .description(Some(
                "The machine-readable error code; each has one HTTP status (see ctwa-relay's \
                 src/error.rs catalogue).",
            ))
            .enum_values(Some(Code::ALL.iter().map(|code| code.as_str())))
            .into()
    }
}

impl ToSchema for Code {
    fn name() -> Cow<'static, str> {
        Cow::Borrowed("ErrorCode")
    }
}
