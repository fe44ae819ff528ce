//! The admin API (hyper, HTTP/1.1): `/health`, `/ready`, `/lb-status`, `/metrics`,
//! `/lookup`, `/config`, backend drains, and the status page (`/`, `/status`). Requests are
//! handed to the controller, which answers them in turn with its other events; this module
//! only speaks HTTP.
//!
//! Bound to loopback by default: it can change what the node serves, and it has no
//! authentication of its own.

use std::{convert::Infallible, net::SocketAddr, time::Duration};

use http_body_util::{BodyExt as _, Full, Limited};
use hyper::{
    Method, Request, Response, StatusCode,
    body::{Bytes, Incoming},
    header,
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::TokioIo;
use tokio::{
    net::TcpListener,
    sync::{mpsc, oneshot},
};
use tracing::{debug, warn};

use crate::report::{LookupQuery, query_pairs};

/// Largest request body: a registry.
const MAX_BODY: usize = 4 << 20;
/// Bound on the controller's answer (a reload resolves backends).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound on reading a request head.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// The status page: a dashboard drawn from `/lb-status`, script and style inline.
const STATUS_PAGE: &str = include_str!("status.html");
const HTML: &str = "text/html; charset=utf-8";
/// What an HTML answer may load: its own inline script and style, and fetches from this
/// listener. Nothing from elsewhere, and no framing.
const HTML_CSP: &str = "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
                        connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; \
                        frame-ancestors 'none'";

/// What the admin API asks the controller.
#[derive(Debug)]
pub enum Ask {
    /// Liveness: the controller answers at all.
    Alive,
    Ready,
    Status,
    Metrics,
    Lookup(LookupQuery),
    /// The root registry file's text.
    Config,
    Apply {
        text: String,
        validate_only: bool,
    },
    Drain {
        service: String,
        backend: String,
        drained: bool,
    },
    /// Replace served certificates with this PEM chain and key.
    SslUpdate {
        name: Option<String>,
        cert: String,
        key: String,
    },
}

/// The controller's answer.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub content_type: &'static str,
    pub body: String,
}

impl Answer {
    #[must_use]
    pub fn json(status: u16, v: &serde_json::Value) -> Self {
        let mut body = serde_json::to_string_pretty(v).unwrap_or_default();
        body.push('\n');
        Self { status, content_type: "application/json", body }
    }

    #[must_use]
    pub fn text(status: u16, body: impl Into<String>) -> Self {
        Self { status, content_type: "text/plain; charset=utf-8", body: body.into() }
    }

    /// A JSON error body `{"error": ...}`.
    #[must_use]
    pub fn error(status: u16, message: &str) -> Self {
        Self::json(status, &serde_json::json!({ "error": message }))
    }
}

/// One request to the controller, with where to send its answer.
pub struct Envelope {
    pub ask: Ask,
    pub reply: oneshot::Sender<Answer>,
}

/// Whether an admin listener on `addr` may be opened: loopback always, anything else only
/// when the operator said so.
pub fn check_bind(addr: SocketAddr, allow_public: bool) -> Result<(), String> {
    if addr.ip().is_loopback() || allow_public {
        Ok(())
    } else {
        Err(format!(
            "refusing to serve the admin API on {addr}: it is unauthenticated and can change what this node serves; \
             bind a loopback address or pass --admin-allow-public"
        ))
    }
}

/// Serves the admin API on `listener` until the process ends.
pub async fn serve(listener: TcpListener, tx: mpsc::Sender<Envelope>) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %e, "admin API: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let tx = tx.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| handle(req, tx.clone()));
            let mut builder = http1::Builder::new();
            builder
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .keep_alive(true);
            if let Err(e) = builder.serve_connection(TokioIo::new(stream), service).await {
                debug!(%peer, error = %e, "admin API connection ended");
            }
        });
    }
}

async fn handle(
    req: Request<Incoming>,
    tx: mpsc::Sender<Envelope>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let answer = route(req, &tx).await.unwrap_or_else(|a| a);
    let mut resp = Response::new(Full::new(Bytes::from(answer.body)));
    *resp.status_mut() = StatusCode::from_u16(answer.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    resp.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static(answer.content_type));
    resp.headers_mut().insert(header::CACHE_CONTROL, header::HeaderValue::from_static("no-store"));
    if answer.content_type == HTML {
        resp.headers_mut()
            .insert(header::CONTENT_SECURITY_POLICY, header::HeaderValue::from_static(HTML_CSP));
    }
    Ok(resp)
}

async fn route(req: Request<Incoming>, tx: &mpsc::Sender<Envelope>) -> Result<Answer, Answer> {
    let path = req.uri().path().to_owned();
    let query = req.uri().query().unwrap_or("").to_owned();
    let method = req.method().clone();
    let param = |name: &str| query_pairs(&query).find_map(|(k, v)| (k == name).then_some(v));
    let ask = match (method.clone(), path.as_str()) {
        // The page needs nothing from the controller: it reads `/lb-status` itself.
        (Method::GET, "/" | "/status") => {
            return Ok(Answer { status: 200, content_type: HTML, body: STATUS_PAGE.to_owned() });
        }
        (Method::GET, "/health") => Ask::Alive,
        (Method::GET, "/ready") => Ask::Ready,
        (Method::GET, "/lb-status") => Ask::Status,
        (Method::GET, "/metrics") => Ask::Metrics,
        (Method::GET, "/lookup") => {
            Ask::Lookup(LookupQuery::parse(&query).map_err(|e| Answer::error(400, &e))?)
        }
        (Method::GET, "/config") => Ask::Config,
        (Method::POST | Method::PUT, "/config") => {
            let body = Limited::new(req.into_body(), MAX_BODY)
                .collect()
                .await
                .map_err(|e| Answer::error(413, &format!("cannot read the body: {e}")))?
                .to_bytes();
            let text = String::from_utf8(body.to_vec())
                .map_err(|_| Answer::error(400, "the registry is not UTF-8"))?;
            let validate_only = matches!(param("validate_only").as_deref(), Some("1" | "true"));
            Ask::Apply { text, validate_only }
        }
        (Method::POST, "/ssl/update") => {
            let body = Limited::new(req.into_body(), MAX_BODY)
                .collect()
                .await
                .map_err(|e| Answer::error(413, &format!("cannot read the body: {e}")))?
                .to_bytes();
            let v: serde_json::Value = serde_json::from_slice(&body)
                .map_err(|e| Answer::error(400, &format!("the body is not JSON: {e}")))?;
            let field = |k: &str| v[k].as_str().map(str::to_owned);
            Ask::SslUpdate {
                name: field("name"),
                cert: field("cert").ok_or_else(|| Answer::error(400, "missing cert (PEM text)"))?,
                key: field("key").ok_or_else(|| Answer::error(400, "missing key (PEM text)"))?,
            }
        }
        (Method::POST, "/backends/drain" | "/backends/enable") => {
            let service = param("service").ok_or_else(|| Answer::error(400, "missing service"))?;
            let backend = param("backend").ok_or_else(|| Answer::error(400, "missing backend"))?;
            Ask::Drain { service, backend, drained: path.ends_with("drain") }
        }
        (
            _,
            "/" | "/status" | "/health" | "/ready" | "/lb-status" | "/metrics" | "/lookup" | "/config"
            | "/backends/drain" | "/backends/enable" | "/ssl/update",
        ) => {
            return Err(Answer::error(405, &format!("{method} is not allowed on {path}")));
        }
        _ => return Err(Answer::error(404, &format!("no such endpoint: {path}"))),
    };
    let (reply, rx) = oneshot::channel();
    tx.send(Envelope { ask, reply }).await.map_err(|_| Answer::error(503, "lbd is stopping"))?;
    match tokio::time::timeout(ANSWER_TIMEOUT, rx).await {
        Ok(Ok(answer)) => Ok(answer),
        Ok(Err(_)) => Err(Answer::error(503, "lbd is stopping")),
        Err(_) => Err(Answer::error(504, "lbd did not answer in time")),
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    /// The whole answer (head and body) to `GET path` on a connection to `addr`.
    async fn get(addr: SocketAddr, path: &str) -> String {
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        c.write_all(format!("GET {path} HTTP/1.1\r\nHost: lb\r\nConnection: close\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut out = String::new();
        c.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn the_status_page_is_served_with_its_csp_and_the_api_still_answers() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, mut rx) = mpsc::channel::<Envelope>(4);
        tokio::spawn(serve(listener, tx));
        tokio::spawn(async move {
            while let Some(e) = rx.recv().await {
                let answer = match e.ask {
                    Ask::Status => Answer::json(200, &serde_json::json!({ "generation": 7 })),
                    other => Answer::error(500, &format!("unexpected {other:?}")),
                };
                let _ = e.reply.send(answer);
            }
        });
        for path in ["/", "/status", "/status?refresh=500"] {
            let page = get(addr, path).await;
            let (head, body) = page.split_once("\r\n\r\n").unwrap();
            let head = head.to_ascii_lowercase();
            assert!(head.starts_with("http/1.1 200"), "{path}: {head}");
            assert!(head.contains("content-type: text/html; charset=utf-8"), "{head}");
            assert!(
                head.contains("content-security-policy: default-src 'none'; script-src 'unsafe-inline'"),
                "{head}"
            );
            assert!(head.contains("connect-src 'self'"), "{head}");
            assert_eq!(body, STATUS_PAGE);
        }
        let status = get(addr, "/lb-status").await;
        assert!(status.starts_with("HTTP/1.1 200"), "{status}");
        assert!(status.contains("\"generation\": 7"), "{status}");
        assert!(!status.to_ascii_lowercase().contains("content-security-policy"), "{status}");
        let post = tokio::net::TcpStream::connect(addr).await;
        let mut post = post.unwrap();
        post.write_all(b"POST / HTTP/1.1\r\nHost: lb\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut out = String::new();
        post.read_to_string(&mut out).await.unwrap();
        assert!(out.starts_with("HTTP/1.1 405"), "{out}");
        assert!(get(addr, "/nope").await.starts_with("HTTP/1.1 404"));
    }

    #[test]
    fn the_status_page_loads_nothing_from_elsewhere_and_never_writes_html() {
        for external in ["http://", "https://", "src=", "@import", "url(", "<link rel=\"stylesheet"] {
            assert!(!STATUS_PAGE.contains(external), "the page holds {external}");
        }
        // Text from the JSON goes in as text: no HTML parsing of strings anywhere.
        for sink in ["innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("] {
            assert!(!STATUS_PAGE.contains(sink), "the page uses {sink}");
        }
        assert!(STATUS_PAGE.contains("fetch('/lb-status'"));
    }

    #[test]
    fn a_public_bind_needs_the_flag() {
        assert!(check_bind("127.0.0.1:9180".parse().unwrap(), false).is_ok());
        assert!(check_bind("[::1]:9180".parse().unwrap(), false).is_ok());
        let e = check_bind("0.0.0.0:9180".parse().unwrap(), false).unwrap_err();
        assert!(e.contains("--admin-allow-public"), "{e}");
        assert!(check_bind("0.0.0.0:9180".parse().unwrap(), true).is_ok());
    }
}
