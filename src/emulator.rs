//! An in-process emulator of Tiki's generation-1 token API, the GraphQL endpoint that
//! exchanges auth codes and refreshes token sets. tokend's integration tests and
//! `tokend serve --sandbox` use it; the daemon's production request path never does.
//!
//! The emulator is strict: it parses the query with a real GraphQL parser, checks the
//! client id, the timestamp window and the HMAC signature, and applies ORY Hydra's
//! rules to grants. Auth codes are single-use, each refresh rotates the refresh token
//! and revokes the previous access token, and presenting a rotated-out refresh token or
//! a used code revokes the whole token family. Tiki does not publish these rules; they
//! are inferred from the Hydra token format Tiki uses.
//!
//! HTTP endpoints, all served on one address:
//! - `POST /tiniapp/api/graphql/query`: the token API, with injectable faults.
//! - `POST /emulator/auth-codes`: issues an auth code as `text/plain`, standing in for
//!   the Tini App front end's `my.getAuthCode`.
//! - `GET /emulator/stats`: [`EmulatorStats`] as JSON.
//! - `GET /ecom/v1/customers/profile`: checks a bearer access token.

mod faults;
mod query;
mod routes;
mod state;
mod token_endpoint;

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use faults::FaultQueue;
use state::Grants;

/// Path of the GraphQL token endpoint, as on Tiki's platform API.
const GRAPHQL_PATH: &str = "/tiniapp/api/graphql/query";

/// Settings of an [`Emulator`].
#[derive(Clone)]
pub struct EmulatorConfig {
    /// The only client id the emulator accepts.
    pub client_id: String,
    /// The HMAC key that request signatures must be made with.
    pub client_secret: String,
    /// Seconds an access token is valid, sent as `expires_in`. Changeable at run time
    /// with [`Emulator::set_expires_in`].
    pub expires_in: u64,
    /// How long a refresh token is valid after it was issued. Hydra's default is 30 days.
    pub refresh_token_lifetime: Duration,
    /// How long an auth code can be exchanged after it was issued.
    pub auth_code_lifetime: Duration,
    /// Largest accepted difference between a request's timestamp and the emulator's
    /// clock, in either direction.
    pub timestamp_window: Duration,
}

impl Default for EmulatorConfig {
    fn default() -> Self {
        EmulatorConfig {
            client_id: "sandbox-client".to_owned(),
            client_secret: "sandbox-secret".to_owned(),
            expires_in: 3600,
            refresh_token_lifetime: Duration::from_secs(30 * 24 * 3600),
            auth_code_lifetime: Duration::from_secs(10 * 60),
            timestamp_window: Duration::from_secs(5 * 60),
        }
    }
}

impl fmt::Debug for EmulatorConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EmulatorConfig")
            .field("client_id", &self.client_id)
            .field("client_secret", &"[redacted]")
            .field("expires_in", &self.expires_in)
            .field("refresh_token_lifetime", &self.refresh_token_lifetime)
            .field("auth_code_lifetime", &self.auth_code_lifetime)
            .field("timestamp_window", &self.timestamp_window)
            .finish()
    }
}

/// Counters of what the emulator saw since it started.
///
/// A GraphQL request that a fault responds to without processing counts only in
/// `faults_injected` and the request counters at the end, and a request rejected as
/// malformed (HTTP 400) counts only in those.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct EmulatorStats {
    /// Well-formed `get_auth_access_token` requests.
    pub exchange_requests: u64,
    /// Exchanges that issued a token set.
    pub exchanges: u64,
    /// Well-formed `refresh_auth_access_token` requests.
    pub refresh_requests: u64,
    /// Refreshes that issued a token set.
    pub refreshes: u64,
    /// Rotated-out refresh tokens and used auth codes presented again.
    pub reuse_detections: u64,
    /// Requests whose signature did not verify.
    pub signature_failures: u64,
    /// Requests whose timestamp was outside the window.
    pub timestamp_failures: u64,
    /// Invalid, expired, revoked or reused codes and refresh tokens.
    pub rejected_grants: u64,
    /// GraphQL requests that a fault was applied to.
    pub faults_injected: u64,
    /// Successful refreshes whose replaced access token had already expired.
    pub refreshes_after_expiry: u64,
    /// Every request to the GraphQL endpoint, whatever became of it.
    pub graphql_requests: u64,
    /// Maximum number of GraphQL requests being handled at once.
    pub peak_concurrent_requests: u64,
    /// Maximum number of GraphQL requests that arrived within any one second.
    pub peak_requests_per_second: u64,
}

/// A misbehaviour of the token endpoint, injected with [`Emulator::inject`].
#[derive(Debug, Clone)]
pub enum Fault {
    /// Responds with this HTTP status and a short text body, without processing.
    Status(u16),
    /// Responds with 429 and a `Retry-After` header, without processing.
    TooManyRequests { retry_after_seconds: u64 },
    /// Sleeps, then processes the request and responds normally.
    DelayBefore(Duration),
    /// Processes the request (a refresh rotates), then sleeps before responding, so a
    /// client can time out without knowing the outcome.
    DelayAfter(Duration),
    /// Responds with HTTP 200 and a body that is not JSON, without processing.
    GarbageBody,
    /// Responds with HTTP 200 and a GraphQL error of this code and message, without
    /// processing.
    GraphqlError { code: String, message: String },
    /// Sleeps, then responds with this HTTP status without processing, as a gateway
    /// that times out waiting for Tiki does.
    StatusAfter { status: u16, delay: Duration },
    /// Processes the request and adds a GraphQL error with this message to the
    /// response, next to any tokens it issued.
    TokensWithErrors { message: String },
}

/// A running emulator of Tiki's generation-1 token API. Dropping it stops the server in
/// the background, and [`Emulator::shutdown`] also waits until it stopped.
pub struct Emulator {
    addr: SocketAddr,
    shared: Arc<Shared>,
    server: Option<JoinHandle<()>>,
}

/// State shared by the handle and the HTTP handlers.
struct Shared {
    config: EmulatorConfig,
    inner: Mutex<Inner>,
    /// Becomes true when the emulator shuts down, which also ends injected delays.
    shutdown: watch::Sender<bool>,
}

/// The mutable part of the state, kept behind one lock.
struct Inner {
    grants: Grants,
    stats: EmulatorStats,
    faults: FaultQueue,
    /// Faults applied to every request whose code or refresh token belongs to the
    /// customer, when no queued fault applies.
    customer_faults: HashMap<String, Fault>,
    expires_in: u64,
    expires_in_as_string: bool,
    omit_refresh_token: bool,
    /// GraphQL requests being handled now.
    in_flight: u64,
    /// Arrival times of the GraphQL requests of the last second.
    recent_arrivals: VecDeque<Instant>,
    /// Arrival times of every GraphQL request.
    arrivals: Vec<SystemTime>,
    /// Every signature a well-formed request carried.
    signatures: Vec<String>,
}

impl Inner {
    fn new(expires_in: u64) -> Self {
        Inner {
            grants: Grants::default(),
            stats: EmulatorStats::default(),
            faults: FaultQueue::default(),
            customer_faults: HashMap::new(),
            expires_in,
            expires_in_as_string: false,
            omit_refresh_token: false,
            in_flight: 0,
            recent_arrivals: VecDeque::new(),
            arrivals: Vec::new(),
            signatures: Vec::new(),
        }
    }

    /// Counts a GraphQL request that starts now and updates the peaks.
    fn request_started(&mut self) {
        let now = Instant::now();
        self.stats.graphql_requests += 1;
        self.in_flight += 1;
        self.stats.peak_concurrent_requests =
            self.stats.peak_concurrent_requests.max(self.in_flight);
        while self
            .recent_arrivals
            .front()
            .is_some_and(|arrived| now.duration_since(*arrived) >= Duration::from_secs(1))
        {
            self.recent_arrivals.pop_front();
        }
        self.recent_arrivals.push_back(now);
        let last_second = self.recent_arrivals.len() as u64;
        self.stats.peak_requests_per_second = self.stats.peak_requests_per_second.max(last_second);
        self.arrivals.push(SystemTime::now());
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // The state stays consistent even if a handler panicked while holding the lock,
        // because every change is made in one step.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn issue_auth_code(&self, customer_id: &str, scopes: Vec<String>) -> String {
        debug!(customer_id, ?scopes, "auth code issued");
        let lifetime = self.config.auth_code_lifetime;
        let mut inner = self.lock();
        inner
            .grants
            .issue_code(customer_id, scopes, SystemTime::now(), lifetime)
    }

    /// Sleeps for `duration`, or less if the emulator shuts down meanwhile.
    async fn pause(&self, duration: Duration) {
        let mut stopping = self.shutdown.subscribe();
        tokio::select! {
            () = tokio::time::sleep(duration) => {}
            _ = stopping.wait_for(|stop| *stop) => {}
        }
    }
}

impl Emulator {
    /// Starts an emulator on a free port of 127.0.0.1.
    pub async fn start(config: EmulatorConfig) -> std::io::Result<Emulator> {
        Emulator::start_on(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), config).await
    }

    /// Starts an emulator on `addr`. Fails if the address cannot be bound or if the
    /// client id or secret is empty.
    pub async fn start_on(addr: SocketAddr, config: EmulatorConfig) -> std::io::Result<Emulator> {
        if config.client_id.is_empty() || config.client_secret.is_empty() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "the emulator's client_id and client_secret must not be empty",
            ));
        }
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;

        let expires_in = config.expires_in;
        let shared = Arc::new(Shared {
            config,
            inner: Mutex::new(Inner::new(expires_in)),
            shutdown: watch::Sender::new(false),
        });
        let server = tokio::spawn(serve(listener, Arc::clone(&shared)));
        info!(%addr, client_id = %shared.config.client_id, "Tiki emulator listening");
        Ok(Emulator {
            addr,
            shared,
            server: Some(server),
        })
    }

    /// Returns the address the emulator listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Returns the URL of the GraphQL token endpoint.
    pub fn graphql_url(&self) -> String {
        format!("http://{}{GRAPHQL_PATH}", self.addr)
    }

    /// Issues a single-use auth code for `customer_id` with `scopes`, as the Tini App
    /// front end's `my.getAuthCode` would. Include `offline` to get a refresh token.
    pub fn issue_auth_code(&self, customer_id: &str, scopes: &[&str]) -> String {
        let scopes = scopes.iter().map(|scope| (*scope).to_owned()).collect();
        self.shared.issue_auth_code(customer_id, scopes)
    }

    /// Returns whether `access_token` is the current access token of a live token
    /// family and has not expired.
    pub fn access_token_valid(&self, access_token: &str) -> bool {
        let inner = self.shared.lock();
        inner
            .grants
            .check_access_token(access_token, SystemTime::now())
            .is_some()
    }

    /// Revokes every token family of `customer_id`, as when the user withdraws consent.
    /// Auth codes not yet exchanged stay valid.
    pub fn revoke_customer(&self, customer_id: &str) {
        let revoked = self.shared.lock().grants.revoke_customer(customer_id);
        debug!(customer_id, revoked, "customer's token families revoked");
    }

    /// Returns every access and refresh token issued since the emulator started, so that
    /// a test can look for them where they must not appear.
    pub fn issued_tokens(&self) -> Vec<String> {
        self.shared.lock().grants.issued_tokens()
    }

    /// Returns a snapshot of the counters.
    pub fn stats(&self) -> EmulatorStats {
        self.shared.lock().stats.clone()
    }

    /// Sets the lifetime in seconds of access tokens issued from now on.
    pub fn set_expires_in(&self, seconds: u64) {
        self.shared.lock().expires_in = seconds;
    }

    /// Makes responses carry `expires_in` as a string such as `"3600"` instead of a number.
    pub fn set_expires_in_as_string(&self, on: bool) {
        self.shared.lock().expires_in_as_string = on;
    }

    /// Makes refresh responses leave out `refresh_token`. Such a refresh does not rotate
    /// the refresh token, so the one presented stays valid.
    pub fn set_omit_refresh_token(&self, on: bool) {
        self.shared.lock().omit_refresh_token = on;
    }

    /// Queues `fault` for the next `times` GraphQL requests, or for every request until
    /// [`Emulator::clear_faults`] when `times` is `None`. Faults apply in the order they
    /// were injected, so a fault without a count holds back the ones queued after it.
    ///
    /// # Panics
    ///
    /// Panics if a [`Fault::Status`] or [`Fault::StatusAfter`] code is outside
    /// 100..=999, which HTTP cannot send.
    pub fn inject(&self, fault: Fault, times: Option<u32>) {
        faults::check_status(&fault);
        debug!(?fault, ?times, "fault queued");
        self.shared.lock().faults.push(fault, times);
    }

    /// Applies `fault` to every GraphQL request whose auth code or refresh token belongs
    /// to `customer_id`, until [`Emulator::clear_faults`], whenever no queued fault
    /// applies. A later call for the same customer replaces the fault.
    ///
    /// # Panics
    ///
    /// Panics on an HTTP status outside 100..=999, as [`Emulator::inject`] does.
    pub fn inject_for_customer(&self, customer_id: &str, fault: Fault) {
        faults::check_status(&fault);
        debug!(customer_id, ?fault, "customer fault set");
        self.shared
            .lock()
            .customer_faults
            .insert(customer_id.to_owned(), fault);
    }

    /// Removes every queued fault and every customer fault.
    pub fn clear_faults(&self) {
        let mut inner = self.shared.lock();
        inner.faults.clear();
        inner.customer_faults.clear();
    }

    /// Returns the arrival times of every GraphQL request so far.
    pub fn request_arrivals(&self) -> Vec<SystemTime> {
        self.shared.lock().arrivals.clone()
    }

    /// Returns every auth code, access token and refresh token the emulator issued,
    /// for tests that check that none of them leaks.
    pub fn issued_secrets(&self) -> Vec<String> {
        self.shared.lock().grants.all_secrets()
    }

    /// Returns every signature that well-formed requests carried.
    pub fn received_signatures(&self) -> Vec<String> {
        self.shared.lock().signatures.clone()
    }

    /// Stops the server and waits until it stopped. Requests in an injected delay get
    /// their response at once.
    pub async fn shutdown(mut self) {
        self.shared.shutdown.send_replace(true);
        if let Some(server) = self.server.take()
            && let Err(error) = server.await
        {
            warn!(%error, "Tiki emulator task failed");
        }
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        self.shared.shutdown.send_replace(true);
    }
}

impl fmt::Debug for Emulator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Emulator")
            .field("addr", &self.addr)
            .field("config", &self.shared.config)
            .finish_non_exhaustive()
    }
}

/// Serves the emulator's routes until the shutdown signal.
async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    let mut stopping = shared.shutdown.subscribe();
    let router = routes::router(Arc::clone(&shared));
    let signal = async move {
        // `wait_for` fails only once the sender is dropped, and `shared` owns it.
        let _ = stopping.wait_for(|stop| *stop).await;
    };
    match axum::serve(listener, router)
        .with_graceful_shutdown(signal)
        .await
    {
        Ok(()) => info!("Tiki emulator stopped"),
        Err(error) => warn!(%error, "Tiki emulator server failed"),
    }
}
