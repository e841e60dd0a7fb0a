//! A bounded in-memory cache of servable access tokens, so that a fresh enough token is
//! served without a database round trip. Entries are written only after the store
//! committed them, and an entry never replaces one with a higher row version, so the
//! cache never serves a token older than the store's last write from this process.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use moka::{ops::compute::Op, sync::Cache};
use secrecy::SecretString;

use crate::store::{TokenSet, TokenSetKey, TokenStatus};

/// An access token ready to serve.
#[derive(Debug, Clone)]
pub struct ServedToken {
    pub access_token: SecretString,
    pub expires_at: DateTime<Utc>,
    pub scopes: Arc<[String]>,
    /// Seconds of validity Tiki granted this token.
    pub lifetime_seconds: u64,
    /// The row version this token was read from.
    pub version: i64,
}

impl ServedToken {
    pub fn from_set(set: &TokenSet) -> Self {
        ServedToken {
            access_token: set.access_token.clone(),
            expires_at: set.expires_at,
            scopes: set.scopes.clone().into(),
            lifetime_seconds: set.lifetime_seconds,
            version: set.version,
        }
    }

    /// Time left before expiry, as of `now`; negative once expired.
    pub fn remaining(&self, now: DateTime<Utc>) -> chrono::Duration {
        self.expires_at - now
    }
}

/// The cache, keyed by token set.
#[derive(Debug, Clone)]
pub struct TokenCache {
    entries: Cache<TokenSetKey, ServedToken>,
}

impl TokenCache {
    /// Builds a cache that keeps at most `capacity` token sets.
    pub fn new(capacity: u64) -> Self {
        TokenCache {
            entries: Cache::new(capacity),
        }
    }

    pub fn get(&self, key: &TokenSetKey) -> Option<ServedToken> {
        self.entries.get(key)
    }

    /// Caches the token of a row just read or written, unless the cache already holds a
    /// newer version. A row whose user must consent again, or whose last refresh has an
    /// unknown outcome, is removed instead.
    pub fn put(&self, set: &TokenSet) {
        if set.status == TokenStatus::ReauthRequired || set.outcome_unknown {
            self.remove(&set.key);
            return;
        }
        let token = ServedToken::from_set(set);
        self.entries
            .entry(set.key.clone())
            .and_compute_with(|existing| match existing {
                Some(entry) if entry.value().version >= token.version => Op::Nop,
                _ => Op::Put(token),
            });
    }

    /// Number of cached token sets, after applying pending evictions.
    pub fn len(&self) -> u64 {
        self.entries.run_pending_tasks();
        self.entries.entry_count()
    }

    /// Removes the entry of `key` unless it is newer than `version`.
    pub fn remove_unless_newer(&self, key: &TokenSetKey, version: i64) {
        self.entries
            .entry(key.clone())
            .and_compute_with(|existing| match existing {
                Some(entry) if entry.value().version > version => Op::Nop,
                Some(_) => Op::Remove,
                None => Op::Nop,
            });
    }

    pub fn clear(&self) {
        self.entries.invalidate_all();
    }

    pub fn remove(&self, key: &TokenSetKey) {
        self.entries.invalidate(key);
    }
}
