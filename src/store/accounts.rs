//! Accounts and API keys. Both are small and read on every request, so they are also held in
//! memory; the trees are the truth and the caches change only after a successful write.

use super::{decode, encode, Caches, Store, StoreError, Trees};
use crate::domain::account::{Account, ApiKey};

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

    /// Inserts a new account, or a `Conflict` when its id or `phone_number_id` is taken.
    pub async fn create_account(&self, account: Account) -> Result<Account, StoreError> {
        let stored = self
            .write(move |inner| {
                let trees = &inner.trees;
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
        self.durable().await?;
        let mut caches = self.inner.caches.write().expect("cache lock poisoned");
        caches
            .account_by_phone_number_id
            .insert(stored.phone_number_id.clone(), stored.id.clone());
        caches.accounts.insert(stored.id.clone(), stored.clone());
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
        self.durable().await?;
        let mut caches = self.inner.caches.write().expect("cache lock poisoned");
        caches
            .account_by_phone_number_id
            .remove(&previous_phone_number_id);
        caches
            .account_by_phone_number_id
            .insert(stored.phone_number_id.clone(), stored.id.clone());
        caches.accounts.insert(stored.id.clone(), stored.clone());
        Ok(stored)
    }

    /// Removes an account. Its conversations and conversions stay in the store, so re-adding
    /// the account with the same id finds them again. Returns false if there was none.
    pub async fn delete_account(&self, id: String) -> Result<bool, StoreError> {
        let removed = self
            .write(move |inner| {
                let trees = &inner.trees;
                let Some(bytes) = trees.accounts.remove(id.as_bytes())? else {
                    return Ok(None);
                };
                let account: Account = decode(&bytes)?;
                trees
                    .account_by_phone_number_id
                    .remove(account.phone_number_id.as_bytes())?;
                Ok(Some(account))
            })
            .await?;
        let Some(account) = removed else {
            return Ok(false);
        };
        self.durable().await?;
        let mut caches = self.inner.caches.write().expect("cache lock poisoned");
        caches
            .account_by_phone_number_id
            .remove(&account.phone_number_id);
        caches.accounts.remove(&account.id);
        Ok(true)
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

    pub async fn create_api_key(&self, api_key: ApiKey) -> Result<ApiKey, StoreError> {
        let stored = self
            .run(move |inner| {
                inner
                    .trees
                    .api_keys
                    .insert(api_key.id.as_bytes(), encode(&api_key)?)?;
                Ok(api_key)
            })
            .await?;
        self.durable().await?;
        let mut caches = self.inner.caches.write().expect("cache lock poisoned");
        caches
            .api_keys_by_hash
            .insert(stored.key_hash.clone(), stored.clone());
        Ok(stored)
    }

    /// Revokes a key; the next request made with it is refused. False if there was none.
    pub async fn revoke_api_key(&self, id: String) -> Result<bool, StoreError> {
        let removed = self
            .run(move |inner| {
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
