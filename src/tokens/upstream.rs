//! The token manager's requests to Tiki. Every request passes the request gate, and
//! every response updates the state that spans token sets: the `Retry-After` pause
//! after HTTP 429 and the credentials alarm after Tiki rejected tokend's client id or
//! signature. Health checks read the alarm through [`TokenManager::credentials_alarm`].

use std::{sync::PoisonError, sync::atomic::Ordering, time::Duration};

use chrono::{DateTime, Utc};
use secrecy::SecretString;
use tracing::{error, info, warn};

use super::TokenManager;
use crate::{
    refresh::chrono_duration,
    store::format_time,
    tiki::{FailureClass, Grant, TikiError},
};

/// Pause after an HTTP 429 without a usable `Retry-After` header.
const DEFAULT_RATE_LIMIT_PAUSE: Duration = Duration::from_secs(1);

/// Name of the gauge that is 1 while the credentials alarm is raised and 0 otherwise.
const CREDENTIALS_GAUGE: &str = "tokend_tiki_credentials_rejected";

/// Tiki's rejection of tokend's own credentials, raised by the first rejection and
/// cleared by the next response that accepts them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CredentialsAlarm {
    /// When Tiki first rejected the credentials since they last worked.
    pub since: DateTime<Utc>,
    /// The latest rejection, without secrets.
    pub error: String,
}

/// The two calls tokend makes to Tiki.
#[derive(Debug, Clone, Copy)]
pub(super) enum Call {
    Exchange,
    Refresh,
}

impl TokenManager {
    /// Returns the credentials alarm while Tiki rejects tokend's client id or
    /// signature, or `None` once a response shows that they work.
    pub fn credentials_alarm(&self) -> Option<CredentialsAlarm> {
        self.credentials_alarm
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Returns the end of the pause Tiki requested with HTTP 429, while it lasts. No
    /// request is sent to Tiki before then.
    pub fn tiki_paused_until(&self) -> Option<DateTime<Utc>> {
        self.gate.paused_until(Utc::now())
    }

    /// Sends one request to Tiki through the request gate, waiting at most
    /// `wait_limit` for room under the caps, and records what the response means for
    /// the client as a whole.
    pub(super) async fn send_to_tiki(
        &self,
        call: Call,
        token: &SecretString,
        wait_limit: Duration,
    ) -> Result<Grant, TikiError> {
        let admission = self.gate.admit(wait_limit).await?;
        let result = match call {
            Call::Exchange => self.tiki.exchange(token).await,
            Call::Refresh => self.tiki.refresh(token).await,
        };
        drop(admission);
        crate::telemetry::record_upstream(result.as_ref().err().map(TikiError::class));
        self.observe_response(&result);
        result
    }

    /// Returns the error to record instead of calling Tiki while Tiki's last response
    /// rejected tokend's credentials, so that callers cannot flood Tiki with requests
    /// it will reject.
    pub(super) fn credentials_blocked(&self, now: DateTime<Utc>) -> Option<TikiError> {
        let until = self.credentials_blocked_until.load(Ordering::Relaxed);
        (now.timestamp_millis() < until).then(|| {
            TikiError::CredentialsRejected(
                "an earlier request was rejected; no request is sent until the retry time"
                    .to_owned(),
            )
        })
    }

    fn observe_response(&self, result: &Result<Grant, TikiError>) {
        let error = match result {
            Ok(_) => return self.clear_credentials_alarm(),
            Err(error) => error,
        };
        match error {
            TikiError::RateLimited { retry_after } => {
                let wait = retry_after.unwrap_or(DEFAULT_RATE_LIMIT_PAUSE);
                let until = Utc::now() + chrono_duration(wait);
                self.gate.pause_until(until);
                warn!(until = %format_time(until), "Tiki returned HTTP 429; no request is sent to Tiki until the Retry-After time");
            }
            TikiError::CredentialsRejected(_) => self.raise_credentials_alarm(error),
            // Tiki looked at the grant, so it accepted the client id and signature.
            TikiError::GrantRejected(_) => self.clear_credentials_alarm(),
            _ => {}
        }
    }

    /// Raises the alarm and pauses requests for `credentials_retry`. Only a rejection
    /// Tiki returned starts the pause, so failures recorded during the pause do not
    /// extend it.
    fn raise_credentials_alarm(&self, error: &TikiError) {
        debug_assert_eq!(error.class(), FailureClass::CredentialsRejected);
        let now = Utc::now();
        let until = now + chrono_duration(self.policy.credentials_retry);
        self.credentials_blocked_until
            .fetch_max(until.timestamp_millis(), Ordering::Relaxed);

        let mut alarm = self
            .credentials_alarm
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let since = alarm.as_ref().map_or(now, |alarm| alarm.since);
        if alarm.is_none() {
            error!(%error, retry_at = %format_time(until), "Tiki rejected tokend's client credentials; no token set changes status, and requests pause until the retry time; fix client_id and client_secret");
        }
        *alarm = Some(CredentialsAlarm {
            since,
            error: error.to_string(),
        });
        report_credentials_alarm(true);
    }

    fn clear_credentials_alarm(&self) {
        let mut alarm = self
            .credentials_alarm
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(ended) = alarm.take() {
            info!(since = %format_time(ended.since), "Tiki accepts tokend's client credentials again");
            report_credentials_alarm(false);
        }
    }
}

/// Sets the credentials gauge to 1 while the alarm is raised and to 0 otherwise.
pub(super) fn report_credentials_alarm(raised: bool) {
    metrics::gauge!(CREDENTIALS_GAUGE).set(if raised { 1.0 } else { 0.0 });
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use metrics_exporter_prometheus::PrometheusBuilder;

    use super::*;
    use crate::{
        refresh::RefreshPolicy,
        store::{encryption::TokenCipher, sqlite::SqliteStore},
        tiki::graphql::GraphqlClient,
        tokens::ManagerSettings,
    };

    /// Builds a manager whose store and Tiki client are never used.
    fn manager(store: SqliteStore) -> TokenManager {
        let tiki = GraphqlClient::new(
            "http://127.0.0.1:9/".to_owned(),
            "client".to_owned(),
            SecretString::from("secret"),
            Duration::from_secs(1),
        )
        .unwrap();
        let settings = ManagerSettings {
            cache_capacity: 10,
            replica_id: "unit".to_owned(),
            lease: Duration::from_secs(30),
            claim_wait: Duration::from_secs(5),
            max_concurrent_requests: 1,
            requests_per_second: 0,
            exchange_retry_window: Duration::from_secs(600),
        };
        TokenManager::new(
            Arc::new(store),
            Arc::new(tiki),
            RefreshPolicy::default(),
            settings,
        )
    }

    fn gauge_line(rendered: &str) -> Option<&str> {
        rendered
            .lines()
            .find(|line| line.starts_with(CREDENTIALS_GAUGE))
    }

    #[tokio::test]
    async fn alarm_drives_the_gauge() {
        let dir = tempfile::tempdir().unwrap();
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        let url = format!("sqlite://{}", dir.path().join("tokend.db").display());
        let store = SqliteStore::connect(&url, TokenCipher::plaintext())
            .await
            .unwrap();
        let manager = metrics::with_local_recorder(&recorder, || manager(store));
        assert_eq!(
            gauge_line(&handle.render()),
            Some("tokend_tiki_credentials_rejected 0")
        );

        let first = TikiError::CredentialsRejected("invalid_signature".to_owned());
        let second = TikiError::CredentialsRejected("invalid_client".to_owned());
        metrics::with_local_recorder(&recorder, || manager.raise_credentials_alarm(&first));
        let raised = manager.credentials_alarm().unwrap();
        metrics::with_local_recorder(&recorder, || manager.raise_credentials_alarm(&second));
        assert_eq!(
            gauge_line(&handle.render()),
            Some("tokend_tiki_credentials_rejected 1")
        );
        let alarm = manager.credentials_alarm().unwrap();
        assert_eq!(alarm.since, raised.since);
        assert!(alarm.error.contains("invalid_client"), "{}", alarm.error);

        metrics::with_local_recorder(&recorder, || manager.clear_credentials_alarm());
        assert_eq!(
            gauge_line(&handle.render()),
            Some("tokend_tiki_credentials_rejected 0")
        );
        assert!(manager.credentials_alarm().is_none());
    }
}
