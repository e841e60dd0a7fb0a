//! Logging set-up and the Prometheus metrics: their names and help texts, the
//! process-wide recorder, and the helpers the refresher and the gRPC layer call.
//!
//! The recorder is global to the process, so every daemon in one process (as in the
//! tests) counts into the same counters. Gauges that describe one daemon's store and
//! scheduler are set while a scrape has locked [`SCRAPE_LOCK`], right before rendering.

pub mod grpc;

use std::{io::IsTerminal, sync::OnceLock, time::Duration};

use metrics::{Unit, counter, describe_counter, describe_gauge, describe_histogram, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tracing::warn;
use tracing_subscriber::EnvFilter;

use crate::tiki::FailureClass;

pub const REFRESH_ATTEMPTS: &str = "tokend_refresh_attempts_total";
pub const REFRESH_DURATION: &str = "tokend_refresh_duration_seconds";
pub const UPSTREAM_RESPONSES: &str = "tokend_upstream_responses_total";
pub const TOKEN_SETS: &str = "tokend_token_sets";
pub const EARLIEST_EXPIRY: &str = "tokend_earliest_expiry_seconds";
pub const REFRESH_OVERDUE: &str = "tokend_refresh_overdue_seconds";
pub const SCHEDULER_TICK_AGE: &str = "tokend_scheduler_last_tick_age_seconds";
pub const GRPC_REQUESTS: &str = "tokend_grpc_requests_total";
pub const CREDENTIALS_REJECTED: &str = "tokend_tiki_credentials_rejected";

/// Upper bounds of the refresh duration buckets, in seconds. A refresh is one request
/// to Tiki plus one database write, bounded by `http_timeout` (at most 300 s).
const REFRESH_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

/// Serialises scrapes, so that the per-daemon gauges a scrape sets are the ones it
/// renders even when several daemons share the process.
pub static SCRAPE_LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Installs the Prometheus recorder on first use and returns the handle that renders
/// it. Later calls, from further daemons in the same process, share that handle.
pub fn prometheus() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Full(REFRESH_DURATION.to_owned()), REFRESH_BUCKETS)
            .expect("the bucket list is not empty")
            .build_recorder();
        let handle = recorder.handle();
        if let Err(error) = metrics::set_global_recorder(recorder) {
            warn!(%error, "another metrics recorder is installed; /metrics stays empty");
        }
        describe();
        handle
    })
}

fn describe() {
    describe_counter!(
        REFRESH_ATTEMPTS,
        "Refresh attempts that sent a refresh token to Tiki, by outcome: refreshed, \
         grant_rejected, credentials_rejected, transient, outcome_unknown, or store_error \
         when the outcome could not be stored"
    );
    describe_histogram!(
        REFRESH_DURATION,
        Unit::Seconds,
        "Duration of a refresh attempt: the request to Tiki and the write of its outcome"
    );
    describe_counter!(
        UPSTREAM_RESPONSES,
        "Responses to exchange and refresh requests sent to Tiki, by class: ok, \
         grant_rejected, credentials_rejected, transient, or outcome_unknown when no \
         response arrived"
    );
    describe_gauge!(
        TOKEN_SETS,
        "Stored token sets by status: active, refresh_failing, reauth_required"
    );
    describe_gauge!(
        EARLIEST_EXPIRY,
        Unit::Seconds,
        "Seconds until the earliest access token expires among token sets that are not \
         reauth_required; negative once it has expired, +Inf when there is none"
    );
    describe_gauge!(
        REFRESH_OVERDUE,
        Unit::Seconds,
        "Seconds since the most overdue scheduled refresh was due; 0 when none is due"
    );
    describe_gauge!(
        SCHEDULER_TICK_AGE,
        Unit::Seconds,
        "Seconds since the refresh scheduler of this replica last started a pass"
    );
    describe_counter!(
        GRPC_REQUESTS,
        "gRPC requests by method and status code; methods the server does not implement \
         count as unknown"
    );
    describe_gauge!(
        CREDENTIALS_REJECTED,
        "1 while Tiki rejects tokend's client credentials (client_id, client_secret or \
         clock), 0 otherwise"
    );
}

/// Returns the label value of a failure class.
pub fn failure_label(class: FailureClass) -> &'static str {
    match class {
        FailureClass::GrantRejected => "grant_rejected",
        FailureClass::CredentialsRejected => "credentials_rejected",
        FailureClass::Transient => "transient",
        FailureClass::OutcomeUnknown => "outcome_unknown",
    }
}

/// Counts one response (or missing response) from Tiki; `failure` is `None` on success.
pub fn record_upstream(failure: Option<FailureClass>) {
    let class = failure.map_or("ok", failure_label);
    counter!(UPSTREAM_RESPONSES, "class" => class).increment(1);
}

/// Counts one refresh attempt and records how long it took.
pub fn record_refresh(outcome: &'static str, duration: Duration) {
    counter!(REFRESH_ATTEMPTS, "outcome" => outcome).increment(1);
    histogram!(REFRESH_DURATION).record(duration.as_secs_f64());
}

/// Log filter used when TOKEND_LOG is unset; the cron crate's own start-up lines are
/// noise at info level.
const DEFAULT_LOG_FILTER: &str = "info,tokio_cron_scheduler=warn";

/// The format of log lines on stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines, coloured on a terminal.
    #[default]
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// Starts logging to stderr with the filter in TOKEND_LOG, and warns about an invalid
/// filter and about misspelled `TOKEND_` variables.
pub fn init_logging(format: LogFormat) {
    let (filter, invalid) = match std::env::var("TOKEND_LOG") {
        Ok(text) => match EnvFilter::try_new(&text) {
            Ok(filter) => (filter, None),
            Err(error) => (EnvFilter::new(DEFAULT_LOG_FILTER), Some((text, error))),
        },
        Err(_) => (EnvFilter::new(DEFAULT_LOG_FILTER), None),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .init(),
    }
    if let Some((text, error)) = invalid {
        warn!(filter = %text, %error, "TOKEND_LOG is invalid; logging at the default level");
    }
    for name in crate::settings::unknown_variables() {
        warn!(variable = %name, "unknown TOKEND_ variable ignored; check its spelling");
    }
}
