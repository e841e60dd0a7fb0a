//! The HTTP admin server: metrics scraped after real refreshes and calls, liveness while
//! the scheduler stalls, and readiness during a database outage and during shutdown.
//!
//! Counters are process-wide and other tests in this file run daemons at the same
//! time, so counter checks compare at least the expected increase. The store and
//! scheduler gauges belong to the scraped daemon alone.

mod support;

use std::{collections::BTreeMap, net::SocketAddr, time::Duration};

use support::{Backend, Options, TestEnv, proxy::Proxy, wait_until};
use tokend::{emulator::Fault, proto};

/// Returns the value of the series `name` with exactly `labels`, or 0 when it is missing.
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    let wanted: BTreeMap<String, String> = labels
        .iter()
        .map(|(key, value)| (key.to_string(), value.to_string()))
        .collect();
    for line in text.lines().filter(|line| !line.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let (series_name, series_labels) = match series.split_once('{') {
            Some((series_name, rest)) => (series_name, parse_labels(rest.trim_end_matches('}'))),
            None => (series, BTreeMap::new()),
        };
        if series_name == name && series_labels == wanted {
            return value.parse().unwrap();
        }
    }
    0.0
}

fn parse_labels(text: &str) -> BTreeMap<String, String> {
    text.split("\",")
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (key, value) = pair.split_once("=\"").unwrap();
            (key.to_owned(), value.trim_end_matches('"').to_owned())
        })
        .collect()
}

async fn get(addr: SocketAddr, path: &str) -> Result<(u16, String), reqwest::Error> {
    let response = reqwest::get(format!("http://{addr}{path}")).await?;
    let status = response.status().as_u16();
    Ok((status, response.text().await?))
}

async fn metrics_follow_refreshes_and_calls(backend: Backend) {
    let mut env = TestEnv::start_on(
        &backend,
        Options {
            expires_in: 6,
            refresh_before: Duration::from_secs(1),
            ..Options::default()
        },
    )
    .await;
    let (status, before) = env.admin_get("/metrics").await;
    assert_eq!(status, 200);

    env.exchange("alice").await;
    env.exchange("bob").await;
    let missing = env
        .client
        .get_token_set(proto::GetTokenSetRequest {
            user_id: "nobody".to_owned(),
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound);

    // The first scheduled refresh gets a dead grant, the second succeeds.
    env.emulator.inject(
        Fault::GraphqlError {
            code: "invalid_grant".to_owned(),
            message: "refresh token revoked".to_owned(),
        },
        Some(1),
    );
    wait_until(
        "one refresh rejected and one refreshed",
        Duration::from_secs(20),
        || {
            let stats = env.emulator.stats();
            async move { stats.faults_injected >= 1 && stats.refreshes >= 1 }
        },
    )
    .await;
    wait_until(
        "the rejected grant is stored",
        Duration::from_secs(10),
        || async {
            let (_, text) = env.admin_get("/metrics").await;
            sample(&text, "tokend_token_sets", &[("status", "reauth_required")]) == 1.0
        },
    )
    .await;

    let (status, after) = env.admin_get("/metrics").await;
    assert_eq!(status, 200);
    let increase = |name: &str, labels: &[(&str, &str)]| {
        sample(&after, name, labels) - sample(&before, name, labels)
    };
    let refreshed = increase("tokend_refresh_attempts_total", &[("outcome", "refreshed")]);
    assert!(refreshed >= 1.0, "refreshed attempts rose by {refreshed}");
    let rejected = increase(
        "tokend_refresh_attempts_total",
        &[("outcome", "grant_rejected")],
    );
    assert!(
        rejected >= 1.0,
        "grant_rejected attempts rose by {rejected}"
    );
    let timed = increase("tokend_refresh_duration_seconds_count", &[]);
    assert!(timed >= 2.0, "refresh durations rose by {timed}");
    assert!(
        after.contains("tokend_refresh_duration_seconds_bucket{le=\"+Inf\"}"),
        "the refresh duration is not a histogram:\n{after}"
    );
    let ok = increase("tokend_upstream_responses_total", &[("class", "ok")]);
    assert!(ok >= 3.0, "ok responses from Tiki rose by {ok}");
    let dead = increase(
        "tokend_upstream_responses_total",
        &[("class", "grant_rejected")],
    );
    assert!(dead >= 1.0, "grant_rejected responses rose by {dead}");
    let exchanges = increase(
        "tokend_grpc_requests_total",
        &[("method", "ExchangeAuthCode"), ("code", "OK")],
    );
    assert!(exchanges >= 2.0, "OK exchanges rose by {exchanges}");
    let not_found = increase(
        "tokend_grpc_requests_total",
        &[("method", "GetTokenSet"), ("code", "NOT_FOUND")],
    );
    assert!(not_found >= 1.0, "NOT_FOUND lookups rose by {not_found}");

    assert_eq!(
        sample(&after, "tokend_token_sets", &[("status", "active")]),
        1.0
    );
    assert_eq!(
        sample(
            &after,
            "tokend_token_sets",
            &[("status", "refresh_failing")]
        ),
        0.0
    );
    assert_eq!(
        sample(
            &after,
            "tokend_token_sets",
            &[("status", "reauth_required")]
        ),
        1.0
    );
    let expiry = sample(&after, "tokend_earliest_expiry_seconds", &[]);
    assert!(
        expiry > 0.0 && expiry <= 6.0,
        "earliest expiry {expiry} s is outside 0 to 6 s"
    );
    let overdue = sample(&after, "tokend_refresh_overdue_seconds", &[]);
    assert!(overdue < 5.0, "refresh overdue by {overdue} s");
    let tick_age = sample(&after, "tokend_scheduler_last_tick_age_seconds", &[]);
    assert!(tick_age < 10.0, "scheduler tick age {tick_age} s");

    for name in [
        "tokend_refresh_attempts_total",
        "tokend_refresh_duration_seconds",
        "tokend_upstream_responses_total",
        "tokend_token_sets",
        "tokend_earliest_expiry_seconds",
        "tokend_refresh_overdue_seconds",
        "tokend_scheduler_last_tick_age_seconds",
        "tokend_grpc_requests_total",
    ] {
        assert!(
            after.contains(&format!("# HELP {name} ")),
            "{name} has no help text"
        );
    }
    for secret in [
        "sandbox-secret",
        "access_token",
        "refresh_token",
        "auth_code",
    ] {
        assert!(!after.contains(secret), "the metrics contain {secret:?}");
    }
}

async fn readyz_fails_during_shutdown(backend: Backend) {
    let mut env = TestEnv::start_on(
        &backend,
        Options {
            expires_in: 6,
            refresh_before: Duration::from_secs(1),
            ..Options::default()
        },
    )
    .await;
    assert_eq!(env.admin_get("/readyz").await.0, 200);
    env.exchange("alice").await;

    // A slow refresh keeps the daemon in its shutdown drain long enough to probe it.
    env.emulator
        .inject(Fault::DelayBefore(Duration::from_secs(4)), Some(1));
    wait_until(
        "a scheduled refresh starts",
        Duration::from_secs(15),
        || {
            let started = env.daemon().scheduler_stats().refreshes_started();
            async move { started >= 1 }
        },
    )
    .await;
    let daemon = env.daemon.take().unwrap();
    let admin_addr = daemon.admin_addr();
    let shutdown = tokio::spawn(daemon.shutdown());

    wait_until(
        "/readyz reports the shutdown",
        Duration::from_secs(5),
        || async {
            match get(admin_addr, "/readyz").await {
                Ok((status, body)) => status == 503 && body.contains("shutting down"),
                Err(_) => false,
            }
        },
    )
    .await;
    let (status, _) = get(admin_addr, "/healthz").await.unwrap();
    assert_eq!(status, 200, "/healthz failed during a normal shutdown");
    shutdown.await.unwrap().unwrap();
    assert!(
        get(admin_addr, "/readyz").await.is_err(),
        "the admin server still answers after shutdown"
    );
}

backend_tests!(
    metrics_follow_refreshes_and_calls,
    readyz_fails_during_shutdown
);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn healthz_fails_while_scheduler_stalls() {
    let env = TestEnv::start(Options {
        max_tick_age: Duration::from_secs(2),
        ..Options::default()
    })
    .await;
    let (status, body) = env.admin_get("/healthz").await;
    assert_eq!(status, 200, "{body}");

    env.daemon()
        .scheduler_stats()
        .stall_next_pass(Duration::from_secs(6));
    wait_until("/healthz fails", Duration::from_secs(10), || async {
        env.admin_get("/healthz").await.0 == 503
    })
    .await;
    let (_, body) = env.admin_get("/healthz").await;
    assert!(body.contains("max_tick_age"), "{body}");
    let (_, metrics) = env.admin_get("/metrics").await;
    let age = sample(&metrics, "tokend_scheduler_last_tick_age_seconds", &[]);
    assert!(age > 2.0, "tick age {age} s while stalled");

    wait_until("/healthz recovers", Duration::from_secs(20), || async {
        env.admin_get("/healthz").await.0 == 200
    })
    .await;
    let (status, _) = env.admin_get("/readyz").await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn readyz_fails_while_database_unreachable() {
    let Some(Backend::Postgres(url)) = Backend::postgres() else {
        return;
    };
    let (proxy, proxied_url) = Proxy::for_postgres(&url).await;
    let env = TestEnv::start_on(&Backend::Postgres(proxied_url), Options::default()).await;
    let (status, body) = env.admin_get("/readyz").await;
    assert_eq!(status, 200, "{body}");

    proxy.cut();
    wait_until("/readyz fails", Duration::from_secs(15), || async {
        env.admin_get("/readyz").await.0 == 503
    })
    .await;
    let (_, body) = env.admin_get("/readyz").await;
    assert!(body.starts_with("not ready"), "{body}");
    // Liveness must not restart a daemon whose database is unreachable, because its
    // scheduler keeps running passes that fail.
    let (status, body) = env.admin_get("/healthz").await;
    assert_eq!(status, 200, "{body}");
    let (status, _) = env.admin_get("/metrics").await;
    assert_eq!(status, 200, "/metrics failed during the outage");

    proxy.restore();
    wait_until("/readyz recovers", Duration::from_secs(30), || async {
        env.admin_get("/readyz").await.0 == 200
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unknown_grpc_method_is_not_a_label() {
    let env = TestEnv::start(Options::default()).await;
    let channel =
        tonic::transport::Channel::from_shared(format!("http://{}", env.daemon().grpc_addr()))
            .unwrap()
            .connect()
            .await
            .unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let path = "/tokend.v1.TokenService/MadeUpMethodName".parse().unwrap();
    let status = grpc
        .unary::<(), (), _>(
            tonic::Request::new(()),
            path,
            tonic_prost::ProstCodec::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unimplemented);

    let (_, metrics) = env.admin_get("/metrics").await;
    assert!(
        !metrics.contains("MadeUpMethodName"),
        "a caller-chosen method name became a label"
    );
    let unknown = sample(
        &metrics,
        "tokend_grpc_requests_total",
        &[("method", "unknown"), ("code", "UNIMPLEMENTED")],
    );
    assert!(unknown >= 1.0, "unknown methods counted {unknown}");
}
