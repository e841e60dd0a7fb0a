//! Exchanging auth codes. A caller whose first ExchangeAuthCode call timed out may retry
//! with the same code; Tiki would reject the used code and revoke the grant it created,
//! so within the retry window the retry gets the stored token set instead.
//!
//! Each exchange is recorded in the store under the SHA-256 of its code before the code
//! is sent, so across replicas only one call per code reaches Tiki. A second call for
//! the same user waits for the first and returns its token set, and a call for another
//! user is rejected. A failed exchange removes its record, so that a retry reaches Tiki
//! again. A record that a crashed replica left unfinished is taken over after one lease.

use std::time::Duration;

use chrono::Utc;
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};
use tracing::{debug, info, warn};

use super::{TokenError, TokenManager, upstream::Call};
use crate::{
    store::{CodeClaim, NewTokens, TokenSet, TokenSetKey, format_time},
    tiki::FailureClass,
};

/// How often a call waiting for another call's exchange of the same code polls.
const CODE_POLL_INTERVAL: Duration = Duration::from_millis(50);

impl TokenManager {
    /// Exchanges an auth code and stores the token set, replacing the user's old one. A
    /// retry with the same code and user id within the retry window returns the stored
    /// token set without a request to Tiki.
    pub async fn exchange(
        &self,
        key: &TokenSetKey,
        auth_code: &SecretString,
    ) -> Result<TokenSet, TokenError> {
        let _guard = self.locks.lock(key).await;
        let code_hash = code_hash(auth_code);
        if let Some(set) = self.claim_code(key, &code_hash).await? {
            return Ok(set);
        }

        // NOTE: the token set and the finished mark are two writes. A crash between them
        // leaves the record unfinished, so a retry after one lease reaches Tiki, which
        // rejects the used code and revokes the grant that was just stored.
        match self.exchange_claimed(key, auth_code).await {
            Ok(set) => {
                if let Err(error) = self.store.finish_code(&code_hash, Utc::now()).await {
                    warn!(app = %key.app, user_id = %key.user_id, %error, "recording the finished exchange failed; a retry with this auth code will reach Tiki");
                }
                Ok(set)
            }
            Err(exchange_error) => {
                if let Err(error) = self.store.release_code(&code_hash).await {
                    warn!(app = %key.app, user_id = %key.user_id, %error, "removing the record of a failed exchange failed; retries with this auth code wait for one lease");
                }
                Err(exchange_error)
            }
        }
    }

    /// Records that this call exchanges the code with hash `code_hash` for `key`, waiting
    /// while another call does. Returns the stored token set when an earlier call
    /// already exchanged the code for `key`.
    async fn claim_code(
        &self,
        key: &TokenSetKey,
        code_hash: &str,
    ) -> Result<Option<TokenSet>, TokenError> {
        let deadline = Utc::now() + self.lease;
        loop {
            let now = Utc::now();
            let claim = self
                .store
                .claim_code(
                    code_hash,
                    key,
                    now,
                    now - self.exchange_retry_window,
                    now - self.lease,
                )
                .await?;
            let earlier = match claim {
                CodeClaim::Claimed => return Ok(None),
                CodeClaim::Existing(earlier) => earlier,
            };
            if earlier.key != *key {
                warn!(app = %key.app, user_id = %key.user_id, "auth code rejected because it was already sent for another user");
                return Err(TokenError::CodeUsedForOtherUser);
            }
            if earlier.finished {
                info!(app = %key.app, user_id = %key.user_id, first_call_at = %format_time(earlier.started_at), "auth code exchanged before; returning the stored token set");
                return match self.store.get(key).await? {
                    Some(set) => Ok(Some(set)),
                    None => Err(TokenError::CodeRejected(
                        "this auth code was already exchanged, and the token set it created \
                         has since been deleted"
                            .to_owned(),
                    )),
                };
            }
            if now >= deadline {
                return Err(TokenError::Unavailable(
                    "an earlier call with this auth code is still waiting for Tiki; retry later"
                        .to_owned(),
                ));
            }
            debug!(app = %key.app, user_id = %key.user_id, "waiting for an earlier call with the same auth code");
            tokio::time::sleep(CODE_POLL_INTERVAL).await;
        }
    }

    /// Sends the code to Tiki and stores the token set it returns.
    async fn exchange_claimed(
        &self,
        key: &TokenSetKey,
        auth_code: &SecretString,
    ) -> Result<TokenSet, TokenError> {
        if self.credentials_blocked(Utc::now()).is_some() {
            return Err(TokenError::CredentialsRejected);
        }
        let sent_at = Utc::now();
        let wait_limit = self.claim_wait.to_std().unwrap_or_default();
        let sent = self
            .send_to_tiki(Call::Exchange, auth_code, wait_limit)
            .await;
        let grant = sent.map_err(|error| {
            warn!(app = %key.app, user_id = %key.user_id, %error, "auth code exchange failed");
            match error.class() {
                FailureClass::GrantRejected => TokenError::CodeRejected(error.to_string()),
                FailureClass::CredentialsRejected => TokenError::CredentialsRejected,
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
        self.announce(super::TokenSetChange::One(key.clone()));
        if set.refresh_token.is_none() {
            warn!(app = %key.app, user_id = %key.user_id, "Tiki issued no refresh token; the user did not grant the offline scope, so the token set expires without refresh");
        }
        info!(app = %key.app, user_id = %key.user_id, expires_at = %format_time(set.expires_at), "token set stored");
        Ok(set)
    }
}

/// Returns the hex SHA-256 of an auth code. Codes carry 256 random bits, so the hash
/// cannot be reversed by guessing, and no key is needed.
fn code_hash(auth_code: &SecretString) -> String {
    hex::encode(Sha256::digest(auth_code.expose_secret().as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_hash_is_hex_sha256() {
        let hash = code_hash(&SecretString::from("abc"));
        assert_eq!(
            hash,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
