//! Per-token-set locks that queue one replica's callers for a token set, so that only
//! the first of them reads the store and claims a refresh. Callers that find the lock
//! taken wait for it and then re-read the row, so they see the result of the refresh
//! they waited on.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use tokio::sync::{Mutex as AsyncMutex, OwnedMutexGuard};

use crate::store::TokenSetKey;

type Lock = Arc<AsyncMutex<()>>;

/// A lock per token set, created on first use and dropped when no caller has or awaits
/// it.
#[derive(Debug, Default, Clone)]
pub struct KeyedLocks {
    locks: Arc<Mutex<HashMap<TokenSetKey, Lock>>>,
}

/// Holds one token set's lock until dropped.
#[derive(Debug)]
pub struct KeyGuard {
    guard: Option<OwnedMutexGuard<()>>,
    key: TokenSetKey,
    locks: KeyedLocks,
}

impl KeyedLocks {
    /// Waits for the lock of `key`.
    pub async fn lock(&self, key: &TokenSetKey) -> KeyGuard {
        let lock = self.entry(key);
        let guard = lock.lock_owned().await;
        self.guard(key, guard)
    }

    /// Takes the lock of `key` if it is free.
    #[cfg(test)]
    fn try_lock(&self, key: &TokenSetKey) -> Option<KeyGuard> {
        let lock = self.entry(key);
        match lock.try_lock_owned() {
            Ok(guard) => Some(self.guard(key, guard)),
            Err(_) => {
                self.release(key);
                None
            }
        }
    }

    /// Number of token sets with a lock held or awaited.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.map().len()
    }

    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn entry(&self, key: &TokenSetKey) -> Lock {
        self.map().entry(key.clone()).or_default().clone()
    }

    fn guard(&self, key: &TokenSetKey, guard: OwnedMutexGuard<()>) -> KeyGuard {
        KeyGuard {
            guard: Some(guard),
            key: key.clone(),
            locks: self.clone(),
        }
    }

    /// Drops the map's entry for `key` when only the map still refers to it.
    fn release(&self, key: &TokenSetKey) {
        let mut map = self.map();
        if map
            .get(key)
            .is_some_and(|lock| Arc::strong_count(lock) == 1)
        {
            map.remove(key);
        }
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<TokenSetKey, Lock>> {
        // The map stays consistent even if a holder panicked, so poisoning is ignored.
        self.locks
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Drop for KeyGuard {
    fn drop(&mut self) {
        drop(self.guard.take());
        self.locks.release(&self.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn second_holder_waits() {
        let locks = KeyedLocks::default();
        let key = TokenSetKey::new("alice");
        let first = locks.lock(&key).await;
        assert!(locks.try_lock(&key).is_none());
        assert!(locks.try_lock(&TokenSetKey::new("bob")).is_some());
        drop(first);
        assert!(locks.try_lock(&key).is_some());
    }

    #[tokio::test]
    async fn entries_are_removed_after_use() {
        let locks = KeyedLocks::default();
        let key = TokenSetKey::new("alice");
        let guard = locks.lock(&key).await;
        assert_eq!(locks.len(), 1);
        let waiter = {
            let locks = locks.clone();
            let key = key.clone();
            tokio::spawn(async move { drop(locks.lock(&key).await) })
        };
        tokio::task::yield_now().await;
        drop(guard);
        waiter.await.unwrap();
        assert!(locks.is_empty());
    }
}
