//! gRPC's message framing on HTTP/2: each message is a 1-byte compressed flag, a 4-byte
//! big-endian length and the message's bytes. A transparent call's messages are
//! passed as they are, so this is all pitboss reads of them.

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// The bytes before each message: the compressed flag and the length.
pub const PREFIX: usize = 5;

/// A message as it goes on the wire: the prefix, then the bytes.
pub fn encode(message: &[u8]) -> Bytes {
    let mut buf = BytesMut::with_capacity(PREFIX + message.len());
    buf.put_u8(0);
    buf.put_u32(message.len() as u32);
    buf.put_slice(message);
    buf.freeze()
}

/// Why a body's bytes are not messages pitboss can pass on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// A message announces more bytes than the limit; nothing past its prefix was read.
    #[error("a message of {len} bytes, over the limit of {max} bytes")]
    TooLarge { len: usize, max: usize },
    /// The compressed flag is set: the peer compressed a message though pitboss never
    /// accepts a compressed one (it sends no `grpc-accept-encoding`).
    #[error("a compressed message (grpc-encoding); pitboss accepts only uncompressed messages")]
    Compressed,
    /// The body ended inside a message.
    #[error("the body ended {missing} bytes short of a whole message")]
    Truncated { missing: usize },
}

/// Cuts a body's bytes, as they arrive in pieces of any size, into messages.
#[derive(Debug)]
pub struct Decoder {
    buf: BytesMut,
    max: usize,
}

impl Decoder {
    /// A decoder that refuses messages over `max` bytes.
    pub fn new(max: usize) -> Decoder {
        Decoder {
            buf: BytesMut::new(),
            max,
        }
    }

    /// Adds bytes that arrived.
    pub fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// The next whole message, if one has arrived. A message over the limit is refused
    /// as soon as its prefix is in, before its bytes are.
    pub fn next_message(&mut self) -> Result<Option<Bytes>, FrameError> {
        if self.buf.len() < PREFIX {
            return Ok(None);
        }
        let compressed = self.buf[0];
        let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]) as usize;
        if len > self.max {
            return Err(FrameError::TooLarge { len, max: self.max });
        }
        if compressed != 0 {
            return Err(FrameError::Compressed);
        }
        if self.buf.len() < PREFIX + len {
            // Room for the rest at once, so it is not copied again as it arrives.
            self.buf.reserve(PREFIX + len - self.buf.len());
            return Ok(None);
        }
        self.buf.advance(PREFIX);
        Ok(Some(self.buf.split_to(len).freeze()))
    }

    /// Checks, at the end of the body, that no partial message is left.
    pub fn finish(&self) -> Result<(), FrameError> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let missing = if self.buf.len() < PREFIX {
            PREFIX - self.buf.len()
        } else {
            let len =
                u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]) as usize;
            PREFIX + len - self.buf.len()
        };
        Err(FrameError::Truncated { missing })
    }
}

/// Counts the messages a body starts, without keeping their bytes: what a method
/// that takes one request message needs to refuse a second (tonic would read the
/// first and drop the rest unseen). Its bytes may arrive in pieces of any size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MessageCount {
    /// Messages begun so far (their first prefix byte has arrived).
    begun: u32,
    /// Where the next byte falls.
    at: Position,
    /// The largest length a prefix has announced so far.
    largest: u32,
}

/// Where a body's next byte falls in gRPC's framing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Position {
    /// The `read`-th byte of a prefix, with the length read so far.
    Prefix { read: u8, len: u32 },
    /// Inside a message, `left` bytes before its end.
    Message { left: u32 },
}

impl Default for Position {
    fn default() -> Self {
        Position::Prefix { read: 0, len: 0 }
    }
}

impl MessageCount {
    /// Takes the next piece of the body and returns how many messages have begun.
    pub fn push(&mut self, mut data: &[u8]) -> u32 {
        while !data.is_empty() {
            self.at = match self.at {
                Position::Prefix { read, len } => {
                    if read == 0 {
                        self.begun += 1;
                    }
                    // Byte 0 is the compressed flag; bytes 1 to 4 the length.
                    let len = if read == 0 {
                        0
                    } else {
                        len << 8 | u32::from(data[0])
                    };
                    data = &data[1..];
                    match read + 1 {
                        5 if len == 0 => Position::Prefix { read: 0, len: 0 },
                        5 => {
                            self.largest = self.largest.max(len);
                            Position::Message { left: len }
                        }
                        read => Position::Prefix { read, len },
                    }
                }
                Position::Message { left } => {
                    let take = data.len().min(left as usize);
                    data = &data[take..];
                    match left - take as u32 {
                        0 => Position::Prefix { read: 0, len: 0 },
                        left => Position::Message { left },
                    }
                }
            };
        }
        self.begun
    }

    /// Messages begun so far.
    pub fn begun(&self) -> u32 {
        self.begun
    }

    /// Whether every message begun so far has all its bytes: where a body may end.
    pub fn at_boundary(&self) -> bool {
        self.at == Position::Prefix { read: 0, len: 0 }
    }

    /// Whether a whole message has arrived.
    pub fn one_whole(&self) -> bool {
        self.begun > 1 || (self.begun == 1 && self.at_boundary())
    }

    /// The largest length a prefix has announced so far (a message over the limit is
    /// refused from its prefix, before its bytes come).
    pub fn largest(&self) -> u32 {
        self.largest
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_cut_wherever_the_pieces_end() {
        let mut wire = Vec::new();
        wire.extend_from_slice(&encode(b"hello"));
        wire.extend_from_slice(&encode(b""));
        wire.extend_from_slice(&encode(&[7u8; 300]));
        for piece in [1, 2, 5, 7, 64, wire.len()] {
            let mut d = Decoder::new(1024);
            let mut got = Vec::new();
            for chunk in wire.chunks(piece) {
                d.push(chunk);
                while let Some(m) = d.next_message().unwrap() {
                    got.push(m);
                }
            }
            d.finish().unwrap();
            assert_eq!(got.len(), 3, "pieces of {piece}");
            assert_eq!(&got[0][..], b"hello");
            assert!(got[1].is_empty());
            assert_eq!(&got[2][..], &[7u8; 300][..]);
        }
    }

    #[test]
    fn a_message_over_the_limit_is_refused_from_its_prefix() {
        let mut d = Decoder::new(10);
        // Only the prefix has arrived: refused already.
        d.push(&encode(&[0u8; 11])[..PREFIX]);
        assert_eq!(
            d.next_message(),
            Err(FrameError::TooLarge { len: 11, max: 10 })
        );
        let mut d = Decoder::new(10);
        d.push(&encode(&[0u8; 10]));
        assert_eq!(d.next_message().unwrap().unwrap().len(), 10);
    }

    #[test]
    fn compressed_and_truncated_bodies_are_errors() {
        let mut d = Decoder::new(100);
        let mut m = encode(b"abc").to_vec();
        m[0] = 1;
        d.push(&m);
        assert_eq!(d.next_message(), Err(FrameError::Compressed));
        let mut d = Decoder::new(100);
        d.push(&encode(b"abcdef")[..8]);
        assert_eq!(d.next_message(), Ok(None));
        assert_eq!(d.finish(), Err(FrameError::Truncated { missing: 3 }));
        let mut d = Decoder::new(100);
        d.push(&[0, 0]);
        assert_eq!(d.finish(), Err(FrameError::Truncated { missing: 3 }));
    }

    #[test]
    fn messages_are_counted_as_they_begin_wherever_the_pieces_end() {
        let mut wire = Vec::new();
        wire.extend_from_slice(&encode(&[1u8; 300]));
        let first = wire.len();
        wire.extend_from_slice(&encode(b""));
        let second = wire.len();
        wire.extend_from_slice(&encode(b"x"));
        for piece in [1, 2, 4, 5, 6, 64, 299, wire.len()] {
            let mut count = MessageCount::default();
            let mut seen = 0;
            let mut begun_at = Vec::new();
            for chunk in wire.chunks(piece) {
                let now = count.push(chunk);
                if now > begun_at.len() as u32 {
                    begun_at.push(seen);
                }
                seen += chunk.len();
            }
            assert_eq!(count.begun, 3, "pieces of {piece}");
            if piece == 1 {
                // Byte by byte, each message is seen at its first byte, not before.
                assert_eq!(begun_at, vec![0, first, second]);
            }
        }
        let mut count = MessageCount::default();
        assert!(!count.one_whole() && count.at_boundary(), "nothing yet");
        count.push(&encode(&[5u8; 40])[..7]);
        assert!(!count.one_whole() && !count.at_boundary(), "cut inside");
        assert_eq!(count.largest(), 40, "announced by the prefix");
        let mut count = MessageCount::default();
        count.push(&encode(b"")[..3]);
        assert!(
            !count.one_whole() && !count.at_boundary(),
            "cut in the prefix"
        );
        count.push(&encode(b"")[3..]);
        assert!(count.one_whole(), "an empty message is whole");
        let mut count = MessageCount::default();
        assert_eq!(count.push(&encode(b"only")), 1);
        assert!(count.one_whole());
        assert_eq!(count.push(&[]), 1);
        assert_eq!(count.push(&[0]), 2, "the next byte begins a second message");
    }
}
