//! A bounded line framer: bytes in, complete lines out (pure, no I/O).
//!
//! Invariants:
//! - Memory is bounded: at most `max_line_bytes + 1` bytes are held, whatever arrives.
//! - A line longer than `max_line_bytes` (not counting `\r\n`) is reported once, as soon as
//!   it is known to be too long, and everything up to its `\n` is discarded: it is never
//!   half-parsed.
//! - A `\r` just before the `\n` is dropped (`Serial.println` sends `\r\n`).
//! - A line that is not UTF-8 is reported as such, never passed on lossily.

/// What the framer found in the bytes it was given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Framed {
    /// A complete line without its `\r\n`.
    Line(String),
    /// A line longer than the bound; its bytes up to the next `\n` are discarded.
    Overlong,
    /// A complete line that is not valid UTF-8 (a wrong baud rate, line noise).
    NotUtf8,
}

#[derive(Debug)]
pub struct LineFramer {
    buf: Vec<u8>,
    max: usize,
    /// Inside an overlong line: drop bytes until the next `\n`.
    discarding: bool,
}

impl LineFramer {
    pub fn new(max_line_bytes: usize) -> Self {
        Self {
            buf: Vec::with_capacity(max_line_bytes.min(4096) + 1),
            max: max_line_bytes,
            discarding: false,
        }
    }

    /// Forget a partial line (a port reopened, or bytes nobody asked for).
    pub fn clear(&mut self) {
        self.buf.clear();
        self.discarding = false;
    }

    /// Whether part of a line is held.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty() && !self.discarding
    }

    /// Feed bytes; what they complete is appended to `out`.
    pub fn push(&mut self, bytes: &[u8], out: &mut Vec<Framed>) {
        let mut rest = bytes;
        while !rest.is_empty() {
            let nl = rest.iter().position(|&b| b == b'\n');
            let (chunk, end) = match nl {
                Some(i) => (&rest[..i], true),
                None => (rest, false),
            };
            rest = nl.map_or(&[][..], |i| &rest[i + 1..]);
            if self.discarding {
                if end {
                    self.discarding = false;
                }
                continue;
            }
            // One byte of slack for a `\r` that the `\n` will show to be a line end.
            if self.buf.len() + chunk.len() > self.max + 1 {
                self.buf.clear();
                out.push(Framed::Overlong);
                self.discarding = !end;
                continue;
            }
            self.buf.extend_from_slice(chunk);
            if !end {
                continue;
            }
            if self.buf.last() == Some(&b'\r') {
                self.buf.pop();
            }
            if self.buf.len() > self.max {
                out.push(Framed::Overlong);
            } else {
                match std::str::from_utf8(&self.buf) {
                    Ok(s) => out.push(Framed::Line(s.to_string())),
                    Err(_) => out.push(Framed::NotUtf8),
                }
            }
            self.buf.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(f: &mut LineFramer, bytes: &[u8]) -> Vec<Framed> {
        let mut out = Vec::new();
        f.push(bytes, &mut out);
        out
    }

    fn line(s: &str) -> Framed {
        Framed::Line(s.into())
    }

    #[test]
    fn lines_split_across_reads_come_out_whole_without_cr() {
        let mut f = LineFramer::new(64);
        assert_eq!(feed(&mut f, b"53"), vec![]);
        assert_eq!(feed(&mut f, b"7\r"), vec![]);
        assert_eq!(
            feed(&mut f, b"\n512,498\r\nx=1\n\n"),
            vec![line("537"), line("512,498"), line("x=1"), line("")]
        );
        assert!(f.is_empty());
    }

    #[test]
    fn an_overlong_line_is_reported_once_and_the_next_line_survives() {
        let mut f = LineFramer::new(8);
        // Exactly the bound (with \r\n) is fine.
        assert_eq!(feed(&mut f, b"12345678\r\n"), vec![line("12345678")]);
        let mut out = feed(&mut f, b"0123456789");
        out.extend(feed(&mut f, &[b'x'; 10_000]));
        out.extend(feed(&mut f, b"still the same line\nok\n"));
        assert_eq!(out, vec![Framed::Overlong, line("ok")]);
        // One byte over, ending in the same chunk.
        assert_eq!(
            feed(&mut f, b"123456789\nnext\n"),
            vec![Framed::Overlong, line("next")]
        );
        // 9 bytes whose last is \r but that stay unterminated: still undecided, then overlong.
        assert_eq!(feed(&mut f, b"12345678\r"), vec![]);
        assert_eq!(feed(&mut f, b"9\nz\n"), vec![Framed::Overlong, line("z")]);
    }

    #[test]
    fn non_utf8_is_reported_and_does_not_swallow_the_next_line() {
        let mut f = LineFramer::new(64);
        assert_eq!(
            feed(&mut f, b"\xff\xfe5\r\n537\r\n"),
            vec![Framed::NotUtf8, line("537")]
        );
    }

    #[test]
    fn clear_drops_a_partial_line() {
        let mut f = LineFramer::new(64);
        feed(&mut f, b"late answ");
        f.clear();
        assert_eq!(feed(&mut f, b"600\n"), vec![line("600")]);
    }

    #[test]
    fn random_bytes_never_exceed_the_bound_or_panic() {
        let mut rng = fastrand::Rng::with_seed(7);
        let mut f = LineFramer::new(100);
        let mut lines = 0;
        for _ in 0..2000 {
            let n = rng.usize(0..300);
            let bytes: Vec<u8> = (0..n).map(|_| rng.u8(..)).collect();
            let mut out = Vec::new();
            f.push(&bytes, &mut out);
            assert!(f.buf.len() <= 101);
            for o in out {
                if let Framed::Line(s) = o {
                    assert!(s.len() <= 100 && !s.contains('\n'));
                    lines += 1;
                }
            }
        }
        assert!(lines > 0, "random input with newlines yields some lines");
        // After the noise, a good line still comes through.
        let out = feed(&mut f, b"\nfridge=4.5\n");
        assert_eq!(out.last(), Some(&line("fridge=4.5")));
    }
}
