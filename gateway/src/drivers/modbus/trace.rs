//! The layer under tokio-modbus on every link: a hex trace of every frame at `debug` level, for
//! commissioning a device that answers something unexpected (`--log-level debug`, or
//! `RUST_LOG=updraft=debug`), and a drained line before each request.
//!
//! The trace is taken below tokio-modbus, so what is logged is exactly what went over the wire,
//! MBAP or RTU framing included. Off, it costs one level check per read or write.
//!
//! Draining: a slave that answers after its timeout leaves its late reply in the socket or the
//! serial driver's buffer, where tokio-modbus would take it for the answer to the next request
//! (to another slave, or the same slave's next read: stale data with a good quality). So before a
//! request goes out, whatever is already waiting is read and thrown away (and traced as such).

use std::fmt::Write as _;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tracing::{debug, enabled, Level};

/// A transport that logs the bytes it carries.
#[derive(Debug)]
pub struct Traced<S> {
    inner: S,
    link: Arc<str>,
}

impl<S> Traced<S> {
    pub fn new(inner: S, link: Arc<str>) -> Self {
        Traced { inner, link }
    }
}

impl<S: AsyncRead + Unpin> Traced<S> {
    /// Reads and discards whatever the peer has already sent, without waiting for more.
    fn drain(&mut self, cx: &mut Context<'_>) {
        let mut scratch = [0u8; 256];
        loop {
            let mut rb = ReadBuf::new(&mut scratch);
            match Pin::new(&mut self.inner).poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) if !rb.filled().is_empty() => {
                    debug!(link = %self.link, "Modbus stale rx discarded {}", hex(rb.filled()));
                }
                // Nothing waiting, the end of the stream, or an error the next read will report.
                _ => break,
            }
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 3);
    for (i, b) in bytes.iter().enumerate() {
        if i > 0 {
            s.push(' ');
        }
        let _ = write!(s, "{b:02x}");
    }
    s
}

impl<S: AsyncRead + Unpin> AsyncRead for Traced<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before && enabled!(Level::DEBUG) {
            debug!(link = %self.link, "Modbus rx {}", hex(&buf.filled()[before..]));
        }
        r
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Traced<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        // Requests and answers strictly alternate, so nothing can be due before this write.
        self.drain(cx);
        let r = Pin::new(&mut self.inner).poll_write(cx, data);
        if let Poll::Ready(Ok(n)) = r {
            if n > 0 && enabled!(Level::DEBUG) {
                debug!(link = %self.link, "Modbus tx {}", hex(&data[..n]));
            }
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl io::Write for Captured {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn frames_are_logged_in_hex_at_debug_level() {
        let log = Captured::default();
        let sink = log.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(Level::DEBUG)
            .with_ansi(false)
            .with_writer(move || sink.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
            rt.block_on(async {
                let (a, mut b) = tokio::io::duplex(64);
                let mut t = Traced::new(a, Arc::from("press"));
                // A late reply to an earlier request is waiting when the next request goes out.
                b.write_all(&[0x09, 0x09]).await.unwrap();
                tokio::task::yield_now().await;
                t.write_all(&[0x00, 0x01, 0x00, 0x00, 0x00, 0x06, 0x01, 0x03]).await.unwrap();
                let mut got = [0u8; 8];
                b.read_exact(&mut got).await.unwrap();
                b.write_all(&[0x01, 0x83, 0x02]).await.unwrap();
                let mut back = [0u8; 3];
                t.read_exact(&mut back).await.unwrap();
                assert_eq!(back, [0x01, 0x83, 0x02], "the stale bytes were not taken for the answer");
            });
        });
        let text = String::from_utf8(log.0.lock().unwrap().clone()).unwrap();
        assert!(text.contains("Modbus tx 00 01 00 00 00 06 01 03") && text.contains("link=press"), "{text}");
        assert!(text.contains("Modbus rx 01 83 02"), "{text}");
        assert!(text.contains("Modbus stale rx discarded 09 09"), "{text}");
    }
}
