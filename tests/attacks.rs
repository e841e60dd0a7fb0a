//! Attacks on tokend: failure paths of Tiki, cancelled callers, storage failures, two
//! daemons on one file, odd input. Each test states the behaviour it expects.
//! Assertions never print a token; they compare tokens and print only booleans.

mod support;

use std::{path::Path, time::Duration};

use secrecy::SecretString;
use sqlx::{Row, sqlite::SqlitePoolOptions};
use support::{
    Options, TestEnv, millis, now_millis, on_demand_window, sleep_into_on_demand_window, wait_until,
};
use tokend::{
    emulator::{Emulator, EmulatorConfig, Fault},
    proto,
    server::Daemon,
    settings::Settings,
};
use tonic::Code;

fn get_request(user_id: &str, min_valid_seconds: u32) -> proto::GetAccessTokenRequest {
    proto::GetAccessTokenRequest {
        user_id: user_id.to_owned(),
        min_valid_seconds,
    }
}

async fn status_of(env: &mut TestEnv, user_id: &str) -> proto::TokenStatus {
    env.token_set(user_id).await.status()
}

/// Opens a second connection pool on the daemon's SQLite file, as another process would.
async fn open_database(path: &Path) -> sqlx::SqlitePool {
    SqlitePoolOptions::new()
        .max_connections(1)
        .connect(&format!("sqlite://{}", path.display()))
        .await
        .unwrap()
}

async fn stored_refresh_token(path: &Path, user_id: &str) -> String {
    let pool = open_database(path).await;
    let row = sqlx::query("SELECT refresh_token FROM token_sets WHERE user_id = ?1")
        .bind(user_id)
        .fetch_one(&pool)
        .await
        .unwrap();
    let token: String = row.try_get("refresh_token").unwrap();
    pool.close().await;
    token
}

fn daemon_settings(emulator: &Emulator, database: &Path) -> Settings {
    Settings {
        client_id: "sandbox-client".to_owned(),
        client_secret: SecretString::from("sandbox-secret"),
        tiki_graphql_url: emulator.graphql_url(),
        database_url: format!("sqlite://{}", database.display()),
        grpc_addr: "127.0.0.1:0".parse().unwrap(),
        admin_addr: "127.0.0.1:0".parse().unwrap(),
        max_tick_age: Duration::from_secs(60),
        refresh_before: Duration::from_secs(1),
        http_timeout: Duration::from_secs(5),
        refresh_concurrency: 16,
        cache_capacity: 1000,
        shutdown_grace: Duration::from_secs(10),
        refresh_lease: Duration::from_secs(15),
        replica_id: "attacks".to_owned(),
        access: Default::default(),
    }
}

// ---------------------------------------------------------------------------------
// Outcome unknown and cancelled refreshes
// ---------------------------------------------------------------------------------

/// A caller whose gRPC deadline passes while its on-demand refresh waits for Tiki
/// cannot stop that refresh: it runs to its end and commits the rotated tokens, so no
/// rotated-out refresh token is presented later.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn caller_deadline_during_refresh_keeps_the_grant() {
    let mut env = TestEnv::start(on_demand_window()).await;
    let info = env.exchange("alice").await;
    sleep_into_on_demand_window(&info.expires_at).await;

    env.emulator
        .inject(Fault::DelayAfter(Duration::from_secs(2)), Some(1));
    let mut request = tonic::Request::new(get_request("alice", 0));
    request.set_timeout(Duration::from_millis(300));
    let cancelled = env.client.get_access_token(request).await;
    assert!(cancelled.is_err(), "the call should hit its deadline");

    // Tiki processed the refresh and rotated the refresh token.
    wait_until(
        "Tiki issued the refreshed tokens",
        Duration::from_secs(5),
        || {
            let refreshes = env.emulator.stats().refreshes;
            async move { refreshes >= 1 }
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;

    let served = env.access_token("alice").await;
    let stats = env.emulator.stats();
    let status = status_of(&mut env, "alice").await;
    assert_eq!(
        stats.reuse_detections,
        0,
        "tokend presented a rotated-out refresh token; status now {status:?}, \
         GetAccessToken returned {:?}",
        served
            .as_ref()
            .map(|_| "a token")
            .map_err(|status| status.code())
    );
    let token = served.unwrap().access_token;
    assert!(
        env.emulator.access_token_valid(&token),
        "served token is invalid"
    );
}

/// A refresh that times out after Tiki rotated the token (DelayAfter longer than
/// http_timeout) is presented exactly once more, which Tiki treats as reuse, and the
/// token set ends in reauth_required. This is what the README promises.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unknown_outcome_presents_the_refresh_token_once_more() {
    let mut env = TestEnv::start(Options {
        http_timeout: Duration::from_secs(1),
        ..on_demand_window()
    })
    .await;
    let info = env.exchange("alice").await;
    sleep_into_on_demand_window(&info.expires_at).await;
    env.emulator
        .inject(Fault::DelayAfter(Duration::from_secs(3)), Some(1));
    let _ = env.access_token("alice").await;

    wait_until("reauth_required", Duration::from_secs(15), || {
        let mut client = env.client.clone();
        async move {
            let info = client
                .get_token_set(proto::GetTokenSetRequest {
                    user_id: "alice".to_owned(),
                })
                .await
                .unwrap()
                .into_inner();
            info.status() == proto::TokenStatus::ReauthRequired
        }
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let stats = env.emulator.stats();
    assert_eq!(
        stats.refresh_requests, 2,
        "the token was presented more than twice"
    );
    assert!(stats.reuse_detections <= 1);
    let status = env.access_token("alice").await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
}

/// Once a refresh timed out, its outcome is unknown and Tiki may have revoked the old
/// access token, so GetAccessToken does not serve it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn token_served_after_unknown_outcome_is_valid() {
    let mut env = TestEnv::start(Options {
        http_timeout: Duration::from_secs(1),
        ..on_demand_window()
    })
    .await;
    let info = env.exchange("alice").await;
    sleep_into_on_demand_window(&info.expires_at).await;
    env.emulator
        .inject(Fault::DelayAfter(Duration::from_secs(3)), Some(1));
    match env.access_token("alice").await {
        Ok(token) => assert!(
            env.emulator.access_token_valid(&token.access_token),
            "GetAccessToken returned OK with an access token Tiki has revoked"
        ),
        Err(status) => assert_eq!(status.code(), Code::Unavailable),
    }
}

// ---------------------------------------------------------------------------------
// Malformed or hostile responses from Tiki
// ---------------------------------------------------------------------------------

/// A 429 with an absurd Retry-After is capped: the failure is recorded with a bounded
/// wait, and the scheduler keeps refreshing other users meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn huge_retry_after_does_not_stop_scheduled_refreshes() {
    let mut env = TestEnv::start(Options {
        expires_in: 4,
        ..Options::default()
    })
    .await;
    env.exchange("alice").await;
    env.emulator.inject(
        Fault::TooManyRequests {
            retry_after_seconds: u64::MAX,
        },
        Some(1),
    );
    wait_until("the scheduler hit the 429", Duration::from_secs(8), || {
        let faults = env.emulator.stats().faults_injected;
        async move { faults >= 1 }
    })
    .await;
    wait_until("the 429 is recorded", Duration::from_secs(5), || {
        let mut client = env.client.clone();
        async move {
            let info = client
                .get_token_set(proto::GetTokenSetRequest {
                    user_id: "alice".to_owned(),
                })
                .await
                .unwrap()
                .into_inner();
            info.failure_count >= 1
        }
    })
    .await;
    let info = env.token_set("alice").await;
    assert_eq!(info.status(), proto::TokenStatus::RefreshFailing);
    let wait_s = (millis(&info.next_refresh_at) - now_millis()) / 1000;
    assert!(wait_s <= 300, "next attempt in {wait_s} s");

    // The scheduler is alive: another user's token set keeps being refreshed.
    let refreshes = env.emulator.stats().refreshes;
    env.exchange("bob").await;
    wait_until("bob refreshed", Duration::from_secs(8), || {
        let now = env.emulator.stats().refreshes;
        async move { now > refreshes }
    })
    .await;
}

/// An absurd Retry-After on the on-demand path ends in a status, not a broken stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn huge_retry_after_on_demand_returns_a_status() {
    let mut env = TestEnv::start(on_demand_window()).await;
    let info = env.exchange("alice").await;
    sleep_into_on_demand_window(&info.expires_at).await;
    env.emulator.inject(
        Fault::TooManyRequests {
            retry_after_seconds: u64::MAX,
        },
        Some(1),
    );
    match env.access_token("alice").await {
        Ok(_) => {}
        Err(status) => assert_eq!(
            status.code(),
            Code::Unavailable,
            "message: {}",
            status.message()
        ),
    }
}

/// A ten-year Retry-After is capped at five minutes, so a healthy Tiki is asked again
/// long before the user would otherwise be without a token for years.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn long_retry_after_is_capped() {
    let mut env = TestEnv::start(on_demand_window()).await;
    let info = env.exchange("alice").await;
    sleep_into_on_demand_window(&info.expires_at).await;
    env.emulator.inject(
        Fault::TooManyRequests {
            retry_after_seconds: 10 * 365 * 24 * 3600,
        },
        Some(1),
    );
    let _ = env.access_token("alice").await;
    let info = env.token_set("alice").await;
    assert_eq!(info.status(), proto::TokenStatus::RefreshFailing);
    let wait_s = (millis(&info.next_refresh_at) - now_millis()) / 1000;
    assert!(wait_s <= 300, "next attempt in {wait_s} s");
    assert!(
        wait_s >= 200,
        "the Retry-After was ignored: next attempt in {wait_s} s"
    );
}

/// An `expires_in` beyond chrono's range is capped when it arrives, so the rotated
/// tokens of the refresh are committed and no reuse detection follows.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn huge_expires_in_does_not_lose_the_grant() {
    let mut env = TestEnv::start(on_demand_window()).await;
    let info = env.exchange("alice").await;
    sleep_into_on_demand_window(&info.expires_at).await;
    env.emulator.set_expires_in(10_000_000_000_000);
    let first = env.access_token("alice").await;
    env.emulator.set_expires_in(6);
    tokio::time::sleep(Duration::from_secs(4)).await;
    let second = env.access_token("alice").await;
    let stats = env.emulator.stats();
    assert_eq!(
        stats.reuse_detections,
        0,
        "first call: {:?}; second call: {:?}",
        first.map(|_| "a token").map_err(|status| status.code()),
        second.map(|_| "a token").map_err(|status| status.code())
    );
}

/// An exchange whose response carries an absurd `expires_in` ends in a status.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_expires_in_on_exchange_returns_a_status() {
    let mut env = TestEnv::start(Options::default()).await;
    env.emulator.set_expires_in(10_000_000_000_000);
    let auth_code = env.emulator.issue_auth_code("bob", &["offline"]);
    let result = env
        .client
        .exchange_auth_code(proto::ExchangeAuthCodeRequest {
            user_id: "bob".to_owned(),
            auth_code,
        })
        .await;
    if let Err(status) = result {
        assert!(
            matches!(
                status.code(),
                Code::Unavailable | Code::FailedPrecondition | Code::Internal
            ),
            "code {:?}, message {}",
            status.code(),
            status.message()
        );
    }
}

/// An `expires_in` that would put the expiry past year 9999 is capped, so the stored
/// row stays readable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_past_year_9999_keeps_the_row_readable() {
    let mut env = TestEnv::start(Options::default()).await;
    env.emulator.set_expires_in(300_000_000_000);
    let auth_code = env.emulator.issue_auth_code("bob", &["offline"]);
    let exchanged = env
        .client
        .exchange_auth_code(proto::ExchangeAuthCodeRequest {
            user_id: "bob".to_owned(),
            auth_code,
        })
        .await;
    let read = env
        .client
        .get_token_set(proto::GetTokenSetRequest {
            user_id: "bob".to_owned(),
        })
        .await;
    // Either the exchange failed and left nothing behind, or it stored a readable row.
    let consistent = match (&exchanged, &read) {
        (Ok(_), Ok(_)) => true,
        (Err(_), Err(status)) => status.code() == Code::NotFound,
        _ => false,
    };
    assert!(
        consistent,
        "exchange: {:?}; reading the row back: {:?}",
        exchanged.map(|_| ()).map_err(|status| status.code()),
        read.map(|_| ())
            .map_err(|status| (status.code(), status.message().to_owned()))
    );
}

/// Garbage bodies, 500s, 429s and unknown GraphQL codes on the exchange give
/// UNAVAILABLE and leave no token set behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exchange_failures_map_to_unavailable() {
    let mut env = TestEnv::start(Options::default()).await;
    let faults = [
        Fault::GarbageBody,
        Fault::Status(500),
        Fault::Status(502),
        Fault::TooManyRequests {
            retry_after_seconds: 3,
        },
        Fault::GraphqlError {
            code: "weird_new_code".to_owned(),
            message: "something odd".to_owned(),
        },
    ];
    for (index, fault) in faults.into_iter().enumerate() {
        let user_id = format!("user-{index}");
        env.emulator.inject(fault.clone(), Some(1));
        let auth_code = env.emulator.issue_auth_code(&user_id, &["offline"]);
        let status = env
            .client
            .exchange_auth_code(proto::ExchangeAuthCodeRequest {
                user_id: user_id.clone(),
                auth_code,
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Unavailable, "{fault:?}");
        let missing = env
            .client
            .get_token_set(proto::GetTokenSetRequest { user_id })
            .await
            .unwrap_err();
        assert_eq!(missing.code(), Code::NotFound, "{fault:?}");
    }
    assert_eq!(env.emulator.stats().exchanges, 0);
}

/// Transient refresh failures keep the current token served, back off, and recover
/// without any reuse detection.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn refresh_failures_are_transient_and_recover() {
    let mut env = TestEnv::start(Options {
        expires_in: 8,
        ..Options::default()
    })
    .await;
    env.exchange("alice").await;
    let original = env.access_token("alice").await.unwrap().access_token;
    env.emulator.inject(Fault::GarbageBody, Some(1));
    env.emulator.inject(Fault::Status(500), Some(1));
    env.emulator.inject(
        Fault::GraphqlError {
            code: "INTERNAL".to_owned(),
            message: "try later".to_owned(),
        },
        Some(1),
    );
    env.emulator.inject(
        Fault::TooManyRequests {
            retry_after_seconds: 1,
        },
        Some(1),
    );
    wait_until("four faults applied", Duration::from_secs(20), || {
        let faults = env.emulator.stats().faults_injected;
        async move { faults >= 4 }
    })
    .await;
    wait_until("a successful refresh", Duration::from_secs(20), || {
        let refreshes = env.emulator.stats().refreshes;
        async move { refreshes >= 1 }
    })
    .await;
    let token = env.access_token("alice").await.unwrap().access_token;
    assert!(token != original);
    assert!(env.emulator.access_token_valid(&token));
    assert_eq!(env.emulator.stats().reuse_detections, 0);
    assert_eq!(
        status_of(&mut env, "alice").await,
        proto::TokenStatus::Active
    );
}

/// After Tiki rejected tokend's credentials, GetAccessToken calls do not each send a
/// refresh to Tiki: requests pause until the credentials retry time.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn credentials_pause_limits_tiki_calls() {
    let mut env = TestEnv::start(on_demand_window()).await;
    let info = env.exchange("alice").await;
    sleep_into_on_demand_window(&info.expires_at).await;
    env.emulator.inject(
        Fault::GraphqlError {
            code: "invalid_signature".to_owned(),
            message: "signature mismatch".to_owned(),
        },
        None,
    );
    for _ in 0..20 {
        let _ = env.access_token("alice").await;
    }
    let attempts = env.emulator.stats().faults_injected;
    assert!(attempts <= 2, "20 calls sent {attempts} refreshes to Tiki");
}

/// A GraphQL error code that echoes the refresh token is redacted before anything
/// lowercases it, so no form of the token reaches `last_error`, GetTokenSet or a log.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn echoed_token_in_error_code_is_redacted() {
    let mut env = TestEnv::start(on_demand_window()).await;
    let info = env.exchange("alice").await;
    let refresh_token = stored_refresh_token(&env.sqlite_path(), "alice").await;
    sleep_into_on_demand_window(&info.expires_at).await;
    env.emulator.inject(
        Fault::GraphqlError {
            code: refresh_token.clone(),
            message: format!("bad token {refresh_token}"),
        },
        Some(1),
    );
    let _ = env.access_token("alice").await;
    let info = env.token_set("alice").await;
    let leaked = info
        .last_error
        .to_lowercase()
        .contains(&refresh_token.to_lowercase());
    assert!(
        !leaked,
        "last_error contains the refresh token in some case"
    );
}

// ---------------------------------------------------------------------------------
// Storage
// ---------------------------------------------------------------------------------

/// When committing a refresh fails (a disk error, a lock held past the busy timeout),
/// the rotated tokens stay in memory and only the write is retried, so the rotated-out
/// refresh token is never presented. A trigger that aborts updates plays the
/// failing disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn failed_commit_keeps_rotated_tokens() {
    let mut env = TestEnv::start(on_demand_window()).await;
    let info = env.exchange("alice").await;
    sleep_into_on_demand_window(&info.expires_at).await;

    let pool = open_database(&env.sqlite_path()).await;
    sqlx::query(
        "CREATE TRIGGER attack_fail_updates BEFORE UPDATE ON token_sets \
         BEGIN SELECT RAISE(ABORT, 'simulated disk failure'); END",
    )
    .execute(&pool)
    .await
    .unwrap();
    let during = env.access_token("alice").await;
    sqlx::query("DROP TRIGGER attack_fail_updates")
        .execute(&pool)
        .await
        .unwrap();
    pool.close().await;

    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = env.access_token("alice").await;
    let stats = env.emulator.stats();
    assert_eq!(
        stats.reuse_detections,
        0,
        "during the failure: {:?}; after: {:?}",
        during.map(|_| "a token").map_err(|status| status.code()),
        after.map(|_| "a token").map_err(|status| status.code())
    );
}

/// A writer holding the SQLite write lock for 4 s only delays the commit of a refresh:
/// the busy timeout covers it and nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn short_exclusive_lock_only_delays_the_commit() {
    let mut env = TestEnv::start(on_demand_window()).await;
    let info = env.exchange("alice").await;
    sleep_into_on_demand_window(&info.expires_at).await;

    let pool = open_database(&env.sqlite_path()).await;
    let mut connection = pool.acquire().await.unwrap();
    sqlx::query("BEGIN EXCLUSIVE")
        .execute(&mut *connection)
        .await
        .unwrap();
    let mut client = env.client.clone();
    let call = tokio::spawn(async move { client.get_access_token(get_request("alice", 0)).await });
    tokio::time::sleep(Duration::from_secs(4)).await;
    sqlx::query("COMMIT")
        .execute(&mut *connection)
        .await
        .unwrap();
    drop(connection);
    pool.close().await;

    let token = call.await.unwrap().unwrap().into_inner().access_token;
    assert!(env.emulator.access_token_valid(&token));
    assert_eq!(env.emulator.stats().reuse_detections, 0);
}

/// A second daemon on the same SQLite file, as in a rolling deploy where old and new
/// instances overlap, refuses to start: SQLite cannot tell it which tokens the first
/// one refreshed, so its cache would serve revoked tokens.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn second_daemon_on_one_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let database = dir.path().join("tokend.db");
    let emulator = Emulator::start(EmulatorConfig::default()).await.unwrap();
    let settings = daemon_settings(&emulator, &database);
    let first = Daemon::start(&settings).await.unwrap();

    let error = Daemon::start(&settings).await.unwrap_err();
    let message = format!("{error:#}");
    assert!(message.contains("another tokend process"), "{message}");

    // Once the first stops, the file is free again.
    first.shutdown().await.unwrap();
    let again = Daemon::start(&settings).await.unwrap();
    again.shutdown().await.unwrap();
}

// ---------------------------------------------------------------------------------
// Concurrency
// ---------------------------------------------------------------------------------

/// Many concurrent GetAccessToken calls with `min_valid_seconds = u32::MAX` cause one
/// refresh, and every caller gets the same valid token.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_max_min_valid_cause_one_refresh() {
    let mut env = TestEnv::start(on_demand_window()).await;
    let info = env.exchange("alice").await;
    sleep_into_on_demand_window(&info.expires_at).await;
    let before = env.emulator.stats().refresh_requests;
    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..200 {
        let mut client = env.client.clone();
        calls.spawn(async move {
            client
                .get_access_token(get_request("alice", u32::MAX))
                .await
                .map(|response| response.into_inner().access_token)
        });
    }
    let mut tokens = Vec::new();
    while let Some(result) = calls.join_next().await {
        tokens.push(result.unwrap().unwrap());
    }
    assert_eq!(env.emulator.stats().refresh_requests - before, 1);
    assert!(tokens.iter().all(|token| *token == tokens[0]));
    assert!(env.emulator.access_token_valid(&tokens[0]));
    let _ = env.access_token("alice").await;
}

/// A storm of Exchange, Delete, GetAccessToken and GetTokenSet calls on three users
/// with short-lived tokens never presents a rotated-out refresh token, and every user
/// left with a token set gets a valid token at the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mixed_operation_storm_causes_no_reuse() {
    let mut env = TestEnv::start(Options {
        expires_in: 4,
        ..Options::default()
    })
    .await;
    let users = ["u0", "u1", "u2"];
    for user in users {
        env.exchange(user).await;
    }
    let mut calls = tokio::task::JoinSet::new();
    for index in 0..300u32 {
        let user = users[(index % 3) as usize].to_owned();
        let mut client = env.client.clone();
        let auth_code = env.emulator.issue_auth_code(&user, &["offline"]);
        calls.spawn(async move {
            tokio::time::sleep(Duration::from_millis(u64::from(index) * 25)).await;
            match index % 7 {
                0 => client
                    .exchange_auth_code(proto::ExchangeAuthCodeRequest {
                        user_id: user,
                        auth_code,
                    })
                    .await
                    .map(|_| ()),
                1 => client
                    .delete_token_set(proto::DeleteTokenSetRequest { user_id: user })
                    .await
                    .map(|_| ()),
                2 => client
                    .get_token_set(proto::GetTokenSetRequest { user_id: user })
                    .await
                    .map(|_| ()),
                _ => client
                    .get_access_token(get_request(&user, u32::MAX))
                    .await
                    .map(|_| ()),
            }
        });
    }
    let mut unexpected = Vec::new();
    while let Some(result) = calls.join_next().await {
        if let Err(status) = result.unwrap()
            && status.code() != Code::NotFound
        {
            unexpected.push((status.code(), status.message().to_owned()));
        }
    }
    assert!(unexpected.is_empty(), "unexpected errors: {unexpected:?}");
    assert_eq!(env.emulator.stats().reuse_detections, 0);
    for user in users {
        if let Ok(token) = env.access_token(user).await {
            assert!(
                env.emulator.access_token_valid(&token.access_token),
                "{user}"
            );
        }
    }
}

/// An exchange for a user whose refresh is in flight waits for it, replaces the token
/// set, and causes no reuse detection.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn exchange_during_refresh_waits() {
    let mut env = TestEnv::start(on_demand_window()).await;
    let info = env.exchange("alice").await;
    sleep_into_on_demand_window(&info.expires_at).await;
    env.emulator
        .inject(Fault::DelayBefore(Duration::from_secs(2)), Some(1));
    let mut getter = env.client.clone();
    let refresh =
        tokio::spawn(async move { getter.get_access_token(get_request("alice", 0)).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    env.exchange("alice").await;
    refresh.await.unwrap().unwrap();
    let token = env.access_token("alice").await.unwrap().access_token;
    assert!(env.emulator.access_token_valid(&token));
    assert_eq!(env.emulator.stats().reuse_detections, 0);
}

// ---------------------------------------------------------------------------------
// Input
// ---------------------------------------------------------------------------------

/// Oversized, empty and odd user ids and auth codes are rejected with INVALID_ARGUMENT
/// or, for messages past the gRPC limit, with a status, and never reach Tiki.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_input_is_rejected() {
    let mut env = TestEnv::start(Options::default()).await;
    let before = env.emulator.stats();
    for user_id in [
        String::new(),
        "x".repeat(257),
        "x".repeat(10 * 1024),
        "a\u{0}b".to_owned(),
        "a\u{1b}[31mred".to_owned(),
    ] {
        let status = env
            .client
            .get_access_token(get_request(&user_id, u32::MAX))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
    }
    let huge = env
        .client
        .get_access_token(get_request(&"x".repeat(4 * 1024 * 1024 + 10), 0))
        .await
        .unwrap_err();
    assert!(matches!(
        huge.code(),
        Code::OutOfRange | Code::ResourceExhausted | Code::InvalidArgument
    ));
    for auth_code in [String::new(), "c".repeat(2049), "line\nbreak".to_owned()] {
        let status = env
            .client
            .exchange_auth_code(proto::ExchangeAuthCodeRequest {
                user_id: "alice".to_owned(),
                auth_code,
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
    }
    assert_eq!(env.emulator.stats(), before);
}

/// Auth codes built to break out of the GraphQL string literal are escaped: Tiki receives
/// one unknown code and tokend returns FAILED_PRECONDITION.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graphql_injection_in_auth_code_is_escaped() {
    let mut env = TestEnv::start(Options::default()).await;
    for auth_code in [
        r#"x" client_id: "other" timestamp: 1 signature: "00"}) { access_token } #"#,
        r"back\slash\",
        "\u{2028}\u{202e}é",
    ] {
        let status = env
            .client
            .exchange_auth_code(proto::ExchangeAuthCodeRequest {
                user_id: "alice".to_owned(),
                auth_code: auth_code.to_owned(),
            })
            .await
            .unwrap_err();
        assert_eq!(
            status.code(),
            Code::FailedPrecondition,
            "{}",
            status.message()
        );
    }
    assert_eq!(env.emulator.stats().signature_failures, 0);
}

/// Odd but valid Unicode user ids (right-to-left override, zero-width joiner, 256
/// bytes of multibyte text, lookalikes) are distinct token sets and round-trip.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn odd_unicode_user_ids_round_trip() {
    let mut env = TestEnv::start(Options::default()).await;
    let ids = [
        "\u{202e}ecila".to_owned(),
        "a\u{200d}b".to_owned(),
        "é".repeat(128),
        "e\u{301}".to_owned(),
        "é".to_owned(),
        "🦀".repeat(64),
    ];
    for user_id in &ids {
        env.exchange(user_id).await;
    }
    for user_id in &ids {
        let info = env.token_set(user_id).await;
        assert_eq!(&info.user_id, user_id);
        let token = env.access_token(user_id).await.unwrap().access_token;
        assert!(env.emulator.access_token_valid(&token));
    }
}

// ---------------------------------------------------------------------------------
// Secrets in logs and errors
// ---------------------------------------------------------------------------------

/// A log sink shared with the test that reads it back.
#[derive(Clone, Default)]
struct LogBuffer(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for LogBuffer {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Returns whether `text` contains a run of exactly 64 lowercase hex digits, the shape
/// of a request signature.
fn contains_signature_shape(text: &str) -> bool {
    let mut run = 0;
    for ch in text.chars().chain(std::iter::once(' ')) {
        if ch.is_ascii_hexdigit() && !ch.is_ascii_uppercase() {
            run += 1;
        } else {
            if run == 64 {
                return true;
            }
            run = 0;
        }
    }
    false
}

/// With every target at trace level (the emulator's own logs excluded, because they
/// are the test tool's), drive exchange and refresh through failures and check that
/// no auth code, access or refresh token, signature or the client secret reaches the
/// log or a gRPC error message. Other tests in this binary log into the same buffer,
/// which only widens the check for the client secret and signatures.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn trace_logs_and_errors_hold_no_secret() {
    let logs = LogBuffer::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(
            "trace,tokend::emulator=off",
        ))
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    if tracing::subscriber::set_global_default(subscriber).is_err() {
        panic!("another test installed a global subscriber");
    }

    let mut env = TestEnv::start(Options {
        http_timeout: Duration::from_secs(1),
        ..on_demand_window()
    })
    .await;
    let mut secrets: Vec<String> = vec!["sandbox-secret".to_owned()];
    let mut messages: Vec<String> = Vec::new();

    // A code that Tiki rejects, and one whose exchange fails on the way.
    for fault in [
        None,
        Some(Fault::GarbageBody),
        Some(Fault::DelayAfter(Duration::from_secs(2))),
    ] {
        let auth_code = env.emulator.issue_auth_code("alice", &["offline"]);
        secrets.push(auth_code.clone());
        if let Some(fault) = fault {
            env.emulator.inject(fault, Some(1));
        } else {
            let _ = env
                .client
                .exchange_auth_code(proto::ExchangeAuthCodeRequest {
                    user_id: "alice".to_owned(),
                    auth_code: auth_code.clone(),
                })
                .await;
        }
        if let Err(status) = env
            .client
            .exchange_auth_code(proto::ExchangeAuthCodeRequest {
                user_id: "alice".to_owned(),
                auth_code,
            })
            .await
        {
            messages.push(status.message().to_owned());
        }
    }

    let auth_code = env.emulator.issue_auth_code("alice", &["offline"]);
    secrets.push(auth_code.clone());
    let info = env
        .client
        .exchange_auth_code(proto::ExchangeAuthCodeRequest {
            user_id: "alice".to_owned(),
            auth_code,
        })
        .await
        .unwrap()
        .into_inner();
    secrets.push(env.access_token("alice").await.unwrap().access_token);
    let refresh_token = stored_refresh_token(&env.sqlite_path(), "alice").await;
    secrets.push(refresh_token.clone());
    sleep_into_on_demand_window(&info.expires_at).await;

    env.emulator.inject(
        Fault::GraphqlError {
            code: "upstream_failure".to_owned(),
            message: format!("could not refresh {refresh_token}"),
        },
        Some(1),
    );
    env.emulator.inject(Fault::Status(500), Some(1));
    env.emulator
        .inject(Fault::DelayAfter(Duration::from_secs(2)), Some(1));
    for _ in 0..3 {
        match env.access_token("alice").await {
            Ok(token) => secrets.push(token.access_token),
            Err(status) => messages.push(status.message().to_owned()),
        }
        messages.push(env.token_set("alice").await.last_error);
        tokio::time::sleep(Duration::from_millis(1200)).await;
    }
    wait_until("reauth_required", Duration::from_secs(10), || {
        let mut client = env.client.clone();
        async move {
            client
                .get_token_set(proto::GetTokenSetRequest {
                    user_id: "alice".to_owned(),
                })
                .await
                .unwrap()
                .into_inner()
                .status()
                == proto::TokenStatus::ReauthRequired
        }
    })
    .await;
    if let Err(status) = env.access_token("alice").await {
        messages.push(status.message().to_owned());
    }
    messages.push(env.token_set("alice").await.last_error);
    let last_refresh_token = stored_refresh_token(&env.sqlite_path(), "alice").await;
    secrets.push(last_refresh_token);

    let text = String::from_utf8_lossy(
        &logs
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner),
    )
    .into_owned();
    assert!(
        text.contains("refresh failed"),
        "the capture saw no refresh failure"
    );
    let in_logs: Vec<usize> = secrets
        .iter()
        .enumerate()
        .filter(|(_, secret)| text.contains(secret.as_str()))
        .map(|(index, _)| index)
        .collect();
    assert!(
        in_logs.is_empty(),
        "secrets number {in_logs:?} appear in the trace log"
    );
    assert!(
        !contains_signature_shape(&text),
        "a signature appears in the trace log"
    );
    for message in &messages {
        for secret in &secrets {
            assert!(
                !message.contains(secret.as_str()),
                "a gRPC message holds a secret"
            );
        }
    }
}
