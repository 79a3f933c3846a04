//! The REST listener's HTTP/1.1 relay: a client connection is served by one task
//! that parses each request head in place with `httparse`, forwards it (hop-by-hop
//! fields removed) and its body over a keep-alive connection from a per-thread pool,
//! and streams the answer back, with the same tee records as the hyper path.
//!
//! It exists because hyper's server and client together cost two to three times
//! nginx's CPU per small REST request (two state machines, a body channel and a
//! task hand-off per exchange); the relay does one read and one write per side for a
//! small exchange and allocates nothing per request beyond the record itself.
//!
//! It serves cleartext and TLS client connections to `http://` upstreams;
//! `https://` upstreams keep the hyper path (`super::rest`). Framing is validated as
//! hyper validates it (`framing`), and the relay never parses a payload: bodies pass
//! as bytes, re-chunked only when their length is unknown.

mod buffer;
mod conn;
mod framing;
mod pool;

use super::{ProxyShared, POOL_IDLE};
use pool::UpstreamPool;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// The relay of one serving thread: its proxy state and its upstream pool.
#[derive(Debug, Clone)]
pub(super) struct Relay {
    /// Capture queue, metrics, request ids and the upstream's address.
    shared: Arc<ProxyShared>,
    /// Idle keep-alive connections to TF Serving's REST port.
    pool: Arc<UpstreamPool>,
    /// Cancelled when the listener stops. One per serving thread, so that waiting on
    /// it between requests touches no lock shared with the other threads (the
    /// listeners' `watch` channel is shared by all of them).
    stop: CancellationToken,
}

impl Relay {
    /// The relay for the REST upstream, or `None` when it is `https://` (served by
    /// the hyper path instead).
    pub(super) fn for_rest_upstream(shared: Arc<ProxyShared>) -> Option<Relay> {
        let upstream = &shared.rest_upstream;
        if upstream.scheme != http::uri::Scheme::HTTP {
            return None;
        }
        // As hyper's connector: connecting may take the upstream timeout, at most 10 s.
        let connect_timeout = shared.upstream_timeout.min(Duration::from_secs(10));
        let pool = UpstreamPool::new(upstream.authority.host(), upstream.port(), connect_timeout, POOL_IDLE);
        Some(Relay { shared, pool: Arc::new(pool), stop: CancellationToken::new() })
    }

    /// The relay for one listener run: its connections stop once `stop` turns true.
    /// Call on the thread (runtime) that serves the listener.
    pub(super) fn stopping_on(&self, mut stop: watch::Receiver<bool>) -> Relay {
        let token = CancellationToken::new();
        let cancel = token.clone();
        tokio::spawn(async move {
            let _ = stop.wait_for(|stopped| *stopped).await;
            cancel.cancel();
        });
        Relay { stop: token, ..self.clone() }
    }

    /// Serves one client connection until it ends, or until the listener stops
    /// between two exchanges.
    pub(super) async fn serve<S>(self, io: S, peer: std::net::SocketAddr)
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        conn::serve(self, io, peer).await;
    }
}
