//! A socket that reads ahead of a caller that reads in small pieces, into a buffer that exists
//! only while it holds bytes.
//!
//! tungstenite reads a WebSocket in pieces of at most its read buffer's size, and allocates
//! and zero-fills that buffer for every connection up front: an idle browser's largest single
//! cost (docs/bench.md, idle `/ws`). With a small tungstenite buffer over this stream, a burst
//! of frames still costs one `read(2)` per [`READ_AHEAD`] bytes, and a connection that waits
//! holds nothing here.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// How much one read from the socket asks for when the caller asks for less.
pub const READ_AHEAD: usize = 4 * 1024;

/// `inner`, read ahead for callers that ask for less than [`READ_AHEAD`] at a time.
#[derive(Debug)]
pub struct ReadAhead<S> {
    inner: S,
    /// Read from the socket and not yet taken; no allocation while empty.
    ahead: BytesMut,
}

impl<S> ReadAhead<S> {
    pub fn new(inner: S) -> Self {
        ReadAhead {
            inner,
            ahead: BytesMut::new(),
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for ReadAhead<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        if this.ahead.is_empty() {
            // A caller with room for a whole read (hyper's request buffer) reads straight in.
            if buf.remaining() >= READ_AHEAD {
                return Pin::new(&mut this.inner).poll_read(cx, buf);
            }
            this.ahead.reserve(READ_AHEAD);
            let read =
                tokio_util::io::poll_read_buf(Pin::new(&mut this.inner), cx, &mut this.ahead);
            if !matches!(read, Poll::Ready(Ok(n)) if n > 0) {
                // Waiting, at the end or failed: the buffer goes, so an idle socket holds none.
                this.ahead = BytesMut::new();
            }
            ready!(read)?;
        }
        let n = buf.remaining().min(this.ahead.len());
        buf.put_slice(&this.ahead[..n]);
        this.ahead.advance(n);
        if this.ahead.is_empty() {
            this.ahead = BytesMut::new();
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for ReadAhead<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use futures_util::FutureExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// Whatever piece sizes the caller reads in, it gets every byte in order, and nothing is
    /// held once it has taken them all.
    #[tokio::test]
    async fn small_reads_get_every_byte_in_order_and_leave_nothing_held() {
        let sent: Vec<u8> = (0..3 * READ_AHEAD + 123).map(|i| (i % 251) as u8).collect();
        for piece in [1, 7, 256, READ_AHEAD - 1, READ_AHEAD, 3 * READ_AHEAD] {
            let (mut tx, rx) = tokio::io::duplex(64 * 1024);
            tx.write_all(&sent).await.unwrap();
            drop(tx);
            let mut reader = ReadAhead::new(rx);
            let mut got = Vec::new();
            let mut chunk = vec![0; piece];
            loop {
                let n = reader.read(&mut chunk).await.unwrap();
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&chunk[..n]);
            }
            assert_eq!(got, sent, "read in pieces of {piece}");
            assert_eq!(reader.ahead.capacity(), 0, "pieces of {piece}");
        }
    }

    /// A caller waiting on a quiet socket leaves no buffer behind.
    #[tokio::test]
    async fn a_waiting_read_holds_no_buffer() {
        let (_tx, rx) = tokio::io::duplex(1024);
        let mut reader = ReadAhead::new(rx);
        let mut chunk = [0; 16];
        assert!(
            reader.read(&mut chunk).now_or_never().is_none(),
            "nothing was sent"
        );
        assert_eq!(reader.ahead.capacity(), 0);
    }
}
