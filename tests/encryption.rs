//! Encryption at rest on both backends. No token the emulator issued appears in the
//! database files or a dump, and a ciphertext moved to another row fails to decrypt.
//! Keys rotate with `tokend reencrypt`, SQLite creates its key file once, and PostgreSQL
//! requires a key or an explicit opt-out.

mod support;

use std::{
    collections::HashMap,
    path::Path,
    process::{Command, Output, Stdio},
    sync::Arc,
    time::Duration,
};

use base64::{Engine as _, engine::general_purpose::STANDARD};
use sqlx::Row;
use support::{Backend, Options, TestEnv, wait_until};
use tokend::{
    settings::StorageEncryption,
    store::encryption::{Keyring, read_key_file},
};
use tonic::Code;

const BINARY: &str = env!("CARGO_BIN_EXE_tokend");

/// Returns the base64 text of a random 32-byte key.
fn key_text() -> String {
    let mut bytes = [0u8; 32];
    rand::fill(&mut bytes);
    STANDARD.encode(bytes)
}

fn keys(texts: &[&str]) -> StorageEncryption {
    StorageEncryption::Keys(Arc::new(Keyring::parse(&texts.join(",")).unwrap()))
}

fn key_id(text: &str) -> String {
    Keyring::parse(text).unwrap().primary().id().to_owned()
}

/// Returns each user's `key_id` column, read with SQL beside the daemon.
async fn key_ids(env: &TestEnv) -> HashMap<String, Option<String>> {
    let query = "SELECT user_id, key_id FROM token_sets";
    let rows: Vec<(String, Option<String>)> = match env.backend {
        Backend::Sqlite => {
            let pool = sqlx::SqlitePool::connect(&env.database_url).await.unwrap();
            let rows = sqlx::query(query).fetch_all(&pool).await.unwrap();
            pool.close().await;
            rows.iter()
                .map(|row| (row.get("user_id"), row.get("key_id")))
                .collect()
        }
        Backend::Postgres(_) => {
            let pool = sqlx::PgPool::connect(&env.database_url).await.unwrap();
            let rows = sqlx::query(query).fetch_all(&pool).await.unwrap();
            pool.close().await;
            rows.iter()
                .map(|row| (row.get("user_id"), row.get("key_id")))
                .collect()
        }
    };
    rows.into_iter().collect()
}

/// Runs a statement on the test's database beside the daemon.
async fn execute(env: &TestEnv, statement: &str) {
    match env.backend {
        Backend::Sqlite => {
            let pool = sqlx::SqlitePool::connect(&env.database_url).await.unwrap();
            sqlx::query(sqlx::AssertSqlSafe(statement.to_owned()))
                .execute(&pool)
                .await
                .unwrap();
            pool.close().await;
        }
        Backend::Postgres(_) => {
            let pool = sqlx::PgPool::connect(&env.database_url).await.unwrap();
            sqlx::query(sqlx::AssertSqlSafe(statement.to_owned()))
                .execute(&pool)
                .await
                .unwrap();
            pool.close().await;
        }
    }
}

/// Returns what is stored of the test's database: the SQLite file and its WAL, or a
/// `pg_dump` of the test's schema.
fn stored_bytes(env: &TestEnv) -> Vec<u8> {
    match &env.backend {
        Backend::Sqlite => {
            let path = env.sqlite_path();
            let mut bytes = std::fs::read(&path).unwrap();
            let mut wal = path.into_os_string();
            wal.push("-wal");
            if let Ok(wal) = std::fs::read(&wal) {
                bytes.extend_from_slice(&wal);
            }
            bytes
        }
        Backend::Postgres(url) => {
            let schema = env
                .database_url
                .rsplit("search_path%3D")
                .next()
                .unwrap()
                .to_owned();
            let output = Command::new("pg_dump")
                .args(["--schema", &schema, "--data-only", url])
                .output()
                .unwrap();
            assert!(
                output.status.success(),
                "pg_dump failed: {}",
                String::from_utf8_lossy(&output.stderr)
            );
            output.stdout
        }
    }
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|window| window == needle.as_bytes())
}

/// Runs `tokend reencrypt` on the test's database with `keys` (comma separated).
fn reencrypt(env: &TestEnv, keys: &str) -> Output {
    Command::new(BINARY)
        .arg("reencrypt")
        .env_clear()
        .env("TOKEND_DATABASE_URL", &env.database_url)
        .env("TOKEND_ENCRYPTION_KEY", keys)
        .env("TOKEND_LOG", "warn")
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

async fn wait_for_refresh(env: &TestEnv, user_id: &str) {
    env.wait_for_token_set(
        user_id,
        "a refresh is stored",
        Duration::from_secs(30),
        |info| info.refreshed_at.is_some(),
    )
    .await;
}

/// Exchanges, refreshes and a key rotation, then a scan of the stored bytes for every
/// token the emulator issued. The scan must find the user ids, so it provably reads
/// the data.
async fn no_token_reaches_storage(backend: Backend) {
    let first = key_text();
    let options = Options {
        expires_in: 4,
        refresh_before: Duration::from_secs(2),
        encryption: Some(keys(&[&first])),
        ..Options::default()
    };
    let mut env = TestEnv::start_on(&backend, options).await;
    env.exchange("scan-user-alice").await;
    env.exchange("scan-user-bob").await;
    wait_for_refresh(&env, "scan-user-alice").await;

    let second = key_text();
    env.options.encryption = Some(keys(&[&second, &first]));
    env.restart().await;
    env.exchange("scan-user-carol").await;
    wait_for_refresh(&env, "scan-user-carol").await;
    env.access_token("scan-user-bob").await.unwrap();

    let stats = env.emulator.stats();
    assert!(stats.refreshes >= 2, "{stats:?}");
    let bytes = stored_bytes(&env);
    for user_id in ["scan-user-alice", "scan-user-bob", "scan-user-carol"] {
        assert!(contains(&bytes, user_id), "the scan did not find {user_id}");
    }
    let tokens = env.emulator.issued_tokens();
    assert!(tokens.len() >= 6, "only {} tokens issued", tokens.len());
    let found = tokens
        .iter()
        .filter(|token| contains(&bytes, token))
        .count();
    assert_eq!(
        found,
        0,
        "{found} of {} tokens are stored in plaintext",
        tokens.len()
    );
}

/// Alice's encrypted access token copied into Bob's row fails to decrypt for Bob, with
/// an error naming his row and the key id, while Alice is still served.
async fn moved_ciphertext_fails(backend: Backend) {
    let mut env = TestEnv::start_on(&backend, Options::default()).await;
    env.exchange("alice").await;
    env.exchange("bob").await;
    execute(
        &env,
        "UPDATE token_sets SET access_token = \
         (SELECT access_token FROM token_sets WHERE user_id = 'alice') WHERE user_id = 'bob'",
    )
    .await;
    // A restart empties the token cache, so the next calls read the rows.
    env.restart().await;

    let status = env.access_token("bob").await.unwrap_err();
    assert_eq!(status.code(), Code::Internal);
    let message = status.message();
    assert!(message.contains("default/bob"), "{message}");
    assert!(message.contains("access_token"), "{message}");
    assert!(message.contains("authentication failed"), "{message}");
    let bob_key = key_ids(&env).await["bob"].clone().unwrap();
    assert!(message.contains(&bob_key), "{message}");
    assert!(env.access_token("alice").await.is_ok());
}

/// Rows under key A stay served once key B encrypts, `tokend reencrypt` moves them to
/// B, and then A can go.
async fn rotation_with_reencrypt(backend: Backend) {
    let (a, b) = (key_text(), key_text());
    let options = Options {
        encryption: Some(keys(&[&a])),
        ..Options::default()
    };
    let mut env = TestEnv::start_on(&backend, options).await;
    env.exchange("alice").await;
    env.exchange("bob").await;

    env.options.encryption = Some(keys(&[&b, &a]));
    env.restart().await;
    env.access_token("alice").await.unwrap();
    env.exchange("carol").await;
    let ids = key_ids(&env).await;
    assert_eq!(ids["alice"], Some(key_id(&a)));
    assert_eq!(ids["carol"], Some(key_id(&b)));

    if matches!(backend, Backend::Sqlite) {
        let locked = reencrypt(&env, &format!("{b},{a}"));
        let stderr = String::from_utf8_lossy(&locked.stderr);
        assert!(!locked.status.success(), "{stderr}");
        assert!(stderr.contains("stop tokend"), "{stderr}");
        env.daemon.take().unwrap().shutdown().await.unwrap();
    }
    let output = reencrypt(&env, &format!("{b},{a}"));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains("done: 2 token sets re-encrypted"),
        "{stdout}"
    );
    assert!(!stdout.contains(&b), "the output shows a key: {stdout}");
    for (user_id, key) in key_ids(&env).await {
        assert_eq!(key, Some(key_id(&b)), "{user_id}");
    }

    env.options.encryption = Some(keys(&[&b]));
    env.restart().await;
    for user_id in ["alice", "bob", "carol"] {
        assert!(env.access_token(user_id).await.is_ok(), "{user_id}");
    }
}

/// Rows stored under the plaintext opt-out are visible to the scan, and `tokend
/// reencrypt` encrypts them. After a `VACUUM` no issued token is left in storage.
async fn plaintext_rows_get_encrypted(backend: Backend) {
    let options = Options {
        encryption: Some(StorageEncryption::Plaintext),
        ..Options::default()
    };
    let mut env = TestEnv::start_on(&backend, options).await;
    env.exchange("alice").await;
    env.exchange("bob").await;
    let tokens = env.emulator.issued_tokens();
    let bytes = stored_bytes(&env);
    let found = tokens
        .iter()
        .filter(|token| contains(&bytes, token))
        .count();
    assert_eq!(found, tokens.len(), "the scan misses plaintext tokens");
    for (user_id, key) in key_ids(&env).await {
        assert_eq!(key, None, "{user_id}");
    }

    let key = key_text();
    if matches!(backend, Backend::Sqlite) {
        env.daemon.take().unwrap().shutdown().await.unwrap();
    }
    let output = reencrypt(&env, &key);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}");
    assert!(
        stdout.contains("done: 2 token sets re-encrypted"),
        "{stdout}"
    );
    for (user_id, stored_key) in key_ids(&env).await {
        assert_eq!(stored_key, Some(key_id(&key)), "{user_id}");
    }

    env.options.encryption = Some(keys(&[&key]));
    env.restart().await;
    assert!(env.access_token("alice").await.is_ok());
    env.daemon.take().unwrap().shutdown().await.unwrap();
    execute(&env, "VACUUM").await;
    let bytes = stored_bytes(&env);
    assert!(contains(&bytes, "alice"), "the scan did not find alice");
    let found = tokens
        .iter()
        .filter(|token| contains(&bytes, token))
        .count();
    assert_eq!(found, 0, "{found} tokens remain in plaintext");
}

backend_tests!(
    no_token_reaches_storage,
    moved_ciphertext_fails,
    rotation_with_reencrypt,
    plaintext_rows_get_encrypted,
);

/// The first start on SQLite without a key creates `tokend.db.key` with mode 0600, and
/// the next start loads the same key and still decrypts the rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_key_file_is_created_once() {
    let mut env = TestEnv::start(Options::default()).await;
    let mut path = env.sqlite_path().into_os_string();
    path.push(".key");
    let path = Path::new(&path).to_owned();
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&path).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600);
    let created = std::fs::read(&path).unwrap();
    let keyring = read_key_file(&path).unwrap();

    env.exchange("alice").await;
    assert_eq!(
        key_ids(&env).await["alice"].as_deref(),
        Some(keyring.primary().id())
    );
    env.restart().await;
    assert_eq!(std::fs::read(&path).unwrap(), created);
    assert!(env.access_token("alice").await.is_ok());
}

fn serve_on_postgres(url: &str, plaintext: bool) -> Command {
    let mut command = Command::new(BINARY);
    command
        .arg("serve")
        .env_clear()
        .env("TOKEND_CLIENT_ID", "client")
        .env("TOKEND_CLIENT_SECRET", "secret")
        .env("TOKEND_DATABASE_URL", url)
        .env("TOKEND_GRPC_ADDR", "127.0.0.1:0")
        .env("TOKEND_LOG", "info")
        .stdin(Stdio::null());
    if plaintext {
        command.env("TOKEND_ALLOW_PLAINTEXT_STORAGE", "true");
    }
    command
}

/// Without a key PostgreSQL exits with code 78 naming the settings; with the explicit
/// opt-out it starts and warns.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_needs_key_or_opt_out() {
    let Some(backend) = Backend::postgres() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let url = backend.fresh_database(dir.path()).await;

    let refused = serve_on_postgres(&url, false).output().unwrap();
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(78), "{stderr}");
    assert!(stderr.contains("TOKEND_ENCRYPTION_KEY"), "{stderr}");
    assert!(
        stderr.contains("TOKEND_ALLOW_PLAINTEXT_STORAGE"),
        "{stderr}"
    );

    let mut child = serve_on_postgres(&url, true)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let lines = std::thread::spawn(move || {
        use std::io::BufRead as _;
        let mut seen = Vec::new();
        for line in std::io::BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            let listening = line.contains("gRPC server listening");
            seen.push(line);
            if listening {
                break;
            }
        }
        seen
    });
    wait_until("the daemon logs its start", Duration::from_secs(30), || {
        let finished = lines.is_finished();
        async move { finished }
    })
    .await;
    let _ = child.kill();
    let _ = child.wait();
    let seen = lines.join().unwrap().join("\n");
    assert!(seen.contains("gRPC server listening"), "{seen}");
    assert!(seen.contains("stored in plaintext"), "{seen}");
}
