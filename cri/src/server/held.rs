//! Memory a response holds until it is sent. Evidence is reserved out of
//! the node's evidence memory while a handler builds it, but tonic encodes
//! the message after the handler returns (up to 64 MiB), and keeps that
//! buffer until the client has read it: a client that asks and does not
//! read would hold one such buffer per call, outside the budget. A handler
//! puts its reservation in the response's extensions ([`Held`]); [`layer`]
//! moves it into the response body, which drops it once sent (or once the
//! call is gone).

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use tokio::sync::OwnedSemaphorePermit;
use tonic::codegen::http;

/// A reservation a response holds until its body is sent (extensions must
/// be `Clone`: the permit is taken out once).
#[derive(Clone)]
pub struct Held(Arc<Mutex<Option<OwnedSemaphorePermit>>>);

impl Held {
    pub fn new(p: OwnedSemaphorePermit) -> Held {
        Held(Arc::new(Mutex::new(Some(p))))
    }

    fn take(&self) -> Option<OwnedSemaphorePermit> {
        self.0.lock().ok()?.take()
    }
}

/// A tonic response carrying `held` in its extensions.
pub fn respond<T>(msg: T, held: OwnedSemaphorePermit) -> tonic::Response<T> {
    let mut r = tonic::Response::new(msg);
    r.extensions_mut().insert(Held::new(held));
    r
}

/// The layer that moves a response's [`Held`] into its body.
pub fn layer() -> tower::util::MapResponseLayer<fn(Resp) -> Resp> {
    tower::util::MapResponseLayer::new(hold as fn(Resp) -> Resp)
}

type Resp = http::Response<tonic::body::Body>;

/// `resp` with its body holding the reservation its extensions carried.
fn hold(mut resp: Resp) -> Resp {
    let Some(permit) = resp
        .extensions_mut()
        .remove::<Held>()
        .and_then(|h| h.take())
    else {
        return resp;
    };
    resp.map(|inner| {
        tonic::body::Body::new(HeldBody {
            inner,
            _permit: permit,
        })
    })
}

/// A body that keeps its reservation until it is dropped.
struct HeldBody {
    inner: tonic::body::Body,
    _permit: OwnedSemaphorePermit,
}

impl http_body::Body for HeldBody {
    type Data = bytes::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<bytes::Bytes>, tonic::Status>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    /// The reservation a handler returns is held until the response's body
    /// is read to its end (or dropped), not only until the handler returns.
    #[tokio::test]
    async fn a_reservation_lasts_until_the_body_is_sent() {
        let memory = Arc::new(tokio::sync::Semaphore::new(10));
        let permit = memory.clone().acquire_many_owned(4).await.unwrap();
        let full = http_body_util::Full::new(bytes::Bytes::from_static(b"evidence"));
        let mut r = http::Response::new(tonic::body::Body::new(full));
        r.extensions_mut().insert(Held::new(permit));
        let resp = hold(r);
        assert!(resp.extensions().get::<Held>().is_none());
        assert_eq!(memory.available_permits(), 6, "held by the body");
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"evidence");
        assert_eq!(memory.available_permits(), 10, "released once sent");
        // A response without one passes as it is.
        let plain = hold(http::Response::new(tonic::body::Body::empty()));
        assert!(plain
            .into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .is_empty());
    }
}
