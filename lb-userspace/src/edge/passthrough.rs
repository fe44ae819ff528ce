//! TLS passthrough: a connection's `ClientHello` names the service (SNI matched against the
//! `hosts` of `http:` services on this listener); its bytes, the hello included, go to one of
//! that service's backends untouched. The backends terminate TLS (seed 000).

use std::{net::SocketAddr, sync::Arc, time::Instant};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
};
use tracing::{debug, info};

use super::{
    Shared,
    proxy::{self, Conn},
    proxy_v2,
    relay::relay,
    sni::{self, Hello},
    upstream::{InFlight, Pick},
};
use crate::config::Limits;

/// Most backends one connection tries (connect errors only: nothing was sent yet).
const MAX_TRIES: usize = 10;

pub async fn serve(
    mut client: TcpStream,
    peer: SocketAddr,
    port: u16,
    shared: &Arc<Shared>,
    limits: &Limits,
) {
    let started = Instant::now();
    let mut hello = Vec::with_capacity(2048);
    let name = match tokio::time::timeout(limits.header_timeout, read_hello(&mut client, &mut hello)).await {
        Ok(Ok(name)) => name,
        Ok(Err(why)) => {
            debug!(client = %peer, why, "passthrough: closed");
            return;
        }
        Err(_) => {
            debug!(client = %peer, "passthrough: no ClientHello in time");
            return;
        }
    };
    let sni = name.as_deref().unwrap_or("");
    let snap = shared.snapshot();
    let route = snap.tables.get(&port).and_then(|t| t.find(sni, "/"));
    let Some(svc) = route.and_then(|r| snap.services.get(&r.service)) else {
        info!(target: "lb_userspace::access", client = %peer.ip(), sni = %sni, "passthrough: no service for this name");
        return;
    };
    let local = client.local_addr().unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], port)));
    let conn = Conn { client: peer, local, port, tls: true, tunnel_idle: limits.tunnel_timeout };
    let pick = Pick { hash_key: proxy::hash_key(&svc.spec.balance, &conn, &http::HeaderMap::new()) };
    let allowed = (svc.spec.retry.tries as usize).clamp(1, MAX_TRIES);
    let mut tried = [usize::MAX; MAX_TRIES];
    let mut attempts = 0;
    let mut backend = None;
    while attempts < allowed {
        let Some(idx) = svc.pick(pick, &tried[..attempts], Instant::now()) else { break };
        tried[attempts] = idx;
        attempts += 1;
        let member = &svc.members[idx].state;
        let start = Instant::now();
        let connect = TcpStream::connect(member.identity.as_str());
        match tokio::time::timeout(svc.spec.timeouts.connect, connect).await {
            Ok(Ok(stream)) => {
                member.observe(start.elapsed());
                backend = Some((idx, stream));
                break;
            }
            Ok(Err(e)) => debug!(backend = %member.identity, error = %e, "passthrough: connect failed"),
            Err(_) => debug!(backend = %member.identity, "passthrough: connect timed out"),
        }
        svc.failed(idx, Instant::now());
    }
    let Some((idx, mut up)) = backend else {
        info!(target: "lb_userspace::access", client = %peer.ip(), sni = %sni, service = %svc.name, tries = attempts, "passthrough: no backend reachable");
        return;
    };
    let b = &svc.members[idx].state;
    let _in_flight = InFlight::start(b);
    let _ = up.set_nodelay(true);
    let relayed = async {
        // A backend that takes nothing is given up after the tunnel timeout, as in the relay.
        let first = async {
            if svc.spec.upstream.proxy_protocol {
                up.write_all(&proxy_v2::header(peer, local)).await?;
            }
            up.write_all(&hello).await
        };
        tokio::time::timeout(limits.tunnel_timeout, first).await.map_err(std::io::Error::from)??;
        std::io::Result::Ok(relay(&mut client, &mut up, Some(limits.tunnel_timeout)).await)
    }
    .await;
    let (sent, received, end) = match &relayed {
        Ok(r) => (r.from_a, r.from_b, r.end.as_str()),
        Err(_) => (0, 0, "reset"),
    };
    info!(
        target: "lb_userspace::access",
        client = %peer.ip(),
        sni = %sni,
        service = %svc.name,
        upstream = %b.identity,
        tries = attempts,
        bytes_in = sent + hello.len() as u64,
        bytes_out = received,
        end,
        ms = started.elapsed().as_millis(),
        "passthrough"
    );
}

/// Reads until `buf` holds a whole `ClientHello`; its server name.
async fn read_hello(client: &mut TcpStream, buf: &mut Vec<u8>) -> Result<Option<String>, &'static str> {
    loop {
        match sni::client_hello(buf) {
            Hello::Complete(name) => return Ok(name),
            Hello::Invalid(why) => return Err(why),
            Hello::Incomplete if buf.len() >= sni::MAX_HELLO => return Err("ClientHello too large"),
            Hello::Incomplete => {}
        }
        let mut chunk = [0u8; 4096];
        let n = client.read(&mut chunk).await.map_err(|_| "read failed")?;
        if n == 0 {
            return Err("closed before a whole ClientHello");
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}
