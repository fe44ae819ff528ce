//! HTTP/1.1 to backends, driven by the request's own task: the request head and body are
//! written straight to the backend's socket and the response read back from it, with no
//! connection task, channel or wake-up between them (hyper's client conn spends three task
//! polls and two channels on each request). The response body reads the same socket as the
//! client takes it, and gives the connection back to its pool at its last byte.
//!
//! Parsing is httparse's (hyper's own parser); framing follows RFC 9112 section 6.3.

use std::{
    io,
    os::fd::AsRawFd as _,
    pin::Pin,
    task::{Context, Poll, ready},
};

use bytes::{Buf as _, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Version, header};
use hyper::body::{Body, Frame, SizeHint};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};

use super::{
    pool::Outgoing,
    proxy::{BoxError, ClientBody, Frames, ReqBody},
};

/// Largest response head read (as the edge's own request header limit).
const MAX_HEAD: usize = 64 * 1024;
/// Most fields in a head (a request's more: 431; a response's: 502). At most 128: a raw
/// answer's fields are told apart by a 128-bit mask.
pub(super) const MAX_HEADERS: usize = 128;
const _: () = assert!(MAX_HEADERS <= 128);
/// Longest chunk-size line or trailer section.
const MAX_CHUNK_LINE: usize = 4096;
const READ_MIN: usize = 16 * 1024;
const READ_MAX: usize = 256 * 1024;
/// Bodies up to this size go out in one write with their head.
const COALESCE: usize = 16 * 1024;
/// The largest request-head buffer an idle connection keeps: a head with a body sent along.
const OUT_KEPT: usize = COALESCE + 4 * 1024;

/// A backend connection: plain TCP or TLS.
pub enum Stream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl AsyncRead for Stream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    // Vectored, as the sockets are: HTTP/2 writes frame heads and payloads together then.
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Self::Plain(s) => s.is_write_vectored(),
            Self::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_flush(cx),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

impl Stream {
    fn tcp(&self) -> &TcpStream {
        match self {
            Self::Plain(s) => s,
            Self::Tls(s) => s.get_ref().0,
        }
    }
}

/// Why an exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The connection was found closed (or reset) before a byte of the request went: safe to
    /// send elsewhere, whatever the method.
    #[error("connection closed before the request was written")]
    Unsent,
    /// The backend closed (or reset) the connection before a byte of the response. On a
    /// reused connection it most likely had closed it before reading the request, but it may
    /// also have acted on it.
    #[error("connection closed before the response")]
    Closed,
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("request body: {0}")]
    Body(BoxError),
    #[error("invalid response: {0}")]
    Invalid(&'static str),
}

/// One connection's socket and the bytes read from it but not yet used.
pub struct Conn {
    io: Stream,
    buf: BytesMut,
    read_size: usize,
    /// The request head being written, kept from one request to the next.
    out: Vec<u8>,
}

/// A response head and how its body is framed.
pub struct Head {
    pub status: StatusCode,
    pub version: Version,
    /// Empty when the fields are kept raw (`raw`).
    pub headers: HeaderMap,
    /// The fields as the backend sent them, when nothing but the client needs them.
    pub raw: Option<RawFields>,
    framing: Framing,
    /// The connection may carry another request once the body is read.
    reusable: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    Empty,
    Length(u64),
    Chunked,
    /// Until the backend closes.
    Close,
}

impl Conn {
    #[must_use]
    pub fn new(io: Stream) -> Self {
        Self { io, buf: BytesMut::new(), read_size: READ_MIN, out: Vec::new() }
    }

    /// True when an idle connection is still open with nothing unasked for to read: the
    /// backend has not closed it. Never waits, and costs no system call unless the reactor saw
    /// the socket become readable (then a `MSG_PEEK`, which leaves TLS bytes in place).
    pub fn is_open(&self) -> bool {
        if !self.buf.is_empty() {
            return false;
        }
        let tcp = self.io.tcp();
        quiet(tcp.try_io(tokio::io::Interest::READABLE, || peek(tcp.as_raw_fd())))
    }

    /// Sends a request and reads its answer's head. `close` asks the backend to close the
    /// connection after answering. The answer is read while the body is written: a backend
    /// that answers early (413, 401) gets no more of the body, and one that answers while it
    /// reads is not deadlocked. Informational answers (100 Continue, 103) are skipped; a 101
    /// is returned, the connection then the caller's to tunnel.
    pub async fn exchange(&mut self, req: &Outgoing<'_>, close: bool, body: ReqBody) -> Result<Head, Error> {
        let method = req.method;
        let out = &mut self.out;
        out.clear();
        encode_head(out, req, close, &body);
        let mut w = Writing {
            head_left: 0,
            pending: Bytes::new(),
            rest: None,
            stream: None,
            chunked: false,
            wrote: false,
            dirty: false,
            done: false,
            failed: None,
        };
        match body {
            Frames::Full(b) => {
                let b = b.unwrap_or_default();
                // A small body goes out with its head, in one write.
                if b.len() <= COALESCE {
                    out.extend_from_slice(&b);
                } else {
                    w.rest = Some(b);
                }
            }
            Frames::Stream(s) => {
                w.chunked = s.size_hint().exact().is_none();
                w.stream = Some(s);
            }
        }
        w.head_left = out.len();
        let mut answered = false;
        let raw = req.raw_answer;
        std::future::poll_fn(|cx| self.poll_exchange(cx, &mut w, (method, raw), &mut answered)).await
    }

    fn poll_exchange(
        &mut self,
        cx: &mut Context<'_>,
        w: &mut Writing,
        (method, raw): (&Method, bool),
        answered: &mut bool,
    ) -> Poll<Result<Head, Error>> {
        loop {
            while !self.buf.is_empty() {
                let Some(mut head) = parse_head(&mut self.buf, method, raw)? else {
                    if self.buf.len() >= MAX_HEAD {
                        return Poll::Ready(Err(Error::Invalid("response head too large")));
                    }
                    break;
                };
                if head.status.is_informational() && head.status != StatusCode::SWITCHING_PROTOCOLS {
                    continue;
                }
                // Answered before the whole request went: the rest is not sent, and the
                // connection cannot carry another request.
                head.reusable &= w.all_written() && w.failed.is_none();
                return Poll::Ready(Ok(head));
            }
            // Written first; read while the writing waits, so an early answer is taken.
            if !w.done {
                match self.poll_write_step(cx, w) {
                    Poll::Ready(Ok(())) => continue,
                    // An answer may be waiting (a backend that refused the body and closed).
                    Poll::Ready(Err(Error::Io(e))) if w.wrote => {
                        w.failed = Some(e);
                        w.done = true;
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => {}
                }
            }
            match self.poll_fill(cx) {
                Poll::Ready(Ok(_)) if !self.buf.is_empty() => *answered = true,
                Poll::Ready(Ok(_) | Err(_)) if w.failed.is_some() => {
                    return Poll::Ready(Err(w.failed.take().map_or(Error::Closed, Error::Io)));
                }
                Poll::Ready(Ok(_)) => {
                    return Poll::Ready(Err(match (*answered, w.wrote) {
                        (true, _) => Error::Invalid("connection closed in the response head"),
                        (false, false) => Error::Unsent,
                        (false, true) => Error::Closed,
                    }));
                }
                Poll::Ready(Err(e)) if !*answered && is_reset(&e) => {
                    return Poll::Ready(Err(if w.wrote { Error::Closed } else { Error::Unsent }));
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e.into())),
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    /// Writes the next piece of the request; ready when it made progress.
    fn poll_write_step(&mut self, cx: &mut Context<'_>, w: &mut Writing) -> Poll<Result<(), Error>> {
        let io = Pin::new(&mut self.io);
        // The head (in `out`) first, then the pending piece of the body.
        let next = if w.head_left > 0 { &self.out[self.out.len() - w.head_left..] } else { &w.pending[..] };
        if !next.is_empty() {
            return match ready!(io.poll_write(cx, next)) {
                Ok(0) => Poll::Ready(Err(io::Error::from(io::ErrorKind::WriteZero).into())),
                Ok(n) => {
                    if w.head_left > 0 {
                        w.head_left -= n;
                    } else {
                        w.pending.advance(n);
                    }
                    w.wrote = true;
                    w.dirty = true;
                    Poll::Ready(Ok(()))
                }
                Err(e) if !w.wrote && is_reset(&e) => Poll::Ready(Err(Error::Unsent)),
                Err(e) => Poll::Ready(Err(e.into())),
            };
        }
        // Pushed out before waiting on the client for more (TLS holds records until then).
        if w.dirty {
            ready!(io.poll_flush(cx))?;
            w.dirty = false;
            return Poll::Ready(Ok(()));
        }
        if let Some(b) = w.rest.take() {
            w.pending = b;
            return Poll::Ready(Ok(()));
        }
        let Some(s) = w.stream.as_mut() else {
            w.done = true;
            return Poll::Ready(Ok(()));
        };
        match ready!(Pin::new(s).poll_frame(cx)) {
            Some(Ok(frame)) => {
                if let Ok(d) = frame.into_data()
                    && !d.is_empty()
                {
                    w.pending = if w.chunked {
                        let mut c = Vec::with_capacity(d.len() + 20);
                        c.extend_from_slice(format!("{:x}\r\n", d.len()).as_bytes());
                        c.extend_from_slice(&d);
                        c.extend_from_slice(b"\r\n");
                        Bytes::from(c)
                    } else {
                        d
                    };
                }
            }
            Some(Err(e)) => return Poll::Ready(Err(Error::Body(e))),
            None => {
                w.stream = None;
                if w.chunked {
                    w.pending = Bytes::from_static(b"0\r\n\r\n");
                }
            }
        }
        Poll::Ready(Ok(()))
    }

    /// Reads more into `buf`; 0 at the end of the stream.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.buf.capacity() - self.buf.len() < READ_MIN / 4 {
            self.buf.reserve(self.read_size);
        }
        let spare = self.buf.spare_capacity_mut();
        let room = spare.len();
        let mut rb = ReadBuf::uninit(spare);
        ready!(Pin::new(&mut self.io).poll_read(cx, &mut rb))?;
        let n = rb.filled().len();
        // SAFETY: the reader initialised the first `n` bytes of the spare capacity.
        unsafe { self.buf.set_len(self.buf.len() + n) };
        // A read that fills the buffer asks for a larger one next (bulk bodies).
        if n == room {
            self.read_size = (self.read_size * 2).min(READ_MAX);
        }
        Poll::Ready(Ok(n))
    }

    /// The same connection, registered with the calling thread's reactor instead of the one
    /// that opened it; `Err` (unchanged) for TLS, whose stream cannot be taken apart. `None`
    /// when the socket could not be moved (it is then closed). Not asked whether the backend
    /// closed it: as open as `is_open` on its old reactor said.
    pub fn rehome(self) -> Result<Option<Self>, Self> {
        let Self { io, buf, read_size, out } = self;
        let tcp = match io {
            Stream::Plain(tcp) => tcp,
            io @ Stream::Tls(_) => return Err(Self { io, buf, read_size, out }),
        };
        let moved = tcp.into_std().and_then(TcpStream::from_std).ok();
        Ok(moved.map(|tcp| Self { io: Stream::Plain(tcp), buf, read_size, out }))
    }

    /// The socket and what was read past the 101 answer, for a tunnel.
    #[must_use]
    pub fn into_parts(self) -> (Stream, Bytes) {
        (self.io, self.buf.freeze())
    }
}

/// One byte peeked without waiting (TLS bytes stay in place): `Ok(0)` at the end of the stream.
fn peek(fd: std::os::fd::RawFd) -> io::Result<isize> {
    let mut byte = 0u8;
    // SAFETY: a one-byte read into a local, from a socket the caller owns.
    let n = unsafe { libc::recv(fd, (&raw mut byte).cast(), 1, libc::MSG_PEEK | libc::MSG_DONTWAIT) };
    if n < 0 { Err(io::Error::last_os_error()) } else { Ok(n) }
}

/// An idle connection is usable when there is nothing to read: bytes (unasked for) or the end
/// of the stream make it unusable.
fn quiet(peeked: io::Result<isize>) -> bool {
    matches!(peeked, Err(e) if e.kind() == io::ErrorKind::WouldBlock)
}

fn is_reset(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted | io::ErrorKind::BrokenPipe
    )
}

/// Where the writing of a request stands.
#[expect(clippy::struct_excessive_bools, reason = "independent facts of one write, read apart")]
struct Writing {
    /// Bytes of the head (in `Conn::out`) still to write; they go first.
    head_left: usize,
    /// Bytes to write next.
    pending: Bytes,
    /// A body too large to go with the head.
    rest: Option<Bytes>,
    stream: Option<ClientBody>,
    chunked: bool,
    /// Some of the request went.
    wrote: bool,
    /// Written since the last flush.
    dirty: bool,
    /// All of it went, flushed (or writing failed).
    done: bool,
    /// Why writing stopped, kept while an answer may still be read.
    failed: Option<io::Error>,
}

impl Writing {
    fn all_written(&self) -> bool {
        self.head_left == 0 && self.pending.is_empty() && self.rest.is_none() && self.stream.is_none()
    }
}

/// Methods whose empty body is still announced (`Content-Length: 0`), as clients do.
fn announces_empty_body(m: &Method) -> bool {
    !matches!(
        *m,
        Method::GET | Method::HEAD | Method::DELETE | Method::OPTIONS | Method::TRACE | Method::CONNECT
    )
}

fn encode_head(out: &mut Vec<u8>, req: &Outgoing<'_>, close: bool, body: &ReqBody) {
    let Outgoing { method, target, headers, forwarding, .. } = *req;
    out.extend_from_slice(method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(if target.is_empty() { b"/" } else { target.as_bytes() });
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in headers {
        // Framing is this hop's, written below from the body actually sent.
        if name == header::CONTENT_LENGTH || name == header::TRANSFER_ENCODING {
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if let Some(f) = forwarding {
        f.write_fields(out);
    }
    let length = match body {
        Frames::Full(b) => Some(b.as_ref().map_or(0, Bytes::len) as u64),
        Frames::Stream(s) => s.size_hint().exact(),
    };
    match length {
        Some(0) if !announces_empty_body(method) && !headers.contains_key(header::CONTENT_LENGTH) => {}
        Some(n) => {
            out.extend_from_slice(b"content-length: ");
            out.extend_from_slice(itoa_u64(n, &mut [0; 20]));
            out.extend_from_slice(b"\r\n");
        }
        None => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
    }
    if close && !headers.contains_key(header::CONNECTION) {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

pub(super) fn itoa_u64(mut n: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return &buf[i..];
        }
    }
}

/// Parses a complete head off the front of `buf`; `None` when more bytes are needed.
/// `raw`: the answer's fields may stay raw (`RawFields`) when it is an ordinary one.
fn parse_head(buf: &mut BytesMut, method: &Method, raw: bool) -> Result<Option<Head>, Error> {
    // Left uninitialised: 4 KiB of empty slots per head otherwise.
    let mut slots = [const { std::mem::MaybeUninit::uninit() }; MAX_HEADERS];
    let mut r = httparse::Response::new(&mut []);
    // The default configuration: one field a line, nothing folded, skipped or tolerated
    // around the colon. `RawFields::lines` counts on it (field i is line i), and a test pins it.
    let len =
        match httparse::ParserConfig::default().parse_response_with_uninit_headers(&mut r, buf, &mut slots) {
            Ok(httparse::Status::Complete(n)) if n <= MAX_HEAD => n,
            Ok(httparse::Status::Complete(_)) => return Err(Error::Invalid("response head too large")),
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(httparse::Error::TooManyHeaders) => return Err(Error::Invalid("too many response headers")),
            Err(_) => return Err(Error::Invalid("malformed response head")),
        };
    let status =
        r.code.and_then(|c| StatusCode::from_u16(c).ok()).ok_or(Error::Invalid("bad status code"))?;
    let version = if r.version == Some(0) { Version::HTTP_10 } else { Version::HTTP_11 };
    // What this hop needs of `Connection`, `Transfer-Encoding` and `Content-Length`, noted on
    // the way rather than looked up after; and which fields stay here.
    let mut seen = Seen::default();
    let (mut ours, mut framing_fields, mut hop) = (0u128, 0u128, 0u128);
    for (i, h) in r.headers.iter().enumerate() {
        match seen.note(h.name, h.value) {
            Field::Passed => {}
            Field::Ours => ours |= 1 << i,
            Field::Framing => framing_fields |= 1 << i,
            Field::Hop => hop |= 1 << i,
        }
    }
    let framing = framing(method, status, &seen)?;
    let keeps_alive = !seen.close && (version == Version::HTTP_11 || seen.keep_alive);
    let mut reusable = framing != Framing::Close && keeps_alive;
    if seen.transfer_coding {
        if version == Version::HTTP_10 {
            return Err(Error::Invalid("transfer-encoding in an HTTP/1.0 response"));
        }
        // Transfer-Encoding wins over a Content-Length beside it, which must not reach the
        // client with a body of another length; and such a message closes its connection
        // (RFC 9112 6.1, 6.3).
        if seen.lengths > 0 {
            reusable = false;
        }
    }
    // The common answer goes on with its fields as they came, never put into a map: the
    // client's side writes its own framing, and nothing between reads them unless it asks
    // (`RawFields::append_to`). Not when `Connection` names fields to remove, nor when the
    // answer has no body of its own (its length is then passed on as a field).
    let plain = raw
        && !seen.names_fields
        && *method != Method::HEAD
        && status.as_u16() >= 200
        && status != StatusCode::NO_CONTENT
        && status != StatusCode::NOT_MODIFIED;
    if plain {
        let head = buf.split_to(len).freeze();
        let skip = ours | framing_fields | hop;
        // The length as the map gives it (one plain value), for whatever asks for the map.
        let length = match framing {
            Framing::Length(n) if seen.lengths > 0 && !seen.transfer_coding => Some(n),
            Framing::Empty if seen.length == Some(0) && !seen.transfer_coding => Some(0),
            _ => None,
        };
        #[expect(clippy::cast_possible_truncation, reason = "the two halves of the mask")]
        let raw = RawFields { head, skip: [skip as u64, (skip >> 64) as u64], length, dated: seen.dated };
        return Ok(Some(Head {
            status,
            version,
            headers: HeaderMap::new(),
            raw: Some(raw),
            framing,
            reusable,
        }));
    }
    let mut spans = Spans::new();
    spans.fill(buf, r.headers);
    let head = buf.split_to(len).freeze();
    let mut headers = HeaderMap::with_capacity(spans.len());
    for (i, field) in spans.fields(&head).enumerate() {
        let (name, v) = field.map_err(Error::Invalid)?;
        // Content-Length goes on unless a transfer coding frames the body.
        if ours & (1 << i) == 0 && !(seen.transfer_coding && framing_fields & (1 << i) != 0) {
            headers.append(name, v);
        }
    }
    if let Framing::Length(n) = framing
        && !seen.plain_length
    {
        // One plain value goes on to the client, not `4, 4` or repeated fields.
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(n));
    }
    Ok(Some(Head { status, version, headers, raw: None, framing, reusable }))
}

/// A response head's fields as the backend sent them, less this hop's own and the framing
/// ones (the client's side writes its own). Written to the client line for line.
#[derive(Clone)]
pub struct RawFields {
    /// The whole head, status line first.
    head: Bytes,
    /// The fields (by position) not passed on (a mask, in halves: a `u128` would align the
    /// whole to 16 bytes).
    skip: [u64; 2],
    /// The `Content-Length` a map of the fields holds.
    length: Option<u64>,
    /// Whether a `Date` field is passed on.
    pub dated: bool,
}

impl RawFields {
    /// The lines of the fields passed on, without their line ends. httparse (as configured
    /// for responses) takes one field a line, ended by CRLF or LF, after any empty lines
    /// before the status line.
    pub fn lines(&self) -> impl Iterator<Item = &[u8]> {
        let mut lines = self.head.split(|&b| b == b'\n').map(|l| l.strip_suffix(b"\r").unwrap_or(l));
        lines.by_ref().find(|l| !l.is_empty());
        lines
            .take_while(|l| !l.is_empty())
            .enumerate()
            .filter(|&(i, _)| i < MAX_HEADERS && self.skip[i / 64] & (1 << (i % 64)) == 0)
            .map(|(_, l)| l)
    }

    /// Appends the fields passed on to `map`, for what reads or changes them.
    pub fn append_to(&self, map: &mut HeaderMap) {
        for line in self.lines() {
            let Some(colon) = line.iter().position(|&b| b == b':') else { continue };
            let value = line[colon + 1..].trim_ascii();
            // httparse checked names and values as `http` does: each converts.
            let (name, value) = (
                HeaderName::from_bytes(&line[..colon]),
                HeaderValue::from_maybe_shared(self.head.slice_ref(value)),
            );
            debug_assert!(name.is_ok() && value.is_ok(), "{line:?}");
            if let (Ok(name), Ok(value)) = (name, value) {
                map.append(name, value);
            }
        }
        if let Some(n) = self.length {
            map.insert(header::CONTENT_LENGTH, HeaderValue::from(n));
        }
    }
}

/// Where each field's name and value sit in a parsed head, so that they can share its bytes
/// once it is split off the read buffer. On the stack, and left uninitialised past the
/// fields: this runs per head, and 2 KiB of zeroes would cost more.
pub(super) struct Spans {
    n: usize,
    at: [std::mem::MaybeUninit<(u32, u32, u32, u32)>; MAX_HEADERS],
}

impl Spans {
    /// No positions yet, and nothing written (a constant would be zeroed).
    #[inline]
    pub(super) const fn new() -> Self {
        Self { n: 0, at: [const { std::mem::MaybeUninit::uninit() }; MAX_HEADERS] }
    }

    /// Notes the positions of `fields` (parsed from `buf`) in `buf`. Filled in place: the
    /// array returned by value was copied (2 KiB a head).
    pub(super) fn fill(&mut self, buf: &[u8], fields: &[httparse::Header<'_>]) {
        let base = buf.as_ptr() as usize;
        self.n = fields.len().min(MAX_HEADERS);
        for (h, span) in fields.iter().zip(self.at.iter_mut()) {
            let name = h.name.as_ptr() as usize - base;
            let value = h.value.as_ptr() as usize - base;
            #[expect(clippy::cast_possible_truncation, reason = "offsets within a head held in memory")]
            span.write((
                name as u32,
                (name + h.name.len()) as u32,
                value as u32,
                (value + h.value.len()) as u32,
            ));
        }
    }

    pub(super) const fn len(&self) -> usize {
        self.n
    }

    /// The fields, read from `head` (the bytes they were parsed from, split off): names, and
    /// values sharing its bytes; or why one is malformed.
    pub(super) fn fields<'a>(
        &'a self,
        head: &'a Bytes,
    ) -> impl Iterator<Item = Result<(HeaderName, HeaderValue), &'static str>> + 'a {
        self.at[..self.n].iter().map(|span| {
            // SAFETY: `fill` wrote the first `n` spans.
            let (name_from, name_to, from, to) = unsafe { span.assume_init() };
            let name = HeaderName::from_bytes(&head[name_from as usize..name_to as usize])
                .map_err(|_| "bad header name")?;
            let v = HeaderValue::from_maybe_shared(head.slice(from as usize..to as usize))
                .map_err(|_| "bad header value")?;
            Ok((name, v))
        })
    }
}

/// The framing fields of a response head.
#[derive(Default)]
#[expect(clippy::struct_excessive_bools, reason = "independent facts noted in one pass")]
struct Seen {
    close: bool,
    keep_alive: bool,
    /// `Connection` names fields that must not go on.
    names_fields: bool,
    /// A `Transfer-Encoding`, and whether the last one ends in `chunked`.
    transfer_coding: bool,
    chunked: bool,
    /// `Content-Length` fields, the length they agree on, or why they do not.
    lengths: usize,
    length: Option<u64>,
    bad_length: Option<&'static str>,
    /// One field with one value.
    plain_length: bool,
    dated: bool,
}

/// What a response field is to this hop.
enum Field {
    /// Goes on to the client.
    Passed,
    /// This hop's own: the connection options (unless they name other fields, which the
    /// proxy then removes with them), `Keep-Alive`, and the transfer coding, decoded here.
    Ours,
    /// `Content-Length`: the client's side frames the body itself.
    Framing,
    /// Another hop-by-hop field (`Upgrade`, `Trailer`, ...): not passed on either, but left
    /// in a map for the proxy (a 101's `Upgrade` is answered by the tunnel).
    Hop,
}

/// A value as text when it is visible ASCII (what `HeaderValue::to_str` takes).
fn text(v: &[u8]) -> Option<&str> {
    v.iter().all(|&b| b == b'\t' || (0x20..0x7f).contains(&b)).then(|| std::str::from_utf8(v).ok())?
}

impl Seen {
    fn note(&mut self, name: &str, v: &[u8]) -> Field {
        let is = |n: &str| name.eq_ignore_ascii_case(n);
        match name.len() {
            10 if is("connection") => {
                let mut names_fields = false;
                for t in text(v).unwrap_or("").split(',').map(str::trim) {
                    self.close |= t.eq_ignore_ascii_case("close");
                    self.keep_alive |= t.eq_ignore_ascii_case("keep-alive");
                    names_fields |= super::proxy::names_a_field(t);
                }
                self.names_fields |= names_fields;
                if names_fields { Field::Passed } else { Field::Ours }
            }
            17 if is("transfer-encoding") => {
                self.transfer_coding = true;
                self.chunked = text(v)
                    .and_then(|v| v.rsplit(',').next())
                    .is_some_and(|c| c.trim().eq_ignore_ascii_case("chunked"));
                Field::Ours
            }
            10 if is("keep-alive") => Field::Ours,
            4 if is("date") => {
                self.dated = true;
                Field::Passed
            }
            14 if is("content-length") => {
                self.lengths += 1;
                self.plain_length = self.lengths == 1;
                if self.bad_length.is_some() {
                    return Field::Framing;
                }
                let Some(text) = text(v) else {
                    self.bad_length = Some("bad content-length");
                    return Field::Framing;
                };
                for part in text.split(',') {
                    self.plain_length &= part.len() == text.len();
                    match digits(part.trim(), 10) {
                        Some(n) if self.length.is_none_or(|l| l == n) => self.length = Some(n),
                        Some(_) => self.bad_length = Some("conflicting content-length"),
                        None => self.bad_length = Some("bad content-length"),
                    }
                }
                Field::Framing
            }
            _ if super::proxy::is_hop_by_hop(name) => Field::Hop,
            _ => Field::Passed,
        }
    }
}

/// How the body after a response head ends (RFC 9112 6.3).
fn framing(method: &Method, status: StatusCode, seen: &Seen) -> Result<Framing, Error> {
    if *method == Method::HEAD
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        return Ok(Framing::Empty);
    }
    if seen.transfer_coding {
        return Ok(if seen.chunked { Framing::Chunked } else { Framing::Close });
    }
    if let Some(why) = seen.bad_length {
        return Err(Error::Invalid(why));
    }
    Ok(match seen.length {
        Some(0) => Framing::Empty,
        Some(n) => Framing::Length(n),
        None => Framing::Close,
    })
}

/// Where a chunked body's decoder stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Chunk {
    Size,
    Data(u64),
    /// The CRLF after a chunk's data.
    DataEnd,
    Trailers,
}

pub(super) enum Decoded {
    Data(Bytes),
    More,
    End,
}

/// Decodes what `buf` holds of a chunked body.
pub(super) fn decode_chunked(state: &mut Chunk, buf: &mut BytesMut) -> Result<Decoded, Error> {
    loop {
        match *state {
            Chunk::Size => {
                let Some(end) = line_end(buf, "chunk size line too long")? else {
                    return Ok(Decoded::More);
                };
                let line = &buf[..end];
                let size = line.split(|b| *b == b';').next().unwrap_or_default();
                let size = std::str::from_utf8(size).ok().map(|d| d.trim_end_matches([' ', '\t']));
                let size = size.and_then(|d| digits(d, 16)).ok_or(Error::Invalid("bad chunk size"))?;
                buf.advance(end + 2);
                *state = if size == 0 { Chunk::Trailers } else { Chunk::Data(size) };
            }
            Chunk::Data(left) => {
                if buf.is_empty() {
                    return Ok(Decoded::More);
                }
                let take = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
                let left = left - take as u64;
                *state = if left == 0 { Chunk::DataEnd } else { Chunk::Data(left) };
                return Ok(Decoded::Data(buf.split_to(take).freeze()));
            }
            Chunk::DataEnd => {
                if buf.len() < 2 {
                    return Ok(Decoded::More);
                }
                if &buf[..2] != b"\r\n" {
                    return Err(Error::Invalid("chunk without its CRLF"));
                }
                buf.advance(2);
                *state = Chunk::Size;
            }
            Chunk::Trailers => {
                // Trailer fields are dropped; the section ends with an empty line.
                let Some(end) = line_end(buf, "trailer line too long")? else {
                    return Ok(Decoded::More);
                };
                buf.advance(end + 2);
                if end == 0 {
                    return Ok(Decoded::End);
                }
            }
        }
    }
}

/// A number of plain digits in `radix` (no sign, no spaces), at most 15 of them.
pub(super) fn digits(s: &str, radix: u32) -> Option<u64> {
    if s.is_empty() || s.len() > 15 || !s.chars().all(|c| c.is_digit(radix)) {
        return None;
    }
    u64::from_str_radix(s, radix).ok()
}

/// Where the line at the front of `buf` ends: `None` until it has all come, an error once it
/// is longer than any chunk-size or trailer line may be.
fn line_end(buf: &[u8], too_long: &'static str) -> Result<Option<usize>, Error> {
    match find_crlf(buf) {
        None if buf.len() > MAX_CHUNK_LINE => Err(Error::Invalid(too_long)),
        end => Ok(end),
    }
}

fn find_crlf(b: &[u8]) -> Option<usize> {
    b.windows(2).position(|w| w == b"\r\n")
}

/// Where a connection goes when its response was read whole (its pool, or closed).
pub trait Return {
    fn give_back(self, conn: Conn, reusable: bool);
}

/// A response body read from the backend's socket as the client takes it.
pub struct ResponseBody<R: Return> {
    conn: Option<Conn>,
    framing: Framing,
    left: u64,
    chunk: Chunk,
    reusable: bool,
    done: bool,
    home: Option<R>,
    /// The response's fields, kept raw for the client (`Head::raw`).
    raw: Option<RawFields>,
}

impl<R: Return> ResponseBody<R> {
    /// The body after `head`, which gives up its raw fields to it.
    pub fn new(conn: Conn, head: &mut Head, home: R) -> Self {
        let left = match head.framing {
            Framing::Length(n) => n,
            _ => 0,
        };
        let mut b = Self {
            conn: Some(conn),
            framing: head.framing,
            left,
            chunk: Chunk::Size,
            reusable: head.reusable,
            done: false,
            home: Some(home),
            raw: head.raw.take(),
        };
        if head.status == StatusCode::SWITCHING_PROTOCOLS {
            // No body: the connection now carries another protocol, for `upgraded`.
            b.done = true;
        } else if head.framing == Framing::Empty {
            b.finish();
        }
        b
    }

    pub const fn raw(&self) -> Option<&RawFields> {
        self.raw.as_ref()
    }

    pub const fn take_raw(&mut self) -> Option<RawFields> {
        self.raw.take()
    }

    /// The connection of a 101 answer and where it would have gone, for a tunnel.
    pub fn upgraded(mut self) -> Option<(Conn, R)> {
        Some((self.conn.take()?, self.home.take()?))
    }

    /// The body was read whole: the connection goes home.
    fn finish(&mut self) {
        self.done = true;
        if let (Some(conn), Some(home)) = (self.conn.take(), self.home.take()) {
            // Bytes past the response (a misbehaving backend) make it unusable.
            let reusable = self.reusable && conn.buf.is_empty();
            let mut conn = conn;
            // An idle connection holds no large buffers.
            if conn.buf.capacity() > READ_MIN {
                conn.buf = BytesMut::new();
                conn.read_size = READ_MIN;
            }
            if conn.out.capacity() > OUT_KEPT {
                conn.out = Vec::new();
            }
            home.give_back(conn, reusable);
        }
    }
}

/// What one step of reading a body gave.
enum Step {
    Data(Bytes),
    /// The body's last bytes.
    Last(Bytes),
    End,
    Fill,
}

impl<R: Return + Unpin> Body for ResponseBody<R> {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        loop {
            if this.done {
                return Poll::Ready(None);
            }
            let Some(conn) = this.conn.as_mut() else { return Poll::Ready(None) };
            let step = match this.framing {
                Framing::Empty => Step::End,
                Framing::Length(_) if this.left == 0 => Step::End,
                Framing::Length(_) | Framing::Close if conn.buf.is_empty() => Step::Fill,
                Framing::Length(_) => {
                    let take = usize::try_from(this.left).unwrap_or(usize::MAX).min(conn.buf.len());
                    this.left -= take as u64;
                    let d = conn.buf.split_to(take).freeze();
                    if this.left == 0 { Step::Last(d) } else { Step::Data(d) }
                }
                Framing::Chunked => match decode_chunked(&mut this.chunk, &mut conn.buf) {
                    Ok(Decoded::Data(d)) => Step::Data(d),
                    Ok(Decoded::More) => Step::Fill,
                    Ok(Decoded::End) => Step::End,
                    Err(e) => return Poll::Ready(Some(Err(e.into()))),
                },
                Framing::Close => Step::Data(conn.buf.split().freeze()),
            };
            match step {
                Step::Data(d) => return Poll::Ready(Some(Ok(Frame::data(d)))),
                Step::Last(d) => {
                    this.finish();
                    return Poll::Ready(Some(Ok(Frame::data(d))));
                }
                Step::End => {
                    this.finish();
                    return Poll::Ready(None);
                }
                Step::Fill => match ready!(conn.poll_fill(cx)) {
                    Ok(0) if this.framing == Framing::Close => {
                        this.reusable = false;
                        this.finish();
                        return Poll::Ready(None);
                    }
                    Ok(0) => {
                        return Poll::Ready(Some(Err("the backend closed the connection mid-body".into())));
                    }
                    Ok(_) => {}
                    Err(e) => return Poll::Ready(Some(Err(e.into()))),
                },
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }

    fn size_hint(&self) -> SizeHint {
        match self.framing {
            _ if self.done => SizeHint::with_exact(0),
            Framing::Empty => SizeHint::with_exact(0),
            Framing::Length(_) => SizeHint::with_exact(self.left),
            Framing::Chunked | Framing::Close => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(text: &str, method: &Method) -> Result<Option<Head>, Error> {
        parse_head(&mut BytesMut::from(text), method, true)
    }

    /// The fields that go on to the client, raw or mapped.
    fn fields(h: &Head) -> HeaderMap {
        let mut map = h.headers.clone();
        if let Some(raw) = &h.raw {
            raw.append_to(&mut map);
        }
        map
    }

    #[test]
    fn response_heads_are_framed_as_rfc_9112_says() {
        let get = &Method::GET;
        let h = head("HTTP/1.1 200 OK\r\nContent-Length: 3\r\nX-A: b\r\n\r\nok\n", get).unwrap().unwrap();
        assert_eq!((h.status, h.framing, h.reusable), (StatusCode::OK, Framing::Length(3), true));
        assert_eq!(fields(&h)["x-a"], "b");
        let h = head("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\nContent-Length: 9\r\n\r\n", get);
        let h = h.unwrap().unwrap();
        assert_eq!(h.framing, Framing::Chunked);
        assert!(!fields(&h).contains_key(header::CONTENT_LENGTH), "TE wins, CL dropped");
        assert!(!h.reusable, "a message with both closes its connection");
        let h = head("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nContent-Length: 9\r\n\r\n", get);
        assert!(!fields(&h.unwrap().unwrap()).contains_key(header::CONTENT_LENGTH), "TE of any kind");
        assert!(head("HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", get).is_err());
        assert!(head("HTTP/1.1 200 OK\r\nContent-Length: +5\r\n\r\n", get).is_err(), "digits only");
        let h = head("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n", get).unwrap().unwrap();
        assert_eq!((h.framing, h.reusable), (Framing::Close, false));
        let h = head("HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\n", get).unwrap().unwrap();
        assert!(!h.reusable, "HTTP/1.0 without keep-alive closes");
        let h = head("HTTP/1.0 200 OK\r\nContent-Length: 1\r\nConnection: keep-alive\r\n\r\n", get)
            .unwrap()
            .unwrap();
        assert!(h.reusable);
        let h =
            head("HTTP/1.1 200 OK\r\nContent-Length: 1\r\nConnection: close\r\n\r\n", get).unwrap().unwrap();
        assert!(!h.reusable);
        let h = head("HTTP/1.1 200 OK\r\n\r\n", get).unwrap().unwrap();
        assert_eq!((h.framing, h.reusable), (Framing::Close, false));
        let h = head("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", &Method::HEAD).unwrap().unwrap();
        assert_eq!(h.framing, Framing::Empty, "no body after HEAD");
        let h = head("HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\n", get).unwrap().unwrap();
        assert_eq!(h.framing, Framing::Empty);
        // The client's side writes one plain length: not `4, 4` or repeated fields.
        let h = head("HTTP/1.1 200 OK\r\nContent-Length: 4, 4\r\n\r\n", get).unwrap().unwrap();
        assert_eq!(h.framing, Framing::Length(4));
        assert_eq!(fields(&h)[header::CONTENT_LENGTH], HeaderValue::from(4), "as a map gives it");
        assert!(h.raw.unwrap().lines().all(|l| !l.to_ascii_lowercase().starts_with(b"content-length")));
        assert!(head("HTTP/1.1 200 OK\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\n", get).is_err());
        assert!(head("HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", get).is_err());
        assert!(head("HTTP/1.1 200 OK\r\nContent-Length: 1\r\n", get).unwrap().is_none(), "partial");
        assert!(head("HTTP/1.1 2000 OK\r\n\r\n", get).is_err());
        assert!(head("garbage\r\n\r\n", get).is_err());
        let many = "x-n: v\r\n".repeat(200);
        assert!(head(&format!("HTTP/1.1 200 OK\r\n{many}\r\n"), get).is_err());
        let long = "x".repeat(MAX_HEAD);
        assert!(head(&format!("HTTP/1.1 200 OK\r\nx-long: {long}\r\n\r\n"), get).is_err(), "head too large");
    }

    #[test]
    fn header_values_share_the_read_buffer_and_the_rest_stays() {
        let mut buf = BytesMut::from("HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-A: b\r\n\r\nhi");
        let h = parse_head(&mut buf, &Method::GET, true).unwrap().unwrap();
        assert_eq!(&buf[..], b"hi");
        assert_eq!(fields(&h)["x-a"], "b");
    }

    #[test]
    fn this_hops_fields_stay_here() {
        let text = "HTTP/1.1 200 OK\r\nConnection: Keep-Alive\r\nKeep-Alive: timeout=5\r\n\
                    Transfer-Encoding: chunked\r\nETag: \"a\"\r\n\r\n";
        let h = head(text, &Method::GET).unwrap().unwrap();
        assert_eq!((h.framing, h.reusable), (Framing::Chunked, true));
        let map = fields(&h);
        let names: Vec<_> = map.keys().map(HeaderName::as_str).collect();
        assert_eq!(names, ["etag"]);
        // A Connection that names another field goes on, for the proxy to remove both.
        let h = head(
            "HTTP/1.1 200 OK\r\nConnection: close, X-Hop\r\nX-Hop: 1\r\nContent-Length: 0\r\n\r\n",
            &Method::GET,
        )
        .unwrap()
        .unwrap();
        assert!(!h.reusable);
        assert!(h.raw.is_none(), "mapped, for the proxy to remove the named fields");
        assert_eq!(h.headers[header::CONNECTION], "close, X-Hop");
    }

    #[test]
    fn plain_answers_keep_their_fields_raw_as_they_came() {
        // Any case, LF or CRLF line ends, an empty line before the status line (httparse
        // takes those); this hop's fields and the framing ones stay here.
        let text = "\r\nHTTP/1.1 200 OK\r\nServer: x\r\nconnection: keep-alive\nKeep-Alive: timeout=5\r\n\
                    Content-Length: 2\r\nDATE: Sat, 21 Nov 2026 10:00:00 GMT\r\nX-Empty:\r\n\
                    Set-Cookie: a=1\r\nUpgrade: h2c\r\nTrailer: x\r\nProxy-Connection: k\r\n\
                    Set-Cookie: b=2\r\n\r\nhi";
        let h = head(text, &Method::GET).unwrap().unwrap();
        let raw = h.raw.as_ref().expect("kept raw");
        assert!(h.headers.is_empty());
        let lines: Vec<&[u8]> = raw.lines().collect();
        assert_eq!(
            lines,
            [
                &b"Server: x"[..],
                b"DATE: Sat, 21 Nov 2026 10:00:00 GMT",
                b"X-Empty:",
                b"Set-Cookie: a=1",
                b"Set-Cookie: b=2"
            ]
        );
        assert!(raw.dated);
        // Mapped when asked (an HTTP/2 client, the cache): the same fields once the proxy
        // has removed the hop-by-hop ones.
        let mapped = parse_head(&mut BytesMut::from(text), &Method::GET, false).unwrap().unwrap();
        assert!(mapped.raw.is_none());
        let mut map = mapped.headers;
        super::super::proxy::clean_response_headers(&mut map);
        assert_eq!(map, fields(&h));
        let map = fields(&h);
        assert_eq!(map.get_all(header::SET_COOKIE).iter().collect::<Vec<_>>(), ["a=1", "b=2"]);
        assert_eq!(map[header::CONTENT_LENGTH], "2", "the map has the length, the wire its own");
        assert!(!map.contains_key(header::CONNECTION) && !map.contains_key("keep-alive"));
        assert_eq!(map["x-empty"], "");
        // Chunked: the coding is decoded here, the client's side frames anew.
        let h = head("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-A: b\r\n\r\n", &Method::GET);
        let lines: Vec<Vec<u8>> = h.unwrap().unwrap().raw.unwrap().lines().map(<[u8]>::to_vec).collect();
        assert_eq!(lines, [b"X-A: b".to_vec()]);
        // What `lines` counts on: a line that is not exactly one field is refused, not
        // folded into the one before, tolerated or skipped.
        for bad in [
            "HTTP/1.1 200 OK\r\nX-A: b\r\n c\r\nContent-Length: 0\r\n\r\n",
            "HTTP/1.1 200 OK\r\nX-A : b\r\nContent-Length: 0\r\n\r\n",
            "HTTP/1.1 200 OK\r\n X-A: b\r\nContent-Length: 0\r\n\r\n",
            "HTTP/1.1 200 OK\r\nX-A b\r\nContent-Length: 0\r\n\r\n",
            "HTTP/1.1 200 OK\r\nX-A: b\rc\r\nContent-Length: 0\r\n\r\n",
        ] {
            assert!(head(bad, &Method::GET).is_err(), "{bad:?}");
        }
        // Answers whose length goes on as a field, or that have none, are mapped.
        for (text, method) in [
            ("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", &Method::HEAD),
            ("HTTP/1.1 204 No Content\r\n\r\n", &Method::GET),
            ("HTTP/1.1 304 Not Modified\r\nETag: \"a\"\r\n\r\n", &Method::GET),
            ("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n", &Method::GET),
        ] {
            assert!(head(text, method).unwrap().unwrap().raw.is_none(), "{text}");
        }
    }

    fn decode_all(input: &[u8], split: usize) -> Result<(Vec<u8>, bool, BytesMut), Error> {
        let mut state = Chunk::Size;
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        for piece in input.chunks(split) {
            buf.extend_from_slice(piece);
            loop {
                match decode_chunked(&mut state, &mut buf)? {
                    Decoded::Data(d) => out.extend_from_slice(&d),
                    Decoded::More => break,
                    Decoded::End => return Ok((out, true, buf)),
                }
            }
        }
        Ok((out, false, buf))
    }

    #[test]
    fn chunked_bodies_decode_whatever_the_read_sizes() {
        let body = b"4\r\nWiki\r\n5;ext=1\r\npedia\r\nE\r\n in\r\n\r\nchunks.\r\n0\r\nX-T: 1\r\n\r\nNEXT";
        for split in [1, 2, 3, 7, body.len()] {
            let (out, end, rest) = decode_all(body, split).unwrap();
            assert_eq!(out, b"Wikipedia in\r\n\r\nchunks.", "split {split}");
            assert!(end);
            // What follows the body is left for the next response (and makes the connection
            // unusable if unasked for).
            assert!(split < body.len() || &rest[..] == b"NEXT");
        }
        assert!(decode_all(b"zz\r\n", 4).is_err());
        assert!(decode_all(b"+a\r\n", 4).is_err(), "hex digits only");
        assert!(decode_all(b" a\r\n", 4).is_err());
        assert!(decode_all(b"2\r\nabXX", 8).is_err(), "data must end with CRLF");
        assert!(decode_all(b"fffffffffffffffff\r\n", 32).is_err(), "size overflow");
        assert!(decode_all(&[b'1'; 5000], 5000).is_err(), "endless size line");
        let (out, end, _) = decode_all(b"3\r\nab", 16).unwrap();
        assert_eq!((out.as_slice(), end), (&b"ab"[..], false));
    }

    #[test]
    fn request_heads_carry_this_hops_framing() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("a.example"));
        h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("99"));
        let req = |method, target, headers| Outgoing {
            method,
            target,
            headers,
            forwarding: None,
            idempotent: true,
            raw_answer: true,
        };
        let mut out = Vec::new();
        let body = super::Frames::Full(Some(Bytes::from_static(b"abc")));
        encode_head(&mut out, &req(&Method::POST, "/x?y=1", &h), true, &body);
        let text = String::from_utf8(out).unwrap();
        assert_eq!(
            text,
            "POST /x?y=1 HTTP/1.1\r\nhost: a.example\r\ncontent-length: 3\r\nconnection: close\r\n\r\n"
        );
        let mut out = Vec::new();
        let none = HeaderMap::new();
        encode_head(&mut out, &req(&Method::GET, "", &none), false, &super::Frames::Full(None));
        assert_eq!(out, b"GET / HTTP/1.1\r\n\r\n");
        let mut out = Vec::new();
        encode_head(&mut out, &req(&Method::PUT, "/", &none), false, &super::Frames::Full(None));
        assert_eq!(out, b"PUT / HTTP/1.1\r\ncontent-length: 0\r\n\r\n");
        assert_eq!(itoa_u64(0, &mut [0; 20]), b"0");
        assert_eq!(itoa_u64(u64::MAX, &mut [0; 20]), u64::MAX.to_string().as_bytes());
    }
}
