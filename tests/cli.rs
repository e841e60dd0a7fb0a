//! The client and local subcommands of the real `tokend` binary, against a live daemon
//! with TLS, client certificates and API keys, and the Tiki emulator.

mod support;

use std::{
    io::Write as _,
    path::Path,
    process::{Command, Output, Stdio},
    sync::Arc,
    time::Duration,
};

use secrecy::{ExposeSecret as _, SecretString};

use support::{
    Backend, Options,
    pki::{CertFiles, TestCa},
};
use tempfile::TempDir;
use tokend::{
    access::{ApiKeys, tls::TlsSettings},
    emulator::{Emulator, EmulatorConfig},
    server::Daemon,
    settings::AccessSettings,
    tiki::{TokenApi as _, graphql::GraphqlClient},
};

const BINARY: &str = env!("CARGO_BIN_EXE_tokend");

/// A daemon that requires TLS with client certificates and API keys.
struct Secured {
    emulator: Emulator,
    daemon: Daemon,
    ca: TestCa,
    client: CertFiles,
    reader_key: String,
    admin_key: String,
    dir: TempDir,
}

/// Generates a key with `tokend api-key` and returns the key and its file line.
fn generate_key(role: &str, name: &str) -> (String, String) {
    let output = Command::new(BINARY)
        .args(["api-key", "--role", role, "--name", name])
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let stdout = String::from_utf8(output.stdout).unwrap();
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 2, "api-key printed {} lines", lines.len());
    (lines[0].to_owned(), lines[1].to_owned())
}

async fn start_secured(backend: &Backend) -> Secured {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new(dir.path(), "tokend");
    let server = ca.server("server");
    let client = ca.client("cli");
    let (reader_key, reader_line) = generate_key("reader", "cli-reader");
    let (admin_key, admin_line) = generate_key("admin", "cli-admin");
    let keys_file = dir.path().join("api-keys");
    std::fs::write(&keys_file, format!("{reader_line}\n{admin_line}\n")).unwrap();

    let access = AccessSettings {
        tls: Some(
            TlsSettings::load(&server.cert_file, &server.key_file, Some(&ca.cert_file)).unwrap(),
        ),
        api_keys: Some(Arc::new(ApiKeys::load(&keys_file).unwrap())),
    };
    let database_url = backend.fresh_database(dir.path()).await;
    let emulator = Emulator::start(EmulatorConfig::default()).await.unwrap();
    let options = Options {
        access,
        ..Options::default()
    };
    let daemon = Daemon::start(&support::settings(&emulator, &database_url, &options))
        .await
        .unwrap();
    Secured {
        emulator,
        daemon,
        ca,
        client,
        reader_key,
        admin_key,
        dir,
    }
}

impl Secured {
    /// Returns the binary with the address and TLS options set through the
    /// environment, and `key` as the API key.
    fn command(&self, key: Option<&str>) -> Command {
        let mut command = Command::new(BINARY);
        command
            .env_clear()
            .env(
                "TOKEND_GRPC_ADDR",
                format!("127.0.0.1:{}", self.daemon.grpc_addr().port()),
            )
            .env("TOKEND_CA_FILE", &self.ca.cert_file)
            .env("TOKEND_CLIENT_CERT_FILE", &self.client.cert_file)
            .env("TOKEND_CLIENT_KEY_FILE", &self.client.key_file)
            .stdin(Stdio::null());
        if let Some(key) = key {
            command.env("TOKEND_API_KEY", key);
        }
        command
    }
}

/// Runs `command` with `args` on a blocking thread and returns its output.
async fn run(mut command: Command, args: &[&str]) -> Output {
    command.args(args);
    tokio::task::spawn_blocking(move || command.output().unwrap())
        .await
        .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

async fn subcommands_use_tls_and_keys(backend: Backend) {
    let secured = start_secured(&backend).await;
    let reader = Some(secured.reader_key.as_str());
    let admin = Some(secured.admin_key.as_str());
    let code = secured
        .emulator
        .issue_auth_code("dave", &["offline", "user_profile"]);

    let args = ["exchange", "--user-id", "dave", "--auth-code", &code];
    let output = run(secured.command(reader), &args).await;
    assert_eq!(output.status.code(), Some(1));
    let stderr = text(&output.stderr);
    assert!(stderr.contains("PermissionDenied"), "{stderr}");
    assert!(!stderr.contains(&secured.reader_key), "the key was printed");

    let output = run(secured.command(admin), &args).await;
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert!(text(&output.stdout).contains("status:          active"));

    // Auth codes are base64url and may start with `-`, which must not read as an option.
    let code = format!("-{code}");
    let args = ["exchange", "--user-id", "dave", "--auth-code", &code];
    let output = run(secured.command(admin), &args).await;
    assert_eq!(output.status.code(), Some(1), "{}", text(&output.stderr));
    assert!(text(&output.stderr).contains("FailedPrecondition"));

    let output = run(secured.command(None), &["token", "--user-id", "dave"]).await;
    assert_eq!(output.status.code(), Some(1));
    assert!(text(&output.stderr).contains("Unauthenticated"));

    let output = run(secured.command(reader), &["token", "--user-id", "dave"]).await;
    assert!(output.status.success(), "{}", text(&output.stderr));
    let token = text(&output.stdout).trim().to_owned();
    assert!(
        secured.emulator.access_token_valid(&token),
        "the printed token is invalid"
    );

    let output = run(secured.command(reader), &["get", "--user-id", "dave"]).await;
    assert!(output.status.success(), "{}", text(&output.stderr));
    let stdout = text(&output.stdout);
    assert!(stdout.contains("user_id:         dave"), "{stdout}");
    assert!(!stdout.contains(&token), "get printed the token");

    let output = run(secured.command(reader), &["delete", "--user-id", "dave"]).await;
    assert_eq!(output.status.code(), Some(1));
    let output = run(secured.command(admin), &["delete", "--user-id", "dave"]).await;
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert!(text(&output.stdout).contains("deleted the token set of dave"));

    secured.daemon.shutdown().await.unwrap();
}

async fn client_without_certificate_fails(backend: Backend) {
    let secured = start_secured(&backend).await;
    let mut command = secured.command(Some(&secured.admin_key));
    command
        .env_remove("TOKEND_CLIENT_CERT_FILE")
        .env_remove("TOKEND_CLIENT_KEY_FILE");
    let output = run(command, &["get", "--user-id", "nobody"]).await;
    assert_eq!(output.status.code(), Some(1));
    let stderr = text(&output.stderr);
    assert!(!stderr.contains("NotFound"), "the call reached the service");

    let mut command = secured.command(Some(&secured.admin_key));
    command.env_remove("TOKEND_CA_FILE");
    let output = run(command, &["get", "--user-id", "nobody"]).await;
    assert_eq!(output.status.code(), Some(1));
    let stderr = text(&output.stderr);
    assert!(stderr.contains("--ca-file"), "{stderr}");

    let output = run(
        secured.command(Some(&secured.admin_key)),
        &["get", "--user-id", "nobody"],
    )
    .await;
    let stderr = text(&output.stderr);
    assert!(stderr.contains("NotFound"), "{stderr}");

    secured.daemon.shutdown().await.unwrap();
    drop(secured.dir);
}

async fn migrate_creates_the_table(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let database_url = backend.fresh_database(dir.path()).await;
    let output = Command::new(BINARY)
        .args(["migrate", "--database-url", &database_url])
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert!(text(&output.stdout).starts_with("migrated "));

    let again = Command::new(BINARY)
        .args(["migrate"])
        .env("TOKEND_DATABASE_URL", &database_url)
        .output()
        .unwrap();
    assert!(again.status.success(), "{}", text(&again.stderr));
    if matches!(backend, Backend::Sqlite) {
        assert!(dir.path().join("tokend.db").exists());
    }
}

/// Runs `command` with `args` and `input` on stdin, on a blocking thread.
async fn run_with_input(mut command: Command, args: &[&str], input: String) -> Output {
    command.args(args).stdin(Stdio::piped());
    command.stdout(Stdio::piped()).stderr(Stdio::piped());
    tokio::task::spawn_blocking(move || {
        let mut child = command.spawn().unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    })
    .await
    .unwrap()
}

/// Exchanges a code with the emulator the way another system would, and returns the
/// token set as the JSON that `tokend import` reads.
async fn token_set_from_elsewhere(emulator: &Emulator, user_id: &str) -> (String, String) {
    let client = GraphqlClient::new(
        emulator.graphql_url(),
        "sandbox-client".to_owned(),
        SecretString::from("sandbox-secret"),
        Duration::from_secs(5),
    )
    .unwrap();
    let code = emulator.issue_auth_code(user_id, &["offline", "user_profile"]);
    let grant = client.exchange(&SecretString::from(code)).await.unwrap();
    let access_token = grant.access_token.expose_secret().to_owned();
    let json = serde_json::json!({
        "access_token": access_token,
        "refresh_token": grant.refresh_token.as_ref().unwrap().expose_secret(),
        "expires_in": grant.expires_in,
        "scopes": grant.scopes,
    });
    (json.to_string(), access_token)
}

fn rows(stdout: &[u8]) -> Vec<String> {
    text(stdout).lines().skip(1).map(str::to_owned).collect()
}

async fn token_set_commands_work(backend: Backend) {
    let secured = start_secured(&backend).await;
    let reader = Some(secured.reader_key.as_str());
    let admin = Some(secured.admin_key.as_str());
    for user_id in ["u1", "u2", "u3"] {
        let code = secured
            .emulator
            .issue_auth_code(user_id, &["offline", "user_profile"]);
        let args = ["exchange", "--user-id", user_id, "--auth-code", &code];
        let output = run(secured.command(admin), &args).await;
        assert!(output.status.success(), "{}", text(&output.stderr));
    }

    let output = run(secured.command(reader), &["list", "--page-size", "2"]).await;
    assert!(output.status.success(), "{}", text(&output.stderr));
    let first_page = rows(&output.stdout);
    assert_eq!(first_page.len(), 2, "{first_page:?}");
    assert!(first_page[0].starts_with("u1\tactive\t"), "{first_page:?}");
    let stderr = text(&output.stderr);
    let page_token = stderr
        .trim()
        .rsplit(' ')
        .next()
        .expect("a page token on stderr")
        .to_owned();
    assert!(stderr.contains("--page-token"), "{stderr}");
    let args = ["list", "--page-size", "2", "--page-token", &page_token];
    let output = run(secured.command(reader), &args).await;
    let second_page = rows(&output.stdout);
    assert_eq!(second_page.len(), 1, "{second_page:?}");
    assert!(second_page[0].starts_with("u3\t"), "{second_page:?}");
    let args = ["list", "--page-size", "2", "--all", "--status", "active"];
    let output = run(secured.command(reader), &args).await;
    assert_eq!(rows(&output.stdout).len(), 3);
    let args = ["list", "--status", "reauth_required"];
    let output = run(secured.command(reader), &args).await;
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert!(rows(&output.stdout).is_empty());

    let output = run(secured.command(reader), &["refresh", "--user-id", "u2"]).await;
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert!(text(&output.stdout).contains("refreshed the token set of u2"));
    assert_eq!(secured.emulator.stats().refreshes, 1);

    let (json, imported_token) = token_set_from_elsewhere(&secured.emulator, "u4").await;
    let args = ["import", "--user-id", "u4"];
    let output = run_with_input(secured.command(reader), &args, json.clone()).await;
    assert_eq!(output.status.code(), Some(1));
    assert!(text(&output.stderr).contains("PermissionDenied"));
    let output = run_with_input(secured.command(admin), &args, json.clone()).await;
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert!(text(&output.stdout).contains("user_id:         u4"));
    assert!(!text(&output.stdout).contains(&imported_token));
    let output = run_with_input(secured.command(admin), &args, json.clone()).await;
    assert_eq!(output.status.code(), Some(1));
    assert!(text(&output.stderr).contains("AlreadyExists"));
    let args = ["import", "--user-id", "u4", "--replace"];
    let output = run_with_input(secured.command(admin), &args, json).await;
    assert!(output.status.success(), "{}", text(&output.stderr));
    let output = run_with_input(secured.command(admin), &args, "{}".to_owned()).await;
    assert_eq!(output.status.code(), Some(1));
    assert!(text(&output.stderr).contains("access_token"));

    let args = ["watch", "--user-id", "u4", "--count", "1"];
    let output = run(secured.command(reader), &args).await;
    assert!(output.status.success(), "{}", text(&output.stderr));
    let stdout = text(&output.stdout);
    let (expires_at, token) = stdout.trim().split_once(' ').expect("EXPIRES_AT TOKEN");
    assert!(expires_at.ends_with('Z'), "{expires_at}");
    assert!(token == imported_token, "watch printed another token");

    secured.daemon.shutdown().await.unwrap();
}

backend_tests!(
    token_set_commands_work,
    subcommands_use_tls_and_keys,
    client_without_certificate_fails,
    migrate_creates_the_table,
);

fn check_config(dir: &Path, emulator: &Emulator, secret: &str) -> Output {
    let config = dir.join("tokend.toml");
    let mut file = std::fs::File::create(&config).unwrap();
    writeln!(
        file,
        "client_id = \"sandbox-client\"\ndatabase_url = \"sqlite://{}\"\ntiki_graphql_url = \"{}\"",
        dir.join("check.db").display(),
        emulator.graphql_url()
    )
    .unwrap();
    Command::new(BINARY)
        .args(["check-config", "--config"])
        .arg(&config)
        .env_clear()
        .env("TOKEND_CLIENT_SECRET", secret)
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_config_reports_each_check() {
    let emulator = Emulator::start(EmulatorConfig::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_owned();

    let output = tokio::task::block_in_place(|| check_config(&path, &emulator, "sandbox-secret"));
    let stdout = text(&output.stdout);
    assert!(output.status.success(), "{stdout}{}", text(&output.stderr));
    assert!(stdout.contains("ok   settings are valid"), "{stdout}");
    assert!(stdout.contains("ok   database"), "{stdout}");
    assert!(stdout.contains("does not exist yet"), "{stdout}");
    assert!(stdout.contains("ok   Tiki"), "{stdout}");
    assert!(!stdout.contains("sandbox-secret"), "the secret was printed");
    assert!(
        !path.join("check.db").exists(),
        "check-config created the database"
    );

    let output = tokio::task::block_in_place(|| check_config(&path, &emulator, "wrong-secret"));
    let stdout = text(&output.stdout);
    assert_eq!(output.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("FAIL Tiki"), "{stdout}");
    assert!(stdout.contains("client_secret"), "{stdout}");
    assert!(!stdout.contains("wrong-secret"), "the secret was printed");
}

#[test]
fn check_config_rejects_bad_settings() {
    let output = Command::new(BINARY)
        .args(["check-config"])
        .env_clear()
        .env("TOKEND_CLIENT_ID", "client")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = text(&output.stderr);
    assert!(stderr.contains("TOKEND_CLIENT_SECRET"), "{stderr}");
}

#[test]
fn api_key_rejects_names_with_spaces() {
    let output = Command::new(BINARY)
        .args(["api-key", "--role", "reader", "--name", "two words"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert!(text(&output.stderr).contains("--name"));
    assert!(output.stdout.is_empty(), "a key was printed");
}
