//! `tokend reencrypt`: moves every token set that is not under the first encryption key
//! (plaintext rows included) to that key, in batches. On PostgreSQL it runs beside the
//! daemon, because each write is conditional on the row's version and key id, so a row
//! that a refresh changed meanwhile is left as the daemon wrote it. On SQLite the daemon
//! must be stopped, because it locks the database file.

use std::path::Path;

use anyhow::Context as _;

use crate::{
    server::token_cipher,
    settings::Settings,
    store::{self, StoreError, TokenSetKey},
};

/// Totals of a re-encryption run.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ReencryptSummary {
    pub scanned: u64,
    pub reencrypted: u64,
    pub changed_meanwhile: u64,
    pub failed: u64,
}

/// Re-encrypts every row not under the first key with the storage settings from
/// `config` and the environment, printing progress after each batch of `batch_size`
/// rows.
pub async fn run(config: Option<&Path>, batch_size: u32) -> anyhow::Result<ReencryptSummary> {
    let storage = Settings::load_storage(config)?;
    let cipher = token_cipher(&storage.database_url, &storage.encryption)?;
    let key_id = cipher
        .key_id()
        .map(str::to_owned)
        .context("no encryption key is configured, so there is nothing to re-encrypt to; set TOKEND_ENCRYPTION_KEY")?;
    let store = match store::connect(&storage.database_url, cipher).await {
        Ok(store) => store,
        Err(error @ StoreError::Lock { .. }) => {
            return Err(error).context(
                "re-encrypting a SQLite database needs the daemon stopped; stop tokend and run \
                 `tokend reencrypt` again",
            );
        }
        Err(error) => return Err(error.into()),
    };
    println!("re-encrypting token sets to key id {key_id}");

    let mut summary = ReencryptSummary::default();
    let mut after: Option<TokenSetKey> = None;
    let outcome = loop {
        let batch = match store.reencrypt_batch(after.as_ref(), batch_size).await {
            Ok(batch) => batch,
            Err(error) => break Err(error),
        };
        for error in &batch.failed {
            eprintln!("error: {error}");
        }
        summary.scanned += batch.scanned;
        summary.reencrypted += batch.reencrypted;
        summary.changed_meanwhile += batch.changed_meanwhile;
        summary.failed += batch.failed.len() as u64;
        let Some(last) = batch.last else {
            break Ok(());
        };
        println!(
            "progress: {} scanned, {} re-encrypted, {} changed meanwhile, {} failed",
            summary.scanned, summary.reencrypted, summary.changed_meanwhile, summary.failed
        );
        after = Some(last);
    };
    store.close().await;
    outcome
        .context("re-encryption stopped; rows written so far stay re-encrypted, so run it again")?;

    println!(
        "done: {} token sets re-encrypted to key id {key_id}, {} changed by the daemon meanwhile \
         (already under its first key), {} could not be decrypted",
        summary.reencrypted, summary.changed_meanwhile, summary.failed
    );
    Ok(summary)
}
