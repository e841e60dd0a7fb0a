//! End-to-end behaviour of the daemon: a generated gRPC client on loopback, a fresh
//! SQLite file per test, and the Tiki emulator over HTTP. Assertions never print a
//! token.

mod support;

use std::time::Duration;

use support::{
    Backend, Options, TestEnv, millis, now_millis, on_demand_window, sleep_into_on_demand_window,
    wait_until,
};
use tokend::{emulator::Fault, proto};
use tonic::Code;

fn short_lived(expires_in: u64) -> Options {
    Options {
        expires_in,
        ..Options::default()
    }
}

async fn exchange_then_get_serves_valid_token(backend: Backend) {
    let mut env = TestEnv::start_on(&backend, Options::default()).await;

    let info = env.exchange("alice").await;
    assert_eq!(info.user_id, "alice");
    assert_eq!(info.status(), proto::TokenStatus::Active);
    assert_eq!(info.scopes, ["offline", "user_profile"]);
    assert_eq!(info.failure_count, 0);
    assert!(info.refreshed_at.is_none());
    let lifetime = millis(&info.expires_at) - now_millis();
    assert!(
        (3_500_000..=3_600_000).contains(&lifetime),
        "lifetime {lifetime} ms"
    );

    let token = env.access_token("alice").await.unwrap();
    assert!(
        env.emulator.access_token_valid(&token.access_token),
        "served token is invalid"
    );
    assert_eq!(token.scopes, ["offline", "user_profile"]);
    assert_eq!(millis(&token.expires_at), millis(&info.expires_at));
    assert_eq!(env.emulator.stats().exchanges, 1);
    assert_eq!(env.emulator.stats().refresh_requests, 0);
}

async fn refresh_happens_ahead_of_expiry(backend: Backend) {
    let mut env = TestEnv::start_on(&backend, short_lived(6)).await;
    let info = env.exchange("alice").await;
    let first = env.access_token("alice").await.unwrap().access_token;
    let first_expiry = millis(&info.expires_at);

    wait_until("a scheduled refresh", Duration::from_secs(10), || {
        let refreshes = env.emulator.stats().refreshes;
        async move { refreshes >= 1 }
    })
    .await;

    let refreshed = env.token_set("alice").await;
    let refreshed_at = millis(&refreshed.refreshed_at);
    assert!(
        refreshed_at < first_expiry,
        "refreshed {} ms after expiry",
        refreshed_at - first_expiry
    );
    assert_eq!(refreshed.status(), proto::TokenStatus::Active);

    let second = env.access_token("alice").await.unwrap().access_token;
    assert!(
        second != first,
        "the served token did not change after a refresh"
    );
    assert!(
        env.emulator.access_token_valid(&second),
        "the refreshed token is invalid"
    );
    assert!(
        !env.emulator.access_token_valid(&first),
        "Tiki should have revoked the old token"
    );
    let stats = env.emulator.stats();
    assert_eq!(stats.reuse_detections, 0);
    assert_eq!(stats.refreshes_after_expiry, 0);
}

async fn concurrent_gets_cause_one_refresh(backend: Backend) {
    // In the on-demand window the token is due for GetAccessToken but not yet for the
    // scheduler, so every refresh here comes from the 50 calls.
    let mut env = TestEnv::start_on(&backend, on_demand_window()).await;
    let info = env.exchange("alice").await;
    sleep_into_on_demand_window(&info.expires_at).await;
    let before = env.emulator.stats().refresh_requests;

    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..50 {
        let mut client = env.client.clone();
        calls.spawn(async move {
            client
                .get_access_token(proto::GetAccessTokenRequest {
                    user_id: "alice".to_owned(),
                    min_valid_seconds: 0,
                })
                .await
                .map(|response| response.into_inner().access_token)
        });
    }
    let mut tokens = Vec::new();
    while let Some(result) = calls.join_next().await {
        tokens.push(result.unwrap().unwrap());
    }

    assert_eq!(env.emulator.stats().refresh_requests - before, 1);
    assert!(
        tokens.iter().all(|token| *token == tokens[0]),
        "callers got different tokens"
    );
    assert!(
        env.emulator.access_token_valid(&tokens[0]),
        "the served token is invalid"
    );
    assert_eq!(env.emulator.stats().reuse_detections, 0);
}

async fn restart_keeps_token_sets_refreshing(backend: Backend) {
    let mut env = TestEnv::start_on(&backend, short_lived(4)).await;
    env.exchange("alice").await;
    env.exchange("bob").await;
    env.restart().await;

    let before = env.token_set("alice").await;
    assert_eq!(before.status(), proto::TokenStatus::Active);
    wait_until(
        "both token sets refreshed twice",
        Duration::from_secs(12),
        || {
            let refreshes = env.emulator.stats().refreshes;
            async move { refreshes >= 4 }
        },
    )
    .await;

    for user in ["alice", "bob"] {
        let token = env.access_token(user).await.unwrap().access_token;
        assert!(
            env.emulator.access_token_valid(&token),
            "{user}'s token is invalid"
        );
        assert!(env.token_set(user).await.refreshed_at.is_some());
    }
    assert_eq!(env.emulator.stats().reuse_detections, 0);
}

async fn server_errors_then_recovery(backend: Backend) {
    let mut env = TestEnv::start_on(&backend, short_lived(10)).await;
    env.exchange("alice").await;
    let original = env.access_token("alice").await.unwrap().access_token;
    env.emulator.inject(Fault::Status(503), None);

    env.wait_for_token_set(
        "alice",
        "refreshes failing",
        Duration::from_secs(10),
        |info| info.status() == proto::TokenStatus::RefreshFailing && info.failure_count >= 2,
    )
    .await;
    let failing = env.token_set("alice").await;
    assert!(
        failing.last_error.contains("503"),
        "last_error: {}",
        failing.last_error
    );
    let served = env.access_token("alice").await.unwrap().access_token;
    assert!(
        served == original,
        "a failing refresh should keep serving the current token"
    );
    assert!(
        env.emulator.access_token_valid(&served),
        "the served token is invalid"
    );

    env.emulator.clear_faults();
    env.wait_for_token_set(
        "alice",
        "the token set is active again",
        Duration::from_secs(10),
        |info| info.status() == proto::TokenStatus::Active,
    )
    .await;
    let recovered = env.access_token("alice").await.unwrap().access_token;
    assert!(recovered != original, "no refresh happened after recovery");
    assert!(
        env.emulator.access_token_valid(&recovered),
        "the refreshed token is invalid"
    );
    let info = env.token_set("alice").await;
    assert_eq!(info.failure_count, 0);
    assert!(info.last_error.is_empty());
    assert_eq!(env.emulator.stats().reuse_detections, 0);
}

async fn revoked_grant_requires_reauth(backend: Backend) {
    let mut env = TestEnv::start_on(&backend, short_lived(4)).await;
    env.exchange("alice").await;
    env.emulator.revoke_customer("alice");

    env.wait_for_token_set("alice", "reauth_required", Duration::from_secs(8), |info| {
        info.status() == proto::TokenStatus::ReauthRequired
    })
    .await;
    let info = env.token_set("alice").await;
    assert!(
        info.last_error.contains("rejected the grant"),
        "last_error: {}",
        info.last_error
    );
    assert!(info.next_refresh_at.is_none());

    let status = env.access_token("alice").await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(
        status.message().contains("consent again"),
        "{}",
        status.message()
    );

    let attempts = env.emulator.stats().refresh_requests;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let _ = env.access_token("alice").await;
    assert_eq!(env.emulator.stats().refresh_requests, attempts);
}

async fn refresh_without_refresh_token_keeps_stored_one(backend: Backend) {
    let mut env = TestEnv::start_on(&backend, short_lived(4)).await;
    env.emulator.set_omit_refresh_token(true);
    env.exchange("alice").await;

    wait_until(
        "two refreshes with the same refresh token",
        Duration::from_secs(10),
        || {
            let refreshes = env.emulator.stats().refreshes;
            async move { refreshes >= 2 }
        },
    )
    .await;
    let token = env.access_token("alice").await.unwrap().access_token;
    assert!(
        env.emulator.access_token_valid(&token),
        "the served token is invalid"
    );
    let stats = env.emulator.stats();
    assert_eq!(stats.reuse_detections, 0);
    assert_eq!(stats.rejected_grants, 0);
    assert_eq!(
        env.token_set("alice").await.status(),
        proto::TokenStatus::Active
    );
}

async fn expires_in_as_string_is_accepted(backend: Backend) {
    let mut env = TestEnv::start_on(&backend, short_lived(4)).await;
    env.emulator.set_expires_in_as_string(true);
    let info = env.exchange("alice").await;
    let lifetime = millis(&info.expires_at) - now_millis();
    assert!(
        (3_000..=4_000).contains(&lifetime),
        "lifetime {lifetime} ms"
    );

    wait_until(
        "a refresh answered with a string expiry",
        Duration::from_secs(8),
        || {
            let refreshes = env.emulator.stats().refreshes;
            async move { refreshes >= 1 }
        },
    )
    .await;
    // The emulator counts a refresh when it responds, a moment before tokend commits.
    let first_expiry = millis(&info.expires_at);
    env.wait_for_token_set(
        "alice",
        "the refreshed expiry is stored",
        Duration::from_secs(5),
        |set| millis(&set.expires_at) > first_expiry,
    )
    .await;
    let refreshed = env.token_set("alice").await;
    assert_eq!(refreshed.status(), proto::TokenStatus::Active);
}

async fn rejected_code_fails_precondition(backend: Backend) {
    let mut env = TestEnv::start_on(&backend, Options::default()).await;
    let status = env
        .client
        .exchange_auth_code(proto::ExchangeAuthCodeRequest {
            user_id: "alice".to_owned(),
            auth_code: "not-a-code-tiki-issued".to_owned(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(
        status.message().contains("auth code"),
        "{}",
        status.message()
    );

    let code = env.emulator.issue_auth_code("alice", &["offline"]);
    let request = proto::ExchangeAuthCodeRequest {
        user_id: "alice".to_owned(),
        auth_code: code,
    };
    env.client
        .exchange_auth_code(request.clone())
        .await
        .unwrap();
    // A retry for the same user gets the stored token set, so reuse for another user.
    let reused = proto::ExchangeAuthCodeRequest {
        user_id: "bob".to_owned(),
        ..request
    };
    let reused = env.client.exchange_auth_code(reused).await.unwrap_err();
    assert_eq!(reused.code(), Code::FailedPrecondition);
}

async fn invalid_arguments_name_the_field(backend: Backend) {
    let mut env = TestEnv::start_on(&backend, Options::default()).await;
    let long_id = "u".repeat(257);
    for user_id in ["", "line\nbreak", long_id.as_str()] {
        let status = env.access_token(user_id).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(status.message().contains("user_id"), "{}", status.message());
    }
    for auth_code in [String::new(), "c".repeat(4096)] {
        let status = env
            .client
            .exchange_auth_code(proto::ExchangeAuthCodeRequest {
                user_id: "alice".to_owned(),
                auth_code,
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(
            status.message().contains("auth_code"),
            "{}",
            status.message()
        );
    }
    assert_eq!(env.emulator.stats().exchange_requests, 0);
}

async fn unknown_and_deleted_users_are_not_found(backend: Backend) {
    let mut env = TestEnv::start_on(&backend, Options::default()).await;
    assert_eq!(
        env.access_token("nobody").await.unwrap_err().code(),
        Code::NotFound
    );

    env.exchange("alice").await;
    env.client
        .delete_token_set(proto::DeleteTokenSetRequest {
            user_id: "alice".to_owned(),
        })
        .await
        .unwrap();
    assert_eq!(
        env.access_token("alice").await.unwrap_err().code(),
        Code::NotFound
    );
    let status = env
        .client
        .get_token_set(proto::GetTokenSetRequest {
            user_id: "alice".to_owned(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    let status = env
        .client
        .delete_token_set(proto::DeleteTokenSetRequest {
            user_id: "alice".to_owned(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
}

async fn unreachable_tiki_is_unavailable(backend: Backend) {
    let mut env = TestEnv::start_on(&backend, short_lived(4)).await;
    env.exchange("alice").await;
    let addr = env.emulator.addr();
    let emulator = std::mem::replace(
        &mut env.emulator,
        tokend::emulator::Emulator::start(Default::default())
            .await
            .unwrap(),
    );
    emulator.shutdown().await;
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "the emulator still listens"
    );

    let status = env
        .client
        .exchange_auth_code(proto::ExchangeAuthCodeRequest {
            user_id: "bob".to_owned(),
            auth_code: "any-code".to_owned(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);

    // Once the old token expires and refreshes cannot reach Tiki, nothing valid is left.
    wait_until("UNAVAILABLE for alice", Duration::from_secs(10), || {
        let mut client = env.client.clone();
        async move {
            client
                .get_access_token(proto::GetAccessTokenRequest {
                    user_id: "alice".to_owned(),
                    min_valid_seconds: 0,
                })
                .await
                .is_err_and(|status| status.code() == Code::Unavailable)
        }
    })
    .await;
    let info = env.token_set("alice").await;
    assert_eq!(info.status(), proto::TokenStatus::RefreshFailing);
}

async fn scheduler_recovers_from_stall(backend: Backend) {
    let mut env = TestEnv::start_on(&backend, short_lived(4)).await;
    env.exchange("alice").await;
    let stats = env.daemon().scheduler_stats().clone();
    wait_until("the scheduler runs", Duration::from_secs(5), || {
        let passes = stats.passes();
        async move { passes >= 1 }
    })
    .await;

    let stall = Duration::from_secs(5);
    stats.stall_next_pass(stall);
    let before = stats.passes();
    wait_until("the stalled pass starts", Duration::from_secs(3), || {
        let passes = stats.passes();
        async move { passes > before }
    })
    .await;
    let refreshes_at_stall = env.emulator.stats().refreshes;
    tokio::time::sleep(stall + Duration::from_millis(500)).await;

    // The stalled pass, at most one catch-up pass for the ticks missed meanwhile, and at
    // most one regular tick in the half second after the stall.
    let passes_during = stats.passes() - before;
    assert!(
        passes_during <= 3,
        "{passes_during} passes ran during and right after the stall"
    );
    assert!(stats.cron_ticks() > 0);

    wait_until("refreshing resumes", Duration::from_secs(8), || {
        let refreshes = env.emulator.stats().refreshes;
        async move { refreshes > refreshes_at_stall }
    })
    .await;
    let token = env.access_token("alice").await.unwrap().access_token;
    assert!(
        env.emulator.access_token_valid(&token),
        "the served token is invalid"
    );
    let after_recovery = stats.passes();
    wait_until("regular passes continue", Duration::from_secs(5), || {
        let passes = stats.passes();
        async move { passes >= after_recovery + 2 }
    })
    .await;
}

async fn timed_out_refresh_retried_once(backend: Backend) {
    // Tiki rotates the token and then responds too late: the daemon cannot know the new
    // tokens, presents the old refresh token exactly once more, and Tiki's reuse
    // detection revokes the family, so the user must consent again.
    let mut env = TestEnv::start_on(
        &backend,
        Options {
            expires_in: 6,
            http_timeout: Duration::from_secs(1),
            ..Options::default()
        },
    )
    .await;
    env.exchange("alice").await;
    env.emulator
        .inject(Fault::DelayAfter(Duration::from_secs(3)), Some(1));

    env.wait_for_token_set(
        "alice",
        "reauth_required",
        Duration::from_secs(15),
        |info| info.status() == proto::TokenStatus::ReauthRequired,
    )
    .await;
    let info = env.token_set("alice").await;
    assert!(
        info.last_error.contains("no answer"),
        "last_error: {}",
        info.last_error
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let stats = env.emulator.stats();
    assert_eq!(stats.refresh_requests, 2);
    assert_eq!(stats.reuse_detections, 1);
    assert_eq!(
        env.access_token("alice").await.unwrap_err().code(),
        Code::FailedPrecondition
    );
}

async fn many_writers_share_the_database(backend: Backend) {
    let mut env = TestEnv::start_on(&backend, short_lived(4)).await;
    let users: Vec<String> = (0..40).map(|index| format!("user-{index}")).collect();

    let mut exchanges = tokio::task::JoinSet::new();
    for user in &users {
        let mut client = env.client.clone();
        let auth_code = env.emulator.issue_auth_code(user, &["offline"]);
        let user_id = user.clone();
        exchanges.spawn(async move {
            client
                .exchange_auth_code(proto::ExchangeAuthCodeRequest { user_id, auth_code })
                .await
                .map(|_| ())
        });
    }
    while let Some(result) = exchanges.join_next().await {
        result.unwrap().unwrap();
    }

    // Another connection blocks every write for a while; writers must wait, not fail.
    match &env.backend {
        Backend::Sqlite => {
            let outsider = sqlx::SqlitePool::connect(&env.database_url).await.unwrap();
            let mut transaction = outsider.begin_with("BEGIN IMMEDIATE").await.unwrap();
            sqlx::query("UPDATE token_sets SET updated_at = updated_at WHERE user_id = 'none'")
                .execute(&mut *transaction)
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_secs(3)).await;
            transaction.commit().await.unwrap();
            outsider.close().await;
        }
        Backend::Postgres(_) => {
            let outsider = sqlx::PgPool::connect(&env.database_url).await.unwrap();
            let mut transaction = outsider.begin().await.unwrap();
            sqlx::query("LOCK TABLE token_sets IN EXCLUSIVE MODE")
                .execute(&mut *transaction)
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_secs(3)).await;
            transaction.commit().await.unwrap();
            outsider.close().await;
        }
    }

    wait_until(
        "every token set refreshed twice",
        Duration::from_secs(20),
        || {
            let refreshes = env.emulator.stats().refreshes;
            async move { refreshes >= 80 }
        },
    )
    .await;
    for user in &users {
        let info = env.token_set(user).await;
        assert_eq!(
            info.status(),
            proto::TokenStatus::Active,
            "{user}: {}",
            info.last_error
        );
        let token = env.access_token(user).await.unwrap().access_token;
        assert!(
            env.emulator.access_token_valid(&token),
            "{user}'s token is invalid"
        );
    }
    assert_eq!(env.emulator.stats().reuse_detections, 0);
}

async fn get_waits_for_refresh_in_progress(backend: Backend) {
    // 20 s tokens: the scheduler refreshes 10 to 12 s after the exchange. The emulator
    // delays that refresh by 3 s before rotating, and a caller requests a token meanwhile.
    let mut env = TestEnv::start_on(
        &backend,
        Options {
            expires_in: 20,
            ..Options::default()
        },
    )
    .await;
    env.exchange("alice").await;
    env.emulator
        .inject(Fault::DelayBefore(Duration::from_secs(3)), Some(1));
    wait_until(
        "the scheduled refresh reached Tiki",
        Duration::from_secs(20),
        || {
            let arrived = env.emulator.stats().faults_injected >= 1;
            async move { arrived }
        },
    )
    .await;

    let token = env
        .client
        .get_access_token(proto::GetAccessTokenRequest {
            user_id: "alice".to_owned(),
            min_valid_seconds: 1,
        })
        .await
        .unwrap()
        .into_inner()
        .access_token;
    assert!(
        env.emulator.stats().refreshes >= 1,
        "the caller did not wait for the refresh"
    );
    assert!(
        env.emulator.access_token_valid(&token),
        "the token served during the refresh was revoked by it"
    );
    assert_eq!(env.emulator.stats().refresh_requests, 1);
}

async fn shutdown_waits_for_orphaned_refresh(backend: Backend) {
    // A caller gives up during an on-demand refresh that Tiki responds to slowly, and the
    // daemon is restarted at once. The refresh must still commit before shutdown ends,
    // because Tiki has rotated the refresh token.
    let mut env = TestEnv::start_on(&backend, on_demand_window()).await;
    let info = env.exchange("alice").await;
    sleep_into_on_demand_window(&info.expires_at).await;
    env.emulator
        .inject(Fault::DelayAfter(Duration::from_secs(2)), Some(1));

    let mut request = tonic::Request::new(proto::GetAccessTokenRequest {
        user_id: "alice".to_owned(),
        min_valid_seconds: 0,
    });
    request.set_timeout(Duration::from_millis(300));
    assert!(env.client.get_access_token(request).await.is_err());
    env.restart().await;

    let token = env.access_token("alice").await.unwrap().access_token;
    assert!(
        env.emulator.access_token_valid(&token),
        "the served token is invalid"
    );
    let stats = env.emulator.stats();
    assert_eq!(stats.reuse_detections, 0);
    assert_eq!(
        env.token_set("alice").await.status(),
        proto::TokenStatus::Active
    );
}

backend_tests! {
    exchange_then_get_serves_valid_token,
    refresh_happens_ahead_of_expiry,
    concurrent_gets_cause_one_refresh,
    restart_keeps_token_sets_refreshing,
    server_errors_then_recovery,
    revoked_grant_requires_reauth,
    refresh_without_refresh_token_keeps_stored_one,
    expires_in_as_string_is_accepted,
    rejected_code_fails_precondition,
    invalid_arguments_name_the_field,
    unknown_and_deleted_users_are_not_found,
    unreachable_tiki_is_unavailable,
    scheduler_recovers_from_stall,
    timed_out_refresh_retried_once,
    many_writers_share_the_database,
    get_waits_for_refresh_in_progress,
    shutdown_waits_for_orphaned_refresh,
}
