//! The `tokend.v1.TokenService` gRPC service: request validation, the calls into the
//! token manager, and the one mapping from domain errors to `tonic::Status`.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use secrecy::{ExposeSecret, SecretString};
use tonic::{Request, Response, Status};
use tracing::{Instrument, debug, error, info_span};

use crate::{
    proto::{self, token_service_server::TokenService},
    store::{StoreError, TokenSet, TokenSetKey, TokenStatus},
    tokens::{TokenError, TokenManager},
};

/// Longest accepted user id, in bytes.
pub const MAX_USER_ID_BYTES: usize = 256;

/// Longest accepted auth code, in bytes. Tiki's codes are under 100 bytes.
pub const MAX_AUTH_CODE_BYTES: usize = 2048;

/// The gRPC face of the token manager.
#[derive(Debug, Clone)]
pub struct TokenGrpcService {
    manager: Arc<TokenManager>,
}

impl TokenGrpcService {
    pub fn new(manager: Arc<TokenManager>) -> Self {
        TokenGrpcService { manager }
    }
}

#[tonic::async_trait]
impl TokenService for TokenGrpcService {
    async fn exchange_auth_code(
        &self,
        request: Request<proto::ExchangeAuthCodeRequest>,
    ) -> Result<Response<proto::TokenSetInfo>, Status> {
        let request = request.into_inner();
        let key = user_key(&request.user_id)?;
        let code = auth_code(request.auth_code)?;
        let span = info_span!("ExchangeAuthCode", app = %key.app, user_id = %key.user_id);
        let set = self
            .manager
            .exchange(&key, &code)
            .instrument(span)
            .await
            .map_err(to_status)?;
        Ok(Response::new(token_set_info(&set)))
    }

    async fn get_access_token(
        &self,
        request: Request<proto::GetAccessTokenRequest>,
    ) -> Result<Response<proto::AccessToken>, Status> {
        let request = request.into_inner();
        let key = user_key(&request.user_id)?;
        let span = info_span!("GetAccessToken", app = %key.app, user_id = %key.user_id);
        let token = self
            .manager
            .access_token(&key, request.min_valid_seconds)
            .instrument(span)
            .await
            .map_err(to_status)?;
        debug!(app = %key.app, user_id = %key.user_id, expires_at = %token.expires_at, "access token served");
        Ok(Response::new(proto::AccessToken {
            access_token: token.access_token.expose_secret().to_owned(),
            expires_at: Some(timestamp(token.expires_at)),
            scopes: token.scopes.to_vec(),
        }))
    }

    async fn get_token_set(
        &self,
        request: Request<proto::GetTokenSetRequest>,
    ) -> Result<Response<proto::TokenSetInfo>, Status> {
        let key = user_key(&request.into_inner().user_id)?;
        let span = info_span!("GetTokenSet", app = %key.app, user_id = %key.user_id);
        let set = self
            .manager
            .token_set(&key)
            .instrument(span)
            .await
            .map_err(to_status)?;
        Ok(Response::new(token_set_info(&set)))
    }

    async fn delete_token_set(
        &self,
        request: Request<proto::DeleteTokenSetRequest>,
    ) -> Result<Response<proto::DeleteTokenSetResponse>, Status> {
        let key = user_key(&request.into_inner().user_id)?;
        let span = info_span!("DeleteTokenSet", app = %key.app, user_id = %key.user_id);
        self.manager
            .delete(&key)
            .instrument(span)
            .await
            .map_err(to_status)?;
        Ok(Response::new(proto::DeleteTokenSetResponse {}))
    }
}

/// Maps a domain error to the status returned to the caller. Storage failures are logged with
/// their cause here and reach the caller without internal detail.
fn to_status(error: TokenError) -> Status {
    match error {
        TokenError::NotFound(user_id) => {
            Status::not_found(format!("no token set is stored for user_id {user_id:?}"))
        }
        TokenError::ReauthRequired(reason) => Status::failed_precondition(format!(
            "the user must consent again through my.getAuthCode: {reason}"
        )),
        TokenError::CodeRejected(reason) => Status::failed_precondition(format!(
            "Tiki rejected the auth code; get a new one through my.getAuthCode: {reason}"
        )),
        TokenError::CodeUsedForOtherUser => Status::failed_precondition(
            "this auth_code was already sent for a different user_id; get a new auth code \
             through my.getAuthCode for this user",
        ),
        TokenError::Unavailable(reason) => Status::unavailable(reason),
        TokenError::CredentialsRejected => Status::unavailable(
            "Tiki rejected tokend's client credentials; an operator must fix the settings",
        ),
        TokenError::Store(error @ StoreError::Decrypt { .. }) => {
            error!(%error, "stored tokens cannot be decrypted");
            Status::internal(format!(
                "tokend cannot decrypt this user's stored tokens; an operator must fix the \
                 encryption keys: {error}"
            ))
        }
        TokenError::Store(error) => {
            error!(%error, "storage failed while handling a request");
            Status::unavailable("tokend's database is unavailable; retry later")
        }
    }
}

fn user_key(user_id: &str) -> Result<TokenSetKey, Status> {
    if user_id.is_empty() {
        return Err(Status::invalid_argument("user_id is empty"));
    }
    if user_id.len() > MAX_USER_ID_BYTES {
        return Err(Status::invalid_argument(format!(
            "user_id is {} bytes long; the maximum is {MAX_USER_ID_BYTES}",
            user_id.len()
        )));
    }
    if user_id.chars().any(char::is_control) {
        return Err(Status::invalid_argument(
            "user_id contains control characters",
        ));
    }
    Ok(TokenSetKey::new(user_id))
}

fn auth_code(code: String) -> Result<SecretString, Status> {
    if code.is_empty() {
        return Err(Status::invalid_argument("auth_code is empty"));
    }
    if code.len() > MAX_AUTH_CODE_BYTES {
        return Err(Status::invalid_argument(format!(
            "auth_code is {} bytes long; the maximum is {MAX_AUTH_CODE_BYTES}",
            code.len()
        )));
    }
    if code.chars().any(char::is_control) {
        return Err(Status::invalid_argument(
            "auth_code contains control characters",
        ));
    }
    Ok(SecretString::from(code))
}

fn token_set_info(set: &TokenSet) -> proto::TokenSetInfo {
    let status = match set.status {
        TokenStatus::Active => proto::TokenStatus::Active,
        TokenStatus::RefreshFailing => proto::TokenStatus::RefreshFailing,
        TokenStatus::ReauthRequired => proto::TokenStatus::ReauthRequired,
    };
    proto::TokenSetInfo {
        user_id: set.key.user_id.clone(),
        status: status.into(),
        scopes: set.scopes.clone(),
        expires_at: Some(timestamp(set.expires_at)),
        next_refresh_at: set.next_refresh_at.map(timestamp),
        refreshed_at: set.refreshed_at.map(timestamp),
        failure_count: set.failure_count,
        last_error: set.last_error.clone().unwrap_or_default(),
        created_at: Some(timestamp(set.created_at)),
        updated_at: Some(timestamp(set.updated_at)),
    }
}

fn timestamp(time: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: time.timestamp(),
        nanos: i32::try_from(time.timestamp_subsec_nanos()).unwrap_or(0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    #[test]
    fn user_id_is_validated() {
        let cases = [
            ("", "empty"),
            ("a\nb", "control"),
            ("tab\there", "control"),
            ("\u{7f}", "control"),
        ];
        for (user_id, expected) in cases {
            let status = user_key(user_id).unwrap_err();
            assert_eq!(status.code(), Code::InvalidArgument);
            assert!(status.message().contains("user_id"), "{user_id:?}");
            assert!(status.message().contains(expected), "{user_id:?}");
        }
        let long = "x".repeat(MAX_USER_ID_BYTES + 1);
        assert_eq!(user_key(&long).unwrap_err().code(), Code::InvalidArgument);
        assert!(user_key(&"é".repeat(128)).is_ok());
        assert!(user_key(&"é".repeat(129)).is_err());
    }

    #[test]
    fn auth_code_is_validated() {
        assert_eq!(
            auth_code(String::new()).unwrap_err().code(),
            Code::InvalidArgument
        );
        let long = "c".repeat(MAX_AUTH_CODE_BYTES + 1);
        let status = auth_code(long).unwrap_err();
        assert!(status.message().contains("auth_code"));
        assert!(auth_code("CDKJfdkj4528KJ.eCZa27znIuM8JGC".to_owned()).is_ok());
    }

    #[test]
    fn errors_map_to_codes() {
        let cases = [
            (TokenError::NotFound("u".into()), Code::NotFound),
            (
                TokenError::ReauthRequired("r".into()),
                Code::FailedPrecondition,
            ),
            (
                TokenError::CodeRejected("r".into()),
                Code::FailedPrecondition,
            ),
            (TokenError::Unavailable("r".into()), Code::Unavailable),
            (TokenError::CredentialsRejected, Code::Unavailable),
        ];
        for (error, code) in cases {
            assert_eq!(to_status(error).code(), code);
        }
    }
}
