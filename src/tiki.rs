//! The calls tokend makes to Tiki's platform API: exchange an auth code for a token set and
//! refresh a token set. The refresher and the gRPC service use [`TokenApi`]; each
//! protocol generation implements it in its own file.

pub mod gate;
pub mod graphql;
pub mod signature;

use std::time::Duration;

use async_trait::async_trait;
use secrecy::SecretString;

/// A token set as Tiki returns it from an exchange or a refresh.
#[derive(Debug)]
pub struct Grant {
    pub access_token: SecretString,
    /// Missing when the user did not grant the `offline` scope, or when a refresh
    /// response keeps the current refresh token.
    pub refresh_token: Option<SecretString>,
    /// Seconds the access token is valid, counted from when the request was sent.
    pub expires_in: u64,
    pub scopes: Vec<String>,
}

/// The effect a failed call to Tiki has on the user's token set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureClass {
    /// The code or refresh token is invalid, expired or revoked: the user must consent
    /// again.
    GrantRejected,
    /// Tiki rejected tokend's own client id, signature or timestamp: an operator must
    /// fix the settings, and no user is to blame.
    CredentialsRejected,
    /// The call may succeed later: connection error, 5xx, 429, an error of unknown
    /// meaning, or a request tokend did not send because of its own request caps.
    Transient,
    /// The request was sent but no readable response arrived (a timeout, a lost
    /// connection, an unreadable HTTP 2xx body), so Tiki may have rotated the refresh
    /// token.
    OutcomeUnknown,
}

/// A failed call to Tiki. Messages never contain a token, code, signature or secret.
#[derive(Debug, thiserror::Error)]
pub enum TikiError {
    #[error("Tiki rejected the grant: {0}")]
    GrantRejected(String),
    #[error("Tiki rejected the client credentials: {0}")]
    CredentialsRejected(String),
    #[error("Tiki could not be reached: {0}")]
    Unreachable(String),
    #[error("Tiki is rate limiting requests (HTTP 429)")]
    RateLimited {
        /// The wait Tiki requested in a `Retry-After` header.
        retry_after: Option<Duration>,
    },
    #[error("Tiki request failed: {message}")]
    Transient {
        message: String,
        /// The wait Tiki requested in a `Retry-After` header.
        retry_after: Option<Duration>,
    },
    /// Tiki returned GraphQL errors whose code and message match no known class.
    #[error("Tiki returned errors tokend does not recognise: {0}")]
    Unrecognized(String),
    #[error("no readable answer from Tiki after the request was sent: {0}")]
    OutcomeUnknown(String),
    /// tokend did not send the request, because of a `Retry-After` pause or because its
    /// request caps left no room in time.
    #[error("the request was not sent to Tiki: {0}")]
    NotSent(String),
}

impl TikiError {
    pub fn class(&self) -> FailureClass {
        match self {
            TikiError::GrantRejected(_) => FailureClass::GrantRejected,
            TikiError::CredentialsRejected(_) => FailureClass::CredentialsRejected,
            TikiError::Unreachable(_)
            | TikiError::RateLimited { .. }
            | TikiError::Transient { .. }
            | TikiError::Unrecognized(_)
            | TikiError::NotSent(_) => FailureClass::Transient,
            TikiError::OutcomeUnknown(_) => FailureClass::OutcomeUnknown,
        }
    }

    /// Whether Tiki may have processed the request. It cannot have when no connection
    /// was made, when tokend did not send it, or when Tiki returned 429.
    pub fn reached_tiki(&self) -> bool {
        !matches!(
            self,
            TikiError::Unreachable(_) | TikiError::RateLimited { .. } | TikiError::NotSent(_)
        )
    }

    /// Returns the wait Tiki requested before the next request, if any.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            TikiError::RateLimited { retry_after } | TikiError::Transient { retry_after, .. } => {
                *retry_after
            }
            _ => None,
        }
    }

    pub(crate) fn transient(message: impl Into<String>) -> Self {
        TikiError::Transient {
            message: message.into(),
            retry_after: None,
        }
    }
}

/// Tiki's token endpoints, as one generation of the platform API offers them.
#[async_trait]
pub trait TokenApi: Send + Sync + 'static {
    /// Exchanges a single-use auth code for a token set.
    async fn exchange(&self, auth_code: &SecretString) -> Result<Grant, TikiError>;

    /// Refreshes a token set. Tiki rotates the refresh token, so the one passed in stops
    /// working once this succeeds.
    async fn refresh(&self, refresh_token: &SecretString) -> Result<Grant, TikiError>;
}
