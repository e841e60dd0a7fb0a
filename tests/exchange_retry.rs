//! Retried ExchangeAuthCode calls on both backends. A retry with the same code gets the
//! stored token set without a second request to Tiki, and a retry for another user is
//! rejected. A retry after the window reaches Tiki, and concurrent calls with one code
//! send it once.

mod support;

use std::time::Duration;

use support::{Backend, Client, Options, TestEnv};
use tokend::{emulator::Fault, proto};
use tonic::Code;

const SCOPES: [&str; 2] = ["offline", "user_profile"];

async fn exchange(
    client: &mut Client,
    user_id: &str,
    auth_code: &str,
) -> Result<proto::TokenSetInfo, tonic::Status> {
    client
        .exchange_auth_code(proto::ExchangeAuthCodeRequest {
            user_id: user_id.to_owned(),
            auth_code: auth_code.to_owned(),
        })
        .await
        .map(tonic::Response::into_inner)
}

async fn retry_returns_stored_token_set(backend: Backend) {
    let mut env = TestEnv::start_on(&backend, Options::default()).await;
    let code = env.emulator.issue_auth_code("alice", &SCOPES);
    let first = exchange(&mut env.client, "alice", &code).await.unwrap();
    let retry = exchange(&mut env.client, "alice", &code).await.unwrap();

    assert_eq!(retry, first);
    assert_eq!(env.emulator.stats().exchange_requests, 1);
    assert!(env.access_token("alice").await.is_ok());
}

async fn retry_for_other_user_is_rejected(backend: Backend) {
    let mut env = TestEnv::start_on(&backend, Options::default()).await;
    let code = env.emulator.issue_auth_code("alice", &SCOPES);
    exchange(&mut env.client, "alice", &code).await.unwrap();

    let status = exchange(&mut env.client, "bob", &code).await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(status.message().contains("different user_id"), "{status:?}");
    assert!(
        !status.message().contains(&code),
        "the message shows the code"
    );
    assert_eq!(env.emulator.stats().exchange_requests, 1);
    let status = env.access_token("bob").await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
}

async fn retry_after_window_reaches_tiki(backend: Backend) {
    let options = Options {
        exchange_retry_window: Duration::from_secs(1),
        ..Options::default()
    };
    let mut env = TestEnv::start_on(&backend, options).await;
    let code = env.emulator.issue_auth_code("alice", &SCOPES);
    exchange(&mut env.client, "alice", &code).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let status = exchange(&mut env.client, "alice", &code).await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(status.message().contains("Tiki rejected"), "{status:?}");
    let stats = env.emulator.stats();
    assert_eq!(stats.exchange_requests, 2);
    assert_eq!(stats.reuse_detections, 1);
}

/// Two calls with one code while Tiki is slow: the second waits for the first and
/// returns its token set, so Tiki receives one request.
async fn concurrent_calls_send_code_once(backend: Backend) {
    let env = TestEnv::start_on(&backend, Options::default()).await;
    let code = env.emulator.issue_auth_code("alice", &SCOPES);
    env.emulator
        .inject(Fault::DelayBefore(Duration::from_millis(500)), Some(1));

    let calls = ["alice", "alice"].map(|user_id| {
        let mut client = env.client.clone();
        let code = code.clone();
        tokio::spawn(async move { exchange(&mut client, user_id, &code).await })
    });
    let [first, second] = calls;
    let first = first.await.unwrap().unwrap();
    let second = second.await.unwrap().unwrap();

    assert_eq!(first, second);
    assert_eq!(env.emulator.stats().exchange_requests, 1);
}

/// Two calls with one code for different users while Tiki is slow: one gets the token
/// set, the other is rejected, and Tiki receives one request.
async fn concurrent_users_send_code_once(backend: Backend) {
    let env = TestEnv::start_on(&backend, Options::default()).await;
    let code = env.emulator.issue_auth_code("alice", &SCOPES);
    env.emulator
        .inject(Fault::DelayBefore(Duration::from_millis(500)), Some(1));

    let calls = ["alice", "mallory"].map(|user_id| {
        let mut client = env.client.clone();
        let code = code.clone();
        tokio::spawn(async move { exchange(&mut client, user_id, &code).await })
    });
    let mut results = Vec::new();
    for call in calls {
        results.push(call.await.unwrap());
    }

    let succeeded = results.iter().filter(|result| result.is_ok()).count();
    assert_eq!(succeeded, 1, "{results:?}");
    let rejected = results
        .iter()
        .find_map(|result| result.as_ref().err())
        .unwrap();
    assert_eq!(rejected.code(), Code::FailedPrecondition, "{rejected:?}");
    assert_eq!(env.emulator.stats().exchange_requests, 1);
}

backend_tests!(
    retry_returns_stored_token_set,
    retry_for_other_user_is_rejected,
    retry_after_window_reaches_tiki,
    concurrent_calls_send_code_once,
    concurrent_users_send_code_once,
);
