//! The storage contract on both backends: claims exclude each other, writes are fenced
//! by the claim, abandoned claims are taken over with the outcome marked unknown, and
//! due token sets are claimed most overdue first.

mod support;

use std::sync::Arc;

use chrono::{DateTime, Duration, Utc};
use secrecy::{ExposeSecret, SecretString};
use support::Backend;
use tokend::store::{
    self, Claim, FailureRecord, NewTokens, StoreSummary, TokenSetKey, TokenStatus, TokenStore,
};

struct Fixture {
    store: Arc<dyn TokenStore>,
    url: String,
    _dir: tempfile::TempDir,
}

async fn open(backend: &Backend) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let url = backend.fresh_database(dir.path()).await;
    let store = store::connect(&url).await.unwrap();
    Fixture {
        store,
        url,
        _dir: dir,
    }
}

fn claim(owner: &str, token: i64, until: DateTime<Utc>) -> Claim {
    Claim {
        owner: owner.to_owned(),
        token,
        until,
    }
}

async fn insert(store: &dyn TokenStore, user_id: &str, next_refresh_at: DateTime<Utc>) {
    let access = SecretString::from(format!("access-{user_id}"));
    let refresh = SecretString::from(format!("refresh-{user_id}"));
    let scopes = vec!["offline".to_owned()];
    let tokens = NewTokens {
        access_token: &access,
        refresh_token: Some(&refresh),
        scopes: &scopes,
        lifetime_seconds: 3600,
        expires_at: Utc::now() + Duration::hours(1),
        next_refresh_at: Some(next_refresh_at),
    };
    store
        .store_exchanged(&TokenSetKey::new(user_id), &tokens, "test", Utc::now())
        .await
        .unwrap();
}

fn failure() -> FailureRecord {
    FailureRecord {
        status: TokenStatus::RefreshFailing,
        failure_count: 1,
        last_error: Some("HTTP 503".to_owned()),
        next_refresh_at: Some(Utc::now() + Duration::seconds(5)),
        outcome_unknown: false,
    }
}

async fn claims_exclude_each_other(backend: Backend) {
    let fixture = open(&backend).await;
    let store = fixture.store.as_ref();
    let key = TokenSetKey::new("alice");
    insert(store, "alice", Utc::now() + Duration::hours(1)).await;
    let now = Utc::now();

    let first = store
        .claim(
            &key,
            &claim("replica-a", 1, now + Duration::seconds(30)),
            now,
        )
        .await
        .unwrap()
        .expect("the first claim succeeds");
    assert_eq!(first.claimed_by.as_deref(), Some("replica-a"));
    assert_eq!(first.claim_token, Some(1));
    assert!(!first.outcome_unknown);

    let second = store
        .claim(
            &key,
            &claim("replica-b", 2, now + Duration::seconds(30)),
            now,
        )
        .await
        .unwrap();
    assert!(second.is_none(), "a held claim was claimed again");

    assert!(store.release(&key, 1).await.unwrap());
    assert!(!store.release(&key, 1).await.unwrap());
    let third = store
        .claim(
            &key,
            &claim("replica-b", 3, now + Duration::seconds(30)),
            now,
        )
        .await
        .unwrap()
        .expect("a released claim can be taken");
    assert!(!third.outcome_unknown, "a released claim is not abandoned");
}

async fn writes_are_fenced_by_the_claim(backend: Backend) {
    let fixture = open(&backend).await;
    let store = fixture.store.as_ref();
    let key = TokenSetKey::new("alice");
    insert(store, "alice", Utc::now() + Duration::hours(1)).await;
    let now = Utc::now();

    // Replica A claims, its lease runs out, and replica B takes the token set over.
    let lapsed = now - Duration::seconds(1);
    store
        .claim(
            &key,
            &claim("replica-a", 10, lapsed),
            now - Duration::seconds(60),
        )
        .await
        .unwrap()
        .expect("replica A claims");
    let taken_over = store
        .claim(
            &key,
            &claim("replica-b", 20, now + Duration::seconds(30)),
            now,
        )
        .await
        .unwrap()
        .expect("replica B takes over the lapsed claim");
    assert!(
        taken_over.outcome_unknown,
        "an abandoned claim must mark the outcome unknown"
    );

    let access = SecretString::from("stale-access");
    let scopes = vec!["offline".to_owned()];
    let tokens = NewTokens {
        access_token: &access,
        refresh_token: None,
        scopes: &scopes,
        lifetime_seconds: 3600,
        expires_at: now + Duration::hours(1),
        next_refresh_at: Some(now + Duration::minutes(55)),
    };
    let stale = store
        .store_refreshed(&key, 10, &tokens, "replica-a", now)
        .await
        .unwrap();
    assert!(
        stale.is_none(),
        "a writer without the claim overwrote the token set"
    );
    let stale_failure = store
        .store_failure(&key, 10, &failure(), "replica-a", now)
        .await
        .unwrap();
    assert!(stale_failure.is_none());

    let written = store
        .store_refreshed(&key, 20, &tokens, "replica-b", now)
        .await
        .unwrap()
        .expect("the claim holder writes");
    assert_eq!(written.claim_token, None, "the write ends the claim");
    assert_eq!(written.claimed_by, None);
    assert!(!written.outcome_unknown);
    assert_eq!(written.version, taken_over.version + 1);
    assert!(
        written.refresh_token.is_some(),
        "a refresh without a new token keeps the old"
    );
}

async fn due_sets_claimed_in_order(backend: Backend) {
    let fixture = open(&backend).await;
    let store = fixture.store.as_ref();
    let now = Utc::now();
    insert(store, "later", now - Duration::seconds(10)).await;
    insert(store, "earliest", now - Duration::seconds(30)).await;
    insert(store, "middle", now - Duration::seconds(20)).await;
    insert(store, "not-due", now + Duration::hours(1)).await;

    let until = now + Duration::seconds(30);
    let first = store
        .claim_due(&claim("replica-a", 1, until), now, 2)
        .await
        .unwrap();
    let users: Vec<&str> = first.iter().map(|set| set.key.user_id.as_str()).collect();
    assert_eq!(users, ["earliest", "middle"]);

    let second = store
        .claim_due(&claim("replica-b", 2, until), now, 10)
        .await
        .unwrap();
    let users: Vec<&str> = second.iter().map(|set| set.key.user_id.as_str()).collect();
    assert_eq!(
        users,
        ["later"],
        "claimed or not-due token sets were claimed again"
    );
    assert!(
        second
            .iter()
            .all(|set| set.claimed_by.as_deref() == Some("replica-b"))
    );
}

async fn failure_ends_the_claim(backend: Backend) {
    let fixture = open(&backend).await;
    let store = fixture.store.as_ref();
    let key = TokenSetKey::new("alice");
    insert(store, "alice", Utc::now() - Duration::seconds(1)).await;
    let now = Utc::now();
    let claimed = store
        .claim_due(&claim("replica-a", 7, now + Duration::seconds(30)), now, 10)
        .await
        .unwrap();
    assert_eq!(claimed.len(), 1);

    let stored = store
        .store_failure(&key, 7, &failure(), "replica-a", now)
        .await
        .unwrap()
        .expect("the claim holder records the failure");
    assert_eq!(stored.status, TokenStatus::RefreshFailing);
    assert_eq!(stored.failure_count, 1);
    assert_eq!(stored.last_error.as_deref(), Some("HTTP 503"));
    assert_eq!(stored.claim_token, None);
    assert!(!store.delete(&TokenSetKey::new("nobody")).await.unwrap());
    assert!(store.delete(&key).await.unwrap());
    assert!(store.get(&key).await.unwrap().is_none());
}

async fn store_new_keeps_existing_set(backend: Backend) {
    let fixture = open(&backend).await;
    let store = fixture.store.as_ref();
    let key = TokenSetKey::new("alice");
    insert(store, "alice", Utc::now() + Duration::hours(1)).await;

    let access = SecretString::from("imported-access");
    let scopes = vec!["user_profile".to_owned()];
    let tokens = NewTokens {
        access_token: &access,
        refresh_token: None,
        scopes: &scopes,
        lifetime_seconds: 600,
        expires_at: Utc::now() + Duration::minutes(10),
        next_refresh_at: None,
    };
    let kept = store.store_new(&key, &tokens, "test", Utc::now()).await;
    assert!(
        kept.unwrap().is_none(),
        "an existing token set was replaced"
    );
    let stored = store.get(&key).await.unwrap().unwrap();
    assert_eq!(stored.access_token.expose_secret(), "access-alice");
    assert_eq!(stored.version, 1);

    let new_key = TokenSetKey::new("bob");
    let created = store
        .store_new(&new_key, &tokens, "test", Utc::now())
        .await
        .unwrap()
        .expect("store_new wrote no row for a new user");
    assert_eq!(created.key, new_key);
    assert_eq!(created.status, TokenStatus::Active);
    assert_eq!(created.access_token.expose_secret(), "imported-access");
    assert!(created.refresh_token.is_none());
    assert_eq!(created.scopes, ["user_profile"]);
    assert_eq!(created.lifetime_seconds, 600);
    assert!(created.next_refresh_at.is_none());
}

async fn list_pages_by_user_and_status(backend: Backend) {
    let fixture = open(&backend).await;
    let store = fixture.store.as_ref();
    let far = Utc::now() + Duration::hours(1);
    for user_id in ["carol", "alice", "dave", "bob", "erin"] {
        insert(store, user_id, far).await;
    }
    // Bob's and Dave's refreshes fail, and Erin's ends the grant.
    let now = Utc::now();
    for (user_id, status) in [
        ("bob", TokenStatus::RefreshFailing),
        ("dave", TokenStatus::RefreshFailing),
        ("erin", TokenStatus::ReauthRequired),
    ] {
        let key = TokenSetKey::new(user_id);
        let claimed = claim("replica-a", 7, now + Duration::seconds(30));
        store.claim(&key, &claimed, now).await.unwrap().unwrap();
        let record = FailureRecord {
            status,
            ..failure()
        };
        store
            .store_failure(&key, 7, &record, "replica-a", now)
            .await
            .unwrap()
            .unwrap();
    }
    let user_ids = |sets: &[tokend::store::TokenSet]| -> Vec<String> {
        sets.iter().map(|set| set.key.user_id.clone()).collect()
    };

    let first = store.list(None, &[], 2).await.unwrap();
    assert_eq!(user_ids(&first), ["alice", "bob"]);
    let second = store.list(Some(&first[1].key), &[], 2).await.unwrap();
    assert_eq!(user_ids(&second), ["carol", "dave"]);
    let last = store.list(Some(&second[1].key), &[], 2).await.unwrap();
    assert_eq!(user_ids(&last), ["erin"]);
    let beyond = store.list(Some(&last[0].key), &[], 2).await.unwrap();
    assert!(beyond.is_empty());

    let failing = store
        .list(None, &[TokenStatus::RefreshFailing], 10)
        .await
        .unwrap();
    assert_eq!(user_ids(&failing), ["bob", "dave"]);
    let after_bob = store
        .list(Some(&failing[0].key), &[TokenStatus::RefreshFailing], 10)
        .await
        .unwrap();
    assert_eq!(user_ids(&after_bob), ["dave"]);
    let two_statuses = [TokenStatus::Active, TokenStatus::ReauthRequired];
    let active_or_reauth = store.list(None, &two_statuses, 10).await.unwrap();
    assert_eq!(user_ids(&active_or_reauth), ["alice", "carol", "erin"]);
}

async fn summary_counts_statuses_and_extremes(backend: Backend) {
    let fixture = open(&backend).await;
    let store = fixture.store.as_ref();
    store.ping().await.unwrap();
    assert_eq!(store.summary().await.unwrap(), StoreSummary::default());

    let now = Utc::now();
    insert(store, "alice", now - Duration::seconds(10)).await;
    insert(store, "bob", now + Duration::hours(1)).await;
    insert(store, "carol", now + Duration::hours(2)).await;
    let outcomes = [
        ("bob", TokenStatus::ReauthRequired, None),
        (
            "carol",
            TokenStatus::RefreshFailing,
            Some(now + Duration::seconds(30)),
        ),
    ];
    for (token, (user_id, status, next_refresh_at)) in (1..).zip(outcomes) {
        let key = TokenSetKey::new(user_id);
        store
            .claim(
                &key,
                &claim("replica-a", token, now + Duration::seconds(30)),
                now,
            )
            .await
            .unwrap()
            .unwrap();
        let record = FailureRecord {
            status,
            next_refresh_at,
            ..failure()
        };
        store
            .store_failure(&key, token, &record, "replica-a", now)
            .await
            .unwrap()
            .unwrap();
    }

    let summary = store.summary().await.unwrap();
    assert_eq!(summary.active, 1);
    assert_eq!(summary.refresh_failing, 1);
    assert_eq!(summary.reauth_required, 1);
    let alice = store
        .get(&TokenSetKey::new("alice"))
        .await
        .unwrap()
        .unwrap();
    let carol = store
        .get(&TokenSetKey::new("carol"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        summary.earliest_expiry,
        Some(alice.expires_at.min(carol.expires_at))
    );
    assert_eq!(summary.earliest_next_refresh, alice.next_refresh_at);
}

backend_tests! {
    summary_counts_statuses_and_extremes,
    claims_exclude_each_other,
    writes_are_fenced_by_the_claim,
    due_sets_claimed_in_order,
    failure_ends_the_claim,
    store_new_keeps_existing_set,
    list_pages_by_user_and_status,
}

/// The two lookups on the hot path, "which token sets are due" and "this user's token
/// set", can use an index, so they stay logarithmic in the number of rows.
#[tokio::test]
async fn postgres_lookups_use_indexes() {
    let Some(backend) = Backend::postgres() else {
        return;
    };
    let fixture = open(&backend).await;
    let pool = sqlx::PgPool::connect(&fixture.url).await.unwrap();
    let mut connection = pool.acquire().await.unwrap();
    // Forbidding sequential scans makes the planner show whether an index fits.
    sqlx::query("SET enable_seqscan = off")
        .execute(&mut *connection)
        .await
        .unwrap();
    let plans = [
        (
            "EXPLAIN SELECT app, user_id FROM token_sets WHERE next_refresh_at <= now() \
             AND (claim_until IS NULL OR claim_until <= now()) \
             ORDER BY next_refresh_at LIMIT 16 FOR UPDATE SKIP LOCKED",
            "token_sets_due",
        ),
        (
            "EXPLAIN SELECT * FROM token_sets WHERE app = 'default' AND user_id = 'alice'",
            "token_sets_pkey",
        ),
    ];
    for (query, index) in plans {
        let rows: Vec<(String,)> = sqlx::query_as(query)
            .fetch_all(&mut *connection)
            .await
            .unwrap();
        let plan: Vec<String> = rows.into_iter().map(|(line,)| line).collect();
        assert!(
            plan.iter().any(|line| line.contains(index)),
            "{index} is not used:\n{}",
            plan.join("\n")
        );
    }
}
