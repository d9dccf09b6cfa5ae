//! A unit of work on the writer thread: reads see the unit's own writes, and the writes are
//! applied together in one sled transaction, so a crash keeps all of a unit or none of it.
//!
//! Every unit runs on the one writer thread, so nothing else changes these trees while a unit
//! reads them; the transaction only has to make the unit's writes atomic, and it holds no reads.

use std::collections::BTreeMap;

use sled::transaction::{ConflictableTransactionError, TransactionError};
use sled::Transactional;

use super::{Inner, StoreError, Trees};

/// The trees a unit may write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum TreeName {
    Accounts,
    AccountByPhoneNumberId,
    RetiredAccounts,
    ApiKeys,
    Users,
    PhoneIndex,
    BsuidIndex,
    Conversations,
    Messages,
    PendingEvents,
    Unrouted,
    ConversionRecords,
    ConversionHistory,
    ConversionByConversation,
    Outbox,
    Journal,
    Unparseable,
}

impl Trees {
    pub(crate) fn named(&self, name: TreeName) -> &sled::Tree {
        match name {
            TreeName::Accounts => &self.accounts,
            TreeName::AccountByPhoneNumberId => &self.account_by_phone_number_id,
            TreeName::RetiredAccounts => &self.retired_accounts,
            TreeName::ApiKeys => &self.api_keys,
            TreeName::Users => &self.users,
            TreeName::PhoneIndex => &self.phone_index,
            TreeName::BsuidIndex => &self.bsuid_index,
            TreeName::Conversations => &self.conversations,
            TreeName::Messages => &self.messages,
            TreeName::PendingEvents => &self.pending_events,
            TreeName::Unrouted => &self.unrouted,
            TreeName::ConversionRecords => &self.conversion_records,
            TreeName::ConversionHistory => &self.conversion_history,
            TreeName::ConversionByConversation => &self.conversion_by_conversation,
            TreeName::Outbox => &self.outbox,
            TreeName::Journal => &self.journal,
            TreeName::Unparseable => &self.unparseable,
        }
    }
}

/// A key and its value.
pub(crate) type Entry = (Vec<u8>, Vec<u8>);

/// A pending write: `None` removes the key.
type Pending = Option<Vec<u8>>;

/// A key of a tree.
type TreeKey = (TreeName, Vec<u8>);

pub(crate) struct Tx<'a> {
    pub(crate) inner: &'a Inner,
    /// Pending writes of every unit of the batch so far.
    writes: BTreeMap<TreeKey, Pending>,
    /// How to undo the current unit: each key it wrote, with what the batch held before
    /// (`None`: nothing pending for that key).
    undo: Vec<(TreeKey, Option<Pending>)>,
}

impl<'a> Tx<'a> {
    pub(crate) fn new(inner: &'a Inner) -> Self {
        Self {
            inner,
            writes: BTreeMap::new(),
            undo: Vec::new(),
        }
    }

    /// Starts the next unit of the batch.
    pub(crate) fn begin_unit(&mut self) {
        self.undo.clear();
    }

    /// Undoes every write of the current unit, leaving the batch as it was before it.
    pub(crate) fn rollback_unit(&mut self) {
        self.rollback_to(0);
    }

    /// A point inside the current unit to roll back to.
    pub(crate) fn savepoint(&self) -> usize {
        self.undo.len()
    }

    /// Undoes the current unit's writes made after `savepoint`.
    pub(crate) fn rollback_to(&mut self, savepoint: usize) {
        while self.undo.len() > savepoint {
            let Some((key, before)) = self.undo.pop() else {
                break;
            };
            match before {
                Some(pending) => self.writes.insert(key, pending),
                None => self.writes.remove(&key),
            };
        }
    }

    fn write(&mut self, key: TreeKey, value: Pending) {
        let before = self.writes.insert(key.clone(), value);
        self.undo.push((key, before));
    }

    pub(crate) fn trees(&self) -> &'a Trees {
        &self.inner.trees
    }

    pub(crate) fn get(&self, tree: TreeName, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        if let Some(pending) = self.writes.get(&(tree, key.to_vec())) {
            return Ok(pending.clone());
        }
        Ok(self
            .trees()
            .named(tree)
            .get(key)?
            .map(|value| value.to_vec()))
    }

    pub(crate) fn contains_key(&self, tree: TreeName, key: &[u8]) -> Result<bool, StoreError> {
        Ok(self.get(tree, key)?.is_some())
    }

    pub(crate) fn insert(
        &mut self,
        tree: TreeName,
        key: impl Into<Vec<u8>>,
        value: impl Into<Vec<u8>>,
    ) {
        self.write((tree, key.into()), Some(value.into()));
    }

    pub(crate) fn remove(&mut self, tree: TreeName, key: impl Into<Vec<u8>>) {
        self.write((tree, key.into()), None);
    }

    /// Every entry whose key starts with `prefix`, in key order, as this unit sees them.
    pub(crate) fn scan_prefix(
        &self,
        tree: TreeName,
        prefix: &[u8],
    ) -> Result<Vec<Entry>, StoreError> {
        let mut entries = BTreeMap::new();
        for item in self.trees().named(tree).scan_prefix(prefix) {
            let (key, value) = item?;
            entries.insert(key.to_vec(), Some(value.to_vec()));
        }
        let start = (tree, prefix.to_vec());
        for ((_, key), value) in self
            .writes
            .range(start..)
            .take_while(|((name, key), _)| *name == tree && key.starts_with(prefix))
        {
            entries.insert(key.clone(), value.clone());
        }
        Ok(entries
            .into_iter()
            .filter_map(|(key, value)| value.map(|value| (key, value)))
            .collect())
    }

    /// Applies every pending write of the batch in one transaction over the trees they touch.
    pub(crate) fn apply(self) -> Result<(), sled::Error> {
        if self.writes.is_empty() {
            return Ok(());
        }
        let mut names: Vec<TreeName> = self.writes.keys().map(|(name, _)| *name).collect();
        names.dedup();
        let trees: Vec<&sled::Tree> = names.iter().map(|name| self.trees().named(*name)).collect();
        let outcome = trees.as_slice().transaction(|views| {
            for ((name, key), value) in &self.writes {
                let index = names
                    .binary_search(name)
                    .expect("every written tree is in the transaction");
                match value {
                    Some(value) => {
                        views[index].insert(key.as_slice(), value.as_slice())?;
                    }
                    None => {
                        views[index].remove(key.as_slice())?;
                    }
                }
            }
            Ok::<(), ConflictableTransactionError<()>>(())
        });
        match outcome {
            Ok(()) => Ok(()),
            Err(TransactionError::Storage(error)) => Err(error),
            // Nothing here aborts.
            Err(TransactionError::Abort(())) => Err(sled::Error::ReportableBug(
                "a batch transaction aborted without a reason".into(),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::sled::SledStore;

    #[test]
    fn a_unit_rolled_back_leaves_the_units_before_it_in_the_batch() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path()).unwrap();
        let mut tx = Tx::new(&store.inner);
        tx.begin_unit();
        tx.insert(TreeName::Users, b"k1".to_vec(), b"first".to_vec());
        tx.begin_unit();
        tx.insert(TreeName::Users, b"k1".to_vec(), b"second".to_vec());
        tx.insert(TreeName::Conversations, b"k2".to_vec(), b"second".to_vec());
        tx.remove(TreeName::Users, b"k1".to_vec());
        assert_eq!(tx.get(TreeName::Users, b"k1").unwrap(), None);
        tx.rollback_unit();
        assert_eq!(
            tx.get(TreeName::Users, b"k1").unwrap().as_deref(),
            Some(&b"first"[..])
        );
        assert_eq!(tx.get(TreeName::Conversations, b"k2").unwrap(), None);
        tx.begin_unit();
        tx.insert(TreeName::Messages, b"k3".to_vec(), b"third".to_vec());
        tx.apply().unwrap();
        let trees = &store.inner.trees;
        assert_eq!(
            trees.users.get(b"k1").unwrap().as_deref(),
            Some(&b"first"[..])
        );
        assert_eq!(trees.conversations.get(b"k2").unwrap(), None);
        assert_eq!(
            trees.messages.get(b"k3").unwrap().as_deref(),
            Some(&b"third"[..])
        );
    }
}
