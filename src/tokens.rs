//! The token manager: exchanges auth codes, serves access tokens and refreshes token
//! sets. The gRPC service and the scheduler both call it.
//!
//! Invariants:
//! - At most one refresh of a token set runs at a time across every replica, because a
//!   refresh needs the token set's claim in the store (see [`crate::store::TokenStore`]).
//!   A caller that finds the claim taken waits for it to end, re-reads the row and
//!   returns that result without refreshing again.
//! - Within a replica, callers for one token set queue on its lock from `locks`, so that
//!   only the first of them reads the store and claims.
//! - New tokens are committed to the store before they are cached, served or logged,
//!   and the commit is retried while the claim's lease lasts.
//! - Freshness compares the stored UTC expiry with the wall clock.
//! - A cached token is dropped when a refresh of its token set is claimed, here or (via
//!   store events) on another replica, so that callers wait for the new token instead
//!   of receiving one that Tiki is about to revoke.

mod attempt;
mod cache;
mod forced;
mod import;
mod locks;

use std::{
    sync::{Arc, atomic::AtomicI64},
    time::Duration,
};

use chrono::{DateTime, Utc};
use secrecy::SecretString;
use tracing::{debug, error, info, warn};

pub use cache::ServedToken;
use cache::TokenCache;
pub use import::ImportedTokens;
use locks::KeyedLocks;

use tokio::sync::broadcast;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    refresh::{self, RefreshPolicy, chrono_duration},
    store::{
        NewTokens, StoreError, StoreEvent, TokenSet, TokenSetKey, TokenStatus, TokenStore,
        format_time,
    },
    tiki::{FailureClass, TikiError, TokenApi},
};

/// Wait before the first repeated commit; it doubles with each further attempt, up to
/// `MAX_COMMIT_RETRY_DELAY`.
const COMMIT_RETRY_DELAY: Duration = Duration::from_millis(200);
const MAX_COMMIT_RETRY_DELAY: Duration = Duration::from_secs(2);

/// How often a caller waiting for another replica's refresh re-reads the row.
const CLAIM_POLL_INTERVAL: Duration = Duration::from_millis(50);

/// Changes buffered for each watcher; a watcher that falls further behind re-reads its
/// token set.
const CHANGE_BUFFER: usize = 1024;

/// A failed token operation, in terms a caller can act on.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("no token set is stored for user {0}")]
    NotFound(String),
    #[error("the user must consent again: {0}")]
    ReauthRequired(String),
    #[error("user {0} already has a token set")]
    AlreadyExists(String),
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
    /// The token set stopped being due before the refresh began.
    NotDue,
}

/// A change to stored token sets, as announced to watchers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSetChange {
    /// This token set was claimed, written or deleted, here or on another replica.
    One(TokenSetKey),
    /// Any token set may have changed, because store events were missed.
    Any,
}

/// The result of one refresh attempt, with the row as stored afterwards.
enum Attempt {
    Refreshed(TokenSet),
    Failed(TokenSet, TikiError),
}

/// The manager's own settings.
#[derive(Debug, Clone)]
pub struct ManagerSettings {
    /// Maximum number of token sets whose access token is kept in memory.
    pub cache_capacity: u64,
    /// Identifies this replica in claims and writes.
    pub replica_id: String,
    /// How long a claim lasts; longer than a request to Tiki plus the commit.
    pub lease: Duration,
    /// How long a caller with a valid stored token waits for another refresh of it,
    /// at most; one request to Tiki.
    pub claim_wait: Duration,
}

/// Exchanges, serves and refreshes token sets.
#[derive(Debug)]
pub struct TokenManager {
    store: Arc<dyn TokenStore>,
    tiki: Arc<dyn TokenApi>,
    policy: RefreshPolicy,
    cache: TokenCache,
    locks: KeyedLocks,
    replica_id: String,
    lease: chrono::Duration,
    claim_wait: chrono::Duration,
    /// On-demand refreshes, tracked so that shutdown can wait for those whose caller
    /// already left.
    refreshes: TaskTracker,
    /// Unix milliseconds until which no refresh is sent, after Tiki rejected tokend's
    /// credentials.
    credentials_blocked_until: AtomicI64,
    /// Announces every change, for streams that watch token sets.
    changes: broadcast::Sender<TokenSetChange>,
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
    pub fn new(
        store: Arc<dyn TokenStore>,
        tiki: Arc<dyn TokenApi>,
        policy: RefreshPolicy,
        settings: ManagerSettings,
    ) -> Self {
        TokenManager {
            store,
            tiki,
            policy,
            cache: TokenCache::new(settings.cache_capacity),
            locks: KeyedLocks::default(),
            replica_id: settings.replica_id,
            lease: chrono_duration(settings.lease),
            claim_wait: chrono_duration(settings.claim_wait),
            credentials_blocked_until: AtomicI64::new(0),
            refreshes: TaskTracker::new(),
            changes: broadcast::Sender::new(CHANGE_BUFFER),
        }
    }

    /// Drops cached tokens that other replicas changed, until `shutdown` is cancelled.
    /// Backends without change events make this return at once.
    pub async fn follow_store_events(&self, shutdown: CancellationToken) {
        let Some(mut events) = self.store.subscribe(&self.replica_id) else {
            return;
        };
        loop {
            let event = tokio::select! {
                () = shutdown.cancelled() => return,
                event = events.recv() => event,
            };
            match event {
                Some(StoreEvent::Changed { key, version }) => {
                    self.cache.remove_unless_newer(&key, version);
                    self.announce(TokenSetChange::One(key));
                }
                Some(StoreEvent::Resync) => {
                    self.cache.clear();
                    self.announce(TokenSetChange::Any);
                }
                None => return,
            }
        }
    }

    /// Waits up to `grace` for on-demand refreshes in flight, so that tokens Tiki has
    /// already rotated get committed before the process exits.
    pub async fn drain_refreshes(&self, grace: Duration) {
        self.refreshes.close();
        let in_flight = self.refreshes.len();
        if in_flight > 0 {
            info!(
                in_flight,
                ?grace,
                "waiting for on-demand refreshes in flight"
            );
        }
        if tokio::time::timeout(grace, self.refreshes.wait())
            .await
            .is_err()
        {
            warn!(
                abandoned = self.refreshes.len(),
                "on-demand refreshes still in flight after the grace period were abandoned"
            );
        }
    }

    /// Starts receiving every later change to stored token sets.
    pub fn subscribe_changes(&self) -> broadcast::Receiver<TokenSetChange> {
        self.changes.subscribe()
    }

    /// Tells watchers about a change. Having no watchers is not an error.
    fn announce(&self, change: TokenSetChange) {
        let _ = self.changes.send(change);
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
        let response = self.tiki.exchange(auth_code).await;
        crate::telemetry::record_upstream(response.as_ref().err().map(TikiError::class));
        let grant = response.map_err(|error| {
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
        let set = self
            .store
            .store_exchanged(key, &tokens, &self.replica_id, Utc::now())
            .await?;
        self.cache.put(&set);
        self.announce(TokenSetChange::One(key.clone()));
        if set.refresh_token.is_none() {
            warn!(app = %key.app, user_id = %key.user_id, "Tiki issued no refresh token; the user did not grant the offline scope, so the token set expires without refresh");
        }
        info!(app = %key.app, user_id = %key.user_id, expires_at = %format_time(set.expires_at), "token set stored");
        Ok(set)
    }

    /// Returns an access token valid for at least `min_valid_seconds` (see
    /// [`refresh::min_valid`]), refreshing the token set first when needed. While
    /// refreshes fail, a token that is still valid is returned even if it expires sooner.
    pub async fn access_token(
        self: &Arc<Self>,
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
        if !set.is_claimed(Utc::now()) {
            self.cache.put(&set);
        }
        self.serve_or_refresh(set, min_valid_seconds).await
    }

    async fn serve_or_refresh(
        self: &Arc<Self>,
        set: TokenSet,
        min_valid_seconds: u32,
    ) -> Result<ServedToken, TokenError> {
        let now = Utc::now();
        let required = chrono_duration(refresh::min_valid(min_valid_seconds, set.lifetime_seconds));
        if set.status == TokenStatus::ReauthRequired {
            return Err(TokenError::ReauthRequired(reauth_reason(&set)));
        }
        // A refresh in progress is about to make Tiki revoke the stored token, so wait
        // for its result. While the stored token is valid, the wait is bounded by one
        // request to Tiki, so that a dead replica's claim cannot stall callers.
        if set.is_claimed(now) {
            let limit = if set.servable_for(now) > chrono::Duration::zero() {
                self.claim_wait
            } else {
                self.lease
            };
            debug!(app = %set.key.app, user_id = %set.key.user_id, "waiting for a refresh in progress");
            let set = self.wait_for_claim(&set.key, limit).await?;
            return serve_after_wait(&set, required);
        }
        if set.servable_for(now) >= required {
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

        let key = set.key.clone();
        let Some(claimed) = self.store.claim(&key, &self.new_claim(), now).await? else {
            debug!(app = %key.app, user_id = %key.user_id, "waiting for a refresh that started meanwhile");
            let set = self.wait_for_claim(&key, self.lease).await?;
            return serve_after_wait(&set, required);
        };

        if let Some(error) = self.credentials_blocked(Utc::now()) {
            self.record_failure(
                claimed.clone(),
                claimed.claim_token.unwrap_or_default(),
                error,
            )
            .await?;
            return serve_if_valid(&claimed, Utc::now(), || TokenError::CredentialsRejected);
        }
        debug!(app = %key.app, user_id = %key.user_id, "refreshing on demand");
        match self.spawn_refresh(claimed).await? {
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

    /// Waits until no claim is held on `key`, or at most `limit`, then returns the
    /// row.
    async fn wait_for_claim(
        &self,
        key: &TokenSetKey,
        limit: chrono::Duration,
    ) -> Result<TokenSet, TokenError> {
        let deadline = Utc::now() + limit;
        loop {
            tokio::time::sleep(CLAIM_POLL_INTERVAL).await;
            let set = self
                .store
                .get(key)
                .await?
                .ok_or_else(|| TokenError::NotFound(key.user_id.clone()))?;
            let now = Utc::now();
            if !set.is_claimed(now) || now >= deadline {
                self.cache.put(&set);
                return Ok(set);
            }
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

    /// Claims up to `limit` due token sets for this replica, most overdue first.
    pub async fn claim_due(&self, limit: u32) -> Result<Vec<TokenSet>, TokenError> {
        let claimed = self
            .store
            .claim_due(&self.new_claim(), Utc::now(), limit)
            .await?;
        for set in &claimed {
            self.cache.remove(&set.key);
        }
        Ok(claimed)
    }

    /// Refreshes a token set that [`TokenManager::claim_due`] claimed.
    pub async fn refresh_claimed(
        self: &Arc<Self>,
        set: TokenSet,
    ) -> Result<RefreshOutcome, TokenError> {
        if !refresh::is_due(&set, Utc::now()) {
            if let Some(claim_token) = set.claim_token {
                self.store.release(&set.key, claim_token).await?;
            }
            return Ok(RefreshOutcome::NotDue);
        }
        if let Some(error) = self.credentials_blocked(Utc::now()) {
            let claim_token = set.claim_token.unwrap_or_default();
            self.record_failure(set, claim_token, error).await?;
            return Ok(RefreshOutcome::Failed(FailureClass::CredentialsRejected));
        }
        match self.spawn_refresh(set).await? {
            Attempt::Refreshed(_) => Ok(RefreshOutcome::Refreshed),
            Attempt::Failed(_, error) => Ok(RefreshOutcome::Failed(error.class())),
        }
    }

    /// Returns a token set's metadata.
    pub async fn token_set(&self, key: &TokenSetKey) -> Result<TokenSet, TokenError> {
        self.store
            .get(key)
            .await?
            .ok_or_else(|| TokenError::NotFound(key.user_id.clone()))
    }

    /// Returns up to `limit` token sets after `after`, ordered by key, with one of
    /// `statuses`, or with any status when it is empty.
    pub async fn list(
        &self,
        after: Option<&TokenSetKey>,
        statuses: &[TokenStatus],
        limit: u32,
    ) -> Result<Vec<TokenSet>, TokenError> {
        Ok(self.store.list(after, statuses, limit).await?)
    }

    /// Deletes a token set.
    pub async fn delete(&self, key: &TokenSetKey) -> Result<(), TokenError> {
        let _guard = self.locks.lock(key).await;
        let deleted = self.store.delete(key).await?;
        self.cache.remove(key);
        self.announce(TokenSetChange::One(key.clone()));
        if !deleted {
            return Err(TokenError::NotFound(key.user_id.clone()));
        }
        info!(app = %key.app, user_id = %key.user_id, "token set deleted");
        Ok(())
    }
}

fn serve_if_valid(
    set: &TokenSet,
    now: DateTime<Utc>,
    otherwise: impl FnOnce() -> TokenError,
) -> Result<ServedToken, TokenError> {
    if set.servable_for(now) > chrono::Duration::zero() {
        Ok(ServedToken::from_set(set))
    } else {
        Err(otherwise())
    }
}

/// Serves the row another refresh left behind, without refreshing again.
fn serve_after_wait(set: &TokenSet, required: chrono::Duration) -> Result<ServedToken, TokenError> {
    if set.status == TokenStatus::ReauthRequired {
        return Err(TokenError::ReauthRequired(reauth_reason(set)));
    }
    let now = Utc::now();
    if set.servable_for(now) >= required {
        return Ok(ServedToken::from_set(set));
    }
    serve_if_valid(set, now, || {
        TokenError::Unavailable(format!(
            "the refresh in progress did not produce a valid token: {}",
            set.last_error.as_deref().unwrap_or("no detail")
        ))
    })
}

/// Formats an optional time for a log field.
fn optional_time(time: Option<DateTime<Utc>>) -> String {
    time.map_or_else(|| "none".to_owned(), format_time)
}

fn reauth_reason(set: &TokenSet) -> String {
    set.last_error
        .clone()
        .unwrap_or_else(|| "Tiki no longer accepts the user's grant".to_owned())
}
