//! A read buffer that lives as long as its connection: request and response heads
//! are parsed where they were read, bodies pass through it, and nothing is
//! allocated per request once it has grown to the connection's largest head.

use std::io;
use tokio::io::{AsyncRead, AsyncReadExt};

/// Size a connection's buffer starts with: a typical head and a small body in one read.
pub const INITIAL: usize = 16 << 10;
/// A buffer grown past this for one large head is shrunk back once it is drained.
const KEEP_AT_MOST: usize = 64 << 10;

#[derive(Debug)]
pub struct ReadBuffer {
    /// Backing storage; its whole length is usable, `start..end` holds unread bytes.
    data: Vec<u8>,
    /// First unread byte.
    start: usize,
    /// One past the last unread byte.
    end: usize,
}

impl Default for ReadBuffer {
    fn default() -> Self {
        ReadBuffer { data: vec![0; INITIAL], start: 0, end: 0 }
    }
}

impl ReadBuffer {
    /// The bytes read and not yet consumed.
    pub fn filled(&self) -> &[u8] {
        &self.data[self.start..self.end]
    }

    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }

    /// Marks the first `n` unread bytes as used.
    pub fn consume(&mut self, n: usize) {
        self.start = (self.start + n).min(self.end);
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
            if self.data.len() > KEEP_AT_MOST {
                self.data = vec![0; INITIAL];
            }
        }
    }

    /// Reads once more from `io`, growing the buffer up to `limit` bytes of unread
    /// data. Returns the number of bytes read (0 at end of stream); fails with
    /// `ErrorKind::OutOfMemory` when `limit` unread bytes are already held.
    pub async fn fill_from<R: AsyncRead + Unpin>(&mut self, io: &mut R, limit: usize) -> io::Result<usize> {
        if self.end == self.data.len() {
            if self.start > 0 {
                self.data.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            } else if self.data.len() < limit {
                let grown = (self.data.len() * 2).clamp(INITIAL, limit);
                self.data.resize(grown, 0);
            } else {
                return Err(io::Error::new(io::ErrorKind::OutOfMemory, "read buffer limit reached"));
            }
        }
        let n = io.read(&mut self.data[self.end..]).await?;
        self.end += n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_buffer_compacts_grows_to_its_limit_and_refuses_beyond() {
        let mut buffer = ReadBuffer::default();
        let source = vec![7u8; 3 * INITIAL];
        let mut reader = source.as_slice();
        assert_eq!(buffer.fill_from(&mut reader, 2 * INITIAL).await.unwrap(), INITIAL);
        assert_eq!(buffer.fill_from(&mut reader, 2 * INITIAL).await.unwrap(), INITIAL);
        assert_eq!(buffer.filled().len(), 2 * INITIAL);
        let full = buffer.fill_from(&mut reader, 2 * INITIAL).await.unwrap_err();
        assert_eq!(full.kind(), io::ErrorKind::OutOfMemory);
        buffer.consume(10);
        assert_eq!(buffer.fill_from(&mut reader, 2 * INITIAL).await.unwrap(), 10, "compacted, not grown");
        buffer.consume(2 * INITIAL);
        assert!(buffer.is_empty());
    }
}
