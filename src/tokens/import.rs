//! Token sets that another system obtained from Tiki and hands over to tokend.

use chrono::Utc;
use secrecy::SecretString;
use tracing::info;

use super::{TokenError, TokenManager, TokenSetChange};
use crate::store::{NewTokens, TokenSet, TokenSetKey, format_time};

/// Lifetime recorded for an imported access token with less time left than this, in
/// seconds. The lifetime caps how long a served token must stay valid, and a lifetime
/// near zero would let an expired token count as fresh enough.
const MIN_IMPORTED_LIFETIME_SECONDS: u64 = 120;

/// A token set obtained elsewhere, already validated.
#[derive(Debug)]
pub struct ImportedTokens {
    pub access_token: SecretString,
    /// Missing when the user granted no offline scope.
    pub refresh_token: Option<SecretString>,
    pub scopes: Vec<String>,
    /// Seconds until the access token expires; zero when it already expired.
    pub expires_in: u64,
}

impl TokenManager {
    /// Stores an imported token set and schedules its refresh as after an exchange. An
    /// existing token set of the user is replaced only when `replace` is true, and
    /// otherwise the call fails with [`TokenError::AlreadyExists`].
    pub async fn import(
        &self,
        key: &TokenSetKey,
        imported: &ImportedTokens,
        replace: bool,
    ) -> Result<TokenSet, TokenError> {
        let _guard = self.locks.lock(key).await;
        let now = Utc::now();
        let (expires_at, next_refresh_at) =
            self.policy
                .schedule(now, imported.expires_in, rand::random::<f64>());
        let tokens = NewTokens {
            access_token: &imported.access_token,
            refresh_token: imported.refresh_token.as_ref(),
            scopes: &imported.scopes,
            lifetime_seconds: imported.expires_in.max(MIN_IMPORTED_LIFETIME_SECONDS),
            expires_at,
            next_refresh_at: imported.refresh_token.as_ref().map(|_| next_refresh_at),
        };

        let set = if replace {
            self.store
                .store_exchanged(key, &tokens, &self.replica_id, now)
                .await?
        } else {
            self.store
                .store_new(key, &tokens, &self.replica_id, now)
                .await?
                .ok_or_else(|| TokenError::AlreadyExists(key.user_id.clone()))?
        };
        self.cache.put(&set);
        self.announce(TokenSetChange::One(key.clone()));
        info!(app = %key.app, user_id = %key.user_id, replace, expires_at = %format_time(set.expires_at), "token set imported");
        Ok(set)
    }
}
