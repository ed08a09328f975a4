//! The client's deadline (`grpc-timeout`) answered as gRPC says a server
//! answers it: DEADLINE_EXCEEDED. tonic enforces the header itself, a
//! layer further out, but answers CANCELLED ("Timeout expired"); a client
//! whose own timer loses the race (critest's "public image should timeout
//! if requested", with a 1 ms deadline, on a loaded node) then sees the
//! wrong code.
//!
//! This layer sits inside tonic's timeout and starts its timer first (tonic
//! calls its inner service before it arms its own sleep), and tonic polls
//! the inner future before its sleep: once both are due, ours answers.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use tonic::codegen::http;

#[derive(Debug, Clone, Copy, Default)]
pub struct DeadlineLayer;

impl<S> tower::Layer<S> for DeadlineLayer {
    type Service = Deadline<S>;
    fn layer(&self, inner: S) -> Deadline<S> {
        Deadline { inner }
    }
}

#[derive(Debug, Clone)]
pub struct Deadline<S> {
    inner: S,
}

impl<S, B> tower::Service<http::Request<B>> for Deadline<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let limit = req
            .headers()
            .get("grpc-timeout")
            .and_then(|v| v.to_str().ok())
            .and_then(parse_timeout);
        let fut = self.inner.call(req);
        Box::pin(async move {
            let Some(limit) = limit else {
                return fut.await;
            };
            match tokio::time::timeout(limit, fut).await {
                Ok(r) => r,
                Err(_) => Ok(tonic::Status::deadline_exceeded(format!(
                    "the client's deadline ({limit:?}) passed before the call was done"
                ))
                .into_http()),
            }
        })
    }
}

/// `grpc-timeout`: at most 8 digits and a unit (H, M, S, m, u, n).
fn parse_timeout(v: &str) -> Option<Duration> {
    let (digits, unit) = v.split_at(v.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::{Layer, Service, ServiceExt};

    #[test]
    fn timeouts_parse_as_the_spec_writes_them() {
        assert_eq!(parse_timeout("1m"), Some(Duration::from_millis(1)));
        assert_eq!(parse_timeout("99999u"), Some(Duration::from_micros(99999)));
        assert_eq!(parse_timeout("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(parse_timeout("123456789S"), None);
        assert_eq!(parse_timeout("m"), None);
        assert_eq!(parse_timeout("5x"), None);
        assert_eq!(parse_timeout(""), None);
    }

    /// A call slower than its deadline is answered DEADLINE_EXCEEDED; one
    /// without a deadline, or within it, gets the service's answer.
    #[tokio::test]
    async fn a_call_past_its_deadline_is_deadline_exceeded() {
        let slow = tower::service_fn(|_req: http::Request<()>| async {
            tokio::time::sleep(Duration::from_millis(200)).await;
            Ok::<_, std::convert::Infallible>(http::Response::new(tonic::body::Body::empty()))
        });
        let mut svc = DeadlineLayer.layer(slow);
        let req = |t: Option<&str>| {
            let mut b = http::Request::builder();
            if let Some(t) = t {
                b = b.header("grpc-timeout", t);
            }
            b.body(()).unwrap()
        };
        let code = |r: &http::Response<tonic::body::Body>| {
            r.headers()
                .get("grpc-status")
                .map(|v| v.to_str().unwrap().to_string())
        };
        let r = svc
            .ready()
            .await
            .unwrap()
            .call(req(Some("1m")))
            .await
            .unwrap();
        assert_eq!(code(&r).as_deref(), Some("4"));
        let r = svc
            .ready()
            .await
            .unwrap()
            .call(req(Some("5S")))
            .await
            .unwrap();
        assert_eq!(code(&r), None);
        let r = svc.ready().await.unwrap().call(req(None)).await.unwrap();
        assert_eq!(code(&r), None);
    }
}
