//! Carries out one well-formed token request: checks the client id, the timestamp window
//! and the signature in that order, then exchanges or refreshes the grant, counts the
//! outcome and builds the GraphQL response.
//!
//! Failures follow GraphQL convention: `data` is null and one error carries the reason
//! in `extensions.code`. Messages never contain the code, token or signature.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{Map, Value, json};
use tracing::debug;

use super::query::{Operation, ResultField, TokenRequest};
use super::state::{GrantError, IssuePolicy, Issued};
use super::{EmulatorConfig, Inner};
use crate::tiki::signature;

/// Error codes the emulator sends in `extensions.code`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ErrorCode {
    BadRequest,
    InvalidClient,
    InvalidTimestamp,
    InvalidSignature,
    InvalidCode,
    InvalidToken,
    /// Sent beside issued tokens by [`super::Fault::TokensWithErrors`].
    PartialFailure,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::InvalidClient => "invalid_client",
            ErrorCode::InvalidTimestamp => "invalid_timestamp",
            ErrorCode::InvalidSignature => "invalid_signature",
            ErrorCode::InvalidCode => "invalid_code",
            ErrorCode::InvalidToken => "invalid_token",
            ErrorCode::PartialFailure => "partial_failure",
        }
    }
}

/// Builds a GraphQL error response: null `data` and one error with `code` in `extensions`.
pub(super) fn error_document(code: &str, message: &str) -> Value {
    json!({
        "data": null,
        "errors": [{ "message": message, "extensions": { "code": code } }],
    })
}

/// Checks and carries out `request` at time `now` and returns the GraphQL response, which
/// is sent with HTTP 200 whether the request succeeded or not.
pub(super) fn process(
    inner: &mut Inner,
    config: &EmulatorConfig,
    request: &TokenRequest,
    now: SystemTime,
) -> Value {
    match request.operation {
        Operation::Exchange => inner.stats.exchange_requests += 1,
        Operation::Refresh => inner.stats.refresh_requests += 1,
    }
    match check_caller(config, request, now) {
        Ok(()) => carry_out_grant(inner, config, request, now),
        Err(code) => reject_caller(inner, config, request.operation, code),
    }
}

fn reject_caller(
    inner: &mut Inner,
    config: &EmulatorConfig,
    operation: Operation,
    code: ErrorCode,
) -> Value {
    match code {
        ErrorCode::InvalidTimestamp => inner.stats.timestamp_failures += 1,
        ErrorCode::InvalidSignature => inner.stats.signature_failures += 1,
        _ => {}
    }
    debug!(
        operation = operation.field(),
        code = code.as_str(),
        "token request rejected"
    );
    error_document(code.as_str(), &caller_message(code, config))
}

/// Exchanges the code or refreshes the token set once the caller has been checked.
fn carry_out_grant(
    inner: &mut Inner,
    config: &EmulatorConfig,
    request: &TokenRequest,
    now: SystemTime,
) -> Value {
    let operation = request.operation;
    let policy = IssuePolicy {
        access_lifetime: Duration::from_secs(inner.expires_in),
        refresh_lifetime: config.refresh_token_lifetime,
        rotate_refresh_token: !inner.omit_refresh_token,
    };
    let result = match operation {
        Operation::Exchange => inner.grants.exchange(&request.token, now, policy),
        Operation::Refresh => inner.grants.refresh(&request.token, now, policy),
    };

    match result {
        Ok(issued) => {
            count_success(inner, operation, &issued);
            debug!(
                operation = operation.field(),
                customer_id = %issued.customer_id,
                refresh_token_issued = issued.refresh_token.is_some(),
                "token set issued"
            );
            success_document(
                request,
                &issued,
                inner.expires_in,
                inner.expires_in_as_string,
            )
        }
        Err(error) => {
            inner.stats.rejected_grants += 1;
            if error.is_reuse() {
                inner.stats.reuse_detections += 1;
            }
            debug!(operation = operation.field(), ?error, "grant rejected");
            let (code, message) = grant_failure(error);
            error_document(code.as_str(), message)
        }
    }
}

fn count_success(inner: &mut Inner, operation: Operation, issued: &Issued) {
    match operation {
        Operation::Exchange => inner.stats.exchanges += 1,
        Operation::Refresh => {
            inner.stats.refreshes += 1;
            if issued.replaced_expired_access_token {
                inner.stats.refreshes_after_expiry += 1;
            }
        }
    }
}

/// Checks who sent the request: the client id, then the timestamp, then the signature.
fn check_caller(
    config: &EmulatorConfig,
    request: &TokenRequest,
    now: SystemTime,
) -> Result<(), ErrorCode> {
    if request.client_id != config.client_id {
        return Err(ErrorCode::InvalidClient);
    }
    if !within_window(request.timestamp_ms, now, config.timestamp_window) {
        return Err(ErrorCode::InvalidTimestamp);
    }

    // The signature is lowercase hex of a SHA-256 HMAC, so anything else is rejected
    // before `verify`, which would also accept uppercase hex.
    let well_formed = request.signature.len() == 64
        && request
            .signature
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    let signed = signature::signed_input(
        request.operation.token_argument(),
        &request.token,
        &request.client_id,
        request.timestamp_ms,
    );
    let secret = config.client_secret.as_bytes();
    if !well_formed || !signature::verify(secret, &signed, &request.signature) {
        return Err(ErrorCode::InvalidSignature);
    }
    Ok(())
}

/// Returns whether `timestamp_ms` lies within `window` of `now`, in either direction.
fn within_window(timestamp_ms: i64, now: SystemTime, window: Duration) -> bool {
    let now_ms = match now.duration_since(UNIX_EPOCH) {
        Ok(since_epoch) => i128::try_from(since_epoch.as_millis()).unwrap_or(i128::MAX),
        Err(before_epoch) => {
            -i128::try_from(before_epoch.duration().as_millis()).unwrap_or(i128::MAX)
        }
    };
    let difference = (now_ms - i128::from(timestamp_ms)).unsigned_abs();
    difference <= window.as_millis()
}

fn caller_message(code: ErrorCode, config: &EmulatorConfig) -> String {
    match code {
        ErrorCode::InvalidClient => "client_id is not a registered client".to_owned(),
        ErrorCode::InvalidTimestamp => format!(
            "timestamp is more than {} ms from the server clock: send the current Unix time \
             in milliseconds",
            config.timestamp_window.as_millis()
        ),
        ErrorCode::InvalidSignature => {
            "signature does not match the request and the client secret".to_owned()
        }
        _ => "request rejected".to_owned(),
    }
}

fn grant_failure(error: GrantError) -> (ErrorCode, &'static str) {
    match error {
        GrantError::CodeUnknown => (ErrorCode::InvalidCode, "auth code not found"),
        GrantError::CodeExpired => (ErrorCode::InvalidCode, "auth code expired"),
        GrantError::CodeReused => (
            ErrorCode::InvalidCode,
            "auth code was already used: the tokens issued for it are revoked",
        ),
        GrantError::TokenUnknown => (ErrorCode::InvalidToken, "refresh token not found"),
        GrantError::TokenExpired => (ErrorCode::InvalidToken, "refresh token expired"),
        GrantError::TokenRevoked => (ErrorCode::InvalidToken, "refresh token revoked"),
        GrantError::TokenReused => (
            ErrorCode::InvalidToken,
            "refresh token was already rotated out: every token of its family is revoked",
        ),
    }
}

/// Builds the response with only the selected fields. A refresh that kept the current
/// refresh token leaves `refresh_token` out, while an exchange without the `offline`
/// scope sends it as null.
fn success_document(
    request: &TokenRequest,
    issued: &Issued,
    expires_in: u64,
    expires_in_as_string: bool,
) -> Value {
    let mut result = Map::new();
    for field in &request.fields {
        let value = match field {
            ResultField::AccessToken => Value::from(issued.access_token.clone()),
            ResultField::RefreshToken => match (&issued.refresh_token, request.operation) {
                (Some(token), _) => Value::from(token.clone()),
                (None, Operation::Exchange) => Value::Null,
                (None, Operation::Refresh) => continue,
            },
            ResultField::ExpiresIn if expires_in_as_string => Value::from(expires_in.to_string()),
            ResultField::ExpiresIn => Value::from(expires_in),
            ResultField::Scopes => Value::from(issued.scopes.clone()),
        };
        result.insert(field.name().to_owned(), value);
    }
    json!({ "data": { request.operation.field(): result } })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: Duration = Duration::from_secs(1);

    fn now() -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(1_700_000_000_000)
    }

    fn inner() -> Inner {
        Inner::new(3600)
    }

    /// Builds a signed exchange request for `code` at `now()`.
    fn exchange_request(config: &EmulatorConfig, code: &str) -> TokenRequest {
        let timestamp_ms = 1_700_000_000_000;
        let signed = signature::signed_input("code", code, &config.client_id, timestamp_ms);
        TokenRequest {
            operation: Operation::Exchange,
            token: code.to_owned(),
            client_id: config.client_id.clone(),
            timestamp_ms,
            signature: signature::sign(config.client_secret.as_bytes(), &signed),
            fields: vec![ResultField::RefreshToken, ResultField::ExpiresIn],
        }
    }

    fn error_code(response: &Value) -> &str {
        response["errors"][0]["extensions"]["code"]
            .as_str()
            .unwrap()
    }

    #[test]
    fn window_is_inclusive_both_ways() {
        let base = 1_700_000_000_000;
        assert!(within_window(base + 1000, now(), SECOND));
        assert!(within_window(base - 1000, now(), SECOND));
        assert!(!within_window(base + 1001, now(), SECOND));
        assert!(!within_window(base - 1001, now(), SECOND));
        assert!(!within_window(i64::MIN, now(), SECOND));
        assert!(!within_window(i64::MAX, now(), SECOND));
    }

    #[test]
    fn checks_run_in_order() {
        let config = EmulatorConfig::default();
        let mut state = inner();
        let mut request = exchange_request(&config, "code");
        request.signature = "0".repeat(64);
        request.timestamp_ms = 0;
        let response = process(&mut state, &config, &request, now());
        assert_eq!(error_code(&response), "invalid_timestamp");
        assert_eq!(state.stats.timestamp_failures, 1);
        assert_eq!(state.stats.signature_failures, 0);

        request.client_id = "other".to_owned();
        let response = process(&mut state, &config, &request, now());
        assert_eq!(error_code(&response), "invalid_client");
        assert_eq!(state.stats.timestamp_failures, 1);
        assert_eq!(state.stats.exchange_requests, 2);
    }

    #[test]
    fn uppercase_signature_is_rejected() {
        let config = EmulatorConfig::default();
        let mut state = inner();
        let code = state.grants.issue_code("c1", vec![], now(), SECOND);
        let mut request = exchange_request(&config, &code);
        request.signature = request.signature.to_ascii_uppercase();
        let response = process(&mut state, &config, &request, now());
        assert_eq!(error_code(&response), "invalid_signature");
        assert_eq!(state.stats.signature_failures, 1);
    }

    #[test]
    fn response_has_only_selected_fields() {
        let config = EmulatorConfig::default();
        let mut state = inner();
        state.expires_in_as_string = true;
        let code = state
            .grants
            .issue_code("c1", vec!["user_profile".into()], now(), SECOND);
        let response = process(
            &mut state,
            &config,
            &exchange_request(&config, &code),
            now(),
        );
        let expected = json!({
            "data": { "get_auth_access_token": { "refresh_token": null, "expires_in": "3600" } }
        });
        assert_eq!(response, expected);
        assert_eq!(state.stats.exchanges, 1);
    }

    #[test]
    fn kept_refresh_token_is_left_out() {
        let config = EmulatorConfig::default();
        let mut state = inner();
        let code = state
            .grants
            .issue_code("c1", vec!["offline".into()], now(), SECOND);
        let exchange = process(
            &mut state,
            &config,
            &exchange_request(&config, &code),
            now(),
        );
        let refresh_token = exchange["data"]["get_auth_access_token"]["refresh_token"]
            .as_str()
            .unwrap()
            .to_owned();

        state.omit_refresh_token = true;
        let mut request = exchange_request(&config, &refresh_token);
        request.operation = Operation::Refresh;
        let signed = signature::signed_input(
            "refresh_token",
            &refresh_token,
            &config.client_id,
            request.timestamp_ms,
        );
        request.signature = signature::sign(config.client_secret.as_bytes(), &signed);
        let response = process(&mut state, &config, &request, now());
        let result = &response["data"]["refresh_auth_access_token"];
        assert_eq!(result["expires_in"], 3600);
        assert!(result.get("refresh_token").is_none());
        assert_eq!(state.stats.refreshes, 1);
    }

    #[test]
    fn unknown_code_is_invalid_code() {
        let config = EmulatorConfig::default();
        let mut state = inner();
        let response = process(&mut state, &config, &exchange_request(&config, "x"), now());
        assert_eq!(error_code(&response), "invalid_code");
        assert!(response["data"].is_null());
        assert_eq!(state.stats.rejected_grants, 1);
        assert_eq!(state.stats.reuse_detections, 0);
    }
}
