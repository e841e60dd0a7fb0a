//! The RPCs beyond exchange and get, and the standard gRPC services, end to end: a
//! generated client on loopback, a fresh store per test, and the Tiki emulator over
//! HTTP. Assertions never print a token.

mod support;

use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use support::{Backend, Options, TestEnv, millis, now_millis, wait_until};
use tokend::{
    emulator::Fault,
    proto::{self, watch_access_token_response::Event},
    tiki::{TokenApi, graphql::GraphqlClient},
};
use tonic::{Code, Streaming, transport::Channel};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

/// Generous bound for one stream message that should arrive at once.
const PROMPT: Duration = Duration::from_secs(10);

async fn health_status(channel: Channel, service: &str) -> Result<ServingStatus, tonic::Status> {
    let request = HealthCheckRequest {
        service: service.to_owned(),
    };
    let response = HealthClient::new(channel).check(request).await?;
    Ok(response.into_inner().status())
}

async fn channel(env: &TestEnv) -> Channel {
    Channel::from_shared(format!("http://{}", env.daemon().grpc_addr()))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

/// Gets a token set from the emulator the way another system would, with tokend's own
/// Tiki client.
async fn grant_from_elsewhere(env: &TestEnv, user_id: &str) -> tokend::tiki::Grant {
    let client = GraphqlClient::new(
        env.emulator.graphql_url(),
        "sandbox-client".to_owned(),
        SecretString::from("sandbox-secret"),
        Duration::from_secs(5),
    )
    .unwrap();
    let code = env
        .emulator
        .issue_auth_code(user_id, &["offline", "user_profile"]);
    client.exchange(&SecretString::from(code)).await.unwrap()
}

fn import_request(user_id: &str, grant: &tokend::tiki::Grant) -> proto::ImportTokenSetRequest {
    proto::ImportTokenSetRequest {
        user_id: user_id.to_owned(),
        access_token: grant.access_token.expose_secret().to_owned(),
        refresh_token: grant
            .refresh_token
            .as_ref()
            .map(|token| token.expose_secret().to_owned())
            .unwrap_or_default(),
        expiry: Some(proto::import_token_set_request::Expiry::ExpiresIn(
            i64::try_from(grant.expires_in).unwrap(),
        )),
        scopes: grant.scopes.clone(),
        replace_existing: false,
    }
}

async fn watch(env: &mut TestEnv, user_id: &str) -> Streaming<proto::WatchAccessTokenResponse> {
    env.client
        .watch_access_token(proto::WatchAccessTokenRequest {
            user_id: user_id.to_owned(),
            min_valid_seconds: 0,
        })
        .await
        .unwrap()
        .into_inner()
}

/// Returns the next message of a watch, failing the test after [`PROMPT`].
async fn next_event(
    stream: &mut Streaming<proto::WatchAccessTokenResponse>,
    limit: Duration,
) -> Result<Option<Event>, tonic::Status> {
    let message = tokio::time::timeout(limit, stream.message())
        .await
        .expect("the watch sent nothing in time")?;
    Ok(message.map(|message| message.event.expect("a watch message carries an event")))
}

fn token_of(event: Option<Event>) -> proto::AccessToken {
    match event {
        Some(Event::AccessToken(token)) => token,
        other => panic!(
            "expected an access token, got {:?}",
            other.map(|_| "status")
        ),
    }
}

async fn health_follows_lifecycle(backend: Backend) {
    let mut env = TestEnv::start_on(&backend, Options::default()).await;
    let channel = channel(&env).await;

    // The daemon reports SERVING once its first query to the migrated store returned.
    wait_until("health is SERVING", PROMPT, || {
        let channel = channel.clone();
        async move { health_status(channel, "").await.unwrap() == ServingStatus::Serving }
    })
    .await;
    let service = health_status(channel.clone(), "tokend.v1.TokenService").await;
    assert_eq!(service.unwrap(), ServingStatus::Serving);
    let unknown = health_status(channel.clone(), "no.such.Service").await;
    assert_eq!(unknown.unwrap_err().code(), Code::NotFound);

    // A watch opened before shutdown receives the status change during the drain.
    let request = HealthCheckRequest {
        service: "tokend.v1.TokenService".to_owned(),
    };
    let mut health_watch = HealthClient::new(channel.clone())
        .watch(request)
        .await
        .unwrap()
        .into_inner();
    let first = health_watch.message().await.unwrap().unwrap();
    assert_eq!(first.status(), ServingStatus::Serving);
    let daemon = env.daemon.take().unwrap();
    let stopped = tokio::spawn(daemon.shutdown());
    let next = tokio::time::timeout(PROMPT, health_watch.message())
        .await
        .expect("no health change during shutdown")
        .unwrap()
        .unwrap();
    assert_eq!(next.status(), ServingStatus::NotServing);
    drop(health_watch);
    drop(channel);
    tokio::time::timeout(Duration::from_secs(30), stopped)
        .await
        .expect("shutdown did not finish")
        .unwrap()
        .unwrap();
}

/// A health watch never ends by itself, so shutdown cuts it once the grace period
/// (10 s in the tests) is over instead of waiting forever.
async fn shutdown_cuts_open_health_watch(backend: Backend) {
    let mut env = TestEnv::start_on(&backend, Options::default()).await;
    let channel = channel(&env).await;
    let request = HealthCheckRequest {
        service: String::new(),
    };
    let mut health_watch = HealthClient::new(channel)
        .watch(request)
        .await
        .unwrap()
        .into_inner();
    health_watch.message().await.unwrap().unwrap();

    let started = std::time::Instant::now();
    let daemon = env.daemon.take().unwrap();
    tokio::time::timeout(Duration::from_secs(40), daemon.shutdown())
        .await
        .expect("shutdown waited for the health watch")
        .unwrap();
    println!(
        "health: shutdown with an open health watch took {:?}",
        started.elapsed()
    );
    drop(health_watch);
}

async fn reflection_lists_services(backend: Backend) {
    use tonic_reflection::pb::{v1, v1alpha};

    let env = TestEnv::start_on(&backend, Options::default()).await;
    let channel = channel(&env).await;

    let request = v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(v1::server_reflection_request::MessageRequest::ListServices(
            String::new(),
        )),
    };
    let mut client = v1::server_reflection_client::ServerReflectionClient::new(channel.clone());
    let mut responses = client
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let response = responses.message().await.unwrap().unwrap();
    let Some(v1::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
        response.message_response
    else {
        panic!("v1 reflection did not list services");
    };
    let names: Vec<&str> = list
        .service
        .iter()
        .map(|service| service.name.as_str())
        .collect();
    assert!(names.contains(&"tokend.v1.TokenService"), "{names:?}");
    assert!(names.contains(&"grpc.health.v1.Health"), "{names:?}");

    let request = v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            v1::server_reflection_request::MessageRequest::FileContainingSymbol(
                "tokend.v1.TokenService".to_owned(),
            ),
        ),
    };
    let mut responses = client
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let response = responses.message().await.unwrap().unwrap();
    let Some(v1::server_reflection_response::MessageResponse::FileDescriptorResponse(files)) =
        response.message_response
    else {
        panic!("v1 reflection returned no file for TokenService");
    };
    let methods: Vec<String> = files
        .file_descriptor_proto
        .iter()
        .map(|bytes| <prost_types::FileDescriptorProto as prost::Message>::decode(&bytes[..]))
        .flat_map(|file| file.unwrap().service)
        .flat_map(|service| service.method)
        .filter_map(|method| method.name)
        .collect();
    for method in [
        "WatchAccessToken",
        "RefreshAccessToken",
        "ListTokenSets",
        "ImportTokenSet",
    ] {
        assert!(
            methods.iter().any(|name| name == method),
            "{method} missing"
        );
    }

    let request = v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            v1alpha::server_reflection_request::MessageRequest::ListServices(String::new()),
        ),
    };
    let mut client = v1alpha::server_reflection_client::ServerReflectionClient::new(channel);
    let mut responses = client
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let response = responses.message().await.unwrap().unwrap();
    let Some(v1alpha::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
        response.message_response
    else {
        panic!("v1alpha reflection did not list services");
    };
    assert!(
        list.service
            .iter()
            .any(|service| service.name == "tokend.v1.TokenService")
    );
}

async fn list_pages_through_token_sets(backend: Backend) {
    let mut env = TestEnv::start_on(&backend, Options::default()).await;
    for user_id in ["dave", "alice", "carol", "bob", "erin"] {
        env.exchange(user_id).await;
    }
    // Erin withdraws consent, so her next refresh ends the grant.
    env.emulator.revoke_customer("erin");
    let refreshed = env
        .client
        .refresh_access_token(proto::RefreshAccessTokenRequest {
            user_id: "erin".to_owned(),
        })
        .await
        .unwrap_err();
    assert_eq!(refreshed.code(), Code::FailedPrecondition);

    let mut seen = Vec::new();
    let mut page_token = String::new();
    let mut pages = 0;
    loop {
        let page = env
            .client
            .list_token_sets(proto::ListTokenSetsRequest {
                page_size: 2,
                page_token: page_token.clone(),
                statuses: Vec::new(),
            })
            .await
            .unwrap()
            .into_inner();
        pages += 1;
        assert!(page.token_sets.len() <= 2);
        seen.extend(page.token_sets.iter().map(|info| info.user_id.clone()));
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    assert_eq!(seen, ["alice", "bob", "carol", "dave", "erin"]);
    assert_eq!(pages, 3);

    let reauth = env
        .client
        .list_token_sets(proto::ListTokenSetsRequest {
            page_size: 0,
            page_token: String::new(),
            statuses: vec![proto::TokenStatus::ReauthRequired.into()],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reauth.token_sets.len(), 1);
    assert_eq!(reauth.token_sets[0].user_id, "erin");
    assert_eq!(
        reauth.token_sets[0].status(),
        proto::TokenStatus::ReauthRequired
    );
    assert!(reauth.next_page_token.is_empty());

    let active = env
        .client
        .list_token_sets(proto::ListTokenSetsRequest {
            page_size: 3,
            page_token: String::new(),
            statuses: vec![proto::TokenStatus::Active.into()],
        })
        .await
        .unwrap()
        .into_inner();
    let names: Vec<&str> = active
        .token_sets
        .iter()
        .map(|info| info.user_id.as_str())
        .collect();
    assert_eq!(names, ["alice", "bob", "carol"]);
    // A page token is valid only with the filter it was issued for.
    let mismatched = env
        .client
        .list_token_sets(proto::ListTokenSetsRequest {
            page_size: 3,
            page_token: active.next_page_token,
            statuses: Vec::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(mismatched.code(), Code::InvalidArgument);
    assert!(mismatched.message().contains("page_token"));
}

/// Pages through 600 token sets while imports run, and prints how long the imports and
/// the listing took. Every set that existed before the listing began is
/// seen exactly once, in order.
async fn list_survives_concurrent_writes(backend: Backend) {
    const USERS: usize = 600;
    let mut env = TestEnv::start_on(&backend, Options::default()).await;
    let grant = grant_from_elsewhere(&env, "template").await;

    let started = std::time::Instant::now();
    let mut imports = tokio::task::JoinSet::new();
    for index in 0..USERS {
        let mut client = env.client.clone();
        let request = import_request(&format!("user-{index:04}"), &grant);
        imports.spawn(async move { client.import_token_set(request).await.map(|_| ()) });
    }
    while let Some(result) = imports.join_next().await {
        result.unwrap().unwrap();
    }
    let import_time = started.elapsed();

    let started = std::time::Instant::now();
    let mut seen = Vec::new();
    let mut page_token = String::new();
    let mut pages = 0;
    loop {
        // Each page also races an import that sorts between pages.
        let late = import_request(&format!("user-{pages:04}-late"), &grant);
        env.client.import_token_set(late).await.unwrap();
        let page = env
            .client
            .list_token_sets(proto::ListTokenSetsRequest {
                page_size: 250,
                page_token,
                statuses: vec![proto::TokenStatus::Active.into()],
            })
            .await
            .unwrap()
            .into_inner();
        pages += 1;
        seen.extend(page.token_sets.into_iter().map(|info| info.user_id));
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    let list_time = started.elapsed();

    let mut sorted = seen.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted, seen, "the listing is out of order or has repeats");
    for index in 0..USERS {
        let user_id = format!("user-{index:04}");
        assert!(seen.binary_search(&user_id).is_ok(), "{user_id} missing");
    }
    let backend_name = match backend {
        Backend::Sqlite => "SQLite",
        Backend::Postgres(_) => "PostgreSQL",
    };
    println!(
        "list: {USERS} imports in {import_time:?}; {} rows in {pages} pages of up to 250, \
         with an import before each, in {list_time:?} ({backend_name})",
        seen.len()
    );
}

async fn import_then_refresh_and_serve(backend: Backend) {
    let mut env = TestEnv::start_on(&backend, Options::default()).await;
    let grant = grant_from_elsewhere(&env, "alice").await;

    let info = env
        .client
        .import_token_set(import_request("alice", &grant))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.user_id, "alice");
    assert_eq!(info.status(), proto::TokenStatus::Active);
    assert_eq!(info.scopes, ["offline", "user_profile"]);
    assert!(info.next_refresh_at.is_some(), "no refresh scheduled");
    let lifetime = millis(&info.expires_at) - now_millis();
    assert!((3_500_000..=3_600_000).contains(&lifetime), "{lifetime} ms");

    let served = env.access_token("alice").await.unwrap();
    assert!(
        served.access_token == grant.access_token.expose_secret(),
        "tokend did not serve the imported access token"
    );

    // The imported refresh token works with Tiki.
    let refreshed = env
        .client
        .refresh_access_token(proto::RefreshAccessTokenRequest {
            user_id: "alice".to_owned(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        refreshed.access_token != grant.access_token.expose_secret(),
        "the refresh returned the imported access token"
    );
    assert!(env.emulator.access_token_valid(&refreshed.access_token));
    assert_eq!(env.emulator.stats().refreshes, 1);

    // Importing again fails unless replacing is requested.
    let other = grant_from_elsewhere(&env, "alice").await;
    let again = env
        .client
        .import_token_set(import_request("alice", &other))
        .await
        .unwrap_err();
    assert_eq!(again.code(), Code::AlreadyExists);
    assert!(again.message().contains("replace_existing"));
    let current = env.access_token("alice").await.unwrap();
    assert!(
        current.access_token == refreshed.access_token,
        "the rejected import changed the stored token"
    );

    let replacing = proto::ImportTokenSetRequest {
        replace_existing: true,
        ..import_request("alice", &other)
    };
    env.client.import_token_set(replacing).await.unwrap();
    let replaced = env.access_token("alice").await.unwrap();
    assert!(
        replaced.access_token == other.access_token.expose_secret(),
        "the replacing import was not stored"
    );
}

async fn expired_import_refreshes_at_once(backend: Backend) {
    let mut env = TestEnv::start_on(&backend, Options::default()).await;
    let grant = grant_from_elsewhere(&env, "alice").await;
    let request = proto::ImportTokenSetRequest {
        expiry: Some(proto::import_token_set_request::Expiry::ExpiresAt(
            prost_types::Timestamp {
                seconds: chrono::Utc::now().timestamp() - 60,
                nanos: 0,
            },
        )),
        ..import_request("alice", &grant)
    };
    env.client.import_token_set(request).await.unwrap();

    let served = env.access_token("alice").await.unwrap();
    assert!(
        served.access_token != grant.access_token.expose_secret(),
        "the expired imported token was served"
    );
    assert!(env.emulator.access_token_valid(&served.access_token));
    assert!(millis(&served.expires_at) > now_millis() + 3_000_000);
}

async fn concurrent_refreshes_share_one(backend: Backend) {
    let mut env = TestEnv::start_on(&backend, Options::default()).await;
    env.exchange("alice").await;
    // A slow Tiki keeps the first refresh running while the other calls arrive.
    env.emulator
        .inject(Fault::DelayBefore(Duration::from_millis(1500)), Some(1));

    let calls: Vec<_> = (0..8)
        .map(|_| {
            let mut client = env.client.clone();
            tokio::spawn(async move {
                client
                    .refresh_access_token(proto::RefreshAccessTokenRequest {
                        user_id: "alice".to_owned(),
                    })
                    .await
                    .map(tonic::Response::into_inner)
            })
        })
        .collect();
    let mut tokens = Vec::new();
    for call in calls {
        tokens.push(call.await.unwrap().unwrap().access_token);
    }

    assert_eq!(env.emulator.stats().refresh_requests, 1);
    assert!(
        tokens.iter().all(|token| *token == tokens[0]),
        "calls got different tokens"
    );
    assert!(env.emulator.access_token_valid(&tokens[0]));

    // A later call, after the refresh finished, refreshes again.
    let later = env
        .client
        .refresh_access_token(proto::RefreshAccessTokenRequest {
            user_id: "alice".to_owned(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        later.access_token != tokens[0],
        "a call after the refresh finished returned the old token"
    );
    assert_eq!(env.emulator.stats().refresh_requests, 2);
}

async fn refresh_of_unknown_user_is_not_found(backend: Backend) {
    let mut env = TestEnv::start_on(&backend, Options::default()).await;
    let status = env
        .client
        .refresh_access_token(proto::RefreshAccessTokenRequest {
            user_id: "nobody".to_owned(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    assert_eq!(env.emulator.stats().refresh_requests, 0);
}

async fn watch_follows_refreshes(backend: Backend) {
    let mut env = TestEnv::start_on(&backend, Options::default()).await;
    env.exchange("alice").await;
    let mut stream = watch(&mut env, "alice").await;

    let first = token_of(next_event(&mut stream, PROMPT).await.unwrap());
    let current = env.access_token("alice").await.unwrap();
    assert!(
        first.access_token == current.access_token,
        "the watch's first token is not the current one"
    );

    let refreshed = env
        .client
        .refresh_access_token(proto::RefreshAccessTokenRequest {
            user_id: "alice".to_owned(),
        })
        .await
        .unwrap()
        .into_inner();
    let second = token_of(next_event(&mut stream, PROMPT).await.unwrap());
    assert!(
        second.access_token == refreshed.access_token,
        "the watch did not send the refreshed token"
    );
    assert!(
        second.access_token != first.access_token,
        "the watch sent the old token again"
    );

    // A new exchange is announced too.
    env.exchange("alice").await;
    let third = token_of(next_event(&mut stream, PROMPT).await.unwrap());
    let current = env.access_token("alice").await.unwrap();
    assert!(
        third.access_token == current.access_token,
        "the watch did not send the exchanged token"
    );

    env.client
        .delete_token_set(proto::DeleteTokenSetRequest {
            user_id: "alice".to_owned(),
        })
        .await
        .unwrap();
    let ended = next_event(&mut stream, PROMPT).await.unwrap_err();
    assert_eq!(ended.code(), Code::NotFound);
}

async fn watch_sees_scheduled_refresh(backend: Backend) {
    let options = Options {
        expires_in: 6,
        refresh_before: Duration::from_secs(1),
        ..Options::default()
    };
    let mut env = TestEnv::start_on(&backend, options).await;
    env.exchange("alice").await;
    let mut stream = watch(&mut env, "alice").await;
    let first = token_of(next_event(&mut stream, PROMPT).await.unwrap());

    let second = token_of(
        next_event(&mut stream, Duration::from_secs(15))
            .await
            .unwrap(),
    );
    assert!(
        second.access_token != first.access_token,
        "the watch sent the old token again"
    );
    assert!(env.emulator.access_token_valid(&second.access_token));
    assert!(env.emulator.stats().refreshes >= 1);
}

async fn watch_ends_on_reauth(backend: Backend) {
    let mut env = TestEnv::start_on(&backend, Options::default()).await;
    env.exchange("alice").await;
    let mut stream = watch(&mut env, "alice").await;
    token_of(next_event(&mut stream, PROMPT).await.unwrap());

    env.emulator.revoke_customer("alice");
    let refresh = env
        .client
        .refresh_access_token(proto::RefreshAccessTokenRequest {
            user_id: "alice".to_owned(),
        })
        .await
        .unwrap_err();
    assert_eq!(refresh.code(), Code::FailedPrecondition);

    match next_event(&mut stream, PROMPT).await.unwrap() {
        Some(Event::StatusChange(change)) => {
            assert_eq!(change.status(), proto::TokenStatus::ReauthRequired);
            assert!(!change.reason.is_empty());
        }
        other => panic!("expected a status change, got {:?}", other.is_some()),
    }
    let end = next_event(&mut stream, PROMPT).await.unwrap();
    assert!(end.is_none(), "the stream went on after the status change");
}

async fn watch_ends_on_shutdown(backend: Backend) {
    let mut env = TestEnv::start_on(&backend, Options::default()).await;
    env.exchange("alice").await;
    let mut stream = watch(&mut env, "alice").await;
    token_of(next_event(&mut stream, PROMPT).await.unwrap());

    let daemon = env.daemon.take().unwrap();
    let stopped = tokio::spawn(daemon.shutdown());
    let ended = next_event(&mut stream, PROMPT).await.unwrap_err();
    assert_eq!(ended.code(), Code::Unavailable);
    assert!(ended.message().contains("shutting down"));
    // The open stream must not hold up shutdown until the grace period ends.
    tokio::time::timeout(Duration::from_secs(8), stopped)
        .await
        .expect("shutdown waited for the watch")
        .unwrap()
        .unwrap();
}

async fn watch_of_unknown_user_is_not_found(backend: Backend) {
    let mut env = TestEnv::start_on(&backend, Options::default()).await;
    let status = env
        .client
        .watch_access_token(proto::WatchAccessTokenRequest {
            user_id: "nobody".to_owned(),
            min_valid_seconds: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
}

/// Two replicas on one PostgreSQL database: concurrent RefreshAccessToken calls on both
/// cause one refresh, and a watch on one replica sees the other's refreshes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replicas_share_refreshes_and_watches() {
    let Some(backend) = Backend::postgres() else {
        return;
    };
    let mut env = TestEnv::start_on(&backend, Options::default()).await;
    let (second, second_client) = env.start_replica("second").await;
    env.exchange("alice").await;
    let mut stream = watch(&mut env, "alice").await;
    let first = token_of(next_event(&mut stream, PROMPT).await.unwrap());

    env.emulator
        .inject(Fault::DelayBefore(Duration::from_millis(1500)), Some(1));
    let calls: Vec<_> = (0..8)
        .map(|index| {
            let mut client = if index % 2 == 0 {
                env.client.clone()
            } else {
                second_client.clone()
            };
            tokio::spawn(async move {
                client
                    .refresh_access_token(proto::RefreshAccessTokenRequest {
                        user_id: "alice".to_owned(),
                    })
                    .await
                    .map(tonic::Response::into_inner)
            })
        })
        .collect();
    let mut tokens = Vec::new();
    for call in calls {
        tokens.push(call.await.unwrap().unwrap().access_token);
    }
    assert_eq!(env.emulator.stats().refresh_requests, 1);
    assert!(
        tokens.iter().all(|token| *token == tokens[0]),
        "replicas returned different tokens"
    );
    let watched = token_of(next_event(&mut stream, PROMPT).await.unwrap());
    assert!(
        watched.access_token == tokens[0],
        "the watch did not send the shared refresh's token"
    );
    assert!(
        watched.access_token != first.access_token,
        "the watch sent the old token again"
    );

    // A refresh on the second replica alone reaches the watch on the first.
    let mut client = second_client.clone();
    let refreshed = client
        .refresh_access_token(proto::RefreshAccessTokenRequest {
            user_id: "alice".to_owned(),
        })
        .await
        .unwrap()
        .into_inner();
    let watched = token_of(next_event(&mut stream, PROMPT).await.unwrap());
    assert!(
        watched.access_token == refreshed.access_token,
        "the watch did not send the second replica's token"
    );
    assert_eq!(env.emulator.stats().refresh_requests, 2);

    drop(stream);
    second.shutdown().await.unwrap();
}

/// A RefreshAccessToken call that finds another replica's claim waits for it: it returns
/// that replica's tokens when the claim ends with a write, and refreshes itself when the
/// claim is released without one. The other replica is played by a second store handle.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn refresh_waits_for_foreign_claim() {
    use tokend::{
        settings::StorageEncryption,
        store::{self, Claim, NewTokens, TokenSetKey, encryption::TokenCipher},
    };

    let Some(backend) = Backend::postgres() else {
        return;
    };
    let mut env = TestEnv::start_on(&backend, Options::default()).await;
    env.exchange("alice").await;
    // The second handle needs the daemon's key to write tokens the daemon can read.
    let cipher = match env.options.encryption.clone() {
        Some(StorageEncryption::Keys(keyring)) => TokenCipher::new(keyring),
        _ => TokenCipher::plaintext(),
    };
    let other = store::connect(&env.database_url, cipher).await.unwrap();
    let key = TokenSetKey::new("alice");
    let claim = |token: i64| Claim {
        owner: "other".to_owned(),
        token,
        until: chrono::Utc::now() + chrono::Duration::seconds(30),
    };
    let refresh = |mut client: support::Client| async move {
        client
            .refresh_access_token(proto::RefreshAccessTokenRequest {
                user_id: "alice".to_owned(),
            })
            .await
            .map(tonic::Response::into_inner)
    };

    // The other replica's refresh ends with new tokens, which the call returns.
    let now = chrono::Utc::now();
    other.claim(&key, &claim(1), now).await.unwrap().unwrap();
    let call = tokio::spawn(refresh(env.client.clone()));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!call.is_finished(), "the call did not wait for the claim");
    let access = SecretString::from("written-by-other");
    let scopes = vec!["offline".to_owned()];
    let tokens = NewTokens {
        access_token: &access,
        refresh_token: None,
        scopes: &scopes,
        lifetime_seconds: 3600,
        expires_at: chrono::Utc::now() + chrono::Duration::hours(1),
        next_refresh_at: Some(chrono::Utc::now() + chrono::Duration::minutes(50)),
    };
    other
        .store_refreshed(&key, 1, &tokens, "other", chrono::Utc::now())
        .await
        .unwrap()
        .unwrap();
    let joined = call.await.unwrap().unwrap();
    assert!(
        joined.access_token == "written-by-other",
        "the call did not return the other replica's token"
    );
    assert_eq!(env.emulator.stats().refresh_requests, 0);

    // A claim released without a write leaves nothing to join, so the call refreshes.
    other
        .claim(&key, &claim(2), chrono::Utc::now())
        .await
        .unwrap()
        .unwrap();
    let call = tokio::spawn(refresh(env.client.clone()));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(other.release(&key, 2).await.unwrap());
    let refreshed = call.await.unwrap().unwrap();
    assert!(env.emulator.access_token_valid(&refreshed.access_token));
    assert_eq!(env.emulator.stats().refresh_requests, 1);
    other.close().await;
}

backend_tests! {
    health_follows_lifecycle,
    shutdown_cuts_open_health_watch,
    reflection_lists_services,
    list_pages_through_token_sets,
    list_survives_concurrent_writes,
    import_then_refresh_and_serve,
    expired_import_refreshes_at_once,
    concurrent_refreshes_share_one,
    refresh_of_unknown_user_is_not_found,
    watch_follows_refreshes,
    watch_sees_scheduled_refresh,
    watch_ends_on_reauth,
    watch_ends_on_shutdown,
    watch_of_unknown_user_is_not_found,
}
