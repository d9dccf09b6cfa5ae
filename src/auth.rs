//! Who is calling: the admin token or a scoped API key, read from `Authorization: Bearer`.

use std::future::{ready, Ready};

use actix_web::{dev::Payload, web, FromRequest, HttpRequest};

use crate::domain::account::{hash_api_key, Account, ApiKey};
use crate::error::ApiError;
use crate::startup::AppState;

#[derive(Debug, Clone)]
pub enum Caller {
    Admin,
    Key(ApiKey),
}

impl Caller {
    pub fn require_admin(&self) -> Result<(), ApiError> {
        match self {
            Caller::Admin => Ok(()),
            Caller::Key(_) => Err(ApiError::forbidden(
                "this route needs the admin token; API keys cannot use it",
            )),
        }
    }

    pub fn can_see(&self, account_id: &str) -> bool {
        match self {
            Caller::Admin => true,
            Caller::Key(key) => key.can_see(account_id),
        }
    }

    /// The account, if it exists and is in this caller's scope; otherwise 404 either way, so a
    /// key never learns whether an account outside its scope exists.
    pub fn account(&self, state: &AppState, account_id: &str) -> Result<Account, ApiError> {
        if !self.can_see(account_id) {
            return Err(ApiError::account_not_found(account_id));
        }
        state
            .store
            .account(account_id)
            .ok_or_else(|| ApiError::account_not_found(account_id))
    }
}

impl FromRequest for Caller {
    type Error = ApiError;
    type Future = Ready<Result<Self, Self::Error>>;

    fn from_request(request: &HttpRequest, _: &mut Payload) -> Self::Future {
        ready(identify(request))
    }
}

fn identify(request: &HttpRequest) -> Result<Caller, ApiError> {
    let state = request
        .app_data::<web::Data<AppState>>()
        .expect("AppState is registered");
    let presented = request
        .headers()
        .get(actix_web::http::header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| {
            value
                .strip_prefix("Bearer ")
                .or_else(|| value.strip_prefix("bearer "))
        })
        .map(str::trim)
        .filter(|token| !token.is_empty())
        .ok_or_else(ApiError::unauthorized)?;
    if let Some(admin_token) = &state.settings.admin_token {
        if admin_token.matches(presented) {
            return Ok(Caller::Admin);
        }
    }
    // Keys are looked up by their SHA-256: the secret itself is never compared or stored.
    state
        .store
        .api_key_by_hash(&hash_api_key(presented))
        .map(Caller::Key)
        .ok_or_else(ApiError::unauthorized)
}
