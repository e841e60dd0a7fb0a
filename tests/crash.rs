//! The `tokend` binary killed with SIGKILL between Tiki's response to a refresh and the
//! commit of the new tokens, then started again on the same database. A debug-build
//! failpoint (`TOKEND_TEST_FAILPOINT`) stops the process at exactly that step.

mod support;

use std::{
    io::{BufRead, BufReader},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::Duration,
};

use support::{Backend, wait_until};
use tokend::{
    emulator::{Emulator, EmulatorConfig},
    failpoint,
    proto::{self, token_service_client::TokenServiceClient},
};
use tonic::{Code, transport::Channel};

const BINARY: &str = env!("CARGO_BIN_EXE_tokend");

backend_tests!(kill_before_commit_ends_in_reauth);

/// A running daemon process with its stderr lines and gRPC client.
struct Process {
    child: Child,
    lines: mpsc::Receiver<String>,
    client: TokenServiceClient<Channel>,
}

/// A fixed test key: base64 of 32 bytes.
const ENCRYPTION_KEY: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";

/// Starts the binary against `emulator` on `database_url`, with six-second tokens
/// refreshed 2 s before expiry and an 11 s claim lease.
async fn start(emulator: &Emulator, database_url: &str, failpoint: Option<&str>) -> Process {
    let mut command = Command::new(BINARY);
    command
        .args(["serve"])
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("TOKEND_CLIENT_ID", "sandbox-client")
        .env("TOKEND_CLIENT_SECRET", "sandbox-secret")
        .env("TOKEND_TIKI_GRAPHQL_URL", emulator.graphql_url())
        .env("TOKEND_DATABASE_URL", database_url)
        .env("TOKEND_GRPC_ADDR", "127.0.0.1:0")
        .env("TOKEND_ADMIN_ADDR", "127.0.0.1:0")
        // PostgreSQL needs a key; SQLite takes this one instead of a key file.
        .env("TOKEND_ENCRYPTION_KEY", ENCRYPTION_KEY)
        .env("TOKEND_REFRESH_BEFORE", "2")
        .env("TOKEND_HTTP_TIMEOUT", "1")
        .env("TOKEND_REFRESH_LEASE", "11")
        .env("TOKEND_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if let Some(name) = failpoint {
        command.env(failpoint::VARIABLE, name);
    }
    let mut child = command.spawn().unwrap();

    let stderr = child.stderr.take().unwrap();
    let (sender, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if sender.send(line).is_err() {
                break;
            }
        }
    });
    let listening = wait_for_line(&lines, "gRPC server listening");
    let addr = listening
        .rsplit("grpc_addr=")
        .next()
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned();
    let client = TokenServiceClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    Process {
        child,
        lines,
        client,
    }
}

fn wait_for_line(lines: &mpsc::Receiver<String>, needle: &str) -> String {
    loop {
        match lines.recv_timeout(Duration::from_secs(30)) {
            Ok(line) if line.contains(needle) => return line,
            Ok(_) => {}
            Err(error) => panic!("no log line containing {needle:?}: {error}"),
        }
    }
}

async fn token_set(client: &mut TokenServiceClient<Channel>) -> proto::TokenSetInfo {
    client
        .get_token_set(proto::GetTokenSetRequest {
            user_id: "alice".to_owned(),
        })
        .await
        .unwrap()
        .into_inner()
}

/// The first process is killed after Tiki rotated the refresh token and before the new
/// one was stored. The second process takes over the abandoned claim once its lease
/// ends, presents the stored (rotated-out) refresh token exactly once, and marks the
/// token set `reauth_required` with a `last_error` that names the abandoned refresh.
async fn kill_before_commit_ends_in_reauth(backend: Backend) {
    let emulator = Emulator::start(EmulatorConfig {
        expires_in: 6,
        ..EmulatorConfig::default()
    })
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let database_url = backend.fresh_database(dir.path()).await;

    let mut first = start(
        &emulator,
        &database_url,
        Some(failpoint::REFRESH_BEFORE_COMMIT),
    )
    .await;
    let auth_code = emulator.issue_auth_code("alice", &["offline", "user_profile"]);
    first
        .client
        .exchange_auth_code(proto::ExchangeAuthCodeRequest {
            user_id: "alice".to_owned(),
            auth_code,
        })
        .await
        .unwrap();
    wait_for_line(&first.lines, "test failpoint reached");
    let stats = emulator.stats();
    assert_eq!(stats.refresh_requests, 1);
    assert_eq!(stats.refreshes, 1, "Tiki did not rotate the refresh token");

    // `Child::kill` sends SIGKILL.
    first.child.kill().unwrap();
    let killed = first.child.wait().unwrap();
    assert!(!killed.success(), "{killed}");

    let mut second = start(&emulator, &database_url, None).await;
    let client = second.client.clone();
    wait_until("reauth_required", Duration::from_secs(40), || {
        let mut client = client.clone();
        async move { token_set(&mut client).await.status() == proto::TokenStatus::ReauthRequired }
    })
    .await;
    let info = token_set(&mut second.client).await;
    assert!(
        info.last_error.contains("stopped before committing"),
        "{}",
        info.last_error
    );
    let stats = emulator.stats();
    println!(
        "crash: {} refresh requests, {} reuse detections, last_error: {}",
        stats.refresh_requests, stats.reuse_detections, info.last_error
    );
    assert_eq!(stats.refresh_requests, 2);
    assert_eq!(stats.reuse_detections, 1);

    // Nothing more is sent, on demand or scheduled.
    let status = second
        .client
        .get_access_token(proto::GetAccessTokenRequest {
            user_id: "alice".to_owned(),
            min_valid_seconds: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(emulator.stats().refresh_requests, 2);

    let terminated = Command::new("kill")
        .args(["-TERM", &second.child.id().to_string()])
        .status()
        .unwrap();
    assert!(terminated.success());
    wait_for_line(&second.lines, "tokend stopped");
    assert_eq!(second.child.wait().unwrap().code(), Some(0));
}
