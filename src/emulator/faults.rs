//! The queue of injected faults and the responses of the faults that replace processing.

use std::collections::VecDeque;

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::Fault;
use super::token_endpoint::error_document;

/// Faults waiting to be applied, first injected first.
#[derive(Debug, Default)]
pub(super) struct FaultQueue {
    /// Each fault with the number of requests it still applies to, `None` for all.
    entries: VecDeque<(Fault, Option<u32>)>,
}

impl FaultQueue {
    /// Queues `fault` for `times` requests, or for all when `None`.
    pub fn push(&mut self, fault: Fault, times: Option<u32>) {
        if times != Some(0) {
            self.entries.push_back((fault, times));
        }
    }

    pub fn clear(&mut self) {
        self.entries.clear();
    }

    /// Takes the fault for the next request, if any.
    pub fn next_fault(&mut self) -> Option<Fault> {
        let (fault, remaining) = self.entries.front_mut()?;
        let fault = fault.clone();
        if let Some(count) = remaining {
            *count -= 1;
            if *count == 0 {
                self.entries.pop_front();
            }
        }
        Some(fault)
    }
}

/// Panics if `fault` carries a status code that HTTP cannot send.
pub(super) fn check_status(fault: &Fault) {
    if let Fault::Status(status) | Fault::StatusAfter { status, .. } = fault {
        assert!(
            (100..=999).contains(status),
            "HTTP status {status} of {fault:?} is not an HTTP status code: use 100 to 999"
        );
    }
}

/// Builds the response of a fault that replaces processing, or `None` for a fault
/// that lets the request be processed.
pub(super) fn replacement_response(fault: &Fault) -> Option<Response> {
    let response = match fault {
        Fault::Status(status) | Fault::StatusAfter { status, .. } => {
            // `Emulator::inject` only queues codes that HTTP can send.
            let status = StatusCode::from_u16(*status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let reason = status.canonical_reason().unwrap_or("Injected status");
            (status, format!("{reason}\n")).into_response()
        }
        Fault::TooManyRequests {
            retry_after_seconds,
        } => {
            let retry_after = HeaderValue::from(*retry_after_seconds);
            (
                StatusCode::TOO_MANY_REQUESTS,
                [(header::RETRY_AFTER, retry_after)],
                "Too Many Requests\n",
            )
                .into_response()
        }
        // Claims to be JSON but is an HTML error page, as a misconfigured gateway sends.
        Fault::GarbageBody => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/json")],
            "<html><body><h1>502 Bad Gateway</h1></body></html>\n",
        )
            .into_response(),
        Fault::GraphqlError { code, message } => {
            axum::Json(error_document(code, message)).into_response()
        }
        Fault::DelayBefore(_) | Fault::DelayAfter(_) | Fault::TokensWithErrors { .. } => {
            return None;
        }
    };
    Some(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status_of(fault: Option<Fault>) -> Option<u16> {
        match fault {
            Some(Fault::Status(status)) => Some(status),
            _ => None,
        }
    }

    #[test]
    fn counted_faults_run_out_in_order() {
        let mut queue = FaultQueue::default();
        queue.push(Fault::Status(500), Some(2));
        queue.push(Fault::Status(502), Some(1));
        assert_eq!(status_of(queue.next_fault()), Some(500));
        assert_eq!(status_of(queue.next_fault()), Some(500));
        assert_eq!(status_of(queue.next_fault()), Some(502));
        assert!(queue.next_fault().is_none());
    }

    #[test]
    fn uncounted_fault_stays_until_cleared() {
        let mut queue = FaultQueue::default();
        queue.push(Fault::Status(503), None);
        queue.push(Fault::Status(500), Some(1));
        for _ in 0..5 {
            assert_eq!(status_of(queue.next_fault()), Some(503));
        }
        queue.clear();
        assert!(queue.next_fault().is_none());
    }

    #[test]
    fn zero_times_queues_nothing() {
        let mut queue = FaultQueue::default();
        queue.push(Fault::GarbageBody, Some(0));
        assert!(queue.next_fault().is_none());
    }

    #[test]
    fn delays_keep_normal_response() {
        let delay = std::time::Duration::from_millis(1);
        assert!(replacement_response(&Fault::DelayBefore(delay)).is_none());
        assert!(replacement_response(&Fault::DelayAfter(delay)).is_none());
        let response = replacement_response(&Fault::Status(503)).unwrap();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    }

    #[test]
    fn rate_limit_sets_retry_after() {
        let fault = Fault::TooManyRequests {
            retry_after_seconds: 17,
        };
        let response = replacement_response(&fault).unwrap();
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(response.headers()[header::RETRY_AFTER], "17");
    }
}
