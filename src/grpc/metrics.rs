//! Counts the calls of `tokend.v1.TokenService` by method and status code, as
//! `tokend_grpc_requests_total{method,code}`, in one wrapper around the generated server.

use std::{
    convert::Infallible,
    future::Future,
    pin::Pin,
    task::{Context, Poll},
};

use tonic::{
    Code,
    body::Body,
    codegen::{Service, http},
    server::NamedService,
};

/// The methods of `tokend.v1.TokenService`. Any other path is counted as `unknown`, so
/// that callers cannot create label values.
const METHODS: [&str; 8] = [
    "ExchangeAuthCode",
    "GetAccessToken",
    "WatchAccessToken",
    "RefreshAccessToken",
    "GetTokenSet",
    "ListTokenSets",
    "ImportTokenSet",
    "DeleteTokenSet",
];

/// Wraps a gRPC service and counts its calls.
///
/// NOTE: The code is read from the response headers, where tonic puts it when a call
/// fails before any message. A call whose headers carry no code counts as `OK`, so a
/// stream that fails after its first message is counted as `OK`.
#[derive(Debug, Clone)]
pub struct CountRequests<S> {
    inner: S,
}

impl<S> CountRequests<S> {
    pub fn new(inner: S) -> Self {
        CountRequests { inner }
    }
}

impl<S: NamedService> NamedService for CountRequests<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B> Service<http::Request<B>> for CountRequests<S>
where
    S: Service<http::Request<B>, Response = http::Response<Body>, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, context: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(context)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let method = method_label(request.uri().path());
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = response.await?;
            let code = response
                .headers()
                .get("grpc-status")
                .map_or(Code::Ok, |value| Code::from_bytes(value.as_bytes()));
            metrics::counter!(
                "tokend_grpc_requests_total",
                "method" => method,
                "code" => code_label(code)
            )
            .increment(1);
            Ok(response)
        })
    }
}

/// Returns the method name of a `/package.Service/Method` path if it is one of
/// [`METHODS`], and `unknown` otherwise.
fn method_label(path: &str) -> &'static str {
    let name = path.rsplit('/').next().unwrap_or_default();
    METHODS
        .iter()
        .find(|method| **method == name)
        .copied()
        .unwrap_or("unknown")
}

/// Names a code as gRPC's Go implementation prints it (`OK`, `InvalidArgument`), the
/// form that common gRPC dashboards expect.
fn code_label(code: Code) -> String {
    match code {
        Code::Ok => "OK".to_owned(),
        other => format!("{other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn method_label_is_bounded() {
        assert_eq!(
            method_label("/tokend.v1.TokenService/GetAccessToken"),
            "GetAccessToken"
        );
        assert_eq!(
            method_label("/tokend.v1.TokenService/Evil\nName"),
            "unknown"
        );
        assert_eq!(method_label(""), "unknown");
    }

    #[test]
    fn code_label_follows_go_names() {
        assert_eq!(code_label(Code::Ok), "OK");
        assert_eq!(code_label(Code::InvalidArgument), "InvalidArgument");
        assert_eq!(code_label(Code::Unavailable), "Unavailable");
    }
}
