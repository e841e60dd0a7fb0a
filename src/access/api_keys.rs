//! The API keys file: one key per line with the role it grants, stored as a SHA-256
//! hash, and the constant-time lookup of a presented key.
//!
//! A line reads `ROLE KEY [NAME]`. `ROLE` is `reader` or `admin`. `KEY` is
//! `sha256:HEX`, the lowercase hex SHA-256 of the key, or the key itself (at least
//! [`MIN_PLAIN_KEY_BYTES`] bytes), which is hashed on load. `NAME` labels the caller in
//! logs. Blank lines and lines starting with `#` are ignored.

use std::{fmt, path::Path};

use base64::Engine as _;
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq as _;

use super::Role;

/// Shortest key accepted in plain form, in bytes.
pub const MIN_PLAIN_KEY_BYTES: usize = 16;

/// Prefix of a hashed key in the file.
const HASH_PREFIX: &str = "sha256:";

/// Prefix of generated keys, so that a leaked key is recognisable in a secret scan.
const GENERATED_KEY_PREFIX: &str = "tokend_";

/// The keys of an API keys file. Holds only hashes, so its `Debug` output is safe.
#[derive(Clone)]
pub struct ApiKeys {
    entries: Vec<Entry>,
    plain_lines: Vec<usize>,
}

#[derive(Clone)]
struct Entry {
    role: Role,
    hash: [u8; 32],
    name: String,
}

/// The caller a key identifies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub role: Role,
    /// The `NAME` column, or `line N` when the line has none.
    pub name: String,
}

/// An API keys file that cannot be used, with the line to fix.
#[derive(Debug, thiserror::Error)]
pub enum ApiKeysError {
    #[error("reading {path} failed: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} line {line}: {message}")]
    Line {
        path: String,
        line: usize,
        message: String,
    },
    #[error(
        "{path} contains no keys; add a line such as `reader sha256:HEX` from `tokend api-key`"
    )]
    Empty { path: String },
}

impl ApiKeys {
    /// Reads and parses the API keys file at `path`.
    pub fn load(path: &Path) -> Result<ApiKeys, ApiKeysError> {
        let text = std::fs::read_to_string(path).map_err(|source| ApiKeysError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&path.display().to_string(), &text)
    }

    /// Parses the text of an API keys file; `path` names it in errors.
    pub fn parse(path: &str, text: &str) -> Result<ApiKeys, ApiKeysError> {
        let mut keys = ApiKeys {
            entries: Vec::new(),
            plain_lines: Vec::new(),
        };
        for (index, line) in text.lines().enumerate() {
            let number = index + 1;
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let error = |message: String| ApiKeysError::Line {
                path: path.to_owned(),
                line: number,
                message,
            };
            let (entry, plain) = parse_line(line, number).map_err(error)?;
            if keys.entries.iter().any(|other| other.hash == entry.hash) {
                return Err(error("the key is listed twice; keep one line".to_owned()));
            }
            if plain {
                keys.plain_lines.push(number);
            }
            keys.entries.push(entry);
        }
        if keys.entries.is_empty() {
            return Err(ApiKeysError::Empty {
                path: path.to_owned(),
            });
        }
        Ok(keys)
    }

    /// Returns the caller whose key is `key`, or `None` for an unknown key. Every entry
    /// is compared in constant time, so the time taken does not depend on how much of a
    /// hash matched.
    pub fn find(&self, key: &str) -> Option<Caller> {
        let hash: [u8; 32] = Sha256::digest(key.as_bytes()).into();
        let mut found = None;
        for entry in &self.entries {
            if bool::from(entry.hash.ct_eq(&hash)) {
                found = Some(Caller {
                    role: entry.role,
                    name: entry.name.clone(),
                });
            }
        }
        found
    }

    /// Returns the numbers of the lines that hold a key in plain form.
    pub fn plain_lines(&self) -> &[usize] {
        &self.plain_lines
    }

    /// Returns the number of keys.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

impl fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiKeys")
            .field("keys", &self.entries.len())
            .finish_non_exhaustive()
    }
}

fn parse_line(line: &str, number: usize) -> Result<(Entry, bool), String> {
    let mut fields = line.split_whitespace();
    let role = fields.next().unwrap_or_default();
    let role =
        Role::parse(role).ok_or_else(|| format!("unknown role {role:?}; use reader or admin"))?;
    let key = fields
        .next()
        .ok_or("the key is missing; write `ROLE sha256:HEX [NAME]`")?;
    let name = fields
        .next()
        .map(str::to_owned)
        .unwrap_or_else(|| format!("line {number}"));
    if fields.next().is_some() {
        return Err(
            "too many fields; write `ROLE sha256:HEX [NAME]` with a NAME \
                    without spaces"
                .to_owned(),
        );
    }

    let (hash, plain) = match key.strip_prefix(HASH_PREFIX) {
        Some(hex_digest) => (parse_hash(hex_digest)?, false),
        None if key.len() < MIN_PLAIN_KEY_BYTES => {
            // The key itself stays out of the message, because it may be real.
            return Err(format!(
                "the key is {} bytes long; a plain key needs at least {MIN_PLAIN_KEY_BYTES} \
                 (generate one with `tokend api-key`)",
                key.len()
            ));
        }
        None => (Sha256::digest(key.as_bytes()).into(), true),
    };
    Ok((Entry { role, hash, name }, plain))
}

fn parse_hash(hex_digest: &str) -> Result<[u8; 32], String> {
    let mut hash = [0u8; 32];
    hex::decode_to_slice(hex_digest, &mut hash)
        .map_err(|_| "the part after sha256: must be 64 hex digits".to_owned())?;
    Ok(hash)
}

/// A newly generated key and the line that grants it `role` in the API keys file.
#[derive(Debug)]
pub struct GeneratedKey {
    /// The key the caller sends, 32 random bytes in URL-safe base64 after `tokend_`.
    pub key: secrecy::SecretString,
    /// `ROLE sha256:HEX [NAME]`, which holds only the key's hash.
    pub line: String,
}

/// Generates a random key for `role` and the line to add to the API keys file.
pub fn generate(role: Role, name: Option<&str>) -> GeneratedKey {
    let bytes: [u8; 32] = rand::random();
    let key = format!(
        "{GENERATED_KEY_PREFIX}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    );
    let hash = hex::encode(Sha256::digest(key.as_bytes()));
    let mut line = format!("{} {HASH_PREFIX}{hash}", role.as_str());
    if let Some(name) = name {
        line.push(' ');
        line.push_str(name);
    }
    GeneratedKey {
        key: key.into(),
        line,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret;

    fn hashed(key: &str) -> String {
        format!("sha256:{}", hex::encode(Sha256::digest(key.as_bytes())))
    }

    #[test]
    fn hashed_and_plain_keys_are_found() {
        let text = format!(
            "# callers\n\nreader {} billing\nadmin plain-admin-key-0123\n",
            hashed("reader-key-0123456789")
        );
        let keys = ApiKeys::parse("keys", &text).unwrap();
        assert_eq!(keys.len(), 2);
        assert_eq!(keys.plain_lines(), [4]);

        let reader = keys.find("reader-key-0123456789").unwrap();
        assert_eq!(reader.role, Role::Reader);
        assert_eq!(reader.name, "billing");
        let admin = keys.find("plain-admin-key-0123").unwrap();
        assert_eq!(admin.role, Role::Admin);
        assert_eq!(admin.name, "line 4");
        assert_eq!(keys.find("unknown-key-0123456789"), None);
        assert_eq!(keys.find(""), None);
    }

    #[test]
    fn bad_lines_name_the_line() {
        let cases = [
            ("owner sha256:00", 1, "unknown role"),
            ("reader", 1, "missing"),
            ("reader sha256:xyz", 1, "64 hex digits"),
            ("\nreader short", 2, "at least 16"),
            ("reader sha256:{h} a b", 1, "too many fields"),
            ("reader {p}\nadmin {p}", 2, "twice"),
        ];
        for (text, line, expected) in cases {
            let text = text
                .replace("{h}", &"ab".repeat(32))
                .replace("{p}", "the-same-plain-key-123");
            let error = ApiKeys::parse("keys.txt", &text).unwrap_err().to_string();
            assert!(error.contains(&format!("keys.txt line {line}")), "{error}");
            assert!(error.contains(expected), "{error}");
        }
    }

    #[test]
    fn errors_never_contain_the_key() {
        let error = ApiKeys::parse("keys", "reader hunter2")
            .unwrap_err()
            .to_string();
        assert!(!error.contains("hunter2"), "{error}");
        let error = ApiKeys::parse("keys", "reader hunter2-hunter2 a b")
            .unwrap_err()
            .to_string();
        assert!(!error.contains("hunter2"), "{error}");
    }

    #[test]
    fn empty_file_is_rejected() {
        let error = ApiKeys::parse("keys", "# nothing yet\n")
            .unwrap_err()
            .to_string();
        assert!(error.contains("no keys"), "{error}");
    }

    #[test]
    fn generated_key_matches_its_line() {
        let generated = generate(Role::Admin, Some("ops"));
        assert!(generated.line.starts_with("admin sha256:"));
        assert!(generated.line.ends_with(" ops"));
        assert!(!generated.line.contains(generated.key.expose_secret()));

        let keys = ApiKeys::parse("keys", &generated.line).unwrap();
        let caller = keys.find(generated.key.expose_secret()).unwrap();
        assert_eq!(caller.role, Role::Admin);
        assert_eq!(caller.name, "ops");
        assert_ne!(
            generate(Role::Admin, None).key.expose_secret(),
            generated.key.expose_secret()
        );
    }

    #[test]
    fn debug_shows_no_hash() {
        let keys = ApiKeys::parse("keys", &format!("reader {}", "k".repeat(20))).unwrap();
        let debug = format!("{keys:?}");
        assert_eq!(debug, "ApiKeys { keys: 1, .. }");
    }
}
