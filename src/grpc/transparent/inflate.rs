//! A compressed request of a transparent call (`grpc-encoding: gzip` or `deflate`, as
//! a grpcio client sends with `compression=grpc.Compression.Gzip`): its one message,
//! inflated by tonic's own decoder, which stops at `server.max_message_bytes` of
//! inflated bytes (a small request that inflates to gigabytes is refused, not held).
//!
//! Both backends then get the plain message: a pool's adapter decodes protobuf, and
//! a `grpc_proxy` forwards it uncompressed (pitboss drops `grpc-encoding` on the way).

use bytes::{Buf, Bytes};
use tonic::body::Body;
use tonic::codec::{CompressionEncoding, DecodeBuf, Decoder, Streaming};

use super::super::status::Refusal;

/// The encodings pitboss inflates, by their `grpc-encoding` name; `None` for others
/// (refused with UNIMPLEMENTED, as gRPC says).
pub fn encoding(name: &str) -> Option<CompressionEncoding> {
    match name {
        "gzip" => Some(CompressionEncoding::Gzip),
        "deflate" => Some(CompressionEncoding::Deflate),
        _ => None,
    }
}

/// The messages' bytes as they are once inflated.
struct RawMessages;

impl Decoder for RawMessages {
    type Item = Bytes;
    type Error = tonic::Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, tonic::Status> {
        Ok(Some(buf.copy_to_bytes(buf.remaining())))
    }
}

/// The one message of `body`, compressed with `encoding`, at most `max` bytes once
/// inflated.
pub async fn read_compressed(
    body: Body,
    encoding: CompressionEncoding,
    max: usize,
    method: &str,
) -> Result<Bytes, Refusal> {
    let mut messages = Streaming::new_request(RawMessages, body, Some(encoding), Some(max));
    let first = messages.message().await.map_err(|s| refusal(&s, max))?;
    let Some(message) = first else {
        return Err(Refusal::NoMessage);
    };
    match messages.message().await.map_err(|s| refusal(&s, max))? {
        None => Ok(message),
        Some(_) => Err(Refusal::Streaming {
            method: method.to_string(),
        }),
    }
}

/// What tonic's decoder refused: over the limit (compressed, or once inflated), else
/// not a well-formed compressed message.
fn refusal(status: &tonic::Status, max: usize) -> Refusal {
    match status.code() {
        tonic::Code::OutOfRange | tonic::Code::ResourceExhausted => Refusal::Inflated { max },
        _ => Refusal::Malformed(status.message().to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gzip_and_deflate_are_inflated_others_are_not() {
        assert_eq!(encoding("gzip"), Some(CompressionEncoding::Gzip));
        assert_eq!(encoding("deflate"), Some(CompressionEncoding::Deflate));
        assert_eq!(encoding("zstd"), None);
        assert_eq!(encoding("snappy"), None);
    }

    /// A request that inflates past the limit is refused as too large; a compressed
    /// flag over bytes that are not gzip is malformed.
    #[tokio::test]
    async fn a_bomb_is_refused_and_garbage_is_malformed() {
        let compressed = gzip_of_100_kb_of_zeros();
        let body = |payload: &[u8], flag: u8| {
            let mut framed = vec![flag];
            framed.extend_from_slice(&(payload.len() as u32).to_be_bytes());
            framed.extend_from_slice(payload);
            Body::new(http_body_util::Full::new(Bytes::from(framed)))
        };
        let ok = read_compressed(
            body(&compressed, 1),
            CompressionEncoding::Gzip,
            200_000,
            "/m",
        )
        .await
        .unwrap();
        assert_eq!(ok.len(), 100_000);
        let big = read_compressed(
            body(&compressed, 1),
            CompressionEncoding::Gzip,
            65_536,
            "/m",
        )
        .await
        .unwrap_err();
        assert_eq!(big, Refusal::Inflated { max: 65_536 });
        let junk = read_compressed(
            body(b"not gzip", 1),
            CompressionEncoding::Gzip,
            65_536,
            "/m",
        )
        .await
        .unwrap_err();
        assert!(matches!(junk, Refusal::Malformed(_)), "{junk:?}");
        // An uncompressed message in a compressed call is fine (the flag says so).
        let plain = read_compressed(body(b"abc", 0), CompressionEncoding::Gzip, 65_536, "/m")
            .await
            .unwrap();
        assert_eq!(&plain[..], b"abc");
    }

    /// 100 kB of zeros as `gzip` makes them (Python's `gzip.compress(bytes(100_000),
    /// mtime=0)`): 132 bytes, most of them a run of zeros.
    fn gzip_of_100_kb_of_zeros() -> Vec<u8> {
        let hex = |s: &str| -> Vec<u8> {
            (0..s.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
                .collect()
        };
        let mut gz = hex("1f8b0800000000000203edc13101000000c2a0f54f6d0d0fa0");
        gz.resize(gz.len() + 96, 0);
        gz.extend(hex("8057037d9511d4a0860100"));
        gz
    }
}
