//! Refreshes that a caller requests, for example after Tiki rejected an access token.
//! They join any refresh of the same token set already in progress, on this replica or
//! another, instead of starting a second one.

use std::sync::Arc;

use chrono::Utc;
use tracing::debug;

use super::{Attempt, ServedToken, TokenError, TokenManager, reauth_reason};
use crate::{
    store::{TokenSet, TokenSetKey, TokenStatus},
    tiki::FailureClass,
};

impl TokenManager {
    /// Refreshes `key`'s token set now and returns the new access token. A call that
    /// arrives while another refresh of it runs returns that refresh's result instead.
    /// Backoff after failed refreshes and a credentials pause are honoured.
    pub async fn refresh_now(
        self: &Arc<Self>,
        key: &TokenSetKey,
    ) -> Result<ServedToken, TokenError> {
        // The row as it was when the call arrived. A later version of it was written by
        // a refresh, exchange or import that this call joins.
        let arrived = self.read(key).await?;
        if arrived.is_claimed(Utc::now()) {
            debug!(app = %key.app, user_id = %key.user_id, "joining a refresh in progress");
            let set = self.wait_for_claim(key, self.lease).await?;
            // A claim released without a write (the scheduler found the token set no
            // longer due) produced no result to join, so this call refreshes itself.
            if set.version != arrived.version || set.is_claimed(Utc::now()) {
                return refresh_result(&set);
            }
        }

        let _guard = self.locks.lock(key).await;
        let set = self.read(key).await?;
        if set.version != arrived.version {
            debug!(app = %key.app, user_id = %key.user_id, "a refresh finished while the call waited");
            return refresh_result(&set);
        }
        check_refreshable(&set)?;

        let now = Utc::now();
        let Some(claimed) = self.store.claim(key, &self.new_claim(), now).await? else {
            debug!(app = %key.app, user_id = %key.user_id, "joining a refresh that started meanwhile");
            let set = self.wait_for_claim(key, self.lease).await?;
            return refresh_result(&set);
        };
        if let Some(error) = self.credentials_blocked(Utc::now()) {
            let claim_token = claimed.claim_token.unwrap_or_default();
            self.record_failure(claimed, claim_token, error).await?;
            return Err(TokenError::CredentialsRejected);
        }

        debug!(app = %key.app, user_id = %key.user_id, "refreshing at the caller's request");
        match self.spawn_refresh(claimed).await? {
            Attempt::Refreshed(set) => Ok(ServedToken::from_set(&set)),
            Attempt::Failed(_, error) if error.class() == FailureClass::CredentialsRejected => {
                Err(TokenError::CredentialsRejected)
            }
            Attempt::Failed(set, _) => refresh_result(&set),
        }
    }

    async fn read(&self, key: &TokenSetKey) -> Result<TokenSet, TokenError> {
        self.store
            .get(key)
            .await?
            .ok_or_else(|| TokenError::NotFound(key.user_id.clone()))
    }
}

/// Rejects a refresh that cannot succeed or that would ignore the backoff after failed
/// refreshes, so that a caller retrying in a loop cannot flood Tiki.
fn check_refreshable(set: &TokenSet) -> Result<(), TokenError> {
    if set.status == TokenStatus::ReauthRequired {
        return Err(TokenError::ReauthRequired(reauth_reason(set)));
    }
    if set.refresh_token.is_none() {
        return Err(TokenError::ReauthRequired(
            "the user granted no offline scope, so there is no refresh token".to_owned(),
        ));
    }
    let now = Utc::now();
    match set.next_refresh_at {
        Some(next) if set.status == TokenStatus::RefreshFailing && next > now => {
            Err(TokenError::Unavailable(format!(
                "refreshes are failing ({}); the next attempt is at {}",
                set.last_error.as_deref().unwrap_or("no detail"),
                next.to_rfc3339()
            )))
        }
        _ => Ok(()),
    }
}

/// Returns the outcome of the refresh that last wrote `set`: its access token after a
/// success, and the error it recorded after a failure.
fn refresh_result(set: &TokenSet) -> Result<ServedToken, TokenError> {
    let now = Utc::now();
    if set.is_claimed(now) {
        return Err(TokenError::Unavailable(
            "the refresh in progress did not finish within its lease; retry the call".to_owned(),
        ));
    }
    match set.status {
        TokenStatus::ReauthRequired => Err(TokenError::ReauthRequired(reauth_reason(set))),
        TokenStatus::RefreshFailing => Err(TokenError::Unavailable(format!(
            "the refresh failed: {}",
            set.last_error.as_deref().unwrap_or("no detail")
        ))),
        TokenStatus::Active if set.servable_for(now) > chrono::Duration::zero() => {
            Ok(ServedToken::from_set(set))
        }
        TokenStatus::Active => Err(TokenError::Unavailable(
            "no valid access token is stored after the refresh; retry the call".to_owned(),
        )),
    }
}
