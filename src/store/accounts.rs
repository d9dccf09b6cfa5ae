//! Accounts and API keys. Both are small and read on every request, so they are also held in
//! memory; the trees are the truth and the caches follow them as soon as a write has been
//! applied, before the flush, so that a failed flush never leaves memory and trees disagreeing.
//! Every change runs on the writer thread, so a deletion and a key change never interleave.

use serde::Serialize;

use super::{decode, encode, Caches, Store, StoreError, Trees};
use crate::domain::account::{Account, ApiKey};

/// The tombstone of a deleted account: its id is never given to a new account, because the
/// deleted account's conversations and conversions stay in the store under that id.
#[derive(Debug, Serialize)]
struct RetiredAccount {
    id: String,
    phone_number_id: String,
    deleted_at: i64,
}

/// What deleting an account did to the API keys scoped to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AccountDeletion {
    /// Keys that still reach other accounts and lost only this one.
    pub narrowed_keys: usize,
    /// Keys that reached this account only, and were revoked.
    pub revoked_keys: usize,
}

pub(super) fn load_caches(trees: &Trees) -> Result<Caches, StoreError> {
    let mut caches = Caches::default();
    for item in trees.accounts.iter() {
        let (_, value) = item?;
        let account: Account = decode(&value)?;
        caches
            .account_by_phone_number_id
            .insert(account.phone_number_id.clone(), account.id.clone());
        caches.accounts.insert(account.id.clone(), account);
    }
    for item in trees.api_keys.iter() {
        let (_, value) = item?;
        let api_key: ApiKey = decode(&value)?;
        caches
            .api_keys_by_hash
            .insert(api_key.key_hash.clone(), api_key);
    }
    Ok(caches)
}

impl Store {
    pub fn account(&self, id: &str) -> Option<Account> {
        let caches = self.inner.caches.read().expect("cache lock poisoned");
        caches.accounts.get(id).cloned()
    }

    pub fn account_by_phone_number_id(&self, phone_number_id: &str) -> Option<Account> {
        let caches = self.inner.caches.read().expect("cache lock poisoned");
        caches
            .account_by_phone_number_id
            .get(phone_number_id)
            .and_then(|id| caches.accounts.get(id))
            .cloned()
    }

    /// Every account, ordered by id.
    pub fn accounts(&self) -> Vec<Account> {
        let caches = self.inner.caches.read().expect("cache lock poisoned");
        let mut accounts: Vec<Account> = caches.accounts.values().cloned().collect();
        accounts.sort_by(|a, b| a.id.cmp(&b.id));
        accounts
    }

    /// Inserts a new account, or a `Conflict` when its id or `phone_number_id` is taken, or
    /// `AccountIdRetired` when the id belonged to a deleted account.
    pub async fn create_account(&self, account: Account) -> Result<Account, StoreError> {
        let stored = self
            .write(move |inner| {
                let trees = &inner.trees;
                if trees.retired_accounts.contains_key(account.id.as_bytes())? {
                    return Err(StoreError::AccountIdRetired(format!(
                        "account id {} belonged to a deleted account whose conversations and conversions are kept under that id; create the new account with another id",
                        account.id
                    )));
                }
                if trees.accounts.contains_key(account.id.as_bytes())? {
                    return Err(StoreError::Conflict(format!(
                        "an account with id {} already exists",
                        account.id
                    )));
                }
                if trees
                    .account_by_phone_number_id
                    .contains_key(account.phone_number_id.as_bytes())?
                {
                    return Err(StoreError::Conflict(format!(
                        "phoneNumberId {} is already registered to another account",
                        account.phone_number_id
                    )));
                }
                trees
                    .accounts
                    .insert(account.id.as_bytes(), encode(&account)?)?;
                trees
                    .account_by_phone_number_id
                    .insert(account.phone_number_id.as_bytes(), account.id.as_bytes())?;
                Ok(account)
            })
            .await?;
        {
            let mut caches = self.inner.caches.write().expect("cache lock poisoned");
            caches
                .account_by_phone_number_id
                .insert(stored.phone_number_id.clone(), stored.id.clone());
            caches.accounts.insert(stored.id.clone(), stored.clone());
        }
        self.durable().await?;
        Ok(stored)
    }

    /// Replaces an account; `Conflict` if a changed `phone_number_id` belongs to another one.
    pub async fn update_account(&self, account: Account) -> Result<Account, StoreError> {
        let (stored, previous_phone_number_id) = self
            .write(move |inner| {
                let trees = &inner.trees;
                let previous: Account = match trees.accounts.get(account.id.as_bytes())? {
                    Some(bytes) => decode(&bytes)?,
                    None => {
                        return Err(StoreError::Conflict(format!(
                            "account {} no longer exists",
                            account.id
                        )))
                    }
                };
                if previous.phone_number_id != account.phone_number_id {
                    if let Some(owner) = trees
                        .account_by_phone_number_id
                        .get(account.phone_number_id.as_bytes())?
                    {
                        if owner.as_ref() != account.id.as_bytes() {
                            return Err(StoreError::Conflict(format!(
                                "phoneNumberId {} is already registered to another account",
                                account.phone_number_id
                            )));
                        }
                    }
                    trees
                        .account_by_phone_number_id
                        .remove(previous.phone_number_id.as_bytes())?;
                    trees
                        .account_by_phone_number_id
                        .insert(account.phone_number_id.as_bytes(), account.id.as_bytes())?;
                }
                trees
                    .accounts
                    .insert(account.id.as_bytes(), encode(&account)?)?;
                Ok((account, previous.phone_number_id))
            })
            .await?;
        {
            let mut caches = self.inner.caches.write().expect("cache lock poisoned");
            caches
                .account_by_phone_number_id
                .remove(&previous_phone_number_id);
            caches
                .account_by_phone_number_id
                .insert(stored.phone_number_id.clone(), stored.id.clone());
            caches.accounts.insert(stored.id.clone(), stored.clone());
        }
        self.durable().await?;
        Ok(stored)
    }

    /// Deletes an account and retires its id, in one writer job: every API key scoped to it
    /// loses it, a key left with no account is revoked, and a tombstone keeps the id from ever
    /// naming a new account. The account's users, conversations, clicks and conversion records
    /// stay in the store under the retired id (they hold the only copy of the click ids); the
    /// admin token still reads them. `None` if there was no such account.
    pub async fn delete_account(
        &self,
        id: String,
        deleted_at: i64,
    ) -> Result<Option<AccountDeletion>, StoreError> {
        let removed = self
            .write(move |inner| {
                let trees = &inner.trees;
                let Some(bytes) = trees.accounts.get(id.as_bytes())? else {
                    return Ok(None);
                };
                let account: Account = decode(&bytes)?;
                // Keys first and the account last: if the process dies in between, the account
                // is still there to delete again, and no key has kept a scope it should lose.
                let mut narrowed = Vec::new();
                let mut revoked = Vec::new();
                for item in trees.api_keys.iter() {
                    let (_, value) = item?;
                    let mut api_key: ApiKey = decode(&value)?;
                    if !api_key.can_see(&account.id) {
                        continue;
                    }
                    api_key
                        .account_ids
                        .retain(|account_id| account_id != &account.id);
                    if api_key.account_ids.is_empty() {
                        trees.api_keys.remove(api_key.id.as_bytes())?;
                        revoked.push(api_key);
                    } else {
                        trees
                            .api_keys
                            .insert(api_key.id.as_bytes(), encode(&api_key)?)?;
                        narrowed.push(api_key);
                    }
                }
                let tombstone = RetiredAccount {
                    id: account.id.clone(),
                    phone_number_id: account.phone_number_id.clone(),
                    deleted_at,
                };
                trees
                    .retired_accounts
                    .insert(account.id.as_bytes(), encode(&tombstone)?)?;
                trees
                    .account_by_phone_number_id
                    .remove(account.phone_number_id.as_bytes())?;
                trees.accounts.remove(account.id.as_bytes())?;
                Ok(Some((account, narrowed, revoked)))
            })
            .await?;
        let Some((account, narrowed, revoked)) = removed else {
            return Ok(None);
        };
        // The caches follow the trees before the flush: once a key has lost the account in the
        // tree it must not reach it from memory either, even if the flush below fails.
        {
            let mut caches = self.inner.caches.write().expect("cache lock poisoned");
            caches
                .account_by_phone_number_id
                .remove(&account.phone_number_id);
            caches.accounts.remove(&account.id);
            for api_key in &revoked {
                caches.api_keys_by_hash.remove(&api_key.key_hash);
            }
            for api_key in &narrowed {
                caches
                    .api_keys_by_hash
                    .insert(api_key.key_hash.clone(), api_key.clone());
            }
        }
        self.durable().await?;
        Ok(Some(AccountDeletion {
            narrowed_keys: narrowed.len(),
            revoked_keys: revoked.len(),
        }))
    }

    pub fn api_key_by_hash(&self, key_hash: &str) -> Option<ApiKey> {
        let caches = self.inner.caches.read().expect("cache lock poisoned");
        caches.api_keys_by_hash.get(key_hash).cloned()
    }

    /// Every API key (hashes only), oldest first.
    pub fn api_keys(&self) -> Vec<ApiKey> {
        let caches = self.inner.caches.read().expect("cache lock poisoned");
        let mut keys: Vec<ApiKey> = caches.api_keys_by_hash.values().cloned().collect();
        keys.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
        keys
    }

    /// Stores a new key; `Conflict` if one of its accounts was deleted after the caller checked.
    pub async fn create_api_key(&self, api_key: ApiKey) -> Result<ApiKey, StoreError> {
        // On the writer, like account deletion, so a key can never be scoped to an account
        // that a deletion running at the same time has already retired.
        let stored = self
            .write(move |inner| {
                let trees = &inner.trees;
                for account_id in &api_key.account_ids {
                    if !trees.accounts.contains_key(account_id.as_bytes())? {
                        return Err(StoreError::Conflict(format!(
                            "account {account_id} was deleted while the key was being created; create the key without it"
                        )));
                    }
                }
                trees
                    .api_keys
                    .insert(api_key.id.as_bytes(), encode(&api_key)?)?;
                Ok(api_key)
            })
            .await?;
        self.inner
            .caches
            .write()
            .expect("cache lock poisoned")
            .api_keys_by_hash
            .insert(stored.key_hash.clone(), stored.clone());
        self.durable().await?;
        Ok(stored)
    }

    /// Revokes a key; the next request made with it is refused. False if there was none.
    pub async fn revoke_api_key(&self, id: String) -> Result<bool, StoreError> {
        // On the writer, so an account deletion narrowing this key cannot write it back.
        let removed = self
            .write(move |inner| {
                let Some(bytes) = inner.trees.api_keys.remove(id.as_bytes())? else {
                    return Ok(None);
                };
                Ok(Some(decode::<ApiKey>(&bytes)?))
            })
            .await?;
        let Some(api_key) = removed else {
            return Ok(false);
        };
        // Forget the key in memory first: once it is gone from the tree it must not authorise
        // anything, even if the flush below fails.
        self.inner
            .caches
            .write()
            .expect("cache lock poisoned")
            .api_keys_by_hash
            .remove(&api_key.key_hash);
        self.durable().await?;
        Ok(true)
    }
}
