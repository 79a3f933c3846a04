//! Keep-alive connections to TF Serving's REST port, one pool per serving thread.
//!
//! A connection goes back to the pool only after a response was read to its end on
//! it. Before one is reused, the readiness the runtime already recorded for it is
//! checked: a connection TF Serving closed while it sat idle (EOF pending) is
//! dropped and the next one taken, so the request is never written to it. That is
//! the only retry: like hyper's client, a request already written is never sent again.

use super::buffer::ReadBuffer;
use std::sync::Mutex;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};
use tokio::net::TcpStream;

/// Idle connections kept per pool; more are closed.
const MAX_IDLE: usize = 1024;

/// A connection to the upstream with its own read buffer.
#[derive(Debug)]
pub struct UpstreamConnection {
    pub stream: TcpStream,
    pub buffer: ReadBuffer,
    /// True when it came from the pool (it served an earlier request).
    pub reused: bool,
}

#[derive(Debug)]
pub struct UpstreamPool {
    /// `host:port` as the connector resolves it.
    host: String,
    port: u16,
    connect_timeout: Duration,
    /// Idle connections are closed after this long.
    idle_timeout: Duration,
    /// Idle connections, most recently returned last.
    idle: Mutex<Vec<(UpstreamConnection, Instant)>>,
}

impl UpstreamPool {
    pub fn new(host: &str, port: u16, connect_timeout: Duration, idle_timeout: Duration) -> Self {
        // The authority's host keeps IPv6 brackets; the socket address wants none.
        let host = host.trim_start_matches('[').trim_end_matches(']').to_string();
        UpstreamPool { host, port, connect_timeout, idle_timeout, idle: Mutex::new(Vec::new()) }
    }

    /// An idle connection that is still open, or a new one.
    pub async fn get(&self) -> std::io::Result<UpstreamConnection> {
        while let Some((mut connection, since)) = self.pop() {
            if since.elapsed() < self.idle_timeout && still_open(&mut connection.stream) {
                connection.reused = true;
                return Ok(connection);
            }
        }
        let connect = TcpStream::connect((self.host.as_str(), self.port));
        let stream = tokio::time::timeout(self.connect_timeout, connect).await.map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("connect timed out after {:?}", self.connect_timeout),
            )
        })??;
        stream.set_nodelay(true)?;
        Ok(UpstreamConnection { stream, buffer: ReadBuffer::default(), reused: false })
    }

    /// Returns a connection whose last response was read to its end.
    pub fn put(&self, connection: UpstreamConnection) {
        if !connection.buffer.is_empty() {
            return; // bytes past the response: the connection is out of step
        }
        let mut idle = self.idle.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if idle.len() < MAX_IDLE {
            idle.push((connection, Instant::now()));
        }
    }

    fn pop(&self) -> Option<(UpstreamConnection, Instant)> {
        self.idle.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).pop()
    }
}

/// False when the peer closed the connection or sent unsolicited bytes while it was
/// idle. Costs a system call only when the runtime saw it become readable.
fn still_open(stream: &mut TcpStream) -> bool {
    let mut context = Context::from_waker(Waker::noop());
    match stream.poll_read_ready(&mut context) {
        Poll::Pending => true,
        Poll::Ready(Err(_)) => false,
        Poll::Ready(Ok(())) => {
            let mut probe = [0u8; 1];
            matches!(stream.try_read(&mut probe), Err(ref e) if e.kind() == std::io::ErrorKind::WouldBlock)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    #[tokio::test]
    async fn a_connection_closed_while_idle_is_not_reused() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let pool = UpstreamPool::new("127.0.0.1", port, Duration::from_secs(1), Duration::from_secs(90));
        let first = pool.get().await.unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        assert!(!first.reused);
        pool.put(first);
        let again = pool.get().await.unwrap();
        assert!(again.reused, "an open idle connection is reused");
        pool.put(again);
        drop(accepted);
        tokio::time::sleep(Duration::from_millis(50)).await;
        let fresh = pool.get().await.unwrap();
        assert!(!fresh.reused, "the closed one was dropped and a new one made");
    }
}
