//! The scheduler that drives scheduled refreshes.
//!
//! A tokio-cron-scheduler job fires every second and wakes the driver loop through a
//! `Notify`. Each wake-up runs one pass: it claims the token sets whose
//! `next_refresh_at` has passed, up to the free share of a fixed concurrency limit, and
//! starts a refresh for each. When a pass fills every slot, the next one starts as soon
//! as a slot frees up, so throughput is bounded by the concurrency over Tiki's latency
//! rather than by one batch a second. A claimed token set is invisible to other passes and
//! replicas until its refresh ends or its lease runs out. Refreshes run as tasks, so a
//! slow one never delays the next pass.
//!
//! Failure handling:
//! - The cron crate has been seen to drop a repeated job for good after falling behind
//!   (a long blocking call or a wall clock step), so the loop also wakes on a backstop
//!   timer of one and a half ticks, and logs a warning when it does.
//! - `Notify` stores at most one wake-up, so however many ticks fire while a pass is
//!   stalled, only one catch-up pass follows.
//! - On shutdown the loop stops starting refreshes and waits for those in flight,
//!   within a grace period, so that tokens Tiki already rotated get committed.

use std::{
    sync::{
        Arc,
        atomic::{AtomicI64, AtomicU64, Ordering},
    },
    time::Duration,
};

use chrono::Utc;
use tokio::{
    sync::{Notify, Semaphore},
    task::JoinSet,
};
use tokio_cron_scheduler::{Job, JobScheduler, JobSchedulerError};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, error, info, info_span, warn};

use crate::tokens::{RefreshOutcome, TokenError, TokenManager};

/// How often the cron job fires.
const TICK_SCHEDULE: &str = "* * * * * *";
const TICK: Duration = Duration::from_secs(1);

/// Wait after which the loop runs a pass even without a cron tick.
const BACKSTOP: Duration = Duration::from_millis(1500);

/// Counters an operator or a test can read while the scheduler runs.
#[derive(Debug, Default)]
pub struct SchedulerStats {
    passes: AtomicU64,
    cron_ticks: AtomicU64,
    backstop_passes: AtomicU64,
    refreshes_started: AtomicU64,
    last_pass_unix_ms: AtomicI64,
    /// Milliseconds the next pass blocks its thread for; set only by tests.
    stall_next_pass_ms: AtomicU64,
}

impl SchedulerStats {
    /// Passes run since start.
    pub fn passes(&self) -> u64 {
        self.passes.load(Ordering::Relaxed)
    }

    /// Ticks the cron job fired since start.
    pub fn cron_ticks(&self) -> u64 {
        self.cron_ticks.load(Ordering::Relaxed)
    }

    /// Passes started by the backstop timer because no cron tick came.
    pub fn backstop_passes(&self) -> u64 {
        self.backstop_passes.load(Ordering::Relaxed)
    }

    /// Refreshes started since start.
    pub fn refreshes_started(&self) -> u64 {
        self.refreshes_started.load(Ordering::Relaxed)
    }

    /// Milliseconds since the Unix epoch at which the last pass began; 0 before the first.
    pub fn last_pass_unix_ms(&self) -> i64 {
        self.last_pass_unix_ms.load(Ordering::Relaxed)
    }

    /// Makes the next pass block its thread for `duration`, as a long blocking call
    /// would. A test failpoint for the scheduler's stall recovery.
    #[doc(hidden)]
    pub fn stall_next_pass(&self, duration: Duration) {
        let millis = u64::try_from(duration.as_millis()).unwrap_or(u64::MAX);
        self.stall_next_pass_ms.store(millis, Ordering::Relaxed);
    }
}

/// A failure to start the scheduler.
#[derive(Debug, thiserror::Error)]
#[error("starting the refresh scheduler failed: {0}")]
pub struct SchedulerError(#[from] JobSchedulerError);

/// Starts refreshes of due token sets until shut down.
#[derive(Debug)]
pub struct Scheduler {
    manager: Arc<TokenManager>,
    stats: Arc<SchedulerStats>,
    permits: Arc<Semaphore>,
    tasks: JoinSet<()>,
    /// Notified whenever a refresh ends and frees its slot.
    finished: Arc<Notify>,
    /// Whether the last pass failed to claim, so that an outage logs once, not per tick.
    claim_failing: bool,
}

impl Scheduler {
    /// Builds a scheduler that runs at most `concurrency` refreshes at once.
    pub fn new(manager: Arc<TokenManager>, concurrency: usize, stats: Arc<SchedulerStats>) -> Self {
        Scheduler {
            manager,
            stats,
            permits: Arc::new(Semaphore::new(concurrency.max(1))),
            tasks: JoinSet::new(),
            finished: Arc::new(Notify::new()),
            claim_failing: false,
        }
    }

    /// Runs passes until `shutdown` is cancelled, then waits up to `grace` for the
    /// refreshes in flight.
    pub async fn run(
        mut self,
        shutdown: CancellationToken,
        grace: Duration,
    ) -> Result<(), SchedulerError> {
        let wake = Arc::new(Notify::new());
        let mut cron = start_cron(wake.clone(), self.stats.clone()).await?;
        info!(tick = ?TICK, "refresh scheduler started");

        let mut backlog = false;
        loop {
            let cron_ticks_before = self.stats.cron_ticks();
            tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                () = wake.notified() => {}
                // With more due than slots, claim again as soon as a slot frees up
                // rather than on the next tick, so throughput is not capped at one
                // batch a second.
                () = self.finished.notified(), if backlog => {}
                () = tokio::time::sleep(BACKSTOP) => {
                    self.stats.backstop_passes.fetch_add(1, Ordering::Relaxed);
                    if self.stats.cron_ticks() == cron_ticks_before {
                        warn!("no cron tick arrived in time; the backstop timer started this pass");
                    }
                }
            }
            self.reap_finished();
            backlog = self.pass().await;
        }

        if let Err(error) = cron.shutdown().await {
            warn!(%error, "stopping the cron scheduler failed");
        }
        self.drain(grace).await;
        Ok(())
    }

    /// Claims due token sets and starts a refresh for each. Returns whether every free
    /// slot was filled, in which case more token sets may be due.
    async fn pass(&mut self) -> bool {
        self.stats.passes.fetch_add(1, Ordering::Relaxed);
        self.stats
            .last_pass_unix_ms
            .store(Utc::now().timestamp_millis(), Ordering::Relaxed);
        let stall = self.stats.stall_next_pass_ms.swap(0, Ordering::Relaxed);
        if stall > 0 {
            std::thread::sleep(Duration::from_millis(stall));
        }

        if let Some(until) = self.manager.tiki_paused_until() {
            debug!(until = %crate::store::format_time(until), "Tiki asked for a pause; skipping this pass");
            return false;
        }
        let free = self.permits.available_permits();
        if free == 0 {
            debug!("every refresh slot is busy; skipping this pass");
            return true;
        }
        let limit = u32::try_from(free).unwrap_or(u32::MAX);
        let claimed = match self.manager.claim_due(limit).await {
            Ok(claimed) => claimed,
            Err(error) => {
                if !self.claim_failing {
                    warn!(%error, "claiming due token sets failed; retrying every tick");
                }
                self.claim_failing = true;
                return false;
            }
        };
        if std::mem::take(&mut self.claim_failing) {
            info!("claiming due token sets works again");
        }

        let started = claimed.len() as u64;
        let saturated = claimed.len() >= free;
        for set in claimed {
            // Cannot fail: only this loop takes permits, and it claimed no more token sets
            // than were free.
            let Ok(permit) = self.permits.clone().try_acquire_owned() else {
                break;
            };
            let manager = self.manager.clone();
            let finished = self.finished.clone();
            let span = info_span!("refresh", app = %set.key.app, user_id = %set.key.user_id);
            self.tasks.spawn(
                async move {
                    log_outcome(manager.refresh_claimed(set).await);
                    drop(permit);
                    finished.notify_one();
                }
                .instrument(span),
            );
        }
        self.stats
            .refreshes_started
            .fetch_add(started, Ordering::Relaxed);
        if started > 0 {
            debug!(started, "scheduled refreshes started");
        }
        saturated
    }

    fn reap_finished(&mut self) {
        while let Some(result) = self.tasks.try_join_next() {
            if let Err(error) = result {
                error!(%error, "a refresh task failed");
            }
        }
    }

    async fn drain(&mut self, grace: Duration) {
        let in_flight = self.tasks.len();
        if in_flight > 0 {
            info!(in_flight, ?grace, "waiting for refreshes in flight");
        }
        let drained = tokio::time::timeout(grace, async {
            while self.tasks.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            warn!(
                abandoned = self.tasks.len(),
                "refreshes still in flight after the grace period were abandoned"
            );
            self.tasks.abort_all();
        }
        info!("refresh scheduler stopped");
    }
}

async fn start_cron(
    wake: Arc<Notify>,
    stats: Arc<SchedulerStats>,
) -> Result<JobScheduler, SchedulerError> {
    let cron = JobScheduler::new().await?;
    let job = Job::new(TICK_SCHEDULE, move |_, _| {
        stats.cron_ticks.fetch_add(1, Ordering::Relaxed);
        wake.notify_one();
    })?;
    cron.add(job).await?;
    cron.start().await?;
    Ok(cron)
}

fn log_outcome(outcome: Result<RefreshOutcome, TokenError>) {
    match outcome {
        Ok(RefreshOutcome::Refreshed) => debug!("scheduled refresh succeeded"),
        Ok(RefreshOutcome::Failed(class)) => debug!(?class, "scheduled refresh failed"),
        Ok(RefreshOutcome::NotDue) => debug!("token set is no longer due"),
        Err(error) => warn!(%error, "scheduled refresh failed"),
    }
}
