//! The `tokend` binary as an operator runs it: settings from the environment, Tiki at a
//! configured URL (the emulator here), signals for shutdown.

use std::{
    io::{BufRead, BufReader},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::Duration,
};

use tokend::{
    emulator::{Emulator, EmulatorConfig},
    proto::{self, token_service_client::TokenServiceClient},
};

const BINARY: &str = env!("CARGO_BIN_EXE_tokend");

fn tokend(dir: &std::path::Path) -> Command {
    let mut command = Command::new(BINARY);
    command
        .current_dir(dir)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .stdin(Stdio::null());
    command
}

/// Reads the child's stderr on a thread and returns the lines as they arrive.
fn stderr_lines(child: &mut Child) -> mpsc::Receiver<String> {
    let stderr = child.stderr.take().unwrap();
    let (sender, receiver) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if sender.send(line).is_err() {
                break;
            }
        }
    });
    receiver
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

#[test]
fn missing_settings_exit_before_binding() {
    let dir = tempfile::tempdir().unwrap();
    let output = tokend(dir.path())
        .args(["serve"])
        .env("TOKEND_GRPC_ADDR", "127.0.0.1:0")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(78));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("client_id"), "{stderr}");
    assert!(stderr.contains("TOKEND_CLIENT_ID"), "{stderr}");
    assert!(!stderr.contains("listening"), "{stderr}");
    assert!(
        !dir.path().join("tokend.db").exists(),
        "the database was created"
    );
}

#[test]
fn invalid_setting_names_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let output = tokend(dir.path())
        .args(["serve"])
        .env("TOKEND_CLIENT_ID", "client")
        .env("TOKEND_CLIENT_SECRET", "hunter2-secret")
        .env("TOKEND_REFRESH_BEFORE", "five minutes")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(78));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("refresh_before"), "{stderr}");
    assert!(!stderr.contains("hunter2-secret"), "the secret was printed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_against_configured_tiki_and_stops_on_sigterm() {
    let emulator = Emulator::start(EmulatorConfig {
        client_id: "real-client".to_owned(),
        client_secret: "real-secret".to_owned(),
        ..EmulatorConfig::default()
    })
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut child = tokend(dir.path())
        .args(["serve"])
        .env("TOKEND_CLIENT_ID", "real-client")
        .env("TOKEND_CLIENT_SECRET", "real-secret")
        .env("TOKEND_TIKI_GRAPHQL_URL", emulator.graphql_url())
        .env("TOKEND_GRPC_ADDR", "127.0.0.1:0")
        .env("TOKEND_ADMIN_ADDR", "127.0.0.1:0")
        .env("TOKEND_LOG", "info")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let lines = stderr_lines(&mut child);
    let listening = wait_for_line(&lines, "gRPC server listening");
    let addr = listening
        .rsplit("grpc_addr=")
        .next()
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned();

    let mut client = TokenServiceClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let auth_code = emulator.issue_auth_code("carol", &["offline", "user_profile"]);
    client
        .exchange_auth_code(proto::ExchangeAuthCodeRequest {
            user_id: "carol".to_owned(),
            auth_code,
        })
        .await
        .unwrap();
    let token = client
        .get_access_token(proto::GetAccessTokenRequest {
            user_id: "carol".to_owned(),
            min_valid_seconds: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        emulator.access_token_valid(&token.access_token),
        "served token is invalid"
    );
    assert!(
        dir.path().join("tokend.db").exists(),
        "the default database file is missing"
    );

    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    wait_for_line(&lines, "tokend stopped");
    let exit = child.wait().unwrap();
    assert_eq!(exit.code(), Some(0));
}
