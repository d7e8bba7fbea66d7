//! Feeds arbitrary bytes to the worker frame decoder, as a worker's stdout would.
//!
//! The host "never hangs and never panics on worker input" (docs/PROTOCOL.md): every
//! input must end in frames, a need for more data, or an error.
#![no_main]

use bytes::{Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;
use pitboss::worker::frame::{decode_frame, Frame, FrameCodec, HEADER_LEN};
use tokio_util::codec::{Decoder, Encoder};

fuzz_target!(|data: &[u8]| {
    // The first byte picks a small limit now and then, so both the size checks and
    // the bodies behind them are reached.
    let max = match data.first() {
        Some(b) if b % 4 == 0 => HEADER_LEN + usize::from(*b) * 4,
        _ => pitboss::worker::frame::DEFAULT_MAX_FRAME_BYTES,
    };
    let mut codec = FrameCodec::new(max);
    let mut buf = BytesMut::from(data);
    loop {
        let before = buf.len();
        match codec.decode(&mut buf) {
            Ok(Some(frame)) => {
                assert!(buf.len() < before, "a frame must consume input");
                // What was accepted can be sent again and reads back as itself.
                let mut out = BytesMut::new();
                Encoder::<&Frame>::encode(&mut FrameCodec::default(), &frame, &mut out)
                    .expect("a decoded frame re-encodes");
                let again = FrameCodec::default().decode(&mut out).expect("re-decodes");
                assert_eq!(again.as_ref(), Some(&frame));
            }
            Ok(None) => {
                assert_eq!(buf.len(), before, "waiting must not consume input");
                break;
            }
            Err(_) => break,
        }
    }
    // The same bytes as one frame without its length prefix.
    let _ = decode_frame(Bytes::copy_from_slice(data));
});
