//! The token manager: exchanges auth codes, serves access tokens and refreshes token
//! sets. The gRPC service and the scheduler both call it.
//!
//! Invariants:
//! - At most one exchange, refresh or delete of a token set runs at a time in this
//!   process, because each holds that token set's lock from `locks`. A caller that
//!   waited for the lock re-reads the row before deciding anything.
//! - New tokens are committed to the store before they are cached, served or logged.
//! - Freshness compares the stored UTC expiry with the wall clock.
//! - A cached token is dropped when a refresh of its token set starts, so that callers
//!   wait for the new token instead of receiving one that Tiki is about to revoke.

mod cache;
mod locks;

use std::{sync::Arc, time::Duration};

use chrono::{DateTime, Utc};
use secrecy::SecretString;
use tracing::{debug, error, info, warn};

pub use cache::ServedToken;
use cache::TokenCache;
use locks::KeyedLocks;

use crate::{
    refresh::{self, RefreshPolicy, chrono_duration},
    store::{NewTokens, StoreError, TokenSet, TokenSetKey, TokenStatus, TokenStore},
    tiki::{FailureClass, Grant, TikiError, TokenApi},
};

/// Attempts to commit refreshed tokens before giving up. Tiki has already rotated the
/// refresh token by then, so a lost write loses the user's grant.
const COMMIT_ATTEMPTS: u32 = 5;

/// Wait before the first repeated commit; it doubles with each further attempt.
const COMMIT_RETRY_DELAY: Duration = Duration::from_millis(200);

/// A failed token operation, in terms a caller can act on.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("no token set is stored for user {0}")]
    NotFound(String),
    #[error("the user must consent again: {0}")]
    ReauthRequired(String),
    #[error("Tiki rejected the auth code: {0}")]
    CodeRejected(String),
    #[error("Tiki is unavailable and no valid access token is stored: {0}")]
    Unavailable(String),
    #[error(
        "Tiki rejected tokend's client credentials; an operator must fix client_id and client_secret"
    )]
    CredentialsRejected,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The result of a scheduled refresh.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefreshOutcome {
    Refreshed,
    Failed(FailureClass),
    /// Another caller holds the token set's lock, so it is already being refreshed.
    InFlight,
    /// The token set was refreshed, deleted or stopped being due meanwhile.
    NotDue,
}

/// The result of one refresh attempt, with the row as stored afterwards.
enum Attempt {
    Refreshed(TokenSet),
    Failed(TokenSet, TikiError),
}

/// Exchanges, serves and refreshes token sets.
#[derive(Debug)]
pub struct TokenManager {
    store: Arc<dyn TokenStore>,
    tiki: Arc<dyn TokenApi>,
    policy: RefreshPolicy,
    cache: TokenCache,
    locks: KeyedLocks,
}

impl std::fmt::Debug for dyn TokenStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenStore")
    }
}

impl std::fmt::Debug for dyn TokenApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenApi")
    }
}

impl TokenManager {
    /// Builds a manager whose cache keeps at most `cache_capacity` token sets.
    pub fn new(
        store: Arc<dyn TokenStore>,
        tiki: Arc<dyn TokenApi>,
        policy: RefreshPolicy,
        cache_capacity: u64,
    ) -> Self {
        TokenManager {
            store,
            tiki,
            policy,
            cache: TokenCache::new(cache_capacity),
            locks: KeyedLocks::default(),
        }
    }

    /// Number of token sets whose access token is cached.
    pub fn cached_token_sets(&self) -> u64 {
        self.cache.len()
    }

    /// Exchanges an auth code and stores the token set, replacing the user's old one.
    pub async fn exchange(
        &self,
        key: &TokenSetKey,
        auth_code: &SecretString,
    ) -> Result<TokenSet, TokenError> {
        let _guard = self.locks.lock(key).await;
        let sent_at = Utc::now();
        let grant = self.tiki.exchange(auth_code).await.map_err(|error| {
            warn!(app = %key.app, user_id = %key.user_id, %error, "auth code exchange failed");
            match error.class() {
                FailureClass::GrantRejected => TokenError::CodeRejected(error.to_string()),
                FailureClass::CredentialsRejected => {
                    error!(%error, "Tiki rejected tokend's client credentials; fix client_id and client_secret");
                    TokenError::CredentialsRejected
                }
                FailureClass::Transient | FailureClass::OutcomeUnknown => {
                    TokenError::Unavailable(error.to_string())
                }
            }
        })?;

        let (expires_at, next_refresh_at) =
            self.policy
                .schedule(sent_at, grant.expires_in, rand::random::<f64>());
        let tokens = NewTokens {
            access_token: &grant.access_token,
            refresh_token: grant.refresh_token.as_ref(),
            scopes: &grant.scopes,
            lifetime_seconds: grant.expires_in,
            expires_at,
            next_refresh_at: grant.refresh_token.as_ref().map(|_| next_refresh_at),
        };
        let set = self.store.store_exchanged(key, &tokens, Utc::now()).await?;
        self.cache.put(&set);
        if set.refresh_token.is_none() {
            warn!(app = %key.app, user_id = %key.user_id, "Tiki issued no refresh token; the user did not grant the offline scope, so the token set expires without refresh");
        }
        info!(app = %key.app, user_id = %key.user_id, expires_at = %set.expires_at, "token set stored");
        Ok(set)
    }

    /// Returns an access token valid for at least `min_valid_seconds` (see
    /// [`refresh::min_valid`]), refreshing the token set first when needed. While
    /// refreshes fail, a token that is still valid is returned even if it expires sooner.
    pub async fn access_token(
        &self,
        key: &TokenSetKey,
        min_valid_seconds: u32,
    ) -> Result<ServedToken, TokenError> {
        if let Some(cached) = self.cache.get(key) {
            let required = refresh::min_valid(min_valid_seconds, cached.lifetime_seconds);
            if cached.remaining(Utc::now()) >= chrono_duration(required) {
                return Ok(cached);
            }
        }

        let _guard = self.locks.lock(key).await;
        let set = match self.store.get(key).await {
            Ok(Some(set)) => set,
            Ok(None) => return Err(TokenError::NotFound(key.user_id.clone())),
            Err(error) => return self.serve_cached_after(key, error),
        };
        self.cache.put(&set);
        self.serve_or_refresh(set, min_valid_seconds).await
    }

    async fn serve_or_refresh(
        &self,
        set: TokenSet,
        min_valid_seconds: u32,
    ) -> Result<ServedToken, TokenError> {
        let now = Utc::now();
        let required = chrono_duration(refresh::min_valid(min_valid_seconds, set.lifetime_seconds));
        if set.status == TokenStatus::ReauthRequired {
            return Err(TokenError::ReauthRequired(reauth_reason(&set)));
        }
        if set.remaining(now) >= required {
            return Ok(ServedToken::from_set(&set));
        }
        if set.refresh_token.is_none() {
            return serve_if_valid(&set, now, || {
                TokenError::ReauthRequired(
                    "the access token expired and the user granted no offline scope, so there is \
                     no refresh token"
                        .to_owned(),
                )
            });
        }
        // Honour the backoff of a failing token set instead of letting callers hammer Tiki.
        if set.status == TokenStatus::RefreshFailing
            && set.next_refresh_at.is_some_and(|next| next > now)
        {
            return serve_if_valid(&set, now, || {
                TokenError::Unavailable(format!(
                    "refreshes are failing ({}); the next attempt is at {}",
                    set.last_error.as_deref().unwrap_or("no detail"),
                    set.next_refresh_at
                        .map(|at| at.to_rfc3339())
                        .unwrap_or_default()
                ))
            });
        }

        debug!(app = %set.key.app, user_id = %set.key.user_id, "refreshing on demand");
        match self.attempt_refresh(set).await? {
            Attempt::Refreshed(set) => Ok(ServedToken::from_set(&set)),
            Attempt::Failed(set, _) if set.status == TokenStatus::ReauthRequired => {
                Err(TokenError::ReauthRequired(reauth_reason(&set)))
            }
            Attempt::Failed(set, error) => serve_if_valid(&set, Utc::now(), || {
                if error.class() == FailureClass::CredentialsRejected {
                    TokenError::CredentialsRejected
                } else {
                    TokenError::Unavailable(error.to_string())
                }
            }),
        }
    }

    /// Serves a still-valid cached token when the store cannot be read.
    fn serve_cached_after(
        &self,
        key: &TokenSetKey,
        error: StoreError,
    ) -> Result<ServedToken, TokenError> {
        match self.cache.get(key) {
            Some(cached) if cached.remaining(Utc::now()) > chrono::Duration::zero() => {
                warn!(app = %key.app, user_id = %key.user_id, %error, "reading the store failed; serving the cached token");
                Ok(cached)
            }
            _ => {
                error!(app = %key.app, user_id = %key.user_id, %error, "reading the store failed");
                Err(TokenError::Store(error))
            }
        }
    }

    /// Refreshes a token set the scheduler found due, unless another caller is already
    /// refreshing it or it stopped being due.
    pub async fn refresh_scheduled(&self, key: &TokenSetKey) -> Result<RefreshOutcome, TokenError> {
        let Some(_guard) = self.locks.try_lock(key) else {
            return Ok(RefreshOutcome::InFlight);
        };
        let Some(set) = self.store.get(key).await? else {
            return Ok(RefreshOutcome::NotDue);
        };
        if !refresh::is_due(&set, Utc::now()) {
            return Ok(RefreshOutcome::NotDue);
        }
        match self.attempt_refresh(set).await? {
            Attempt::Refreshed(_) => Ok(RefreshOutcome::Refreshed),
            Attempt::Failed(_, error) => Ok(RefreshOutcome::Failed(error.class())),
        }
    }

    /// Lists token sets due for a scheduled refresh, most overdue first.
    pub async fn due(&self, limit: u32) -> Result<Vec<TokenSetKey>, TokenError> {
        Ok(self.store.due(Utc::now(), limit).await?)
    }

    /// Returns a token set's metadata.
    pub async fn token_set(&self, key: &TokenSetKey) -> Result<TokenSet, TokenError> {
        self.store
            .get(key)
            .await?
            .ok_or_else(|| TokenError::NotFound(key.user_id.clone()))
    }

    /// Deletes a token set.
    pub async fn delete(&self, key: &TokenSetKey) -> Result<(), TokenError> {
        let _guard = self.locks.lock(key).await;
        let deleted = self.store.delete(key).await?;
        self.cache.remove(key);
        if !deleted {
            return Err(TokenError::NotFound(key.user_id.clone()));
        }
        info!(app = %key.app, user_id = %key.user_id, "token set deleted");
        Ok(())
    }

    /// Refreshes `set` once and stores the outcome. The caller holds the token set's lock.
    async fn attempt_refresh(&self, set: TokenSet) -> Result<Attempt, TokenError> {
        let Some(refresh_token) = set.refresh_token.clone() else {
            return Err(TokenError::ReauthRequired(
                "no refresh token is stored".to_owned(),
            ));
        };
        self.cache.remove(&set.key);
        let sent_at = Utc::now();
        match self.tiki.refresh(&refresh_token).await {
            Ok(grant) => self.commit_refresh(&set, grant, sent_at).await,
            Err(error) => self.record_failure(set, error).await,
        }
    }

    async fn commit_refresh(
        &self,
        set: &TokenSet,
        grant: Grant,
        sent_at: DateTime<Utc>,
    ) -> Result<Attempt, TokenError> {
        let key = &set.key;
        let (expires_at, next_refresh_at) =
            self.policy
                .schedule(sent_at, grant.expires_in, rand::random::<f64>());
        let tokens = NewTokens {
            access_token: &grant.access_token,
            refresh_token: grant.refresh_token.as_ref(),
            scopes: &grant.scopes,
            lifetime_seconds: grant.expires_in,
            expires_at,
            next_refresh_at: Some(next_refresh_at),
        };

        let mut delay = COMMIT_RETRY_DELAY;
        let mut attempt = 1;
        let stored = loop {
            match self
                .store
                .store_refreshed(key, set.version, &tokens, Utc::now())
                .await
            {
                Ok(stored) => break stored,
                Err(error) if attempt < COMMIT_ATTEMPTS => {
                    warn!(app = %key.app, user_id = %key.user_id, %error, attempt, "storing refreshed tokens failed; retrying the write");
                    tokio::time::sleep(delay).await;
                    delay *= 2;
                    attempt += 1;
                }
                Err(error) => {
                    // NOTE: the new tokens are lost here, and Tiki has rotated the refresh
                    // token, so the user will have to consent again.
                    error!(app = %key.app, user_id = %key.user_id, %error, "storing refreshed tokens failed; the new tokens are lost");
                    return Err(error.into());
                }
            }
        };
        let Some(stored) = stored else {
            error!(app = %key.app, user_id = %key.user_id, "token set changed while it was being refreshed; the new tokens were discarded");
            return Err(TokenError::NotFound(key.user_id.clone()));
        };

        self.cache.put(&stored);
        info!(app = %key.app, user_id = %key.user_id, expires_at = %stored.expires_at, next_refresh_at = ?stored.next_refresh_at, "token set refreshed");
        Ok(Attempt::Refreshed(stored))
    }

    async fn record_failure(&self, set: TokenSet, error: TikiError) -> Result<Attempt, TokenError> {
        let key = &set.key;
        let now = Utc::now();
        let record = self
            .policy
            .after_failure(&set, &error, now, rand::random::<f64>());
        match (error.class(), record.status) {
            (FailureClass::CredentialsRejected, _) => {
                error!(app = %key.app, user_id = %key.user_id, %error, "Tiki rejected tokend's client credentials; fix client_id and client_secret");
            }
            (_, TokenStatus::ReauthRequired) => {
                warn!(app = %key.app, user_id = %key.user_id, %error, "refresh failed; the user must consent again");
            }
            _ => {
                warn!(app = %key.app, user_id = %key.user_id, %error, failure_count = record.failure_count, next_refresh_at = ?record.next_refresh_at, "refresh failed; will retry");
            }
        }

        let stored = self
            .store
            .store_failure(key, set.version, &record, now)
            .await?
            .ok_or_else(|| TokenError::NotFound(key.user_id.clone()))?;
        self.cache.put(&stored);
        Ok(Attempt::Failed(stored, error))
    }
}

fn serve_if_valid(
    set: &TokenSet,
    now: DateTime<Utc>,
    otherwise: impl FnOnce() -> TokenError,
) -> Result<ServedToken, TokenError> {
    if set.remaining(now) > chrono::Duration::zero() {
        Ok(ServedToken::from_set(set))
    } else {
        Err(otherwise())
    }
}

fn reauth_reason(set: &TokenSet) -> String {
    set.last_error
        .clone()
        .unwrap_or_else(|| "Tiki no longer accepts the user's grant".to_owned())
}
