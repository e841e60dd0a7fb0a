//! Re-encryption of PostgreSQL rows for `tokend reencrypt`, beside running replicas:
//! each write is conditional on the row's version and key id.

use sqlx::Row;

use super::PostgresStore;
use crate::store::{ReencryptBatch, StoreError, TokenSetKey, encryption::TokenColumn, open_tokens};

impl PostgresStore {
    /// Re-encrypts up to `limit` rows after `after` that are not under the first key; see
    /// [`crate::store::TokenStore::reencrypt_batch`].
    pub(super) async fn reencrypt_rows(
        &self,
        after: Option<&TokenSetKey>,
        limit: u32,
    ) -> Result<ReencryptBatch, StoreError> {
        let primary = self.cipher.key_id().ok_or(StoreError::NoEncryptionKey)?;
        // No row has an empty user id, so ('', '') sorts before every row.
        let (after_app, after_user) = after
            .map(|key| (key.app.as_str(), key.user_id.as_str()))
            .unwrap_or(("", ""));
        let rows = sqlx::query(
            "SELECT app, user_id, version, key_id, access_token, refresh_token FROM token_sets \
             WHERE key_id IS DISTINCT FROM $1 AND (app, user_id) > ($2, $3) \
             ORDER BY app, user_id LIMIT $4",
        )
        .bind(primary)
        .bind(after_app)
        .bind(after_user)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;

        let mut batch = ReencryptBatch::default();
        for row in &rows {
            let key = TokenSetKey {
                app: row.try_get("app")?,
                user_id: row.try_get("user_id")?,
            };
            let version: i64 = row.try_get("version")?;
            let key_id: Option<String> = row.try_get("key_id")?;
            batch.scanned += 1;
            batch.last = Some(key.clone());
            let (access_token, refresh_token) = match open_tokens(
                &self.cipher,
                &key,
                key_id.as_deref(),
                row.try_get("access_token")?,
                row.try_get("refresh_token")?,
            ) {
                Ok(tokens) => tokens,
                Err(error) => {
                    batch.failed.push(error);
                    continue;
                }
            };
            let access_token = self
                .cipher
                .seal(&key, TokenColumn::AccessToken, &access_token);
            let refresh_token = refresh_token
                .map(|token| self.cipher.seal(&key, TokenColumn::RefreshToken, &token));

            // A refresh or exchange since the read raised the version and wrote with the
            // daemon's first key, so its row must not be overwritten.
            let result = sqlx::query(
                "UPDATE token_sets SET access_token = $1, refresh_token = $2, key_id = $3 \
                 WHERE app = $4 AND user_id = $5 AND version = $6 \
                 AND key_id IS NOT DISTINCT FROM $7",
            )
            .bind(access_token)
            .bind(refresh_token)
            .bind(primary)
            .bind(&key.app)
            .bind(&key.user_id)
            .bind(version)
            .bind(key_id)
            .execute(&self.pool)
            .await?;
            if result.rows_affected() > 0 {
                batch.reencrypted += 1;
            } else {
                batch.changed_meanwhile += 1;
            }
        }
        Ok(batch)
    }
}
