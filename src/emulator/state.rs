//! Auth codes and token families of the emulator, with ORY Hydra's rotation and reuse
//! rules. Pure logic: every operation takes the current time as `now`.
//!
//! Invariants:
//! - An auth code is used at most once. Presenting it again revokes the family it created.
//! - A family has exactly one current access token and at most one current refresh
//!   token. A rotating refresh replaces both and revokes the previous access token.
//! - Presenting a refresh token that was rotated out revokes the whole family, the
//!   newest tokens included. A revoked family never becomes valid again.
//!
//! Records are never removed, so a long-running emulator grows by one small record per
//! code, family and issued token.

use std::collections::HashMap;
use std::fmt;
use std::time::{Duration, SystemTime};

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};

/// Random bytes in each half of a token: 32 bytes are 43 base64url characters.
const TOKEN_HALF_BYTES: usize = 32;

/// Creates a token shaped like Hydra's, `<43 base64url>.<43 base64url>`, from the
/// thread-local CSPRNG.
pub(super) fn new_token() -> String {
    let mut key = [0u8; TOKEN_HALF_BYTES];
    let mut signature = [0u8; TOKEN_HALF_BYTES];
    rand::fill(&mut key);
    rand::fill(&mut signature);
    format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(key),
        URL_SAFE_NO_PAD.encode(signature)
    )
}

/// Lifetimes and options that apply to the tokens one operation issues.
#[derive(Debug, Clone, Copy)]
pub(super) struct IssuePolicy {
    pub access_lifetime: Duration,
    pub refresh_lifetime: Duration,
    /// When false, a refresh keeps the current refresh token and issues only a new
    /// access token.
    pub rotate_refresh_token: bool,
}

/// The reason a code or refresh token was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum GrantError {
    CodeUnknown,
    CodeExpired,
    /// The code was already exchanged; the family it created is now revoked.
    CodeReused,
    TokenUnknown,
    TokenExpired,
    /// The family was revoked before this refresh token was presented.
    TokenRevoked,
    /// The refresh token was already rotated out; its family is now revoked.
    TokenReused,
}

impl GrantError {
    /// Returns whether this rejection is a reuse detection.
    pub fn is_reuse(self) -> bool {
        matches!(self, GrantError::CodeReused | GrantError::TokenReused)
    }
}

/// The tokens one exchange or refresh issued.
pub(super) struct Issued {
    pub access_token: String,
    /// `None` when the scopes lack `offline`, or when a refresh kept the current one.
    pub refresh_token: Option<String>,
    pub scopes: Vec<String>,
    pub customer_id: String,
    /// Whether the access token this operation replaced had already expired.
    pub replaced_expired_access_token: bool,
}

impl fmt::Debug for Issued {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Issued")
            .field(
                "refresh_token",
                &self.refresh_token.as_ref().map(|_| "[redacted]"),
            )
            .field("scopes", &self.scopes)
            .field("customer_id", &self.customer_id)
            .field(
                "replaced_expired_access_token",
                &self.replaced_expired_access_token,
            )
            .finish_non_exhaustive()
    }
}

/// The customer and scopes behind a valid access token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct AccessGrant {
    pub customer_id: String,
    pub scopes: Vec<String>,
}

struct AuthCode {
    customer_id: String,
    scopes: Vec<String>,
    expires_at: SystemTime,
    /// The family this code created, once it was exchanged.
    family: Option<usize>,
}

struct Family {
    customer_id: String,
    scopes: Vec<String>,
    access_token: String,
    access_expires_at: SystemTime,
    refresh_token: Option<String>,
    revoked: bool,
}

struct RefreshRecord {
    family: usize,
    expires_at: SystemTime,
    rotated_out: bool,
}

/// All codes, families and tokens the emulator has issued.
#[derive(Default)]
pub(super) struct Grants {
    codes: HashMap<String, AuthCode>,
    families: Vec<Family>,
    refresh_tokens: HashMap<String, RefreshRecord>,
    access_tokens: HashMap<String, usize>,
}

impl Grants {
    /// Issues a single-use auth code that expires `lifetime` after `now`.
    pub fn issue_code(
        &mut self,
        customer_id: &str,
        scopes: Vec<String>,
        now: SystemTime,
        lifetime: Duration,
    ) -> String {
        let code = new_token();
        let record = AuthCode {
            customer_id: customer_id.to_owned(),
            scopes,
            expires_at: now + lifetime,
            family: None,
        };
        self.codes.insert(code.clone(), record);
        code
    }

    /// Exchanges an auth code for a new token family.
    pub fn exchange(
        &mut self,
        code: &str,
        now: SystemTime,
        policy: IssuePolicy,
    ) -> Result<Issued, GrantError> {
        let Some(record) = self.codes.get(code) else {
            return Err(GrantError::CodeUnknown);
        };
        if let Some(family) = record.family {
            self.families[family].revoked = true;
            return Err(GrantError::CodeReused);
        }
        if now >= record.expires_at {
            return Err(GrantError::CodeExpired);
        }

        let customer_id = record.customer_id.clone();
        let scopes = record.scopes.clone();
        let family = self.families.len();
        self.families.push(Family {
            customer_id,
            scopes,
            access_token: String::new(),
            access_expires_at: now,
            refresh_token: None,
            revoked: false,
        });
        if let Some(record) = self.codes.get_mut(code) {
            record.family = Some(family);
        }

        let access_token = self.issue_access_token(family, now, policy);
        let refresh_token = if self.families[family].scopes.iter().any(|s| s == "offline") {
            Some(self.issue_refresh_token(family, now, policy))
        } else {
            None
        };
        Ok(self.issued(family, access_token, refresh_token, false))
    }

    /// Refreshes the family of `refresh_token`, rotating the refresh token unless
    /// `policy.rotate_refresh_token` is false. The previous access token stops working at once.
    pub fn refresh(
        &mut self,
        refresh_token: &str,
        now: SystemTime,
        policy: IssuePolicy,
    ) -> Result<Issued, GrantError> {
        let Some(record) = self.refresh_tokens.get(refresh_token) else {
            return Err(GrantError::TokenUnknown);
        };
        let family = record.family;
        if record.rotated_out {
            self.families[family].revoked = true;
            return Err(GrantError::TokenReused);
        }
        if self.families[family].revoked {
            return Err(GrantError::TokenRevoked);
        }
        if now >= record.expires_at {
            return Err(GrantError::TokenExpired);
        }

        let replaced_expired = now >= self.families[family].access_expires_at;
        let access_token = self.issue_access_token(family, now, policy);
        let new_refresh_token = if policy.rotate_refresh_token {
            if let Some(record) = self.refresh_tokens.get_mut(refresh_token) {
                record.rotated_out = true;
            }
            Some(self.issue_refresh_token(family, now, policy))
        } else {
            None
        };
        Ok(self.issued(family, access_token, new_refresh_token, replaced_expired))
    }

    /// Returns the grant behind `access_token` if it is the current access token of a
    /// live family and has not expired.
    pub fn check_access_token(&self, access_token: &str, now: SystemTime) -> Option<AccessGrant> {
        let family = &self.families[*self.access_tokens.get(access_token)?];
        let current = family.access_token == access_token;
        if family.revoked || !current || now >= family.access_expires_at {
            return None;
        }
        Some(AccessGrant {
            customer_id: family.customer_id.clone(),
            scopes: family.scopes.clone(),
        })
    }

    /// Returns every access and refresh token issued so far, current or not.
    pub fn issued_tokens(&self) -> Vec<String> {
        self.access_tokens
            .keys()
            .chain(self.refresh_tokens.keys())
            .cloned()
            .collect()
    }

    /// Returns the customer whose auth code or refresh token `token` is, if any.
    pub fn customer_of(&self, token: &str) -> Option<&str> {
        if let Some(record) = self.refresh_tokens.get(token) {
            return Some(&self.families[record.family].customer_id);
        }
        self.codes.get(token).map(|code| code.customer_id.as_str())
    }

    /// Returns every auth code, access token and refresh token ever issued.
    pub fn all_secrets(&self) -> Vec<String> {
        let codes = self.codes.keys();
        let refresh_tokens = self.refresh_tokens.keys();
        let access_tokens = self.access_tokens.keys();
        codes
            .chain(refresh_tokens)
            .chain(access_tokens)
            .cloned()
            .collect()
    }

    /// Revokes every family of `customer_id` and returns how many were live.
    pub fn revoke_customer(&mut self, customer_id: &str) -> usize {
        let mut revoked = 0;
        for family in &mut self.families {
            if family.customer_id == customer_id && !family.revoked {
                family.revoked = true;
                revoked += 1;
            }
        }
        revoked
    }

    fn issue_access_token(
        &mut self,
        family: usize,
        now: SystemTime,
        policy: IssuePolicy,
    ) -> String {
        let token = new_token();
        let record = &mut self.families[family];
        record.access_token = token.clone();
        record.access_expires_at = now + policy.access_lifetime;
        self.access_tokens.insert(token.clone(), family);
        token
    }

    fn issue_refresh_token(
        &mut self,
        family: usize,
        now: SystemTime,
        policy: IssuePolicy,
    ) -> String {
        let token = new_token();
        self.families[family].refresh_token = Some(token.clone());
        let record = RefreshRecord {
            family,
            expires_at: now + policy.refresh_lifetime,
            rotated_out: false,
        };
        self.refresh_tokens.insert(token.clone(), record);
        token
    }

    fn issued(
        &self,
        family: usize,
        access_token: String,
        refresh_token: Option<String>,
        replaced_expired_access_token: bool,
    ) -> Issued {
        let record = &self.families[family];
        Issued {
            access_token,
            refresh_token,
            scopes: record.scopes.clone(),
            customer_id: record.customer_id.clone(),
            replaced_expired_access_token,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: Duration = Duration::from_secs(3600);

    fn policy() -> IssuePolicy {
        IssuePolicy {
            access_lifetime: HOUR,
            refresh_lifetime: 24 * HOUR,
            rotate_refresh_token: true,
        }
    }

    fn start() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000)
    }

    fn scopes(list: &[&str]) -> Vec<String> {
        list.iter().map(|scope| (*scope).to_owned()).collect()
    }

    /// Issues a code with `offline user_profile` and exchanges it at `start()`.
    fn exchanged(grants: &mut Grants) -> Issued {
        let code = grants.issue_code("c1", scopes(&["offline", "user_profile"]), start(), HOUR);
        grants.exchange(&code, start(), policy()).unwrap()
    }

    #[test]
    fn tokens_have_hydra_shape() {
        let token = new_token();
        let (key, signature) = token.split_once('.').unwrap();
        for half in [key, signature] {
            assert_eq!(half.len(), 43);
            assert!(
                half.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            );
        }
        assert_ne!(new_token(), token);
    }

    #[test]
    fn exchange_issues_family() {
        let mut grants = Grants::default();
        let issued = exchanged(&mut grants);
        assert!(issued.refresh_token.is_some());
        assert_eq!(issued.scopes, ["offline", "user_profile"]);
        assert_eq!(issued.customer_id, "c1");
        let grant = grants.check_access_token(&issued.access_token, start());
        assert_eq!(grant.unwrap().customer_id, "c1");
    }

    #[test]
    fn exchange_without_offline_has_no_refresh_token() {
        let mut grants = Grants::default();
        let code = grants.issue_code("c1", scopes(&["user_profile"]), start(), HOUR);
        let issued = grants.exchange(&code, start(), policy()).unwrap();
        assert!(issued.refresh_token.is_none());
    }

    #[test]
    fn unknown_code_is_rejected() {
        let mut grants = Grants::default();
        let error = grants.exchange("nope", start(), policy()).unwrap_err();
        assert_eq!(error, GrantError::CodeUnknown);
    }

    #[test]
    fn expired_code_is_rejected() {
        let mut grants = Grants::default();
        let code = grants.issue_code("c1", scopes(&["offline"]), start(), HOUR);
        let error = grants
            .exchange(&code, start() + HOUR, policy())
            .unwrap_err();
        assert_eq!(error, GrantError::CodeExpired);
        assert!(grants.exchange(&code, start(), policy()).is_ok());
    }

    #[test]
    fn reused_code_revokes_family() {
        let mut grants = Grants::default();
        let code = grants.issue_code("c1", scopes(&["offline"]), start(), HOUR);
        let issued = grants.exchange(&code, start(), policy()).unwrap();
        let error = grants.exchange(&code, start(), policy()).unwrap_err();
        assert_eq!(error, GrantError::CodeReused);
        assert!(error.is_reuse());
        assert!(
            grants
                .check_access_token(&issued.access_token, start())
                .is_none()
        );
        let refresh_token = issued.refresh_token.unwrap();
        let error = grants
            .refresh(&refresh_token, start(), policy())
            .unwrap_err();
        assert_eq!(error, GrantError::TokenRevoked);
    }

    #[test]
    fn refresh_rotates_both_tokens() {
        let mut grants = Grants::default();
        let first = exchanged(&mut grants);
        let old_refresh = first.refresh_token.unwrap();
        let second = grants.refresh(&old_refresh, start(), policy()).unwrap();
        let new_refresh = second.refresh_token.unwrap();
        assert_ne!(new_refresh, old_refresh);
        assert_ne!(second.access_token, first.access_token);
        assert!(!second.replaced_expired_access_token);
        assert!(
            grants
                .check_access_token(&first.access_token, start())
                .is_none()
        );
        assert!(
            grants
                .check_access_token(&second.access_token, start())
                .is_some()
        );
        assert!(grants.refresh(&new_refresh, start(), policy()).is_ok());
    }

    #[test]
    fn rotated_out_token_revokes_family() {
        let mut grants = Grants::default();
        let first = exchanged(&mut grants);
        let old_refresh = first.refresh_token.unwrap();
        let second = grants.refresh(&old_refresh, start(), policy()).unwrap();

        let error = grants.refresh(&old_refresh, start(), policy()).unwrap_err();
        assert_eq!(error, GrantError::TokenReused);
        assert!(error.is_reuse());
        assert!(
            grants
                .check_access_token(&second.access_token, start())
                .is_none()
        );
        let newest = second.refresh_token.unwrap();
        let error = grants.refresh(&newest, start(), policy()).unwrap_err();
        assert_eq!(error, GrantError::TokenRevoked);
        let again = grants.refresh(&old_refresh, start(), policy()).unwrap_err();
        assert_eq!(again, GrantError::TokenReused);
    }

    #[test]
    fn refresh_without_rotation_keeps_token() {
        let mut grants = Grants::default();
        let first = exchanged(&mut grants);
        let refresh_token = first.refresh_token.unwrap();
        let keep = IssuePolicy {
            rotate_refresh_token: false,
            ..policy()
        };
        let second = grants.refresh(&refresh_token, start(), keep).unwrap();
        assert!(second.refresh_token.is_none());
        assert!(
            grants
                .check_access_token(&first.access_token, start())
                .is_none()
        );
        let third = grants.refresh(&refresh_token, start(), policy()).unwrap();
        assert!(third.refresh_token.is_some());
    }

    #[test]
    fn expired_refresh_token_is_rejected() {
        let mut grants = Grants::default();
        let refresh_token = exchanged(&mut grants).refresh_token.unwrap();
        let late = start() + 24 * HOUR;
        let error = grants.refresh(&refresh_token, late, policy()).unwrap_err();
        assert_eq!(error, GrantError::TokenExpired);
        assert!(!error.is_reuse());
    }

    #[test]
    fn unknown_refresh_token_is_rejected() {
        let mut grants = Grants::default();
        let error = grants.refresh("nope", start(), policy()).unwrap_err();
        assert_eq!(error, GrantError::TokenUnknown);
    }

    #[test]
    fn rotated_token_gets_fresh_lifetime() {
        let mut grants = Grants::default();
        let first = exchanged(&mut grants).refresh_token.unwrap();
        let later = start() + 20 * HOUR;
        let second = grants.refresh(&first, later, policy()).unwrap();
        let newest = second.refresh_token.unwrap();
        assert!(grants.refresh(&newest, later + 20 * HOUR, policy()).is_ok());
    }

    #[test]
    fn access_token_expires() {
        let mut grants = Grants::default();
        let issued = exchanged(&mut grants);
        let almost = start() + HOUR - Duration::from_millis(1);
        assert!(
            grants
                .check_access_token(&issued.access_token, almost)
                .is_some()
        );
        let expired = start() + HOUR;
        assert!(
            grants
                .check_access_token(&issued.access_token, expired)
                .is_none()
        );
    }

    #[test]
    fn refresh_reports_expired_access_token() {
        let mut grants = Grants::default();
        let refresh_token = exchanged(&mut grants).refresh_token.unwrap();
        let late = start() + 2 * HOUR;
        let issued = grants.refresh(&refresh_token, late, policy()).unwrap();
        assert!(issued.replaced_expired_access_token);
    }

    #[test]
    fn revoke_customer_revokes_only_theirs() {
        let mut grants = Grants::default();
        let mine = exchanged(&mut grants);
        let code = grants.issue_code("c2", scopes(&["offline"]), start(), HOUR);
        let theirs = grants.exchange(&code, start(), policy()).unwrap();

        assert_eq!(grants.revoke_customer("c1"), 1);
        assert_eq!(grants.revoke_customer("c1"), 0);
        assert!(
            grants
                .check_access_token(&mine.access_token, start())
                .is_none()
        );
        assert!(
            grants
                .check_access_token(&theirs.access_token, start())
                .is_some()
        );
        let refresh_token = mine.refresh_token.unwrap();
        let error = grants
            .refresh(&refresh_token, start(), policy())
            .unwrap_err();
        assert_eq!(error, GrantError::TokenRevoked);
    }

    #[test]
    fn issued_debug_hides_tokens() {
        let mut grants = Grants::default();
        let issued = exchanged(&mut grants);
        let text = format!("{issued:?}");
        assert!(!text.contains(&issued.access_token));
        assert!(!text.contains(issued.refresh_token.as_deref().unwrap()));
    }
}
