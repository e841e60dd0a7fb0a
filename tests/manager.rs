//! The token manager on a real SQLite file and the emulator over HTTP, with the store
//! wrapped to count reads, so that the cache's effect on database traffic is visible.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use secrecy::{ExposeSecret, SecretString};
use tokend::{
    emulator::{Emulator, EmulatorConfig, Fault},
    refresh::RefreshPolicy,
    store::{
        Claim, FailureRecord, NewTokens, StoreError, StoreSummary, TokenSet, TokenSetKey,
        TokenStatus, TokenStore, sqlite::SqliteStore,
    },
    tiki::graphql::GraphqlClient,
    tokens::{ManagerSettings, TokenManager},
};

/// A SQLite store that counts the rows it reads.
struct CountingStore {
    inner: SqliteStore,
    reads: AtomicU64,
}

#[async_trait]
impl TokenStore for CountingStore {
    async fn get(&self, key: &TokenSetKey) -> Result<Option<TokenSet>, StoreError> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        self.inner.get(key).await
    }

    async fn store_exchanged(
        &self,
        key: &TokenSetKey,
        tokens: &NewTokens<'_>,
        writer: &str,
        now: DateTime<Utc>,
    ) -> Result<TokenSet, StoreError> {
        self.inner.store_exchanged(key, tokens, writer, now).await
    }

    async fn store_new(
        &self,
        key: &TokenSetKey,
        tokens: &NewTokens<'_>,
        writer: &str,
        now: DateTime<Utc>,
    ) -> Result<Option<TokenSet>, StoreError> {
        self.inner.store_new(key, tokens, writer, now).await
    }

    async fn list(
        &self,
        after: Option<&TokenSetKey>,
        statuses: &[TokenStatus],
        limit: u32,
    ) -> Result<Vec<TokenSet>, StoreError> {
        self.inner.list(after, statuses, limit).await
    }

    async fn claim_due(
        &self,
        claim: &Claim,
        now: DateTime<Utc>,
        limit: u32,
    ) -> Result<Vec<TokenSet>, StoreError> {
        self.inner.claim_due(claim, now, limit).await
    }

    async fn claim(
        &self,
        key: &TokenSetKey,
        claim: &Claim,
        now: DateTime<Utc>,
    ) -> Result<Option<TokenSet>, StoreError> {
        self.inner.claim(key, claim, now).await
    }

    async fn store_refreshed(
        &self,
        key: &TokenSetKey,
        claim_token: i64,
        tokens: &NewTokens<'_>,
        writer: &str,
        now: DateTime<Utc>,
    ) -> Result<Option<TokenSet>, StoreError> {
        self.inner
            .store_refreshed(key, claim_token, tokens, writer, now)
            .await
    }

    async fn store_failure(
        &self,
        key: &TokenSetKey,
        claim_token: i64,
        failure: &FailureRecord,
        writer: &str,
        now: DateTime<Utc>,
    ) -> Result<Option<TokenSet>, StoreError> {
        self.inner
            .store_failure(key, claim_token, failure, writer, now)
            .await
    }

    async fn release(&self, key: &TokenSetKey, claim_token: i64) -> Result<bool, StoreError> {
        self.inner.release(key, claim_token).await
    }

    async fn delete(&self, key: &TokenSetKey) -> Result<bool, StoreError> {
        self.inner.delete(key).await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.inner.ping().await
    }

    async fn summary(&self) -> Result<StoreSummary, StoreError> {
        self.inner.summary().await
    }

    async fn close(&self) {
        self.inner.close().await;
    }
}

struct Setup {
    emulator: Emulator,
    store: Arc<CountingStore>,
    manager: Arc<TokenManager>,
    _dir: tempfile::TempDir,
}

async fn setup(cache_capacity: u64) -> Setup {
    setup_with(
        cache_capacity,
        EmulatorConfig::default(),
        RefreshPolicy::default(),
    )
    .await
}

async fn setup_with(cache_capacity: u64, config: EmulatorConfig, policy: RefreshPolicy) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("tokend.db").display());
    let emulator = Emulator::start(config).await.unwrap();
    let store = Arc::new(CountingStore {
        inner: SqliteStore::connect(&url).await.unwrap(),
        reads: AtomicU64::new(0),
    });
    let tiki = GraphqlClient::new(
        emulator.graphql_url(),
        "sandbox-client".to_owned(),
        SecretString::from("sandbox-secret"),
        Duration::from_secs(5),
    )
    .unwrap();
    let manager = Arc::new(TokenManager::new(
        store.clone(),
        Arc::new(tiki),
        policy,
        ManagerSettings {
            cache_capacity,
            replica_id: "manager-test".to_owned(),
            lease: Duration::from_secs(30),
            claim_wait: Duration::from_secs(5),
        },
    ));
    Setup {
        emulator,
        store,
        manager,
        _dir: dir,
    }
}

async fn exchange(setup: &Setup, user_id: &str) {
    let code = setup.emulator.issue_auth_code(user_id, &["offline"]);
    setup
        .manager
        .exchange(&TokenSetKey::new(user_id), &SecretString::from(code))
        .await
        .unwrap();
}

#[tokio::test]
async fn fresh_token_served_from_memory() {
    let setup = setup(100).await;
    exchange(&setup, "alice").await;
    let key = TokenSetKey::new("alice");

    let reads_before = setup.store.reads.load(Ordering::SeqCst);
    for _ in 0..100 {
        let token = setup.manager.access_token(&key, 0).await.unwrap();
        assert!(
            setup
                .emulator
                .access_token_valid(token.access_token.expose_secret())
        );
    }
    assert_eq!(setup.store.reads.load(Ordering::SeqCst), reads_before);
}

#[tokio::test]
async fn demanding_caller_reads_the_store() {
    let setup = setup(100).await;
    exchange(&setup, "alice").await;
    let key = TokenSetKey::new("alice");

    // 3590 s is capped to 3540 s, which a token issued a moment ago satisfies, so the
    // call reads the store once but refreshes nothing.
    let reads_before = setup.store.reads.load(Ordering::SeqCst);
    setup.manager.access_token(&key, 3590).await.unwrap();
    assert!(setup.store.reads.load(Ordering::SeqCst) <= reads_before + 1);
    assert_eq!(setup.emulator.stats().refresh_requests, 0);
}

#[tokio::test]
async fn cache_is_bounded() {
    let setup = setup(2).await;
    for user in ["a", "b", "c", "d", "e", "f"] {
        exchange(&setup, user).await;
    }
    for user in ["a", "b", "c", "d", "e", "f"] {
        let token = setup
            .manager
            .access_token(&TokenSetKey::new(user), 0)
            .await
            .unwrap();
        assert!(
            setup
                .emulator
                .access_token_valid(token.access_token.expose_secret())
        );
    }
    assert!(setup.manager.cached_token_sets() <= 2);
}

#[tokio::test]
async fn deleted_token_set_is_not_served() {
    let setup = setup(100).await;
    exchange(&setup, "alice").await;
    let key = TokenSetKey::new("alice");
    setup.manager.access_token(&key, 0).await.unwrap();
    setup.manager.delete(&key).await.unwrap();
    assert!(setup.manager.access_token(&key, 0).await.is_err());
}

#[tokio::test]
async fn reexchange_replaces_cached_token() {
    let setup = setup(100).await;
    exchange(&setup, "alice").await;
    let key = TokenSetKey::new("alice");
    let first = setup.manager.access_token(&key, 0).await.unwrap();
    exchange(&setup, "alice").await;
    let second = setup.manager.access_token(&key, 0).await.unwrap();
    assert!(second.version > first.version);
    assert!(first.access_token.expose_secret() != second.access_token.expose_secret());
    assert!(
        setup
            .emulator
            .access_token_valid(second.access_token.expose_secret())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_pause_ends_on_time() {
    // 8 s tokens: GetAccessToken wants 4 s of validity, so after 4.2 s it refreshes on
    // demand. Tiki rejects the credentials once, which pauses requests for 1 s.
    let policy = RefreshPolicy {
        credentials_retry: Duration::from_secs(1),
        ..RefreshPolicy::default()
    };
    let config = EmulatorConfig {
        expires_in: 8,
        ..EmulatorConfig::default()
    };
    let setup = setup_with(100, config, policy).await;
    exchange(&setup, "alice").await;
    let key = TokenSetKey::new("alice");
    tokio::time::sleep(Duration::from_millis(4200)).await;
    setup.emulator.inject(
        Fault::GraphqlError {
            code: "invalid_signature".to_owned(),
            message: "signature mismatch".to_owned(),
        },
        Some(1),
    );

    // A request that a fault intercepts counts only in faults_injected.
    let requests_sent = || {
        let stats = setup.emulator.stats();
        stats.refresh_requests + stats.faults_injected
    };
    let first = setup.manager.access_token(&key, 0).await.unwrap();
    assert_eq!(requests_sent(), 1);

    // Calls during the pause serve the stored token without a request to Tiki, and must not
    // extend the pause: within 3 s a call sends Tiki a request again and gets a new token.
    let mut requested_during_pause = false;
    let mut refreshed = None;
    for attempt in 0..30 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let token = setup.manager.access_token(&key, 0).await.unwrap();
        let requests = requests_sent();
        if attempt < 5 && requests > 1 {
            requested_during_pause = true;
        }
        if requests > 1 {
            refreshed = Some(token);
            break;
        }
    }
    assert!(
        !requested_during_pause,
        "Tiki was asked during the credentials pause"
    );
    let refreshed = refreshed.expect("the pause did not end within 3 s");
    assert!(first.access_token.expose_secret() != refreshed.access_token.expose_secret());
    assert!(
        setup
            .emulator
            .access_token_valid(refreshed.access_token.expose_secret())
    );
}
