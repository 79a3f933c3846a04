//! Listening sockets for the serving threads.
//!
//! Each serving thread accepts on a socket of its own, all bound to the same address
//! with `SO_REUSEPORT`, so that the kernel spreads new connections over the threads
//! (as nginx's `reuseport` does) instead of the first thread to wake up taking them
//! all. A listener bound elsewhere without the option (tests bind their own) is shared
//! by cloning its handle instead, as before.

use std::io;
use std::net::SocketAddr;
use tokio::net::{TcpListener, TcpSocket};

/// Pending connections each socket queues before the kernel refuses new ones.
const BACKLOG: u32 = 1024;

/// Binds `address` so that the serving threads can add sockets of their own on it.
/// An address in use, by anyone, is an error: the port is probed without
/// `SO_REUSEPORT` first, so that a second mltap cannot silently share it.
pub async fn bind_shared(address: SocketAddr) -> io::Result<TcpListener> {
    let probe = std::net::TcpListener::bind(address)?;
    // A port 0 request gets its port here; every socket of the group uses it.
    let address = probe.local_addr()?;
    drop(probe);
    reuseport_socket(address)
}

/// The listener serving thread `index` accepts on: a socket of its own on `first`'s
/// address, or a handle of `first` itself when the address cannot be shared.
pub fn for_thread(first: &std::net::TcpListener, index: usize) -> io::Result<std::net::TcpListener> {
    if index > 0 {
        if let Ok(own) = first.local_addr().and_then(reuseport_socket) {
            return own.into_std();
        }
    }
    first.try_clone()
}

fn reuseport_socket(address: SocketAddr) -> io::Result<TcpListener> {
    let socket = if address.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.set_reuseport(true)?;
    socket.bind(address)?;
    socket.listen(BACKLOG)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn each_thread_gets_its_own_socket_on_the_shared_port() {
        let first = bind_shared("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let address = first.local_addr().unwrap();
        let first = first.into_std().unwrap();
        let second = for_thread(&first, 1).unwrap();
        assert_eq!(second.local_addr().unwrap(), address);
        // Both accept: a connection lands on one of them.
        let (a, b) = (TcpListener::from_std(first).unwrap(), TcpListener::from_std(second).unwrap());
        let _client = tokio::net::TcpStream::connect(address).await.unwrap();
        tokio::select! {
            accepted = a.accept() => assert!(accepted.is_ok()),
            accepted = b.accept() => assert!(accepted.is_ok()),
        }
    }

    #[tokio::test]
    async fn a_port_in_use_is_refused_even_to_a_shared_bind() {
        let taken = bind_shared("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let error = bind_shared(taken.local_addr().unwrap()).await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::AddrInUse);
        let plain = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        assert!(bind_shared(plain.local_addr().unwrap()).await.is_err());
    }

    #[tokio::test]
    async fn a_listener_bound_without_the_option_is_shared_by_handle() {
        let plain = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let other = for_thread(&plain, 3).unwrap();
        assert_eq!(other.local_addr().unwrap(), plain.local_addr().unwrap());
    }
}
