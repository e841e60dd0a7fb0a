//! One refresh attempt under a claim: the task it runs in, the call to Tiki, and the
//! write of its outcome. A refresh that got new tokens retries only the write, because
//! Tiki has rotated the refresh token by then.

use std::{sync::Arc, sync::atomic::Ordering};

use chrono::{DateTime, Utc};
use tracing::{error, info, warn};

use super::{
    Attempt, COMMIT_RETRY_DELAY, MAX_COMMIT_RETRY_DELAY, TokenError, TokenManager, TokenSetChange,
    optional_time,
};
use crate::{
    refresh::chrono_duration,
    store::{Claim, NewTokens, TokenSet, TokenStatus, format_time},
    telemetry,
    tiki::{FailureClass, Grant, TikiError},
};

impl TokenManager {
    /// Runs [`TokenManager::attempt_refresh`] in its own task, so that a caller that gives
    /// up (a gRPC deadline, say) cannot stop a refresh between Tiki's rotation of the
    /// refresh token and the commit of the new one.
    pub(super) async fn spawn_refresh(
        self: &Arc<Self>,
        set: TokenSet,
    ) -> Result<Attempt, TokenError> {
        let manager = Arc::clone(self);
        let key = set.key.clone();
        self.refreshes
            .spawn(async move { manager.attempt_refresh(set).await })
            .await
            .unwrap_or_else(|error| {
                error!(app = %key.app, user_id = %key.user_id, %error, "a refresh task failed");
                Err(TokenError::Unavailable(
                    "the refresh failed unexpectedly".to_owned(),
                ))
            })
    }

    /// Returns the error to record instead of calling Tiki while Tiki's last response
    /// rejected tokend's credentials, so that callers cannot flood Tiki with requests
    /// it will reject.
    pub(super) fn credentials_blocked(&self, now: DateTime<Utc>) -> Option<TikiError> {
        let until = self.credentials_blocked_until.load(Ordering::Relaxed);
        (now.timestamp_millis() < until).then(|| {
            TikiError::CredentialsRejected(
                "an earlier request was rejected; no request is sent until the retry time"
                    .to_owned(),
            )
        })
    }

    /// Refreshes `set` once under the claim it carries and stores the outcome.
    pub(super) async fn attempt_refresh(&self, set: TokenSet) -> Result<Attempt, TokenError> {
        let Some(claim_token) = set.claim_token else {
            return Err(TokenError::Unavailable(
                "the token set was not claimed for a refresh".to_owned(),
            ));
        };
        let Some(refresh_token) = set.refresh_token.clone() else {
            self.store.release(&set.key, claim_token).await?;
            return Err(TokenError::ReauthRequired(
                "no refresh token is stored".to_owned(),
            ));
        };
        self.cache.remove(&set.key);
        let started = std::time::Instant::now();
        let sent_at = Utc::now();
        let response = self.tiki.refresh(&refresh_token).await;
        telemetry::record_upstream(response.as_ref().err().map(TikiError::class));
        let attempt = match response {
            Ok(grant) => self.commit_refresh(&set, claim_token, grant, sent_at).await,
            Err(error) => {
                // Only a rejection Tiki returned starts the pause; failures recorded
                // during the pause must not extend it.
                if error.class() == FailureClass::CredentialsRejected {
                    let until = Utc::now() + chrono_duration(self.policy.credentials_retry);
                    self.credentials_blocked_until
                        .fetch_max(until.timestamp_millis(), Ordering::Relaxed);
                }
                self.record_failure(set, claim_token, error).await
            }
        };
        let outcome = match &attempt {
            Ok(Attempt::Refreshed(_)) => "refreshed",
            Ok(Attempt::Failed(_, error)) => telemetry::failure_label(error.class()),
            Err(_) => "store_error",
        };
        telemetry::record_refresh(outcome, started.elapsed());
        attempt
    }

    pub(super) fn new_claim(&self) -> Claim {
        Claim {
            owner: self.replica_id.clone(),
            token: rand::random::<i64>(),
            until: Utc::now() + self.lease,
        }
    }

    async fn commit_refresh(
        &self,
        set: &TokenSet,
        claim_token: i64,
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

        // Tiki has rotated the refresh token, so these tokens exist nowhere else: keep
        // retrying the write, never the refresh, until it lands or the claim is lost.
        let mut delay = COMMIT_RETRY_DELAY;
        let mut attempt: u64 = 1;
        let stored = loop {
            let written = self
                .store
                .store_refreshed(key, claim_token, &tokens, &self.replica_id, Utc::now())
                .await;
            match written {
                Ok(stored) => break stored,
                Err(error) => {
                    if attempt <= 3 || attempt.is_multiple_of(10) {
                        warn!(app = %key.app, user_id = %key.user_id, %error, attempt, "storing refreshed tokens failed; retrying the write");
                    }
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(MAX_COMMIT_RETRY_DELAY);
                    attempt += 1;
                }
            }
        };
        let Some(stored) = stored else {
            error!(app = %key.app, user_id = %key.user_id, "the claim ended before the refreshed tokens were stored, because the token set was replaced, deleted or claimed after the lease ran out; the new tokens were discarded");
            return Err(TokenError::Unavailable(
                "the token set changed while it was being refreshed; retry the call".to_owned(),
            ));
        };

        self.cache.put(&stored);
        self.announce(TokenSetChange::One(key.clone()));
        info!(app = %key.app, user_id = %key.user_id, expires_at = %format_time(stored.expires_at), next_refresh_at = %optional_time(stored.next_refresh_at), "token set refreshed");
        Ok(Attempt::Refreshed(stored))
    }

    pub(super) async fn record_failure(
        &self,
        set: TokenSet,
        claim_token: i64,
        error: TikiError,
    ) -> Result<Attempt, TokenError> {
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
                warn!(app = %key.app, user_id = %key.user_id, %error, failure_count = record.failure_count, next_refresh_at = %optional_time(record.next_refresh_at), "refresh failed; will retry");
            }
        }

        let Some(stored) = self
            .store
            .store_failure(key, claim_token, &record, &self.replica_id, now)
            .await?
        else {
            warn!(app = %key.app, user_id = %key.user_id, "the claim ended before the failed refresh was recorded");
            return Err(TokenError::Unavailable(error.to_string()));
        };
        self.cache.put(&stored);
        self.announce(TokenSetChange::One(key.clone()));
        Ok(Attempt::Failed(stored, error))
    }
}
