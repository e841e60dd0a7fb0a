//! Secret hygiene. Every type that carries a token, auth code or the client secret
//! redacts it in `Debug`. A full scenario logged at trace level (exchange, refresh,
//! rotation and every failure path Tiki can cause) leaves no issued token, auth code,
//! request signature or client secret in the log or in a gRPC error message.

mod support;

use std::{net::SocketAddr, path::Path, sync::Arc, time::Duration};

use chrono::Utc;
use secrecy::{ExposeSecret, SecretString};
use support::{Options, TestEnv, wait_until};
use tokend::{
    emulator::{EmulatorConfig, Fault},
    proto,
    settings::{Settings, StorageEncryption},
    store::{
        NewTokens, TokenSet, TokenSetKey, TokenStatus,
        encryption::{EncryptionKey, Keyring},
    },
    tiki::{Grant, graphql::GraphqlClient},
    tokens::ServedToken,
};
use tokio::{
    io::copy_bidirectional,
    net::{TcpListener, TcpStream},
    task::{JoinHandle, JoinSet},
};

const SECRET: &str = "debug-secret-value";

fn token_set() -> TokenSet {
    TokenSet {
        key: TokenSetKey::new("alice"),
        status: TokenStatus::Active,
        access_token: SecretString::from(SECRET),
        refresh_token: Some(SecretString::from(SECRET)),
        scopes: vec!["offline".to_owned()],
        lifetime_seconds: 60,
        expires_at: Utc::now(),
        next_refresh_at: None,
        refreshed_at: None,
        failure_count: 0,
        last_error: None,
        outcome_unknown: false,
        version: 1,
        claimed_by: None,
        claim_until: None,
        claim_token: None,
        created_at: Utc::now(),
        updated_at: Utc::now(),
    }
}

/// `Debug` of every type that carries a secret hides it.
#[test]
fn secret_types_redact_debug() {
    let secret = SecretString::from(SECRET);
    let set = token_set();
    let grant = Grant {
        access_token: secret.clone(),
        refresh_token: Some(secret.clone()),
        expires_in: 60,
        scopes: vec![],
    };
    let new_tokens = NewTokens {
        access_token: &secret,
        refresh_token: Some(&secret),
        scopes: &[],
        lifetime_seconds: 60,
        expires_at: Utc::now(),
        next_refresh_at: None,
    };
    let client = GraphqlClient::new(
        "http://127.0.0.1:9/".to_owned(),
        "client".to_owned(),
        secret.clone(),
        Duration::from_secs(1),
    )
    .unwrap();
    let (key, key_text) = EncryptionKey::generate();
    let key_debug = format!("{key:?}");
    let settings = Settings {
        client_id: "client".to_owned(),
        client_secret: secret.clone(),
        tiki_graphql_url: "http://127.0.0.1:9/".to_owned(),
        database_url: "sqlite://x.db".to_owned(),
        grpc_addr: "127.0.0.1:0".parse().unwrap(),
        refresh_before: Duration::from_secs(1),
        http_timeout: Duration::from_secs(1),
        refresh_concurrency: 1,
        cache_capacity: 1,
        shutdown_grace: Duration::from_secs(1),
        refresh_lease: Duration::from_secs(11),
        replica_id: "r".to_owned(),
        tiki_max_concurrent_requests: 1,
        tiki_requests_per_second: 0,
        tiki_credentials_retry: Duration::from_secs(1),
        admin_addr: "127.0.0.1:0".parse().unwrap(),
        max_tick_age: Duration::from_secs(60),
        access: Default::default(),
        encryption: StorageEncryption::Keys(Arc::new(Keyring::new(vec![key]).unwrap())),
        exchange_retry_window: Duration::from_secs(600),
    };
    let emulator_config = EmulatorConfig {
        client_secret: SECRET.to_owned(),
        ..EmulatorConfig::default()
    };
    let exchange_request = proto::ExchangeAuthCodeRequest {
        user_id: "alice".to_owned(),
        auth_code: SECRET.to_owned(),
    };
    let access_token = proto::AccessToken {
        access_token: SECRET.to_owned(),
        expires_at: None,
        scopes: vec![],
    };

    let import_request = proto::ImportTokenSetRequest {
        user_id: "alice".to_owned(),
        access_token: SECRET.to_owned(),
        refresh_token: SECRET.to_owned(),
        expiry: Some(proto::import_token_set_request::Expiry::ExpiresIn(60)),
        scopes: vec![],
        replace_existing: false,
    };

    let renderings = [
        ("TokenSet", format!("{set:?}")),
        ("ServedToken", format!("{:?}", ServedToken::from_set(&set))),
        ("Grant", format!("{grant:?}")),
        ("NewTokens", format!("{new_tokens:?}")),
        ("GraphqlClient", format!("{client:?}")),
        ("Settings", format!("{settings:?}")),
        ("EmulatorConfig", format!("{emulator_config:?}")),
        ("ExchangeAuthCodeRequest", format!("{exchange_request:?}")),
        ("AccessToken", format!("{access_token:?}")),
        ("ImportTokenSetRequest", format!("{import_request:?}")),
    ];
    for (name, text) in renderings {
        assert!(!text.contains(SECRET), "{name} shows a secret in Debug");
        assert!(!text.is_empty(), "{name} renders nothing");
        assert!(
            !text.contains(key_text.expose_secret()),
            "{name} shows an encryption key in Debug"
        );
    }
    assert!(
        !key_debug.contains(key_text.expose_secret()),
        "EncryptionKey shows itself in Debug"
    );
}

/// A log sink shared with the test that reads it back.
#[derive(Clone, Default)]
struct LogBuffer(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl LogBuffer {
    fn text(&self) -> String {
        let bytes = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

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

/// A loopback TCP gateway to the emulator that can be closed, so that connecting is
/// refused, and opened again on the same port.
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

async fn stored_refresh_token(path: &Path, user_id: &str) -> String {
    let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}", path.display()))
        .await
        .unwrap();
    let token: String =
        sqlx::query_scalar("SELECT refresh_token FROM token_sets WHERE user_id = ?1")
            .bind(user_id)
            .fetch_one(&pool)
            .await
            .unwrap();
    pool.close().await;
    token
}

/// Returns the start of each line of `text` that contains `secret`, with the secret
/// masked, so that a failure shows where a secret leaked without printing it.
fn masked_lines(text: &str, secret: &str) -> Vec<String> {
    text.lines()
        .filter(|line| line.contains(secret))
        .map(|line| line.replace(secret, "<SECRET>").chars().take(400).collect())
        .collect()
}

/// Returns the indexes of the `secrets` that occur in `text`.
fn leaked(text: &str, secrets: &[String]) -> Vec<usize> {
    secrets
        .iter()
        .enumerate()
        .filter(|(_, secret)| text.contains(secret.as_str()))
        .map(|(index, _)| index)
        .collect()
}

/// Drives every path through the daemon with all of its targets at trace level. The
/// emulator's own logs are off, because they belong to the test tool. Then checks the
/// log and every gRPC error message against everything the emulator issued and every
/// signature it received.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn trace_log_of_every_path_is_clean() {
    let logs = LogBuffer::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(
            "trace,tokend::emulator=off",
        ))
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    tracing::subscriber::set_global_default(subscriber).unwrap();

    let options = Options {
        expires_in: 10,
        refresh_before: Duration::from_secs(5),
        http_timeout: Duration::from_secs(1),
        tiki_credentials_retry: Duration::from_secs(2),
        ..Options::default()
    };
    let mut env = TestEnv::start(options.clone()).await;
    let mut gateway = Gateway::start(env.emulator.addr()).await;
    env.restart_with(Options {
        tiki_graphql_url: Some(format!("http://{}/tiniapp/api/graphql/query", gateway.addr)),
        ..options
    })
    .await;
    let mut messages: Vec<String> = Vec::new();

    // Exchanges: a success, a reused code, and an unreadable response.
    let users = [
        "rotating",
        "outage",
        "slow",
        "unrecognized",
        "partial",
        "garbage",
        "timeout",
        "credentials",
    ];
    for user_id in users {
        env.exchange(user_id).await;
    }
    let reused = env.emulator.issue_auth_code("reused", &["offline"]);
    for _ in 0..2 {
        let request = proto::ExchangeAuthCodeRequest {
            user_id: "reused".to_owned(),
            auth_code: reused.clone(),
        };
        if let Err(status) = env.client.exchange_auth_code(request).await {
            messages.push(status.message().to_owned());
        }
    }
    env.emulator.inject(Fault::GarbageBody, Some(1));
    let auth_code = env.emulator.issue_auth_code("unreadable", &["offline"]);
    let request = proto::ExchangeAuthCodeRequest {
        user_id: "unreadable".to_owned(),
        auth_code,
    };
    let status = env.client.exchange_auth_code(request).await.unwrap_err();
    messages.push(status.message().to_owned());

    // Refreshes: one fault per user, some echoing the refresh token back.
    let echoed = stored_refresh_token(&env.sqlite_path(), "unrecognized").await;
    let partial = stored_refresh_token(&env.sqlite_path(), "partial").await;
    let customer_faults = [
        ("outage", Fault::Status(502)),
        (
            "slow",
            Fault::StatusAfter {
                status: 503,
                delay: Duration::from_millis(200),
            },
        ),
        (
            "unrecognized",
            Fault::GraphqlError {
                code: "weird_failure".to_owned(),
                message: format!("could not refresh {echoed}"),
            },
        ),
        (
            "partial",
            Fault::TokensWithErrors {
                message: format!("partial result for {partial}"),
            },
        ),
        ("garbage", Fault::GarbageBody),
        ("timeout", Fault::DelayAfter(Duration::from_secs(2))),
        (
            "credentials",
            Fault::GraphqlError {
                code: "invalid_signature".to_owned(),
                message: "signature mismatch".to_owned(),
            },
        ),
    ];
    for (user_id, fault) in customer_faults {
        env.emulator.inject_for_customer(user_id, fault);
    }
    env.emulator.inject(
        Fault::TooManyRequests {
            retry_after_seconds: 1,
        },
        Some(1),
    );

    for user_id in ["garbage", "timeout"] {
        env.wait_for_token_set(
            user_id,
            "reauth_required",
            Duration::from_secs(30),
            |info| info.status() == proto::TokenStatus::ReauthRequired,
        )
        .await;
    }
    env.wait_for_token_set("rotating", "a refresh", Duration::from_secs(20), |info| {
        info.refreshed_at.is_some()
    })
    .await;

    // A refused connection, then recovery of everything once the faults clear.
    gateway.close();
    tokio::time::sleep(Duration::from_secs(3)).await;
    gateway.open().await;
    env.emulator.clear_faults();
    for user_id in ["outage", "slow", "unrecognized", "credentials"] {
        env.wait_for_token_set(user_id, "recovery", Duration::from_secs(30), |info| {
            info.status() == proto::TokenStatus::Active && info.refreshed_at.is_some()
        })
        .await;
    }
    wait_until("a second rotation", Duration::from_secs(20), || {
        let refreshes = env.emulator.stats().refreshes;
        async move { refreshes >= 8 }
    })
    .await;

    for user_id in users.iter().chain(&["reused", "unreadable"]) {
        match env.access_token(user_id).await {
            Ok(_) => {}
            Err(status) => messages.push(status.message().to_owned()),
        }
        let request = proto::GetTokenSetRequest {
            user_id: (*user_id).to_owned(),
        };
        match env.client.get_token_set(request).await {
            Ok(info) => messages.push(info.into_inner().last_error),
            Err(status) => messages.push(status.message().to_owned()),
        }
    }
    env.daemon.take().unwrap().shutdown().await.unwrap();

    let text = logs.text();
    for expected in [
        "token set stored",
        "token set refreshed",
        "refresh failed; will retry",
        "the user must consent again",
        "auth code exchange failed",
        "Tiki returned HTTP 429",
        "Tiki rejected tokend's client credentials",
        "Tiki accepts tokend's client credentials again",
        "Tiki returned tokens together with errors",
        "connecting failed",
        "tokend stopped",
    ] {
        assert!(
            text.contains(expected),
            "the log has no line with {expected:?}"
        );
    }

    let mut secrets = env.emulator.issued_secrets();
    let issued = secrets.len();
    let signatures = env.emulator.received_signatures();
    let signature_count = signatures.len();
    secrets.extend(signatures);
    secrets.push("sandbox-secret".to_owned());
    println!(
        "secrets: {} log bytes checked against {issued} issued codes and tokens, \
         {signature_count} signatures and the client secret; {} gRPC messages checked",
        text.len(),
        messages.len()
    );
    assert!(issued >= 20, "only {issued} secrets were issued");
    let in_log = leaked(&text, &secrets);
    let lines: Vec<String> = in_log
        .iter()
        .flat_map(|index| masked_lines(&text, &secrets[*index]))
        .take(5)
        .collect();
    assert!(
        in_log.is_empty(),
        "secrets number {in_log:?} appear in the log, in lines such as {lines:#?}"
    );
    for message in &messages {
        let in_message = leaked(message, &secrets);
        assert!(
            in_message.is_empty(),
            "secrets number {in_message:?} appear in a gRPC message"
        );
    }
}
