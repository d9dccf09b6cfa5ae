//! The storage seam's traits, implemented by the sled store's own methods.

use async_trait::async_trait;
use bytes::Bytes;

use super::SledStore;
use crate::attribution::Conversation;
use crate::domain::conversion_record::{Begin, ConversionRecord};
use crate::domain::user::UserRecord;
use crate::ingest::IngestReport;
use crate::store::{
    AccountFilter, AttributionStore, ConversionStore, StoreError,
    StoreHealth, UnitOfWork,
};

#[async_trait]
impl AttributionStore for SledStore {
    async fn record_webhook(
        &self,
        body: Bytes,
        received_at: i64,
        apply: Option<UnitOfWork>,
    ) -> Result<(u64, IngestReport), StoreError> {
        self.journal_and_apply(body, received_at, apply).await
    }
    async fn attribution_unit(&self, work: UnitOfWork) -> Result<IngestReport, StoreError> {
        self.unit(work).await
    }
    async fn prune_journal(&self, cutoff: i64, limit: usize) -> Result<u64, StoreError> {
        let removed = SledStore::prune_journal(self, cutoff, limit).await?;
        self.durable().await?;
        Ok(removed)
    }
    async fn conversation(&self, id: String) -> Result<Option<Conversation>, StoreError> {
        SledStore::conversation(self, id).await
    }
    async fn user(
        &self,
        account_id: String,
        user_key: String,
    ) -> Result<Option<UserRecord>, StoreError> {
        SledStore::user(self, account_id, user_key).await
    }
    async fn users_with_conversations(
        &self,
        phone: Option<String>,
        bsuid: Option<String>,
        visible: AccountFilter,
    ) -> Result<Vec<(UserRecord, Vec<Conversation>)>, StoreError> {
        SledStore::users_with_conversations(self, phone, bsuid, visible).await
    }
    async fn phone_conversations(
        &self,
        account_id: String,
        phone: String,
    ) -> Result<Option<Vec<Conversation>>, StoreError> {
        SledStore::phone_conversations(self, account_id, phone).await
    }
}

#[async_trait]
impl ConversionStore for SledStore {
    async fn begin_conversion(&self, record: ConversionRecord) -> Result<Begin, StoreError> {
        SledStore::begin_conversion(self, record).await
    }
    async fn save_conversion(&self, record: ConversionRecord) -> Result<(), StoreError> {
        SledStore::save_conversion(self, record).await
    }
    async fn due_conversions(
        &self,
        now_ms: i64,
        limit: usize,
    ) -> Result<Vec<ConversionRecord>, StoreError> {
        SledStore::due_conversions(self, now_ms, limit).await
    }
    async fn outbox_depth(&self) -> Result<u64, StoreError> {
        SledStore::outbox_depth(self).await
    }
    async fn conversion_history(
        &self,
        account_id: String,
        limit: usize,
    ) -> Result<Vec<ConversionRecord>, StoreError> {
        SledStore::conversion_history(self, account_id, limit).await
    }
    async fn conversions_of_conversation(
        &self,
        conversation_id: String,
        limit: usize,
    ) -> Result<Vec<ConversionRecord>, StoreError> {
        SledStore::conversions_of_conversation(self, conversation_id, limit).await
    }
}

#[async_trait]
impl StoreHealth for SledStore {
    fn failure(&self) -> Option<String> {
        SledStore::failure(self)
    }
    async fn check_alive(&self) -> Result<(), StoreError> {
        SledStore::check_alive(self).await
    }
    async fn check_ready(&self) -> Result<(), StoreError> {
        SledStore::check_ready(self).await
    }
    fn flush_blocking(&self) -> Result<(), StoreError> {
        SledStore::flush_blocking(self)
    }
}
