//! Request validation: every check names the field as the proto spells it, and no
//! message contains the value of a secret field.

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use chrono::{DateTime, Utc};
use secrecy::SecretString;
use serde::{Deserialize, Serialize};
use tonic::Status;

use crate::{
    proto,
    store::{TokenSetKey, TokenStatus},
    tokens::ImportedTokens,
};

/// Maximum user id length, in bytes.
pub const MAX_USER_ID_BYTES: usize = 256;

/// Maximum auth code length, in bytes. Tiki's codes are under 100 bytes.
pub const MAX_AUTH_CODE_BYTES: usize = 2048;

/// Maximum access or refresh token length, in bytes. Tiki's tokens are under 100 bytes.
pub const MAX_TOKEN_BYTES: usize = 4096;

/// Maximum number of scopes in an import.
pub const MAX_SCOPES: usize = 64;
/// Maximum length of one imported scope, in bytes.
pub const MAX_SCOPE_BYTES: usize = 256;

/// Maximum time until an imported access token expires: 366 days, in seconds. Tiki's
/// access tokens last an hour.
pub const MAX_IMPORT_EXPIRES_IN: i64 = 366 * 24 * 3600;

/// Page size of ListTokenSets when the request gives none.
pub const DEFAULT_PAGE_SIZE: u32 = 100;
/// Maximum page size that ListTokenSets accepts.
pub const MAX_PAGE_SIZE: u32 = 1000;

/// Maximum page token length, in bytes; the tokens tokend issues are far shorter.
const MAX_PAGE_TOKEN_BYTES: usize = 2048;

pub fn user_key(user_id: &str) -> Result<TokenSetKey, Status> {
    check_text("user_id", user_id, MAX_USER_ID_BYTES)?;
    Ok(TokenSetKey::new(user_id))
}

pub fn auth_code(code: String) -> Result<SecretString, Status> {
    check_text("auth_code", &code, MAX_AUTH_CODE_BYTES)?;
    Ok(SecretString::from(code))
}

/// Checks that a text field is not empty, not longer than `max_bytes` and free of
/// control characters. The message gives the length, never the value.
fn check_text(field: &str, value: &str, max_bytes: usize) -> Result<(), Status> {
    if value.is_empty() {
        return Err(Status::invalid_argument(format!("{field} is empty")));
    }
    if value.len() > max_bytes {
        return Err(Status::invalid_argument(format!(
            "{field} is {} bytes long; the maximum is {max_bytes}",
            value.len()
        )));
    }
    if value.chars().any(char::is_control) {
        return Err(Status::invalid_argument(format!(
            "{field} contains control characters"
        )));
    }
    Ok(())
}

/// Checks a token, which also must not contain whitespace, because it is sent in an
/// `Authorization` header.
fn token(field: &str, value: String) -> Result<SecretString, Status> {
    check_text(field, &value, MAX_TOKEN_BYTES)?;
    if value.chars().any(char::is_whitespace) {
        return Err(Status::invalid_argument(format!(
            "{field} contains whitespace"
        )));
    }
    Ok(SecretString::from(value))
}

/// Validates an import request into the user's key and the tokens to store.
pub fn import(
    request: proto::ImportTokenSetRequest,
    now: DateTime<Utc>,
) -> Result<(TokenSetKey, ImportedTokens), Status> {
    let key = user_key(&request.user_id)?;
    let access_token = token("access_token", request.access_token)?;
    let refresh_token = if request.refresh_token.is_empty() {
        None
    } else {
        Some(token("refresh_token", request.refresh_token)?)
    };
    let scopes = scopes(request.scopes)?;
    let expires_in = expires_in(request.expiry, now)?;
    if expires_in == 0 && refresh_token.is_none() {
        return Err(Status::invalid_argument(
            "the access token has expired and refresh_token is empty, so tokend could neither \
             serve nor refresh it; import a valid access token or a refresh token",
        ));
    }
    let imported = ImportedTokens {
        access_token,
        refresh_token,
        scopes,
        expires_in,
    };
    Ok((key, imported))
}

fn scopes(scopes: Vec<String>) -> Result<Vec<String>, Status> {
    if scopes.len() > MAX_SCOPES {
        return Err(Status::invalid_argument(format!(
            "scopes has {} entries; the maximum is {MAX_SCOPES}",
            scopes.len()
        )));
    }
    for (index, scope) in scopes.iter().enumerate() {
        let field = format!("scopes[{index}]");
        check_text(&field, scope, MAX_SCOPE_BYTES)?;
        // The store keeps scopes as one space-separated string.
        if scope.chars().any(char::is_whitespace) {
            return Err(Status::invalid_argument(format!(
                "{field} contains whitespace"
            )));
        }
    }
    Ok(scopes)
}

/// Returns the seconds until an imported access token expires, zero when it expired.
fn expires_in(
    expiry: Option<proto::import_token_set_request::Expiry>,
    now: DateTime<Utc>,
) -> Result<u64, Status> {
    use proto::import_token_set_request::Expiry;

    let seconds = match expiry {
        None => {
            return Err(Status::invalid_argument(
                "expires_at and expires_in are both unset; set one of them",
            ));
        }
        Some(Expiry::ExpiresIn(seconds)) => {
            if seconds < 0 {
                return Err(Status::invalid_argument(format!(
                    "expires_in is {seconds}; it must be 0 or more"
                )));
            }
            seconds
        }
        Some(Expiry::ExpiresAt(timestamp)) => {
            let at = u32::try_from(timestamp.nanos)
                .ok()
                .and_then(|nanos| DateTime::from_timestamp(timestamp.seconds, nanos))
                .ok_or_else(|| {
                    Status::invalid_argument(format!(
                        "expires_at ({} s, {} ns) is not a valid timestamp",
                        timestamp.seconds, timestamp.nanos
                    ))
                })?;
            (at - now).num_seconds().max(0)
        }
    };
    if seconds > MAX_IMPORT_EXPIRES_IN {
        return Err(Status::invalid_argument(format!(
            "the access token expires {seconds} seconds from now, according to expires_at or \
             expires_in; the maximum is {MAX_IMPORT_EXPIRES_IN}"
        )));
    }
    Ok(u64::try_from(seconds).unwrap_or(0))
}

/// A validated ListTokenSets request.
#[derive(Debug)]
pub struct ListQuery {
    pub statuses: Vec<TokenStatus>,
    pub after: Option<TokenSetKey>,
    pub page_size: u32,
}

/// The position a page token carries, with the filter it is valid for.
#[derive(Debug, Serialize, Deserialize)]
struct PageToken {
    app: String,
    user_id: String,
    statuses: Vec<String>,
}

pub fn list_query(request: &proto::ListTokenSetsRequest) -> Result<ListQuery, Status> {
    let page_size = match request.page_size {
        0 => DEFAULT_PAGE_SIZE,
        size if size < 0 || size.unsigned_abs() > MAX_PAGE_SIZE => {
            return Err(Status::invalid_argument(format!(
                "page_size is {size}; it must be between 0 (for {DEFAULT_PAGE_SIZE}) and \
                 {MAX_PAGE_SIZE}"
            )));
        }
        size => size.unsigned_abs(),
    };
    let statuses = statuses(&request.statuses)?;
    let after = if request.page_token.is_empty() {
        None
    } else {
        Some(decode_page_token(&request.page_token, &statuses)?)
    };
    Ok(ListQuery {
        statuses,
        after,
        page_size,
    })
}

/// Converts the status filter, sorted and without repeats.
fn statuses(values: &[i32]) -> Result<Vec<TokenStatus>, Status> {
    let mut statuses = Vec::new();
    for (index, value) in values.iter().enumerate() {
        let status = match proto::TokenStatus::try_from(*value) {
            Ok(proto::TokenStatus::Active) => TokenStatus::Active,
            Ok(proto::TokenStatus::RefreshFailing) => TokenStatus::RefreshFailing,
            Ok(proto::TokenStatus::ReauthRequired) => TokenStatus::ReauthRequired,
            Ok(proto::TokenStatus::Unspecified) | Err(_) => {
                return Err(Status::invalid_argument(format!(
                    "statuses[{index}] is {value}, which is not a status to filter by; use \
                     TOKEN_STATUS_ACTIVE (1), TOKEN_STATUS_REFRESH_FAILING (2) or \
                     TOKEN_STATUS_REAUTH_REQUIRED (3)"
                )));
            }
        };
        if !statuses.contains(&status) {
            statuses.push(status);
        }
    }
    statuses.sort_by_key(|status| status.as_str());
    Ok(statuses)
}

/// Encodes the position after `key` for the next page of a listing with `statuses`.
pub fn encode_page_token(key: &TokenSetKey, statuses: &[TokenStatus]) -> String {
    let token = PageToken {
        app: key.app.clone(),
        user_id: key.user_id.clone(),
        statuses: statuses
            .iter()
            .map(|status| status.as_str().to_owned())
            .collect(),
    };
    // Serialising strings to JSON cannot fail.
    let json = serde_json::to_vec(&token).unwrap_or_default();
    URL_SAFE_NO_PAD.encode(json)
}

fn decode_page_token(text: &str, statuses: &[TokenStatus]) -> Result<TokenSetKey, Status> {
    let invalid = || {
        Status::invalid_argument(
            "page_token is invalid; pass the next_page_token of the previous response \
             unchanged, or leave it empty for the first page",
        )
    };
    if text.len() > MAX_PAGE_TOKEN_BYTES {
        return Err(invalid());
    }
    let json = URL_SAFE_NO_PAD.decode(text).map_err(|_| invalid())?;
    let token: PageToken = serde_json::from_slice(&json).map_err(|_| invalid())?;
    let expected: Vec<&str> = statuses.iter().map(|status| status.as_str()).collect();
    if token.statuses != expected {
        return Err(Status::invalid_argument(
            "page_token belongs to a listing with a different statuses filter; repeat the \
             filter of the first page, or leave page_token empty to start again",
        ));
    }
    check_text("page_token", &token.user_id, MAX_USER_ID_BYTES).map_err(|_| invalid())?;
    check_text("page_token", &token.app, MAX_USER_ID_BYTES).map_err(|_| invalid())?;
    Ok(TokenSetKey {
        app: token.app,
        user_id: token.user_id,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    #[test]
    fn user_id_is_validated() {
        let cases = [
            ("", "empty"),
            ("a\nb", "control"),
            ("tab\there", "control"),
            ("\u{7f}", "control"),
        ];
        for (user_id, expected) in cases {
            let status = user_key(user_id).unwrap_err();
            assert_eq!(status.code(), Code::InvalidArgument);
            assert!(status.message().contains("user_id"), "{user_id:?}");
            assert!(status.message().contains(expected), "{user_id:?}");
        }
        let long = "x".repeat(MAX_USER_ID_BYTES + 1);
        assert_eq!(user_key(&long).unwrap_err().code(), Code::InvalidArgument);
        assert!(user_key(&"é".repeat(128)).is_ok());
        assert!(user_key(&"é".repeat(129)).is_err());
    }

    #[test]
    fn auth_code_is_validated() {
        assert_eq!(
            auth_code(String::new()).unwrap_err().code(),
            Code::InvalidArgument
        );
        let long = "c".repeat(MAX_AUTH_CODE_BYTES + 1);
        let status = auth_code(long).unwrap_err();
        assert!(status.message().contains("auth_code"));
        assert!(auth_code("CDKJfdkj4528KJ.eCZa27znIuM8JGC".to_owned()).is_ok());
    }

    #[test]
    fn page_token_round_trips() {
        let key = TokenSetKey::new("alice");
        let statuses = [TokenStatus::Active];
        let text = encode_page_token(&key, &statuses);
        assert_eq!(decode_page_token(&text, &statuses).unwrap(), key);
        let status = decode_page_token(&text, &[]).unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(status.message().contains("statuses"));
    }

    #[test]
    fn past_expiry_counts_as_expired() {
        use proto::import_token_set_request::Expiry;
        let now = DateTime::from_timestamp(1_800_000_000, 0).unwrap();
        let past = Expiry::ExpiresAt(prost_types::Timestamp {
            seconds: now.timestamp() - 10,
            nanos: 0,
        });
        assert_eq!(expires_in(Some(past), now).unwrap(), 0);
        let soon = Expiry::ExpiresAt(prost_types::Timestamp {
            seconds: now.timestamp() + 100,
            nanos: 0,
        });
        assert_eq!(expires_in(Some(soon), now).unwrap(), 100);
    }
}
