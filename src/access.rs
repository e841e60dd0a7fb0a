//! Caller authentication on the gRPC port: the role each method needs, and the tower
//! layer that checks the `authorization: Bearer KEY` metadata against the API keys
//! before a request reaches a service. TLS and client certificates are in [`tls`].
//!
//! Invariants: the method-to-role table in [`required_role`] is the only place that
//! grants access, and a method it does not list needs [`Role::Admin`], so a new RPC
//! is closed until someone opens it there. Health checks stay open because probes
//! cannot send keys. Rejections never echo the presented key.

pub mod api_keys;
pub mod tls;

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use tonic::Status;
use tower::{Layer, Service};
use tracing::debug;

pub use api_keys::{ApiKeys, Caller};

/// A caller's permission level, granted by its API key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    /// Gets access tokens and token set metadata, and triggers refreshes.
    Reader,
    /// Everything a reader may do, plus exchanging, importing and deleting token sets.
    Admin,
}

impl Role {
    /// Parses the role's name as the API keys file writes it.
    pub fn parse(name: &str) -> Option<Role> {
        match name {
            "reader" => Some(Role::Reader),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Reader => "reader",
            Role::Admin => "admin",
        }
    }
}

/// Path prefix of the standard gRPC health service.
const HEALTH_PREFIX: &str = "/grpc.health.v1.Health/";

/// Returns the role a gRPC method path such as `/tokend.v1.TokenService/GetAccessToken`
/// needs, or `None` for a method open to everyone.
pub fn required_role(path: &str) -> Option<Role> {
    if path.starts_with(HEALTH_PREFIX) {
        return None;
    }
    let role = match path {
        "/tokend.v1.TokenService/GetAccessToken"
        | "/tokend.v1.TokenService/GetTokenSet"
        | "/tokend.v1.TokenService/ListTokenSets"
        | "/tokend.v1.TokenService/WatchAccessToken"
        | "/tokend.v1.TokenService/RefreshAccessToken"
        | "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"
        | "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo" => Role::Reader,
        // ExchangeAuthCode, ImportTokenSet, DeleteTokenSet and any method not listed.
        _ => Role::Admin,
    };
    Some(role)
}

/// Checks a request's `authorization` metadata against `keys` for the method at
/// `path`, and returns the caller, or the status to reject the request with.
pub fn authorize(
    keys: &ApiKeys,
    path: &str,
    authorization: Option<&[u8]>,
) -> Result<Option<Caller>, Status> {
    let Some(required) = required_role(path) else {
        return Ok(None);
    };
    let Some(header) = authorization else {
        return Err(Status::unauthenticated(
            "missing authorization metadata; send `authorization: Bearer KEY` with an API key",
        ));
    };
    let key = std::str::from_utf8(header)
        .ok()
        .and_then(|value| value.strip_prefix("Bearer "))
        .map(str::trim)
        .ok_or_else(|| {
            Status::unauthenticated("the authorization metadata must read `Bearer KEY`")
        })?;
    let caller = keys
        .find(key)
        .ok_or_else(|| Status::unauthenticated("the API key is not valid"))?;
    if caller.role < required {
        return Err(Status::permission_denied(format!(
            "{path} needs the {} role; the API key named {} has the {} role",
            required.as_str(),
            caller.name,
            caller.role.as_str()
        )));
    }
    Ok(Some(caller))
}

/// A tower layer that rejects requests without a valid API key for their method. With
/// no keys configured it passes every request through.
#[derive(Debug, Clone)]
pub struct AuthLayer {
    keys: Option<Arc<ApiKeys>>,
}

impl AuthLayer {
    pub fn new(keys: Option<Arc<ApiKeys>>) -> Self {
        AuthLayer { keys }
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = Authenticate<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Authenticate {
            inner,
            keys: self.keys.clone(),
        }
    }
}

/// The service [`AuthLayer`] wraps around the gRPC routes.
#[derive(Debug, Clone)]
pub struct Authenticate<S> {
    inner: S,
    keys: Option<Arc<ApiKeys>>,
}

type BoxFuture<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send>>;

impl<S, B, ResBody> Service<http::Request<B>> for Authenticate<S>
where
    S: Service<http::Request<B>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ResBody: Default + Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<S::Response, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        if let Some(keys) = &self.keys {
            let path = request.uri().path();
            let authorization = request
                .headers()
                .get(http::header::AUTHORIZATION)
                .map(http::HeaderValue::as_bytes);
            match authorize(keys, path, authorization) {
                Ok(Some(caller)) => {
                    debug!(method = %path, caller = %caller.name, role = caller.role.as_str(), "caller authenticated");
                }
                Ok(None) => {}
                Err(status) => {
                    debug!(method = %path, code = ?status.code(), "request rejected");
                    return Box::pin(std::future::ready(Ok(status.into_http())));
                }
            }
        }
        Box::pin(self.inner.call(request))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    const READER_KEY: &str = "reader-key-0123456789";
    const ADMIN_KEY: &str = "admin-key-0123456789";

    fn keys() -> ApiKeys {
        ApiKeys::parse(
            "keys",
            &format!("reader {READER_KEY} billing\nadmin {ADMIN_KEY} ops"),
        )
        .unwrap()
    }

    fn bearer(key: &str) -> Vec<u8> {
        format!("Bearer {key}").into_bytes()
    }

    #[test]
    fn methods_map_to_roles() {
        let cases = [
            ("/tokend.v1.TokenService/GetAccessToken", Some(Role::Reader)),
            ("/tokend.v1.TokenService/GetTokenSet", Some(Role::Reader)),
            ("/tokend.v1.TokenService/ListTokenSets", Some(Role::Reader)),
            (
                "/tokend.v1.TokenService/WatchAccessToken",
                Some(Role::Reader),
            ),
            (
                "/tokend.v1.TokenService/RefreshAccessToken",
                Some(Role::Reader),
            ),
            (
                "/tokend.v1.TokenService/ExchangeAuthCode",
                Some(Role::Admin),
            ),
            ("/tokend.v1.TokenService/ImportTokenSet", Some(Role::Admin)),
            ("/tokend.v1.TokenService/DeleteTokenSet", Some(Role::Admin)),
            ("/tokend.v1.TokenService/SomethingNew", Some(Role::Admin)),
            ("/other.Service/GetAccessToken", Some(Role::Admin)),
            ("/tokend.v1.TokenService/GetAccessToken/", Some(Role::Admin)),
            ("", Some(Role::Admin)),
            ("/grpc.health.v1.Health/Check", None),
            ("/grpc.health.v1.Health/Watch", None),
        ];
        for (path, role) in cases {
            assert_eq!(required_role(path), role, "{path}");
        }
    }

    #[test]
    fn roles_allow_their_methods() {
        let keys = keys();
        let get = "/tokend.v1.TokenService/GetAccessToken";
        let exchange = "/tokend.v1.TokenService/ExchangeAuthCode";

        let caller = authorize(&keys, get, Some(&bearer(READER_KEY))).unwrap();
        assert_eq!(caller.unwrap().name, "billing");
        let caller = authorize(&keys, exchange, Some(&bearer(ADMIN_KEY))).unwrap();
        assert_eq!(caller.unwrap().role, Role::Admin);
        let caller = authorize(&keys, get, Some(&bearer(ADMIN_KEY))).unwrap();
        assert_eq!(caller.unwrap().role, Role::Admin);

        let status = authorize(&keys, exchange, Some(&bearer(READER_KEY))).unwrap_err();
        assert_eq!(status.code(), Code::PermissionDenied);
        assert!(status.message().contains("admin"), "{}", status.message());
    }

    #[test]
    fn bad_credentials_are_unauthenticated() {
        let keys = keys();
        let get = "/tokend.v1.TokenService/GetAccessToken";
        let cases: [Option<&[u8]>; 5] = [
            None,
            Some(b"Bearer wrong-key-0123456789"),
            Some(b"Basic cmVhZGVyOmtleQ=="),
            Some(b"reader-key-0123456789"),
            Some(b"Bearer \xff\xfe"),
        ];
        for authorization in cases {
            let status = authorize(&keys, get, authorization).unwrap_err();
            assert_eq!(status.code(), Code::Unauthenticated, "{authorization:?}");
            assert!(!status.message().contains("wrong-key"));
            assert!(!status.message().contains(READER_KEY));
        }
    }

    #[test]
    fn health_needs_no_key() {
        let keys = keys();
        let outcome = authorize(&keys, "/grpc.health.v1.Health/Check", None).unwrap();
        assert_eq!(outcome, None);
    }
}
