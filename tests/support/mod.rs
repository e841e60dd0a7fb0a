//! A test harness: the daemon on port 0 with a fresh SQLite file, the Tiki emulator over
//! HTTP, and a generated gRPC client.

#![allow(dead_code)]

pub mod pki;
pub mod proxy;

use std::{
    future::Future,
    time::{Duration, Instant},
};

use secrecy::SecretString;
use tempfile::TempDir;
use tokend::{
    emulator::{Emulator, EmulatorConfig},
    proto::{self, token_service_client::TokenServiceClient},
    server::Daemon,
    settings::{AccessSettings, Settings, StorageEncryption},
    store::encryption::{EncryptionKey, Keyring},
};
use tonic::transport::Channel;

pub type Client = TokenServiceClient<Channel>;

/// Environment variable naming a PostgreSQL database in which each test creates a
/// schema of its own.
pub const POSTGRES_URL_VARIABLE: &str = "TOKEND_TEST_POSTGRES_URL";

/// The store a test runs against.
#[derive(Debug, Clone)]
pub enum Backend {
    Sqlite,
    /// The URL of a database in which the test may create schemas.
    Postgres(String),
}

impl Backend {
    /// Returns the PostgreSQL backend, or `None` (with a note on stderr) when the
    /// variable is unset outside CI. In CI a missing variable fails the test.
    pub fn postgres() -> Option<Backend> {
        match std::env::var(POSTGRES_URL_VARIABLE) {
            Ok(url) if !url.is_empty() => Some(Backend::Postgres(url)),
            _ if std::env::var("CI").is_ok_and(|value| value == "true") => {
                panic!("{POSTGRES_URL_VARIABLE} must be set when CI=true")
            }
            _ => {
                eprintln!("skipped: set {POSTGRES_URL_VARIABLE} to run the PostgreSQL variant");
                None
            }
        }
    }

    /// Returns a database URL for a fresh, empty store of this backend, with a SQLite
    /// file under `dir`.
    pub async fn fresh_database(&self, dir: &std::path::Path) -> String {
        match self {
            Backend::Sqlite => format!("sqlite://{}", dir.join("tokend.db").display()),
            Backend::Postgres(url) => {
                let schema = format!("test_{:016x}", rand::random::<u64>());
                let pool = sqlx::PgPool::connect(url).await.unwrap();
                sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}")))
                    .execute(&pool)
                    .await
                    .unwrap();
                pool.close().await;
                let separator = if url.contains('?') { '&' } else { '?' };
                format!("{url}{separator}options=-c%20search_path%3D{schema}")
            }
        }
    }
}

/// Generates, for each named `async fn name(backend: Backend)`, a test `sqlite::name`
/// and a test `postgres::name`.
#[macro_export]
macro_rules! backend_tests {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    super::$name(super::support::Backend::Sqlite).await;
                }
            )*
        }

        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    if let Some(backend) = super::support::Backend::postgres() {
                        super::$name(backend).await;
                    }
                }
            )*
        }
    };
}

/// How a test environment is built.
#[derive(Debug, Clone)]
pub struct Options {
    /// Lifetime of the tokens the emulator issues, in seconds.
    pub expires_in: u64,
    pub refresh_before: Duration,
    pub http_timeout: Duration,
    /// Scheduler pass age after which `/healthz` fails.
    pub max_tick_age: Duration,
    /// TLS and API keys on the gRPC port. The harness's own client speaks plain HTTP/2
    /// without a key, so tests that set this build their own client.
    pub access: AccessSettings,
    /// The token encryption. `None` picks a default at start: the key file beside a
    /// SQLite database, or one random key on PostgreSQL because it requires a key.
    pub encryption: Option<StorageEncryption>,
    pub exchange_retry_window: Duration,
    /// Scheduled refreshes in flight at once.
    pub refresh_concurrency: usize,
    pub tiki_max_concurrent_requests: usize,
    /// Requests to Tiki started per second; 0 for no limit.
    pub tiki_requests_per_second: u32,
    pub tiki_credentials_retry: Duration,
    /// Where the daemon sends requests to Tiki, when not straight to the emulator.
    pub tiki_graphql_url: Option<String>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            expires_in: 3600,
            refresh_before: Duration::from_secs(300),
            http_timeout: Duration::from_secs(5),
            max_tick_age: Duration::from_secs(60),
            access: AccessSettings::default(),
            encryption: None,
            exchange_retry_window: Duration::from_secs(600),
            refresh_concurrency: 16,
            tiki_max_concurrent_requests: 32,
            tiki_requests_per_second: 0,
            tiki_credentials_retry: Duration::from_secs(60),
            tiki_graphql_url: None,
        }
    }
}

/// Returns a keyring of one random key.
pub fn random_keyring() -> Keyring {
    Keyring::new(vec![EncryptionKey::generate().0]).unwrap()
}

/// The daemon, the emulator it talks to, and a client.
pub struct TestEnv {
    pub emulator: Emulator,
    pub daemon: Option<Daemon>,
    pub client: Client,
    pub database_url: String,
    pub backend: Backend,
    /// The options the daemon runs with; [`TestEnv::restart`] applies changes.
    pub options: Options,
    _dir: TempDir,
}

impl TestEnv {
    /// Starts on a fresh SQLite file.
    pub async fn start(options: Options) -> TestEnv {
        Self::start_on(&Backend::Sqlite, options).await
    }

    /// Starts on a fresh store of `backend`.
    pub async fn start_on(backend: &Backend, mut options: Options) -> TestEnv {
        if options.encryption.is_none() {
            options.encryption = Some(match backend {
                Backend::Sqlite => StorageEncryption::KeyFileBesideDatabase,
                Backend::Postgres(_) => {
                    StorageEncryption::Keys(std::sync::Arc::new(random_keyring()))
                }
            });
        }
        let dir = tempfile::tempdir().unwrap();
        let database_url = backend.fresh_database(dir.path()).await;
        let emulator = Emulator::start(EmulatorConfig {
            expires_in: options.expires_in,
            ..EmulatorConfig::default()
        })
        .await
        .unwrap();
        let daemon = Daemon::start(&settings(&emulator, &database_url, &options))
            .await
            .unwrap();
        let client = connect(&daemon).await;
        TestEnv {
            emulator,
            daemon: Some(daemon),
            client,
            database_url,
            backend: backend.clone(),
            options,
            _dir: dir,
        }
    }

    /// Stops the daemon and starts a new one with `options` on the same database.
    pub async fn restart_with(&mut self, options: Options) {
        self.options = options;
        self.restart().await;
    }

    /// Stops the daemon, unless the test already did, and starts a new one on the same
    /// database with `options` as they are now.
    pub async fn restart(&mut self) {
        if let Some(daemon) = self.daemon.take() {
            daemon.shutdown().await.unwrap();
        }
        let daemon = Daemon::start(&settings(&self.emulator, &self.database_url, &self.options))
            .await
            .unwrap();
        self.client = connect(&daemon).await;
        self.daemon = Some(daemon);
    }

    /// Returns the path of the SQLite file; panics on other backends.
    pub fn sqlite_path(&self) -> std::path::PathBuf {
        let path = self
            .database_url
            .strip_prefix("sqlite://")
            .expect("the test runs on SQLite");
        std::path::PathBuf::from(path)
    }

    pub fn daemon(&self) -> &Daemon {
        self.daemon.as_ref().unwrap()
    }

    /// Gets an auth code for `user_id` from the emulator and exchanges it.
    pub async fn exchange(&mut self, user_id: &str) -> proto::TokenSetInfo {
        let auth_code = self
            .emulator
            .issue_auth_code(user_id, &["offline", "user_profile"]);
        self.client
            .exchange_auth_code(proto::ExchangeAuthCodeRequest {
                user_id: user_id.to_owned(),
                auth_code,
            })
            .await
            .unwrap()
            .into_inner()
    }

    pub async fn access_token(
        &mut self,
        user_id: &str,
    ) -> Result<proto::AccessToken, tonic::Status> {
        self.client
            .get_access_token(proto::GetAccessTokenRequest {
                user_id: user_id.to_owned(),
                min_valid_seconds: 0,
            })
            .await
            .map(tonic::Response::into_inner)
    }

    /// Polls the metadata of `user_id`'s token set until `check` accepts it, and panics
    /// naming `condition` after `limit`.
    pub async fn wait_for_token_set(
        &self,
        user_id: &str,
        condition: &str,
        limit: Duration,
        check: impl Fn(&proto::TokenSetInfo) -> bool,
    ) {
        let check = &check;
        wait_until(condition, limit, || {
            let mut client = self.client.clone();
            let request = proto::GetTokenSetRequest {
                user_id: user_id.to_owned(),
            };
            async move {
                let info = client.get_token_set(request).await.unwrap().into_inner();
                check(&info)
            }
        })
        .await;
    }

    /// Starts a second daemon named `replica_id` on the same database and emulator, and
    /// returns it with a client. Only PostgreSQL allows this.
    pub async fn start_replica(&self, replica_id: &str) -> (Daemon, Client) {
        let settings = Settings {
            replica_id: replica_id.to_owned(),
            ..settings(&self.emulator, &self.database_url, &self.options)
        };
        let daemon = Daemon::start(&settings).await.unwrap();
        let client = connect(&daemon).await;
        (daemon, client)
    }

    /// Sends a GET to the admin server and returns the status code and body.
    pub async fn admin_get(&self, path: &str) -> (u16, String) {
        let url = format!("http://{}{path}", self.daemon().admin_addr());
        let response = reqwest::get(&url).await.unwrap();
        let status = response.status().as_u16();
        (status, response.text().await.unwrap())
    }

    /// Exchanges auth codes for `count` users named `{prefix}-{index}` and returns the
    /// user ids.
    pub async fn exchange_many(&mut self, prefix: &str, count: usize) -> Vec<String> {
        let mut user_ids = Vec::with_capacity(count);
        for index in 0..count {
            let user_id = format!("{prefix}-{index}");
            self.exchange(&user_id).await;
            user_ids.push(user_id);
        }
        user_ids
    }

    pub async fn token_set(&mut self, user_id: &str) -> proto::TokenSetInfo {
        self.client
            .get_token_set(proto::GetTokenSetRequest {
                user_id: user_id.to_owned(),
            })
            .await
            .unwrap()
            .into_inner()
    }
}

/// Returns the daemon settings a test environment uses.
pub fn settings(emulator: &Emulator, database_url: &str, options: &Options) -> Settings {
    Settings {
        client_id: "sandbox-client".to_owned(),
        client_secret: SecretString::from("sandbox-secret"),
        tiki_graphql_url: options
            .tiki_graphql_url
            .clone()
            .unwrap_or_else(|| emulator.graphql_url()),
        database_url: database_url.to_owned(),
        grpc_addr: "127.0.0.1:0".parse().unwrap(),
        admin_addr: "127.0.0.1:0".parse().unwrap(),
        max_tick_age: options.max_tick_age,
        refresh_before: options.refresh_before,
        http_timeout: options.http_timeout,
        refresh_concurrency: options.refresh_concurrency,
        cache_capacity: 1000,
        shutdown_grace: Duration::from_secs(10),
        refresh_lease: options.http_timeout + Duration::from_secs(10),
        replica_id: "test".to_owned(),
        access: options.access.clone(),
        encryption: options
            .encryption
            .clone()
            .unwrap_or_else(|| default_encryption(database_url)),
        exchange_retry_window: options.exchange_retry_window,
        tiki_max_concurrent_requests: options.tiki_max_concurrent_requests,
        tiki_requests_per_second: options.tiki_requests_per_second,
        tiki_credentials_retry: options.tiki_credentials_retry,
    }
}

/// Returns the encryption a test gets unless it chooses one: the key file beside a
/// SQLite database, or a random key on PostgreSQL, which has no file to put it beside.
fn default_encryption(database_url: &str) -> StorageEncryption {
    if database_url.starts_with("postgres") {
        StorageEncryption::Keys(std::sync::Arc::new(random_keyring()))
    } else {
        StorageEncryption::KeyFileBesideDatabase
    }
}

async fn connect(daemon: &Daemon) -> Client {
    TokenServiceClient::connect(format!("http://{}", daemon.grpc_addr()))
        .await
        .unwrap()
}

/// Polls `check` every 100 ms until it returns true, and panics naming `condition` after
/// `limit`.
pub async fn wait_until<F, Fut>(condition: &str, limit: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while !check().await {
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting until {condition}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Six-second tokens with a one-second lead: the scheduler refreshes 1.0 to 1.2 s
/// before expiry, while GetAccessToken refreshes on demand once less than 3 s remain.
/// Between the two there is a window in which only an on-demand call refreshes.
pub fn on_demand_window() -> Options {
    Options {
        expires_in: 6,
        refresh_before: Duration::from_secs(1),
        ..Options::default()
    }
}

/// Sleeps until the token set whose access token expires at `expires_at` has about
/// 2.5 s left, which is inside the on-demand window of [`on_demand_window`].
pub async fn sleep_into_on_demand_window(expires_at: &Option<prost_types::Timestamp>) {
    let wait_ms = millis(expires_at) - now_millis() - 2_500;
    tokio::time::sleep(Duration::from_millis(wait_ms.max(0) as u64)).await;
}

/// Converts a protobuf timestamp to Unix milliseconds.
pub fn millis(timestamp: &Option<prost_types::Timestamp>) -> i64 {
    let timestamp = timestamp.as_ref().expect("timestamp is set");
    timestamp.seconds * 1000 + i64::from(timestamp.nanos / 1_000_000)
}

pub fn now_millis() -> i64 {
    chrono::Utc::now().timestamp_millis()
}
