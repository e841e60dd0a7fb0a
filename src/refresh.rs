//! The refresh policy as plain functions without I/O: when a token set is due, how long
//! to back off after a failure, and which state each failure class leads to. The
//! token manager applies these decisions; randomness comes in as a `jitter` argument
//! in `[0, 1)` so every rule is unit-tested.
//!
//! A refresh token whose last presentation got no response (a timeout after the request
//! was sent) may already have been rotated out by Tiki, and presenting a rotated-out
//! token makes Tiki revoke the whole token family. Such a token is therefore presented
//! at most once more: if that attempt reaches Tiki and fails too, the token set
//! becomes `reauth_required`.
//!
//! Errors Tiki returns that tokend does not recognise are retried with backoff a
//! bounded number of times. After that the scheduler stops refreshing the token set
//! (`refresh_failing` without a next attempt), and only a GetAccessToken call that
//! needs a fresher token, or a new exchange, tries again. Outages (no connection,
//! 5xx, 429) are retried with capped backoff for as long as they last.

use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::{
    store::{FailureRecord, TokenSet, TokenStatus},
    tiki::{FailureClass, TikiError},
};

/// `min_valid_seconds` used when a caller sends 0.
pub const DEFAULT_MIN_VALID: Duration = Duration::from_secs(60);

/// Margin kept below a token's lifetime when capping `min_valid_seconds`, so that a
/// freshly refreshed token satisfies the cap despite request latency.
const MIN_VALID_MARGIN_SECONDS: u64 = 60;

/// The settings that shape refresh timing.
#[derive(Debug, Clone)]
pub struct RefreshPolicy {
    /// How long before expiry a token set is refreshed, unless that is earlier than
    /// halfway through the token's lifetime.
    pub refresh_before: Duration,
    /// Backoff after the first transient failure; it doubles with each further one.
    pub backoff_initial: Duration,
    /// Maximum backoff after transient failures.
    pub backoff_max: Duration,
    /// Wait before retrying after Tiki rejected tokend's own credentials.
    pub credentials_retry: Duration,
    /// Consecutive failed attempts after which a token set whose last attempt got
    /// errors tokend does not recognise is no longer scheduled.
    pub max_unrecognized_failures: u32,
}

impl Default for RefreshPolicy {
    fn default() -> Self {
        RefreshPolicy {
            refresh_before: Duration::from_secs(300),
            backoff_initial: Duration::from_secs(1),
            backoff_max: Duration::from_secs(60),
            credentials_retry: Duration::from_secs(60),
            max_unrecognized_failures: 5,
        }
    }
}

impl RefreshPolicy {
    /// Returns when a token granted by a request sent at `sent_at` with a lifetime of
    /// `lifetime_seconds` expires, and when to refresh it.
    ///
    /// The refresh lands at a random point in a window a fifth as long as the lead,
    /// ending `refresh_before` ahead of expiry. The lead is at most half the lifetime,
    /// and a window that would open before halfway moves to open there, so that
    /// tokens issued together spread out and none refreshes in its first half.
    pub fn schedule(
        &self,
        sent_at: DateTime<Utc>,
        lifetime_seconds: u64,
        jitter: f64,
    ) -> (DateTime<Utc>, DateTime<Utc>) {
        let lifetime = chrono_duration(Duration::from_secs(lifetime_seconds));
        let expires_at = sent_at + lifetime;
        let halfway = sent_at + lifetime / 2;
        let lead = chrono_duration(self.refresh_before).min(lifetime / 2);
        let spread = lead / 5;
        let window_start = (expires_at - lead - spread).max(halfway);
        let offset = scale(spread, jitter);
        (expires_at, window_start + offset)
    }

    /// Returns the wait after the `failure_count`-th consecutive transient failure:
    /// exponential from `backoff_initial`, capped at `backoff_max`, with the upper half
    /// randomised.
    pub fn backoff(&self, failure_count: u32, jitter: f64) -> Duration {
        let doublings = failure_count.saturating_sub(1).min(30);
        let full = self
            .backoff_initial
            .saturating_mul(1 << doublings)
            .min(self.backoff_max);
        full / 2 + (full / 2).mul_f64(jitter.clamp(0.0, 1.0))
    }

    /// Decides the state a token set moves to after a failed refresh.
    pub fn after_failure(
        &self,
        set: &TokenSet,
        error: &TikiError,
        now: DateTime<Utc>,
        jitter: f64,
    ) -> FailureRecord {
        let failure_count = set.failure_count.saturating_add(1);
        let reauth = |reason: String| FailureRecord {
            status: TokenStatus::ReauthRequired,
            failure_count,
            last_error: Some(reason),
            next_refresh_at: None,
            outcome_unknown: false,
        };

        match error.class() {
            FailureClass::CredentialsRejected => FailureRecord {
                status: set.status,
                failure_count: set.failure_count,
                last_error: set.last_error.clone(),
                next_refresh_at: Some(now + chrono_duration(self.credentials_retry)),
                outcome_unknown: set.outcome_unknown,
            },
            _ if set.outcome_unknown && error.reached_tiki() => reauth(format!(
                "an earlier refresh got no answer it could read (it timed out, its response \
                 was unreadable, or its replica stopped before committing), so Tiki may have \
                 rotated the refresh token, and the one retry failed too: {error}"
            )),
            FailureClass::GrantRejected => reauth(error.to_string()),
            _ if matches!(error, TikiError::Unrecognized(_))
                && failure_count >= self.max_unrecognized_failures =>
            {
                FailureRecord {
                    status: TokenStatus::RefreshFailing,
                    failure_count,
                    last_error: Some(format!(
                        "scheduled refreshes stopped after {failure_count} failed attempts; \
                         a GetAccessToken call that needs a fresher token tries once more, \
                         and a new exchange replaces the token set: {error}"
                    )),
                    next_refresh_at: None,
                    outcome_unknown: set.outcome_unknown,
                }
            }
            class => {
                let wait = self
                    .backoff(failure_count, jitter)
                    .max(error.retry_after().unwrap_or_default());
                FailureRecord {
                    status: TokenStatus::RefreshFailing,
                    failure_count,
                    last_error: Some(error.to_string()),
                    next_refresh_at: Some(now + chrono_duration(wait)),
                    outcome_unknown: set.outcome_unknown || class == FailureClass::OutcomeUnknown,
                }
            }
        }
    }
}

/// Returns how long a served token must stay valid: `requested` seconds (60 when 0),
/// capped to the larger of the granted lifetime minus 60 seconds and half of it, so
/// that a freshly refreshed token always qualifies.
pub fn min_valid(requested_seconds: u32, lifetime_seconds: u64) -> Duration {
    let requested = if requested_seconds == 0 {
        DEFAULT_MIN_VALID
    } else {
        Duration::from_secs(u64::from(requested_seconds))
    };
    let cap = lifetime_seconds
        .saturating_sub(MIN_VALID_MARGIN_SECONDS)
        .max(lifetime_seconds / 2);
    requested.min(Duration::from_secs(cap))
}

/// Whether the scheduler should refresh `set` at `now`.
pub fn is_due(set: &TokenSet, now: DateTime<Utc>) -> bool {
    set.status != TokenStatus::ReauthRequired
        && set.refresh_token.is_some()
        && set.next_refresh_at.is_some_and(|due| due <= now)
}

fn scale(duration: chrono::Duration, factor: f64) -> chrono::Duration {
    let millis = duration.num_milliseconds() as f64 * factor.clamp(0.0, 1.0);
    chrono::Duration::milliseconds(millis as i64)
}

/// Converts a std duration; values beyond chrono's range saturate.
pub fn chrono_duration(duration: Duration) -> chrono::Duration {
    chrono::Duration::from_std(duration).unwrap_or(chrono::Duration::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::TokenSetKey;
    use chrono::TimeZone;
    use secrecy::SecretString;

    fn at(seconds: i64) -> DateTime<Utc> {
        Utc.timestamp_opt(1_700_000_000 + seconds, 0).unwrap()
    }

    fn token_set(status: TokenStatus, failure_count: u32, outcome_unknown: bool) -> TokenSet {
        TokenSet {
            key: TokenSetKey::new("alice"),
            status,
            access_token: SecretString::from("access"),
            refresh_token: Some(SecretString::from("refresh")),
            scopes: vec!["offline".to_owned()],
            lifetime_seconds: 3600,
            expires_at: at(3600),
            next_refresh_at: Some(at(3300)),
            refreshed_at: None,
            failure_count,
            last_error: None,
            outcome_unknown,
            version: 1,
            claimed_by: None,
            claim_until: None,
            claim_token: None,
            created_at: at(0),
            updated_at: at(0),
        }
    }

    fn transient() -> TikiError {
        TikiError::transient("HTTP 503")
    }

    #[test]
    fn schedule_refreshes_before_expiry() {
        let policy = RefreshPolicy::default();
        for jitter in [0.0, 0.5, 0.999] {
            let (expires_at, refresh_at) = policy.schedule(at(0), 3600, jitter);
            assert_eq!(expires_at, at(3600));
            assert!(refresh_at <= at(3300), "jitter {jitter}: {refresh_at}");
            assert!(refresh_at >= at(3240), "jitter {jitter}: {refresh_at}");
        }
    }

    #[test]
    fn schedule_jitter_spreads_refreshes() {
        let policy = RefreshPolicy::default();
        let (_, early) = policy.schedule(at(0), 3600, 0.0);
        let (_, late) = policy.schedule(at(0), 3600, 0.99);
        assert!(late - early >= chrono::Duration::seconds(55));
    }

    #[test]
    fn schedule_never_before_halfway() {
        let policy = RefreshPolicy::default();
        for jitter in [0.0, 0.5, 0.999] {
            let (expires_at, refresh_at) = policy.schedule(at(0), 60, jitter);
            assert_eq!(expires_at, at(60));
            assert!(refresh_at >= at(30), "jitter {jitter}: {refresh_at}");
            assert!(refresh_at < at(60), "jitter {jitter}: {refresh_at}");
        }
        let (_, spread_early) = policy.schedule(at(0), 60, 0.0);
        let (_, spread_late) = policy.schedule(at(0), 60, 0.99);
        assert!(spread_late > spread_early);
    }

    #[test]
    fn backoff_doubles_and_caps() {
        let policy = RefreshPolicy::default();
        assert!(policy.backoff(1, 0.999_999) > Duration::from_millis(999));
        assert!(policy.backoff(1, 0.999_999) < Duration::from_secs(1));
        assert_eq!(policy.backoff(1, 0.0), Duration::from_millis(500));
        assert_eq!(policy.backoff(3, 0.0), Duration::from_secs(2));
        assert_eq!(policy.backoff(7, 0.0), Duration::from_secs(30));
        assert_eq!(policy.backoff(40, 0.0), Duration::from_secs(30));
        assert!(policy.backoff(u32::MAX, 1.0) <= Duration::from_secs(60));
    }

    #[test]
    fn transient_failure_backs_off() {
        let policy = RefreshPolicy::default();
        let set = token_set(TokenStatus::Active, 2, false);
        let record = policy.after_failure(&set, &transient(), at(100), 0.0);
        assert_eq!(record.status, TokenStatus::RefreshFailing);
        assert_eq!(record.failure_count, 3);
        assert_eq!(record.next_refresh_at, Some(at(102)));
        assert!(!record.outcome_unknown);
        assert!(record.last_error.unwrap().contains("HTTP 503"));
    }

    #[test]
    fn retry_after_lengthens_backoff() {
        let policy = RefreshPolicy::default();
        let set = token_set(TokenStatus::Active, 0, false);
        let error = TikiError::RateLimited {
            retry_after: Some(Duration::from_secs(45)),
        };
        let record = policy.after_failure(&set, &error, at(100), 0.0);
        assert_eq!(record.next_refresh_at, Some(at(145)));
    }

    #[test]
    fn rejected_grant_requires_reauth() {
        let policy = RefreshPolicy::default();
        let set = token_set(TokenStatus::RefreshFailing, 1, false);
        let error = TikiError::GrantRejected("invalid_token".to_owned());
        let record = policy.after_failure(&set, &error, at(100), 0.5);
        assert_eq!(record.status, TokenStatus::ReauthRequired);
        assert_eq!(record.next_refresh_at, None);
        assert!(record.last_error.unwrap().contains("rejected the grant"));
    }

    #[test]
    fn rejected_credentials_keep_status() {
        let policy = RefreshPolicy::default();
        let mut set = token_set(TokenStatus::Active, 0, false);
        set.last_error = None;
        let error = TikiError::CredentialsRejected("invalid_signature".to_owned());
        let record = policy.after_failure(&set, &error, at(100), 0.5);
        assert_eq!(record.status, TokenStatus::Active);
        assert_eq!(record.failure_count, 0);
        assert_eq!(record.last_error, None);
        assert_eq!(record.next_refresh_at, Some(at(160)));
    }

    #[test]
    fn unknown_outcome_allows_one_retry() {
        let policy = RefreshPolicy::default();
        let set = token_set(TokenStatus::Active, 0, false);
        let timeout = TikiError::OutcomeUnknown("timed out".to_owned());
        let first = policy.after_failure(&set, &timeout, at(100), 0.0);
        assert_eq!(first.status, TokenStatus::RefreshFailing);
        assert!(first.outcome_unknown);
        assert!(first.next_refresh_at.is_some());

        let retried = token_set(first.status, first.failure_count, first.outcome_unknown);
        for error in [
            TikiError::OutcomeUnknown("timed out".to_owned()),
            TikiError::GrantRejected("invalid_token".to_owned()),
            transient(),
        ] {
            let second = policy.after_failure(&retried, &error, at(101), 0.0);
            assert_eq!(second.status, TokenStatus::ReauthRequired, "{error}");
            assert_eq!(second.next_refresh_at, None);
            assert!(second.last_error.unwrap().contains("no answer"), "{error}");
        }
    }

    #[test]
    fn unreached_retry_keeps_trying() {
        let policy = RefreshPolicy::default();
        let set = token_set(TokenStatus::RefreshFailing, 1, true);
        for error in [
            TikiError::Unreachable("connection refused".to_owned()),
            TikiError::RateLimited { retry_after: None },
        ] {
            let record = policy.after_failure(&set, &error, at(100), 0.0);
            assert_eq!(record.status, TokenStatus::RefreshFailing, "{error}");
            assert!(record.outcome_unknown);
        }
    }

    #[test]
    fn unrecognized_errors_stop_scheduling() {
        let policy = RefreshPolicy::default();
        let error = TikiError::Unrecognized("maintenance_mode".to_owned());
        let below = token_set(TokenStatus::RefreshFailing, 3, false);
        let record = policy.after_failure(&below, &error, at(100), 0.0);
        assert_eq!(record.status, TokenStatus::RefreshFailing);
        assert_eq!(record.failure_count, 4);
        assert!(record.next_refresh_at.is_some());

        let at_limit = token_set(TokenStatus::RefreshFailing, 4, false);
        let record = policy.after_failure(&at_limit, &error, at(100), 0.0);
        assert_eq!(record.status, TokenStatus::RefreshFailing);
        assert_eq!(record.failure_count, 5);
        assert_eq!(record.next_refresh_at, None);
        let last_error = record.last_error.unwrap();
        assert!(last_error.contains("stopped after 5"), "{last_error}");
        assert!(last_error.contains("maintenance_mode"), "{last_error}");
    }

    #[test]
    fn outages_never_stop_scheduling() {
        let policy = RefreshPolicy::default();
        let set = token_set(TokenStatus::RefreshFailing, 1000, false);
        for error in [
            transient(),
            TikiError::Unreachable("connection refused".to_owned()),
            TikiError::RateLimited { retry_after: None },
            TikiError::NotSent("paused".to_owned()),
        ] {
            let record = policy.after_failure(&set, &error, at(100), 0.0);
            assert_eq!(record.status, TokenStatus::RefreshFailing, "{error}");
            assert!(record.next_refresh_at.is_some(), "{error}");
        }
    }

    #[test]
    fn unreadable_answer_allows_one_retry() {
        let policy = RefreshPolicy::default();
        let set = token_set(TokenStatus::Active, 0, false);
        let garbage = TikiError::OutcomeUnknown("HTTP 200 with a body that is not JSON".into());
        let first = policy.after_failure(&set, &garbage, at(100), 0.0);
        assert!(first.outcome_unknown);
        let retried = token_set(first.status, first.failure_count, first.outcome_unknown);
        let second = policy.after_failure(&retried, &garbage, at(101), 0.0);
        assert_eq!(second.status, TokenStatus::ReauthRequired);
        assert_eq!(second.next_refresh_at, None);
    }

    #[test]
    fn min_valid_defaults_and_caps() {
        assert_eq!(min_valid(0, 3600), Duration::from_secs(60));
        assert_eq!(min_valid(600, 3600), Duration::from_secs(600));
        assert_eq!(min_valid(3600, 3600), Duration::from_secs(3540));
        assert_eq!(min_valid(u32::MAX, 3600), Duration::from_secs(3540));
        assert_eq!(min_valid(0, 60), Duration::from_secs(30));
        assert_eq!(min_valid(10, 60), Duration::from_secs(10));
    }

    #[test]
    fn due_needs_time_and_refresh_token() {
        let mut set = token_set(TokenStatus::Active, 0, false);
        assert!(!is_due(&set, at(3299)));
        assert!(is_due(&set, at(3300)));
        set.status = TokenStatus::ReauthRequired;
        assert!(!is_due(&set, at(3300)));
        set.status = TokenStatus::RefreshFailing;
        set.refresh_token = None;
        assert!(!is_due(&set, at(3300)));
    }
}
