//! The `tokend` binary as a service manager runs it: JSON log lines for a log
//! collector, the admin port, and the systemd notify protocol on a real
//! `NOTIFY_SOCKET` that the test binds.

use std::{
    io::{BufRead, BufReader},
    os::unix::net::UnixDatagram,
    path::Path,
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use tokend::{
    emulator::{Emulator, EmulatorConfig},
    proto::{self, token_service_client::TokenServiceClient},
};

const BINARY: &str = env!("CARGO_BIN_EXE_tokend");
const CLIENT_SECRET: &str = "service-test-secret";

async fn emulator() -> Emulator {
    Emulator::start(EmulatorConfig {
        client_id: "service-client".to_owned(),
        client_secret: CLIENT_SECRET.to_owned(),
        ..EmulatorConfig::default()
    })
    .await
    .unwrap()
}

/// Builds a `tokend serve` command with credentials for `emulator`, free ports and a
/// database in `dir`, and no other environment.
fn serve(dir: &Path, emulator: &Emulator) -> Command {
    let mut command = Command::new(BINARY);
    command
        .arg("serve")
        .current_dir(dir)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("TOKEND_CLIENT_ID", "service-client")
        .env("TOKEND_CLIENT_SECRET", CLIENT_SECRET)
        .env("TOKEND_TIKI_GRAPHQL_URL", emulator.graphql_url())
        .env("TOKEND_GRPC_ADDR", "127.0.0.1:0")
        .env("TOKEND_ADMIN_ADDR", "127.0.0.1:0")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
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

fn terminate(child: &Child) {
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

/// Parses one log line as a JSON object, naming the line when it is not one.
fn parse_json_line(line: &str) -> serde_json::Map<String, serde_json::Value> {
    match serde_json::from_str::<serde_json::Value>(line) {
        Ok(serde_json::Value::Object(object)) => object,
        other => panic!("log line is not a JSON object ({other:?}): {line}"),
    }
}

/// Reads JSON log lines until one has the message `message`, checking every line.
fn wait_for_json(
    lines: &mpsc::Receiver<String>,
    message: &str,
) -> serde_json::Map<String, serde_json::Value> {
    loop {
        let line = lines
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|error| panic!("no log line {message:?}: {error}"));
        let object = parse_json_line(&line);
        assert!(
            object
                .get("timestamp")
                .is_some_and(|value| value.is_string()),
            "no timestamp: {line}"
        );
        assert!(
            object.get("level").is_some_and(|value| value.is_string()),
            "no level: {line}"
        );
        assert!(
            !line.contains(CLIENT_SECRET),
            "the client secret was logged"
        );
        if object.get("message").and_then(|value| value.as_str()) == Some(message) {
            return object;
        }
    }
}

fn field(object: &serde_json::Map<String, serde_json::Value>, name: &str) -> String {
    object
        .get(name)
        .and_then(|value| value.as_str())
        .unwrap_or_else(|| panic!("log line has no string field {name}: {object:?}"))
        .to_owned()
}

async fn json_logs_run(use_flag: bool) {
    let emulator = emulator().await;
    let dir = tempfile::tempdir().unwrap();
    let mut command = serve(dir.path(), &emulator);
    if use_flag {
        command.args(["--log-format", "json"]);
    } else {
        command.env("TOKEND_LOG_FORMAT", "json");
    }
    let mut child = command.spawn().unwrap();
    let lines = stderr_lines(&mut child);

    let listening = wait_for_json(&lines, "gRPC server listening");
    assert_eq!(field(&listening, "level"), "INFO");
    let admin = wait_for_json(
        &lines,
        "admin server listening on /metrics, /healthz and /readyz",
    );
    let admin_addr = field(&admin, "admin_addr");
    let metrics = reqwest::get(format!("http://{admin_addr}/metrics"))
        .await
        .unwrap();
    assert_eq!(metrics.status().as_u16(), 200);
    let body = metrics.text().await.unwrap();
    assert!(body.contains("tokend_token_sets"), "{body}");
    let ready = reqwest::get(format!("http://{admin_addr}/readyz"))
        .await
        .unwrap();
    assert_eq!(ready.status().as_u16(), 200);

    terminate(&child);
    wait_for_json(&lines, "tokend stopped");
    // Every line up to the end of the stream is JSON too.
    while let Ok(line) = lines.recv_timeout(Duration::from_secs(10)) {
        parse_json_line(&line);
    }
    assert_eq!(child.wait().unwrap().code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_with_flag() {
    json_logs_run(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_with_variable() {
    json_logs_run(false).await;
}

/// Receives notify datagrams until one contains `needle`, and returns it.
fn wait_for_notice(socket: &UnixDatagram, needle: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut buffer = vec![0; 4096];
    loop {
        assert!(Instant::now() < deadline, "no notification {needle:?}");
        match socket.recv(&mut buffer) {
            Ok(length) => {
                let notice = String::from_utf8_lossy(&buffer[..length]).into_owned();
                if notice.lines().any(|line| line == needle) {
                    return notice;
                }
            }
            Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(error) if error.kind() == std::io::ErrorKind::TimedOut => {}
            Err(error) => panic!("receiving a notification failed: {error}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn systemd_ready_watchdog_and_stopping() {
    let emulator = emulator().await;
    let dir = tempfile::tempdir().unwrap();
    let socket_path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut child = serve(dir.path(), &emulator)
        .env("NOTIFY_SOCKET", &socket_path)
        .env("WATCHDOG_USEC", "400000")
        .spawn()
        .unwrap();
    let _lines = stderr_lines(&mut child);

    let ready = wait_for_notice(&socket, "READY=1");
    let grpc_addr = ready
        .lines()
        .find_map(|line| line.strip_prefix("STATUS=serving gRPC on "))
        .unwrap_or_else(|| panic!("READY=1 came without the gRPC address: {ready:?}"));
    // READY=1 means the gRPC port is bound and the database migrated.
    let mut client = TokenServiceClient::connect(format!("http://{grpc_addr}"))
        .await
        .unwrap();
    let missing = client
        .get_token_set(proto::GetTokenSetRequest {
            user_id: "nobody".to_owned(),
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound);

    // Pings come every 200 ms, at half of WATCHDOG_USEC.
    for _ in 0..3 {
        wait_for_notice(&socket, "WATCHDOG=1");
    }

    terminate(&child);
    wait_for_notice(&socket, "STOPPING=1");
    assert_eq!(child.wait().unwrap().code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn systemd_not_ready_when_start_fails() {
    let emulator = emulator().await;
    let dir = tempfile::tempdir().unwrap();
    let socket_path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    // Nothing listens on port 1, so opening the database fails.
    let output = serve(dir.path(), &emulator)
        .env("NOTIFY_SOCKET", &socket_path)
        .env(
            "TOKEND_DATABASE_URL",
            "postgres://tokend@127.0.0.1:1/tokend",
        )
        // Without a key PostgreSQL fails the settings check before the database is tried.
        .env("TOKEND_ALLOW_PLAINTEXT_STORAGE", "true")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("TOKEND_DATABASE_URL"), "{stderr}");

    let mut buffer = vec![0; 4096];
    match socket.recv(&mut buffer) {
        Ok(length) => panic!(
            "a notification was sent: {}",
            String::from_utf8_lossy(&buffer[..length])
        ),
        Err(error) => assert!(
            matches!(
                error.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
            "{error}"
        ),
    }
}
