//! HTTP/1.1 from clients, served by the connection's own task: the request head is parsed
//! straight from the socket's buffer, the request is handled in the same task, and its answer
//! is written back from there. hyper's server spends a dispatcher, a body channel and several
//! moves of the request's future on each request; this path does none of that, as the
//! HTTP/1.1 client to backends (`h1`) does not. HTTP/2 (ALPN `h2`, h2c) stays with hyper.
//!
//! Framing follows RFC 9112: a request body is framed by `Transfer-Encoding` (chunked last)
//! or `Content-Length`; a head that cannot be framed is answered 400 and its connection
//! closed, one too large 431.

use std::{
    future::poll_fn,
    io,
    pin::Pin,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    task::{Context, Poll, ready},
    time::{Duration, SystemTime},
};

use bytes::{Buf as _, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Uri, Version, header};
use hyper::body::{Body as _, Frame, SizeHint};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    sync::oneshot,
};

use super::{
    h1::{self, Chunk, Decoded},
    proxy::{BoxError, RequestBody, RespBody},
};

const READ_SIZE: usize = 8 * 1024;
/// Body pieces up to this size go out in one write with their head or chunk line.
const COALESCE: usize = 16 * 1024;
/// The request-head and response-head buffers an idle connection keeps at most.
const KEPT: usize = 32 * 1024;
const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";
/// Before closing a connection whose client may still be sending, what is read and dropped:
/// closing with unread bytes would reset the connection, and the client could lose the
/// answer before reading it.
const LINGER_BYTES: usize = 1024 * 1024;
const LINGER_TIME: Duration = Duration::from_secs(2);

/// A client stream: plain TCP or TLS.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Io for T {}

/// What serves each request of a connection.
pub trait Service {
    fn call(&self, req: Request<RequestBody>) -> impl Future<Output = Response<RespBody>> + Send;
}

/// A connection switched to another protocol (101): its stream, and what the client sent
/// past its request head.
pub struct Upgraded {
    pub io: Box<dyn Io>,
    pub early: Bytes,
}

/// In the extensions of a request that asks for an upgrade: its connection once the 101
/// answer has gone. (Extensions must be `Clone`: the receiver is shared, and taken once.)
#[derive(Clone)]
pub struct OnUpgrade(Arc<Mutex<Option<oneshot::Receiver<Upgraded>>>>);

impl OnUpgrade {
    pub fn take(&self) -> Option<oneshot::Receiver<Upgraded>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).take()
    }
}

/// In the extensions of a response after which the connection closes: the request was
/// malformed in a way its head did not show (no valid Host), and what the client sends next
/// is not to be trusted either.
#[derive(Debug, Clone, Copy)]
pub struct CloseAfter;

/// Why a connection ended.
#[derive(Debug, thiserror::Error)]
pub enum Ended {
    #[error("malformed request: {0}")]
    Refused(&'static str),
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("response body: {0}")]
    Body(BoxError),
}

/// The connection's read side and stream, shared by its task and the body of the request
/// being served (which another task may read: HTTP/2 upstreams stream bodies from their own).
/// Locked only inside a poll, never across a wait.
struct Wire<I> {
    /// `None` once handed to a tunnel, or the connection is over.
    io: Option<I>,
    /// Read, not used yet.
    buf: BytesMut,
    body: Reading,
    /// Bytes of `100 Continue` still to send before the body is read.
    continue_left: usize,
    /// Which request's exchange is open: a body handle of an earlier one (a pipe task may
    /// still hold it) must not read what belongs to the next request.
    request: u64,
    /// The task waiting on the body, woken when its request's exchange ends.
    reader: Option<std::task::Waker>,
}

/// Where reading the current request's body stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reading {
    Done,
    Length(u64),
    Chunked(Chunk),
    /// Malformed or cut off: the connection cannot carry another request.
    Failed,
}

fn lock<I>(wire: &Mutex<Wire<I>>) -> MutexGuard<'_, Wire<I>> {
    wire.lock().unwrap_or_else(PoisonError::into_inner)
}

impl<I: Io> Wire<I> {
    fn new(io: I) -> Self {
        Self {
            io: Some(io),
            buf: BytesMut::new(),
            body: Reading::Done,
            continue_left: 0,
            request: 0,
            reader: None,
        }
    }

    /// Ends the current request's exchange: its body handles read nothing more. The waker of
    /// one waiting is returned, to be woken outside the lock (it then sees the end).
    #[must_use]
    fn end_exchange(&mut self) -> Option<std::task::Waker> {
        self.request += 1;
        self.continue_left = 0;
        self.reader.take()
    }

    fn io(&mut self) -> io::Result<Pin<&mut I>> {
        self.io.as_mut().map(Pin::new).ok_or_else(|| io::ErrorKind::NotConnected.into())
    }

    /// Reads more into `buf`; 0 at the end of the stream.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.buf.capacity() - self.buf.len() < READ_SIZE / 4 {
            self.buf.reserve(READ_SIZE);
        }
        let Some(io) = self.io.as_mut() else { return Poll::Ready(Ok(0)) };
        let spare = self.buf.spare_capacity_mut();
        let mut rb = ReadBuf::uninit(spare);
        ready!(Pin::new(io).poll_read(cx, &mut rb))?;
        let n = rb.filled().len();
        // SAFETY: the reader initialised the first `n` bytes of the spare capacity.
        unsafe { self.buf.set_len(self.buf.len() + n) };
        Poll::Ready(Ok(n))
    }

    /// Reads a request head; `Ok(None)` when the client closed between requests.
    fn poll_head(&mut self, cx: &mut Context<'_>, max: usize) -> Poll<Result<Option<Parsed>, Refusal>> {
        loop {
            if !self.buf.is_empty() {
                match parse(&mut self.buf, max) {
                    Ok(Some(p)) => return Poll::Ready(Ok(Some(p))),
                    Ok(None) if self.buf.len() >= max => return Poll::Ready(Err(Refusal::TOO_LARGE)),
                    Ok(None) => {}
                    Err(r) => return Poll::Ready(Err(r)),
                }
            }
            match ready!(self.poll_fill(cx)) {
                Ok(0) if self.buf.is_empty() => return Poll::Ready(Ok(None)),
                // Gone mid-head: nobody to answer.
                Ok(0) | Err(_) => return Poll::Ready(Err(Refusal::Quiet)),
                Ok(_) => {}
            }
        }
    }

    /// Sends what is left of `100 Continue`.
    fn poll_continue(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.continue_left > 0 {
            let from = CONTINUE.len() - self.continue_left;
            let n = ready!(self.io()?.poll_write(cx, &CONTINUE[from..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.continue_left -= n;
            if self.continue_left == 0 {
                ready!(self.io()?.poll_flush(cx))?;
            }
        }
        Poll::Ready(Ok(()))
    }

    fn poll_body(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes, BoxError>>> {
        loop {
            match &mut self.body {
                Reading::Done => return Poll::Ready(None),
                Reading::Failed => return Poll::Ready(Some(Err("request body broken off".into()))),
                Reading::Length(left) => {
                    if !self.buf.is_empty() {
                        let take = usize::try_from(*left).unwrap_or(usize::MAX).min(self.buf.len());
                        *left -= take as u64;
                        if *left == 0 {
                            self.body = Reading::Done;
                        }
                        return Poll::Ready(Some(Ok(self.buf.split_to(take).freeze())));
                    }
                }
                Reading::Chunked(state) => match h1::decode_chunked(state, &mut self.buf) {
                    Ok(Decoded::Data(d)) => return Poll::Ready(Some(Ok(d))),
                    Ok(Decoded::End) => {
                        self.body = Reading::Done;
                        return Poll::Ready(None);
                    }
                    Ok(Decoded::More) => {}
                    Err(e) => {
                        self.body = Reading::Failed;
                        return Poll::Ready(Some(Err(e.into())));
                    }
                },
            }
            // More is needed from the client, which may wait to be told to go on.
            let read = match ready!(self.poll_continue(cx)) {
                Ok(()) => ready!(self.poll_fill(cx)),
                Err(e) => Err(e),
            };
            match read {
                Ok(0) => {
                    self.body = Reading::Failed;
                    return Poll::Ready(Some(Err("the client closed the connection mid-body".into())));
                }
                Ok(_) => {}
                Err(e) => {
                    self.body = Reading::Failed;
                    return Poll::Ready(Some(Err(e.into())));
                }
            }
        }
    }

    /// Finishes the body from what is already read, if it all came: the connection can then
    /// carry the next request though the handler did not read the body.
    fn skip_buffered_body(&mut self) -> bool {
        loop {
            match &mut self.body {
                Reading::Done => return true,
                Reading::Failed => return false,
                Reading::Length(left) => {
                    if (self.buf.len() as u64) < *left {
                        return false;
                    }
                    #[expect(clippy::cast_possible_truncation, reason = "at most buf.len()")]
                    self.buf.advance(*left as usize);
                    self.body = Reading::Done;
                }
                Reading::Chunked(state) => match h1::decode_chunked(state, &mut self.buf) {
                    Ok(Decoded::Data(_)) => {}
                    Ok(Decoded::End) => self.body = Reading::Done,
                    Ok(Decoded::More) | Err(_) => return false,
                },
            }
        }
    }
}

/// What the body of a request reads through.
trait Source: Send + Sync {
    fn poll_body(&self, request: u64, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes, BoxError>>>;
    fn reading(&self, request: u64) -> Reading;
}

impl<I: Io> Source for Mutex<Wire<I>> {
    fn poll_body(&self, request: u64, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes, BoxError>>> {
        let mut w = lock(self);
        if w.request != request {
            return Poll::Ready(Some(Err("the request's exchange is over".into())));
        }
        let r = w.poll_body(cx);
        if r.is_pending() && !w.reader.as_ref().is_some_and(|k| k.will_wake(cx.waker())) {
            w.reader = Some(cx.waker().clone());
        }
        r
    }

    fn reading(&self, request: u64) -> Reading {
        let w = lock(self);
        if w.request == request { w.body } else { Reading::Failed }
    }
}

/// A request body, read from the client's connection as it is asked for, while its request's
/// exchange is open.
pub struct Body {
    wire: Arc<dyn Source>,
    request: u64,
}

impl hyper::body::Body for Body {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.wire.poll_body(self.request, cx).map(|d| d.map(|d| d.map(Frame::data)))
    }

    fn is_end_stream(&self) -> bool {
        self.wire.reading(self.request) == Reading::Done
    }

    fn size_hint(&self) -> SizeHint {
        match self.wire.reading(self.request) {
            Reading::Done => SizeHint::with_exact(0),
            Reading::Length(n) => SizeHint::with_exact(n),
            Reading::Chunked(_) | Reading::Failed => SizeHint::default(),
        }
    }
}

/// A request head that is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    /// Answered with this status, then closed.
    Status(StatusCode, &'static str),
    /// Closed without an answer.
    Quiet,
}

impl Refusal {
    const TOO_LARGE: Self =
        Self::Status(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE, "request head too large");

    const fn bad(why: &'static str) -> Self {
        Self::Status(StatusCode::BAD_REQUEST, why)
    }
}

/// A parsed request head and what this hop makes of it.
struct Parsed {
    req: Request<()>,
    body: Reading,
    /// The connection can carry another request after this one (as far as the request says).
    keep_alive: bool,
    expect_continue: bool,
    upgrade: bool,
}

/// What this hop needs of a request's fields, noted as they are parsed.
#[derive(Default)]
#[expect(clippy::struct_excessive_bools, reason = "independent facts of one head")]
struct Asked {
    close: bool,
    keep_alive: bool,
    upgrade: bool,
    expect_continue: bool,
    /// Transfer codings named, how many of them `chunked`, and whether it came last.
    codings: usize,
    chunked: usize,
    chunked_last: bool,
    lengths: usize,
    /// A length given as a list (`5, 5`), to be passed on as one value.
    listed: bool,
    length: Option<u64>,
    bad_length: bool,
    hosts: usize,
}

impl Asked {
    fn note(&mut self, name: &HeaderName, v: &HeaderValue) {
        if *name == header::CONNECTION {
            for t in v.to_str().unwrap_or("").split(',').map(str::trim) {
                self.close |= t.eq_ignore_ascii_case("close");
                self.keep_alive |= t.eq_ignore_ascii_case("keep-alive");
                self.upgrade |= t.eq_ignore_ascii_case("upgrade");
            }
        } else if *name == header::TRANSFER_ENCODING {
            // Fields in order make one list (RFC 9110 5.3).
            for c in v.to_str().unwrap_or("?").split(',').map(str::trim).filter(|c| !c.is_empty()) {
                self.codings += 1;
                self.chunked_last = c.eq_ignore_ascii_case("chunked");
                self.chunked += usize::from(self.chunked_last);
            }
        } else if *name == header::CONTENT_LENGTH {
            self.lengths += 1;
            let text = v.to_str().unwrap_or("");
            self.listed |= text.contains(',');
            for part in text.split(',') {
                match h1::digits(part.trim(), 10) {
                    Some(n) if self.length.is_none_or(|l| l == n) => self.length = Some(n),
                    _ => self.bad_length = true,
                }
            }
        } else if *name == header::HOST {
            self.hosts += 1;
        } else if *name == header::EXPECT {
            self.expect_continue |= v.as_bytes().eq_ignore_ascii_case(b"100-continue");
        }
    }
}

/// Parses a complete request head off the front of `buf`; `None` while more is needed.
fn parse(buf: &mut BytesMut, max: usize) -> Result<Option<Parsed>, Refusal> {
    // Left uninitialised: 4 KiB of empty slots per head otherwise.
    let mut slots = [const { std::mem::MaybeUninit::uninit() }; h1::MAX_HEADERS];
    let mut r = httparse::Request::new(&mut []);
    let len = match r.parse_with_uninit_headers(buf, &mut slots) {
        Ok(httparse::Status::Complete(n)) if n <= max => n,
        Ok(httparse::Status::Complete(_)) | Err(httparse::Error::TooManyHeaders) => {
            return Err(Refusal::TOO_LARGE);
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => return Err(Refusal::bad("malformed request head")),
    };
    let (Some(method), Some(path)) = (r.method, r.path) else {
        return Err(Refusal::bad("malformed request line"));
    };
    let method = Method::from_bytes(method.as_bytes()).map_err(|_| Refusal::bad("bad method"))?;
    let version = if r.version == Some(0) { Version::HTTP_10 } else { Version::HTTP_11 };
    // Where the target and each field sit in the head, so they can share its bytes.
    let target = path.as_ptr() as usize - buf.as_ptr() as usize;
    let target = target..target + path.len();
    let mut spans = h1::Spans::new();
    spans.fill(buf, r.headers);
    let head = buf.split_to(len).freeze();
    let uri = Uri::from_maybe_shared(head.slice(target)).map_err(|_| Refusal::bad("bad request target"))?;
    let mut headers = HeaderMap::with_capacity(spans.len());
    let mut asked = Asked::default();
    for field in spans.fields(&head) {
        let (name, v) = field.map_err(Refusal::bad)?;
        asked.note(&name, &v);
        headers.append(name, v);
    }
    // RFC 9112 6.1-6.3: a transfer coding frames the body (chunked last, else the length
    // cannot be known), over any Content-Length; such a message closes its connection.
    let mut keep_alive = !asked.close && (version == Version::HTTP_11 || asked.keep_alive);
    let body = if asked.codings > 0 {
        if version == Version::HTTP_10 {
            return Err(Refusal::bad("transfer-encoding in an HTTP/1.0 request"));
        }
        if !asked.chunked_last || asked.chunked > 1 {
            return Err(Refusal::bad("transfer-encoding without chunked once and last"));
        }
        if asked.codings > 1 {
            // Other codings would reach the backend undone, and unnamed.
            return Err(Refusal::Status(StatusCode::NOT_IMPLEMENTED, "transfer coding other than chunked"));
        }
        if asked.lengths > 0 {
            headers.remove(header::CONTENT_LENGTH);
            keep_alive = false;
        }
        Reading::Chunked(Chunk::Size)
    } else if asked.bad_length {
        return Err(Refusal::bad("bad content-length"));
    } else {
        if let Some(n) = asked.length
            && (asked.lengths > 1 || asked.listed)
        {
            // One plain value goes on (RFC 9110 8.6), not `5, 5` or repeated fields.
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from(n));
        }
        match asked.length {
            None | Some(0) => Reading::Done,
            Some(n) => Reading::Length(n),
        }
    };
    // RFC 9112 3.2: one Host; a reverse proxy serves no CONNECT, and authority-form is
    // CONNECT's alone; an absolute-form target's authority is the host (3.2.2).
    if asked.hosts > 1 {
        return Err(Refusal::bad("more than one host"));
    }
    if method == Method::CONNECT {
        return Err(Refusal::Status(StatusCode::METHOD_NOT_ALLOWED, "CONNECT"));
    }
    if let Some(authority) = uri.authority() {
        if uri.scheme().is_none() {
            return Err(Refusal::bad("authority-form target"));
        }
        let host = authority.as_str().rsplit('@').next().unwrap_or_default();
        let host = HeaderValue::from_str(host).map_err(|_| Refusal::bad("bad request target"))?;
        headers.insert(header::HOST, host);
    }
    let mut req = Request::new(());
    *req.method_mut() = method;
    *req.uri_mut() = uri;
    *req.version_mut() = version;
    *req.headers_mut() = headers;
    let upgrade = asked.upgrade && version == Version::HTTP_11 && req.headers().contains_key(header::UPGRADE);
    let expect_continue = asked.expect_continue && version == Version::HTTP_11 && body != Reading::Done;
    Ok(Some(Parsed { req, body, keep_alive, expect_continue, upgrade }))
}

/// How a response body goes on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// No body (HEAD, 1xx, 204, 304); the length the full answer would have is announced
    /// when the response's fields do not say it.
    None(Option<u64>),
    Length(u64),
    Chunked,
    /// Until the connection closes (HTTP/1.0 clients, length unknown).
    Close,
}

/// How an answer's body goes: `length` is what the body says of its length, then what its
/// `Content-Length` field says.
fn framing(
    status: StatusCode,
    switching: bool,
    head_only: bool,
    v10: bool,
    length: (Option<u64>, Option<u64>),
) -> Framing {
    let (exact, field) = length;
    if switching || status == StatusCode::NO_CONTENT {
        Framing::None(None)
    } else if head_only || status == StatusCode::NOT_MODIFIED {
        // The length the full answer would have: its field, else what the body says.
        Framing::None(exact.filter(|n| field.is_none() && *n > 0))
    } else {
        match (exact, field) {
            (Some(n), _) | (None, Some(n)) => Framing::Length(n),
            (None, None) if v10 => Framing::Close,
            (None, None) => Framing::Chunked,
        }
    }
}

/// Closes the connection when its server ends or is dropped (the watchdog drops it), whoever
/// still holds the wire: a body handle in another task ends with it.
struct Closing<I: Io>(Arc<Mutex<Wire<I>>>);

impl<I: Io> Drop for Closing<I> {
    fn drop(&mut self) {
        let mut w = lock(&self.0);
        let waiting = w.end_exchange();
        let io = w.io.take();
        drop(w);
        drop(io);
        if let Some(k) = waiting {
            k.wake();
        }
    }
}

/// Serves HTTP/1.1 requests on `io` until the client leaves, a request cannot be read, or a
/// response says the connection ends. `read`: bytes already read from it; `max_head`: the
/// largest request head read (431 past it).
pub async fn serve<I: Io, S: Service>(io: I, read: &[u8], max_head: usize, service: &S) -> Result<(), Ended> {
    let mut wire = Wire::new(io);
    wire.buf.extend_from_slice(read);
    let closing = Closing(Arc::new(Mutex::new(wire)));
    let wire = &closing.0;
    let mut out = Vec::new();
    loop {
        let parsed = match poll_fn(|cx| lock(wire).poll_head(cx, max_head)).await {
            Ok(Some(p)) => p,
            Ok(None) | Err(Refusal::Quiet) => return Ok(()),
            Err(Refusal::Status(status, why)) => {
                out.clear();
                refusal_head(&mut out, status);
                if write_all(wire, &out).await.is_ok() && flush(wire).await.is_ok() {
                    linger(wire).await;
                }
                return Err(Ended::Refused(why));
            }
        };
        let Parsed { req, body, keep_alive, expect_continue, upgrade } = parsed;
        let request = {
            let mut w = lock(wire);
            w.body = body;
            w.continue_left = if expect_continue { CONTINUE.len() } else { 0 };
            w.request
        };
        let head_only = req.method() == Method::HEAD;
        let v10 = req.version() == Version::HTTP_10;
        let body = if body == Reading::Done {
            RequestBody::Empty
        } else {
            RequestBody::H1(Body { wire: wire.clone(), request })
        };
        let mut req = req.map(|()| body);
        let mut on_upgrade = None;
        if upgrade {
            let (tx, rx) = oneshot::channel();
            req.extensions_mut().insert(OnUpgrade(Arc::new(Mutex::new(Some(rx)))));
            on_upgrade = Some(tx);
        }
        // Kept whole, its body written by reference: each move of a response is ~0.5 KB.
        let mut resp = {
            pin_here!(call = service.call(req));
            call.await
        };
        let status = resp.status();
        out.clear();
        {
            // The final answer ends any `100 Continue`; one cut short is finished first.
            let mut w = lock(wire);
            let left = std::mem::take(&mut w.continue_left);
            if left > 0 && left < CONTINUE.len() {
                out.extend_from_slice(&CONTINUE[CONTINUE.len() - left..]);
            }
        }
        let switching = status == StatusCode::SWITCHING_PROTOCOLS && on_upgrade.is_some();
        if status.is_informational() && !switching {
            // A final answer cannot be interim, and a switch nobody asked for would turn the
            // connection into something else.
            drop(resp);
            refusal_head(&mut out, StatusCode::BAD_GATEWAY);
            if write_all(wire, &out).await.is_ok() && flush(wire).await.is_ok() {
                linger(wire).await;
            }
            return Err(Ended::Refused("an interim answer as the final one"));
        }
        let length = (resp.body().size_hint().exact(), super::proxy::content_length(resp.headers()));
        let framing = framing(status, switching, head_only, v10, length);
        let mut keep =
            keep_alive && framing != Framing::Close && resp.extensions().get::<CloseAfter>().is_none();
        encode_head(&mut out, status, resp.headers(), resp.body().raw_fields(), framing, keep, v10);
        keep &= {
            pin_here!(writing = write_response(wire, &mut out, resp.body_mut(), framing));
            writing.await?
        };
        // Dropped once all is written: the request ends there for the connection's watchdog
        // (which must not write a 408 into an answer still going out), and is logged.
        drop(resp);
        let waiting = {
            let mut w = lock(wire);
            let waiting = w.end_exchange();
            if switching && let Some(tx) = on_upgrade {
                let early = w.buf.split().freeze();
                if let Some(io) = w.io.take() {
                    let _ = tx.send(Upgraded { io: Box::new(io), early });
                }
                return Ok(());
            }
            keep &= w.skip_buffered_body();
            // An idle connection holds no large buffers (a long head, a body read ahead).
            if w.buf.is_empty() && w.buf.capacity() > KEPT {
                w.buf = BytesMut::new();
            }
            waiting
        };
        if let Some(k) = waiting {
            k.wake();
        }
        if !keep {
            linger(wire).await;
            return Ok(());
        }
        if out.capacity() > KEPT {
            out = Vec::new();
        }
    }
}

/// Writes a response's head (in `out`) and body; `Ok(false)` when the body ended early and
/// the connection cannot go on. What is ready goes out together; whenever the body waits,
/// what came before it goes out first (a stream of events is not held back).
async fn write_response<I: Io>(
    wire: &Mutex<Wire<I>>,
    out: &mut Vec<u8>,
    body: &mut RespBody,
    framing: Framing,
) -> Result<bool, Ended> {
    let mut sent: u64 = 0;
    let mut whole = true;
    if !matches!(framing, Framing::None(_)) {
        loop {
            let frame = match poll_fn(|cx| Poll::Ready(Pin::new(&mut *body).poll_frame(cx))).await {
                Poll::Ready(f) => f,
                Poll::Pending => {
                    write_all(wire, out).await?;
                    out.clear();
                    flush(wire).await?;
                    poll_fn(|cx| Pin::new(&mut *body).poll_frame(cx)).await
                }
            };
            let mut data = match frame {
                None => break,
                Some(Err(e)) => {
                    // Nothing can tell the client but the connection's end.
                    write_all(wire, out).await?;
                    return Err(Ended::Body(e));
                }
                Some(Ok(f)) => match f.into_data() {
                    Ok(d) if !d.is_empty() => d,
                    _ => continue,
                },
            };
            if let Framing::Length(n) = framing
                && sent + data.len() as u64 > n
            {
                // Longer than its Content-Length said: what is past it would be read as
                // the next answer. Cut, and the connection closes.
                #[expect(clippy::cast_possible_truncation, reason = "less than data.len()")]
                data.truncate((n - sent) as usize);
                out.extend_from_slice(&data);
                sent = n;
                whole = false;
                break;
            }
            sent += data.len() as u64;
            if framing == Framing::Chunked {
                out.extend_from_slice(format!("{:x}\r\n", data.len()).as_bytes());
            }
            if data.len() <= COALESCE {
                out.extend_from_slice(&data);
            } else {
                write_all(wire, out).await?;
                out.clear();
                write_all(wire, &data).await?;
            }
            if framing == Framing::Chunked {
                out.extend_from_slice(b"\r\n");
            }
            if out.len() >= COALESCE {
                write_all(wire, out).await?;
                out.clear();
            }
        }
        match framing {
            Framing::Chunked => out.extend_from_slice(b"0\r\n\r\n"),
            Framing::Length(n) if n != sent => whole = false,
            _ => {}
        }
    }
    write_all(wire, out).await?;
    flush(wire).await?;
    Ok(whole)
}

async fn write_all<I: Io>(wire: &Mutex<Wire<I>>, mut bytes: &[u8]) -> io::Result<()> {
    while !bytes.is_empty() {
        let n = poll_fn(|cx| lock(wire).io()?.poll_write(cx, bytes)).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        bytes = &bytes[n..];
    }
    Ok(())
}

async fn flush<I: Io>(wire: &Mutex<Wire<I>>) -> io::Result<()> {
    poll_fn(|cx| lock(wire).io()?.poll_flush(cx)).await
}

/// The head of an answer the server makes itself before closing: a refused request head, a
/// backend's interim answer given as final.
fn refusal_head(out: &mut Vec<u8>, status: StatusCode) {
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\nconnection: close\r\ncontent-length: 0\r\n");
    write_date(out);
    out.extend_from_slice(b"\r\n");
}

/// Closes the sending side, then reads and drops what the client still sends, for a while.
async fn linger<I: Io>(wire: &Mutex<Wire<I>>) {
    let drain = async {
        // TLS sends its close_notify first, which may wait on a full send buffer: within the
        // time as well.
        if poll_fn(|cx| lock(wire).io()?.poll_shutdown(cx)).await.is_err() {
            return;
        }
        let mut dropped = 0;
        loop {
            let n = poll_fn(|cx| {
                let mut w = lock(wire);
                w.buf.clear();
                w.poll_fill(cx)
            })
            .await;
            match n {
                Ok(n) if n > 0 && dropped < LINGER_BYTES => dropped += n,
                _ => return,
            }
        }
    };
    let _ = tokio::time::timeout(LINGER_TIME, drain).await;
}

/// Writes the status line and fields of a response, with this hop's framing and connection
/// fields.
fn encode_head(
    out: &mut Vec<u8>,
    status: StatusCode,
    headers: &HeaderMap,
    raw: Option<&h1::RawFields>,
    framing: Framing,
    keep: bool,
    v10: bool,
) {
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    // A HEAD or 304 answer keeps the length the full answer would have; other framing is
    // this hop's, written below. 1xx and 204 have none (RFC 9110 8.6).
    let keeps_length =
        matches!(framing, Framing::None(_)) && !status.is_informational() && status != StatusCode::NO_CONTENT;
    let mut dated = false;
    // The backend's fields as they came (less this hop's and the framing ones), then any
    // the edge added.
    if let Some(raw) = raw {
        dated = raw.dated;
        for line in raw.lines() {
            out.extend_from_slice(line);
            out.extend_from_slice(b"\r\n");
        }
    }
    for (name, value) in headers {
        if *name == header::TRANSFER_ENCODING || (*name == header::CONTENT_LENGTH && !keeps_length) {
            continue;
        }
        dated |= *name == header::DATE;
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    match framing {
        Framing::Length(n) | Framing::None(Some(n)) => {
            out.extend_from_slice(b"content-length: ");
            out.extend_from_slice(h1::itoa_u64(n, &mut [0; 20]));
            out.extend_from_slice(b"\r\n");
        }
        Framing::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        Framing::None(None) | Framing::Close => {}
    }
    if !dated {
        write_date(out);
    }
    if status != StatusCode::SWITCHING_PROTOCOLS {
        if !keep {
            out.extend_from_slice(b"connection: close\r\n");
        } else if v10 {
            out.extend_from_slice(b"connection: keep-alive\r\n");
        }
    }
    out.extend_from_slice(b"\r\n");
}

thread_local! {
    /// The `Date` line of the current second, made once a second per thread.
    static DATE: std::cell::RefCell<Option<(u64, [u8; 37])>> = const { std::cell::RefCell::new(None) };
}

/// Writes the `Date` line; none with a clock before 1970.
fn write_date(out: &mut Vec<u8>) {
    let now = SystemTime::now();
    let Ok(since) = now.duration_since(SystemTime::UNIX_EPOCH) else { return };
    let secs = since.as_secs();
    DATE.with_borrow_mut(|date| {
        if date.is_none_or(|(at, _)| at != secs) {
            // "date: " + IMF-fixdate (29 bytes) + CRLF.
            let text = httpdate::fmt_http_date(now);
            let mut line = [0; 37];
            if text.len() != 29 {
                return;
            }
            line[..6].copy_from_slice(b"date: ");
            line[6..35].copy_from_slice(text.as_bytes());
            line[35..].copy_from_slice(b"\r\n");
            *date = Some((secs, line));
        }
        if let Some((_, line)) = date {
            out.extend_from_slice(line);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(text: &str) -> Result<Option<Parsed>, Refusal> {
        parse(&mut BytesMut::from(text), 64 * 1024)
    }

    fn refusal(text: &str) -> Option<StatusCode> {
        match parsed(text) {
            Err(Refusal::Status(s, _)) => Some(s),
            _ => None,
        }
    }

    #[test]
    fn request_heads_are_framed_as_rfc_9112_says() {
        let p = parsed("GET /a?b=1 HTTP/1.1\r\nHost: x\r\nX-A: 1\r\n\r\n").unwrap().unwrap();
        assert_eq!(
            (p.req.method(), p.req.uri().path(), p.req.uri().query()),
            (&Method::GET, "/a", Some("b=1"))
        );
        assert_eq!((p.body, p.keep_alive, p.upgrade), (Reading::Done, true, false));
        assert_eq!(p.req.headers()["x-a"], "1");
        let p = parsed("POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\n").unwrap().unwrap();
        assert_eq!(p.body, Reading::Length(5));
        let p = parsed("POST / HTTP/1.1\r\nContent-Length: 5, 5\r\n\r\n").unwrap().unwrap();
        assert_eq!(p.body, Reading::Length(5));
        assert_eq!(p.req.headers()[header::CONTENT_LENGTH], "5", "passed on as one value");
        assert_eq!(
            refusal("POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n"),
            Some(StatusCode::BAD_REQUEST)
        );
        assert_eq!(refusal("POST / HTTP/1.1\r\nContent-Length: +5\r\n\r\n"), Some(StatusCode::BAD_REQUEST));
        assert_eq!(
            refusal("POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"),
            Some(StatusCode::NOT_IMPLEMENTED),
            "a coding lb would pass on undone"
        );
        assert_eq!(
            refusal("POST / HTTP/1.1\r\nTransfer-Encoding: chunked, chunked\r\n\r\n"),
            Some(StatusCode::BAD_REQUEST)
        );
        assert_eq!(
            refusal("POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n"),
            Some(StatusCode::BAD_REQUEST),
            "fields make one list"
        );
        assert_eq!(refusal("GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n"), Some(StatusCode::BAD_REQUEST));
        assert_eq!(
            refusal("CONNECT a.example:443 HTTP/1.1\r\nHost: a.example:443\r\n\r\n"),
            Some(StatusCode::METHOD_NOT_ALLOWED)
        );
        assert_eq!(
            refusal("GET a.example:80 HTTP/1.1\r\nHost: b.example\r\n\r\n"),
            Some(StatusCode::BAD_REQUEST),
            "authority-form"
        );
        let p = parsed("GET http://a.example:81/x HTTP/1.1\r\nHost: b.example\r\n\r\n").unwrap().unwrap();
        assert_eq!(
            p.req.headers()[header::HOST],
            "a.example:81",
            "absolute form: the target's authority is the host"
        );
        let p = parsed("POST / HTTP/1.1\r\nTransfer-Encoding: Chunked\r\nContent-Length: 5\r\n\r\n");
        let p = p.unwrap().unwrap();
        assert_eq!(p.body, Reading::Chunked(Chunk::Size));
        assert!(!p.keep_alive, "both framings: closed after");
        assert!(!p.req.headers().contains_key(header::CONTENT_LENGTH), "the length is not passed on");
        assert_eq!(
            refusal("POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n"),
            Some(StatusCode::BAD_REQUEST)
        );
        assert_eq!(
            refusal("POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n"),
            Some(StatusCode::BAD_REQUEST)
        );
        let p = parsed("GET / HTTP/1.0\r\n\r\n").unwrap().unwrap();
        assert!(!p.keep_alive, "HTTP/1.0 closes unless asked");
        let p = parsed("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n").unwrap().unwrap();
        assert!(p.keep_alive);
        let p = parsed("GET / HTTP/1.1\r\nConnection: close\r\n\r\n").unwrap().unwrap();
        assert!(!p.keep_alive);
        let p = parsed("GET /ws HTTP/1.1\r\nConnection: keep-alive, Upgrade\r\nUpgrade: websocket\r\n\r\n");
        assert!(p.unwrap().unwrap().upgrade);
        let p =
            parsed("PUT / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n").unwrap().unwrap();
        assert!(p.expect_continue);
        let p = parsed("GET / HTTP/1.1\r\nExpect: 100-continue\r\n\r\n").unwrap().unwrap();
        assert!(!p.expect_continue, "no body, nothing to wait for");

        assert!(parsed("GET / HTTP/1.1\r\nHost: x\r\n").unwrap().is_none(), "partial");
        assert_eq!(refusal("GARBAGE\r\n\r\n"), Some(StatusCode::BAD_REQUEST));
        assert_eq!(refusal("GET / HTTP/1.1\r\nBad Name: 1\r\n\r\n"), Some(StatusCode::BAD_REQUEST));
        let many = "x-n: v\r\n".repeat(h1::MAX_HEADERS + 1);
        assert_eq!(
            refusal(&format!("GET / HTTP/1.1\r\n{many}\r\n")),
            Some(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE)
        );
        let long = "x".repeat(1000);
        let r = parse(&mut BytesMut::from(format!("GET / HTTP/1.1\r\nx: {long}\r\n\r\n").as_str()), 512);
        assert!(matches!(r, Err(Refusal::Status(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE, _))));
    }

    #[test]
    fn the_next_request_stays_in_the_buffer() {
        let mut buf = BytesMut::from("GET /1 HTTP/1.1\r\n\r\nGET /2 HTTP/1.1\r\n\r\n");
        let p = parse(&mut buf, 1024).unwrap().unwrap();
        assert_eq!(p.req.uri().path(), "/1");
        assert_eq!(&buf[..], b"GET /2 HTTP/1.1\r\n\r\n");
    }

    fn head(status: u16, fields: &[(&str, &str)], framing: Framing, keep: bool, v10: bool) -> String {
        let mut h = HeaderMap::new();
        for (k, v) in fields {
            h.append(HeaderName::from_bytes(k.as_bytes()).unwrap(), HeaderValue::from_str(v).unwrap());
        }
        let mut out = Vec::new();
        encode_head(&mut out, StatusCode::from_u16(status).unwrap(), &h, None, framing, keep, v10);
        let text = String::from_utf8(out).unwrap();
        // The date changes: checked for, then taken out.
        let start = text.find("date: ").expect("a date");
        let end = start + text[start..].find("\r\n").unwrap() + 2;
        format!("{}{}", &text[..start], &text[end..])
    }

    #[test]
    fn response_heads_carry_this_hops_framing() {
        let ct = ("content-type", "text/plain");
        assert_eq!(
            head(200, &[ct, ("content-length", "99")], Framing::Length(3), true, false),
            "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 3\r\n\r\n"
        );
        assert_eq!(
            head(200, &[("transfer-encoding", "chunked")], Framing::Chunked, false, false),
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n"
        );
        assert_eq!(
            head(200, &[("content-length", "10")], Framing::None(None), true, true),
            "HTTP/1.1 200 OK\r\ncontent-length: 10\r\nconnection: keep-alive\r\n\r\n",
            "HEAD keeps the length; HTTP/1.0 is told the connection stays"
        );
        assert_eq!(
            head(404, &[ct], Framing::None(Some(31)), true, false),
            "HTTP/1.1 404 Not Found\r\ncontent-type: text/plain\r\ncontent-length: 31\r\n\r\n",
            "HEAD of an answer whose length only its body knows"
        );
        assert_eq!(
            head(204, &[("content-length", "0")], Framing::None(None), true, false),
            "HTTP/1.1 204 No Content\r\n\r\n"
        );
        assert_eq!(
            head(
                101,
                &[("connection", "upgrade"), ("upgrade", "websocket")],
                Framing::None(None),
                false,
                false
            ),
            "HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n"
        );
        let mut out = Vec::new();
        let mut h = HeaderMap::new();
        h.insert(header::DATE, HeaderValue::from_static("Sat, 21 Nov 2026 10:00:00 GMT"));
        encode_head(&mut out, StatusCode::OK, &h, None, Framing::Length(0), true, false);
        assert_eq!(
            out, b"HTTP/1.1 200 OK\r\ndate: Sat, 21 Nov 2026 10:00:00 GMT\r\ncontent-length: 0\r\n\r\n",
            "one date"
        );
        let mut line = Vec::new();
        write_date(&mut line);
        let text = String::from_utf8(line).unwrap();
        assert!(httpdate::parse_http_date(text.strip_prefix("date: ").unwrap().trim_end()).is_ok(), "{text}");
    }

    #[test]
    fn answers_are_framed_by_status_method_and_length() {
        let ok = StatusCode::OK;
        assert_eq!(
            framing(ok, false, false, false, (Some(3), Some(9))),
            Framing::Length(3),
            "the body's own length"
        );
        assert_eq!(framing(ok, false, false, false, (None, Some(9))), Framing::Length(9));
        assert_eq!(framing(ok, false, false, false, (None, None)), Framing::Chunked);
        assert_eq!(
            framing(ok, false, false, true, (None, None)),
            Framing::Close,
            "HTTP/1.0: until the close"
        );
        assert_eq!(
            framing(ok, false, true, false, (Some(31), None)),
            Framing::None(Some(31)),
            "HEAD announces"
        );
        assert_eq!(
            framing(ok, false, true, false, (Some(0), Some(3))),
            Framing::None(None),
            "HEAD keeps its field"
        );
        assert_eq!(
            framing(StatusCode::NO_CONTENT, false, false, false, (Some(0), None)),
            Framing::None(None)
        );
        assert_eq!(
            framing(StatusCode::NOT_MODIFIED, false, false, false, (None, Some(5))),
            Framing::None(None)
        );
        assert_eq!(
            framing(StatusCode::SWITCHING_PROTOCOLS, true, false, false, (None, None)),
            Framing::None(None)
        );
    }

    #[tokio::test]
    async fn a_body_handle_reads_nothing_once_its_exchange_is_over() {
        use tokio::io::AsyncWriteExt as _;
        let (ours, mut client) = tokio::io::duplex(1024);
        let wire: Arc<Mutex<Wire<_>>> = Arc::new(Mutex::new(Wire::new(ours)));
        lock(&wire).body = Reading::Length(5);
        let mut body = Body { wire: wire.clone(), request: 0 };
        client.write_all(b"he").await.unwrap();
        let d = poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await.unwrap().unwrap();
        assert_eq!(d.into_data().unwrap(), "he");
        // The rest is awaited; the exchange ends meanwhile (an early answer): the waiting
        // reader is woken and gets an error, and the bytes stay for the connection.
        let waiting = tokio::spawn(async move { poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await });
        tokio::task::yield_now().await;
        let k = lock(&wire).end_exchange();
        k.expect("a reader waited").wake();
        let r = waiting.await.unwrap();
        assert!(matches!(r, Some(Err(_))), "a stale handle fails");
        client.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        let p = poll_fn(|cx| lock(&wire).poll_head(cx, 1024)).await;
        assert!(matches!(p, Ok(Some(_))), "the next request's bytes were left for it");
    }
}
