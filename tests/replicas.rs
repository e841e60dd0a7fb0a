//! Three `tokend serve` processes on one PostgreSQL database, under GetAccessToken load
//! against the strict Tiki emulator, with one process killed by SIGKILL midway.
//!
//! Needs `TOKEND_TEST_POSTGRES_URL`; without it the test is skipped, or fails when
//! `CI=true`. Run it with `cargo test --test replicas -- --nocapture` to see the counts,
//! which it prints on lines starting with `replicas:`.

mod support;

use std::{
    collections::{BTreeMap, VecDeque},
    io::{BufRead, BufReader},
    process::{Child, ChildStderr, Command, ExitStatus, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
        mpsc,
    },
    time::{Duration, Instant},
};

use chrono::Utc;
use sqlx::{PgPool, postgres::PgPoolOptions};
use support::{Backend, Client};
use tokend::{
    emulator::{Emulator, EmulatorConfig},
    proto::{self, token_service_client::TokenServiceClient},
};

const BINARY: &str = env!("CARGO_BIN_EXE_tokend");
const CLIENT_ID: &str = "replicas-client";
const CLIENT_SECRET: &str = "replicas-secret";
const SCOPES: [&str; 2] = ["offline", "user_profile"];

const REPLICA_COUNT: usize = 3;
/// Index of the replica that is killed, `replica-2`.
const KILLED: usize = 1;

/// Users exchanged before the load starts. With the debug build on a 2-core machine,
/// 2000 kept the CPU 87% to 94% busy during the load (vmstat, five runs).
const USERS: usize = 2000;
/// Lifetime of the access tokens the emulator issues, in seconds. tokend refreshes a
/// token between 50% and 60% of its lifetime, so a refresh cycle takes 5 to 6 s.
const LIFETIME_SECONDS: u64 = 10;
/// Generous for the emulator's millisecond responses, so that a loaded machine does not
/// turn slow responses into refreshes with an unknown outcome.
const HTTP_TIMEOUT_SECONDS: u64 = 5;
/// The shortest lease tokend accepts with a 5 s HTTP timeout. It outlasts a token, so
/// the killed replica's claims end after the tokens they cover expired.
const REFRESH_LEASE_SECONDS: u64 = 15;
const EXCHANGE_CONCURRENCY: usize = 16;
const LOAD_WORKERS: usize = 12;
/// Pause of a load worker after each call, which leaves CPU time for the replicas.
const LOAD_PAUSE: Duration = Duration::from_millis(10);
/// Upper bound on the calls of one load worker, as a second stop besides the deadline.
const MAX_CALLS_PER_WORKER: u64 = 1_000_000;
/// Load before the kill: about two refresh cycles.
const KILL_AFTER: Duration = Duration::from_secs(12);
/// Number of claims the replica must be seen holding before it is killed.
const KILL_AT_CLAIMS: i64 = 5;
/// Maximum wait after `KILL_AFTER` for `KILL_AT_CLAIMS`. The kill follows either way.
const MAX_WAIT_FOR_CLAIMS: Duration = Duration::from_secs(10);
/// Load after the kill: the lease, one token lifetime and a few more refresh cycles.
const RUN_AFTER_KILL: Duration = Duration::from_secs(30);
/// Client-side deadline of one gRPC call. A caller of a token set that the killed
/// replica still claims waits on the server for up to the lease.
const CALL_TIMEOUT: Duration = Duration::from_secs(3);
const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound on the exit after SIGTERM: the shutdown grace of 10 s plus a margin.
const EXIT_TIMEOUT: Duration = Duration::from_secs(20);
/// Attempts per user in the final check, because a refresh can revoke a served token
/// before the check reaches the emulator.
const FINAL_ATTEMPTS: usize = 3;
/// WARN and ERROR lines kept per replica for the failure messages.
const LOG_LINES_KEPT: usize = 8;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replicas_survive_sigkill() {
    let Some(backend) = Backend::postgres() else {
        return;
    };
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let database_url = backend.fresh_database(dir.path()).await;
    let db = PgPoolOptions::new()
        .max_connections(2)
        .connect(&database_url)
        .await
        .unwrap();
    let emulator = Arc::new(
        Emulator::start(EmulatorConfig {
            client_id: CLIENT_ID.to_owned(),
            client_secret: CLIENT_SECRET.to_owned(),
            expires_in: LIFETIME_SECONDS,
            ..EmulatorConfig::default()
        })
        .await
        .unwrap(),
    );

    let mut children = Children::default();
    let mut replicas = Vec::new();
    for index in 0..REPLICA_COUNT {
        let (child, replica) = spawn_replica(index, &emulator.graphql_url(), &database_url);
        children.0.push(Some(child));
        replicas.push(replica);
    }
    let mut clients = Vec::new();
    for replica in &mut replicas {
        replica.wait_for_addr();
        let client = TokenServiceClient::connect(format!("http://{}", replica.addr))
            .await
            .unwrap();
        clients.push(client);
    }

    let exchange_started = Instant::now();
    let exchange_failures = exchange_users(&emulator, &clients).await;
    let exchange_time = exchange_started.elapsed();
    assert_eq!(exchange_failures, 0, "exchanges failed");

    let load = Arc::new(Load {
        emulator: emulator.clone(),
        clients: clients.clone(),
        live: (0..REPLICA_COUNT).map(|_| AtomicBool::new(true)).collect(),
        stop: AtomicBool::new(false),
        counts: LoadCounts::default(),
    });
    let stats_before = emulator.stats();
    let load_started = Instant::now();
    let load_deadline = load_started + KILL_AFTER + RUN_AFTER_KILL + Duration::from_secs(10);
    let workers: Vec<_> = (0..LOAD_WORKERS)
        .map(|_| tokio::spawn(run_load_worker(load.clone(), load_deadline)))
        .collect();

    tokio::time::sleep(KILL_AFTER).await;
    let killed_id = &replicas[KILLED].id;
    // Kill while the replica has claims, because only then is there a claim for the
    // others to take over. Claims come in bursts, one per scheduler tick, and some end
    // between the last look and the kill.
    let wait_for_claims_until = Instant::now() + MAX_WAIT_FOR_CLAIMS;
    let mut claims_seen = 0;
    while Instant::now() < wait_for_claims_until && claims_seen < KILL_AT_CLAIMS {
        claims_seen = count_claims(&db, killed_id).await;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    load.live[KILLED].store(false, Ordering::Relaxed);
    let mut killed = children.0[KILLED].take().unwrap();
    // `Child::kill` sends SIGKILL, as `kill -KILL` would, without the delay of starting
    // a process, in which the claims just seen could end.
    killed.kill().unwrap();
    let killed_status = killed.wait().unwrap();
    let killed_at = Utc::now();
    let killed_claims = count_claims(&db, killed_id).await;
    let killed_after = load_started.elapsed();

    tokio::time::sleep(RUN_AFTER_KILL).await;
    load.stop.store(true, Ordering::Relaxed);
    for worker in workers {
        worker.await.unwrap();
    }
    let load_time = load_started.elapsed();
    let stats = emulator.stats();

    let reauth_users: Vec<String> =
        sqlx::query_scalar("SELECT user_id FROM token_sets WHERE status = 'reauth_required'")
            .fetch_all(&db)
            .await
            .unwrap();
    let total_rows: i64 = sqlx::query_scalar("SELECT count(*) FROM token_sets")
        .fetch_one(&db)
        .await
        .unwrap();
    let claimed_by_killed = count(
        &db,
        "SELECT count(*) FROM token_sets WHERE claimed_by = $1",
        killed_id,
    )
    .await;
    let written_by_killed = count(
        &db,
        "SELECT count(*) FROM token_sets WHERE updated_by = $1",
        killed_id,
    )
    .await;
    let unwritten_since_kill: i64 =
        sqlx::query_scalar("SELECT count(*) FROM token_sets WHERE updated_at <= $1")
            .bind(killed_at)
            .fetch_one(&db)
            .await
            .unwrap();
    let final_check_started = Instant::now();
    let final_check = check_families(&load, &reauth_users).await;
    let final_check_time = final_check_started.elapsed();

    for child in children.0.iter().flatten() {
        send_signal(child.id(), "TERM");
    }
    let shutdown_started = Instant::now();
    let exit_deadline = Instant::now() + EXIT_TIMEOUT;
    let mut exits = Vec::new();
    for (index, slot) in children.0.iter_mut().enumerate() {
        if let Some(child) = slot.take() {
            exits.push((index, wait_until(child, exit_deadline).await));
        }
    }
    let shutdown_time = shutdown_started.elapsed();
    db.close().await;
    let tiki_timeouts: u64 = replicas
        .iter()
        .map(|replica| replica.log.lock().unwrap().tiki_timeouts)
        .sum();

    // Report everything before asserting, so that a failure shows all the counts.
    let served = load.counts.served.load(Ordering::Relaxed);
    let invalid_at_check = load.counts.invalid_at_check.load(Ordering::Relaxed);
    let errors = load.counts.errors.lock().unwrap().clone();
    let refreshes = stats.refreshes - stats_before.refreshes;
    let refresh_rate = refreshes as f64 / load_time.as_secs_f64();
    let lifetime = LIFETIME_SECONDS as f64;
    let live_families = USERS - reauth_users.len();
    // Scheduled and on-demand refreshes both come between 50% and 60% of a token's
    // lifetime, so every live family refreshes once per 0.5 to 0.6 lifetimes. The
    // margins cover the families that wait out the killed replica's lease.
    let min_rate = 0.85 * live_families as f64 / (0.6 * lifetime);
    let max_rate = 1.1 * USERS as f64 / (0.5 * lifetime);
    let invalid_share = invalid_at_check as f64 / served.max(1) as f64;
    println!(
        "replicas: users={USERS} lifetime={LIFETIME_SECONDS}s startup={:.1}s exchange={:.1}s \
         load={:.1}s (kill at {:.1}s) final_check={:.1}s shutdown={:.1}s total={:.1}s",
        (exchange_started - started).as_secs_f64(),
        exchange_time.as_secs_f64(),
        load_time.as_secs_f64(),
        killed_after.as_secs_f64(),
        final_check_time.as_secs_f64(),
        shutdown_time.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    println!(
        "replicas: served={served} invalid_at_check={invalid_at_check} ({:.3}%) \
         errors={errors:?}",
        100.0 * invalid_share
    );
    println!(
        "replicas: killed {killed_id} ({killed_status}) seen with {claims_seen} claims, \
         holding {killed_claims} claims after the kill; \
         reuse_detections={} reauth_required_rows={} rows={total_rows} \
         claimed_by_killed={claimed_by_killed} written_by_killed={written_by_killed} \
         unwritten_since_kill={unwritten_since_kill}",
        stats.reuse_detections,
        reauth_users.len()
    );
    println!(
        "replicas: emulator refresh_requests={} refreshes={} refreshes_after_expiry={} \
         rejected_grants={}; during load {refreshes} refreshes = {refresh_rate:.0}/s \
         (expected {min_rate:.0} to {max_rate:.0}/s)",
        stats.refresh_requests,
        stats.refreshes,
        stats.refreshes_after_expiry,
        stats.rejected_grants
    );
    println!(
        "replicas: final check of {} families: {} dead, first {:?}",
        final_check.checked, final_check.dead, final_check.first_dead
    );
    for replica in &replicas {
        let log = replica.log.lock().unwrap();
        println!(
            "replicas: {} logged {} warnings ({} Tiki timeouts) and {} errors, stopped \
             cleanly: {}; last: {:?}",
            replica.id, log.warnings, log.tiki_timeouts, log.errors, log.stopped, log.recent
        );
    }

    // A SIGKILL between Tiki's rotation of a refresh token and the commit of the new
    // one loses that family, because the new refresh token existed only in the killed
    // process. The replica that takes the claim over can present only the rotated-out
    // token, and Tiki revokes the family. Only the killed replica's claims are at risk.
    assert!(
        stats.reuse_detections <= killed_claims as u64,
        "Tiki saw {} reused refresh tokens, but the killed replica held only \
         {killed_claims} claims ({tiki_timeouts} refreshes timed out)",
        stats.reuse_detections
    );
    assert_eq!(
        reauth_users.len() as u64,
        stats.reuse_detections,
        "every reauth_required token set must come from a reused refresh token"
    );
    assert_eq!(final_check.dead, 0, "token families died: {final_check:?}");
    assert!(
        invalid_share < 0.01,
        "{invalid_at_check} of {served} served tokens were invalid when checked"
    );
    assert_eq!(
        claimed_by_killed, 0,
        "rows are still claimed by {killed_id}"
    );
    assert_eq!(
        written_by_killed, 0,
        "rows were last written by {killed_id}"
    );
    assert_eq!(
        unwritten_since_kill, 0,
        "rows were not written since the kill"
    );
    // A slow machine lowers the rate, so the lower bound is only printed; that refreshes
    // kept up is checked through refreshes after expiry below. Refreshing more often
    // than the schedule allows is a fault on any machine.
    assert!(
        refresh_rate <= max_rate,
        "{refresh_rate:.0} refreshes per second is above {max_rate:.0}"
    );
    // The lease outlasts a token, so a taken-over claim whose refresh never reached
    // Tiki is refreshed after expiry. Every other refresh must come before it.
    assert!(
        stats.refreshes_after_expiry <= killed_claims as u64,
        "{} refreshes came after expiry, more than the {killed_claims} claims the killed \
         replica held",
        stats.refreshes_after_expiry
    );
    for (index, exit) in exits {
        let replica = &replicas[index];
        let stopped = replica.log.lock().unwrap().stopped;
        let status = exit.unwrap_or_else(|| {
            panic!(
                "{} did not exit within {EXIT_TIMEOUT:?} of SIGTERM (logged \"tokend \
                 stopped\": {stopped})",
                replica.id
            )
        });
        assert_eq!(
            status.code(),
            Some(0),
            "{} exited with {status}",
            replica.id
        );
    }
}

/// The child processes; dropping this kills and reaps those still running, so that a
/// failing test leaves no replica behind.
#[derive(Default)]
struct Children(Vec<Option<Child>>);

impl Drop for Children {
    fn drop(&mut self) {
        for mut child in self.0.iter_mut().filter_map(Option::take) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A replica's id, gRPC address and log counts.
struct Replica {
    id: String,
    addr: String,
    addr_receiver: mpsc::Receiver<String>,
    log: Arc<Mutex<ReplicaLog>>,
}

#[derive(Default)]
struct ReplicaLog {
    /// Whether the replica logged that it stopped after a clean shutdown.
    stopped: bool,
    /// Refreshes that timed out waiting for Tiki's response. Each one can lose its
    /// family, as a kill can.
    tiki_timeouts: u64,
    warnings: u64,
    errors: u64,
    recent: VecDeque<String>,
}

/// Starts `tokend serve` as replica `index + 1`, with a thread that reads its stderr
/// until the process exits, so that the pipe never fills.
fn spawn_replica(index: usize, graphql_url: &str, database_url: &str) -> (Child, Replica) {
    let id = format!("replica-{}", index + 1);
    let mut child = Command::new(BINARY)
        .arg("serve")
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("TOKEND_CLIENT_ID", CLIENT_ID)
        .env("TOKEND_CLIENT_SECRET", CLIENT_SECRET)
        .env("TOKEND_TIKI_GRAPHQL_URL", graphql_url)
        .env("TOKEND_DATABASE_URL", database_url)
        .env("TOKEND_GRPC_ADDR", "127.0.0.1:0")
        .env("TOKEND_ADMIN_ADDR", "127.0.0.1:0")
        .env("TOKEND_REPLICA_ID", &id)
        .env("TOKEND_HTTP_TIMEOUT", HTTP_TIMEOUT_SECONDS.to_string())
        .env("TOKEND_REFRESH_LEASE", REFRESH_LEASE_SECONDS.to_string())
        .env("TOKEND_SHUTDOWN_GRACE", "10")
        // Warnings and errors, plus the info line that carries the gRPC address.
        .env("TOKEND_LOG", "warn,tokend::server=info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let log = Arc::new(Mutex::new(ReplicaLog::default()));
    let (addr_sender, addr_receiver) = mpsc::channel();
    {
        let log = log.clone();
        std::thread::spawn(move || read_log(stderr, &addr_sender, &log));
    }
    let replica = Replica {
        id,
        addr: String::new(),
        addr_receiver,
        log,
    };
    (child, replica)
}

fn read_log(stderr: ChildStderr, addr_sender: &mpsc::Sender<String>, log: &Mutex<ReplicaLog>) {
    for line in BufReader::new(stderr).lines() {
        let Ok(line) = line else { break };
        if line.contains("gRPC server listening")
            && let Some(addr) = line.rsplit("grpc_addr=").next()
        {
            let addr = addr.split_whitespace().next().unwrap_or_default();
            let _ = addr_sender.send(addr.to_owned());
        }
        let mut log = log.lock().unwrap();
        if line.contains("tokend stopped") {
            log.stopped = true;
        }
        if line.contains("no answer from Tiki") {
            log.tiki_timeouts += 1;
        }
        if line.contains(" WARN ") {
            log.warnings += 1;
        } else if line.contains(" ERROR ") || line.starts_with("error:") {
            log.errors += 1;
        } else {
            continue;
        }
        if log.recent.len() == LOG_LINES_KEPT {
            log.recent.pop_front();
        }
        log.recent.push_back(line);
    }
}

impl Replica {
    fn wait_for_addr(&mut self) {
        match self.addr_receiver.recv_timeout(STARTUP_TIMEOUT) {
            Ok(addr) => self.addr = addr,
            Err(error) => panic!(
                "{} logged no gRPC address ({error}); its last warnings and errors: {:?}",
                self.id,
                self.log.lock().unwrap().recent
            ),
        }
    }
}

fn user_id(index: usize) -> String {
    format!("user-{index:05}")
}

/// Exchanges an auth code for each user through the replicas in turn, and returns the
/// number of exchanges that failed.
async fn exchange_users(emulator: &Arc<Emulator>, clients: &[Client]) -> u64 {
    let next = Arc::new(AtomicUsize::new(0));
    let failures = Arc::new(AtomicU64::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..EXCHANGE_CONCURRENCY {
        let (next, failures) = (next.clone(), failures.clone());
        let (emulator, clients) = (emulator.clone(), clients.to_vec());
        tasks.spawn(async move {
            loop {
                let index = next.fetch_add(1, Ordering::Relaxed);
                if index >= USERS {
                    break;
                }
                let user_id = user_id(index);
                let auth_code = emulator.issue_auth_code(&user_id, &SCOPES);
                let mut client = clients[index % clients.len()].clone();
                let request = proto::ExchangeAuthCodeRequest { user_id, auth_code };
                let exchanged =
                    tokio::time::timeout(CALL_TIMEOUT, client.exchange_auth_code(request)).await;
                if !matches!(exchanged, Ok(Ok(_))) {
                    failures.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
    }
    tasks.join_all().await;
    failures.load(Ordering::Relaxed)
}

/// What the load workers share.
struct Load {
    emulator: Arc<Emulator>,
    clients: Vec<Client>,
    /// Whether each replica may still be called.
    live: Vec<AtomicBool>,
    stop: AtomicBool,
    counts: LoadCounts,
}

impl Load {
    fn live_replicas(&self) -> Vec<usize> {
        (0..self.clients.len())
            .filter(|&index| self.live[index].load(Ordering::Relaxed))
            .collect()
    }

    /// Calls GetAccessToken for `user_id` on replica `index`, with the client deadline.
    async fn access_token(&self, index: usize, user_id: &str) -> Result<String, CallError> {
        let mut client = self.clients[index].clone();
        let request = proto::GetAccessTokenRequest {
            user_id: user_id.to_owned(),
            min_valid_seconds: 0,
        };
        match tokio::time::timeout(CALL_TIMEOUT, client.get_access_token(request)).await {
            Ok(Ok(response)) => Ok(response.into_inner().access_token),
            Ok(Err(status)) => Err(CallError::Status(status.code())),
            Err(_) => Err(CallError::TimedOut),
        }
    }
}

#[derive(Debug)]
enum CallError {
    Status(tonic::Code),
    TimedOut,
}

#[derive(Default)]
struct LoadCounts {
    served: AtomicU64,
    invalid_at_check: AtomicU64,
    /// Failed calls by gRPC status code, or `TimedOut` for the client deadline.
    errors: Mutex<BTreeMap<String, u64>>,
}

impl LoadCounts {
    fn count_error(&self, error: &CallError) {
        let name = match error {
            CallError::Status(code) => format!("{code:?}"),
            CallError::TimedOut => "TimedOut".to_owned(),
        };
        *self.errors.lock().unwrap().entry(name).or_default() += 1;
    }
}

/// Requests access tokens for random users from random live replicas and checks each
/// served token with the emulator at once, until `stop` is set or `deadline` passes.
async fn run_load_worker(load: Arc<Load>, deadline: Instant) {
    let counts = &load.counts;
    for _ in 0..MAX_CALLS_PER_WORKER {
        if load.stop.load(Ordering::Relaxed) || Instant::now() >= deadline {
            break;
        }
        let live = load.live_replicas();
        let replica = live[rand::random_range(0..live.len())];
        let user_id = user_id(rand::random_range(0..USERS));
        match load.access_token(replica, &user_id).await {
            Ok(token) => {
                counts.served.fetch_add(1, Ordering::Relaxed);
                if !load.emulator.access_token_valid(&token) {
                    counts.invalid_at_check.fetch_add(1, Ordering::Relaxed);
                }
            }
            Err(error) => counts.count_error(&error),
        }
        tokio::time::sleep(LOAD_PAUSE).await;
    }
}

#[derive(Debug)]
struct FamilyCheck {
    checked: usize,
    dead: usize,
    /// Up to five users whose family is dead.
    first_dead: Vec<String>,
}

/// Checks that every user outside `reauth_users` gets a token the emulator accepts.
async fn check_families(load: &Arc<Load>, reauth_users: &[String]) -> FamilyCheck {
    let users: Arc<Vec<String>> = Arc::new(
        (0..USERS)
            .map(user_id)
            .filter(|user| !reauth_users.contains(user))
            .collect(),
    );
    let next = Arc::new(AtomicUsize::new(0));
    let dead = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..EXCHANGE_CONCURRENCY {
        let (load, users, next, dead) = (load.clone(), users.clone(), next.clone(), dead.clone());
        tasks.spawn(async move {
            let live = load.live_replicas();
            loop {
                let index = next.fetch_add(1, Ordering::Relaxed);
                let Some(user_id) = users.get(index) else {
                    break;
                };
                let mut alive = false;
                for attempt in 0..FINAL_ATTEMPTS {
                    let replica = live[(index + attempt) % live.len()];
                    if let Ok(token) = load.access_token(replica, user_id).await
                        && load.emulator.access_token_valid(&token)
                    {
                        alive = true;
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                if !alive {
                    dead.lock().unwrap().push(user_id.clone());
                }
            }
        });
    }
    tasks.join_all().await;
    let mut dead = dead.lock().unwrap().clone();
    dead.sort();
    FamilyCheck {
        checked: users.len(),
        dead: dead.len(),
        first_dead: dead.into_iter().take(5).collect(),
    }
}

/// Counts the unexpired claims of `replica_id`.
async fn count_claims(db: &PgPool, replica_id: &str) -> i64 {
    count(
        db,
        "SELECT count(*) FROM token_sets WHERE claimed_by = $1 AND claim_until > now()",
        replica_id,
    )
    .await
}

async fn count(db: &PgPool, query: &'static str, replica_id: &str) -> i64 {
    sqlx::query_scalar(query)
        .bind(replica_id)
        .fetch_one(db)
        .await
        .unwrap()
}

fn send_signal(pid: u32, signal: &str) {
    let status = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()
        .unwrap();
    assert!(status.success(), "kill -{signal} {pid} failed: {status}");
}

/// Waits until `deadline` for `child` to exit; kills it and returns `None` after that.
async fn wait_until(mut child: Child, deadline: Instant) -> Option<ExitStatus> {
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}
