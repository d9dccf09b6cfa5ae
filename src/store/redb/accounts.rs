//! Accounts and API keys in redb, also held in memory. Every change is one unit in the writer's
//! batch; the caches follow on the writer thread right after the commit, before the caller (or
//! anyone behind it) is answered, so memory never shows a change that is not durable.

use async_trait::async_trait;
use redb::{ReadTransaction, ReadableTable};

use super::unit::TableName;
use super::{decode, encode, table, Caches, Store, StoreError};
use crate::domain::account::{Account, ApiKey};
use crate::store::layout::{decode_account, encode_account, RetiredAccount};
use crate::store::{AccountDeletion, AccountStore};

pub(super) fn load_caches(read: &ReadTransaction) -> Result<Caches, StoreError> {
    let mut caches = Caches::default();
    for item in read.open_table(table(TableName::Accounts))?.iter()? {
        let (_, value) = item?;
        let account = decode_account(value.value())?;
        caches
            .account_by_phone_number_id
            .insert(account.phone_number_id.clone(), account.id.clone());
        caches.accounts.insert(account.id.clone(), account);
    }
    for item in read.open_table(table(TableName::ApiKeys))?.iter()? {
        let (_, value) = item?;
        let api_key: ApiKey = decode(value.value())?;
        caches
            .api_keys_by_hash
            .insert(api_key.key_hash.clone(), api_key);
    }
    Ok(caches)
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
        self.unit_then(
            move |tx| {
                if tx.contains_key(TableName::RetiredAccounts, account.id.as_bytes())? {
                    return Err(StoreError::AccountIdRetired(format!(
                        "account id {} belonged to a deleted account whose conversations and conversions are kept under that id; create the new account with another id",
                        account.id
                    )));
                }
                if tx.contains_key(TableName::Accounts, account.id.as_bytes())? {
                    return Err(StoreError::Conflict(format!(
                        "an account with id {} already exists",
                        account.id
                    )));
                }
                if tx.contains_key(
                    TableName::AccountByPhoneNumberId,
                    account.phone_number_id.as_bytes(),
                )? {
                    return Err(StoreError::Conflict(format!(
                        "phoneNumberId {} is already registered to another account",
                        account.phone_number_id
                    )));
                }
                tx.insert(
                    TableName::Accounts,
                    account.id.as_bytes(),
                    encode_account(&account)?,
                )?;
                tx.insert(
                    TableName::AccountByPhoneNumberId,
                    account.phone_number_id.as_bytes(),
                    account.id.as_bytes(),
                )?;
                Ok(account)
            },
            |stored, caches| {
                caches
                    .account_by_phone_number_id
                    .insert(stored.phone_number_id.clone(), stored.id.clone());
                caches.accounts.insert(stored.id.clone(), stored.clone());
            },
        )
        .await
    }

    async fn update_account(&self, account: Account) -> Result<Account, StoreError> {
        let (stored, _) = self
            .unit_then(
                move |tx| {
                    let previous = match tx.get(TableName::Accounts, account.id.as_bytes())? {
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
                            TableName::AccountByPhoneNumberId,
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
                            TableName::AccountByPhoneNumberId,
                            previous.phone_number_id.as_bytes(),
                        )?;
                        tx.insert(
                            TableName::AccountByPhoneNumberId,
                            account.phone_number_id.as_bytes(),
                            account.id.as_bytes(),
                        )?;
                    }
                    tx.insert(
                        TableName::Accounts,
                        account.id.as_bytes(),
                        encode_account(&account)?,
                    )?;
                    Ok((account, previous.phone_number_id))
                },
                |(stored, previous_phone_number_id), caches| {
                    caches
                        .account_by_phone_number_id
                        .remove(previous_phone_number_id);
                    caches
                        .account_by_phone_number_id
                        .insert(stored.phone_number_id.clone(), stored.id.clone());
                    caches.accounts.insert(stored.id.clone(), stored.clone());
                },
            )
            .await?;
        Ok(stored)
    }

    /// One unit: every API key scoped to the account loses it, a key left with no account is
    /// revoked, a tombstone keeps the id from ever naming a new account, and the account goes.
    /// Its users, conversations, clicks and conversion records stay under the retired id.
    async fn delete_account(
        &self,
        id: String,
        deleted_at: i64,
    ) -> Result<Option<AccountDeletion>, StoreError> {
        let removed = self
            .unit_then(
                move |tx| {
                    let Some(bytes) = tx.get(TableName::Accounts, id.as_bytes())? else {
                        return Ok(None);
                    };
                    let account = decode_account(&bytes)?;
                    let mut narrowed = Vec::new();
                    let mut revoked = Vec::new();
                    for (_, value) in tx.scan_prefix(TableName::ApiKeys, b"")? {
                        let mut api_key: ApiKey = decode(&value)?;
                        if !api_key.can_see(&account.id) {
                            continue;
                        }
                        api_key
                            .account_ids
                            .retain(|account_id| account_id != &account.id);
                        if api_key.account_ids.is_empty() {
                            tx.remove(TableName::ApiKeys, api_key.id.as_bytes())?;
                            revoked.push(api_key);
                        } else {
                            tx.insert(
                                TableName::ApiKeys,
                                api_key.id.as_bytes(),
                                encode(&api_key)?,
                            )?;
                            narrowed.push(api_key);
                        }
                    }
                    let tombstone = RetiredAccount {
                        id: account.id.clone(),
                        phone_number_id: account.phone_number_id.clone(),
                        deleted_at,
                    };
                    tx.insert(
                        TableName::RetiredAccounts,
                        account.id.as_bytes(),
                        encode(&tombstone)?,
                    )?;
                    tx.remove(
                        TableName::AccountByPhoneNumberId,
                        account.phone_number_id.as_bytes(),
                    )?;
                    tx.remove(TableName::Accounts, account.id.as_bytes())?;
                    Ok(Some((account, narrowed, revoked)))
                },
                |removed, caches| {
                    let Some((account, narrowed, revoked)) = removed else {
                        return;
                    };
                    caches
                        .account_by_phone_number_id
                        .remove(&account.phone_number_id);
                    caches.accounts.remove(&account.id);
                    for api_key in revoked {
                        caches.api_keys_by_hash.remove(&api_key.key_hash);
                    }
                    for api_key in narrowed {
                        caches
                            .api_keys_by_hash
                            .insert(api_key.key_hash.clone(), api_key.clone());
                    }
                },
            )
            .await?;
        Ok(removed.map(|(_, narrowed, revoked)| AccountDeletion {
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

    /// In the writer's batch, like account deletion, so a key can never be scoped to an account
    /// that a deletion running at the same time has already retired.
    async fn create_api_key(&self, api_key: ApiKey) -> Result<ApiKey, StoreError> {
        self.unit_then(
            move |tx| {
                for account_id in &api_key.account_ids {
                    if !tx.contains_key(TableName::Accounts, account_id.as_bytes())? {
                        return Err(StoreError::Conflict(format!(
                            "account {account_id} was deleted while the key was being created; create the key without it"
                        )));
                    }
                }
                tx.insert(TableName::ApiKeys, api_key.id.as_bytes(), encode(&api_key)?)?;
                Ok(api_key)
            },
            |stored, caches| {
                caches
                    .api_keys_by_hash
                    .insert(stored.key_hash.clone(), stored.clone());
            },
        )
        .await
    }

    async fn revoke_api_key(&self, id: String) -> Result<bool, StoreError> {
        let removed = self
            .unit_then(
                move |tx| {
                    let Some(bytes) = tx.get(TableName::ApiKeys, id.as_bytes())? else {
                        return Ok(None);
                    };
                    tx.remove(TableName::ApiKeys, id.as_bytes())?;
                    Ok(Some(decode::<ApiKey>(&bytes)?))
                },
                |removed, caches| {
                    if let Some(api_key) = removed {
                        caches.api_keys_by_hash.remove(&api_key.key_hash);
                    }
                },
            )
            .await?;
        Ok(removed.is_some())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An account record exactly as the sled store's layout 1 holds it.
    const RECORD_OF_THE_FIRST_LAYOUT: &str = concat!(
        r#"{"id":"acc_1","name":"Shop","phone_number_id":"106540352242922","#,
        r#""waba_id":"102290129340398","display_phone_number":"+1 650-555-1234","#,
        r#""access_token":"EAAG-stored-token","#,
        r#""metadata":{"meta_capi_dataset_id":"42","connected_facebook_page_id":null},"#,
        r#""forward_automatic_events":true,"created_at":1750000000,"updated_at":1750000001}"#
    );

    #[test]
    fn a_record_of_the_sled_layout_encodes_back_to_the_same_bytes() {
        let account = decode_account(RECORD_OF_THE_FIRST_LAYOUT.as_bytes()).unwrap();
        assert_eq!(account.access_token.expose(), "EAAG-stored-token");
        let encoded = encode_account(&account).unwrap();
        assert_eq!(
            String::from_utf8(encoded).unwrap(),
            RECORD_OF_THE_FIRST_LAYOUT
        );
    }

    #[tokio::test]
    async fn accounts_and_keys_are_cached_after_the_commit_and_reloaded_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let account = decode_account(RECORD_OF_THE_FIRST_LAYOUT.as_bytes()).unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            store.create_account(account).await.unwrap();
            assert!(store.account("acc_1").is_some());
            let again = decode_account(RECORD_OF_THE_FIRST_LAYOUT.as_bytes()).unwrap();
            let refused = store.create_account(again).await.unwrap_err();
            assert!(matches!(refused, StoreError::Conflict(_)), "{refused}");
        }
        let store = Store::open(dir.path()).unwrap();
        let found = store.account_by_phone_number_id("106540352242922").unwrap();
        assert_eq!(found.id, "acc_1");
        let deletion = store.delete_account("acc_1".into(), 1).await.unwrap();
        assert!(deletion.is_some());
        assert!(store.account("acc_1").is_none());
        let reused = decode_account(RECORD_OF_THE_FIRST_LAYOUT.as_bytes()).unwrap();
        let refused = store.create_account(reused).await.unwrap_err();
        assert!(
            matches!(refused, StoreError::AccountIdRetired(_)),
            "{refused}"
        );
    }
}
