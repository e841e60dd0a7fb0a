//! One refresh attempt under a claim: the task it runs in, the call to Tiki, and the
//! write of its outcome. A refresh that got new tokens retries only the write, because
//! Tiki has rotated the refresh token by then.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use tracing::{debug, error, info, warn};

use super::{
    Attempt, COMMIT_RETRY_DELAY, MAX_COMMIT_RETRY_DELAY, TokenError, TokenManager, TokenSetChange,
    optional_time, upstream::Call,
};
use crate::{
    failpoint,
    refresh::chrono_duration,
    store::{Claim, NewTokens, TokenSet, TokenStatus, format_time},
    telemetry,
    tiki::{FailureClass, Grant, TikiError},
};

/// Time kept on a claim after the request to Tiki for the commit that follows it.
const COMMIT_MARGIN: std::time::Duration = std::time::Duration::from_secs(5);

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
        let wait_limit = self.send_wait_limit(&set);
        let sent_at = Utc::now();
        let attempt = match self
            .send_to_tiki(Call::Refresh, &refresh_token, wait_limit)
            .await
        {
            Ok(grant) => {
                failpoint::block_if_set(failpoint::REFRESH_BEFORE_COMMIT).await;
                self.commit_refresh(&set, claim_token, grant, sent_at).await
            }
            Err(error @ TikiError::NotSent(_)) => {
                // Nothing reached Tiki, so the token set stays as it was, and due.
                debug!(app = %set.key.app, user_id = %set.key.user_id, %error, "refresh not sent");
                self.store.release(&set.key, claim_token).await?;
                return Ok(Attempt::Failed(set, error));
            }
            Err(error) => self.record_failure(set, claim_token, error).await,
        };
        let outcome = match &attempt {
            Ok(Attempt::Refreshed(_)) => "refreshed",
            Ok(Attempt::Failed(_, error)) => telemetry::failure_label(error.class()),
            Err(_) => "store_error",
        };
        telemetry::record_refresh(outcome, started.elapsed());
        attempt
    }

    /// Returns how long a refresh may wait under the request caps, so that the claim
    /// still outlasts the request to Tiki and the commit after it.
    fn send_wait_limit(&self, set: &TokenSet) -> std::time::Duration {
        let Some(claim_until) = set.claim_until else {
            return std::time::Duration::ZERO;
        };
        let send_by = claim_until - self.claim_wait - chrono_duration(COMMIT_MARGIN);
        (send_by - Utc::now()).to_std().unwrap_or_default()
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
        // A refresh that does not rotate the refresh token keeps the one presented.
        let tokens = NewTokens {
            access_token: &grant.access_token,
            refresh_token: grant.refresh_token.as_ref().or(set.refresh_token.as_ref()),
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
            // The credentials alarm has logged this once for every token set.
            (FailureClass::CredentialsRejected, _) => {
                debug!(app = %key.app, user_id = %key.user_id, %error, "refresh not done; Tiki rejects tokend's client credentials");
            }
            (_, TokenStatus::ReauthRequired) if set.outcome_unknown => {
                error!(app = %key.app, user_id = %key.user_id, %error, "refresh failed after an earlier attempt got no readable response; the user must consent again");
            }
            (_, TokenStatus::ReauthRequired) => {
                warn!(app = %key.app, user_id = %key.user_id, %error, "refresh failed; the user must consent again");
            }
            (_, _) if record.next_refresh_at.is_none() => {
                error!(app = %key.app, user_id = %key.user_id, %error, failure_count = record.failure_count, "refresh failed again with errors tokend does not recognise; scheduled refreshes of this token set stop");
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
