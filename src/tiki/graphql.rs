//! Generation 1 of Tiki's platform API: `get_auth_access_token` and
//! `refresh_auth_access_token` as GraphQL queries with inline, signed arguments.
//!
//! Tiki does not publish its GraphQL error payloads, so failures are classified by the
//! error codes the REST generation documents (`invalid_code`, `invalid_token`,
//! `invalid_signature`) and their OAuth equivalents, found in `extensions` or in the
//! message. Any other error is treated as transient so that no user loses a grant to a
//! message tokend does not understand.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use reqwest::{StatusCode, header::RETRY_AFTER};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use serde_json::Value;
use tracing::warn;

use super::{Grant, TikiError, TokenApi, signature};

/// Error codes that mean the code or refresh token is dead.
const GRANT_REJECTED_CODES: &[&str] = &[
    "invalid_code",
    "invalid_token",
    "invalid_grant",
    "expired_token",
    "token_revoked",
];

/// Error codes that mean tokend's own client id, signature or clock is wrong.
const CREDENTIALS_REJECTED_CODES: &[&str] = &[
    "invalid_signature",
    "invalid_client",
    "unauthorized_client",
    "invalid_timestamp",
];

/// Maximum `Retry-After` wait honoured, in seconds; longer values are capped so that a
/// bad header cannot stop refreshes for good.
const MAX_RETRY_AFTER_SECONDS: u64 = 300;

/// Maximum token lifetime accepted, in seconds. Longer `expires_in` values are capped,
/// which only makes tokend refresh earlier than needed.
const MAX_EXPIRES_IN_SECONDS: u64 = 366 * 24 * 3600;

/// Maximum length, in characters, of the upstream error text kept in a `TikiError`.
const MAX_MESSAGE_CHARS: usize = 200;

/// The two operations of the generation-1 API.
#[derive(Debug, Clone, Copy)]
enum Operation {
    Exchange,
    Refresh,
}

impl Operation {
    fn field(self) -> &'static str {
        match self {
            Operation::Exchange => "get_auth_access_token",
            Operation::Refresh => "refresh_auth_access_token",
        }
    }

    fn token_argument(self) -> &'static str {
        match self {
            Operation::Exchange => "code",
            Operation::Refresh => "refresh_token",
        }
    }
}

/// A client for the generation-1 GraphQL endpoint.
#[derive(Debug)]
pub struct GraphqlClient {
    http: reqwest::Client,
    url: String,
    client_id: String,
    client_secret: SecretString,
}

impl GraphqlClient {
    /// Builds a client. `timeout` bounds a whole request; connecting has a shorter bound
    /// of its own, so that a refused or unreachable endpoint is known not to have seen
    /// the request.
    pub fn new(
        url: String,
        client_id: String,
        client_secret: SecretString,
        timeout: Duration,
    ) -> Result<Self, reqwest::Error> {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(5)))
            .user_agent(concat!("tokend/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(GraphqlClient {
            http,
            url,
            client_id,
            client_secret,
        })
    }

    async fn call(&self, operation: Operation, token: &SecretString) -> Result<Grant, TikiError> {
        let timestamp = unix_millis();
        let signed = signature::signed_input(
            operation.token_argument(),
            token.expose_secret(),
            &self.client_id,
            timestamp,
        );
        let signature = signature::sign(self.client_secret.expose_secret().as_bytes(), &signed);
        let query = build_query(
            operation,
            token.expose_secret(),
            &self.client_id,
            timestamp,
            &signature,
        );
        let secrets = [
            token.expose_secret(),
            self.client_secret.expose_secret(),
            signature.as_str(),
        ];

        let response = self
            .http
            .post(&self.url)
            .json(&serde_json::json!({ "query": query }))
            .send()
            .await
            .map_err(|error| classify_send_error(&error))?;

        let status = response.status();
        let retry_after = parse_retry_after(response.headers().get(RETRY_AFTER));
        let body = response.bytes().await.map_err(|error| {
            TikiError::OutcomeUnknown(format!("reading the response body failed: {error}"))
        })?;
        interpret_response(operation, status, retry_after, &body, &secrets)
    }
}

#[async_trait]
impl TokenApi for GraphqlClient {
    async fn exchange(&self, auth_code: &SecretString) -> Result<Grant, TikiError> {
        self.call(Operation::Exchange, auth_code).await
    }

    async fn refresh(&self, refresh_token: &SecretString) -> Result<Grant, TikiError> {
        self.call(Operation::Refresh, refresh_token).await
    }
}

fn unix_millis() -> i64 {
    let since_epoch = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(since_epoch.as_millis()).unwrap_or(i64::MAX)
}

/// Writes the query text with every argument inline, as Tiki's API expects.
fn build_query(
    operation: Operation,
    token: &str,
    client_id: &str,
    timestamp: i64,
    signature: &str,
) -> String {
    format!(
        "query {{\n  {field}(input: {{\n    {token_argument}: {token}\n    client_id: {client_id}\n    \
         timestamp: {timestamp}\n    signature: {signature}\n  }}) {{\n    access_token\n    \
         refresh_token\n    expires_in\n    scopes\n  }}\n}}\n",
        field = operation.field(),
        token_argument = operation.token_argument(),
        token = graphql_string(token),
        client_id = graphql_string(client_id),
        signature = graphql_string(signature),
    )
}

/// Quotes `value` as a GraphQL string literal.
pub fn graphql_string(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 2);
    out.push('"');
    for ch in value.chars() {
        match ch {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            ch if ch.is_control() => out.push_str(&format!("\\u{:04x}", u32::from(ch))),
            ch => out.push(ch),
        }
    }
    out.push('"');
    out
}

fn classify_send_error(error: &reqwest::Error) -> TikiError {
    // A connection that was never made cannot have delivered the request.
    if error.is_connect() || error.is_builder() {
        return TikiError::Unreachable(format!("connecting failed: {}", error_chain(error)));
    }
    if error.is_timeout() {
        return TikiError::OutcomeUnknown("the request timed out".to_owned());
    }
    TikiError::OutcomeUnknown(format!("the request failed: {}", error_chain(error)))
}

/// Renders an error and its sources. reqwest errors name the URL, which contains no
/// secret because every secret travels in the request body.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

fn parse_retry_after(value: Option<&reqwest::header::HeaderValue>) -> Option<Duration> {
    let seconds: u64 = value?.to_str().ok()?.trim().parse().ok()?;
    Some(Duration::from_secs(seconds.min(MAX_RETRY_AFTER_SECONDS)))
}

#[derive(Debug, Deserialize)]
struct GraphqlResponse {
    #[serde(default)]
    data: Option<Value>,
    #[serde(default)]
    errors: Option<Vec<GraphqlError>>,
}

#[derive(Debug, Deserialize)]
struct GraphqlError {
    #[serde(default)]
    message: Option<String>,
    #[serde(default)]
    extensions: Option<Value>,
}

fn interpret_response(
    operation: Operation,
    status: StatusCode,
    retry_after: Option<Duration>,
    body: &[u8],
    secrets: &[&str],
) -> Result<Grant, TikiError> {
    if status == StatusCode::TOO_MANY_REQUESTS {
        return Err(TikiError::RateLimited { retry_after });
    }
    if status.is_server_error() {
        return Err(TikiError::Transient {
            message: format!("Tiki returned HTTP {}", status.as_u16()),
            retry_after,
        });
    }
    if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
        return Err(TikiError::CredentialsRejected(format!(
            "Tiki returned HTTP {}",
            status.as_u16()
        )));
    }

    let parsed: GraphqlResponse = match serde_json::from_slice(body) {
        Ok(parsed) => parsed,
        Err(error) => {
            return Err(unreadable(
                status,
                format!("a body that is not a GraphQL response: {error}"),
            ));
        }
    };

    let result = parsed
        .data
        .as_ref()
        .and_then(|data| data.get(operation.field()))
        .filter(|value| !value.is_null());
    let errors = parsed.errors.unwrap_or_default();

    // A complete token set is kept even when `errors` comes with it: a refresh that
    // returned new tokens has already rotated the old refresh token out.
    if let Some(result) = result {
        match parse_grant(result) {
            Ok(grant) => {
                if !errors.is_empty() {
                    log_errors_beside_tokens(operation, &errors, &grant, secrets);
                }
                return Ok(grant);
            }
            Err(problem) if errors.is_empty() => {
                return Err(unreadable(
                    status,
                    format!("a {} result that is invalid: {problem}", operation.field()),
                ));
            }
            Err(_) => {}
        }
    }
    if errors.is_empty() {
        return Err(unreadable(
            status,
            format!("neither a {} result nor errors", operation.field()),
        ));
    }
    Err(classify_graphql_errors(&errors, secrets))
}

/// Classifies a response tokend cannot read. A 2xx status means Tiki, or a gateway in
/// front of it, accepted the request, so it may have taken effect (a refresh may have
/// rotated the token). Any other status means it was turned away.
fn unreadable(status: StatusCode, detail: String) -> TikiError {
    let message = format!("Tiki returned HTTP {} with {detail}", status.as_u16());
    if status.is_success() {
        TikiError::OutcomeUnknown(message)
    } else {
        TikiError::transient(message)
    }
}

/// Logs the errors of a response that also carried a complete token set, with the
/// request's secrets and the new tokens masked.
fn log_errors_beside_tokens(
    operation: Operation,
    errors: &[GraphqlError],
    grant: &Grant,
    secrets: &[&str],
) {
    let mut masked: Vec<&str> = secrets.to_vec();
    masked.push(grant.access_token.expose_secret());
    if let Some(refresh_token) = &grant.refresh_token {
        masked.push(refresh_token.expose_secret());
    }
    let (codes, messages) = codes_and_messages(errors);
    let summary = summarize(&codes, &messages, &masked);
    warn!(
        operation = operation.field(),
        errors = %summary,
        "Tiki returned tokens together with errors; the tokens are kept"
    );
}

/// Collects the error codes (from `extensions`) and the messages of GraphQL errors.
fn codes_and_messages(errors: &[GraphqlError]) -> (Vec<String>, Vec<String>) {
    let mut codes = Vec::new();
    let mut messages = Vec::new();
    for error in errors {
        if let Some(Value::Object(extensions)) = &error.extensions {
            for key in ["code", "reason", "error"] {
                if let Some(Value::String(code)) = extensions.get(key) {
                    codes.push(code.clone());
                }
            }
        }
        if let Some(message) = &error.message {
            messages.push(message.clone());
        }
    }
    (codes, messages)
}

fn classify_graphql_errors(errors: &[GraphqlError], secrets: &[&str]) -> TikiError {
    let (codes, messages) = codes_and_messages(errors);
    let mentions = |known: &[&str]| {
        known.iter().any(|code| {
            codes.iter().any(|found| found.eq_ignore_ascii_case(code))
                || messages
                    .iter()
                    .any(|message| message.to_ascii_lowercase().contains(code))
        })
    };
    let summary = summarize(&codes, &messages, secrets);
    if mentions(CREDENTIALS_REJECTED_CODES) {
        TikiError::CredentialsRejected(summary)
    } else if mentions(GRANT_REJECTED_CODES) {
        TikiError::GrantRejected(summary)
    } else {
        TikiError::Unrecognized(summary)
    }
}

/// Joins error codes and messages into one short line with secrets masked: the
/// request's own secrets, and any other run of characters shaped like a token or a
/// signature, such as an older refresh token that Tiki echoes back.
fn summarize(codes: &[String], messages: &[String], secrets: &[&str]) -> String {
    let mut parts: Vec<String> = codes.to_vec();
    parts.extend(messages.iter().cloned());
    let mut text = parts.join("; ");
    for secret in secrets.iter().filter(|secret| !secret.is_empty()) {
        text = text.replace(secret, "[redacted]");
    }
    let text = mask_token_shapes(&text);
    let text: String = text
        .chars()
        .map(|ch| if ch.is_control() { ' ' } else { ch })
        .take(MAX_MESSAGE_CHARS)
        .collect();
    if text.is_empty() {
        "no message".to_owned()
    } else {
        text
    }
}

/// Minimum length of a run of token characters that is masked as a possible token.
/// Tiki's tokens have 87 characters and signatures 64, while error codes and words
/// are far shorter.
const MIN_TOKEN_SHAPE_CHARS: usize = 24;

/// Replaces every run of at least [`MIN_TOKEN_SHAPE_CHARS`] characters that can make
/// up a token (ASCII letters, digits and `-_.~+/=`) with `[redacted]`.
fn mask_token_shapes(text: &str) -> String {
    let is_token_char = |ch: char| ch.is_ascii_alphanumeric() || "-_.~+/=".contains(ch);
    let mut out = String::with_capacity(text.len());
    let mut run = String::new();
    let flush = |run: &mut String, out: &mut String| {
        if run.chars().count() >= MIN_TOKEN_SHAPE_CHARS {
            out.push_str("[redacted]");
        } else {
            out.push_str(run);
        }
        run.clear();
    };
    for ch in text.chars() {
        if is_token_char(ch) {
            run.push(ch);
        } else {
            flush(&mut run, &mut out);
            out.push(ch);
        }
    }
    flush(&mut run, &mut out);
    out
}

fn parse_grant(result: &Value) -> Result<Grant, String> {
    let access_token = match result.get("access_token") {
        Some(Value::String(token)) if !token.is_empty() => token.clone(),
        _ => return Err("access_token is missing or empty".to_owned()),
    };
    let refresh_token = match result.get("refresh_token") {
        Some(Value::String(token)) if !token.is_empty() => Some(token.clone()),
        None | Some(Value::Null) | Some(Value::String(_)) => None,
        Some(_) => return Err("refresh_token is not a string".to_owned()),
    };
    let expires_in = parse_expires_in(result.get("expires_in"))?;
    let scopes = parse_scopes(result.get("scopes"))?;
    Ok(Grant {
        access_token: SecretString::from(access_token),
        refresh_token: refresh_token.map(SecretString::from),
        expires_in,
        scopes,
    })
}

/// Reads `expires_in`, which Tiki sends as a number or as a numeric string.
fn parse_expires_in(value: Option<&Value>) -> Result<u64, String> {
    let seconds = match value {
        Some(Value::Number(number)) => number.as_u64(),
        Some(Value::String(text)) => text.trim().parse::<u64>().ok(),
        _ => None,
    };
    match seconds {
        Some(seconds) if seconds > 0 => Ok(seconds.min(MAX_EXPIRES_IN_SECONDS)),
        _ => Err(format!(
            "expires_in must be a positive whole number of seconds, got {}",
            value.map_or_else(|| "nothing".to_owned(), Value::to_string)
        )),
    }
}

/// Reads `scopes` as a list of strings or one space-separated string.
fn parse_scopes(value: Option<&Value>) -> Result<Vec<String>, String> {
    match value {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::String(text)) => Ok(text.split_whitespace().map(str::to_owned).collect()),
        Some(Value::Array(items)) => items
            .iter()
            .map(|item| match item {
                Value::String(scope) => Ok(scope.clone()),
                other => Err(format!("scopes must be strings, got {other}")),
            })
            .collect(),
        Some(other) => Err(format!("scopes must be a list of strings, got {other}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret;

    fn interpret(body: &str) -> Result<Grant, TikiError> {
        interpret_response(
            Operation::Refresh,
            StatusCode::OK,
            None,
            body.as_bytes(),
            &["secret-token"],
        )
    }

    #[test]
    fn graphql_string_escapes() {
        assert_eq!(graphql_string("plain.Token-_"), "\"plain.Token-_\"");
        assert_eq!(graphql_string("a\"b\\c"), "\"a\\\"b\\\\c\"");
        assert_eq!(graphql_string("line\nbreak\ttab"), "\"line\\nbreak\\ttab\"");
        assert_eq!(graphql_string("\u{1}"), "\"\\u0001\"");
        assert_eq!(graphql_string("xin chào"), "\"xin chào\"");
    }

    #[test]
    fn query_has_inline_arguments() {
        let query = build_query(Operation::Refresh, "r\"t", "client", 42, "abcd");
        assert!(query.contains("refresh_auth_access_token(input: {"));
        assert!(query.contains("refresh_token: \"r\\\"t\""));
        assert!(query.contains("client_id: \"client\""));
        assert!(query.contains("timestamp: 42\n"));
        assert!(query.contains("signature: \"abcd\""));
    }

    #[test]
    fn success_with_numeric_expiry() {
        let grant = interpret(
            r#"{"data":{"refresh_auth_access_token":{"access_token":"a","refresh_token":"r","expires_in":3599,"scopes":["offline","user_profile"]}}}"#,
        )
        .unwrap();
        assert_eq!(grant.access_token.expose_secret(), "a");
        assert_eq!(grant.refresh_token.unwrap().expose_secret(), "r");
        assert_eq!(grant.expires_in, 3599);
        assert_eq!(grant.scopes, ["offline", "user_profile"]);
    }

    #[test]
    fn expiry_as_string_and_no_refresh_token() {
        let grant = interpret(
            r#"{"data":{"refresh_auth_access_token":{"access_token":"a","expires_in":"3600","scopes":"offline user_profile"}}}"#,
        )
        .unwrap();
        assert_eq!(grant.expires_in, 3600);
        assert!(grant.refresh_token.is_none());
        assert_eq!(grant.scopes, ["offline", "user_profile"]);
    }

    #[test]
    fn invalid_expiry_is_outcome_unknown() {
        for expires_in in ["0", "-5", "\"soon\"", "null", "1.5"] {
            let body = format!(
                r#"{{"data":{{"refresh_auth_access_token":{{"access_token":"a","expires_in":{expires_in}}}}}}}"#
            );
            let error = interpret(&body).unwrap_err();
            assert!(
                matches!(error, TikiError::OutcomeUnknown(_)),
                "{expires_in}: {error}"
            );
        }
    }

    #[test]
    fn errors_with_null_data_fail() {
        let error = interpret(
            r#"{"data":null,"errors":[{"message":"refresh token secret-token revoked","extensions":{"code":"invalid_token"}}]}"#,
        )
        .unwrap_err();
        assert!(matches!(error, TikiError::GrantRejected(_)));
        let message = error.to_string();
        assert!(!message.contains("secret-token"), "{message}");
    }

    #[test]
    fn errors_are_classified() {
        let cases = [
            (
                r#"{"message":"bad","extensions":{"code":"INVALID_SIGNATURE"}}"#,
                FailureKind::Credentials,
            ),
            (
                r#"{"message":"invalid_client: unknown client"}"#,
                FailureKind::Credentials,
            ),
            (
                r#"{"message":"timestamp","extensions":{"reason":"invalid_timestamp"}}"#,
                FailureKind::Credentials,
            ),
            (r#"{"message":"invalid_grant"}"#, FailureKind::Grant),
            (
                r#"{"message":"x","extensions":{"code":"invalid_code"}}"#,
                FailureKind::Grant,
            ),
            (
                r#"{"message":"internal server error"}"#,
                FailureKind::Unrecognized,
            ),
            (
                r#"{"message":"token expired, try later"}"#,
                FailureKind::Unrecognized,
            ),
            (r#"{}"#, FailureKind::Unrecognized),
        ];
        for (error, expected) in cases {
            let body = format!(r#"{{"data":null,"errors":[{error}]}}"#);
            let found = match interpret(&body).unwrap_err() {
                TikiError::GrantRejected(_) => FailureKind::Grant,
                TikiError::CredentialsRejected(_) => FailureKind::Credentials,
                TikiError::Unrecognized(_) => FailureKind::Unrecognized,
                TikiError::Unreachable(_)
                | TikiError::RateLimited { .. }
                | TikiError::Transient { .. }
                | TikiError::NotSent(_) => FailureKind::Transient,
                TikiError::OutcomeUnknown(_) => FailureKind::Unknown,
            };
            assert_eq!(found, expected, "{error}");
        }
    }

    #[derive(Debug, PartialEq)]
    enum FailureKind {
        Grant,
        Credentials,
        Unrecognized,
        Transient,
        Unknown,
    }

    #[test]
    fn echoed_secret_in_code_is_redacted() {
        let body =
            r#"{"data":null,"errors":[{"message":"x","extensions":{"code":"Secret-Token"}}]}"#;
        let error = interpret_response(
            Operation::Refresh,
            StatusCode::OK,
            None,
            body.as_bytes(),
            &["Secret-Token"],
        )
        .unwrap_err();
        assert!(!error.to_string().to_lowercase().contains("secret-token"));
    }

    #[test]
    fn token_shapes_are_masked() {
        let token = "Y24CwtKFz7aPXv8wmghwZpnqHhpHaeA0THJ0qIY3BXj.wm744zZ0JY6SkhRiNFVJT";
        let signature = "a68fefe3075e24204949eafa78567261498f4f805a3ed9278396b593bed75576";
        let masked = mask_token_shapes(&format!("bad token {token}, signature={signature}."));
        // `=` and `.` can be part of a token, so they are masked with it.
        assert_eq!(masked, "bad token [redacted], [redacted]");
        let plain = "invalid_token: refresh token was already rotated out";
        assert_eq!(mask_token_shapes(plain), plain);
    }

    #[test]
    fn absurd_numbers_are_capped() {
        let grant = interpret(
            r#"{"data":{"refresh_auth_access_token":{"access_token":"a","expires_in":10000000000000}}}"#,
        )
        .unwrap();
        assert_eq!(grant.expires_in, MAX_EXPIRES_IN_SECONDS);
        let header = reqwest::header::HeaderValue::from_static("18446744073709551615");
        assert_eq!(
            parse_retry_after(Some(&header)),
            Some(Duration::from_secs(MAX_RETRY_AFTER_SECONDS))
        );
    }

    #[test]
    fn tokens_with_errors_are_kept() {
        let grant = interpret(
            r#"{"data":{"refresh_auth_access_token":{"access_token":"a","refresh_token":"r","expires_in":60}},"errors":[{"message":"partial"}]}"#,
        )
        .unwrap();
        assert_eq!(grant.refresh_token.unwrap().expose_secret(), "r");
    }

    #[test]
    fn unreadable_success_is_outcome_unknown() {
        for body in [
            "",
            "<html>bad gateway</html>",
            "{}",
            r#"{"data":{}}"#,
            r#"{"errors":[]}"#,
        ] {
            let error = interpret(body).unwrap_err();
            assert!(
                matches!(error, TikiError::OutcomeUnknown(_)),
                "{body:?}: {error}"
            );
        }
    }

    #[test]
    fn unreadable_rejection_is_transient() {
        for status in [400, 404, 409] {
            let error = interpret_response(
                Operation::Refresh,
                StatusCode::from_u16(status).unwrap(),
                None,
                b"<html>not here</html>",
                &[],
            )
            .unwrap_err();
            assert!(
                matches!(error, TikiError::Transient { .. }),
                "{status}: {error}"
            );
        }
    }

    #[test]
    fn http_status_classes() {
        let status_class = |status: u16| {
            interpret_response(
                Operation::Exchange,
                StatusCode::from_u16(status).unwrap(),
                Some(Duration::from_secs(7)),
                b"{}",
                &[],
            )
            .unwrap_err()
        };
        assert!(matches!(
            status_class(429),
            TikiError::RateLimited { retry_after: Some(wait) } if wait == Duration::from_secs(7)
        ));
        assert!(matches!(status_class(502), TikiError::Transient { .. }));
        assert!(matches!(status_class(503), TikiError::Transient { .. }));
        assert!(matches!(
            status_class(401),
            TikiError::CredentialsRejected(_)
        ));
        assert!(matches!(
            status_class(403),
            TikiError::CredentialsRejected(_)
        ));
    }

    /// Any JSON value: scalars, and arrays and objects nested a few levels deep.
    fn any_json() -> impl proptest::strategy::Strategy<Value = Value> {
        use proptest::prelude::*;
        let scalar = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            any::<f64>().prop_map(Value::from),
            ".{0,12}".prop_map(Value::from),
        ];
        scalar.prop_recursive(4, 32, 6, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                proptest::collection::btree_map(
                    prop_oneof![
                        Just("access_token".to_owned()),
                        Just("refresh_token".to_owned()),
                        Just("expires_in".to_owned()),
                        Just("scopes".to_owned()),
                        Just("message".to_owned()),
                        Just("extensions".to_owned()),
                        Just("code".to_owned()),
                        ".{0,8}",
                    ],
                    inner,
                    0..6,
                )
                .prop_map(|map| Value::Object(map.into_iter().collect())),
            ]
        })
    }

    proptest::proptest! {
        #[test]
        fn any_bytes_never_panic(
            body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..256),
            status in 100u16..600,
        ) {
            let status = StatusCode::from_u16(status).unwrap();
            let _ = interpret_response(Operation::Refresh, status, None, &body, &["s"]);
            let _ = interpret_response(Operation::Exchange, status, None, &body, &[]);
        }

        #[test]
        fn any_json_shape_never_panics(result in any_json(), errors in any_json(), top in any_json()) {
            let documents = [
                serde_json::json!({ "data": { "refresh_auth_access_token": result }, "errors": errors }),
                serde_json::json!({ "data": top, "errors": [ { "message": "x", "extensions": errors } ] }),
                top,
            ];
            for document in documents {
                let body = serde_json::to_vec(&document).unwrap();
                let _ = interpret_response(Operation::Refresh, StatusCode::OK, None, &body, &["s"]);
            }
        }

        #[test]
        fn well_formed_answer_round_trips(
            access_token in ".{1,64}",
            refresh_token in proptest::option::of(".{1,64}"),
            expires_in in 1u64..=MAX_EXPIRES_IN_SECONDS,
            scopes in proptest::collection::vec(".{0,16}", 0..5),
            as_string in proptest::prelude::any::<bool>(),
        ) {
            let expires: Value = if as_string {
                Value::from(expires_in.to_string())
            } else {
                Value::from(expires_in)
            };
            let document = serde_json::json!({ "data": { "refresh_auth_access_token": {
                "access_token": access_token,
                "refresh_token": refresh_token,
                "expires_in": expires,
                "scopes": scopes,
            } } });
            let body = serde_json::to_vec(&document).unwrap();
            let grant = interpret_response(Operation::Refresh, StatusCode::OK, None, &body, &[])
                .unwrap();
            proptest::prop_assert_eq!(grant.access_token.expose_secret(), access_token.as_str());
            proptest::prop_assert_eq!(
                grant.refresh_token.as_ref().map(|token| token.expose_secret().to_owned()),
                refresh_token
            );
            proptest::prop_assert_eq!(grant.expires_in, expires_in);
            proptest::prop_assert_eq!(grant.scopes, scopes);
        }
    }
}
