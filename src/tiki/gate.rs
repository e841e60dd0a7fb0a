//! The caps on requests to Tiki. The token manager passes every exchange and refresh
//! through one [`RequestGate`]: at most `max_concurrent` requests in flight, at most
//! `per_second` started in any second, and none while a `Retry-After` wait that Tiki
//! requested with HTTP 429 lasts. Tiki's limits are per client, so the pause covers
//! every token set.

use std::{
    fmt,
    num::NonZeroU32,
    sync::{
        Arc,
        atomic::{AtomicI64, Ordering},
    },
    time::Duration,
};

use chrono::{DateTime, Utc};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::TikiError;
use crate::store::format_time;

/// Admits requests to Tiki under the configured caps.
pub struct RequestGate {
    in_flight: Arc<Semaphore>,
    /// Spaces request starts evenly, one every `1 / per_second` seconds, with no burst,
    /// so that no window of one second contains more than `per_second` starts.
    rate: Option<DefaultDirectRateLimiter>,
    /// Unix milliseconds until which no request is sent, after Tiki returned 429.
    paused_until_ms: AtomicI64,
}

/// Permission to send one request. Its concurrency slot frees up when it is dropped.
#[derive(Debug)]
pub struct Admission {
    _slot: OwnedSemaphorePermit,
}

impl RequestGate {
    /// Builds a gate for at most `max_concurrent` requests in flight (at least one) and,
    /// unless `per_second` is 0, at most `per_second` request starts per second.
    pub fn new(max_concurrent: usize, per_second: u32) -> Self {
        let rate = NonZeroU32::new(per_second).and_then(|per_second| {
            let interval = Duration::from_secs(1) / per_second.get();
            Quota::with_period(interval)
                .map(|quota| RateLimiter::direct(quota.allow_burst(NonZeroU32::MIN)))
        });
        RequestGate {
            in_flight: Arc::new(Semaphore::new(max_concurrent.max(1))),
            rate,
            paused_until_ms: AtomicI64::new(0),
        }
    }

    /// Returns the end of the current `Retry-After` pause, if one lasts at `now`.
    pub fn paused_until(&self, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let until = self.paused_until_ms.load(Ordering::Relaxed);
        (until > now.timestamp_millis())
            .then(|| DateTime::from_timestamp_millis(until))
            .flatten()
    }

    /// Stops every request until `until`, or later if a longer pause is in effect.
    pub fn pause_until(&self, until: DateTime<Utc>) {
        self.paused_until_ms
            .fetch_max(until.timestamp_millis(), Ordering::Relaxed);
    }

    /// Waits for a concurrency slot and a rate permit, for at most `wait_limit`.
    /// Returns [`TikiError::NotSent`] during a `Retry-After` pause, or when no slot and
    /// permit came within `wait_limit`.
    pub async fn admit(&self, wait_limit: Duration) -> Result<Admission, TikiError> {
        self.check_pause()?;
        let waited = tokio::time::timeout(wait_limit, async {
            let slot = self.in_flight.clone().acquire_owned().await;
            if let Some(rate) = &self.rate {
                rate.until_ready().await;
            }
            slot
        })
        .await;
        let slot = match waited {
            Ok(Ok(slot)) => slot,
            // The semaphore is never closed, so only the timeout leads here.
            Ok(Err(_)) | Err(_) => {
                return Err(TikiError::NotSent(format!(
                    "no room under tiki_max_concurrent_requests and tiki_requests_per_second \
                     within {} ms",
                    wait_limit.as_millis()
                )));
            }
        };

        // A 429 may have arrived while this request waited.
        self.check_pause()?;
        Ok(Admission { _slot: slot })
    }

    fn check_pause(&self) -> Result<(), TikiError> {
        match self.paused_until(Utc::now()) {
            Some(until) => Err(TikiError::NotSent(format!(
                "Tiki asked for no requests until {} (HTTP 429 with Retry-After)",
                format_time(until)
            ))),
            None => Ok(()),
        }
    }
}

impl fmt::Debug for RequestGate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RequestGate")
            .field("free_slots", &self.in_flight.available_permits())
            .field("rate_limited", &self.rate.is_some())
            .field("paused_until_ms", &self.paused_until_ms)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn pause_rejects_without_waiting() {
        let gate = RequestGate::new(4, 0);
        gate.pause_until(Utc::now() + chrono::Duration::seconds(30));
        let error = gate.admit(Duration::from_secs(60)).await.unwrap_err();
        assert!(matches!(error, TikiError::NotSent(_)), "{error}");
        assert!(!error.reached_tiki());
        assert!(error.to_string().contains("Retry-After"), "{error}");
    }

    #[tokio::test]
    async fn shorter_pause_does_not_shorten_longer_one() {
        let gate = RequestGate::new(4, 0);
        let now = Utc::now();
        gate.pause_until(now + chrono::Duration::seconds(30));
        gate.pause_until(now + chrono::Duration::seconds(1));
        let until = gate.paused_until(now).unwrap();
        assert!(until >= now + chrono::Duration::seconds(29));
    }

    #[tokio::test]
    async fn full_gate_times_out_as_not_sent() {
        let gate = RequestGate::new(1, 0);
        let admitted = gate.admit(Duration::from_secs(1)).await.unwrap();
        let error = gate.admit(Duration::from_millis(50)).await.unwrap_err();
        assert!(matches!(error, TikiError::NotSent(_)), "{error}");
        drop(admitted);
        assert!(gate.admit(Duration::from_millis(50)).await.is_ok());
    }

    #[tokio::test]
    async fn rate_spaces_request_starts() {
        let gate = RequestGate::new(8, 20);
        let started = std::time::Instant::now();
        for _ in 0..5 {
            drop(gate.admit(Duration::from_secs(5)).await.unwrap());
        }
        // Five starts at 20 per second need four intervals of 50 ms.
        assert!(started.elapsed() >= Duration::from_millis(190));
    }
}
