//! systemd integration for `Type=notify` units: `READY=1` once the daemon serves,
//! `WATCHDOG=1` at half the unit's `WatchdogSec=` while the refresh scheduler still
//! starts passes, and `STOPPING=1` when shutdown begins. Does nothing outside systemd,
//! where `NOTIFY_SOCKET` is unset.

use std::{net::SocketAddr, time::Duration};

use chrono::Utc;
use sd_notify::NotifyState;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::admin::AdminState;

/// Tells systemd that the daemon is ready and keeps its watchdog fed until
/// `shutdown_started` is cancelled, then reports that it is stopping. Returns `None`
/// when tokend does not run under a systemd notify unit.
pub fn spawn(
    grpc_addr: SocketAddr,
    health: AdminState,
    shutdown_started: CancellationToken,
) -> Option<JoinHandle<()>> {
    std::env::var_os("NOTIFY_SOCKET")?;
    let watchdog = sd_notify::watchdog_enabled();
    Some(tokio::spawn(async move {
        let status = format!("serving gRPC on {grpc_addr}");
        notify(&[NotifyState::Ready, NotifyState::Status(&status)]);
        info!(?watchdog, "notified systemd that tokend is ready");

        match watchdog {
            Some(timeout) => feed_watchdog(timeout / 2, &health, &shutdown_started).await,
            None => shutdown_started.cancelled().await,
        }
        notify(&[
            NotifyState::Stopping,
            NotifyState::Status("finishing calls and refreshes in flight"),
        ]);
    }))
}

/// Pings the watchdog every `interval` while the scheduler is alive, so that systemd
/// restarts a daemon whose scheduler hangs even though the process still runs.
async fn feed_watchdog(
    interval: Duration,
    health: &AdminState,
    shutdown_started: &CancellationToken,
) {
    let mut ticker = tokio::time::interval(interval);
    let mut stalled = false;
    loop {
        tokio::select! {
            () = shutdown_started.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let now = Utc::now();
        if health.scheduler_alive(now) {
            if std::mem::take(&mut stalled) {
                info!("the refresh scheduler runs again; resuming watchdog pings");
                notify(&[NotifyState::Status("serving")]);
            }
            notify(&[NotifyState::Watchdog]);
        } else if !stalled {
            stalled = true;
            let age = health.tick_age(now);
            warn!(tick_age = ?age, max_tick_age = ?health.max_tick_age, "the refresh scheduler has not started a pass in time; withholding watchdog pings so that systemd restarts tokend");
            let status = format!(
                "refresh scheduler stalled for {} s; watchdog pings withheld",
                age.as_secs()
            );
            notify(&[NotifyState::Status(&status)]);
        }
    }
}

fn notify(states: &[NotifyState<'_>]) {
    if let Err(error) = sd_notify::notify(states) {
        warn!(%error, "sending a notification to systemd failed");
    } else {
        debug!(?states, "notified systemd");
    }
}
