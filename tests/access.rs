//! Caller authentication end to end: TLS with a test CA, client certificates, API keys
//! per role, and the refusal to bind a non-loopback address unprotected. Clients are
//! generated gRPC clients over loopback; no assertion prints a token or key.

mod support;

use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
    sync::Arc,
    time::Duration,
};

use support::{
    Backend, Options,
    pki::{CertFiles, TestCa},
};
use tempfile::TempDir;
use tokend::{
    access::{ApiKeys, tls::TlsSettings},
    emulator::{Emulator, EmulatorConfig},
    proto::{self, token_service_client::TokenServiceClient},
    server::Daemon,
    settings::AccessSettings,
};
use tonic::{
    Code,
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity},
};

const READER_KEY: &str = "reader-key-for-tests-0001";
const ADMIN_KEY: &str = "admin-key-for-tests-0001";

/// A daemon with the given caller authentication, its emulator and its files.
struct Running {
    emulator: Emulator,
    daemon: Daemon,
    dir: TempDir,
}

async fn start(backend: &Backend, dir: TempDir, access: AccessSettings) -> Running {
    let database_url = backend.fresh_database(dir.path()).await;
    let emulator = Emulator::start(EmulatorConfig::default()).await.unwrap();
    let options = Options {
        access,
        ..Options::default()
    };
    let settings = support::settings(&emulator, &database_url, &options);
    let daemon = Daemon::start(&settings).await.unwrap();
    Running {
        emulator,
        daemon,
        dir,
    }
}

fn tls_settings(server: &CertFiles, client_ca: Option<&TestCa>) -> TlsSettings {
    TlsSettings::load(
        &server.cert_file,
        &server.key_file,
        client_ca.map(|ca| ca.cert_file.as_path()),
    )
    .unwrap()
}

fn client_tls(ca: &TestCa, identity: Option<&CertFiles>) -> ClientTlsConfig {
    let mut config =
        ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read(&ca.cert_file)));
    if let Some(files) = identity {
        config = config.identity(Identity::from_pem(
            read(&files.cert_file),
            read(&files.key_file),
        ));
    }
    config
}

fn read(path: &std::path::Path) -> Vec<u8> {
    std::fs::read(path).unwrap()
}

/// Connects over TLS and requests an unknown user's token set. A request that reaches
/// the service returns NOT_FOUND; anything else is returned as the failure text.
async fn probe_tls(daemon: &Daemon, tls: ClientTlsConfig) -> Result<Code, String> {
    let url = format!("https://127.0.0.1:{}", daemon.grpc_addr().port());
    let endpoint = Endpoint::from_shared(url)
        .unwrap()
        .connect_timeout(Duration::from_secs(10))
        .tls_config(tls)
        .unwrap();
    probe(endpoint).await
}

async fn probe(endpoint: Endpoint) -> Result<Code, String> {
    let channel = endpoint
        .connect()
        .await
        .map_err(|error| format!("connect failed: {error}"))?;
    let request = proto::GetTokenSetRequest {
        user_id: "nobody".to_owned(),
    };
    match TokenServiceClient::new(channel)
        .get_token_set(request)
        .await
    {
        Ok(_) => Ok(Code::Ok),
        Err(status) if status.code() == Code::NotFound => Ok(Code::NotFound),
        Err(status) => Err(format!("{:?}: {}", status.code(), status.message())),
    }
}

async fn tls_serves_clients_that_trust_the_ca(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new(dir.path(), "tokend");
    let other_ca = TestCa::new(dir.path(), "other");
    let server = ca.server("server");
    let access = AccessSettings {
        tls: Some(tls_settings(&server, None)),
        api_keys: None,
    };
    let running = start(&backend, dir, access).await;

    let reached = probe_tls(&running.daemon, client_tls(&ca, None)).await;
    assert_eq!(reached, Ok(Code::NotFound));

    let untrusted = probe_tls(&running.daemon, client_tls(&other_ca, None)).await;
    assert!(untrusted.is_err(), "a client trusting another CA connected");

    let url = format!("http://{}", running.daemon.grpc_addr());
    let plaintext = probe(Endpoint::from_shared(url).unwrap()).await;
    assert!(plaintext.is_err(), "a plaintext client was served");

    running.daemon.shutdown().await.unwrap();
}

async fn client_certificates_are_required(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new(dir.path(), "tokend");
    let other_ca = TestCa::new(dir.path(), "other");
    let server = ca.server("server");
    let good_client = ca.client("billing");
    let foreign_client = other_ca.client("intruder");
    let access = AccessSettings {
        tls: Some(tls_settings(&server, Some(&ca))),
        api_keys: None,
    };
    let running = start(&backend, dir, access).await;

    let reached = probe_tls(&running.daemon, client_tls(&ca, Some(&good_client))).await;
    assert_eq!(reached, Ok(Code::NotFound));

    let without = probe_tls(&running.daemon, client_tls(&ca, None)).await;
    assert!(
        without.is_err(),
        "a client without a certificate was served"
    );

    let foreign = probe_tls(&running.daemon, client_tls(&ca, Some(&foreign_client))).await;
    assert!(
        foreign.is_err(),
        "a client with a certificate from another CA was served"
    );

    running.daemon.shutdown().await.unwrap();
}

fn api_keys() -> Arc<ApiKeys> {
    let text = format!("reader {READER_KEY} billing\nadmin {ADMIN_KEY} operator\n");
    Arc::new(ApiKeys::parse("test keys", &text).unwrap())
}

fn with_key<T>(message: T, key: Option<&str>) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Some(key) = key {
        let value = format!("Bearer {key}").parse().unwrap();
        request.metadata_mut().insert("authorization", value);
    }
    request
}

async fn plain_client(daemon: &Daemon) -> TokenServiceClient<Channel> {
    TokenServiceClient::connect(format!("http://{}", daemon.grpc_addr()))
        .await
        .unwrap()
}

async fn exchange_with(
    client: &mut TokenServiceClient<Channel>,
    emulator: &Emulator,
    key: Option<&str>,
) -> Result<proto::TokenSetInfo, tonic::Status> {
    let auth_code = emulator.issue_auth_code("alice", &["offline", "user_profile"]);
    let request = proto::ExchangeAuthCodeRequest {
        user_id: "alice".to_owned(),
        auth_code,
    };
    client
        .exchange_auth_code(with_key(request, key))
        .await
        .map(tonic::Response::into_inner)
}

async fn get_token_with(
    client: &mut TokenServiceClient<Channel>,
    key: Option<&str>,
) -> Result<proto::AccessToken, tonic::Status> {
    let request = proto::GetAccessTokenRequest {
        user_id: "alice".to_owned(),
        min_valid_seconds: 0,
    };
    client
        .get_access_token(with_key(request, key))
        .await
        .map(tonic::Response::into_inner)
}

async fn api_keys_grant_their_roles(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let access = AccessSettings {
        tls: None,
        api_keys: Some(api_keys()),
    };
    let running = start(&backend, dir, access).await;
    let mut client = plain_client(&running.daemon).await;
    let emulator = &running.emulator;

    let status = exchange_with(&mut client, emulator, None)
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    let status = exchange_with(&mut client, emulator, Some("not-a-key-0123456789"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    assert!(
        !status.message().contains("not-a-key"),
        "the key was echoed"
    );
    let status = exchange_with(&mut client, emulator, Some(READER_KEY))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    assert!(!status.message().contains(READER_KEY), "the key was echoed");
    assert_eq!(
        emulator.stats().exchanges,
        0,
        "a rejected call reached Tiki"
    );

    let info = exchange_with(&mut client, emulator, Some(ADMIN_KEY))
        .await
        .unwrap();
    assert_eq!(info.user_id, "alice");

    let status = get_token_with(&mut client, None).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    let token = get_token_with(&mut client, Some(READER_KEY)).await.unwrap();
    assert!(emulator.access_token_valid(&token.access_token));
    let token = get_token_with(&mut client, Some(ADMIN_KEY)).await.unwrap();
    assert!(emulator.access_token_valid(&token.access_token));

    let delete = proto::DeleteTokenSetRequest {
        user_id: "alice".to_owned(),
    };
    let status = client
        .delete_token_set(with_key(delete.clone(), Some(READER_KEY)))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    client
        .delete_token_set(with_key(delete, Some(ADMIN_KEY)))
        .await
        .unwrap();

    // Rejected calls are counted like any other, with their status code.
    let metrics_url = format!("http://{}/metrics", running.daemon.admin_addr());
    let metrics = reqwest::get(metrics_url)
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let counted = metrics.lines().any(|line| {
        line.starts_with("tokend_grpc_requests_total")
            && line.contains("method=\"DeleteTokenSet\"")
            && line.contains("code=\"PERMISSION_DENIED\"")
    });
    assert!(counted, "no rejected DeleteTokenSet in the metrics");

    running.daemon.shutdown().await.unwrap();
    drop(running.dir);
}

async fn health_path_needs_no_key(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let access = AccessSettings {
        tls: None,
        api_keys: Some(api_keys()),
    };
    let running = start(&backend, dir, access).await;
    let channel = Channel::from_shared(format!("http://{}", running.daemon.grpc_addr()))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let outcome = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await;
    let response = outcome.unwrap().into_inner();
    assert!(
        response.status > 0,
        "the health status is unknown: {}",
        response.status
    );

    let status = health
        .check(with_key(
            tonic_health::pb::HealthCheckRequest {
                service: "tokend.v1.TokenService".to_owned(),
            },
            Some("not-a-key-0123456789"),
        ))
        .await;
    assert!(status.is_ok(), "a wrong key on a health check was rejected");

    running.daemon.shutdown().await.unwrap();
}

backend_tests!(
    tls_serves_clients_that_trust_the_ca,
    client_certificates_are_required,
    api_keys_grant_their_roles,
    health_path_needs_no_key,
);

const BINARY: &str = env!("CARGO_BIN_EXE_tokend");

fn serve_command(dir: &std::path::Path, grpc_addr: &str) -> Command {
    let mut command = Command::new(BINARY);
    command
        .arg("serve")
        .current_dir(dir)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("TOKEND_CLIENT_ID", "client")
        .env("TOKEND_ADMIN_ADDR", "127.0.0.1:0")
        .env("TOKEND_CLIENT_SECRET", "secret-not-printed")
        .env("TOKEND_TIKI_GRAPHQL_URL", "http://127.0.0.1:9/graphql")
        .env("TOKEND_GRPC_ADDR", grpc_addr)
        .env("TOKEND_ADMIN_ADDR", "127.0.0.1:0")
        .stdin(Stdio::null());
    command
}

#[test]
fn unprotected_wildcard_bind_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let output = serve_command(dir.path(), "0.0.0.0:0").output().unwrap();
    assert_eq!(output.status.code(), Some(78));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("grpc_addr"), "{stderr}");
    assert!(stderr.contains("allow_insecure_bind"), "{stderr}");
    assert!(stderr.contains("api_keys_file"), "{stderr}");
    assert!(!stderr.contains("listening"), "{stderr}");
    assert!(
        !stderr.contains("secret-not-printed"),
        "the secret was printed"
    );
}

/// Starts the daemon, stops it with SIGTERM once it reports listening, and returns its
/// whole log and exit code.
fn serve_until_listening(mut command: Command) -> (String, Option<i32>) {
    let mut child = command.stderr(Stdio::piped()).spawn().unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut log = String::new();
    // Reads to the end, so that the daemon never writes into a closed pipe.
    for line in BufReader::new(stderr).lines() {
        let line = line.unwrap();
        if line.contains("gRPC server listening") {
            // NOTE: the daemon installs its signal handlers just after this line, so
            // a SIGTERM sent at once could meet the default action; wait briefly.
            std::thread::sleep(Duration::from_millis(500));
            let status = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status()
                .unwrap();
            assert!(status.success());
        }
        log.push_str(&line);
        log.push('\n');
    }
    (log, child.wait().unwrap().code())
}

#[test]
fn wildcard_bind_starts_when_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let mut command = serve_command(dir.path(), "0.0.0.0:0");
    command.env("TOKEND_ALLOW_INSECURE_BIND", "true");
    let (log, code) = serve_until_listening(command);
    assert!(log.contains("grpc_addr=0.0.0.0:"), "{log}");
    assert!(log.contains("any caller that reaches"), "no warning: {log}");
    assert_eq!(code, Some(0), "{log}");
}

#[test]
fn wildcard_bind_starts_with_api_keys() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("api-keys");
    std::fs::write(&keys, format!("reader {READER_KEY}\n")).unwrap();
    let mut command = serve_command(dir.path(), "0.0.0.0:0");
    command.env("TOKEND_API_KEYS_FILE", &keys);
    let (log, code) = serve_until_listening(command);
    assert!(log.contains("grpc_addr=0.0.0.0:"), "{log}");
    assert!(
        log.contains("plain key"),
        "no warning about the plain key: {log}"
    );
    assert!(!log.contains(READER_KEY), "the key was logged");
    assert_eq!(code, Some(0), "{log}");
}

#[test]
fn sandbox_binds_only_loopback() {
    let dir = tempfile::tempdir().unwrap();
    let output = Command::new(BINARY)
        .args(["serve", "--sandbox", "--emulator-addr", "127.0.0.1:0"])
        .current_dir(dir.path())
        .env_clear()
        .env("TOKEND_GRPC_ADDR", "0.0.0.0:0")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("loopback"), "{stderr}");
    assert!(stderr.contains("TOKEND_GRPC_ADDR"), "{stderr}");
}
