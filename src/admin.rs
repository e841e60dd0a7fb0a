//! The HTTP admin server: `/metrics` in the Prometheus text format, `/healthz` for
//! liveness (the process responds and its scheduler still starts passes) and `/readyz`
//! for readiness (the database responds, its migrations ran, and shutdown has not begun).

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use axum::{Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};
use chrono::{DateTime, Utc};
use metrics::gauge;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::{
    scheduler::SchedulerStats,
    store::{StoreSummary, TokenStore, format_time},
    telemetry,
    tokens::TokenManager,
};

/// Bound on one store query made for a probe or a scrape, so that an unreachable
/// database turns into a failed probe rather than a hung one.
const STORE_TIMEOUT: Duration = Duration::from_secs(3);

/// The state the admin handlers read.
#[derive(Clone)]
pub struct AdminState {
    pub store: Arc<dyn TokenStore>,
    pub scheduler: Arc<SchedulerStats>,
    /// Cancelled when shutdown begins; `/readyz` fails from then on.
    pub shutdown: CancellationToken,
    /// Scheduler pass age after which `/healthz` fails.
    pub max_tick_age: Duration,
    /// When the daemon started, used as the last pass time until the first pass.
    pub started_at: DateTime<Utc>,
    /// The token manager, whose credentials alarm `/healthz` reports; `None` in tests
    /// of the probes alone.
    pub manager: Option<Arc<TokenManager>>,
    /// Whether the last readiness check failed, so that an outage logs once.
    not_ready: Arc<AtomicBool>,
}

impl std::fmt::Debug for AdminState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminState")
            .field("max_tick_age", &self.max_tick_age)
            .field("started_at", &self.started_at)
            .finish_non_exhaustive()
    }
}

impl AdminState {
    /// Builds the state of a daemon that starts now.
    pub fn new(
        store: Arc<dyn TokenStore>,
        scheduler: Arc<SchedulerStats>,
        shutdown: CancellationToken,
        max_tick_age: Duration,
    ) -> Self {
        AdminState {
            store,
            scheduler,
            shutdown,
            max_tick_age,
            started_at: Utc::now(),
            manager: None,
            not_ready: Arc::default(),
        }
    }

    /// Reports `manager`'s credentials alarm on `/healthz`.
    pub fn with_manager(mut self, manager: Arc<TokenManager>) -> Self {
        self.manager = Some(manager);
        self
    }

    /// Returns the time since the scheduler last started a pass, or since start before
    /// the first pass.
    pub fn tick_age(&self, now: DateTime<Utc>) -> Duration {
        let last_pass = self.scheduler.last_pass_unix_ms();
        let since = last_pass.max(self.started_at.timestamp_millis());
        let millis = now.timestamp_millis().saturating_sub(since);
        Duration::from_millis(u64::try_from(millis).unwrap_or_default())
    }

    /// Returns whether the scheduler started a pass within `max_tick_age`.
    pub fn scheduler_alive(&self, now: DateTime<Utc>) -> bool {
        self.tick_age(now) <= self.max_tick_age
    }
}

/// Serves the admin routes on `listener` until `stop` is cancelled.
pub async fn serve(
    listener: TcpListener,
    state: AdminState,
    stop: CancellationToken,
) -> std::io::Result<()> {
    let router = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(state);
    axum::serve(listener, router)
        .with_graceful_shutdown(stop.cancelled_owned())
        .await
}

async fn healthz(State(state): State<AdminState>) -> impl IntoResponse {
    let age = state.tick_age(Utc::now());
    if age <= state.max_tick_age {
        // A restart cannot fix rejected credentials, so the alarm shows in the body
        // and in the tokend_tiki_credentials_rejected gauge, and the check still passes.
        let alarm = state
            .manager
            .as_ref()
            .and_then(|manager| manager.credentials_alarm());
        let body = match alarm {
            Some(alarm) => format!(
                "ok, but Tiki has rejected the client credentials since {}: {}; fix \
                 client_id and client_secret\n",
                format_time(alarm.since),
                alarm.error
            ),
            None => "ok\n".to_owned(),
        };
        (StatusCode::OK, body)
    } else {
        warn!(
            tick_age = ?age,
            max_tick_age = ?state.max_tick_age,
            "health check failed: the refresh scheduler has not started a pass in time"
        );
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "unhealthy: the refresh scheduler's last pass began {} s ago, more than \
                 max_tick_age ({} s)\n",
                age.as_secs(),
                state.max_tick_age.as_secs()
            ),
        )
    }
}

async fn readyz(State(state): State<AdminState>) -> impl IntoResponse {
    if state.shutdown.is_cancelled() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: shutting down\n".to_owned(),
        );
    }
    let failure = match tokio::time::timeout(STORE_TIMEOUT, state.store.ping()).await {
        Ok(Ok(())) => {
            if state.not_ready.swap(false, Ordering::Relaxed) {
                info!("readiness check passes again: the database responds");
            }
            return (StatusCode::OK, "ready\n".to_owned());
        }
        Ok(Err(error)) => error.to_string(),
        Err(_) => format!("no response within {} s", STORE_TIMEOUT.as_secs()),
    };
    // The cause stays in the log, because the admin port has no authentication.
    if state.not_ready.swap(true, Ordering::Relaxed) {
        debug!(error = %failure, "readiness check failed");
    } else {
        warn!(error = %failure, "readiness check failed: the database query failed; /readyz returns 503 until it responds");
    }
    (
        StatusCode::SERVICE_UNAVAILABLE,
        "not ready: the database query failed; the log has the cause\n".to_owned(),
    )
}

async fn metrics(State(state): State<AdminState>) -> impl IntoResponse {
    let handle = telemetry::prometheus();
    let _scrape = telemetry::SCRAPE_LOCK.lock().await;
    let now = Utc::now();
    gauge!(telemetry::SCHEDULER_TICK_AGE).set(state.tick_age(now).as_secs_f64());
    match tokio::time::timeout(STORE_TIMEOUT, state.store.summary()).await {
        Ok(Ok(summary)) => set_store_gauges(&summary, now),
        Ok(Err(error)) => {
            warn!(%error, "reading the token table for metrics failed; store gauges keep their last values");
        }
        Err(_) => {
            warn!(timeout = ?STORE_TIMEOUT, "reading the token table for metrics timed out; store gauges keep their last values");
        }
    }
    handle.run_upkeep();
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        handle.render(),
    )
}

fn set_store_gauges(summary: &StoreSummary, now: DateTime<Utc>) {
    let statuses = [
        ("active", summary.active),
        ("refresh_failing", summary.refresh_failing),
        ("reauth_required", summary.reauth_required),
    ];
    for (status, count) in statuses {
        gauge!(telemetry::TOKEN_SETS, "status" => status).set(count as f64);
    }

    let seconds = |delta: chrono::TimeDelta| delta.num_milliseconds() as f64 / 1000.0;
    let earliest_expiry = summary
        .earliest_expiry
        .map_or(f64::INFINITY, |expiry| seconds(expiry - now));
    gauge!(telemetry::EARLIEST_EXPIRY).set(earliest_expiry);
    let overdue = summary
        .earliest_next_refresh
        .map_or(0.0, |due| seconds(now - due).max(0.0));
    gauge!(telemetry::REFRESH_OVERDUE).set(overdue);
}
