//! Accounts and API keys. Both are small and read on every request, so they are also held in
//! memory; the trees are the truth and the caches follow them as soon as a write has been
//! applied, before the flush, so that a failed flush never leaves memory and trees disagreeing.
//! Every change is one unit on the writer thread (one sled transaction), so a deletion and a key
//! change never interleave and a crash keeps all of a change or none of it.

use async_trait::async_trait;

use super::unit::TreeName;
use super::{decode, encode, Caches, Store, StoreError, Trees};
use crate::domain::account::{Account, ApiKey};
use crate::store::layout::{decode_account, encode_account, RetiredAccount};
use crate::store::{AccountDeletion, AccountStore};

pub(super) fn load_caches(trees: &Trees) -> Result<Caches, StoreError> {
    let mut caches = Caches::default();
    for item in trees.accounts.iter() {
        let (_, value) = item?;
        let account = decode_account(&value)?;
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
    fn caches(&self) -> std::sync::RwLockReadGuard<'_, Caches> {
        self.inner.caches.read().expect("cache lock poisoned")
    }

    fn caches_mut(&self) -> std::sync::RwLockWriteGuard<'_, Caches> {
        self.inner.caches.write().expect("cache lock poisoned")
    }
}

#[async_trait]
impl AccountStore for Store {
    fn account(&self, id: &str) -> Option<Account> {
        self.caches().accounts.get(id).cloned()
    }

    fn account_by_phone_number_id(&self, phone_number_id: &str) -> Option<Account> {
        let caches = self.caches();
        caches
            .account_by_phone_number_id
            .get(phone_number_id)
            .and_then(|id| caches.accounts.get(id))
            .cloned()
    }

    fn accounts(&self) -> Vec<Account> {
        let mut accounts: Vec<Account> = self.caches().accounts.values().cloned().collect();
        accounts.sort_by(|a, b| a.id.cmp(&b.id));
        accounts
    }

    async fn create_account(&self, account: Account) -> Result<Account, StoreError> {
        let stored = self
            .apply_unit(move |tx| {
                if tx.contains_key(TreeName::RetiredAccounts, account.id.as_bytes())? {
                    return Err(StoreError::AccountIdRetired(format!(
                        "account id {} belonged to a deleted account whose conversations and conversions are kept under that id; create the new account with another id",
                        account.id
                    )));
                }
                if tx.contains_key(TreeName::Accounts, account.id.as_bytes())? {
                    return Err(StoreError::Conflict(format!(
                        "an account with id {} already exists",
                        account.id
                    )));
                }
                if tx.contains_key(
                    TreeName::AccountByPhoneNumberId,
                    account.phone_number_id.as_bytes(),
                )? {
                    return Err(StoreError::Conflict(format!(
                        "phoneNumberId {} is already registered to another account",
                        account.phone_number_id
                    )));
                }
                tx.insert(
                    TreeName::Accounts,
                    account.id.as_bytes(),
                    encode_account(&account)?,
                );
                tx.insert(
                    TreeName::AccountByPhoneNumberId,
                    account.phone_number_id.as_bytes(),
                    account.id.as_bytes(),
                );
                Ok(account)
            })
            .await?;
        {
            let mut caches = self.caches_mut();
            caches
                .account_by_phone_number_id
                .insert(stored.phone_number_id.clone(), stored.id.clone());
            caches.accounts.insert(stored.id.clone(), stored.clone());
        }
        self.durable().await?;
        Ok(stored)
    }

    async fn update_account(&self, account: Account) -> Result<Account, StoreError> {
        let (stored, previous_phone_number_id) = self
            .apply_unit(move |tx| {
                let previous = match tx.get(TreeName::Accounts, account.id.as_bytes())? {
                    Some(bytes) => decode_account(&bytes)?,
                    None => {
                        return Err(StoreError::Conflict(format!(
                            "account {} no longer exists",
                            account.id
                        )))
                    }
                };
                if previous.phone_number_id != account.phone_number_id {
                    if let Some(owner) = tx.get(
                        TreeName::AccountByPhoneNumberId,
                        account.phone_number_id.as_bytes(),
                    )? {
                        if owner != account.id.as_bytes() {
                            return Err(StoreError::Conflict(format!(
                                "phoneNumberId {} is already registered to another account",
                                account.phone_number_id
                            )));
                        }
                    }
                    tx.remove(
                        TreeName::AccountByPhoneNumberId,
                        previous.phone_number_id.as_bytes(),
                    );
                    tx.insert(
                        TreeName::AccountByPhoneNumberId,
                        account.phone_number_id.as_bytes(),
                        account.id.as_bytes(),
                    );
                }
                tx.insert(
                    TreeName::Accounts,
                    account.id.as_bytes(),
                    encode_account(&account)?,
                );
                Ok((account, previous.phone_number_id))
            })
            .await?;
        {
            let mut caches = self.caches_mut();
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

    /// One unit: every API key scoped to the account loses it, a key left with no account is
    /// revoked, a tombstone keeps the id from ever naming a new account, and the account goes.
    /// Its users, conversations, clicks and conversion records stay under the retired id (they
    /// hold the only copy of the click ids); the admin token still reads them.
    async fn delete_account(
        &self,
        id: String,
        deleted_at: i64,
    ) -> Result<Option<AccountDeletion>, StoreError> {
        let removed = self
            .apply_unit(move |tx| {
                let Some(bytes) = tx.get(TreeName::Accounts, id.as_bytes())? else {
                    return Ok(None);
                };
                let account = decode_account(&bytes)?;
                let mut narrowed = Vec::new();
                let mut revoked = Vec::new();
                for (_, value) in tx.scan_prefix(TreeName::ApiKeys, b"")? {
                    let mut api_key: ApiKey = decode(&value)?;
                    if !api_key.can_see(&account.id) {
                        continue;
                    }
                    api_key
                        .account_ids
                        .retain(|account_id| account_id != &account.id);
                    if api_key.account_ids.is_empty() {
                        tx.remove(TreeName::ApiKeys, api_key.id.as_bytes());
                        revoked.push(api_key);
                    } else {
                        tx.insert(TreeName::ApiKeys, api_key.id.as_bytes(), encode(&api_key)?);
                        narrowed.push(api_key);
                    }
                }
                let tombstone = RetiredAccount {
                    id: account.id.clone(),
                    phone_number_id: account.phone_number_id.clone(),
                    deleted_at,
                };
                tx.insert(
                    TreeName::RetiredAccounts,
                    account.id.as_bytes(),
                    encode(&tombstone)?,
                );
                tx.remove(
                    TreeName::AccountByPhoneNumberId,
                    account.phone_number_id.as_bytes(),
                );
                tx.remove(TreeName::Accounts, account.id.as_bytes());
                Ok(Some((account, narrowed, revoked)))
            })
            .await?;
        let Some((account, narrowed, revoked)) = removed else {
            return Ok(None);
        };
        // The caches follow the trees before the flush: once a key has lost the account in the
        // tree it must not reach it from memory either, even if the flush below fails.
        {
            let mut caches = self.caches_mut();
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

    fn api_key_by_hash(&self, key_hash: &str) -> Option<ApiKey> {
        self.caches().api_keys_by_hash.get(key_hash).cloned()
    }

    fn api_keys(&self) -> Vec<ApiKey> {
        let mut keys: Vec<ApiKey> = self.caches().api_keys_by_hash.values().cloned().collect();
        keys.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
        keys
    }

    async fn create_api_key(&self, api_key: ApiKey) -> Result<ApiKey, StoreError> {
        // On the writer, like account deletion, so a key can never be scoped to an account
        // that a deletion running at the same time has already retired.
        let stored = self
            .apply_unit(move |tx| {
                for account_id in &api_key.account_ids {
                    if !tx.contains_key(TreeName::Accounts, account_id.as_bytes())? {
                        return Err(StoreError::Conflict(format!(
                            "account {account_id} was deleted while the key was being created; create the key without it"
                        )));
                    }
                }
                tx.insert(TreeName::ApiKeys, api_key.id.as_bytes(), encode(&api_key)?);
                Ok(api_key)
            })
            .await?;
        self.caches_mut()
            .api_keys_by_hash
            .insert(stored.key_hash.clone(), stored.clone());
        self.durable().await?;
        Ok(stored)
    }

    async fn revoke_api_key(&self, id: String) -> Result<bool, StoreError> {
        // On the writer, so an account deletion narrowing this key cannot write it back.
        let removed = self
            .apply_unit(move |tx| {
                let Some(bytes) = tx.get(TreeName::ApiKeys, id.as_bytes())? else {
                    return Ok(None);
                };
                tx.remove(TreeName::ApiKeys, id.as_bytes());
                Ok(Some(decode::<ApiKey>(&bytes)?))
            })
            .await?;
        let Some(api_key) = removed else {
            return Ok(false);
        };
        // Forget the key in memory first: once it is gone from the tree it must not authorise
        // anything, even if the flush below fails.
        self.caches_mut().api_keys_by_hash.remove(&api_key.key_hash);
        self.durable().await?;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An account record exactly as the stores written before `AccountRecord` hold it (the
    /// derived `Serialize` of `Account`, whose `Secret` wrote its plaintext).
    const RECORD_OF_THE_FIRST_LAYOUT: &str = concat!(
        r#"{"id":"acc_1","name":"Shop","phone_number_id":"106540352242922","#,
        r#""waba_id":"102290129340398","display_phone_number":"+1 650-555-1234","#,
        r#""access_token":"EAAG-stored-token","#,
        r#""metadata":{"meta_capi_dataset_id":"42","connected_facebook_page_id":null},"#,
        r#""forward_automatic_events":true,"created_at":1750000000,"updated_at":1750000001}"#
    );

    #[test]
    fn a_record_of_the_first_layout_keeps_its_token_and_encodes_back_to_the_same_bytes() {
        let account = decode_account(RECORD_OF_THE_FIRST_LAYOUT.as_bytes()).unwrap();
        assert_eq!(account.access_token.expose(), "EAAG-stored-token");
        assert_eq!(account.phone_number_id, "106540352242922");
        assert_eq!(account.metadata.meta_capi_dataset_id.as_deref(), Some("42"));
        assert!(account.forward_automatic_events);
        assert_eq!(account.updated_at, 1_750_000_001);
        let encoded = encode_account(&account).unwrap();
        assert_eq!(
            String::from_utf8(encoded).unwrap(),
            RECORD_OF_THE_FIRST_LAYOUT
        );
    }

    #[test]
    fn a_record_from_before_automatic_events_opens_with_them_off() {
        let record = RECORD_OF_THE_FIRST_LAYOUT.replace(r#""forward_automatic_events":true,"#, "");
        let account = decode_account(record.as_bytes()).unwrap();
        assert!(!account.forward_automatic_events);
        assert_eq!(account.access_token.expose(), "EAAG-stored-token");
    }

    #[test]
    fn an_account_never_prints_its_token() {
        let account = decode_account(RECORD_OF_THE_FIRST_LAYOUT.as_bytes()).unwrap();
        let shown = format!("{account:?} {account:#?}");
        assert!(!shown.contains("EAAG-stored-token"), "{shown}");
        assert!(shown.contains("REDACTED"), "{shown}");
    }

    /// Concurrent creations land in shared writer batches: a unit that conflicts is undone alone
    /// and the others of its batch are kept.
    #[tokio::test]
    async fn conflicting_units_in_one_batch_fail_alone() {
        let dir = tempfile::tempdir().unwrap();
        let store = std::sync::Arc::new(Store::open(dir.path()).unwrap());
        let creations: Vec<_> = (0..40)
            .map(|attempt| {
                let store = store.clone();
                let record = RECORD_OF_THE_FIRST_LAYOUT
                    .replace("acc_1", &format!("acc_{}", attempt % 10))
                    .replace("106540352242922", &format!("{}", 1000 + attempt));
                tokio::spawn(async move {
                    let account = decode_account(record.as_bytes()).unwrap();
                    store.create_account(account).await
                })
            })
            .collect();
        let mut created = 0;
        for creation in creations {
            match creation.await.unwrap() {
                Ok(_) => created += 1,
                Err(StoreError::Conflict(message)) => assert!(message.contains("already exists")),
                Err(other) => panic!("{other}"),
            }
        }
        assert_eq!(created, 10);
        assert_eq!(store.accounts().len(), 10);
        let stored = store.inner.trees.accounts.len();
        let numbers = store.inner.trees.account_by_phone_number_id.len();
        assert_eq!(
            (stored, numbers),
            (10, 10),
            "no write of a failed unit was kept"
        );
    }
}
