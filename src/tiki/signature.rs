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
    use proptest::prelude::any;
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

    /// A signed input: the token field, the token, the client id and the timestamp.
    type Input = (&'static str, String, String, i64);

    fn any_input() -> impl proptest::strategy::Strategy<Value = Input> {
        use proptest::prelude::*;
        (
            prop_oneof![Just("code"), Just("refresh_token")],
            any::<String>(),
            any::<String>(),
            any::<i64>(),
        )
    }

    fn signed(input: &Input) -> Value {
        signed_input(input.0, &input.1, &input.2, input.3)
    }

    proptest::proptest! {
        #[test]
        fn signature_is_deterministic(input in any_input(), secret in ".{1,64}") {
            let first = sign(secret.as_bytes(), &signed(&input));
            let second = sign(secret.as_bytes(), &signed(&input));
            proptest::prop_assert_eq!(&first, &second);
            proptest::prop_assert_eq!(first.len(), 64);
            proptest::prop_assert!(verify(secret.as_bytes(), &signed(&input), &first));
        }

        #[test]
        fn canonical_input_decodes_to_its_fields(input in any_input()) {
            let value = signed(&input);
            let decoded = URL_SAFE_NO_PAD.decode(payload(&value)).unwrap();
            let parsed: Value = serde_json::from_slice(&decoded).unwrap();
            proptest::prop_assert_eq!(&parsed, &value);
            proptest::prop_assert_eq!(parsed[input.0].as_str(), Some(input.1.as_str()));
            proptest::prop_assert_eq!(parsed["client_id"].as_str(), Some(input.2.as_str()));
            proptest::prop_assert_eq!(parsed["timestamp"].as_i64(), Some(input.3));
        }

        #[test]
        fn distinct_inputs_have_distinct_payloads(first in any_input(), second in any_input()) {
            proptest::prop_assume!(first != second);
            proptest::prop_assert_ne!(payload(&signed(&first)), payload(&signed(&second)));
        }

        #[test]
        fn shifted_text_changes_the_payload(
            token in any::<String>(),
            client_id in any::<String>(),
            cut in 0usize..8,
            timestamp in any::<i64>(),
        ) {
            // Moving characters between the token and the client id must change the
            // signed text, or one signature would cover two requests.
            let joined = format!("{token}{client_id}");
            let chars: Vec<char> = joined.chars().collect();
            let cut = cut.min(chars.len());
            let moved_token: String = chars[..cut].iter().collect();
            let moved_client: String = chars[cut..].iter().collect();
            proptest::prop_assume!(moved_token != token);
            let original = payload(&signed_input("code", &token, &client_id, timestamp));
            let moved = payload(&signed_input("code", &moved_token, &moved_client, timestamp));
            proptest::prop_assert_ne!(original, moved);
        }
    }
}
