//! Tiki misbehaving, through the emulator over HTTP: outages, rate limits, unreadable
//! responses, rejected credentials, partial responses, failing token sets beside healthy
//! ones, and the caps on requests to Tiki. Every test runs on SQLite and PostgreSQL.

mod support;

use std::{net::SocketAddr, time::Duration};

use support::{Backend, Options, TestEnv, millis, wait_until};
use tokend::{emulator::Fault, proto};
use tokio::{
    io::copy_bidirectional,
    net::{TcpListener, TcpStream},
    task::{JoinHandle, JoinSet},
};
use tonic::Code;

backend_tests!(
    outage_statuses_back_off_and_serve_current_token,
    refused_connection_backs_off_and_recovers,
    rate_limit_pauses_every_request,
    unreadable_answers_end_in_reauth_required,
    unrecognized_errors_stop_scheduling,
    rejected_credentials_raise_one_alarm,
    tokens_beside_errors_are_kept,
    failing_sets_do_not_starve_healthy_ones,
    request_caps_hold_under_load,
);

/// Ten-second tokens refreshed 4 to 5 s after they were issued.
fn ten_second_tokens() -> Options {
    Options {
        expires_in: 10,
        refresh_before: Duration::from_secs(5),
        ..Options::default()
    }
}

async fn status_of(env: &mut TestEnv, user_id: &str) -> proto::TokenStatus {
    env.token_set(user_id).await.status()
}

/// Waits until every token set in `user_ids` passes `check`.
async fn wait_for_all(
    env: &TestEnv,
    user_ids: &[String],
    condition: &str,
    limit: Duration,
    check: impl Fn(&proto::TokenSetInfo) -> bool,
) {
    let check = &check;
    wait_until(condition, limit, || {
        let mut client = env.client.clone();
        async move {
            for user_id in user_ids {
                let request = proto::GetTokenSetRequest {
                    user_id: user_id.clone(),
                };
                let info = client.get_token_set(request).await.unwrap().into_inner();
                if !check(&info) {
                    return false;
                }
            }
            true
        }
    })
    .await;
}

/// A loopback TCP gateway to the emulator. Closing it drops its listener and every
/// connection through it, so connecting is refused until it opens again.
struct Gateway {
    addr: SocketAddr,
    upstream: SocketAddr,
    task: Option<JoinHandle<()>>,
}

impl Gateway {
    async fn start(upstream: SocketAddr) -> Gateway {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        Gateway {
            addr,
            upstream,
            task: Some(tokio::spawn(forward(listener, upstream))),
        }
    }

    fn graphql_url(&self) -> String {
        format!("http://{}/tiniapp/api/graphql/query", self.addr)
    }

    fn close(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }

    async fn open(&mut self) {
        let listener = TcpListener::bind(self.addr).await.unwrap();
        self.task = Some(tokio::spawn(forward(listener, self.upstream)));
    }
}

/// Accepts connections and copies bytes both ways. Dropping this future drops every
/// connection it forwards.
async fn forward(listener: TcpListener, upstream: SocketAddr) {
    let mut connections = JoinSet::new();
    while let Ok((mut client, _)) = listener.accept().await {
        connections.spawn(async move {
            if let Ok(mut server) = TcpStream::connect(upstream).await {
                let _ = copy_bidirectional(&mut client, &mut server).await;
            }
        });
    }
}

/// HTTP 502 and 503, quick or slow, are transient: the token set backs off as
/// `refresh_failing`, its current token is served meanwhile, and it recovers.
async fn outage_statuses_back_off_and_serve_current_token(backend: Backend) {
    let mut env = TestEnv::start_on(&backend, ten_second_tokens()).await;
    env.exchange("alice").await;
    let original = env.access_token("alice").await.unwrap().access_token;
    env.emulator.inject(Fault::Status(502), Some(1));
    env.emulator.inject(Fault::Status(503), Some(1));
    env.emulator.inject(
        Fault::StatusAfter {
            status: 503,
            delay: Duration::from_millis(300),
        },
        Some(1),
    );

    wait_until("two faults applied", Duration::from_secs(15), || {
        let faults = env.emulator.stats().faults_injected;
        async move { faults >= 2 }
    })
    .await;
    let info = env.token_set("alice").await;
    assert_eq!(info.status(), proto::TokenStatus::RefreshFailing);
    assert!(info.failure_count >= 1);
    assert!(info.last_error.contains("HTTP 50"), "{}", info.last_error);
    let served = env.access_token("alice").await.unwrap().access_token;
    assert!(served == original, "another token was served while failing");

    wait_until("a successful refresh", Duration::from_secs(20), || {
        let refreshes = env.emulator.stats().refreshes;
        async move { refreshes >= 1 }
    })
    .await;
    let token = env.access_token("alice").await.unwrap().access_token;
    assert!(token != original);
    assert!(env.emulator.access_token_valid(&token));
    assert_eq!(env.emulator.stats().faults_injected, 3);
    assert_eq!(env.emulator.stats().reuse_detections, 0);
    assert_eq!(
        status_of(&mut env, "alice").await,
        proto::TokenStatus::Active
    );
}

/// A refused connection cannot have reached Tiki, so it is transient: the token set
/// backs off, the current token is served, and refreshing resumes when Tiki is back.
async fn refused_connection_backs_off_and_recovers(backend: Backend) {
    let mut env = TestEnv::start_on(&backend, ten_second_tokens()).await;
    let mut gateway = Gateway::start(env.emulator.addr()).await;
    env.restart_with(Options {
        tiki_graphql_url: Some(gateway.graphql_url()),
        ..ten_second_tokens()
    })
    .await;
    env.exchange("alice").await;
    let original = env.access_token("alice").await.unwrap().access_token;
    gateway.close();

    env.wait_for_token_set(
        "alice",
        "two refused attempts",
        Duration::from_secs(15),
        |info| info.failure_count >= 2,
    )
    .await;
    let info = env.token_set("alice").await;
    assert_eq!(info.status(), proto::TokenStatus::RefreshFailing);
    assert!(
        info.last_error.contains("connecting failed"),
        "{}",
        info.last_error
    );
    let served = env.access_token("alice").await.unwrap().access_token;
    assert!(served == original, "another token was served while failing");
    assert_eq!(env.emulator.stats().refresh_requests, 0);

    gateway.open().await;
    env.wait_for_token_set(
        "alice",
        "refreshed after Tiki came back",
        Duration::from_secs(20),
        |info| info.status() == proto::TokenStatus::Active && info.refreshed_at.is_some(),
    )
    .await;
    let token = env.access_token("alice").await.unwrap().access_token;
    assert!(env.emulator.access_token_valid(&token));
    assert_eq!(env.emulator.stats().reuse_detections, 0);
}

/// After a 429 with `Retry-After: 3`, no request of any token set reaches Tiki for
/// three seconds, an exchange meanwhile fails without a request, and every token set
/// is refreshed after the pause.
async fn rate_limit_pauses_every_request(backend: Backend) {
    let mut env = TestEnv::start_on(
        &backend,
        Options {
            expires_in: 12,
            refresh_before: Duration::from_secs(5),
            // One request at a time, so that none is in flight when the 429 arrives.
            tiki_max_concurrent_requests: 1,
            ..Options::default()
        },
    )
    .await;
    let user_ids = env.exchange_many("user", 10).await;
    let before = env.emulator.stats().graphql_requests as usize;
    env.emulator.inject(
        Fault::TooManyRequests {
            retry_after_seconds: 3,
        },
        Some(1),
    );
    wait_until("the 429 was sent", Duration::from_secs(15), || {
        let faults = env.emulator.stats().faults_injected;
        async move { faults >= 1 }
    })
    .await;

    // An exchange during the pause is not sent.
    let requests = env.emulator.stats().graphql_requests;
    let auth_code = env.emulator.issue_auth_code("late", &["offline"]);
    let status = env
        .client
        .exchange_auth_code(proto::ExchangeAuthCodeRequest {
            user_id: "late".to_owned(),
            auth_code,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert!(
        status.message().contains("Retry-After"),
        "{}",
        status.message()
    );
    assert_eq!(env.emulator.stats().graphql_requests, requests);

    wait_for_all(
        &env,
        &user_ids,
        "every token set refreshed",
        Duration::from_secs(20),
        |info| info.refreshed_at.is_some(),
    )
    .await;
    let arrivals = env.emulator.request_arrivals();
    let limited_at = arrivals[before];
    let next = arrivals[before + 1];
    let gap = next.duration_since(limited_at).unwrap();
    println!(
        "rate limit: next request {} ms after the 429 with Retry-After 3 s",
        gap.as_millis()
    );
    assert!(
        gap >= Duration::from_millis(2990),
        "a request reached Tiki {} ms after the 429",
        gap.as_millis()
    );
    assert_eq!(env.emulator.stats().reuse_detections, 0);
}

/// HTTP 200 with a body that is not a GraphQL response may hide a refresh that rotated
/// the token, so the refresh token is presented once more and no further: the second
/// unreadable response ends in `reauth_required` with a `last_error` that gives the reason.
async fn unreadable_answers_end_in_reauth_required(backend: Backend) {
    let mut env = TestEnv::start_on(&backend, ten_second_tokens()).await;
    env.exchange("alice").await;
    env.emulator.inject(Fault::GarbageBody, None);

    env.wait_for_token_set(
        "alice",
        "reauth_required",
        Duration::from_secs(20),
        |info| info.status() == proto::TokenStatus::ReauthRequired,
    )
    .await;
    let info = env.token_set("alice").await;
    assert!(info.last_error.contains("no answer"), "{}", info.last_error);
    assert!(
        info.last_error.contains("not a GraphQL response"),
        "{}",
        info.last_error
    );
    let faults = env.emulator.stats().faults_injected;
    assert_eq!(faults, 2, "the refresh token was presented {faults} times");

    // No further attempt follows, scheduled or on demand.
    let status = env.access_token("alice").await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(env.emulator.stats().faults_injected, 2);
}

/// GraphQL errors tokend does not recognise are retried with backoff five times, then
/// the scheduler stops; a GetAccessToken call tries once more and recovers.
async fn unrecognized_errors_stop_scheduling(backend: Backend) {
    let mut env = TestEnv::start_on(&backend, ten_second_tokens()).await;
    env.exchange("alice").await;
    env.emulator.inject(
        Fault::GraphqlError {
            code: "maintenance_window".to_owned(),
            message: "come back later".to_owned(),
        },
        None,
    );

    env.wait_for_token_set(
        "alice",
        "scheduled refreshes stopped",
        Duration::from_secs(40),
        |info| info.failure_count >= 5 && info.next_refresh_at.is_none(),
    )
    .await;
    let info = env.token_set("alice").await;
    assert_eq!(info.status(), proto::TokenStatus::RefreshFailing);
    assert!(
        info.last_error.contains("stopped after 5"),
        "{}",
        info.last_error
    );
    assert!(
        info.last_error.contains("maintenance_window"),
        "{}",
        info.last_error
    );
    assert_eq!(env.emulator.stats().faults_injected, 5);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(env.emulator.stats().faults_injected, 5);

    env.emulator.clear_faults();
    let token = env.access_token("alice").await.unwrap().access_token;
    assert!(env.emulator.access_token_valid(&token));
    let info = env.token_set("alice").await;
    assert_eq!(info.status(), proto::TokenStatus::Active);
    assert!(info.next_refresh_at.is_some());
}

/// Tiki rejecting tokend's signature raises one alarm for the whole client: no token
/// set becomes `reauth_required`, the alarm is queryable, and once the fault clears
/// every token set is refreshed and the alarm ends.
async fn rejected_credentials_raise_one_alarm(backend: Backend) {
    let mut env = TestEnv::start_on(
        &backend,
        Options {
            expires_in: 8,
            refresh_before: Duration::from_secs(4),
            tiki_credentials_retry: Duration::from_secs(2),
            ..Options::default()
        },
    )
    .await;
    let user_ids = env.exchange_many("user", 20).await;
    assert!(env.daemon().manager().credentials_alarm().is_none());
    env.emulator.inject(
        Fault::GraphqlError {
            code: "invalid_signature".to_owned(),
            message: "signature does not match the request and the client secret".to_owned(),
        },
        None,
    );

    wait_until("the alarm is raised", Duration::from_secs(15), || {
        let raised = env.daemon().manager().credentials_alarm().is_some();
        async move { raised }
    })
    .await;
    // Let the retries of several pauses run into the rejection.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let alarm = env.daemon().manager().credentials_alarm().unwrap();
    assert!(alarm.error.contains("invalid_signature"), "{}", alarm.error);
    assert!(alarm.since <= chrono::Utc::now());
    let (status, body) = env.admin_get("/healthz").await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("rejected the client credentials"), "{body}");
    for user_id in &user_ids {
        let status = status_of(&mut env, user_id).await;
        assert_ne!(status, proto::TokenStatus::ReauthRequired, "{user_id}");
    }
    let rejected = env.emulator.stats().faults_injected;
    println!("credentials alarm: {rejected} requests rejected for 20 due token sets");

    env.emulator.clear_faults();
    wait_for_all(
        &env,
        &user_ids,
        "every token set refreshed",
        Duration::from_secs(30),
        |info| info.status() == proto::TokenStatus::Active && info.refreshed_at.is_some(),
    )
    .await;
    assert!(env.daemon().manager().credentials_alarm().is_none());
    let (status, body) = env.admin_get("/healthz").await;
    assert_eq!((status, body.as_str()), (200, "ok\n"));
    for user_id in &user_ids {
        let token = env.access_token(user_id).await.unwrap().access_token;
        assert!(env.emulator.access_token_valid(&token), "{user_id}");
    }
    assert_eq!(env.emulator.stats().reuse_detections, 0);
}

/// A refresh response with new tokens and `errors` beside them counts as a success: the
/// tokens are stored and served, and the next refresh presents the new refresh token.
async fn tokens_beside_errors_are_kept(backend: Backend) {
    let mut env = TestEnv::start_on(&backend, ten_second_tokens()).await;
    env.exchange("alice").await;
    env.emulator.inject(
        Fault::TokensWithErrors {
            message: "profile service degraded".to_owned(),
        },
        Some(1),
    );
    env.wait_for_token_set(
        "alice",
        "the first refresh",
        Duration::from_secs(15),
        |info| info.refreshed_at.is_some(),
    )
    .await;
    let info = env.token_set("alice").await;
    assert_eq!(info.status(), proto::TokenStatus::Active);
    assert_eq!(env.emulator.stats().faults_injected, 1);
    let token = env.access_token("alice").await.unwrap().access_token;
    assert!(env.emulator.access_token_valid(&token));

    wait_until("a second refresh", Duration::from_secs(15), || {
        let refreshes = env.emulator.stats().refreshes;
        async move { refreshes >= 2 }
    })
    .await;
    assert_eq!(env.emulator.stats().reuse_detections, 0);
    assert_eq!(
        status_of(&mut env, "alice").await,
        proto::TokenStatus::Active
    );
}

/// Twenty token sets whose refreshes fail slowly (a gateway timing out after one
/// second) occupy the two refresh slots. Three healthy token sets that fall due later
/// are still refreshed before they expire, because claims go by `next_refresh_at` and
/// a failed set waits out its backoff.
async fn failing_sets_do_not_starve_healthy_ones(backend: Backend) {
    let mut env = TestEnv::start_on(
        &backend,
        Options {
            expires_in: 4,
            refresh_before: Duration::from_secs(15),
            refresh_concurrency: 2,
            ..Options::default()
        },
    )
    .await;
    let failing = env.exchange_many("failing", 20).await;
    for user_id in &failing {
        env.emulator.inject_for_customer(
            user_id,
            Fault::StatusAfter {
                status: 504,
                delay: Duration::from_secs(1),
            },
        );
    }
    env.emulator.set_expires_in(40);
    let healthy = env.exchange_many("healthy", 3).await;
    let mut expiry = Vec::new();
    for user_id in &healthy {
        expiry.push(millis(&env.token_set(user_id).await.expires_at));
    }

    wait_for_all(
        &env,
        &healthy,
        "the healthy token sets refreshed",
        Duration::from_secs(50),
        |info| info.refreshed_at.is_some(),
    )
    .await;
    for (user_id, expires_at) in healthy.iter().zip(expiry) {
        let refreshed_at = millis(&env.token_set(user_id).await.refreshed_at);
        println!(
            "starvation: {user_id} refreshed {} ms before its old token expired",
            expires_at - refreshed_at
        );
        assert!(
            refreshed_at < expires_at,
            "{user_id} was refreshed after its token expired"
        );
    }
    let stats = env.emulator.stats();
    println!(
        "starvation: {} failed attempts of 20 failing token sets meanwhile",
        stats.faults_injected
    );
    assert!(stats.faults_injected >= 20);
    assert_eq!(stats.refreshes_after_expiry, 0);
    assert_eq!(stats.refreshes, 3);
}

/// Sends `request` until the daemon accepts it, and returns how many times it was
/// rejected without being sent to Tiki.
async fn exchange_until_sent(
    mut client: support::Client,
    request: proto::ExchangeAuthCodeRequest,
) -> u32 {
    let mut rejected = 0;
    loop {
        match client.exchange_auth_code(request.clone()).await {
            Ok(_) => return rejected,
            Err(status) if status.message().contains("not sent") => rejected += 1,
            Err(status) => panic!("exchange failed: {}", status.message()),
        }
    }
}

/// Thirty exchanges arrive at once and their token sets fall due close together while
/// Tiki takes 800 ms per request, more load than the caps admit. The emulator records
/// no more requests in flight and per second than the caps allow, and every token set
/// is still refreshed before it expires.
async fn request_caps_hold_under_load(backend: Backend) {
    const MAX_CONCURRENT: u64 = 3;
    const PER_SECOND: u64 = 5;
    let env = TestEnv::start_on(
        &backend,
        Options {
            expires_in: 30,
            refresh_before: Duration::from_secs(12),
            tiki_max_concurrent_requests: MAX_CONCURRENT as usize,
            tiki_requests_per_second: PER_SECOND as u32,
            ..Options::default()
        },
    )
    .await;
    env.emulator
        .inject(Fault::DelayBefore(Duration::from_millis(800)), None);
    // An exchange that finds no room within http_timeout is rejected without being
    // sent, so its auth code stays valid and the caller can send it again.
    let mut exchanges = tokio::task::JoinSet::new();
    let mut user_ids = Vec::new();
    for index in 0..30 {
        let user_id = format!("user-{index}");
        let auth_code = env
            .emulator
            .issue_auth_code(&user_id, &["offline", "user_profile"]);
        let request = proto::ExchangeAuthCodeRequest {
            user_id: user_id.clone(),
            auth_code,
        };
        exchanges.spawn(exchange_until_sent(env.client.clone(), request));
        user_ids.push(user_id);
    }
    let mut resent = 0;
    while let Some(exchanged) = exchanges.join_next().await {
        resent += exchanged.unwrap();
    }
    println!("caps: {resent} exchanges were rejected unsent and sent again");

    wait_for_all(
        &env,
        &user_ids,
        "every token set refreshed",
        Duration::from_secs(60),
        |info| info.refreshed_at.is_some(),
    )
    .await;
    let stats = env.emulator.stats();
    let arrivals = env.emulator.request_arrivals();
    let busy = arrivals
        .last()
        .unwrap()
        .duration_since(arrivals[0])
        .unwrap_or_default();
    let average = (arrivals.len() - 1) as f64 / busy.as_secs_f64();
    println!(
        "caps: {} requests in {:.1} s, average {average:.2}/s, peak {} per second \
         (cap {PER_SECOND}), peak {} in flight (cap {MAX_CONCURRENT})",
        arrivals.len(),
        busy.as_secs_f64(),
        stats.peak_requests_per_second,
        stats.peak_concurrent_requests,
    );
    assert_eq!(stats.peak_concurrent_requests, MAX_CONCURRENT);
    assert!(average <= PER_SECOND as f64);
    // Starts spaced exactly 1/PER_SECOND apart put PER_SECOND + 1 of them at the two
    // ends of one second, so a millisecond of loopback jitter can show one more.
    assert!(stats.peak_requests_per_second <= PER_SECOND + 1);
    assert_eq!(stats.exchanges, 30);
    assert_eq!(stats.refreshes, 30);
    assert_eq!(stats.refreshes_after_expiry, 0);
}
