//! Listening sockets for the serving threads.
//!
//! Each serving thread accepts on a socket of its own, all bound to the same address
//! with `SO_REUSEPORT`, so that the kernel spreads new connections over the threads
//! (as nginx's `reuseport` does) instead of the first thread to wake up taking them
//! all. A listener bound elsewhere without the option (tests bind their own) is shared
//! by cloning its handle instead, as before.
//!
//! The kernel picks a socket by a hash of the connection's addresses, which spreads
//! many connections evenly but a few badly: four HTTP/2 clients land all on one of
//! two threads one time in eight, and three on one half the time, and one thread then
//! serves most of the traffic while the other idles. So the threads also hand new
//! connections to each other (`Spread`): a thread that accepts a connection while
//! another serves fewer passes it on, and every thread ends up with its share.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::mpsc;

/// A connection accepted (and admitted to the connection budget) by one serving
/// thread for another.
pub type HandedOff = (std::net::TcpStream, SocketAddr, SpreadHold, super::limits::Admitted);

/// The serving threads of one listening port, and how many connections each serves.
#[derive(Debug)]
struct SpreadShared {
    open: Vec<AtomicUsize>,
    inboxes: Vec<mpsc::UnboundedSender<HandedOff>>,
}

/// One serving thread's part in spreading a port's connections.
#[derive(Debug)]
pub struct Spread {
    shared: Arc<SpreadShared>,
    index: usize,
    inbox: mpsc::UnboundedReceiver<HandedOff>,
}

/// Counts a connection against the thread serving it until dropped.
#[derive(Debug)]
pub struct SpreadHold {
    shared: Arc<SpreadShared>,
    index: usize,
}

impl Drop for SpreadHold {
    fn drop(&mut self) {
        self.shared.open[self.index].fetch_sub(1, Ordering::Relaxed);
    }
}

impl Spread {
    /// The parts of `threads` serving threads of one port.
    pub fn group(threads: usize) -> Vec<Spread> {
        let (inboxes, receivers): (Vec<_>, Vec<_>) = (0..threads.max(1)).map(|_| mpsc::unbounded_channel()).unzip();
        let shared =
            Arc::new(SpreadShared { open: (0..threads.max(1)).map(|_| AtomicUsize::new(0)).collect(), inboxes });
        receivers
            .into_iter()
            .enumerate()
            .map(|(index, inbox)| Spread { shared: shared.clone(), index, inbox })
            .collect()
    }

    /// A thread serving a port alone.
    pub fn alone() -> Spread {
        Spread::group(1).pop().expect("a group of one")
    }

    /// Places a connection this thread accepted: on the thread serving the fewest
    /// (this one unless another serves fewer), counted there at once so that the next
    /// placement sees it. Returns the thread and the connection's hold.
    pub fn place(&self) -> (usize, SpreadHold) {
        let open = |i: usize| self.shared.open[i].load(Ordering::Relaxed);
        let mut target = self.index;
        for i in 0..self.shared.open.len() {
            if open(i) < open(target) {
                target = i;
            }
        }
        self.shared.open[target].fetch_add(1, Ordering::Relaxed);
        (target, SpreadHold { shared: self.shared.clone(), index: target })
    }

    /// Passes a connection to thread `target`; gives it back if that thread has
    /// stopped taking connections.
    pub fn hand_off(&self, target: usize, connection: HandedOff) -> Result<(), HandedOff> {
        self.shared.inboxes[target].send(connection).map_err(|e| e.0)
    }

    /// Whether `target` is this thread.
    pub fn is_here(&self, target: usize) -> bool {
        target == self.index
    }

    /// The next connection another thread passed to this one.
    pub async fn handed_off(&mut self) -> Option<HandedOff> {
        self.inbox.recv().await
    }

    /// Counts a connection against this thread (one that another could not take).
    pub fn hold_here(&self) -> SpreadHold {
        self.shared.open[self.index].fetch_add(1, Ordering::Relaxed);
        SpreadHold { shared: self.shared.clone(), index: self.index }
    }
}

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

    #[test]
    fn connections_go_to_the_thread_serving_the_fewest() {
        let mut group = Spread::group(2);
        let (second, first) = (group.pop().unwrap(), group.pop().unwrap());
        // Four connections all accepted by the first thread: two are passed on.
        let holds: Vec<(usize, SpreadHold)> = (0..4).map(|_| first.place()).collect();
        let placed: Vec<usize> = holds.iter().map(|(t, _)| *t).collect();
        assert_eq!(placed, vec![0, 1, 0, 1]);
        // One of the second thread's connections ends: the first thread's next
        // connection goes there; once even, each thread keeps what it accepts.
        let mut holds = holds;
        drop(holds.remove(1));
        for (accepted_by, placed_on) in [(&first, 1), (&second, 1), (&first, 0)] {
            let (target, hold) = accepted_by.place();
            assert_eq!(target, placed_on);
            holds.push((target, hold));
        }
        assert!(first.is_here(0) && !first.is_here(1));
    }

    #[tokio::test]
    async fn a_connection_handed_off_arrives_with_its_hold() {
        let mut group = Spread::group(2);
        let (mut second, first) = (group.pop().unwrap(), group.pop().unwrap());
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let _client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (stream, peer) = listener.accept().unwrap();
        let budget = super::super::limits::ConnectionBudget::new(8);
        let _here = first.hold_here();
        let (target, hold) = first.place();
        assert_eq!(target, 1);
        first.hand_off(target, (stream, peer, hold, budget.admit().unwrap())).unwrap();
        let (_, arrived_from, hold, _admitted) = second.handed_off().await.unwrap();
        assert_eq!(arrived_from, peer);
        assert_eq!(hold.index, 1);
        drop(second);
        // A stopped thread takes nothing: the connection comes back.
        let (stream, peer) = {
            let _client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
            listener.accept().unwrap()
        };
        assert!(first.hand_off(1, (stream, peer, first.hold_here(), budget.admit().unwrap())).is_err());
    }

    #[tokio::test]
    async fn a_listener_bound_without_the_option_is_shared_by_handle() {
        let plain = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let other = for_thread(&plain, 3).unwrap();
        assert_eq!(other.local_addr().unwrap(), plain.local_addr().unwrap());
    }
}
