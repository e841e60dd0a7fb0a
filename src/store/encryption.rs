//! Encryption at rest of the token columns. Each access and refresh token is sealed with
//! AES-256-GCM under a fresh random 96-bit nonce. The associated data is the row's
//! identity (app and user id, length-prefixed) and the column name, so a ciphertext
//! copied to another row or column fails to decrypt. The `key_id` column names the key
//! that sealed a row's tokens, and NULL means the row contains plaintext.
//!
//! The backends seal on every write and open on every read. A keyring holds one key
//! that encrypts and any number of older keys that only decrypt, so keys can rotate
//! without a pause: rows keep working under the key that sealed them until
//! `tokend reencrypt` moves them to the first key.

use std::{
    fmt,
    fs::{self, File},
    io::Write as _,
    path::Path,
    sync::Arc,
};

use aes_gcm::{
    Aes256Gcm, Nonce,
    aead::{Aead, Generate, KeyInit, Payload},
};
use base64::{Engine as _, engine::general_purpose::STANDARD};
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use super::TokenSetKey;

/// Length of an AES-256 key in bytes.
pub const KEY_BYTES: usize = 32;

/// Length of an AES-GCM nonce in bytes (96 bits).
const NONCE_BYTES: usize = 12;

/// Length of an AES-GCM authentication tag in bytes.
const TAG_BYTES: usize = 16;

/// Hashed in front of a key to derive its id, so that the id is no hash of the bare key.
const KEY_ID_LABEL: &[u8] = b"tokend encryption key id v1";

/// Bytes of the SHA-256 digest that form a key id, shown as 16 hex digits.
const KEY_ID_BYTES: usize = 8;

/// Starts the associated data, so that it can change format later.
const AAD_LABEL: &[u8] = b"tokend token_sets v1";

/// A token column that is stored encrypted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenColumn {
    AccessToken,
    RefreshToken,
}

impl TokenColumn {
    pub fn as_str(self) -> &'static str {
        match self {
            TokenColumn::AccessToken => "access_token",
            TokenColumn::RefreshToken => "refresh_token",
        }
    }
}

/// One AES-256 key and its id. `Debug` and `Display` show only the id, and the key
/// schedule is zeroized on drop.
pub struct EncryptionKey {
    id: String,
    cipher: Aes256Gcm,
}

impl EncryptionKey {
    /// Builds a key from its 32 raw bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, KeyError> {
        let cipher = Aes256Gcm::new_from_slice(bytes).map_err(|_| KeyError::Length(bytes.len()))?;
        let digest = Sha256::new()
            .chain_update(KEY_ID_LABEL)
            .chain_update(bytes)
            .finalize();
        Ok(EncryptionKey {
            id: hex::encode(&digest[..KEY_ID_BYTES]),
            cipher,
        })
    }

    /// Builds a key from the standard base64 of its 32 bytes.
    pub fn from_base64(text: &str) -> Result<Self, KeyError> {
        let bytes = Zeroizing::new(STANDARD.decode(text.trim()).map_err(|_| KeyError::Base64)?);
        Self::from_bytes(&bytes)
    }

    /// Generates a random key and returns it with its base64 text.
    pub fn generate() -> (Self, SecretString) {
        let mut bytes = Zeroizing::new([0u8; KEY_BYTES]);
        rand::fill(&mut bytes[..]);
        let text = SecretString::from(STANDARD.encode(&bytes[..]));
        let key = Self::from_bytes(&bytes[..]).expect("a generated key has the right length");
        (key, text)
    }

    /// Returns the key's id: the first 8 bytes of SHA-256 over a fixed label and the key,
    /// in hex.
    pub fn id(&self) -> &str {
        &self.id
    }
}

impl fmt::Debug for EncryptionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EncryptionKey")
            .field("id", &self.id)
            .field("key", &"[redacted]")
            .finish()
    }
}

impl fmt::Display for EncryptionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "encryption key {}", self.id)
    }
}

/// A key that failed to parse. The messages never contain the key text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("is not valid standard base64")]
    Base64,
    #[error("decodes to {0} bytes, but a key is {KEY_BYTES} bytes")]
    Length(usize),
}

/// The configured keys: the first encrypts every write, and the others only decrypt rows
/// written before a rotation. Never empty.
#[derive(Debug)]
pub struct Keyring {
    keys: Vec<EncryptionKey>,
}

/// A keyring entry that failed to parse, with its 1-based position.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyringError {
    #[error("contains no key")]
    Empty,
    #[error("entry {position} {error}")]
    Key { position: usize, error: KeyError },
    #[error("entry {position} repeats the key with id {id}")]
    Duplicate { position: usize, id: String },
}

impl Keyring {
    /// Parses base64 keys separated by commas or line breaks; blank entries and lines
    /// starting with `#` are skipped.
    pub fn parse(text: &str) -> Result<Self, KeyringError> {
        let entries = text
            .split([',', '\n'])
            .map(str::trim)
            .filter(|entry| !entry.is_empty() && !entry.starts_with('#'));
        let mut keys: Vec<EncryptionKey> = Vec::new();
        for (index, entry) in entries.enumerate() {
            let position = index + 1;
            let key = EncryptionKey::from_base64(entry)
                .map_err(|error| KeyringError::Key { position, error })?;
            if keys.iter().any(|known| known.id == key.id) {
                return Err(KeyringError::Duplicate {
                    position,
                    id: key.id,
                });
            }
            keys.push(key);
        }
        Self::new(keys)
    }

    /// Builds a keyring whose first key encrypts.
    pub fn new(keys: Vec<EncryptionKey>) -> Result<Self, KeyringError> {
        if keys.is_empty() {
            return Err(KeyringError::Empty);
        }
        Ok(Keyring { keys })
    }

    /// Returns the key that encrypts every write.
    pub fn primary(&self) -> &EncryptionKey {
        &self.keys[0]
    }

    /// Returns the ids of every key, the encrypting one first.
    pub fn ids(&self) -> Vec<String> {
        self.keys.iter().map(|key| key.id.clone()).collect()
    }

    fn get(&self, id: &str) -> Option<&EncryptionKey> {
        self.keys.iter().find(|key| key.id == id)
    }
}

/// The reason a stored token could not be decrypted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecryptError {
    #[error(
        "no configured key has this id; add the key that encrypted it to \
         TOKEND_ENCRYPTION_KEY or TOKEND_ENCRYPTION_KEY_FILE after the first key"
    )]
    MissingKey,
    #[error("the stored value is not base64 of a nonce, ciphertext and tag")]
    Malformed,
    #[error("authentication failed: the value was altered, or copied from another row or column")]
    Authentication,
    #[error("the decrypted value is not UTF-8")]
    NotUtf8,
}

/// Seals and opens token columns, or passes them through when tokens are stored in
/// plaintext. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct TokenCipher {
    keyring: Option<Arc<Keyring>>,
}

impl TokenCipher {
    /// Encrypts with the keyring's first key.
    pub fn new(keyring: Arc<Keyring>) -> Self {
        TokenCipher {
            keyring: Some(keyring),
        }
    }

    /// Stores new tokens in plaintext; rows that carry a key id still fail to open.
    pub fn plaintext() -> Self {
        TokenCipher::default()
    }

    /// Returns the key id written with new tokens, or `None` in plaintext mode.
    pub fn key_id(&self) -> Option<&str> {
        self.keyring.as_ref().map(|keyring| keyring.primary().id())
    }

    /// Returns the ids of every key that can decrypt, the encrypting one first.
    pub fn known_key_ids(&self) -> Vec<String> {
        self.keyring.as_ref().map(|k| k.ids()).unwrap_or_default()
    }

    /// Returns what to store in `column` of the row `key` for `secret`: base64 of the
    /// nonce, ciphertext and tag, or the plaintext without a keyring.
    pub fn seal(&self, key: &TokenSetKey, column: TokenColumn, secret: &SecretString) -> String {
        let Some(keyring) = &self.keyring else {
            return secret.expose_secret().to_owned();
        };
        let nonce = Nonce::generate();
        let aad = associated_data(key, column);
        let payload = Payload {
            msg: secret.expose_secret().as_bytes(),
            aad: &aad,
        };
        // aes-gcm 0.11 rejects only messages longer than 2^36 - 32 bytes (its P_MAX).
        let ciphertext = keyring
            .primary()
            .cipher
            .encrypt(&nonce, payload)
            .expect("a token is far shorter than AES-GCM's message limit");
        let mut sealed = Vec::with_capacity(NONCE_BYTES + ciphertext.len());
        sealed.extend_from_slice(&nonce);
        sealed.extend_from_slice(&ciphertext);
        STANDARD.encode(sealed)
    }

    /// Opens the value stored in `column` of the row `key`, sealed under `key_id`, or
    /// returns it as it is when `key_id` is `None` (a plaintext row).
    pub fn open(
        &self,
        key: &TokenSetKey,
        column: TokenColumn,
        key_id: Option<&str>,
        stored: String,
    ) -> Result<SecretString, DecryptError> {
        let Some(key_id) = key_id else {
            return Ok(SecretString::from(stored));
        };
        let encryption_key = self
            .keyring
            .as_ref()
            .and_then(|keyring| keyring.get(key_id))
            .ok_or(DecryptError::MissingKey)?;
        let sealed = STANDARD
            .decode(stored.as_bytes())
            .map_err(|_| DecryptError::Malformed)?;
        if sealed.len() < NONCE_BYTES + TAG_BYTES {
            return Err(DecryptError::Malformed);
        }
        let (nonce, ciphertext) = sealed.split_at(NONCE_BYTES);
        let nonce = Nonce::try_from(nonce).map_err(|_| DecryptError::Malformed)?;
        let aad = associated_data(key, column);
        let payload = Payload {
            msg: ciphertext,
            aad: &aad,
        };
        let plaintext = Zeroizing::new(
            encryption_key
                .cipher
                .decrypt(&nonce, payload)
                .map_err(|_| DecryptError::Authentication)?,
        );
        let text = std::str::from_utf8(&plaintext).map_err(|_| DecryptError::NotUtf8)?;
        Ok(SecretString::from(text.to_owned()))
    }
}

/// Encodes the row's identity and the column unambiguously: a label, then the app, the
/// user id and the column name, each preceded by its length as 4 big-endian bytes.
fn associated_data(key: &TokenSetKey, column: TokenColumn) -> Vec<u8> {
    let parts = [
        key.app.as_bytes(),
        key.user_id.as_bytes(),
        column.as_str().as_bytes(),
    ];
    let mut aad = AAD_LABEL.to_vec();
    for part in parts {
        let length = u32::try_from(part.len()).unwrap_or(u32::MAX);
        aad.extend_from_slice(&length.to_be_bytes());
        aad.extend_from_slice(part);
    }
    aad
}

/// A key file that could not be read or created.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    #[error("reading the key file {path} failed: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the key file {path} {error}")]
    Parse { path: String, error: KeyringError },
    #[error("creating the key file {path} failed: {source}")]
    Create {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// Reads a key file: one base64 key per line, the first encrypts.
pub fn read_key_file(path: &Path) -> Result<Keyring, KeyFileError> {
    let text = Zeroizing::new(
        fs::read_to_string(path).map_err(|source| KeyFileError::Read {
            path: path.display().to_string(),
            source,
        })?,
    );
    Keyring::parse(&text).map_err(|error| KeyFileError::Parse {
        path: path.display().to_string(),
        error,
    })
}

/// Loads the key file at `path`, or creates it with one random key and mode 0600 when
/// it does not exist. Returns the keyring and whether the file was created.
pub fn load_or_create_key_file(path: &Path) -> Result<(Keyring, bool), KeyFileError> {
    match create_key_file(path) {
        Ok(keyring) => Ok((keyring, true)),
        Err(KeyFileError::Create { source, .. })
            if source.kind() == std::io::ErrorKind::AlreadyExists =>
        {
            read_key_file(path).map(|keyring| (keyring, false))
        }
        Err(error) => Err(error),
    }
}

fn create_key_file(path: &Path) -> Result<Keyring, KeyFileError> {
    let create_error = |source| KeyFileError::Create {
        path: path.display().to_string(),
        source,
    };
    let mut options = File::options();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(path).map_err(create_error)?;

    let (key, text) = EncryptionKey::generate();
    let written = writeln!(file, "{}", text.expose_secret()).and_then(|()| file.sync_all());
    if let Err(source) = written {
        // A half-written file would fail every later start, so remove it.
        let _ = fs::remove_file(path);
        return Err(create_error(source));
    }
    Keyring::new(vec![key]).map_err(|error| KeyFileError::Parse {
        path: path.display().to_string(),
        error,
    })
}

/// Returns whether the key file at `path` can be read by users other than its owner.
#[cfg(unix)]
pub fn key_file_is_shared(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    fs::metadata(path).is_ok_and(|metadata| metadata.permissions().mode() & 0o077 != 0)
}

#[cfg(not(unix))]
pub fn key_file_is_shared(_path: &Path) -> bool {
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cipher_with(keys: &[&str]) -> TokenCipher {
        let text = keys.join(",");
        TokenCipher::new(Arc::new(Keyring::parse(&text).unwrap()))
    }

    fn key_text(byte: u8) -> String {
        STANDARD.encode([byte; KEY_BYTES])
    }

    #[test]
    fn sealed_token_opens_in_its_row() {
        let cipher = cipher_with(&[&key_text(1)]);
        let key = TokenSetKey::new("alice");
        let secret = SecretString::from("access-token-value");
        let sealed = cipher.seal(&key, TokenColumn::AccessToken, &secret);
        assert!(!sealed.contains("access-token-value"));
        let opened = cipher
            .open(&key, TokenColumn::AccessToken, cipher.key_id(), sealed)
            .unwrap();
        assert_eq!(opened.expose_secret(), "access-token-value");
    }

    #[test]
    fn nonce_differs_per_seal() {
        let cipher = cipher_with(&[&key_text(1)]);
        let key = TokenSetKey::new("alice");
        let secret = SecretString::from("same");
        let first = cipher.seal(&key, TokenColumn::AccessToken, &secret);
        let second = cipher.seal(&key, TokenColumn::AccessToken, &secret);
        assert_ne!(first, second);
    }

    #[test]
    fn other_row_or_column_fails() {
        let cipher = cipher_with(&[&key_text(1)]);
        let alice = TokenSetKey::new("alice");
        let sealed = cipher.seal(
            &alice,
            TokenColumn::AccessToken,
            &SecretString::from("token"),
        );
        let id = cipher.key_id();
        let moved = cipher.open(
            &TokenSetKey::new("bob"),
            TokenColumn::AccessToken,
            id,
            sealed.clone(),
        );
        assert_eq!(moved.unwrap_err(), DecryptError::Authentication);
        let swapped = cipher.open(&alice, TokenColumn::RefreshToken, id, sealed);
        assert_eq!(swapped.unwrap_err(), DecryptError::Authentication);
    }

    #[test]
    fn length_prefix_separates_app_and_user() {
        let ab = TokenSetKey {
            app: "a".to_owned(),
            user_id: "bc".to_owned(),
        };
        let abc = TokenSetKey {
            app: "ab".to_owned(),
            user_id: "c".to_owned(),
        };
        assert_ne!(
            associated_data(&ab, TokenColumn::AccessToken),
            associated_data(&abc, TokenColumn::AccessToken)
        );
    }

    #[test]
    fn old_key_still_decrypts() {
        let old = cipher_with(&[&key_text(1)]);
        let key = TokenSetKey::new("alice");
        let sealed = old.seal(&key, TokenColumn::RefreshToken, &SecretString::from("r"));
        let rotated = cipher_with(&[&key_text(2), &key_text(1)]);
        assert_ne!(rotated.key_id(), old.key_id());
        let opened = rotated
            .open(
                &key,
                TokenColumn::RefreshToken,
                old.key_id(),
                sealed.clone(),
            )
            .unwrap();
        assert_eq!(opened.expose_secret(), "r");
        let without_old = cipher_with(&[&key_text(2)]);
        let error = without_old
            .open(&key, TokenColumn::RefreshToken, old.key_id(), sealed)
            .unwrap_err();
        assert_eq!(error, DecryptError::MissingKey);
    }

    #[test]
    fn plaintext_rows_pass_through() {
        let cipher = cipher_with(&[&key_text(1)]);
        let key = TokenSetKey::new("alice");
        let opened = cipher
            .open(&key, TokenColumn::AccessToken, None, "plain".to_owned())
            .unwrap();
        assert_eq!(opened.expose_secret(), "plain");
        let plaintext = TokenCipher::plaintext();
        assert_eq!(plaintext.key_id(), None);
        let stored = plaintext.seal(&key, TokenColumn::AccessToken, &SecretString::from("p"));
        assert_eq!(stored, "p");
    }

    #[test]
    fn malformed_values_are_reported() {
        let cipher = cipher_with(&[&key_text(1)]);
        let key = TokenSetKey::new("alice");
        let id = cipher.key_id();
        for stored in ["not base64!", "c2hvcnQ="] {
            let error = cipher
                .open(&key, TokenColumn::AccessToken, id, stored.to_owned())
                .unwrap_err();
            assert_eq!(error, DecryptError::Malformed, "{stored}");
        }
    }

    #[test]
    fn keyring_errors_hide_the_key() {
        let short = STANDARD.encode([7u8; 16]);
        let cases = [
            ("", KeyringError::Empty),
            (
                "%%%",
                KeyringError::Key {
                    position: 1,
                    error: KeyError::Base64,
                },
            ),
            (
                &*format!("{},{short}", key_text(1)),
                KeyringError::Key {
                    position: 2,
                    error: KeyError::Length(16),
                },
            ),
        ];
        for (text, expected) in cases {
            let error = Keyring::parse(text).unwrap_err();
            assert_eq!(error, expected, "{text:?}");
            assert!(!error.to_string().contains(&short), "{error}");
        }
        let repeated = format!("{0},{0}", key_text(1));
        assert!(matches!(
            Keyring::parse(&repeated).unwrap_err(),
            KeyringError::Duplicate { position: 2, .. }
        ));
    }

    #[test]
    fn key_file_lines_and_comments_parse() {
        let text = format!("# rotated in 2026\n{}\n\n{}\n", key_text(1), key_text(2));
        let keyring = Keyring::parse(&text).unwrap();
        assert_eq!(keyring.ids().len(), 2);
        assert_eq!(keyring.ids()[0].len(), 2 * KEY_ID_BYTES);
    }

    #[test]
    fn debug_and_display_redact_the_key() {
        let text = key_text(9);
        let keyring = Keyring::parse(&text).unwrap();
        let shown = format!("{keyring:?} {}", keyring.primary());
        assert!(!shown.contains(&text), "{shown}");
        assert!(shown.contains(keyring.primary().id()), "{shown}");
    }
}
