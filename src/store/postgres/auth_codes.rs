//! The PostgreSQL records of recent auth code exchanges, which let a retried exchange
//! on any replica get the stored token set; see
//! [`crate::store::TokenStore::claim_code`].

use chrono::{DateTime, Utc};
use sqlx::Row;

use super::PostgresStore;
use crate::store::{CodeClaim, CodeExchange, StoreError, TokenSetKey};

impl PostgresStore {
    /// Records an exchange of `code_hash` unless another call recorded it recently.
    pub(super) async fn claim_code_record(
        &self,
        code_hash: &str,
        key: &TokenSetKey,
        now: DateTime<Utc>,
        expired_before: DateTime<Utc>,
        stale_before: DateTime<Utc>,
    ) -> Result<CodeClaim, StoreError> {
        // A new code takes one statement. A code that is recorded already takes the
        // transaction below, which also deletes its record once the window has passed.
        let inserted = sqlx::query(
            "WITH expired AS (DELETE FROM auth_code_exchanges WHERE started_at < $5) \
             INSERT INTO auth_code_exchanges (code_hash, app, user_id, started_at) \
             VALUES ($1, $2, $3, $4) ON CONFLICT (code_hash) DO NOTHING",
        )
        .bind(code_hash)
        .bind(&key.app)
        .bind(&key.user_id)
        .bind(now)
        .bind(expired_before)
        .execute(&self.pool)
        .await?;
        if inserted.rows_affected() > 0 {
            return Ok(CodeClaim::Claimed);
        }

        let mut transaction = self.pool.begin().await?;
        sqlx::query("DELETE FROM auth_code_exchanges WHERE started_at < $1")
            .bind(expired_before)
            .execute(&mut *transaction)
            .await?;

        // A concurrent insert of the same code waits here until the other transaction
        // ends, and then inserts nothing.
        let inserted = sqlx::query(
            "INSERT INTO auth_code_exchanges (code_hash, app, user_id, started_at) \
             VALUES ($1, $2, $3, $4) ON CONFLICT (code_hash) DO NOTHING",
        )
        .bind(code_hash)
        .bind(&key.app)
        .bind(&key.user_id)
        .bind(now)
        .execute(&mut *transaction)
        .await?;
        let taken_over = if inserted.rows_affected() > 0 {
            true
        } else {
            sqlx::query(
                "UPDATE auth_code_exchanges SET started_at = $1 WHERE code_hash = $2 \
                 AND app = $3 AND user_id = $4 AND finished_at IS NULL AND started_at < $5",
            )
            .bind(now)
            .bind(code_hash)
            .bind(&key.app)
            .bind(&key.user_id)
            .bind(stale_before)
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
             WHERE code_hash = $1",
        )
        .bind(code_hash)
        .fetch_one(&mut *transaction)
        .await?;
        transaction.commit().await?;

        let finished_at: Option<DateTime<Utc>> = row.try_get("finished_at")?;
        Ok(CodeClaim::Existing(CodeExchange {
            key: TokenSetKey {
                app: row.try_get("app")?,
                user_id: row.try_get("user_id")?,
            },
            finished: finished_at.is_some(),
            started_at: row.try_get("started_at")?,
        }))
    }

    /// Marks the exchange of `code_hash` as finished.
    pub(super) async fn finish_code_record(
        &self,
        code_hash: &str,
        now: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        sqlx::query("UPDATE auth_code_exchanges SET finished_at = $1 WHERE code_hash = $2")
            .bind(now)
            .bind(code_hash)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Deletes the record of an unfinished exchange of `code_hash`.
    pub(super) async fn release_code_record(&self, code_hash: &str) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM auth_code_exchanges WHERE code_hash = $1 AND finished_at IS NULL")
            .bind(code_hash)
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}
