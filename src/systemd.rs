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
            Some(timeout) => {
                feed_watchdog(timeout / 2, &health, &shutdown_started, notify).await;
            }
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
    notify: impl Fn(&[NotifyState<'_>]),
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

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::{scheduler::SchedulerStats, store};

    /// Runs the watchdog loop with pings due every 20 ms until `enough` accepts what it
    /// sent or `limit` passes, and returns what it sent.
    async fn watchdog_notices(
        stalled_for: chrono::Duration,
        limit: Duration,
        enough: fn(&[String]) -> bool,
    ) -> Vec<String> {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("tokend.db").display());
        let store = store::connect(&url, store::encryption::TokenCipher::plaintext())
            .await
            .unwrap();
        let mut health = AdminState::new(
            store.clone(),
            Arc::new(SchedulerStats::default()),
            CancellationToken::new(),
            Duration::from_secs(2),
        );
        health.started_at = Utc::now() - stalled_for;

        let sent = Arc::new(Mutex::new(Vec::new()));
        let record = {
            let sent = sent.clone();
            move |states: &[NotifyState<'_>]| {
                let mut sent = sent.lock().unwrap();
                sent.extend(states.iter().map(ToString::to_string));
            }
        };
        let stop = CancellationToken::new();
        let stopper = {
            let stop = stop.clone();
            let sent = sent.clone();
            tokio::spawn(async move {
                let deadline = tokio::time::Instant::now() + limit;
                while tokio::time::Instant::now() < deadline && !enough(&sent.lock().unwrap()) {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                stop.cancel();
            })
        };
        feed_watchdog(Duration::from_millis(20), &health, &stop, record).await;
        stopper.await.unwrap();
        store.close().await;
        sent.lock().unwrap().clone()
    }

    #[tokio::test]
    async fn watchdog_pings_while_scheduler_runs() {
        let three_pings =
            |sent: &[String]| sent.iter().filter(|notice| *notice == "WATCHDOG=1").count() >= 3;
        let sent = watchdog_notices(
            chrono::Duration::zero(),
            Duration::from_secs(10),
            three_pings,
        )
        .await;
        let pings = sent.iter().filter(|notice| *notice == "WATCHDOG=1").count();
        assert!(pings >= 3, "{sent:?}");
    }

    #[tokio::test]
    async fn watchdog_silent_while_scheduler_stalls() {
        // About fifteen ping intervals pass, and no ping may be sent in any of them.
        let sent = watchdog_notices(
            chrono::Duration::seconds(10),
            Duration::from_millis(300),
            |_| false,
        )
        .await;
        assert!(
            !sent.iter().any(|notice| notice == "WATCHDOG=1"),
            "{sent:?}"
        );
        let stalled: Vec<_> = sent
            .iter()
            .filter(|notice| notice.starts_with("STATUS=refresh scheduler stalled"))
            .collect();
        assert_eq!(stalled.len(), 1, "{sent:?}");
    }
}
