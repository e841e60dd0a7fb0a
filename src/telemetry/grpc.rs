//! A tower layer for the tonic server that counts gRPC requests by method and status
//! code in `tokend_grpc_requests_total`.

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
};

use metrics::counter;
use tonic::Code;
use tower::{Layer, Service};

use super::GRPC_REQUESTS;

/// Wraps a gRPC service with [`GrpcMetrics`].
#[derive(Debug, Clone, Copy, Default)]
pub struct GrpcMetricsLayer;

impl<S> Layer<S> for GrpcMetricsLayer {
    type Service = GrpcMetrics<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcMetrics { inner }
    }
}

/// Counts each request once its response headers are ready.
#[derive(Debug, Clone)]
pub struct GrpcMetrics<S> {
    inner: S,
}

impl<S, RequestBody, ResponseBody> Service<http::Request<RequestBody>> for GrpcMetrics<S>
where
    S: Service<http::Request<RequestBody>, Response = http::Response<ResponseBody>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<RequestBody>) -> Self::Future {
        let method = method_name(request.uri().path());
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = response.await?;
            let code = response_code(&response);
            // An unimplemented method's name comes from the caller, so it is not used
            // as a label value: that would let callers create any number of series.
            let method = if code == Code::Unimplemented {
                "unknown".to_owned()
            } else {
                method
            };
            counter!(GRPC_REQUESTS, "method" => method, "code" => code_label(code)).increment(1);
            Ok(response)
        })
    }
}

/// Returns the method part of a gRPC path such as `/tokend.v1.TokenService/GetAccessToken`.
fn method_name(path: &str) -> String {
    path.rsplit('/').next().unwrap_or_default().to_owned()
}

/// Reads the status code of a unary response. tonic sends a failed call's status in the
/// response headers ("trailers-only") and a successful one's in the trailers, so a
/// response without a `grpc-status` header succeeded.
// NOTE: a streaming call that fails after its first message would count as OK; the
// services this layer wraps have unary methods and the server-streaming health Watch.
fn response_code<B>(response: &http::Response<B>) -> Code {
    response
        .headers()
        .get("grpc-status")
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<i32>().ok())
        .map_or(Code::Ok, Code::from_i32)
}

/// Returns the status code's name as gRPC's own documentation spells it.
fn code_label(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn method_is_last_path_segment() {
        assert_eq!(
            method_name("/tokend.v1.TokenService/GetAccessToken"),
            "GetAccessToken"
        );
        assert_eq!(method_name("/grpc.health.v1.Health/Check"), "Check");
    }

    #[test]
    fn missing_status_header_means_ok() {
        let response = http::Response::new(());
        assert_eq!(response_code(&response), Code::Ok);
    }

    #[test]
    fn status_header_is_read() {
        let response = http::Response::builder()
            .header("grpc-status", "5")
            .body(())
            .unwrap();
        assert_eq!(response_code(&response), Code::NotFound);
    }
}
