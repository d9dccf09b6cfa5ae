//! The storage seam's traits, implemented by the sled store's own methods.

use async_trait::async_trait;

use super::SledStore;
use crate::domain::conversion_record::{Begin, ConversionRecord};
use crate::store::{ConversionStore, StoreError};

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
