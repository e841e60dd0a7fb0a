//! Token sets as tokend stores them, and the storage trait the rest of the daemon uses.
//! SQL lives in the backend files below this module and nowhere else.

pub mod sqlite;

use std::fmt;

use async_trait::async_trait;
use chrono::{DateTime, SecondsFormat, Utc};
use secrecy::SecretString;

/// The Tini App a token set belongs to until several apps can share one daemon.
pub const DEFAULT_APP: &str = "default";

/// Identifies one user's token set.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TokenSetKey {
    pub app: String,
    pub user_id: String,
}

impl TokenSetKey {
    pub fn new(user_id: impl Into<String>) -> Self {
        TokenSetKey {
            app: DEFAULT_APP.to_owned(),
            user_id: user_id.into(),
        }
    }
}

impl fmt::Display for TokenSetKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.app, self.user_id)
    }
}

/// The lifecycle state of a token set, stored as its snake_case name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenStatus {
    Active,
    RefreshFailing,
    ReauthRequired,
}

impl TokenStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            TokenStatus::Active => "active",
            TokenStatus::RefreshFailing => "refresh_failing",
            TokenStatus::ReauthRequired => "reauth_required",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "active" => Some(TokenStatus::Active),
            "refresh_failing" => Some(TokenStatus::RefreshFailing),
            "reauth_required" => Some(TokenStatus::ReauthRequired),
            _ => None,
        }
    }
}

/// One user's token set as stored. `Debug` shows no token because `SecretString`
/// redacts itself.
#[derive(Debug, Clone)]
pub struct TokenSet {
    pub key: TokenSetKey,
    pub status: TokenStatus,
    pub access_token: SecretString,
    /// Missing when the user did not grant the `offline` scope.
    pub refresh_token: Option<SecretString>,
    pub scopes: Vec<String>,
    /// Seconds of validity Tiki granted the current access token.
    pub lifetime_seconds: u64,
    pub expires_at: DateTime<Utc>,
    /// When the scheduler refreshes next; `None` when it never will.
    pub next_refresh_at: Option<DateTime<Utc>>,
    pub refreshed_at: Option<DateTime<Utc>>,
    /// Failed refresh attempts since the last success.
    pub failure_count: u32,
    pub last_error: Option<String>,
    /// The stored refresh token was sent once and no answer arrived.
    pub outcome_unknown: bool,
    /// Increases with every write.
    pub version: i64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl TokenSet {
    /// Time left before the access token expires, as of `now`; zero once expired.
    pub fn remaining(&self, now: DateTime<Utc>) -> chrono::Duration {
        (self.expires_at - now).max(chrono::Duration::zero())
    }
}

/// Tokens to store after a successful exchange or refresh.
#[derive(Debug)]
pub struct NewTokens<'a> {
    pub access_token: &'a SecretString,
    /// `None` after a refresh keeps the stored refresh token.
    pub refresh_token: Option<&'a SecretString>,
    pub scopes: &'a [String],
    pub lifetime_seconds: u64,
    pub expires_at: DateTime<Utc>,
    pub next_refresh_at: Option<DateTime<Utc>>,
}

/// The state to store after a failed refresh.
#[derive(Debug, Clone, PartialEq)]
pub struct FailureRecord {
    pub status: TokenStatus,
    pub failure_count: u32,
    pub last_error: Option<String>,
    pub next_refresh_at: Option<DateTime<Utc>>,
    pub outcome_unknown: bool,
}

/// A failed storage operation.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("opening the database {url} failed: {source}")]
    Open {
        url: String,
        #[source]
        source: sqlx::Error,
    },
    #[error("migrating the database failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("database query failed: {0}")]
    Query(#[from] sqlx::Error),
    #[error("stored token set {key} has an invalid {column}: {detail}")]
    InvalidRow {
        key: TokenSetKey,
        column: &'static str,
        detail: String,
    },
}

/// Storage for token sets. Writes that take an expected version change nothing and
/// return `None` when the row has moved on or is gone.
#[async_trait]
pub trait TokenStore: Send + Sync + 'static {
    async fn get(&self, key: &TokenSetKey) -> Result<Option<TokenSet>, StoreError>;

    /// Stores the tokens of a new grant, replacing any token set the user had.
    async fn store_exchanged(
        &self,
        key: &TokenSetKey,
        tokens: &NewTokens<'_>,
        now: DateTime<Utc>,
    ) -> Result<TokenSet, StoreError>;

    /// Stores refreshed tokens if the row is still at `version`.
    async fn store_refreshed(
        &self,
        key: &TokenSetKey,
        version: i64,
        tokens: &NewTokens<'_>,
        now: DateTime<Utc>,
    ) -> Result<Option<TokenSet>, StoreError>;

    /// Stores the outcome of a failed refresh if the row is still at `version`.
    async fn store_failure(
        &self,
        key: &TokenSetKey,
        version: i64,
        failure: &FailureRecord,
        now: DateTime<Utc>,
    ) -> Result<Option<TokenSet>, StoreError>;

    /// Deletes a token set and reports whether it existed.
    async fn delete(&self, key: &TokenSetKey) -> Result<bool, StoreError>;

    /// Lists up to `limit` token sets whose next refresh is due at `now`, most
    /// overdue first.
    async fn due(&self, now: DateTime<Utc>, limit: u32) -> Result<Vec<TokenSetKey>, StoreError>;
}

/// Formats a time the way the store writes it: RFC 3339, milliseconds, `Z`.
pub fn format_time(time: DateTime<Utc>) -> String {
    time.to_rfc3339_opts(SecondsFormat::Millis, true)
}
