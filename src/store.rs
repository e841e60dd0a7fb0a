//! Token sets as tokend stores them, and the storage trait the rest of the daemon uses.
//! SQL lives in the backend files below this module and nowhere else.

pub mod postgres;
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
    /// The stored refresh token was sent once and no response arrived.
    pub outcome_unknown: bool,
    /// Increases with every write that changes tokens or state, but not with claims.
    pub version: i64,
    /// The replica refreshing this token set, while its claim lasts.
    pub claimed_by: Option<String>,
    pub claim_until: Option<DateTime<Utc>>,
    /// Fences the writes of the current claim.
    pub claim_token: Option<i64>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl TokenSet {
    /// Time left before the access token expires, as of `now`; zero once expired.
    pub fn remaining(&self, now: DateTime<Utc>) -> chrono::Duration {
        (self.expires_at - now).max(chrono::Duration::zero())
    }

    /// Time for which the stored access token can be served, as of `now`: zero once it
    /// expired, and zero while the last refresh's outcome is unknown, because Tiki may
    /// already have revoked the token.
    pub fn servable_for(&self, now: DateTime<Utc>) -> chrono::Duration {
        if self.outcome_unknown {
            chrono::Duration::zero()
        } else {
            self.remaining(now)
        }
    }

    /// Returns whether a replica has an unexpired claim on this token set at `now`.
    pub fn is_claimed(&self, now: DateTime<Utc>) -> bool {
        self.claim_until.is_some_and(|until| until > now)
    }
}

/// A claim to take: which replica, until when, and the token that fences its writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    pub owner: String,
    pub token: i64,
    pub until: DateTime<Utc>,
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

/// Counts and extremes of the token table, for metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoreSummary {
    pub active: u64,
    pub refresh_failing: u64,
    pub reauth_required: u64,
    /// The earliest `expires_at` among token sets that are not `reauth_required`.
    pub earliest_expiry: Option<DateTime<Utc>>,
    /// The earliest `next_refresh_at`, whether due or not.
    pub earliest_next_refresh: Option<DateTime<Utc>>,
}

/// A change another replica made to a token set, as the store reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreEvent {
    /// The token set was claimed, written or deleted; its version is now `version`.
    Changed { key: TokenSetKey, version: i64 },
    /// Events may have been missed, for example while the connection was down.
    Resync,
}

/// A failed storage operation.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "opening the database {url} failed; check database_url (TOKEND_DATABASE_URL): {source}"
    )]
    Open {
        url: String,
        #[source]
        source: sqlx::Error,
    },
    #[error("locking {path} failed: {reason}")]
    Lock { path: String, reason: String },
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

/// Storage for token sets.
///
/// A refresh happens under a claim. Claiming is one atomic statement that succeeds only
/// while no other unexpired claim exists, and the writes that end a refresh take the
/// claim's token and change nothing unless that claim still holds, so a replica whose
/// lease ran out can never overwrite newer tokens. Those writes return `None` then.
///
/// Every write that ends a refresh also ends its claim, so a claim whose lease ran out
/// was abandoned: its replica stopped or lost the database, perhaps after Tiki rotated
/// the refresh token. Taking such a claim over therefore sets `outcome_unknown`.
#[async_trait]
pub trait TokenStore: Send + Sync + 'static {
    async fn get(&self, key: &TokenSetKey) -> Result<Option<TokenSet>, StoreError>;

    /// Stores the tokens of a new grant, replacing any token set the user had and
    /// cancelling any claim on it.
    async fn store_exchanged(
        &self,
        key: &TokenSetKey,
        tokens: &NewTokens<'_>,
        writer: &str,
        now: DateTime<Utc>,
    ) -> Result<TokenSet, StoreError>;

    /// Stores the tokens of a grant obtained elsewhere unless the user already has a
    /// token set, and returns `None` then.
    async fn store_new(
        &self,
        key: &TokenSetKey,
        tokens: &NewTokens<'_>,
        writer: &str,
        now: DateTime<Utc>,
    ) -> Result<Option<TokenSet>, StoreError>;

    /// Returns up to `limit` token sets ordered by app and then user id, starting after
    /// `after`, with one of `statuses`, or with any status when `statuses` is empty.
    async fn list(
        &self,
        after: Option<&TokenSetKey>,
        statuses: &[TokenStatus],
        limit: u32,
    ) -> Result<Vec<TokenSet>, StoreError>;

    /// Claims up to `limit` token sets whose next refresh is due at `now` and that
    /// are not claimed, most overdue first.
    async fn claim_due(
        &self,
        claim: &Claim,
        now: DateTime<Utc>,
        limit: u32,
    ) -> Result<Vec<TokenSet>, StoreError>;

    /// Claims one token set, due or not, unless another unexpired claim exists.
    async fn claim(
        &self,
        key: &TokenSetKey,
        claim: &Claim,
        now: DateTime<Utc>,
    ) -> Result<Option<TokenSet>, StoreError>;

    /// Stores refreshed tokens and ends the claim, if the claim still holds.
    async fn store_refreshed(
        &self,
        key: &TokenSetKey,
        claim_token: i64,
        tokens: &NewTokens<'_>,
        writer: &str,
        now: DateTime<Utc>,
    ) -> Result<Option<TokenSet>, StoreError>;

    /// Stores the outcome of a failed refresh and ends the claim, if the claim still
    /// holds.
    async fn store_failure(
        &self,
        key: &TokenSetKey,
        claim_token: i64,
        failure: &FailureRecord,
        writer: &str,
        now: DateTime<Utc>,
    ) -> Result<Option<TokenSet>, StoreError>;

    /// Ends a claim without other changes and reports whether it still held.
    async fn release(&self, key: &TokenSetKey, claim_token: i64) -> Result<bool, StoreError>;

    /// Deletes a token set and reports whether it existed.
    async fn delete(&self, key: &TokenSetKey) -> Result<bool, StoreError>;

    /// Checks that the database responds and that the token table exists, which it does
    /// once the migrations ran.
    async fn ping(&self) -> Result<(), StoreError>;

    /// Counts token sets by status and finds the earliest expiry and scheduled refresh.
    /// Reads the whole table, so call it every few seconds at most.
    async fn summary(&self) -> Result<StoreSummary, StoreError>;

    /// Starts reporting changes that other replicas make. Backends that serve a single
    /// process return `None`.
    fn subscribe(&self, own_writer: &str) -> Option<tokio::sync::mpsc::Receiver<StoreEvent>> {
        let _ = own_writer;
        None
    }

    /// Closes the connections, waiting for queries in progress.
    async fn close(&self);
}

/// Returns the three values a status filter binds to `status IN (?, ?, ?)`: each
/// requested status once, and `NULL`, which matches nothing, in the unused places.
fn status_filter(statuses: &[TokenStatus]) -> [Option<&'static str>; 3] {
    let all = [
        TokenStatus::Active,
        TokenStatus::RefreshFailing,
        TokenStatus::ReauthRequired,
    ];
    all.map(|status| (statuses.is_empty() || statuses.contains(&status)).then(|| status.as_str()))
}

/// Formats a time the way the store writes it: RFC 3339, milliseconds, `Z`.
pub fn format_time(time: DateTime<Utc>) -> String {
    time.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// Opens the backend that `url` names (`sqlite:` or `postgres:`/`postgresql:`) and
/// applies its migrations.
pub async fn connect(url: &str) -> Result<std::sync::Arc<dyn TokenStore>, StoreError> {
    if url.starts_with("postgres:") || url.starts_with("postgresql:") {
        Ok(std::sync::Arc::new(
            postgres::PostgresStore::connect(url).await?,
        ))
    } else {
        Ok(std::sync::Arc::new(
            sqlite::SqliteStore::connect(url).await?,
        ))
    }
}

/// Returns `url` with any password replaced, for logs and errors.
pub fn redact_url(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(mut parsed) if parsed.password().is_some() => {
            let _ = parsed.set_password(Some("REDACTED"));
            parsed.to_string()
        }
        _ => url.to_owned(),
    }
}

/// Connects to the database at `url` without migrating or locking it, and describes
/// what was found. A SQLite file that does not exist yet is fine: the daemon creates it.
pub async fn probe(url: &str) -> Result<String, StoreError> {
    let open_error = |source| StoreError::Open {
        url: redact_url(url),
        source,
    };
    if url.starts_with("postgres:") || url.starts_with("postgresql:") {
        let pool = sqlx::PgPool::connect(url).await.map_err(open_error)?;
        let version: String = sqlx::query_scalar("SHOW server_version")
            .fetch_one(&pool)
            .await?;
        pool.close().await;
        return Ok(format!("reachable, PostgreSQL {version}"));
    }

    let options = <sqlx::sqlite::SqliteConnectOptions as std::str::FromStr>::from_str(url)
        .map_err(open_error)?;
    let path = options.get_filename().to_owned();
    if !path.exists() {
        let parent = path.parent().filter(|dir| !dir.as_os_str().is_empty());
        return match parent {
            Some(dir) if !dir.is_dir() => Err(StoreError::Open {
                url: redact_url(url),
                source: sqlx::Error::Configuration(
                    format!("the directory {} does not exist", dir.display()).into(),
                ),
            }),
            _ => Ok(format!(
                "{} does not exist yet; the daemon creates it",
                path.display()
            )),
        };
    }
    let pool = sqlx::SqlitePool::connect_with(options.read_only(true))
        .await
        .map_err(open_error)?;
    let tables: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'token_sets'",
    )
    .fetch_one(&pool)
    .await?;
    pool.close().await;
    Ok(match tables {
        0 => format!("{} opens; the daemon creates its table", path.display()),
        _ => format!("{} opens and holds the token_sets table", path.display()),
    })
}
