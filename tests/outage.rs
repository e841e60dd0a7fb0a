//! A PostgreSQL outage, made by a loopback TCP proxy between the daemon and the database
//! that the test can cut and restore: cached tokens keep being served while valid,
//! UNAVAILABLE follows only when nothing valid is left, and the daemon recovers by
//! itself.

mod support;

use std::{net::SocketAddr, sync::atomic::Ordering, time::Duration};

use support::{Backend, Options, TestEnv, millis, now_millis, proxy::Proxy, wait_until};
use tokend::proto;
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_outage_serves_cached_tokens() {
    let Some(backend) = Backend::postgres() else {
        return;
    };
    let Backend::Postgres(admin_url) = &backend else {
        unreachable!("Backend::postgres returns the PostgreSQL backend");
    };
    let upstream = reqwest::Url::parse(admin_url).unwrap();
    let upstream_addr: SocketAddr = format!(
        "{}:{}",
        upstream.host_str().unwrap(),
        upstream.port().unwrap_or(5432)
    )
    .parse()
    .unwrap();
    let proxy = Proxy::start(upstream_addr).await;
    let mut proxied = upstream.clone();
    proxied.set_port(Some(proxy.addr.port())).unwrap();
    let proxied_backend = Backend::Postgres(proxied.to_string());

    // 20 s tokens: refreshes are due after about 10 s, and GetAccessToken wants 10 s of
    // validity, so the outage covers the scheduled refresh and the token's expiry.
    let mut env = TestEnv::start_on(
        &proxied_backend,
        Options {
            expires_in: 20,
            ..Options::default()
        },
    )
    .await;
    let info = env.exchange("alice").await;
    let before = env.access_token("alice").await.unwrap().access_token;

    proxy.cut();
    let during = env.access_token("alice").await.unwrap().access_token;
    assert!(
        during == before,
        "the cached token was not served during the outage"
    );

    // Past the point where the token is due: the store cannot be read, so the cached
    // token is served for as long as it is valid.
    let due_wait = millis(&info.expires_at) - now_millis() - 7_000;
    tokio::time::sleep(Duration::from_millis(due_wait.max(0) as u64)).await;
    let late = env.access_token("alice").await.unwrap().access_token;
    assert!(
        late == before,
        "the cached token was not served while still valid"
    );
    assert!(
        env.emulator.access_token_valid(&late),
        "the served token is invalid"
    );
    assert_eq!(env.emulator.stats().refresh_requests, 0);

    // Once it has expired, nothing valid is left.
    let expiry_wait = millis(&info.expires_at) - now_millis() + 500;
    tokio::time::sleep(Duration::from_millis(expiry_wait.max(0) as u64)).await;
    let status = env.access_token("alice").await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);

    proxy.restore();
    let accepted_before = proxy.accepted.load(Ordering::SeqCst);
    wait_until(
        "the daemon serves a fresh token again",
        Duration::from_secs(20),
        || {
            let mut client = env.client.clone();
            let emulator = &env.emulator;
            async move {
                match client
                    .get_access_token(proto::GetAccessTokenRequest {
                        user_id: "alice".to_owned(),
                        min_valid_seconds: 0,
                    })
                    .await
                {
                    Ok(response) => {
                        emulator.access_token_valid(&response.into_inner().access_token)
                    }
                    Err(_) => false,
                }
            }
        },
    )
    .await;
    assert!(
        proxy.accepted.load(Ordering::SeqCst) > accepted_before,
        "no new connection"
    );
    let stats = env.emulator.stats();
    assert_eq!(stats.reuse_detections, 0);
    assert!(stats.refreshes >= 1);
    assert_eq!(
        env.token_set("alice").await.status(),
        proto::TokenStatus::Active
    );
}
