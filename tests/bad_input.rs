//! Bad input on every RPC, on both backends: each is rejected with INVALID_ARGUMENT
//! naming the field (or OUT_OF_RANGE for a message over 1 MiB), reaches neither Tiki nor
//! the store, and never echoes a secret.

mod support;

use prost::bytes::{Buf, BufMut};
use support::{Backend, Options, TestEnv};
use tokend::{
    grpc::{MAX_REQUEST_BYTES, MAX_TOKEN_BYTES},
    proto::{self, import_token_set_request::Expiry},
};
use tonic::{
    Code, Status,
    codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder},
    transport::Channel,
};

/// Marks secret values, so that a check can tell whether an error echoed one.
const SECRET_MARK: &str = "SECRETMARK";

/// User ids that every RPC must reject, with the reason its message names.
fn bad_user_ids() -> Vec<(String, &'static str)> {
    vec![
        (String::new(), "empty"),
        ("x".repeat(10 * 1024), "maximum"),
        ("a\u{0}b".to_owned(), "control"),
        ("line\nbreak".to_owned(), "control"),
        ("\u{1b}[31mred".to_owned(), "control"),
        ("bell\u{7}".to_owned(), "control"),
        ("c1\u{85}control".to_owned(), "control"),
    ]
}

#[track_caller]
fn assert_invalid(result: Result<impl Sized, Status>, field: &str, case: &str) -> String {
    let Err(status) = result else {
        panic!("{case}: the request was accepted");
    };
    assert!(
        !status.message().contains(SECRET_MARK),
        "{case}: the message echoes a secret"
    );
    assert_eq!(status.code(), Code::InvalidArgument, "{case}: {status:?}");
    assert!(
        status.message().contains(field),
        "{case}: the message does not name {field}: {}",
        status.message()
    );
    status.message().to_owned()
}

/// Asserts that nothing reached Tiki or the store.
async fn assert_untouched(env: &mut TestEnv) {
    let stats = env.emulator.stats();
    assert_eq!(stats.exchange_requests, 0);
    assert_eq!(stats.refresh_requests, 0);
    let listed = env
        .client
        .list_token_sets(proto::ListTokenSetsRequest::default())
        .await
        .unwrap()
        .into_inner();
    let user_ids: Vec<&str> = listed
        .token_sets
        .iter()
        .map(|set| set.user_id.as_str())
        .collect();
    assert!(
        user_ids.iter().all(|user_id| *user_id == "alice"),
        "unexpected token sets {user_ids:?}"
    );
}

fn import(user_id: &str) -> proto::ImportTokenSetRequest {
    proto::ImportTokenSetRequest {
        user_id: user_id.to_owned(),
        access_token: format!("{SECRET_MARK}-access"),
        refresh_token: format!("{SECRET_MARK}-refresh"),
        expiry: Some(Expiry::ExpiresIn(3600)),
        scopes: vec!["offline".to_owned()],
        replace_existing: false,
    }
}

async fn user_ids_rejected_everywhere(backend: Backend) {
    let mut env = TestEnv::start_on(&backend, Options::default()).await;
    let client = &mut env.client;
    for (user_id, reason) in bad_user_ids() {
        let case = format!(
            "user_id {:?} ({reason})",
            user_id.chars().take(12).collect::<String>()
        );
        let exchange = client
            .exchange_auth_code(proto::ExchangeAuthCodeRequest {
                user_id: user_id.clone(),
                auth_code: "code".to_owned(),
            })
            .await;
        assert_invalid(exchange, "user_id", &case);
        let get = client
            .get_access_token(proto::GetAccessTokenRequest {
                user_id: user_id.clone(),
                min_valid_seconds: 0,
            })
            .await;
        let message = assert_invalid(get, "user_id", &case);
        assert!(message.contains(reason), "{case}: {message}");
        let info = client
            .get_token_set(proto::GetTokenSetRequest {
                user_id: user_id.clone(),
            })
            .await;
        assert_invalid(info, "user_id", &case);
        let delete = client
            .delete_token_set(proto::DeleteTokenSetRequest {
                user_id: user_id.clone(),
            })
            .await;
        assert_invalid(delete, "user_id", &case);
        let watch = client
            .watch_access_token(proto::WatchAccessTokenRequest {
                user_id: user_id.clone(),
                min_valid_seconds: u32::MAX,
            })
            .await;
        assert_invalid(watch, "user_id", &case);
        let refresh = client
            .refresh_access_token(proto::RefreshAccessTokenRequest {
                user_id: user_id.clone(),
            })
            .await;
        assert_invalid(refresh, "user_id", &case);
        let imported = client.import_token_set(import(&user_id)).await;
        assert_invalid(imported, "user_id", &case);
    }
    assert_untouched(&mut env).await;
}

/// Replacement characters and other unusual but valid text are ordinary user ids.
async fn replacement_characters_are_ordinary(backend: Backend) {
    let mut env = TestEnv::start_on(&backend, Options::default()).await;
    for user_id in ["\u{FFFD}", "a\u{FFFD}\u{FFFD}b", "\u{FEFF}bom", "🙂"] {
        let status = env
            .client
            .get_token_set(proto::GetTokenSetRequest {
                user_id: user_id.to_owned(),
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::NotFound, "{user_id:?}");
    }
}

async fn secrets_and_codes_validated(backend: Backend) {
    let mut env = TestEnv::start_on(&backend, Options::default()).await;
    let long_code = format!("{SECRET_MARK}{}", "c".repeat(2048));
    let code_cases = [
        (String::new(), "empty"),
        (long_code, "maximum"),
        (format!("{SECRET_MARK}\r\nX-Injected: 1"), "control"),
    ];
    for (auth_code, reason) in code_cases {
        let result = env
            .client
            .exchange_auth_code(proto::ExchangeAuthCodeRequest {
                user_id: "alice".to_owned(),
                auth_code,
            })
            .await;
        assert_invalid(result, "auth_code", reason);
    }

    let long_token = format!("{SECRET_MARK}{}", "t".repeat(MAX_TOKEN_BYTES));
    let token_cases = [
        (String::new(), "empty"),
        (long_token.clone(), "maximum"),
        (format!("{SECRET_MARK} with space"), "whitespace"),
        (format!("{SECRET_MARK}\u{0}nul"), "control"),
    ];
    for (token, reason) in token_cases {
        let access = proto::ImportTokenSetRequest {
            access_token: token.clone(),
            ..import("alice")
        };
        let result = env.client.import_token_set(access).await;
        assert_invalid(result, "access_token", reason);
        if token.is_empty() {
            // An empty refresh token means the user granted no offline scope.
            continue;
        }
        let refresh = proto::ImportTokenSetRequest {
            refresh_token: token,
            ..import("alice")
        };
        let result = env.client.import_token_set(refresh).await;
        assert_invalid(result, "refresh_token", reason);
    }

    let scope_cases = [
        (vec![String::new()], "scopes[0]"),
        (
            vec!["offline".to_owned(), "two words".to_owned()],
            "scopes[1]",
        ),
        (vec!["s".repeat(257)], "scopes[0]"),
        (vec!["tab\there".to_owned()], "scopes[0]"),
        (vec!["offline".to_owned(); 65], "scopes"),
    ];
    for (scopes, field) in scope_cases {
        let request = proto::ImportTokenSetRequest {
            scopes,
            ..import("alice")
        };
        let result = env.client.import_token_set(request).await;
        assert_invalid(result, field, field);
    }
    assert_untouched(&mut env).await;
}

async fn absurd_expiries_rejected(backend: Backend) {
    let mut env = TestEnv::start_on(&backend, Options::default()).await;
    let now = chrono::Utc::now().timestamp();
    let at = |seconds: i64, nanos: i32| {
        Some(Expiry::ExpiresAt(prost_types::Timestamp { seconds, nanos }))
    };
    let cases = [
        (Some(Expiry::ExpiresIn(-1)), "expires_in"),
        (Some(Expiry::ExpiresIn(i64::MIN)), "expires_in"),
        (Some(Expiry::ExpiresIn(i64::MAX)), "expires_in"),
        (Some(Expiry::ExpiresIn(366 * 24 * 3600 + 1)), "expires_in"),
        (at(now + 400 * 24 * 3600, 0), "expires_at"),
        (at(i64::MAX, 0), "expires_at"),
        (at(i64::MIN, 0), "expires_at"),
        (at(now, -1), "expires_at"),
        (at(now, 2_000_000_000), "expires_at"),
        (None, "expires_at"),
    ];
    for (expiry, field) in cases {
        let case = format!("{expiry:?}");
        let request = proto::ImportTokenSetRequest {
            expiry,
            ..import("alice")
        };
        let result = env.client.import_token_set(request).await;
        assert_invalid(result, field, &case);
    }

    // An expired access token without a refresh token could never be served.
    let hopeless = proto::ImportTokenSetRequest {
        expiry: Some(Expiry::ExpiresIn(0)),
        refresh_token: String::new(),
        ..import("alice")
    };
    let result = env.client.import_token_set(hopeless).await;
    assert_invalid(result, "refresh_token", "expired without refresh token");
    assert_untouched(&mut env).await;
}

async fn list_arguments_validated(backend: Backend) {
    let mut env = TestEnv::start_on(&backend, Options::default()).await;
    let list = |page_size: i32, page_token: &str, statuses: Vec<i32>| proto::ListTokenSetsRequest {
        page_size,
        page_token: page_token.to_owned(),
        statuses,
    };
    let garbage_json = "bm90IGpzb24"; // "not json" in URL-safe base64
    let wrong_shape = "eyJhIjoxfQ"; // {"a":1}
    let long_token = "A".repeat(4096);
    let cases = [
        (list(-1, "", vec![]), "page_size"),
        (list(i32::MIN, "", vec![]), "page_size"),
        (list(1001, "", vec![]), "page_size"),
        (list(0, "", vec![0]), "statuses[0]"),
        (list(0, "", vec![1, 7]), "statuses[1]"),
        (list(0, "", vec![-1]), "statuses[0]"),
        (list(0, "", vec![i32::MAX]), "statuses[0]"),
        (list(0, "!!!", vec![]), "page_token"),
        (list(0, garbage_json, vec![]), "page_token"),
        (list(0, wrong_shape, vec![]), "page_token"),
        (list(0, &long_token, vec![]), "page_token"),
        (list(0, "\u{FFFD}", vec![]), "page_token"),
    ];
    for (request, field) in cases {
        let case = format!(
            "page_size {} statuses {:?} page_token of {} bytes",
            request.page_size,
            request.statuses,
            request.page_token.len()
        );
        let result = env.client.list_token_sets(request).await;
        assert_invalid(result, field, &case);
    }
    let repeated = env
        .client
        .list_token_sets(list(1000, "", vec![1, 1, 2, 3]))
        .await
        .unwrap();
    assert!(repeated.into_inner().token_sets.is_empty());
}

async fn oversized_message_rejected(backend: Backend) {
    let mut env = TestEnv::start_on(&backend, Options::default()).await;
    // A message far above every field limit still names the field at fault.
    let long_user_id = "x".repeat(64 * 1024);
    let status = env
        .client
        .get_token_set(proto::GetTokenSetRequest {
            user_id: long_user_id,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("user_id"), "{status:?}");

    let access_token = format!("{SECRET_MARK}{}", "t".repeat(64 * 1024));
    let status = env
        .client
        .import_token_set(proto::ImportTokenSetRequest {
            access_token,
            ..import("alice")
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("access_token"), "{status:?}");
    assert!(!status.message().contains(SECRET_MARK));

    // Above the message limit tonic rejects the request before decoding it.
    let huge = "x".repeat(MAX_REQUEST_BYTES + 1);
    let status = env
        .client
        .get_token_set(proto::GetTokenSetRequest { user_id: huge })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    assert!(status.message().contains(&MAX_REQUEST_BYTES.to_string()));

    // The daemon still serves after rejecting them.
    env.exchange("alice").await;
    assert!(env.access_token("alice").await.is_ok());
}

/// A codec that sends pre-encoded protobuf bytes and returns the raw response bytes.
#[derive(Debug, Clone, Default)]
struct RawCodec;

#[derive(Debug)]
struct RawEncoder;

#[derive(Debug)]
struct RawDecoder;

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawEncoder;
    type Decoder = RawDecoder;

    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }

    fn decoder(&mut self) -> RawDecoder {
        RawDecoder
    }
}

impl Encoder for RawEncoder {
    type Item = Vec<u8>;
    type Error = Status;

    fn encode(&mut self, item: Vec<u8>, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        buf.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawDecoder {
    type Item = Vec<u8>;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        let bytes = buf.copy_to_bytes(buf.remaining());
        Ok(Some(bytes.to_vec()))
    }
}

/// Encodes a length-delimited field, here a string field holding arbitrary bytes.
fn field(number: u8, bytes: &[u8]) -> Vec<u8> {
    let mut encoded = vec![(number << 3) | 2, u8::try_from(bytes.len()).unwrap()];
    encoded.extend_from_slice(bytes);
    encoded
}

async fn raw_call(channel: Channel, method: &'static str, body: Vec<u8>) -> Status {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let path = tonic::codegen::http::uri::PathAndQuery::from_static(method);
    if method.ends_with("WatchAccessToken") {
        let response = grpc
            .server_streaming(tonic::Request::new(body), path, RawCodec)
            .await;
        let Err(status) = response else {
            panic!("{method}: the request was accepted");
        };
        return status;
    }
    let response = grpc.unary(tonic::Request::new(body), path, RawCodec).await;
    let Err(status) = response else {
        panic!("{method}: the request was accepted");
    };
    status
}

async fn non_utf8_strings_rejected(backend: Backend) {
    let mut env = TestEnv::start_on(&backend, Options::default()).await;
    let channel = Channel::from_shared(format!("http://{}", env.daemon().grpc_addr()))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let invalid_utf8: &[u8] = &[b'a', 0xff, 0xfe, 0x80, b'z'];
    let lone_surrogate: &[u8] = &[0xed, 0xa0, 0x80];
    let user_id_methods = [
        ("/tokend.v1.TokenService/ExchangeAuthCode", "user_id"),
        ("/tokend.v1.TokenService/GetAccessToken", "user_id"),
        ("/tokend.v1.TokenService/GetTokenSet", "user_id"),
        ("/tokend.v1.TokenService/DeleteTokenSet", "user_id"),
        ("/tokend.v1.TokenService/WatchAccessToken", "user_id"),
        ("/tokend.v1.TokenService/RefreshAccessToken", "user_id"),
        ("/tokend.v1.TokenService/ImportTokenSet", "user_id"),
    ];
    for bytes in [invalid_utf8, lone_surrogate] {
        for (method, field_name) in user_id_methods {
            let status = raw_call(channel.clone(), method, field(1, bytes)).await;
            assert_eq!(status.code(), Code::InvalidArgument, "{method}: {status:?}");
            assert!(
                status.message().contains(field_name),
                "{method}: {}",
                status.message()
            );
        }
    }

    // Other string fields: the auth code, the import's access token and the page token.
    let mut exchange = field(1, b"alice");
    exchange.extend(field(2, invalid_utf8));
    let mut import = field(1, b"alice");
    import.extend(field(2, invalid_utf8));
    let others = [
        (
            "/tokend.v1.TokenService/ExchangeAuthCode",
            exchange,
            "auth_code",
        ),
        (
            "/tokend.v1.TokenService/ImportTokenSet",
            import,
            "access_token",
        ),
        (
            "/tokend.v1.TokenService/ListTokenSets",
            field(2, invalid_utf8),
            "page_token",
        ),
    ];
    for (method, body, field_name) in others {
        let status = raw_call(channel.clone(), method, body).await;
        assert_eq!(status.code(), Code::InvalidArgument, "{method}: {status:?}");
        assert!(
            status.message().contains(field_name),
            "{method}: {}",
            status.message()
        );
    }

    // A truncated message is rejected the same way.
    let truncated = vec![0x0a, 0x40, b'a'];
    let status = raw_call(
        channel.clone(),
        "/tokend.v1.TokenService/GetTokenSet",
        truncated,
    )
    .await;
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_untouched(&mut env).await;
}

backend_tests! {
    user_ids_rejected_everywhere,
    replacement_characters_are_ordinary,
    secrets_and_codes_validated,
    absurd_expiries_rejected,
    list_arguments_validated,
    oversized_message_rejected,
    non_utf8_strings_rejected,
}
