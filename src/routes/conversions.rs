//! `POST /v1/whatsapp/conversions` (Zernio-compatible), its history, and dataset provisioning.
//! Thin: the request is read and validated, [`conversions::Service`] does the work, and the
//! outcome becomes the JSON the API has always answered.

use actix_web::http::StatusCode;
use actix_web::{web, HttpResponse};

use crate::api::conversions::{
    ConversionAnswer, ConversionBody, ConversionResult, DatasetAnswer, DatasetBody, DatasetQuery,
    DryRunResult, History, HistoryItem, HistoryQuery, ProvisionedDataset,
};
use crate::api::errors::{ErrorBody, MetaErrorBody};
use crate::auth::Caller;
use crate::conversions::{self, Submitted};
use crate::error::{ApiError, Code};
use crate::json_body::JsonBody;

/// Sends a conversion to Meta (SPEC §4.4).
#[utoipa::path(
    post,
    path = "/v1/whatsapp/conversions",
    tag = "conversions",
    security(("bearer" = [])),
    request_body = ConversionBody,
    responses(
        (status = 200, description = "Meta answered (a refusal is `eventsFailed: 1` with Meta's code), or the event was already recorded (`deduplicated: true`); with `dryRun`, the Graph request that would be sent.", body = ConversionAnswer),
        (status = 202, description = "Transient failures outlasted the request: `queued: true`, the outbox delivers it later.", body = ConversionResult),
        (status = 404, description = "No such account or conversation visible to the key (`account_not_found`, `conversation_not_found`).", body = ErrorBody),
        (status = 422, description = "The conversation has no click id (`no_ctwa_clid`), or the account no dataset (`dataset_not_configured`).", body = ErrorBody),
    ),
)]
pub async fn send(
    service: web::Data<conversions::Service>,
    caller: Caller,
    body: JsonBody<ConversionBody>,
) -> Result<HttpResponse, ApiError> {
    let request = service.validate(body.into_inner())?;
    let account = caller.account(&request.account_id)?;
    let answer = match service.submit(&account, request).await? {
        Submitted::DryRun(dry_run) => ConversionAnswer::DryRun(DryRunResult::new(
            dry_run.conversation_id,
            dry_run.warnings,
            dry_run.url,
            dry_run.body,
        )),
        Submitted::Recorded {
            record,
            deduplicated,
        } => ConversionAnswer::Result(ConversionResult::new(&record, deduplicated)),
    };
    let status = match &answer {
        ConversionAnswer::Result(result) if result.queued => StatusCode::ACCEPTED,
        _ => StatusCode::OK,
    };
    Ok(HttpResponse::build(status).json(answer))
}

#[utoipa::path(
    get,
    path = "/v1/whatsapp/conversions",
    tag = "conversions",
    security(("bearer" = [])),
    params(HistoryQuery),
    responses(
        (status = 200, description = "The account's conversions, newest first.", body = History),
        (status = 404, description = "No such account visible to the key (`account_not_found`).", body = ErrorBody),
    ),
)]
pub async fn history(
    service: web::Data<conversions::Service>,
    caller: Caller,
    query: web::Query<HistoryQuery>,
) -> Result<HttpResponse, ApiError> {
    let query = query.into_inner();
    let Some(account_id) = query.account_id else {
        return Err(ApiError::new(Code::MissingAccountId));
    };
    let limit = query.limit.unwrap_or(50);
    if !(1..=200).contains(&limit) {
        return Err(ApiError::new(Code::InvalidLimit));
    }
    let account = caller.account(&account_id)?;
    let records = service.history(account.id, limit as usize).await?;
    let events = records.iter().map(HistoryItem::from).collect();
    Ok(HttpResponse::Ok().json(History { events }))
}

/// The account's dataset as stored; no service needed.
#[utoipa::path(
    get,
    path = "/v1/whatsapp/dataset",
    tag = "conversions",
    security(("bearer" = [])),
    params(DatasetQuery),
    responses(
        (status = 200, description = "The account's dataset id, or null; Meta is not asked.", body = DatasetAnswer),
        (status = 404, description = "No such account visible to the key (`account_not_found`).", body = ErrorBody),
    ),
)]
pub async fn get_dataset(
    caller: Caller,
    query: web::Query<DatasetQuery>,
) -> Result<HttpResponse, ApiError> {
    let Some(account_id) = query.into_inner().account_id else {
        return Err(ApiError::new(Code::MissingAccountId));
    };
    let account = caller.account(&account_id)?;
    Ok(HttpResponse::Ok().json(DatasetAnswer {
        dataset_id: account.metadata.meta_capi_dataset_id,
    }))
}

/// Reads the WABA's dataset from Meta and creates one when there is none; stores it on the
/// account. Safe to repeat.
#[utoipa::path(
    post,
    path = "/v1/whatsapp/dataset",
    tag = "conversions",
    security(("bearer" = [])),
    request_body = DatasetBody,
    responses(
        (status = 200, description = "The dataset, found or created at Meta, now stored on the account.", body = ProvisionedDataset),
        (status = 404, description = "No such account visible to the key (`account_not_found`).", body = ErrorBody),
        (status = 502, description = "Meta refused (`meta_error`), with Meta's code and a fix hint.", body = MetaErrorBody),
    ),
)]
pub async fn provision_dataset(
    service: web::Data<conversions::Service>,
    caller: Caller,
    body: JsonBody<DatasetBody>,
) -> Result<HttpResponse, ApiError> {
    let account = caller.account(&body.account_id)?;
    let provisioned = service.provision_dataset(account).await?;
    Ok(HttpResponse::Ok().json(ProvisionedDataset {
        dataset_id: provisioned.dataset_id,
        created: provisioned.created,
    }))
}
