//! Tiki's generation-1 request signature, used by the GraphQL client and by the
//! emulator that checks it.
//!
//! The signed data is the operation's input object without `signature`. Its keys are
//! sorted recursively and it is written as compact JSON, that JSON is encoded as
//! URL-safe base64 without padding, and the signature is the lowercase hex of
//! HMAC-SHA256 over that text, keyed with the client secret.

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use hmac::{Hmac, KeyInit, Mac};
use serde_json::Value;
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Writes `value` as compact JSON with the keys of every object in sorted order.
///
/// Sorting here, instead of relying on `serde_json::Map` ordering, keeps the result
/// stable when another crate turns on serde_json's `preserve_order` feature.
pub fn canonical_json(value: &Value) -> String {
    let mut out = String::new();
    write_canonical(value, &mut out);
    out
}

fn write_canonical(value: &Value, out: &mut String) {
    match value {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push('{');
            for (index, key) in keys.into_iter().enumerate() {
                if index > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(key.clone()).to_string());
                out.push(':');
                write_canonical(&map[key], out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (index, item) in items.iter().enumerate() {
                if index > 0 {
                    out.push(',');
                }
                write_canonical(item, out);
            }
            out.push(']');
        }
        scalar => out.push_str(&scalar.to_string()),
    }
}

/// Returns the text that is signed: the canonical JSON of `signed`, as URL-safe
/// base64 without padding.
pub fn payload(signed: &Value) -> String {
    URL_SAFE_NO_PAD.encode(canonical_json(signed))
}

/// Signs the input object `signed` (without its `signature` field) with the client
/// secret and returns the signature as lowercase hex.
pub fn sign(client_secret: &[u8], signed: &Value) -> String {
    let mut mac = new_mac(client_secret);
    mac.update(payload(signed).as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

/// Checks a hex signature against `signed` in constant time.
pub fn verify(client_secret: &[u8], signed: &Value, signature_hex: &str) -> bool {
    let Ok(expected) = hex::decode(signature_hex) else {
        return false;
    };
    let mut mac = new_mac(client_secret);
    mac.update(payload(signed).as_bytes());
    mac.verify_slice(&expected).is_ok()
}

/// Builds the signed input object of an exchange (`token_field` = `code`) or a
/// refresh (`token_field` = `refresh_token`).
pub fn signed_input(token_field: &str, token: &str, client_id: &str, timestamp_ms: i64) -> Value {
    let mut map = serde_json::Map::new();
    map.insert(token_field.to_owned(), Value::String(token.to_owned()));
    map.insert("client_id".to_owned(), Value::String(client_id.to_owned()));
    map.insert("timestamp".to_owned(), Value::from(timestamp_ms));
    Value::Object(map)
}

fn new_mac(client_secret: &[u8]) -> HmacSha256 {
    // HMAC accepts keys of any length, so this cannot fail.
    <HmacSha256 as KeyInit>::new_from_slice(client_secret).expect("HMAC takes keys of any length")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    // Tiki's published known-answer values for the generation-1 scheme.
    const CLIENT_ID: &str = "RLCKb7Ae9kx4DXtXsCWjnDXtggFnM43W";
    const SECRET: &str = "EhjGcsUUuRSJTHiYPbW5fxzyaKEx0JuAZIKRQ4HnIfNFidB2kMg6locQbTIEz3Vf";
    const CODE: &str = "Y24CwtKFz7aPXv8wmghwZpnqHhpHaeA0THJ0qIY3BXjwm744zZ0JY6SkhRiNFVJT";
    const TIMESTAMP: i64 = 1620621619569;
    const PAYLOAD: &str = "eyJjbGllbnRfaWQiOiJSTENLYjdBZTlreDREWHRYc0NXam5EWHRnZ0ZuTTQzVyIsImNvZGUiOiJZMjRDd3RLRno3YVBYdjh3bWdod1pwbnFIaHBIYWVBMFRISjBxSVkzQlhqd203NDR6WjBKWTZTa2hSaU5GVkpUIiwidGltZXN0YW1wIjoxNjIwNjIxNjE5NTY5fQ";
    const SIGNATURE: &str = "a68fefe3075e24204949eafa78567261498f4f805a3ed9278396b593bed75576";

    #[test]
    fn known_answer_payload() {
        let signed = signed_input("code", CODE, CLIENT_ID, TIMESTAMP);
        assert_eq!(payload(&signed), PAYLOAD);
    }

    #[test]
    fn known_answer_signature() {
        let signed = signed_input("code", CODE, CLIENT_ID, TIMESTAMP);
        assert_eq!(sign(SECRET.as_bytes(), &signed), SIGNATURE);
        assert!(verify(SECRET.as_bytes(), &signed, SIGNATURE));
    }

    #[test]
    fn verify_rejects_other_values() {
        let signed = signed_input("code", CODE, CLIENT_ID, TIMESTAMP);
        assert!(!verify(b"another secret", &signed, SIGNATURE));
        assert!(!verify(SECRET.as_bytes(), &signed, "not hex"));
        let later = signed_input("code", CODE, CLIENT_ID, TIMESTAMP + 1);
        assert!(!verify(SECRET.as_bytes(), &later, SIGNATURE));
    }

    #[test]
    fn canonical_json_sorts_nested_keys() {
        let value = json!({"b": 1, "a": {"d": [2, {"z": 1, "y": "\"q\""}], "c": null}});
        assert_eq!(
            canonical_json(&value),
            r#"{"a":{"c":null,"d":[2,{"y":"\"q\"","z":1}]},"b":1}"#
        );
    }
}
