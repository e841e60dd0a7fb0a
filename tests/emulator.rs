//! Drives the Tiki emulator over real HTTP with tokend's own GraphQL client, and checks
//! the emulator's helper endpoints with plain requests.
//!
//! Assertions never print tokens: they compare and report what differs in words.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use secrecy::{ExposeSecret, SecretString};
use serde_json::{Value, json};
use tokend::emulator::{Emulator, EmulatorConfig, EmulatorStats, Fault};
use tokend::tiki::graphql::{GraphqlClient, graphql_string};
use tokend::tiki::{FailureClass, Grant, TikiError, TokenApi, signature};

const TIMEOUT: Duration = Duration::from_secs(5);

async fn start() -> Emulator {
    Emulator::start(EmulatorConfig::default()).await.unwrap()
}

fn client_with(
    emulator: &Emulator,
    client_id: &str,
    secret: &str,
    timeout: Duration,
) -> GraphqlClient {
    GraphqlClient::new(
        emulator.graphql_url(),
        client_id.to_owned(),
        SecretString::from(secret.to_owned()),
        timeout,
    )
    .unwrap()
}

fn client(emulator: &Emulator) -> GraphqlClient {
    let config = EmulatorConfig::default();
    client_with(emulator, &config.client_id, &config.client_secret, TIMEOUT)
}

fn secret(text: &str) -> SecretString {
    SecretString::from(text.to_owned())
}

fn same(a: &SecretString, b: &SecretString) -> bool {
    a.expose_secret() == b.expose_secret()
}

fn refresh_token_of(grant: &Grant) -> SecretString {
    let token = grant
        .refresh_token
        .as_ref()
        .expect("grant has no refresh token");
    secret(token.expose_secret())
}

/// Issues a code with `offline user_profile` and exchanges it.
async fn exchanged(emulator: &Emulator, api: &GraphqlClient) -> Grant {
    let code = emulator.issue_auth_code("customer-1", &["offline", "user_profile"]);
    api.exchange(&secret(&code)).await.unwrap()
}

fn unix_millis() -> i64 {
    let since_epoch = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    i64::try_from(since_epoch.as_millis()).unwrap()
}

/// Builds a signed exchange query for `code` by hand, with any timestamp.
fn exchange_query(code: &str, timestamp_ms: i64) -> String {
    let config = EmulatorConfig::default();
    let signed = signature::signed_input("code", code, &config.client_id, timestamp_ms);
    let signature = signature::sign(config.client_secret.as_bytes(), &signed);
    format!(
        "query {{ get_auth_access_token(input: {{ code: {} client_id: {} timestamp: {timestamp_ms} \
         signature: {} }}) {{ access_token refresh_token expires_in scopes }} }}",
        graphql_string(code),
        graphql_string(&config.client_id),
        graphql_string(&signature),
    )
}

/// Posts a JSON body to the GraphQL endpoint and returns the status and the parsed response.
async fn post_graphql(emulator: &Emulator, body: &Value) -> (u16, Value) {
    let response = reqwest::Client::new()
        .post(emulator.graphql_url())
        .json(body)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap())
}

fn url(emulator: &Emulator, path: &str) -> String {
    format!("http://{}{path}", emulator.addr())
}

fn error_code(response_body: &Value) -> &str {
    response_body["errors"][0]["extensions"]["code"]
        .as_str()
        .unwrap_or("none")
}

#[tokio::test]
async fn exchange_then_refresh_rotates() {
    let emulator = start().await;
    let api = client(&emulator);

    let first = exchanged(&emulator, &api).await;
    assert_eq!(first.expires_in, 3600);
    assert_eq!(first.scopes, ["offline", "user_profile"]);
    let first_refresh = refresh_token_of(&first);

    let second = api.refresh(&first_refresh).await.unwrap();
    let second_refresh = refresh_token_of(&second);
    assert!(
        !same(&second_refresh, &first_refresh),
        "refresh token not rotated"
    );
    assert!(
        !same(&second.access_token, &first.access_token),
        "access token not replaced"
    );
    assert!(api.refresh(&second_refresh).await.is_ok());

    let stats = emulator.stats();
    assert_eq!(stats.exchange_requests, 1);
    assert_eq!(stats.exchanges, 1);
    assert_eq!(stats.refresh_requests, 2);
    assert_eq!(stats.refreshes, 2);
    assert_eq!(stats.rejected_grants, 0);
    emulator.shutdown().await;
}

#[tokio::test]
async fn refresh_revokes_old_access_token() {
    let emulator = start().await;
    let api = client(&emulator);
    let first = exchanged(&emulator, &api).await;
    assert!(emulator.access_token_valid(first.access_token.expose_secret()));

    let second = api.refresh(&refresh_token_of(&first)).await.unwrap();
    assert!(!emulator.access_token_valid(first.access_token.expose_secret()));
    assert!(emulator.access_token_valid(second.access_token.expose_secret()));
    assert!(!emulator.access_token_valid("not-a-token"));
}

#[tokio::test]
async fn rotated_token_reuse_revokes_family() {
    let emulator = start().await;
    let api = client(&emulator);
    let first = exchanged(&emulator, &api).await;
    let old_refresh = refresh_token_of(&first);
    let newest = api.refresh(&old_refresh).await.unwrap();

    let error = api.refresh(&old_refresh).await.unwrap_err();
    assert_eq!(error.class(), FailureClass::GrantRejected, "{error}");
    assert!(!emulator.access_token_valid(newest.access_token.expose_secret()));
    let error = api.refresh(&refresh_token_of(&newest)).await.unwrap_err();
    assert_eq!(error.class(), FailureClass::GrantRejected, "{error}");

    let stats = emulator.stats();
    assert_eq!(stats.reuse_detections, 1);
    assert_eq!(stats.rejected_grants, 2);
    assert_eq!(stats.refreshes, 1);
}

#[tokio::test]
async fn reused_auth_code_revokes_family() {
    let emulator = start().await;
    let api = client(&emulator);
    let code = secret(&emulator.issue_auth_code("customer-1", &["offline"]));
    let grant = api.exchange(&code).await.unwrap();

    let error = api.exchange(&code).await.unwrap_err();
    assert_eq!(error.class(), FailureClass::GrantRejected, "{error}");
    assert!(!emulator.access_token_valid(grant.access_token.expose_secret()));
    let error = api.refresh(&refresh_token_of(&grant)).await.unwrap_err();
    assert_eq!(error.class(), FailureClass::GrantRejected, "{error}");

    let stats = emulator.stats();
    assert_eq!(stats.reuse_detections, 1);
    assert_eq!(stats.exchange_requests, 2);
    assert_eq!(stats.exchanges, 1);
}

#[tokio::test]
async fn unknown_code_is_grant_rejected() {
    let emulator = start().await;
    let error = client(&emulator)
        .exchange(&secret("made-up"))
        .await
        .unwrap_err();
    assert_eq!(error.class(), FailureClass::GrantRejected, "{error}");
    assert_eq!(emulator.stats().rejected_grants, 1);
    assert_eq!(emulator.stats().reuse_detections, 0);
}

#[tokio::test]
async fn wrong_secret_rejects_credentials() {
    let emulator = start().await;
    let api = client_with(&emulator, "sandbox-client", "wrong-secret", TIMEOUT);
    let code = emulator.issue_auth_code("customer-1", &["offline"]);

    let error = api.exchange(&secret(&code)).await.unwrap_err();
    assert!(
        matches!(error, TikiError::CredentialsRejected(_)),
        "{error}"
    );
    assert!(!error.to_string().contains(&code));
    let stats = emulator.stats();
    assert_eq!(stats.signature_failures, 1);
    assert_eq!(stats.exchanges, 0);

    // The code was not used up by the rejected request.
    assert!(client(&emulator).exchange(&secret(&code)).await.is_ok());
}

#[tokio::test]
async fn unknown_client_rejects_credentials() {
    let emulator = start().await;
    let api = client_with(&emulator, "other-client", "sandbox-secret", TIMEOUT);
    let code = emulator.issue_auth_code("customer-1", &["offline"]);
    let error = api.exchange(&secret(&code)).await.unwrap_err();
    assert!(
        matches!(error, TikiError::CredentialsRejected(_)),
        "{error}"
    );
    assert_eq!(emulator.stats().signature_failures, 0);
}

#[tokio::test]
async fn stale_timestamp_is_rejected() {
    let emulator = start().await;
    let code = emulator.issue_auth_code("customer-1", &["offline"]);
    let six_minutes_ago = unix_millis() - 6 * 60 * 1000;
    let body = json!({ "query": exchange_query(&code, six_minutes_ago) });

    let (status, response_body) = post_graphql(&emulator, &body).await;
    assert_eq!(status, 200);
    assert_eq!(error_code(&response_body), "invalid_timestamp");
    assert!(response_body["data"].is_null());
    assert_eq!(emulator.stats().timestamp_failures, 1);

    let body = json!({ "query": exchange_query(&code, unix_millis()) });
    let (_, response_body) = post_graphql(&emulator, &body).await;
    assert!(response_body["data"]["get_auth_access_token"]["access_token"].is_string());
}

#[tokio::test]
async fn malformed_query_is_bad_request() {
    let emulator = start().await;
    let body = json!({ "query": "{ get_auth_access_token { access_token } }" });
    let (status, response_body) = post_graphql(&emulator, &body).await;
    assert_eq!(status, 400);
    assert_eq!(error_code(&response_body), "bad_request");
    assert!(response_body["data"].is_null());
    let received = EmulatorStats {
        graphql_requests: 1,
        peak_concurrent_requests: 1,
        peak_requests_per_second: 1,
        ..EmulatorStats::default()
    };
    assert_eq!(emulator.stats(), received);

    let response = reqwest::Client::new()
        .post(emulator.graphql_url())
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.status().as_u16(),
        400,
        "missing Content-Type accepted"
    );
}

#[tokio::test]
async fn status_fault_is_transient() {
    let emulator = start().await;
    let api = client(&emulator);
    let code = secret(&emulator.issue_auth_code("customer-1", &["offline"]));
    emulator.inject(Fault::Status(503), Some(1));

    let error = api.exchange(&code).await.unwrap_err();
    assert_eq!(error.class(), FailureClass::Transient, "{error}");
    assert!(api.exchange(&code).await.is_ok(), "fault applied twice");

    let stats = emulator.stats();
    assert_eq!(stats.faults_injected, 1);
    assert_eq!(stats.exchange_requests, 1);
}

/// An unreadable HTTP 200 may hide a request that took effect.
#[tokio::test]
async fn garbage_body_leaves_outcome_unknown() {
    let emulator = start().await;
    let api = client(&emulator);
    emulator.inject(Fault::GarbageBody, Some(1));
    let error = api.exchange(&secret("code")).await.unwrap_err();
    assert_eq!(error.class(), FailureClass::OutcomeUnknown, "{error}");
}

#[tokio::test]
async fn unknown_graphql_error_is_transient() {
    let emulator = start().await;
    let api = client(&emulator);
    let fault = Fault::GraphqlError {
        code: "internal".to_owned(),
        message: "database unavailable".to_owned(),
    };
    emulator.inject(fault, Some(1));
    let error = api.exchange(&secret("code")).await.unwrap_err();
    assert_eq!(error.class(), FailureClass::Transient, "{error}");
}

#[tokio::test]
async fn graphql_error_fault_keeps_code() {
    let emulator = start().await;
    let api = client(&emulator);
    let fault = Fault::GraphqlError {
        code: "invalid_token".to_owned(),
        message: "revoked".to_owned(),
    };
    emulator.inject(fault, Some(1));
    let error = api.refresh(&secret("token")).await.unwrap_err();
    assert_eq!(error.class(), FailureClass::GrantRejected, "{error}");
    assert_eq!(emulator.stats().refresh_requests, 0);
}

#[tokio::test]
async fn rate_limit_carries_retry_after() {
    let emulator = start().await;
    let api = client(&emulator);
    let fault = Fault::TooManyRequests {
        retry_after_seconds: 42,
    };
    emulator.inject(fault, Some(1));
    let error = api.exchange(&secret("code")).await.unwrap_err();
    match error {
        TikiError::RateLimited { retry_after } => {
            assert_eq!(retry_after, Some(Duration::from_secs(42)));
        }
        other => panic!("expected a rate-limit error, got {other}"),
    }
    assert_eq!(emulator.stats().exchange_requests, 0);
}

#[tokio::test]
async fn delay_after_timeout_is_outcome_unknown() {
    let emulator = start().await;
    let grant = exchanged(&emulator, &client(&emulator)).await;
    let old_refresh = refresh_token_of(&grant);
    emulator.inject(Fault::DelayAfter(Duration::from_secs(30)), Some(1));

    let impatient = client_with(
        &emulator,
        "sandbox-client",
        "sandbox-secret",
        Duration::from_millis(300),
    );
    let error = impatient.refresh(&old_refresh).await.unwrap_err();
    assert_eq!(error.class(), FailureClass::OutcomeUnknown, "{error}");

    // The emulator rotated before it stalled, so the old token is now a reuse.
    assert_eq!(emulator.stats().refreshes, 1);
    assert!(!emulator.access_token_valid(grant.access_token.expose_secret()));
    let error = client(&emulator).refresh(&old_refresh).await.unwrap_err();
    assert_eq!(error.class(), FailureClass::GrantRejected, "{error}");
    assert_eq!(emulator.stats().reuse_detections, 1);

    let started = Instant::now();
    emulator.shutdown().await;
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "shutdown waited for the delay"
    );
}

#[tokio::test]
async fn delay_before_still_succeeds() {
    let emulator = start().await;
    let api = client(&emulator);
    let code = secret(&emulator.issue_auth_code("customer-1", &["offline"]));
    emulator.inject(Fault::DelayBefore(Duration::from_millis(200)), Some(1));

    let started = Instant::now();
    assert!(api.exchange(&code).await.is_ok());
    assert!(started.elapsed() >= Duration::from_millis(200), "no delay");
    assert_eq!(emulator.stats().faults_injected, 1);
}

#[tokio::test]
async fn faults_apply_in_order_until_cleared() {
    let emulator = start().await;
    let api = client(&emulator);
    emulator.inject(Fault::Status(500), Some(1));
    emulator.inject(Fault::GarbageBody, None);
    emulator.inject(Fault::Status(502), Some(1));

    let error = api.exchange(&secret("code")).await.unwrap_err();
    assert_eq!(error.class(), FailureClass::Transient, "{error}");
    for _ in 0..2 {
        let error = api.exchange(&secret("code")).await.unwrap_err();
        assert_eq!(error.class(), FailureClass::OutcomeUnknown, "{error}");
    }
    emulator.clear_faults();
    let error = api.exchange(&secret("code")).await.unwrap_err();
    assert_eq!(error.class(), FailureClass::GrantRejected, "{error}");
    assert_eq!(emulator.stats().faults_injected, 3);
}

#[tokio::test]
async fn expires_in_as_string_is_read() {
    let emulator = start().await;
    let api = client(&emulator);
    emulator.set_expires_in(120);
    emulator.set_expires_in_as_string(true);
    let grant = exchanged(&emulator, &api).await;
    assert_eq!(grant.expires_in, 120);

    let code = emulator.issue_auth_code("customer-1", &["offline"]);
    let body = json!({ "query": exchange_query(&code, unix_millis()) });
    let (_, response_body) = post_graphql(&emulator, &body).await;
    assert_eq!(
        response_body["data"]["get_auth_access_token"]["expires_in"],
        "120"
    );
}

#[tokio::test]
async fn omitted_refresh_token_stays_valid() {
    let emulator = start().await;
    let api = client(&emulator);
    let first = exchanged(&emulator, &api).await;
    let refresh_token = refresh_token_of(&first);

    emulator.set_omit_refresh_token(true);
    let second = api.refresh(&refresh_token).await.unwrap();
    assert!(second.refresh_token.is_none(), "refresh token was sent");
    assert!(!emulator.access_token_valid(first.access_token.expose_secret()));

    emulator.set_omit_refresh_token(false);
    let third = api.refresh(&refresh_token).await.unwrap();
    assert!(third.refresh_token.is_some());
    assert_eq!(emulator.stats().reuse_detections, 0);
}

#[tokio::test]
async fn no_offline_scope_means_no_refresh_token() {
    let emulator = start().await;
    let code = emulator.issue_auth_code("customer-1", &["user_profile"]);
    let grant = client(&emulator).exchange(&secret(&code)).await.unwrap();
    assert!(grant.refresh_token.is_none(), "refresh token was issued");
    assert_eq!(grant.scopes, ["user_profile"]);
}

#[tokio::test]
async fn revoked_customer_loses_tokens() {
    let emulator = start().await;
    let api = client(&emulator);
    let grant = exchanged(&emulator, &api).await;
    emulator.revoke_customer("customer-1");
    assert!(!emulator.access_token_valid(grant.access_token.expose_secret()));
    let error = api.refresh(&refresh_token_of(&grant)).await.unwrap_err();
    assert_eq!(error.class(), FailureClass::GrantRejected, "{error}");
    assert_eq!(emulator.stats().reuse_detections, 0);
}

#[tokio::test]
async fn refresh_after_expiry_is_counted() {
    let emulator = start().await;
    let api = client(&emulator);
    emulator.set_expires_in(1);
    let grant = exchanged(&emulator, &api).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert!(!emulator.access_token_valid(grant.access_token.expose_secret()));

    api.refresh(&refresh_token_of(&grant)).await.unwrap();
    assert_eq!(emulator.stats().refreshes_after_expiry, 1);
}

#[tokio::test]
async fn auth_code_endpoint_issues_codes() {
    let emulator = start().await;
    let http = reqwest::Client::new();
    let response = http
        .post(url(&emulator, "/emulator/auth-codes"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    let text = response.text().await.unwrap();
    let code = text.strip_suffix('\n').expect("no trailing newline");
    let grant = client(&emulator).exchange(&secret(code)).await.unwrap();
    assert_eq!(grant.scopes, ["offline", "user_profile"]);

    let body = json!({ "customer_id": "customer-9", "scopes": ["user_profile"] });
    let response = http
        .post(url(&emulator, "/emulator/auth-codes"))
        .json(&body)
        .send()
        .await
        .unwrap();
    let code = response.text().await.unwrap();
    let grant = client(&emulator)
        .exchange(&secret(code.trim_end()))
        .await
        .unwrap();
    assert_eq!(grant.scopes, ["user_profile"]);

    let bad = json!({ "customer": "x" });
    let response = http
        .post(url(&emulator, "/emulator/auth-codes"))
        .json(&bad)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 400);
}

#[tokio::test]
async fn stats_endpoint_matches_stats() {
    let emulator = start().await;
    exchanged(&emulator, &client(&emulator)).await;
    let stats: Value = reqwest::get(url(&emulator, "/emulator/stats"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(stats, serde_json::to_value(emulator.stats()).unwrap());
    assert_eq!(stats["exchanges"], 1);
}

#[tokio::test]
async fn profile_checks_access_token() {
    let emulator = start().await;
    let api = client(&emulator);
    let grant = exchanged(&emulator, &api).await;
    let http = reqwest::Client::new();
    let profile = url(&emulator, "/ecom/v1/customers/profile");
    let fetch = |token: String| http.get(&profile).bearer_auth(token).send();

    let response = fetch(grant.access_token.expose_secret().to_owned())
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["data"]["id"], "customer-1");
    assert!(body["data"]["name"].is_string());

    api.refresh(&refresh_token_of(&grant)).await.unwrap();
    let response = fetch(grant.access_token.expose_secret().to_owned())
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 401);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["reason"], "invalid_token");

    let response = http.get(&profile).send().await.unwrap();
    assert_eq!(response.status().as_u16(), 401);

    let code = emulator.issue_auth_code("customer-2", &["offline"]);
    let narrow = api.exchange(&secret(&code)).await.unwrap();
    let response = fetch(narrow.access_token.expose_secret().to_owned())
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 403);
}

#[tokio::test]
async fn shutdown_closes_port() {
    let emulator = start().await;
    let addr = emulator.addr();
    exchanged(&emulator, &client(&emulator)).await;
    emulator.shutdown().await;
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}

#[tokio::test]
async fn debug_output_hides_secret() {
    let emulator = start().await;
    let text = format!("{emulator:?}");
    assert!(text.contains("sandbox-client"));
    assert!(!text.contains("sandbox-secret"));
}
