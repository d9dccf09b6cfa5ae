//! The API's request and response bodies, typed, and the OpenAPI 3.1 document generated from
//! them and from the handlers' `#[utoipa::path]` attributes, served at `GET /openapi.json`
//! (SPEC §4.7) and committed as `openapi.json`.

pub mod admin;
pub mod attribution;
pub mod conversions;
pub mod errors;

use std::sync::OnceLock;

use actix_web::HttpResponse;
use serde::Serialize;
use utoipa::openapi::header::HeaderBuilder;
use utoipa::openapi::path::{HttpMethod, OperationBuilder};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{
    ContentBuilder, OpenApi as Document, PathItem, Ref, RefOr, ResponseBuilder, Schema,
};
use utoipa::{Modify, OpenApi, PartialSchema, ToSchema};

use crate::error::Code;
use crate::routes;

/// `{"status": "ok"}` from `/healthz`, `{"status": "ready"}` from `/readyz`.
#[derive(Debug, Serialize, ToSchema)]
pub struct StatusBody {
    #[schema(example = "ok")]
    pub status: &'static str,
}

/// Reads an optional nested object: serde would also read a struct from an array, field by
/// position, which no client means.
pub(crate) fn object_or_null<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: serde::de::DeserializeOwned,
{
    use serde::de::Error;
    use serde::Deserialize;
    match Option::<serde_json::Value>::deserialize(deserializer)? {
        None => Ok(None),
        Some(value @ serde_json::Value::Object(_)) => {
            T::deserialize(value).map(Some).map_err(D::Error::custom)
        }
        Some(other) => Err(D::Error::custom(format!(
            "invalid type: {}, expected an object",
            json_type(&other)
        ))),
    }
}

fn json_type(value: &serde_json::Value) -> &'static str {
    match value {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "boolean",
        serde_json::Value::Number(_) => "number",
        serde_json::Value::String(_) => "string",
        serde_json::Value::Array(_) => "array",
        serde_json::Value::Object(_) => "object",
    }
}

/// The name of the bearer security scheme (the admin token or an API key), as the handlers'
/// `security(("bearer" = []))` attributes spell it.
pub const BEARER: &str = "bearer";

#[derive(OpenApi)]
#[openapi(
    info(
        title = "ctwa-relay",
        description = "Click-to-WhatsApp attribution: Meta webhooks in, Conversions API events \
                       out. Every 4xx and 5xx body is `{\"error\": \"<message>\", \"code\": \
                       \"<code>\"}`; a code never changes its HTTP status.",
    ),
    paths(
        routes::health::healthz,
        routes::health::readyz,
        openapi,
        routes::webhook::handshake,
        routes::webhook::receive,
        routes::admin::create_account,
        routes::admin::list_accounts,
        routes::admin::get_account,
        routes::admin::update_account,
        routes::admin::delete_account,
        routes::admin::create_key,
        routes::admin::list_keys,
        routes::admin::revoke_key,
        routes::conversions::send,
        routes::conversions::history,
        routes::conversions::get_dataset,
        routes::conversions::provision_dataset,
        routes::attribution::attribution,
        routes::attribution::conversation,
    ),
    components(schemas(errors::ErrorBody, errors::MetaErrorBody)),
    modifiers(&Operations, &CommonErrors, &RequestIdHeader, &AlwaysPresent),
    tags(
        (name = "operations", description = "Liveness, readiness, metrics and this document; no authentication."),
        (name = "webhook", description = "Meta's webhook: the subscription handshake and signed deliveries."),
        (name = "admin", description = "Accounts and API keys; the admin token only."),
        (name = "conversions", description = "Conversions to Meta, their history, and the account's dataset."),
        (name = "attribution", description = "Who clicked which ad, per phone, BSUID or conversation."),
    )
)]
pub struct ApiDoc;

/// The document as served and committed: pretty-printed JSON, built once.
pub fn document() -> &'static str {
    static DOCUMENT: OnceLock<String> = OnceLock::new();
    DOCUMENT.get_or_init(|| {
        let mut text = ApiDoc::openapi()
            .to_pretty_json()
            .expect("the OpenAPI document serialises");
        text.push('\n');
        text
    })
}

/// The OpenAPI 3.1 document of this API.
#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "operations",
    responses((status = 200, description = "This document.", content_type = "application/json", body = Object)),
)]
pub async fn openapi() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("application/json")
        .body(document())
}

/// The bearer scheme, and the routes whose handlers carry no `#[utoipa::path]`.
struct Operations;

impl Modify for Operations {
    fn modify(&self, openapi: &mut Document) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            BEARER,
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "The admin token (CTWA_ADMIN_TOKEN) or an API key the admin created.",
                    ))
                    .build(),
            ),
        );
        let metrics = OperationBuilder::new()
            .tag("operations")
            .summary(Some("Prometheus metrics"))
            .response(
                "200",
                ResponseBuilder::new()
                    .description("The Prometheus text exposition format.")
                    .content(
                        crate::metrics::CONTENT_TYPE
                            .split(';')
                            .next()
                            .unwrap_or(crate::metrics::CONTENT_TYPE),
                        ContentBuilder::new().schema(Some(String::schema())).build(),
                    )
                    .build(),
            )
            .build();
        openapi
            .paths
            .paths
            .insert("/metrics".into(), PathItem::new(HttpMethod::Get, metrics));
    }
}

/// The error answers every operation of a kind can give, added from the operation's shape so
/// that no route forgets one: 500 everywhere; 401 behind the bearer scheme; 503 on the `/v1`
/// routes (the store); 400, 413 and 415 with a JSON body; 400 with path or query parameters.
struct CommonErrors;

fn error_response(description: &str) -> RefOr<utoipa::openapi::Response> {
    ResponseBuilder::new()
        .description(description)
        .content(
            "application/json",
            ContentBuilder::new()
                .schema(Some(Ref::from_schema_name("ErrorBody")))
                .build(),
        )
        .build()
        .into()
}

/// The codes a status may carry on any route, for the descriptions.
fn codes_with_status(status: u16) -> String {
    Code::ALL
        .iter()
        .filter(|code| code.status().as_u16() == status)
        .map(|code| format!("`{code}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

impl Modify for CommonErrors {
    fn modify(&self, openapi: &mut Document) {
        for (path, item) in openapi.paths.paths.iter_mut() {
            let operations = [
                &mut item.get,
                &mut item.post,
                &mut item.put,
                &mut item.patch,
                &mut item.delete,
            ];
            for operation in operations.into_iter().flatten() {
                let secured = operation
                    .security
                    .as_ref()
                    .is_some_and(|security| !security.is_empty());
                let json_body = path.starts_with("/v1/") && operation.request_body.is_some();
                let parameters = operation
                    .parameters
                    .as_ref()
                    .is_some_and(|parameters| !parameters.is_empty());
                let mut add = |status: &str, description: String| {
                    operation
                        .responses
                        .responses
                        .entry(status.to_string())
                        .or_insert_with(|| error_response(&description));
                };
                if json_body {
                    add(
                        "400",
                        "The request is not valid; `code` names the problem.".into(),
                    );
                    add(
                        "413",
                        "The body is larger than the route accepts (`payload_too_large`).".into(),
                    );
                    add(
                        "415",
                        "The body is not `application/json` (`unsupported_media_type`).".into(),
                    );
                }
                if parameters {
                    add(
                        "400",
                        "A parameter is not valid; `code` names the problem.".into(),
                    );
                }
                if secured {
                    add(
                        "401",
                        "No valid bearer token (`unauthorized`; the message is exactly `Unauthorized`)."
                            .into(),
                    );
                }
                if path.starts_with("/v1/") {
                    add(
                        "503",
                        format!(
                            "The store cannot take or serve the request; nothing was acknowledged, retry later ({}).",
                            codes_with_status(503)
                        ),
                    );
                }
                add(
                    "500",
                    "An internal error (`internal_error`); the body carries no detail, the server log does."
                        .into(),
                );
            }
        }
    }
}

/// Every response carries `X-Request-Id` (SPEC §4): the caller's own when it sent a valid one.
struct RequestIdHeader;

impl Modify for RequestIdHeader {
    fn modify(&self, openapi: &mut Document) {
        let header = HeaderBuilder::new()
            .schema(String::schema())
            .description(Some(
                "The request's id, in every log line about it: the caller's valid \
                 X-Request-Id, or a new one.",
            ))
            .build();
        for item in openapi.paths.paths.values_mut() {
            let operations = [
                &mut item.get,
                &mut item.post,
                &mut item.put,
                &mut item.patch,
                &mut item.delete,
            ];
            for operation in operations.into_iter().flatten() {
                for response in operation.responses.responses.values_mut() {
                    if let RefOr::T(response) = response {
                        response
                            .headers
                            .insert(REQUEST_ID_HEADER.to_string(), header.clone());
                    }
                }
            }
        }
    }
}

const REQUEST_ID_HEADER: &str = "X-Request-Id";

/// Response bodies whose every field is always present (an absent value is `null`), so the
/// document marks every property required.
const ALWAYS_PRESENT: &[&str] = &[
    "AccountList",
    "AccountView",
    "AttributionAnswer",
    "AttributionResult",
    "AutomaticEventView",
    "ClickView",
    "ConversationView",
    "CreatedKey",
    "CtwaMetadata",
    "DatasetAnswer",
    "DryRunHeaders",
    "DryRunResult",
    "Failure",
    "GraphRequest",
    "History",
    "HistoryItem",
    "KeyList",
    "KeyView",
    "LastError",
    "MetaErrorBody",
    "MetadataView",
    "ProvisionedDataset",
    "StatusBody",
    "UserView",
];

struct AlwaysPresent;

impl Modify for AlwaysPresent {
    fn modify(&self, openapi: &mut Document) {
        let Some(components) = openapi.components.as_mut() else {
            return;
        };
        for name in ALWAYS_PRESENT {
            match components.schemas.get_mut(*name) {
                Some(RefOr::T(Schema::Object(object))) => {
                    object.required = object.properties.keys().cloned().collect();
                }
                _ => panic!("{name} is not an object schema of the OpenAPI document"),
            }
        }
    }
}
