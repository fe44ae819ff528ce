//! A WebSocket echo server (tokio-tungstenite) in a namespace, and a client.

use std::{
    net::{Ipv6Addr, SocketAddr},
    sync::mpsc,
    thread::JoinHandle,
    time::{Duration, Instant},
};

use futures_util::{SinkExt as _, StreamExt as _};
use tokio::{net::TcpListener, sync::oneshot};
use tokio_tungstenite::tungstenite::{Message, client::IntoClientRequest as _};

use crate::netns::NetNs;

/// Echoes every text and binary message back, until dropped.
pub struct WsEcho {
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl WsEcho {
    #[must_use]
    pub fn start(ns: &NetNs, port: u16) -> Self {
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let (ready_tx, ready_rx) = mpsc::channel();
        let thread = ns.spawn("ws-echo", move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            rt.block_on(async move {
                let listener = TcpListener::bind(SocketAddr::from((Ipv6Addr::UNSPECIFIED, port))).await;
                let _ = ready_tx.send(listener.is_ok());
                let Ok(listener) = listener else { return };
                let serve = async {
                    loop {
                        let Ok((conn, _)) = listener.accept().await else { continue };
                        tokio::spawn(async move {
                            let Ok(mut ws) = tokio_tungstenite::accept_async(conn).await else { return };
                            while let Some(Ok(m)) = ws.next().await {
                                if (m.is_text() || m.is_binary()) && ws.send(m).await.is_err() {
                                    return;
                                }
                            }
                        });
                    }
                };
                tokio::select! {
                    _ = stop_rx => {}
                    () = serve => {}
                }
            });
        });
        assert_eq!(ready_rx.recv().ok(), Some(true), "ws echo: cannot listen on {port} in {}", ns.name());
        Self { stop: Some(stop_tx), thread: Some(thread) }
    }
}

impl Drop for WsEcho {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Opens `ws://host/path` at `addr`, sends each message and returns what came back for each.
pub fn echo(
    addr: SocketAddr,
    host: &str,
    path: &str,
    messages: Vec<Message>,
) -> Result<Vec<Message>, String> {
    echo_then(addr, host, path, messages, || {})
}

/// `ws://host/path` at `addr`, switched to (101).
async fn connect(
    addr: SocketAddr,
    host: &str,
    path: &str,
) -> Result<tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>, String> {
    let tcp = tokio::net::TcpStream::connect(addr).await.map_err(|e| format!("connect: {e}"))?;
    let req = format!("ws://{host}{path}").into_client_request().map_err(|e| e.to_string())?;
    let (ws, resp) =
        tokio_tungstenite::client_async(req, tcp).await.map_err(|e| format!("handshake: {e}"))?;
    if resp.status() != 101 {
        return Err(format!("answered {} instead of 101", resp.status()));
    }
    Ok(ws)
}

/// Opens `ws://host/path` at `addr` and has a message echoed every `every` for `busy`, then
/// sends nothing: how long after the last echo the connection was closed. `Err` when an echo
/// failed while busy, or the connection was still open after `wait`.
pub fn quiet_until_closed(
    addr: SocketAddr,
    host: &str,
    path: &str,
    every: Duration,
    busy: Duration,
    wait: Duration,
) -> Result<Duration, String> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
    rt.block_on(async {
        let mut ws = connect(addr, host, path).await?;
        let start = Instant::now();
        while start.elapsed() < busy {
            tokio::time::sleep(every).await;
            ws.send(Message::text("tick"))
                .await
                .map_err(|e| format!("send after {:?}: {e}", start.elapsed()))?;
            match tokio::time::timeout(Duration::from_secs(5), ws.next()).await {
                Ok(Some(Ok(m))) if m == Message::text("tick") => {}
                other => return Err(format!("no echo after {:?}: {other:?}", start.elapsed())),
            }
        }
        let quiet = Instant::now();
        match tokio::time::timeout(wait, ws.next()).await {
            Err(_) => Err(format!("still open {wait:?} after the last message")),
            Ok(None | Some(Err(_) | Ok(Message::Close(_)))) => Ok(quiet.elapsed()),
            Ok(Some(Ok(m))) => Err(format!("a message nobody sent: {m:?}")),
        }
    })
}

/// As `echo`, running `open` after the echoes while the WebSocket is still open.
pub fn echo_then(
    addr: SocketAddr,
    host: &str,
    path: &str,
    messages: Vec<Message>,
    open: impl FnOnce(),
) -> Result<Vec<Message>, String> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
    rt.block_on(async {
        let mut ws = connect(addr, host, path).await?;
        let mut back = Vec::new();
        for m in messages {
            ws.send(m).await.map_err(|e| format!("send: {e}"))?;
            let reply = tokio::time::timeout(std::time::Duration::from_secs(5), ws.next())
                .await
                .map_err(|_| "no echo within 5 s".to_owned())?
                .ok_or("closed")?
                .map_err(|e| format!("read: {e}"))?;
            back.push(reply);
        }
        open();
        let _ = ws.close(None).await;
        Ok(back)
    })
}
