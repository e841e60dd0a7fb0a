//! The emulator's HTTP routes: the GraphQL token endpoint with its injected faults, the
//! auth-code and stats endpoints for tests and people, and the profile endpoint that
//! checks an access token.

use std::sync::Arc;
use std::time::SystemTime;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;
use tracing::debug;

use super::token_endpoint::{self, ErrorCode, error_document};
use super::{EmulatorStats, Fault, GRAPHQL_PATH, Shared, faults, query};

/// The customer an auth code is issued for when the request names none.
const DEFAULT_CUSTOMER_ID: &str = "sandbox-user";

/// The scopes an auth code carries when the request names none.
const DEFAULT_SCOPES: [&str; 2] = ["offline", "user_profile"];

/// The scope Tiki requires for the customer profile.
const PROFILE_SCOPE: &str = "user_profile";

/// Builds the router of every emulator endpoint.
pub(super) fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route(GRAPHQL_PATH, post(graphql))
        .route("/emulator/auth-codes", post(issue_auth_code))
        .route("/emulator/stats", get(stats))
        .route("/ecom/v1/customers/profile", get(profile))
        .with_state(shared)
}

/// Serves the token API, applying the next injected fault if there is one.
async fn graphql(State(shared): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> Response {
    let _in_flight = InFlight::start(&shared);
    let fault = next_fault(&shared, &body);
    if let Some(fault) = &fault {
        debug!(?fault, "applying injected fault");
        if let Fault::StatusAfter { delay, .. } = fault {
            shared.pause(*delay).await;
        }
        if let Some(response) = faults::replacement_response(fault) {
            return response;
        }
    }

    if let Some(Fault::DelayBefore(delay)) = fault {
        shared.pause(delay).await;
    }
    let response = match graphql_document(&shared, &headers, &body) {
        Ok(mut document) => {
            if let Some(Fault::TokensWithErrors { message }) = &fault {
                let code = ErrorCode::PartialFailure.as_str();
                document["errors"] = error_document(code, message)["errors"].take();
            }
            Json(document).into_response()
        }
        Err(rejection) => *rejection,
    };
    if let Some(Fault::DelayAfter(delay)) = fault {
        shared.pause(delay).await;
    }
    response
}

/// Counts a GraphQL request as in flight from its creation until it is dropped.
struct InFlight<'a> {
    shared: &'a Shared,
}

impl<'a> InFlight<'a> {
    fn start(shared: &'a Shared) -> Self {
        shared.lock().request_started();
        InFlight { shared }
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.shared.lock().in_flight -= 1;
    }
}

/// Takes the next queued fault, or else the fault set for the customer that the
/// request's code or refresh token belongs to.
fn next_fault(shared: &Shared, body: &[u8]) -> Option<Fault> {
    let mut inner = shared.lock();
    let mut fault = inner.faults.next_fault();
    if fault.is_none() && !inner.customer_faults.is_empty() {
        let request = query::parse_body(body).ok();
        let customer = request
            .as_ref()
            .and_then(|request| inner.grants.customer_of(&request.token));
        fault = customer.and_then(|customer| inner.customer_faults.get(customer).cloned());
    }
    if fault.is_some() {
        inner.stats.faults_injected += 1;
    }
    fault
}

/// Processes a request and returns its GraphQL response document, or the rejection of
/// a malformed request.
fn graphql_document(
    shared: &Shared,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<serde_json::Value, Box<Response>> {
    if !is_json(headers) {
        return Err(Box::new(bad_request(
            "Content-Type must be application/json",
        )));
    }
    let request = match query::parse_body(body) {
        Ok(request) => request,
        Err(error) => return Err(Box::new(bad_request(&error.to_string()))),
    };
    let mut inner = shared.lock();
    inner.signatures.push(request.signature.clone());
    Ok(token_endpoint::process(
        &mut inner,
        &shared.config,
        &request,
        SystemTime::now(),
    ))
}

fn is_json(headers: &HeaderMap) -> bool {
    let Some(value) = headers.get(header::CONTENT_TYPE) else {
        return false;
    };
    let Ok(text) = value.to_str() else {
        return false;
    };
    let media_type = text.split(';').next().unwrap_or_default().trim();
    media_type.eq_ignore_ascii_case("application/json")
}

fn bad_request(message: &str) -> Response {
    debug!(message, "malformed GraphQL request");
    let document = error_document(ErrorCode::BadRequest.as_str(), message);
    (StatusCode::BAD_REQUEST, Json(document)).into_response()
}

/// Optional body of `POST /emulator/auth-codes`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct AuthCodeRequest {
    customer_id: Option<String>,
    scopes: Option<Vec<String>>,
}

/// Issues an auth code and sends it as text followed by a newline, so that a shell can
/// capture it with `$(curl -s -X POST ...)`.
async fn issue_auth_code(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    let request = if body.iter().all(u8::is_ascii_whitespace) {
        AuthCodeRequest::default()
    } else {
        match serde_json::from_slice::<AuthCodeRequest>(&body) {
            Ok(request) => request,
            Err(error) => {
                let message = format!(
                    "invalid body: {error}. Expected {{\"customer_id\": \"...\", \"scopes\": [\"...\"]}}\n"
                );
                return auth_code_rejected(&message);
            }
        }
    };

    let customer_id = request
        .customer_id
        .unwrap_or_else(|| DEFAULT_CUSTOMER_ID.to_owned());
    let scopes = request
        .scopes
        .unwrap_or_else(|| DEFAULT_SCOPES.map(str::to_owned).to_vec());
    if customer_id.trim().is_empty() {
        return auth_code_rejected("customer_id must not be empty\n");
    }
    if scopes
        .iter()
        .any(|scope| scope.is_empty() || scope.contains(char::is_whitespace))
    {
        return auth_code_rejected("each scope must be one non-empty word without spaces\n");
    }

    let code = shared.issue_auth_code(&customer_id, scopes);
    format!("{code}\n").into_response()
}

fn auth_code_rejected(message: &str) -> Response {
    debug!(message = message.trim_end(), "auth code request rejected");
    (StatusCode::BAD_REQUEST, message.to_owned()).into_response()
}

async fn stats(State(shared): State<Arc<Shared>>) -> Json<EmulatorStats> {
    Json(shared.lock().stats.clone())
}

/// Returns the customer behind a bearer access token, which needs the `user_profile`
/// scope. The body shape follows Tiki's REST APIs; Tiki does not publish this one.
async fn profile(State(shared): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    let Some(token) = bearer_token(&headers) else {
        return profile_error(
            StatusCode::UNAUTHORIZED,
            "invalid_request",
            "missing Authorization: Bearer <access token> header",
        );
    };
    let grant = shared
        .lock()
        .grants
        .check_access_token(token, SystemTime::now());
    let Some(grant) = grant else {
        return profile_error(
            StatusCode::UNAUTHORIZED,
            "invalid_token",
            "the access token is invalid, expired or revoked",
        );
    };
    if !grant.scopes.iter().any(|scope| scope == PROFILE_SCOPE) {
        return profile_error(
            StatusCode::FORBIDDEN,
            "insufficient_scope",
            "the access token lacks the user_profile scope",
        );
    }

    debug!(customer_id = %grant.customer_id, "profile served");
    let name = format!("Sandbox customer {}", grant.customer_id);
    Json(json!({ "data": { "id": grant.customer_id, "name": name } })).into_response()
}

fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// Builds a profile error with the RFC 6750 `WWW-Authenticate` challenge.
fn profile_error(status: StatusCode, reason: &str, message: &str) -> Response {
    debug!(status = status.as_u16(), reason, "profile request rejected");
    let challenge = match reason {
        "invalid_request" => "Bearer".to_owned(),
        "insufficient_scope" => {
            format!("Bearer error=\"{reason}\", scope=\"{PROFILE_SCOPE}\"")
        }
        _ => format!("Bearer error=\"{reason}\""),
    };
    let challenge = HeaderValue::from_str(&challenge).unwrap_or(HeaderValue::from_static("Bearer"));
    let body = json!({
        "data": null,
        "error": { "code": status.as_u16(), "reason": reason, "message": message },
    });
    (status, [(header::WWW_AUTHENTICATE, challenge)], Json(body)).into_response()
}
