//! Builds the daemon from its settings, serves gRPC and runs the scheduler, and shuts
//! down in order: stop accepting calls and starting refreshes, let calls and refreshes
//! in flight (scheduled, then on-demand ones whose caller left) finish within the grace
//! period each, then close the database.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use anyhow::Context as _;
use tokio::{net::TcpListener, task::JoinHandle};
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::Server;
use tracing::{error, info, warn};

use crate::{
    grpc::TokenGrpcService,
    proto::token_service_server::TokenServiceServer,
    refresh::RefreshPolicy,
    scheduler::{Scheduler, SchedulerStats},
    settings::Settings,
    store,
    tiki::graphql::GraphqlClient,
    tokens::{ManagerSettings, TokenManager},
};

/// How long shutdown waits for the database connections to close.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(10);

/// A running daemon.
#[derive(Debug)]
pub struct Daemon {
    grpc_addr: SocketAddr,
    shutdown: CancellationToken,
    scheduler_stats: Arc<SchedulerStats>,
    manager: Arc<TokenManager>,
    task: JoinHandle<anyhow::Result<()>>,
}

impl Daemon {
    /// Binds the gRPC address, opens and migrates the database, and starts serving and
    /// refreshing. Binding first means a taken port fails before anything is written.
    /// Port 0 binds a free port, which [`Daemon::grpc_addr`] returns.
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
        let store = store::connect(&settings.database_url).await?;
        info!(database_url = %store::redact_url(&settings.database_url), "database ready");

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

        let server = Server::builder()
            .add_service(TokenServiceServer::new(TokenGrpcService::new(
                manager.clone(),
            )))
            .serve_with_incoming_shutdown(
                TcpListenerStream::new(listener),
                shutdown.clone().cancelled_owned(),
            );
        let stop_scheduler = shutdown.clone();
        let grace = settings.shutdown_grace;
        let daemon_manager = manager.clone();
        let task = tokio::spawn(async move {
            let served = server.await;
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
            served.context("gRPC server failed")?;
            scheduled.context("refresh scheduler panicked")??;
            info!("tokend stopped");
            Ok(())
        });
        info!(%grpc_addr, replica_id = %settings.replica_id, "gRPC server listening");

        Ok(Daemon {
            grpc_addr,
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
