//! Who is calling: the admin token or a scoped API key, read from `Authorization: Bearer`.
//!
//! The extractor needs the [`Gate`] (the store and the admin token) registered as app data; the
//! [`Caller`] it yields resolves accounts itself, within its scope.

use std::future::{ready, Ready};

use actix_web::{dev::Payload, web, FromRequest, HttpRequest};

use crate::domain::account::{hash_api_key, Account, ApiKey};
use crate::error::{ApiError, Code};
use crate::secret::Secret;
use crate::store::Store;

/// What authentication checks a presented token against.
pub struct Gate {
    pub store: Store,
    pub admin_token: Option<Secret>,
}

#[derive(Debug, Clone)]
pub enum Scope {
    Admin,
    Key(ApiKey),
}

/// An authenticated caller, with the store to resolve the accounts it may see.
#[derive(Clone)]
pub struct Caller {
    scope: Scope,
    store: Store,
}

impl std::fmt::Debug for Caller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Caller")
            .field("scope", &self.scope)
            .finish()
    }
}

impl Caller {
    pub fn scope(&self) -> &Scope {
        &self.scope
    }

    pub fn require_admin(&self) -> Result<(), ApiError> {
        match self.scope {
            Scope::Admin => Ok(()),
            Scope::Key(_) => Err(ApiError::new(Code::Forbidden)),
        }
    }

    pub fn can_see(&self, account_id: &str) -> bool {
        match &self.scope {
            Scope::Admin => true,
            Scope::Key(key) => key.can_see(account_id),
        }
    }

    /// The account, if it exists and is in this caller's scope; otherwise 404 either way, so a
    /// key never learns whether an account outside its scope exists.
    pub fn account(&self, account_id: &str) -> Result<Account, ApiError> {
        if !self.can_see(account_id) {
            return Err(ApiError::account_not_found(account_id));
        }
        self.store
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
    let gate = request
        .app_data::<web::Data<Gate>>()
        .expect("the auth Gate is registered");
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
    let caller = |scope| Caller {
        scope,
        store: gate.store.clone(),
    };
    if let Some(admin_token) = &gate.admin_token {
        if admin_token.matches(presented) {
            return Ok(caller(Scope::Admin));
        }
    }
    // Keys are looked up by their SHA-256: the secret itself is never compared or stored.
    gate.store
        .api_key_by_hash(&hash_api_key(presented))
        .map(|key| caller(Scope::Key(key)))
        .ok_or_else(ApiError::unauthorized)
}
