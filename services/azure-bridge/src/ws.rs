//! MQTT over WebSocket (RFC 6455), for networks that block port 8883: IoT Hub takes it on 443
//! at `/$iothub/websocket`, subprotocol `mqtt`. A client side only, binary frames only, on
//! top of the TLS stream: the upgrade, then each write one masked binary frame and each read
//! the payloads of the frames that arrive (pings answered, a close ending the stream).
//!
//! Not a crate: tokio-tungstenite would bring tungstenite, http and their dependencies for
//! what is ~200 lines for this one use (docs/dependencies.md).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use bytes::{Buf as _, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _, ReadBuf};

/// RFC 6455 §1.3.
const GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
/// The largest frame accepted (an MQTT packet from the hub is at most ~256 KB).
const MAX_FRAME: u64 = 1 << 20;

/// The accept value a server must answer `key` with.
pub fn accept_key(key: &str) -> String {
    let d = ring::digest::digest(
        &ring::digest::SHA1_FOR_LEGACY_USE_ONLY,
        format!("{key}{GUID}").as_bytes(),
    );
    STANDARD.encode(d.as_ref())
}

fn random<const N: usize>() -> [u8; N] {
    use ring::rand::SecureRandom as _;
    let mut b = [0u8; N];
    if ring::rand::SystemRandom::new().fill(&mut b).is_err() {
        // No system randomness: masking keys only need to be unpredictable to the network's
        // proxies, and the clock still differs per frame.
        let t = proto::now_ms().unsigned_abs().to_le_bytes();
        for (i, x) in b.iter_mut().enumerate() {
            *x = t[i % t.len()] ^ u8::try_from(i % 256).unwrap_or(0);
        }
    }
    b
}

/// Upgrade `inner` to a WebSocket on `path` of `host`, subprotocol `mqtt`.
pub async fn connect<S: AsyncRead + AsyncWrite + Unpin>(
    mut inner: S,
    host: &str,
    path: &str,
) -> io::Result<WsStream<S>> {
    let key = STANDARD.encode(random::<16>());
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: mqtt\r\n\r\n"
    );
    inner.write_all(request.as_bytes()).await?;
    inner.flush().await?;
    let mut head = BytesMut::with_capacity(1024);
    let end = loop {
        if let Some(i) = head.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if head.len() > 16 * 1024 {
            return Err(io::Error::other(
                "the upgrade answer's headers are over 16 KiB",
            ));
        }
        if inner.read_buf(&mut head).await? == 0 {
            return Err(io::Error::other(
                "the server closed the connection during the upgrade",
            ));
        }
    };
    let text = String::from_utf8_lossy(&head[..end]).to_string();
    let mut lines = text.split("\r\n");
    let status = lines.next().unwrap_or_default();
    if status.split(' ').nth(1) != Some("101") {
        return Err(io::Error::other(format!(
            "the server refused the WebSocket upgrade: {status}"
        )));
    }
    let header = |name: &str| {
        text.split("\r\n").find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_string())
        })
    };
    if header("sec-websocket-accept").as_deref() != Some(accept_key(&key).as_str()) {
        return Err(io::Error::other(
            "the server's Sec-WebSocket-Accept is wrong",
        ));
    }
    if !header("sec-websocket-protocol").is_some_and(|p| p.eq_ignore_ascii_case("mqtt")) {
        return Err(io::Error::other(
            "the server did not accept the `mqtt` subprotocol",
        ));
    }
    head.advance(end);
    Ok(WsStream {
        inner,
        raw: head,
        payload: BytesMut::new(),
        out: BytesMut::new(),
        closed: false,
    })
}

/// A WebSocket connection as a byte stream.
#[derive(Debug)]
pub struct WsStream<S> {
    inner: S,
    /// Bytes read from `inner` not yet parsed into frames.
    raw: BytesMut,
    /// Payload bytes parsed, not yet read by the caller.
    payload: BytesMut,
    /// Frames (ours and pongs) not yet written to `inner`.
    out: BytesMut,
    closed: bool,
}

/// A client frame: FIN, `opcode`, masked (RFC 6455 §5.3).
pub fn client_frame(opcode: u8, data: &[u8], mask: [u8; 4], out: &mut BytesMut) {
    out.extend_from_slice(&[0x80 | opcode]);
    let len = data.len();
    if len < 126 {
        out.extend_from_slice(&[0x80 | u8::try_from(len).unwrap_or(0)]);
    } else if let Ok(l) = u16::try_from(len) {
        out.extend_from_slice(&[0x80 | 126]);
        out.extend_from_slice(&l.to_be_bytes());
    } else {
        out.extend_from_slice(&[0x80 | 127]);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    out.extend_from_slice(&mask);
    out.extend(data.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
}

/// One frame off the front of `raw`: (opcode, payload), or `None` until it is all there.
pub fn parse_frame(raw: &mut BytesMut) -> io::Result<Option<(u8, BytesMut)>> {
    if raw.len() < 2 {
        return Ok(None);
    }
    let opcode = raw[0] & 0x0f;
    let masked = raw[1] & 0x80 != 0;
    let (len, mut at) = match raw[1] & 0x7f {
        126 if raw.len() >= 4 => (u64::from(u16::from_be_bytes([raw[2], raw[3]])), 4),
        127 if raw.len() >= 10 => {
            let mut b = [0u8; 8];
            b.copy_from_slice(&raw[2..10]);
            (u64::from_be_bytes(b), 10)
        }
        126 | 127 => return Ok(None),
        n => (u64::from(n), 2),
    };
    if len > MAX_FRAME {
        return Err(io::Error::other(format!(
            "a WebSocket frame of {len} bytes"
        )));
    }
    let mask = if masked {
        if raw.len() < at + 4 {
            return Ok(None);
        }
        let m = [raw[at], raw[at + 1], raw[at + 2], raw[at + 3]];
        at += 4;
        Some(m)
    } else {
        None
    };
    let len = usize::try_from(len).map_err(|_| io::Error::other("frame too large"))?;
    if raw.len() < at + len {
        return Ok(None);
    }
    raw.advance(at);
    let mut payload = raw.split_to(len);
    if let Some(m) = mask {
        for (i, b) in payload.iter_mut().enumerate() {
            *b ^= m[i % 4];
        }
    }
    Ok(Some((opcode, payload)))
}

impl<S: AsyncRead + AsyncWrite + Unpin> WsStream<S> {
    /// Write out queued frames.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.out.is_empty() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.out))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.out.advance(n);
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for WsStream<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if !this.payload.is_empty() {
                let n = this.payload.len().min(buf.remaining());
                buf.put_slice(&this.payload.split_to(n));
                return Poll::Ready(Ok(()));
            }
            if this.closed {
                return Poll::Ready(Ok(()));
            }
            match parse_frame(&mut this.raw)? {
                Some((0x0..=0x2, p)) => this.payload.extend_from_slice(&p),
                Some((0x8, _)) => this.closed = true,
                Some((0x9, p)) => {
                    client_frame(0xA, &p, random(), &mut this.out);
                    // Best effort now; the next write or flush sends it otherwise.
                    let _ = this.poll_drain(cx);
                }
                Some(_) => {}
                None => {
                    let mut chunk = [0u8; 8192];
                    let mut rb = ReadBuf::new(&mut chunk);
                    ready!(Pin::new(&mut this.inner).poll_read(cx, &mut rb))?;
                    if rb.filled().is_empty() {
                        this.closed = true;
                    }
                    this.raw.extend_from_slice(rb.filled());
                }
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for WsStream<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        // One frame at a time: what was queued goes out before more is taken.
        ready!(this.poll_drain(cx))?;
        client_frame(0x2, data, random(), &mut this.out);
        // Taken: it is sent by this call if the socket has room, else by the next write or
        // flush (every caller flushes).
        let _ = this.poll_drain(cx)?;
        Poll::Ready(Ok(data.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_accept_key_is_rfc_6455s_example() {
        // RFC 6455 §1.3.
        assert_eq!(
            accept_key("dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn frames_of_every_length_encoding_round_trip() {
        for len in [0, 5, 125, 126, 65535, 65536, 300_000] {
            let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let mut raw = BytesMut::new();
            client_frame(0x2, &data, [1, 2, 3, 4], &mut raw);
            // Cut anywhere: nothing until it is all there.
            let mut partial = BytesMut::from(&raw[..raw.len() - 1]);
            assert!(parse_frame(&mut partial).unwrap().is_none());
            let (op, payload) = parse_frame(&mut raw).unwrap().unwrap();
            assert_eq!((op, payload.to_vec()), (2, data));
            assert!(raw.is_empty());
        }
    }

    #[tokio::test]
    async fn a_stream_carries_bytes_both_ways_and_answers_a_ping() {
        let (client, mut server) = tokio::io::duplex(1 << 16);
        let server_task = tokio::spawn(async move {
            let mut head = Vec::new();
            let mut b = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") {
                server.read_exact(&mut b).await.unwrap();
                head.push(b[0]);
            }
            let text = String::from_utf8(head).unwrap();
            let key = text
                .lines()
                .find_map(|l| l.strip_prefix("Sec-WebSocket-Key: "))
                .unwrap()
                .to_string();
            let answer = format!(
                "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                 Sec-WebSocket-Accept: {}\r\nSec-WebSocket-Protocol: mqtt\r\n\r\n",
                accept_key(&key)
            );
            server.write_all(answer.as_bytes()).await.unwrap();
            // A ping, then "hello" split over two frames (unmasked, as servers send).
            server.write_all(&[0x89, 0x02, b'h', b'i']).await.unwrap();
            server
                .write_all(&[0x02, 0x02, b'h', b'e', 0x80, 0x03, b'l', b'l', b'o'])
                .await
                .unwrap();
            let mut raw = BytesMut::new();
            let mut got = Vec::new();
            while got.len() < 2 {
                let mut chunk = [0u8; 1024];
                let n = server.read(&mut chunk).await.unwrap();
                raw.extend_from_slice(&chunk[..n]);
                while let Some(f) = parse_frame(&mut raw).unwrap() {
                    got.push(f);
                }
            }
            got
        });
        let mut ws = connect(client, "hub", "/$iothub/websocket").await.unwrap();
        let mut five = [0u8; 5];
        ws.read_exact(&mut five).await.unwrap();
        assert_eq!(&five, b"hello");
        ws.write_all(b"mqtt bytes").await.unwrap();
        ws.flush().await.unwrap();
        let got = server_task.await.unwrap();
        assert_eq!(
            (got[0].0, &got[0].1[..]),
            (0xA, &b"hi"[..]),
            "the ping is answered with its data"
        );
        assert_eq!((got[1].0, &got[1].1[..]), (0x2, &b"mqtt bytes"[..]));
    }
}
