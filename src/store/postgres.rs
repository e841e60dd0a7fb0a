//! The PostgreSQL backend, for several replicas on one database. Due token sets are
//! claimed with `FOR UPDATE SKIP LOCKED`, so replicas never wait on each other's rows,
//! and no database lock is held while a refresh calls Tiki. A trigger announces every
//! change on the channel `tokend_token_sets`, which [`PostgresStore::subscribe`] turns
//! into events for the token cache.

use std::{
    str::FromStr,
    sync::{Arc, Mutex},
    time::Duration,
};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use sqlx::{
    Row,
    postgres::{PgConnectOptions, PgListener, PgPool, PgPoolOptions, PgRow},
};
use tokio::{sync::mpsc, task::JoinHandle};
use tracing::{debug, warn};

use super::{
    Claim, FailureRecord, NewTokens, StoreError, StoreEvent, StoreSummary, TokenSet, TokenSetKey,
    TokenStatus, TokenStore,
};

/// Enough for the default 16 refreshes in flight plus gRPC reads and the listener.
const MAX_CONNECTIONS: u32 = 32;

/// How long a query waits for a pooled connection before failing, so that callers
/// learn of an outage instead of hanging.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);

const CHANNEL: &str = "tokend_token_sets";

/// Events buffered for the cache before the listener waits for it to catch up.
const EVENT_BUFFER: usize = 4096;

/// The columns of `token_sets` that `read_row` reads.
macro_rules! columns {
    () => {
        "app, user_id, status, scopes, expires_at, next_refresh_at, refreshed_at, \
         failure_count, last_error, created_at, updated_at, claimed_by, claim_until, \
         lifetime_seconds, outcome_unknown, version, claim_token, access_token, refresh_token"
    };
}

/// Token sets in a PostgreSQL database.
#[derive(Debug, Clone)]
pub struct PostgresStore {
    pool: PgPool,
    /// Change listeners, stopped by `close` because each keeps a pooled connection
    /// that closing the pool would otherwise wait for.
    listeners: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl PostgresStore {
    /// Connects to the database at `url` and applies the migrations. Replicas starting
    /// together are safe: sqlx serialises migrations with an advisory lock.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let open_error = |source| StoreError::Open {
            url: super::redact_url(url),
            source,
        };
        let options = PgConnectOptions::from_str(url).map_err(open_error)?;
        let pool = PgPoolOptions::new()
            .max_connections(MAX_CONNECTIONS)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_with(options)
            .await
            .map_err(open_error)?;
        sqlx::migrate!("migrations/postgres").run(&pool).await?;
        Ok(PostgresStore {
            pool,
            listeners: Arc::default(),
        })
    }

    async fn fetch_optional(
        &self,
        query: sqlx::query::Query<'_, sqlx::Postgres, sqlx::postgres::PgArguments>,
    ) -> Result<Option<TokenSet>, StoreError> {
        let row = query.fetch_optional(&self.pool).await?;
        row.map(|row| read_row(&row)).transpose()
    }
}

impl PostgresStore {
    fn lock_listeners(&self) -> std::sync::MutexGuard<'_, Vec<JoinHandle<()>>> {
        self.listeners
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[async_trait]
impl TokenStore for PostgresStore {
    async fn get(&self, key: &TokenSetKey) -> Result<Option<TokenSet>, StoreError> {
        let query = sqlx::query(concat!(
            "SELECT ",
            columns!(),
            " FROM token_sets WHERE app = $1 AND user_id = $2"
        ))
        .bind(&key.app)
        .bind(&key.user_id);
        self.fetch_optional(query).await
    }

    async fn store_exchanged(
        &self,
        key: &TokenSetKey,
        tokens: &NewTokens<'_>,
        writer: &str,
        now: DateTime<Utc>,
    ) -> Result<TokenSet, StoreError> {
        let query = sqlx::query(concat!(
            "INSERT INTO token_sets (app, user_id, status, scopes, expires_at, next_refresh_at, \
             refreshed_at, failure_count, last_error, created_at, updated_at, lifetime_seconds, \
             outcome_unknown, version, updated_by, access_token, refresh_token) \
             VALUES ($1, $2, 'active', $3, $4, $5, NULL, 0, NULL, $6, $6, $7, false, 1, $8, $9, $10) \
             ON CONFLICT (app, user_id) DO UPDATE SET status = 'active', \
             scopes = excluded.scopes, expires_at = excluded.expires_at, \
             next_refresh_at = excluded.next_refresh_at, refreshed_at = NULL, \
             failure_count = 0, last_error = NULL, updated_at = excluded.updated_at, \
             claimed_by = NULL, claim_until = NULL, claim_token = NULL, \
             lifetime_seconds = excluded.lifetime_seconds, outcome_unknown = false, \
             version = token_sets.version + 1, updated_by = excluded.updated_by, \
             access_token = excluded.access_token, refresh_token = excluded.refresh_token \
             RETURNING ",
            columns!()
        ))
        .bind(&key.app)
        .bind(&key.user_id)
        .bind(tokens.scopes.join(" "))
        .bind(tokens.expires_at)
        .bind(tokens.next_refresh_at)
        .bind(now)
        .bind(lifetime_column(tokens.lifetime_seconds))
        .bind(writer.to_owned())
        .bind(tokens.access_token.expose_secret().to_owned())
        .bind(
            tokens
                .refresh_token
                .map(|token| token.expose_secret().to_owned()),
        );
        let written = self.fetch_optional(query).await?;
        // An upsert with RETURNING always yields the row it wrote.
        written.ok_or(StoreError::Query(sqlx::Error::RowNotFound))
    }

    async fn store_new(
        &self,
        key: &TokenSetKey,
        tokens: &NewTokens<'_>,
        writer: &str,
        now: DateTime<Utc>,
    ) -> Result<Option<TokenSet>, StoreError> {
        let query = sqlx::query(concat!(
            "INSERT INTO token_sets (app, user_id, status, scopes, expires_at, next_refresh_at, \
             refreshed_at, failure_count, last_error, created_at, updated_at, lifetime_seconds, \
             outcome_unknown, version, updated_by, access_token, refresh_token) \
             VALUES ($1, $2, 'active', $3, $4, $5, NULL, 0, NULL, $6, $6, $7, false, 1, $8, $9, $10) \
             ON CONFLICT (app, user_id) DO NOTHING RETURNING ",
            columns!()
        ))
        .bind(&key.app)
        .bind(&key.user_id)
        .bind(tokens.scopes.join(" "))
        .bind(tokens.expires_at)
        .bind(tokens.next_refresh_at)
        .bind(now)
        .bind(lifetime_column(tokens.lifetime_seconds))
        .bind(writer.to_owned())
        .bind(tokens.access_token.expose_secret().to_owned())
        .bind(
            tokens
                .refresh_token
                .map(|token| token.expose_secret().to_owned()),
        );
        self.fetch_optional(query).await
    }

    async fn list(
        &self,
        after: Option<&TokenSetKey>,
        statuses: &[TokenStatus],
        limit: u32,
    ) -> Result<Vec<TokenSet>, StoreError> {
        let [first, second, third] = super::status_filter(statuses);
        let (after_app, after_user_id) = after.map_or(("", ""), |key| (&key.app, &key.user_id));
        let rows = sqlx::query(concat!(
            "SELECT ",
            columns!(),
            " FROM token_sets WHERE (app, user_id) > ($1, $2) AND status IN ($3, $4, $5) \
             ORDER BY app, user_id LIMIT $6"
        ))
        .bind(after_app)
        .bind(after_user_id)
        .bind(first)
        .bind(second)
        .bind(third)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(read_row).collect()
    }

    async fn claim_due(
        &self,
        claim: &Claim,
        now: DateTime<Utc>,
        limit: u32,
    ) -> Result<Vec<TokenSet>, StoreError> {
        let rows = sqlx::query(concat!(
            "UPDATE token_sets AS t SET claimed_by = $1, claim_until = $2, claim_token = $3, \
             updated_by = $1, outcome_unknown = (t.outcome_unknown OR t.claim_until IS NOT NULL) \
             FROM (SELECT app AS due_app, user_id AS due_user_id FROM token_sets \
             WHERE next_refresh_at <= $4 AND (claim_until IS NULL OR claim_until <= $4) \
             ORDER BY next_refresh_at LIMIT $5 FOR UPDATE SKIP LOCKED) AS due \
             WHERE t.app = due.due_app AND t.user_id = due.due_user_id RETURNING ",
            columns!()
        ))
        .bind(&claim.owner)
        .bind(claim.until)
        .bind(claim.token)
        .bind(now)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(read_row).collect()
    }

    async fn claim(
        &self,
        key: &TokenSetKey,
        claim: &Claim,
        now: DateTime<Utc>,
    ) -> Result<Option<TokenSet>, StoreError> {
        let query = sqlx::query(concat!(
            "UPDATE token_sets SET claimed_by = $1, claim_until = $2, claim_token = $3, \
             updated_by = $1, outcome_unknown = (outcome_unknown OR claim_until IS NOT NULL) \
             WHERE app = $4 AND user_id = $5 AND (claim_until IS NULL OR claim_until <= $6) \
             RETURNING ",
            columns!()
        ))
        .bind(&claim.owner)
        .bind(claim.until)
        .bind(claim.token)
        .bind(&key.app)
        .bind(&key.user_id)
        .bind(now);
        self.fetch_optional(query).await
    }

    async fn store_refreshed(
        &self,
        key: &TokenSetKey,
        claim_token: i64,
        tokens: &NewTokens<'_>,
        writer: &str,
        now: DateTime<Utc>,
    ) -> Result<Option<TokenSet>, StoreError> {
        let query = sqlx::query(concat!(
            "UPDATE token_sets SET status = 'active', scopes = $1, expires_at = $2, \
             next_refresh_at = $3, refreshed_at = $4, failure_count = 0, last_error = NULL, \
             updated_at = $4, lifetime_seconds = $5, outcome_unknown = false, \
             version = version + 1, access_token = $6, \
             refresh_token = COALESCE($7, refresh_token), updated_by = $8, \
             claimed_by = NULL, claim_until = NULL, claim_token = NULL \
             WHERE app = $9 AND user_id = $10 AND claim_token = $11 RETURNING ",
            columns!()
        ))
        .bind(tokens.scopes.join(" "))
        .bind(tokens.expires_at)
        .bind(tokens.next_refresh_at)
        .bind(now)
        .bind(lifetime_column(tokens.lifetime_seconds))
        .bind(tokens.access_token.expose_secret().to_owned())
        .bind(
            tokens
                .refresh_token
                .map(|token| token.expose_secret().to_owned()),
        )
        .bind(writer.to_owned())
        .bind(&key.app)
        .bind(&key.user_id)
        .bind(claim_token);
        self.fetch_optional(query).await
    }

    async fn store_failure(
        &self,
        key: &TokenSetKey,
        claim_token: i64,
        failure: &FailureRecord,
        writer: &str,
        now: DateTime<Utc>,
    ) -> Result<Option<TokenSet>, StoreError> {
        let query = sqlx::query(concat!(
            "UPDATE token_sets SET status = $1, failure_count = $2, last_error = $3, \
             next_refresh_at = $4, outcome_unknown = $5, updated_at = $6, \
             version = version + 1, updated_by = $7, \
             claimed_by = NULL, claim_until = NULL, claim_token = NULL \
             WHERE app = $8 AND user_id = $9 AND claim_token = $10 RETURNING ",
            columns!()
        ))
        .bind(failure.status.as_str())
        .bind(i32::try_from(failure.failure_count).unwrap_or(i32::MAX))
        .bind(failure.last_error.clone())
        .bind(failure.next_refresh_at)
        .bind(failure.outcome_unknown)
        .bind(now)
        .bind(writer.to_owned())
        .bind(&key.app)
        .bind(&key.user_id)
        .bind(claim_token);
        self.fetch_optional(query).await
    }

    async fn release(&self, key: &TokenSetKey, claim_token: i64) -> Result<bool, StoreError> {
        let result = sqlx::query(
            "UPDATE token_sets SET claimed_by = NULL, claim_until = NULL, claim_token = NULL \
             WHERE app = $1 AND user_id = $2 AND claim_token = $3",
        )
        .bind(&key.app)
        .bind(&key.user_id)
        .bind(claim_token)
        .execute(&self.pool)
        .await?;
        Ok(result.rows_affected() > 0)
    }

    async fn delete(&self, key: &TokenSetKey) -> Result<bool, StoreError> {
        let result = sqlx::query("DELETE FROM token_sets WHERE app = $1 AND user_id = $2")
            .bind(&key.app)
            .bind(&key.user_id)
            .execute(&self.pool)
            .await?;
        Ok(result.rows_affected() > 0)
    }

    fn subscribe(&self, own_writer: &str) -> Option<mpsc::Receiver<StoreEvent>> {
        let (sender, receiver) = mpsc::channel(EVENT_BUFFER);
        let listener = tokio::spawn(listen(self.pool.clone(), own_writer.to_owned(), sender));
        self.lock_listeners().push(listener);
        Some(receiver)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1 FROM token_sets LIMIT 1")
            .fetch_optional(&self.pool)
            .await?;
        Ok(())
    }

    async fn summary(&self) -> Result<StoreSummary, StoreError> {
        let row = sqlx::query(SUMMARY).fetch_one(&self.pool).await?;
        Ok(StoreSummary {
            active: count(row.try_get(0)?),
            refresh_failing: count(row.try_get(1)?),
            reauth_required: count(row.try_get(2)?),
            earliest_expiry: row.try_get(3)?,
            earliest_next_refresh: row.try_get(4)?,
        })
    }

    async fn close(&self) {
        for listener in self.lock_listeners().drain(..) {
            listener.abort();
        }
        self.pool.close().await;
    }
}

/// The payload the `token_sets_notify` trigger sends.
#[derive(Debug, Deserialize)]
struct Notice {
    app: String,
    user_id: String,
    version: i64,
    writer: Option<String>,
}

/// Forwards other replicas' changes until the receiver is dropped.
///
/// While the connection is down the cache is left alone: no replica can refresh without the
/// database, so cached tokens stay valid, and GetAccessToken keeps serving them. Once a
/// connection is back, `Resync` is sent first, because notices sent meanwhile are gone.
async fn listen(pool: PgPool, own_writer: String, sender: mpsc::Sender<StoreEvent>) {
    let mut listener = loop {
        match start_listener(&pool).await {
            Ok(listener) => break listener,
            Err(error) => {
                warn!(%error, "listening for token set changes failed; retrying in 1 s");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    };

    let mut missed = false;
    loop {
        let received = tokio::select! {
            () = sender.closed() => return,
            received = listener.try_recv() => received,
        };
        let event = match received {
            Ok(Some(notification)) => {
                if std::mem::take(&mut missed) && sender.send(StoreEvent::Resync).await.is_err() {
                    return;
                }
                match serde_json::from_str::<Notice>(notification.payload()) {
                    Ok(notice) if notice.writer.as_deref() == Some(own_writer.as_str()) => continue,
                    Ok(notice) => StoreEvent::Changed {
                        key: TokenSetKey {
                            app: notice.app,
                            user_id: notice.user_id,
                        },
                        version: notice.version,
                    },
                    Err(error) => {
                        warn!(%error, "a token set change notice is invalid; dropping every cached token");
                        StoreEvent::Resync
                    }
                }
            }
            // sqlx has reconnected by the time it reports the loss.
            Ok(None) => {
                warn!(
                    "the connection for token set changes was lost and is back; dropping every cached token"
                );
                missed = false;
                StoreEvent::Resync
            }
            Err(error) => {
                if !missed {
                    warn!(%error, "receiving token set changes failed; retrying every second");
                }
                missed = true;
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        if sender.send(event).await.is_err() {
            debug!("token set change listener stopped");
            return;
        }
    }
}

async fn start_listener(pool: &PgPool) -> Result<PgListener, sqlx::Error> {
    let mut listener = PgListener::connect_with(pool).await?;
    listener.listen(CHANNEL).await?;
    Ok(listener)
}

/// Counts token sets by status and finds the earliest expiry and scheduled refresh.
const SUMMARY: &str = "SELECT \
             (SELECT COUNT(*) FROM token_sets WHERE status = 'active'), \
             (SELECT COUNT(*) FROM token_sets WHERE status = 'refresh_failing'), \
             (SELECT COUNT(*) FROM token_sets WHERE status = 'reauth_required'), \
             (SELECT MIN(expires_at) FROM token_sets WHERE status <> 'reauth_required'), \
             (SELECT MIN(next_refresh_at) FROM token_sets)";

fn count(value: i64) -> u64 {
    u64::try_from(value).unwrap_or_default()
}

fn lifetime_column(seconds: u64) -> i64 {
    i64::try_from(seconds).unwrap_or(i64::MAX)
}

fn read_row(row: &PgRow) -> Result<TokenSet, StoreError> {
    let key = TokenSetKey {
        app: row.try_get("app")?,
        user_id: row.try_get("user_id")?,
    };
    let invalid = |column: &'static str, detail: String| StoreError::InvalidRow {
        key: key.clone(),
        column,
        detail,
    };

    let status_text: String = row.try_get("status")?;
    let status = TokenStatus::parse(&status_text)
        .ok_or_else(|| invalid("status", format!("unknown status {status_text:?}")))?;
    let scopes: String = row.try_get("scopes")?;
    let failure_count: i32 = row.try_get("failure_count")?;
    let lifetime_seconds: i64 = row.try_get("lifetime_seconds")?;
    let access_token: String = row.try_get("access_token")?;
    let refresh_token: Option<String> = row.try_get("refresh_token")?;

    Ok(TokenSet {
        status,
        access_token: SecretString::from(access_token),
        refresh_token: refresh_token.map(SecretString::from),
        scopes: scopes.split_whitespace().map(str::to_owned).collect(),
        lifetime_seconds: u64::try_from(lifetime_seconds)
            .map_err(|_| invalid("lifetime_seconds", lifetime_seconds.to_string()))?,
        expires_at: row.try_get("expires_at")?,
        next_refresh_at: row.try_get("next_refresh_at")?,
        refreshed_at: row.try_get("refreshed_at")?,
        failure_count: u32::try_from(failure_count)
            .map_err(|_| invalid("failure_count", failure_count.to_string()))?,
        last_error: row.try_get("last_error")?,
        outcome_unknown: row.try_get("outcome_unknown")?,
        version: row.try_get("version")?,
        claimed_by: row.try_get("claimed_by")?,
        claim_until: row.try_get("claim_until")?,
        claim_token: row.try_get("claim_token")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
        key,
    })
}
