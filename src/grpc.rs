//! The `tokend.v1.TokenService` gRPC service: request validation, the calls into the
//! token manager, and the one mapping from domain errors to `tonic::Status`.

pub mod codec;
mod validate;
mod watch;

use std::sync::Arc;

use chrono::{DateTime, Utc};
use secrecy::ExposeSecret;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use tracing::{Instrument, debug, error, info_span};

pub use validate::{
    DEFAULT_PAGE_SIZE, MAX_AUTH_CODE_BYTES, MAX_IMPORT_EXPIRES_IN, MAX_PAGE_SIZE, MAX_SCOPE_BYTES,
    MAX_SCOPES, MAX_TOKEN_BYTES, MAX_USER_ID_BYTES,
};
use validate::{auth_code, user_key};

use crate::{
    proto::{self, token_service_server::TokenService},
    store::{StoreError, TokenSet, TokenStatus},
    tokens::{ServedToken, TokenError, TokenManager},
};

/// Maximum size of a request message, in bytes. The largest valid request, an import
/// with the longest tokens and every scope, is about 26 KiB. Requests up to this size
/// are decoded so that an over-long field gets INVALID_ARGUMENT naming it; larger ones
/// get OUT_OF_RANGE from tonic before any decoding.
pub const MAX_REQUEST_BYTES: usize = 1024 * 1024;

/// The gRPC face of the token manager.
#[derive(Debug, Clone)]
pub struct TokenGrpcService {
    manager: Arc<TokenManager>,
    /// Cancelled when the daemon starts shutting down, which ends every watch.
    shutdown: CancellationToken,
}

impl TokenGrpcService {
    pub fn new(manager: Arc<TokenManager>, shutdown: CancellationToken) -> Self {
        TokenGrpcService { manager, shutdown }
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
        Ok(Response::new(access_token_message(&token)))
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

    type WatchAccessTokenStream = WatchStream;

    async fn watch_access_token(
        &self,
        request: Request<proto::WatchAccessTokenRequest>,
    ) -> Result<Response<Self::WatchAccessTokenStream>, Status> {
        let request = request.into_inner();
        let key = user_key(&request.user_id)?;
        let span = info_span!("WatchAccessToken", app = %key.app, user_id = %key.user_id);
        let stream = watch::start(
            self.manager.clone(),
            key,
            request.min_valid_seconds,
            self.shutdown.clone(),
        )
        .instrument(span)
        .await
        .map_err(to_status)?;
        Ok(Response::new(stream))
    }

    async fn refresh_access_token(
        &self,
        request: Request<proto::RefreshAccessTokenRequest>,
    ) -> Result<Response<proto::AccessToken>, Status> {
        let key = user_key(&request.into_inner().user_id)?;
        let span = info_span!("RefreshAccessToken", app = %key.app, user_id = %key.user_id);
        let token = self
            .manager
            .refresh_now(&key)
            .instrument(span)
            .await
            .map_err(to_status)?;
        Ok(Response::new(access_token_message(&token)))
    }

    async fn list_token_sets(
        &self,
        request: Request<proto::ListTokenSetsRequest>,
    ) -> Result<Response<proto::ListTokenSetsResponse>, Status> {
        let query = validate::list_query(request.get_ref())?;
        let span = info_span!("ListTokenSets", page_size = query.page_size);
        // Fetching one row more than the page size shows whether another page follows.
        let mut sets = self
            .manager
            .list(query.after.as_ref(), &query.statuses, query.page_size + 1)
            .instrument(span)
            .await
            .map_err(to_status)?;
        let page_size = query.page_size as usize;
        let more = sets.len() > page_size;
        sets.truncate(page_size);
        let next_page_token = match sets.last() {
            Some(last) if more => validate::encode_page_token(&last.key, &query.statuses),
            _ => String::new(),
        };
        Ok(Response::new(proto::ListTokenSetsResponse {
            token_sets: sets.iter().map(token_set_info).collect(),
            next_page_token,
        }))
    }

    async fn import_token_set(
        &self,
        request: Request<proto::ImportTokenSetRequest>,
    ) -> Result<Response<proto::TokenSetInfo>, Status> {
        let request = request.into_inner();
        let replace = request.replace_existing;
        let (key, imported) = validate::import(request, Utc::now())?;
        let span = info_span!("ImportTokenSet", app = %key.app, user_id = %key.user_id);
        let set = self
            .manager
            .import(&key, &imported, replace)
            .instrument(span)
            .await
            .map_err(to_status)?;
        Ok(Response::new(token_set_info(&set)))
    }
}

/// The messages of a `WatchAccessToken` stream.
pub type WatchStream = std::pin::Pin<
    Box<dyn tokio_stream::Stream<Item = Result<proto::WatchAccessTokenResponse, Status>> + Send>,
>;

/// Maps a domain error to the status returned to the caller. Storage failures are logged with
/// their cause here and reach the caller without internal detail.
fn to_status(error: TokenError) -> Status {
    match error {
        TokenError::NotFound(user_id) => {
            Status::not_found(format!("no token set is stored for user_id {user_id:?}"))
        }
        TokenError::AlreadyExists(user_id) => Status::already_exists(format!(
            "user_id {user_id:?} already has a token set; set replace_existing to replace it"
        )),
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

fn access_token_message(token: &ServedToken) -> proto::AccessToken {
    proto::AccessToken {
        access_token: token.access_token.expose_secret().to_owned(),
        expires_at: Some(timestamp(token.expires_at)),
        scopes: token.scopes.to_vec(),
    }
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
            (TokenError::AlreadyExists("u".into()), Code::AlreadyExists),
        ];
        for (error, code) in cases {
            assert_eq!(to_status(error).code(), code);
        }
    }
}
