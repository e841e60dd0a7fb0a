//! The SQLite records of recent auth code exchanges, which let a retried exchange get
//! the stored token set; see [`crate::store::TokenStore::claim_code`].

use chrono::{DateTime, Utc};
use sqlx::Row;

use super::{SqliteStore, parse_time};
use crate::store::{CodeClaim, CodeExchange, StoreError, TokenSetKey, format_time};

impl SqliteStore {
    /// Records an exchange of `code_hash` unless another call recorded it recently.
    pub(super) async fn claim_code_record(
        &self,
        code_hash: &str,
        key: &TokenSetKey,
        now: DateTime<Utc>,
        expired_before: DateTime<Utc>,
        stale_before: DateTime<Utc>,
    ) -> Result<CodeClaim, StoreError> {
        let mut transaction = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        sqlx::query("DELETE FROM auth_code_exchanges WHERE started_at < ?1")
            .bind(format_time(expired_before))
            .execute(&mut *transaction)
            .await?;

        let inserted = sqlx::query(
            "INSERT INTO auth_code_exchanges (code_hash, app, user_id, started_at) \
             VALUES (?1, ?2, ?3, ?4) ON CONFLICT (code_hash) DO NOTHING",
        )
        .bind(code_hash)
        .bind(&key.app)
        .bind(&key.user_id)
        .bind(format_time(now))
        .execute(&mut *transaction)
        .await?;
        let taken_over = if inserted.rows_affected() > 0 {
            true
        } else {
            sqlx::query(
                "UPDATE auth_code_exchanges SET started_at = ?1 WHERE code_hash = ?2 \
                 AND app = ?3 AND user_id = ?4 AND finished_at IS NULL AND started_at < ?5",
            )
            .bind(format_time(now))
            .bind(code_hash)
            .bind(&key.app)
            .bind(&key.user_id)
            .bind(format_time(stale_before))
            .execute(&mut *transaction)
            .await?
            .rows_affected()
                > 0
        };
        if taken_over {
            transaction.commit().await?;
            return Ok(CodeClaim::Claimed);
        }

        let row = sqlx::query(
            "SELECT app, user_id, started_at, finished_at FROM auth_code_exchanges \
             WHERE code_hash = ?1",
        )
        .bind(code_hash)
        .fetch_one(&mut *transaction)
        .await?;
        transaction.commit().await?;

        let started_at: String = row.try_get("started_at")?;
        let finished_at: Option<String> = row.try_get("finished_at")?;
        let key = TokenSetKey {
            app: row.try_get("app")?,
            user_id: row.try_get("user_id")?,
        };
        let started_at = parse_time(&started_at).map_err(|detail| StoreError::InvalidRow {
            key: key.clone(),
            column: "auth_code_exchanges.started_at",
            detail,
        })?;
        Ok(CodeClaim::Existing(CodeExchange {
            key,
            finished: finished_at.is_some(),
            started_at,
        }))
    }

    /// Marks the exchange of `code_hash` as finished.
    pub(super) async fn finish_code_record(
        &self,
        code_hash: &str,
        now: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        let mut transaction = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        sqlx::query("UPDATE auth_code_exchanges SET finished_at = ?1 WHERE code_hash = ?2")
            .bind(format_time(now))
            .bind(code_hash)
            .execute(&mut *transaction)
            .await?;
        transaction.commit().await?;
        Ok(())
    }

    /// Deletes the record of an unfinished exchange of `code_hash`.
    pub(super) async fn release_code_record(&self, code_hash: &str) -> Result<(), StoreError> {
        let mut transaction = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        sqlx::query("DELETE FROM auth_code_exchanges WHERE code_hash = ?1 AND finished_at IS NULL")
            .bind(code_hash)
            .execute(&mut *transaction)
            .await?;
        transaction.commit().await?;
        Ok(())
    }
}
