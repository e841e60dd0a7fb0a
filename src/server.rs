//! Builds the daemon from its settings, serves gRPC and runs the scheduler, and shuts
//! down in order: stop accepting calls and starting refreshes, let calls and refreshes
//! in flight (scheduled, then on-demand ones whose caller left) finish within the grace
//! period each, then close the database. The admin server responds throughout, with
//! `/readyz` failing from the start of shutdown, and stops last.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use anyhow::Context as _;
use tokio::{net::TcpListener, task::JoinHandle};
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::Server;
use tonic_health::{ServingStatus, server::HealthReporter};
use tracing::{error, info, warn};

use crate::{
    access::AuthLayer,
    admin::{self, AdminState},
    grpc::{MAX_REQUEST_BYTES, TokenGrpcService},
    proto::{self, token_service_server::TokenServiceServer},
    refresh::RefreshPolicy,
    scheduler::{Scheduler, SchedulerStats},
    settings::{Settings, StorageEncryption},
    store::{
        self, TokenStore,
        encryption::{TokenCipher, key_file_is_shared, load_or_create_key_file},
        sqlite,
    },
    telemetry,
    tiki::graphql::GraphqlClient,
    tokens::{ManagerSettings, TokenManager},
};

/// How often the health reporter queries the store again after a failed query.
const HEALTH_RETRY_DELAY: Duration = Duration::from_secs(1);

/// The name gRPC health checks use for `tokend.v1.TokenService`.
const TOKEN_SERVICE_NAME: &str =
    <TokenServiceServer<TokenGrpcService> as tonic::server::NamedService>::NAME;

/// How long shutdown waits for the database connections to close.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(10);

/// A running daemon.
#[derive(Debug)]
pub struct Daemon {
    grpc_addr: SocketAddr,
    admin_addr: SocketAddr,
    admin_state: AdminState,
    shutdown: CancellationToken,
    scheduler_stats: Arc<SchedulerStats>,
    manager: Arc<TokenManager>,
    task: JoinHandle<anyhow::Result<()>>,
}

impl Daemon {
    /// Binds the gRPC and admin addresses, opens and migrates the database, and starts
    /// serving and refreshing. Binding first means a taken port fails before anything
    /// is written. Port 0 binds a free port, which [`Daemon::grpc_addr`] and
    /// [`Daemon::admin_addr`] return.
    pub async fn start(settings: &Settings) -> anyhow::Result<Daemon> {
        let listener = TcpListener::bind(settings.grpc_addr)
            .await
            .with_context(|| {
                format!(
                    "binding the gRPC address {} failed; set TOKEND_GRPC_ADDR to a free address",
                    settings.grpc_addr
                )
            })?;
        let grpc_addr = listener.local_addr()?;
        let admin_listener = TcpListener::bind(settings.admin_addr)
            .await
            .with_context(|| {
                format!(
                    "binding the admin address {} failed; set TOKEND_ADMIN_ADDR to a free address",
                    settings.admin_addr
                )
            })?;
        let admin_addr = admin_listener.local_addr()?;
        telemetry::prometheus();
        let cipher = token_cipher(&settings.database_url, &settings.encryption)?;
        let store = store::connect(&settings.database_url, cipher.clone()).await?;
        info!(database_url = %store::redact_url(&settings.database_url), "database ready");
        report_key_ids(store.as_ref(), &cipher).await;

        let tiki = GraphqlClient::new(
            settings.tiki_graphql_url.clone(),
            settings.client_id.clone(),
            settings.client_secret.clone(),
            settings.http_timeout,
        )
        .context("building the HTTP client for Tiki failed")?;
        let policy = RefreshPolicy {
            refresh_before: settings.refresh_before,
            credentials_retry: settings.tiki_credentials_retry,
            ..RefreshPolicy::default()
        };
        let manager = Arc::new(TokenManager::new(
            store.clone(),
            Arc::new(tiki),
            policy,
            ManagerSettings {
                cache_capacity: settings.cache_capacity,
                replica_id: settings.replica_id.clone(),
                lease: settings.refresh_lease,
                claim_wait: settings.http_timeout,
                exchange_retry_window: settings.exchange_retry_window,
                max_concurrent_requests: settings.tiki_max_concurrent_requests,
                requests_per_second: settings.tiki_requests_per_second,
            },
        ));

        let shutdown = CancellationToken::new();
        let scheduler_stats = Arc::new(SchedulerStats::default());
        let scheduler = Scheduler::new(
            manager.clone(),
            settings.refresh_concurrency,
            scheduler_stats.clone(),
        );
        let scheduler_task = tokio::spawn(scheduler.run(shutdown.clone(), settings.shutdown_grace));
        let events_task = {
            let manager = manager.clone();
            let shutdown = shutdown.clone();
            tokio::spawn(async move { manager.follow_store_events(shutdown).await })
        };

        let admin_stop = CancellationToken::new();
        let admin_state = AdminState::new(
            store.clone(),
            scheduler_stats.clone(),
            shutdown.clone(),
            settings.max_tick_age,
        )
        .with_manager(manager.clone());
        let admin_task = tokio::spawn(admin::serve(
            admin_listener,
            admin_state.clone(),
            admin_stop.clone(),
        ));

        let token_service =
            TokenServiceServer::new(TokenGrpcService::new(manager.clone(), shutdown.clone()))
                .max_decoding_message_size(MAX_REQUEST_BYTES);
        let (health, health_service) = tonic_health::server::health_reporter();
        set_health(&health, ServingStatus::NotServing).await;
        let mut builder = Server::builder();
        if let Some(tls) = &settings.access.tls {
            builder = builder
                .tls_config(tls.server_config())
                .context("configuring TLS on the gRPC port failed")?;
        }
        log_access(settings, grpc_addr);
        // The metrics layer sits outside the API key check, so rejected calls are
        // counted with their status code too.
        let server = builder
            .layer(telemetry::grpc::GrpcMetricsLayer)
            .layer(AuthLayer::new(settings.access.api_keys.clone()))
            .add_service(token_service)
            .add_service(health_service)
            .add_service(reflection().build_v1()?)
            .add_service(reflection().build_v1alpha()?)
            .serve_with_incoming_shutdown(
                TcpListenerStream::new(listener),
                shutdown.clone().cancelled_owned(),
            );
        tokio::spawn(report_health(health, store.clone(), shutdown.clone()));
        let stop_scheduler = shutdown.clone();
        let grace = settings.shutdown_grace;
        let daemon_manager = manager.clone();
        let task = tokio::spawn(async move {
            let served = serve_within_grace(server, &stop_scheduler, grace).await;
            if let Err(error) = &served {
                error!(%error, "gRPC server failed");
                // Stop the scheduler too, so that the daemon exits instead of running
                // without a way to reach it.
                stop_scheduler.cancel();
            }
            let scheduled = scheduler_task.await;
            manager.drain_refreshes(grace).await;
            events_task.abort();
            if tokio::time::timeout(CLOSE_TIMEOUT, store.close())
                .await
                .is_err()
            {
                warn!(timeout = ?CLOSE_TIMEOUT, "closing the database timed out; exiting anyway");
            }
            admin_stop.cancel();
            match admin_task.await {
                Ok(Ok(())) => {}
                Ok(Err(error)) => warn!(%error, "the admin server failed"),
                Err(error) => warn!(%error, "the admin server panicked"),
            }
            served.context("gRPC server failed")?;
            scheduled.context("refresh scheduler panicked")??;
            info!("tokend stopped");
            Ok(())
        });
        info!(%grpc_addr, replica_id = %settings.replica_id, "gRPC server listening");
        info!(%admin_addr, "admin server listening on /metrics, /healthz and /readyz");

        Ok(Daemon {
            grpc_addr,
            admin_addr,
            admin_state,
            shutdown,
            scheduler_stats,
            manager: daemon_manager,
            task,
        })
    }

    /// Returns the address the gRPC server listens on.
    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc_addr
    }

    /// Returns the address the admin HTTP server listens on.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// Returns a token that is cancelled when shutdown begins. Cancelling it does not
    /// shut the daemon down.
    pub fn shutdown_started(&self) -> CancellationToken {
        self.shutdown.child_token()
    }

    /// Returns the state the health checks read: the store, the scheduler's counters
    /// and the limits.
    pub fn admin_state(&self) -> &AdminState {
        &self.admin_state
    }

    /// Counters of the refresh scheduler.
    pub fn scheduler_stats(&self) -> &Arc<SchedulerStats> {
        &self.scheduler_stats
    }

    /// Returns the token manager, for state that spans token sets such as
    /// [`TokenManager::credentials_alarm`].
    pub fn manager(&self) -> &Arc<TokenManager> {
        &self.manager
    }

    /// Shuts down in order and waits until the daemon has stopped.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        self.task.await.context("the daemon task panicked")?
    }

    /// Runs until SIGINT or SIGTERM, then shuts down in order. A second signal during
    /// shutdown exits at once.
    pub async fn run_until_signal(self) -> anyhow::Result<()> {
        let shutdown = self.shutdown.clone();
        tokio::select! {
            () = wait_for_signal() => {
                info!("shutdown signal received; finishing calls and refreshes in flight");
            }
            () = shutdown.cancelled() => {}
        }
        tokio::spawn(async {
            wait_for_signal().await;
            warn!("second shutdown signal received; exiting at once");
            std::process::exit(130);
        });
        self.shutdown().await
    }
}

/// Builds server reflection for tokend's and the health service's protos.
fn reflection() -> tonic_reflection::server::Builder<'static> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
}

/// Sets the health of the whole server (the empty service name) and of TokenService.
async fn set_health(health: &HealthReporter, status: ServingStatus) {
    health.set_service_status("", status).await;
    health.set_service_status(TOKEN_SERVICE_NAME, status).await;
}

/// Reports SERVING once a query to the migrated store succeeds, retrying every
/// `HEALTH_RETRY_DELAY`, and NOT_SERVING again when shutdown starts.
async fn report_health(
    health: HealthReporter,
    store: Arc<dyn TokenStore>,
    shutdown: CancellationToken,
) {
    loop {
        match store.list(None, &[], 1).await {
            Ok(_) => break,
            Err(error) => {
                warn!(%error, "querying the store failed; gRPC health stays NOT_SERVING");
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(HEALTH_RETRY_DELAY) => {}
        }
    }
    set_health(&health, ServingStatus::Serving).await;
    info!("gRPC health is SERVING");
    shutdown.cancelled().await;
    set_health(&health, ServingStatus::NotServing).await;
}

/// Serves until shutdown, then lets calls in flight finish for up to `grace`. Streams
/// that never end by themselves, such as a health watch, are cut after it.
async fn serve_within_grace(
    server: impl Future<Output = Result<(), tonic::transport::Error>>,
    shutdown: &CancellationToken,
    grace: Duration,
) -> Result<(), tonic::transport::Error> {
    let deadline = async {
        shutdown.cancelled().await;
        tokio::time::sleep(grace).await;
    };
    tokio::select! {
        served = server => served,
        () = deadline => {
            warn!(?grace, "gRPC calls still open after the grace period were cut");
            Ok(())
        }
    }
}

/// Logs how callers are authenticated, and warns about a setup that lets anyone who
/// reaches a non-loopback port read tokens.
fn log_access(settings: &Settings, grpc_addr: SocketAddr) {
    let access = &settings.access;
    let client_certificates = access
        .tls
        .as_ref()
        .is_some_and(|tls| tls.client_ca_pem.is_some());
    let api_keys = access.api_keys.as_ref().map_or(0, |keys| keys.len());
    info!(
        tls = access.tls.is_some(),
        client_certificates, api_keys, "caller authentication configured"
    );
    if let Some(keys) = &access.api_keys {
        for line in keys.plain_lines() {
            warn!(
                line,
                "the API keys file holds a plain key; replace it with its sha256: form from `tokend api-key`"
            );
        }
    }
    if !grpc_addr.ip().is_loopback() && !client_certificates && api_keys == 0 {
        warn!(%grpc_addr, "any caller that reaches this address may exchange, read and delete token sets; set api_keys_file or tls_client_ca_file");
    }
}

/// Builds the cipher for the token columns: the configured keys, the key file beside a
/// SQLite database (created with a random key on first start), or plaintext.
pub fn token_cipher(
    database_url: &str,
    encryption: &StorageEncryption,
) -> anyhow::Result<TokenCipher> {
    let keyring = match encryption {
        StorageEncryption::Keys(keyring) => keyring.clone(),
        StorageEncryption::Plaintext => {
            warn!(
                "allow_plaintext_storage is set and no encryption key is configured; access and \
                 refresh tokens are stored in plaintext"
            );
            return Ok(TokenCipher::plaintext());
        }
        StorageEncryption::KeyFileBesideDatabase => {
            let path = sqlite::key_file_path(database_url)?;
            let (keyring, created) = load_or_create_key_file(&path).context(
                "set TOKEND_ENCRYPTION_KEY, or make the database's directory writable so that \
                 tokend can create its key file",
            )?;
            let key_id = keyring.primary().id().to_owned();
            if created {
                info!(path = %path.display(), %key_id, "created the encryption key file; back it up with the database, because the stored tokens cannot be decrypted without it");
            } else {
                info!(path = %path.display(), %key_id, "loaded the encryption key file");
            }
            if key_file_is_shared(&path) {
                warn!(path = %path.display(), "other users can read the encryption key file; restrict it with chmod 600");
            }
            Arc::new(keyring)
        }
    };
    info!(
        key_id = %keyring.primary().id(),
        decrypt_only_keys = keyring.ids().len() - 1,
        "token encryption enabled"
    );
    Ok(TokenCipher::new(keyring))
}

/// Logs the token sets that are not under the encrypting key: plaintext rows and rows
/// under older keys at info level, rows under keys that are not configured as errors.
async fn report_key_ids(store: &dyn TokenStore, cipher: &TokenCipher) {
    let counts = match store.count_by_key_id().await {
        Ok(counts) => counts,
        Err(error) => {
            warn!(%error, "counting token sets by encryption key failed");
            return;
        }
    };
    let known = cipher.known_key_ids();
    let primary = cipher.key_id();
    for (key_id, token_sets) in counts {
        match key_id {
            None if primary.is_some() => {
                info!(
                    token_sets,
                    "token sets are stored in plaintext; run `tokend reencrypt` to encrypt them"
                );
            }
            Some(key_id) if !known.contains(&key_id) => {
                error!(%key_id, token_sets, "token sets are encrypted with a key that is not configured, so they cannot be served or refreshed; add that key to TOKEND_ENCRYPTION_KEY after the first key");
            }
            Some(key_id) if Some(key_id.as_str()) != primary => {
                info!(%key_id, token_sets, "token sets are encrypted with an older key; run `tokend reencrypt` to move them to the first key");
            }
            _ => {}
        }
    }
}

/// Waits for SIGINT or, on Unix, SIGTERM.
pub async fn wait_for_signal() {
    let interrupt = async {
        if let Err(error) = tokio::signal::ctrl_c().await {
            error!(%error, "listening for SIGINT failed");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(error) => {
                error!(%error, "listening for SIGTERM failed");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = interrupt => {}
        () = terminate => {}
    }
}
