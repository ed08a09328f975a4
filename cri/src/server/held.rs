//! Memory a response holds until it is sent. Evidence is reserved out of
//! the node's evidence memory while a handler builds it, but tonic encodes
//! the message after the handler returns (up to 64 MiB), and keeps that
//! buffer until the client has read it: a client that asks and does not
//! read would hold one such buffer per call, outside the budget. A handler
//! puts its reservation in the response's extensions ([`Held`]); [`layer`]
//! moves it into the response body, which drops it once sent (or once the
//! call is gone).
//!
//! A client that asks and then does not read would still hold its share of
//! the budget (every other verifier waiting) until its connection closed.
//! So a held response that is not read for [`Limits::unread`], or not sent
//! within [`Limits::within`], is dropped: its buffer and its reservation go
//! at once, and the client's stream is reset once it reads again. hyper
//! polls a body only when the stream has room, never while the client does
//! not read, so a timer does the dropping; and the body hands h2 copies of
//! at most [`SLICE`] bytes, never a view of the whole buffer, which h2 would
//! keep (and with it the buffer) until the connection closed.

use bytes::{Buf, Bytes};
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;
use tonic::codegen::http;

/// The most of a held response h2 is handed at once.
const SLICE: usize = 256 << 10;

/// How long a held response may wait for its client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Dropped when none of it was read for this long (None: never).
    pub unread: Option<Duration>,
    /// Dropped when it is not all sent by then.
    pub within: Duration,
}

impl Limits {
    /// `attestation.unread_secs` (0: never), and ten minutes to send it all
    /// (64 MiB at 110 KB/s).
    pub fn from_secs(unread_secs: u64) -> Limits {
        Limits {
            unread: (unread_secs > 0).then(|| Duration::from_secs(unread_secs)),
            within: Duration::from_secs(600),
        }
    }
}

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

/// The layer that moves a response's [`Held`] into its body, sent within
/// `limits`.
pub fn layer(limits: Limits) -> tower::util::MapResponseLayer<impl FnMut(Resp) -> Resp + Clone> {
    tower::util::MapResponseLayer::new(move |r| hold(r, limits))
}

type Resp = http::Response<tonic::body::Body>;

/// `resp` with its body holding the reservation its extensions carried.
fn hold(mut resp: Resp, limits: Limits) -> Resp {
    let Some(permit) = resp
        .extensions_mut()
        .remove::<Held>()
        .and_then(|h| h.take())
    else {
        return resp;
    };
    resp.map(|inner| tonic::body::Body::new(HeldBody::new(inner, permit, limits)))
}

/// What a held body has left to send.
struct Sending {
    /// None once it ended or was dropped.
    inner: Option<tonic::body::Body>,
    /// The rest of the data frame being sent in slices.
    rest: Bytes,
    permit: Option<OwnedSemaphorePermit>,
    /// When the client last took a slice.
    last: Instant,
    dropped: bool,
}

impl Sending {
    fn next_slice(&mut self) -> Bytes {
        let n = SLICE.min(self.rest.len());
        let piece = Bytes::copy_from_slice(&self.rest[..n]);
        self.rest.advance(n);
        if self.rest.is_empty() {
            // An empty view still keeps its buffer.
            self.rest = Bytes::new();
        }
        self.last = Instant::now();
        piece
    }

    fn drop_all(&mut self) {
        self.inner = None;
        self.rest = Bytes::new();
        self.permit = None;
        self.dropped = true;
    }
}

/// A body that keeps its reservation until it is sent, dropped or too slow.
struct HeldBody {
    state: Arc<Mutex<Sending>>,
    timer: Option<tokio::task::JoinHandle<()>>,
}

impl HeldBody {
    fn new(inner: tonic::body::Body, permit: OwnedSemaphorePermit, limits: Limits) -> HeldBody {
        let state = Arc::new(Mutex::new(Sending {
            inner: Some(inner),
            rest: Bytes::new(),
            permit: Some(permit),
            last: Instant::now(),
            dropped: false,
        }));
        let timer = tokio::runtime::Handle::try_current()
            .ok()
            .map(|rt| rt.spawn(watch(Arc::downgrade(&state), limits)));
        HeldBody { state, timer }
    }
}

impl Drop for HeldBody {
    fn drop(&mut self) {
        if let Some(t) = self.timer.take() {
            t.abort();
        }
    }
}

/// Drops what `state` holds once its client stopped reading for
/// `limits.unread`, or at `limits.within`; ends when it was sent.
async fn watch(state: Weak<Mutex<Sending>>, limits: Limits) {
    let end = Instant::now() + limits.within;
    loop {
        let wake = {
            let Some(state) = state.upgrade() else { return };
            let Ok(mut s) = state.lock() else { return };
            if s.inner.is_none() && s.rest.is_empty() {
                return;
            }
            let wake = limits.unread.map_or(end, |u| (s.last + u).min(end));
            if Instant::now() >= wake {
                let why = match Instant::now() >= end {
                    true => format!("not sent within {} s", limits.within.as_secs()),
                    false => format!(
                        "its client read none of it for {} s",
                        limits.unread.unwrap_or_default().as_secs()
                    ),
                };
                tracing::warn!(
                    left = s.rest.len(),
                    "evidence response dropped: {why}; its memory and its share of the evidence budget are released, and the client's stream is reset"
                );
                s.drop_all();
                return;
            }
            wake
        };
        tokio::time::sleep_until(wake).await;
    }
}

impl http_body::Body for HeldBody {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, tonic::Status>>> {
        let Ok(mut s) = self.state.lock() else {
            return Poll::Ready(Some(Err(tonic::Status::internal("evidence response lost"))));
        };
        if s.dropped {
            return Poll::Ready(Some(Err(tonic::Status::deadline_exceeded(
                "evidence response not read in time: dropped",
            ))));
        }
        if !s.rest.is_empty() {
            let piece = s.next_slice();
            return Poll::Ready(Some(Ok(http_body::Frame::data(piece))));
        }
        let Some(inner) = s.inner.as_mut() else {
            return Poll::Ready(None);
        };
        match Pin::new(inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                Ok(data) if data.len() > SLICE => {
                    s.rest = data;
                    let piece = s.next_slice();
                    Poll::Ready(Some(Ok(http_body::Frame::data(piece))))
                }
                Ok(data) => {
                    s.last = Instant::now();
                    Poll::Ready(Some(Ok(http_body::Frame::data(data))))
                }
                Err(frame) => Poll::Ready(Some(Ok(frame))),
            },
            Poll::Ready(None) => {
                // Sent: the reservation goes now, not when hyper drops us.
                s.inner = None;
                s.permit = None;
                Poll::Ready(None)
            }
            other => other,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.state.lock().map_or(true, |s| {
            !s.dropped && s.rest.is_empty() && s.inner.as_ref().is_none_or(|i| i.is_end_stream())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    const LIMITS: Limits = Limits {
        unread: Some(Duration::from_secs(30)),
        within: Duration::from_secs(600),
    };

    fn response(memory: &Arc<tokio::sync::Semaphore>, n: u32, body: Bytes) -> Resp {
        let permit = memory.clone().try_acquire_many_owned(n).unwrap();
        let full = http_body_util::Full::new(body);
        let mut r = http::Response::new(tonic::body::Body::new(full));
        r.extensions_mut().insert(Held::new(permit));
        r
    }

    fn evidence(len: usize) -> Bytes {
        (0..len)
            .map(|i| (i % 251) as u8)
            .collect::<Vec<u8>>()
            .into()
    }

    /// The reservation a handler returns is held until the response's body
    /// is read to its end (or dropped), not only until the handler returns;
    /// a large one reaches the client whole, in slices.
    #[tokio::test]
    async fn a_reservation_lasts_until_the_body_is_sent() {
        let memory = Arc::new(tokio::sync::Semaphore::new(10));
        let resp = hold(
            response(&memory, 4, Bytes::from_static(b"evidence")),
            LIMITS,
        );
        assert!(resp.extensions().get::<Held>().is_none());
        assert_eq!(memory.available_permits(), 6, "held by the body");
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"evidence");
        assert_eq!(memory.available_permits(), 10, "released once sent");
        // A response without one passes as it is.
        let plain = hold(http::Response::new(tonic::body::Body::empty()), LIMITS);
        assert!(plain
            .into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .is_empty());
        // Past a slice: whole, in order, a slice at a time.
        let big = evidence(3 * SLICE + 17);
        let mut body = hold(response(&memory, 4, big.clone()), LIMITS).into_body();
        let mut got = Vec::new();
        while let Some(f) = body.frame().await {
            let d = f.unwrap().into_data().unwrap();
            assert!(d.len() <= SLICE);
            got.extend_from_slice(&d);
        }
        assert_eq!(got, big);
        assert_eq!(memory.available_permits(), 10);
    }

    /// A client that stops reading loses its response once `unread` passes
    /// without it taking a slice: its reservation is released while hyper
    /// (which polls a body only when the client reads) does not poll, and
    /// the next poll is an error, which resets the client's stream.
    #[tokio::test(start_paused = true)]
    async fn an_unread_response_is_dropped_with_its_reservation() {
        let memory = Arc::new(tokio::sync::Semaphore::new(10));
        let mut body = hold(response(&memory, 4, evidence(4 * SLICE)), LIMITS).into_body();
        // Read slowly, but read: kept.
        for _ in 0..2 {
            assert!(body.frame().await.unwrap().unwrap().is_data());
            tokio::time::sleep(Duration::from_secs(29)).await;
            assert_eq!(memory.available_permits(), 6);
        }
        // Then nothing for longer than `unread`.
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(memory.available_permits(), 10, "released unread");
        let next = body.frame().await.unwrap();
        assert_eq!(next.unwrap_err().code(), tonic::Code::DeadlineExceeded);
        // Without a limit on reading, kept until `within`.
        let limits = Limits::from_secs(0);
        let mut body = hold(response(&memory, 4, evidence(4 * SLICE)), limits).into_body();
        assert!(body.frame().await.unwrap().unwrap().is_data());
        tokio::time::sleep(Duration::from_secs(599)).await;
        assert_eq!(memory.available_permits(), 6);
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(memory.available_permits(), 10, "released at `within`");
        // A client that reads a slice every 29 s is cut at `within` too.
        let mut body = hold(response(&memory, 4, evidence(40 * SLICE)), LIMITS).into_body();
        let mut slices = 0;
        while let Some(Ok(f)) = body.frame().await {
            assert!(f.is_data());
            slices += 1;
            tokio::time::sleep(Duration::from_secs(29)).await;
        }
        assert_eq!(slices, 21, "600 s / 29 s");
        assert_eq!(memory.available_permits(), 10);
    }
}
