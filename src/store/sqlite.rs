//! The SQLite backend: one file, WAL journaling, and every write in a transaction
//! that takes the write lock when it begins (`BEGIN IMMEDIATE`), so that concurrent
//! writers wait for the busy timeout instead of failing with "database is locked".

use std::{
    fs::{File, TryLockError},
    path::{Path, PathBuf},
    str::FromStr,
    sync::{Arc, Mutex},
    time::Duration,
};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use secrecy::{ExposeSecret, SecretString};
use sqlx::{
    Row, Sqlite,
    query::Query,
    sqlite::{
        SqliteArguments, SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
        SqliteRow, SqliteSynchronous,
    },
};

use super::{
    Claim, FailureRecord, NewTokens, StoreError, StoreSummary, TokenSet, TokenSetKey, TokenStatus,
    TokenStore, format_time,
};

/// How long a statement waits for another connection's write lock before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(30);

const MAX_CONNECTIONS: u32 = 8;

/// The columns of `token_sets` that `read_row` reads.
macro_rules! columns {
    () => {
        "app, user_id, status, scopes, expires_at, next_refresh_at, refreshed_at, \
         failure_count, last_error, created_at, updated_at, claimed_by, claim_until, \
         lifetime_seconds, outcome_unknown, version, claim_token, access_token, refresh_token"
    };
}

/// Token sets in a SQLite file.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
    /// An exclusive lock on `PATH.lock`, held until `close`, because SQLite has no way
    /// to tell other processes that a token set changed, so their caches would serve
    /// tokens that Tiki revoked.
    process_lock: Arc<Mutex<Option<File>>>,
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `url` (`sqlite://PATH` or
    /// `sqlite:PATH`) and applies the migrations.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let open_error = |source| StoreError::Open {
            url: super::redact_url(url),
            source,
        };
        let options = SqliteConnectOptions::from_str(url).map_err(open_error)?;
        let process_lock = lock_database(options.get_filename())?;
        let options = options
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // Losing a committed refresh would lose the rotated refresh token, and with
            // it the user's grant, so every commit is synced to disk.
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(BUSY_TIMEOUT);
        let pool = SqlitePoolOptions::new()
            .max_connections(MAX_CONNECTIONS)
            .connect_with(options)
            .await
            .map_err(open_error)?;
        sqlx::migrate!("migrations/sqlite").run(&pool).await?;
        Ok(SqliteStore {
            pool,
            process_lock: Arc::new(Mutex::new(Some(process_lock))),
        })
    }

    /// Runs one writing statement that returns the row it wrote.
    async fn write_returning(
        &self,
        query: Query<'_, Sqlite, SqliteArguments>,
        key: &TokenSetKey,
    ) -> Result<Option<TokenSet>, StoreError> {
        let mut transaction = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let row = query.fetch_optional(&mut *transaction).await?;
        transaction.commit().await?;
        row.map(|row| read_row(&row, Some(key))).transpose()
    }
}

#[async_trait]
impl TokenStore for SqliteStore {
    async fn get(&self, key: &TokenSetKey) -> Result<Option<TokenSet>, StoreError> {
        let row = sqlx::query(concat!(
            "SELECT ",
            columns!(),
            " FROM token_sets WHERE app = ?1 AND user_id = ?2"
        ))
        .bind(&key.app)
        .bind(&key.user_id)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|row| read_row(&row, Some(key))).transpose()
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
             VALUES (?1, ?2, 'active', ?3, ?4, ?5, NULL, 0, NULL, ?6, ?6, ?7, 0, 1, ?8, ?9, ?10) \
             ON CONFLICT (app, user_id) DO UPDATE SET status = 'active', \
             scopes = excluded.scopes, expires_at = excluded.expires_at, \
             next_refresh_at = excluded.next_refresh_at, refreshed_at = NULL, \
             failure_count = 0, last_error = NULL, updated_at = excluded.updated_at, \
             claimed_by = NULL, claim_until = NULL, claim_token = NULL, \
             lifetime_seconds = excluded.lifetime_seconds, outcome_unknown = 0, \
             version = token_sets.version + 1, updated_by = excluded.updated_by, \
             access_token = excluded.access_token, refresh_token = excluded.refresh_token \
             RETURNING ",
            columns!()
        ))
        .bind(&key.app)
        .bind(&key.user_id)
        .bind(tokens.scopes.join(" "))
        .bind(format_time(tokens.expires_at))
        .bind(tokens.next_refresh_at.map(format_time))
        .bind(format_time(now))
        .bind(lifetime_column(tokens.lifetime_seconds))
        .bind(writer.to_owned())
        .bind(tokens.access_token.expose_secret().to_owned())
        .bind(
            tokens
                .refresh_token
                .map(|token| token.expose_secret().to_owned()),
        );
        let written = self.write_returning(query, key).await?;
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
             VALUES (?1, ?2, 'active', ?3, ?4, ?5, NULL, 0, NULL, ?6, ?6, ?7, 0, 1, ?8, ?9, ?10) \
             ON CONFLICT (app, user_id) DO NOTHING RETURNING ",
            columns!()
        ))
        .bind(&key.app)
        .bind(&key.user_id)
        .bind(tokens.scopes.join(" "))
        .bind(format_time(tokens.expires_at))
        .bind(tokens.next_refresh_at.map(format_time))
        .bind(format_time(now))
        .bind(lifetime_column(tokens.lifetime_seconds))
        .bind(writer.to_owned())
        .bind(tokens.access_token.expose_secret().to_owned())
        .bind(
            tokens
                .refresh_token
                .map(|token| token.expose_secret().to_owned()),
        );
        self.write_returning(query, key).await
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
            " FROM token_sets WHERE (app, user_id) > (?1, ?2) AND status IN (?3, ?4, ?5) \
             ORDER BY app, user_id LIMIT ?6"
        ))
        .bind(after_app)
        .bind(after_user_id)
        .bind(first)
        .bind(second)
        .bind(third)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(|row| read_row(row, None)).collect()
    }

    async fn claim_due(
        &self,
        claim: &Claim,
        now: DateTime<Utc>,
        limit: u32,
    ) -> Result<Vec<TokenSet>, StoreError> {
        let mut transaction = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let rows = sqlx::query(concat!(
            "UPDATE token_sets SET claimed_by = ?1, claim_until = ?2, claim_token = ?3, \
             updated_by = ?1, outcome_unknown = (outcome_unknown OR claim_until IS NOT NULL) \
             WHERE rowid IN (SELECT rowid FROM token_sets \
             WHERE next_refresh_at IS NOT NULL AND next_refresh_at <= ?4 \
             AND (claim_until IS NULL OR claim_until <= ?4) \
             ORDER BY next_refresh_at LIMIT ?5) RETURNING ",
            columns!()
        ))
        .bind(&claim.owner)
        .bind(format_time(claim.until))
        .bind(claim.token)
        .bind(format_time(now))
        .bind(i64::from(limit))
        .fetch_all(&mut *transaction)
        .await?;
        transaction.commit().await?;
        rows.iter().map(|row| read_row(row, None)).collect()
    }

    async fn claim(
        &self,
        key: &TokenSetKey,
        claim: &Claim,
        now: DateTime<Utc>,
    ) -> Result<Option<TokenSet>, StoreError> {
        let query = sqlx::query(concat!(
            "UPDATE token_sets SET claimed_by = ?1, claim_until = ?2, claim_token = ?3, \
             updated_by = ?1, outcome_unknown = (outcome_unknown OR claim_until IS NOT NULL) \
             WHERE app = ?4 AND user_id = ?5 AND (claim_until IS NULL OR claim_until <= ?6) \
             RETURNING ",
            columns!()
        ))
        .bind(&claim.owner)
        .bind(format_time(claim.until))
        .bind(claim.token)
        .bind(&key.app)
        .bind(&key.user_id)
        .bind(format_time(now));
        self.write_returning(query, key).await
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
            "UPDATE token_sets SET status = 'active', scopes = ?1, expires_at = ?2, \
             next_refresh_at = ?3, refreshed_at = ?4, failure_count = 0, last_error = NULL, \
             updated_at = ?4, lifetime_seconds = ?5, outcome_unknown = 0, \
             version = version + 1, access_token = ?6, \
             refresh_token = COALESCE(?7, refresh_token), updated_by = ?8, \
             claimed_by = NULL, claim_until = NULL, claim_token = NULL \
             WHERE app = ?9 AND user_id = ?10 AND claim_token = ?11 RETURNING ",
            columns!()
        ))
        .bind(tokens.scopes.join(" "))
        .bind(format_time(tokens.expires_at))
        .bind(tokens.next_refresh_at.map(format_time))
        .bind(format_time(now))
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
        self.write_returning(query, key).await
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
            "UPDATE token_sets SET status = ?1, failure_count = ?2, last_error = ?3, \
             next_refresh_at = ?4, outcome_unknown = ?5, updated_at = ?6, \
             version = version + 1, updated_by = ?7, \
             claimed_by = NULL, claim_until = NULL, claim_token = NULL \
             WHERE app = ?8 AND user_id = ?9 AND claim_token = ?10 RETURNING ",
            columns!()
        ))
        .bind(failure.status.as_str())
        .bind(i64::from(failure.failure_count))
        .bind(failure.last_error.clone())
        .bind(failure.next_refresh_at.map(format_time))
        .bind(failure.outcome_unknown)
        .bind(format_time(now))
        .bind(writer.to_owned())
        .bind(&key.app)
        .bind(&key.user_id)
        .bind(claim_token);
        self.write_returning(query, key).await
    }

    async fn release(&self, key: &TokenSetKey, claim_token: i64) -> Result<bool, StoreError> {
        let mut transaction = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let result = sqlx::query(
            "UPDATE token_sets SET claimed_by = NULL, claim_until = NULL, claim_token = NULL \
             WHERE app = ?1 AND user_id = ?2 AND claim_token = ?3",
        )
        .bind(&key.app)
        .bind(&key.user_id)
        .bind(claim_token)
        .execute(&mut *transaction)
        .await?;
        transaction.commit().await?;
        Ok(result.rows_affected() > 0)
    }

    async fn delete(&self, key: &TokenSetKey) -> Result<bool, StoreError> {
        let mut transaction = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let result = sqlx::query("DELETE FROM token_sets WHERE app = ?1 AND user_id = ?2")
            .bind(&key.app)
            .bind(&key.user_id)
            .execute(&mut *transaction)
            .await?;
        transaction.commit().await?;
        Ok(result.rows_affected() > 0)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1 FROM token_sets LIMIT 1")
            .fetch_optional(&self.pool)
            .await?;
        Ok(())
    }

    async fn summary(&self) -> Result<StoreSummary, StoreError> {
        let row = sqlx::query(SUMMARY).fetch_one(&self.pool).await?;
        let time = |index: usize| -> Result<Option<DateTime<Utc>>, StoreError> {
            let text: Option<String> = row.try_get(index)?;
            text.map(|text| {
                parse_time(&text)
                    .map_err(|detail| StoreError::Query(sqlx::Error::Decode(detail.into())))
            })
            .transpose()
        };
        Ok(StoreSummary {
            active: count(row.try_get(0)?),
            refresh_failing: count(row.try_get(1)?),
            reauth_required: count(row.try_get(2)?),
            earliest_expiry: time(3)?,
            earliest_next_refresh: time(4)?,
        })
    }

    async fn close(&self) {
        self.pool.close().await;
        let lock = self
            .process_lock
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take();
        drop(lock);
    }
}

/// Takes an exclusive lock on `database.lock` so that only one process uses the file.
/// The lock lasts until the returned file is dropped.
pub fn lock_database(database: &Path) -> Result<File, StoreError> {
    let mut name = database.as_os_str().to_owned();
    name.push(".lock");
    let path = PathBuf::from(name);
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|source| StoreError::Lock {
            path: path.display().to_string(),
            reason: format!("{source}; check database_url (TOKEND_DATABASE_URL)"),
        })?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(TryLockError::WouldBlock) => Err(StoreError::Lock {
            path: path.display().to_string(),
            reason: "another tokend process uses this database; SQLite serves one process, \
                     so stop the other one or use PostgreSQL for several replicas"
                .to_owned(),
        }),
        Err(TryLockError::Error(source)) => Err(StoreError::Lock {
            path: path.display().to_string(),
            reason: source.to_string(),
        }),
    }
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

/// Reads a row; `key` names it in errors when the caller knows it.
fn read_row(row: &SqliteRow, key: Option<&TokenSetKey>) -> Result<TokenSet, StoreError> {
    let row_key = TokenSetKey {
        app: row.try_get("app")?,
        user_id: row.try_get("user_id")?,
    };
    let key = key.unwrap_or(&row_key);
    let invalid = |column: &'static str, detail: String| StoreError::InvalidRow {
        key: key.clone(),
        column,
        detail,
    };
    let time = |column: &'static str| -> Result<DateTime<Utc>, StoreError> {
        let text: String = row.try_get(column)?;
        parse_time(&text).map_err(|detail| invalid(column, detail))
    };
    let optional_time = |column: &'static str| -> Result<Option<DateTime<Utc>>, StoreError> {
        let text: Option<String> = row.try_get(column)?;
        text.map(|text| parse_time(&text).map_err(|detail| invalid(column, detail)))
            .transpose()
    };

    let status_text: String = row.try_get("status")?;
    let status = TokenStatus::parse(&status_text)
        .ok_or_else(|| invalid("status", format!("unknown status {status_text:?}")))?;
    let scopes: String = row.try_get("scopes")?;
    let failure_count: i64 = row.try_get("failure_count")?;
    let lifetime_seconds: i64 = row.try_get("lifetime_seconds")?;
    let access_token: String = row.try_get("access_token")?;
    let refresh_token: Option<String> = row.try_get("refresh_token")?;

    Ok(TokenSet {
        key: row_key.clone(),
        status,
        access_token: SecretString::from(access_token),
        refresh_token: refresh_token.map(SecretString::from),
        scopes: scopes.split_whitespace().map(str::to_owned).collect(),
        lifetime_seconds: u64::try_from(lifetime_seconds)
            .map_err(|_| invalid("lifetime_seconds", lifetime_seconds.to_string()))?,
        expires_at: time("expires_at")?,
        next_refresh_at: optional_time("next_refresh_at")?,
        refreshed_at: optional_time("refreshed_at")?,
        failure_count: u32::try_from(failure_count)
            .map_err(|_| invalid("failure_count", failure_count.to_string()))?,
        last_error: row.try_get("last_error")?,
        outcome_unknown: row.try_get("outcome_unknown")?,
        version: row.try_get("version")?,
        claimed_by: row.try_get("claimed_by")?,
        claim_until: optional_time("claim_until")?,
        claim_token: row.try_get("claim_token")?,
        created_at: time("created_at")?,
        updated_at: time("updated_at")?,
    })
}

fn parse_time(text: &str) -> Result<DateTime<Utc>, String> {
    DateTime::parse_from_rfc3339(text)
        .map(|time| time.with_timezone(&Utc))
        .map_err(|error| format!("{text:?} is not an RFC 3339 time: {error}"))
}
