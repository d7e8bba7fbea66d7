//! The write side of a worker's stdin, without a hop to another task on the common
//! path.
//!
//! A caller encodes its frame into the shared buffer and, when nothing is waiting to
//! be written, writes it itself: one non-blocking write on its own task. Only what the
//! pipe cannot take at once (the worker is slow to read) is left in the buffer for the
//! writer task, which drains it when the pipe is writable again. While it does, other
//! callers only append: their frames go out behind it, in order, combined into as few
//! writes as the pipe allows.
//!
//! Why: handing every frame to a writer task cost a wake-up per request, more than the
//! write itself (measured in BENCHMARKS.md).

use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use bytes::{Buf, BytesMut};
use tokio::io::AsyncWrite;
use tokio::sync::Notify;
use tokio_util::codec::Encoder;

use super::frame::{Frame, FrameCodec, FrameError};

/// Why a frame was not sent.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// The frame cannot be encoded (over the frame limit); nothing was written.
    #[error(transparent)]
    Encode(#[from] FrameError),
    /// The pipe is closed or failed: the worker is gone.
    #[error("its input pipe is closed")]
    Closed,
}

type Writer = Pin<Box<dyn AsyncWrite + Send>>;

struct State {
    buf: BytesMut,
    writer: Writer,
    codec: FrameCodec,
    /// The buffer holds bytes the pipe did not take at once: the writer task owns
    /// writing them, and callers only append behind them.
    backlog: bool,
    /// Every handle is gone: write what is left, then close the pipe.
    closing: bool,
    /// A write failed: the worker is gone, nothing more is sent.
    failed: bool,
}

impl State {
    /// Writes the buffer until it is empty (`Ready(Ok)`), the pipe is full
    /// (`Pending`, with `cx`'s waker registered), or the write fails.
    fn write_out(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        while !self.buf.is_empty() {
            match self.writer.as_mut().poll_write(cx, &self.buf) {
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
                }
                Poll::Ready(Ok(n)) => self.buf.advance(n),
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        self.writer.as_mut().poll_flush(cx)
    }
}

/// The shared write side; see the module docs.
pub(super) struct Outbox {
    state: Mutex<State>,
    /// Wakes the writer task: a backlog to drain, or the last handle gone.
    wake_writer: Notify,
}

impl Outbox {
    /// An outbox over `writer`, and the task that drains its backlog and closes the
    /// pipe once every [`OutboxHandle`] is gone.
    pub(super) fn start<W>(writer: W, codec: FrameCodec) -> OutboxHandle
    where
        W: AsyncWrite + Send + 'static,
    {
        let outbox = Arc::new(Outbox {
            state: Mutex::new(State {
                buf: BytesMut::with_capacity(8 * 1024),
                writer: Box::pin(writer),
                codec,
                backlog: false,
                closing: false,
                failed: false,
            }),
            wake_writer: Notify::new(),
        });
        tokio::spawn(drain(outbox.clone()));
        OutboxHandle(outbox)
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sends `frame`: written now when the pipe takes it, else queued behind the
    /// backlog. `Ok` means it will go out unless the worker dies first.
    pub(super) fn send(&self, frame: &Frame) -> Result<(), SendError> {
        let mut st = self.state();
        if st.failed || st.closing {
            return Err(SendError::Closed);
        }
        let State { codec, buf, .. } = &mut *st;
        codec.encode(frame, buf)?;
        if st.backlog {
            return Ok(()); // the writer task writes it, after what is before it
        }
        // Nothing is waiting: the buffer holds this frame only. Write it from here,
        // without waiting; a noop waker, because the writer task takes over any rest
        // and registers its own.
        let mut cx = Context::from_waker(futures_util::task::noop_waker_ref());
        match st.write_out(&mut cx) {
            Poll::Ready(Ok(())) => Ok(()),
            Poll::Pending => {
                st.backlog = true;
                drop(st);
                self.wake_writer.notify_one();
                Ok(())
            }
            Poll::Ready(Err(_)) => {
                // The worker is gone (the reader sees EOF and the supervisor reaps
                // it). Only this frame was in the buffer, so it was not sent.
                st.failed = true;
                st.buf.clear();
                Err(SendError::Closed)
            }
        }
    }
}

/// A handle to the outbox. When the last one is dropped (every connection handle is
/// gone), the writer task writes what is left and closes the pipe, which asks the
/// worker to exit.
pub(super) struct OutboxHandle(Arc<Outbox>);

impl std::ops::Deref for OutboxHandle {
    type Target = Outbox;

    fn deref(&self) -> &Outbox {
        &self.0
    }
}

impl Drop for OutboxHandle {
    fn drop(&mut self) {
        self.0.state().closing = true;
        self.0.wake_writer.notify_one();
    }
}

/// The writer task: drains a backlog whenever there is one, then, once closing, closes
/// the pipe.
async fn drain(outbox: Arc<Outbox>) {
    loop {
        outbox.wake_writer.notified().await;
        let done = std::future::poll_fn(|cx| {
            let mut st = outbox.state();
            match st.write_out(cx) {
                Poll::Pending => Poll::Pending,
                Poll::Ready(Err(_)) => {
                    st.failed = true;
                    st.buf.clear();
                    Poll::Ready(true)
                }
                Poll::Ready(Ok(())) => {
                    st.backlog = false;
                    if !st.closing {
                        return Poll::Ready(false);
                    }
                    let _ = std::task::ready!(st.writer.as_mut().poll_shutdown(cx));
                    Poll::Ready(true)
                }
            }
        })
        .await;
        if done {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::worker::frame::RequestFrame;
    use futures_util::StreamExt;
    use tokio_util::codec::FramedRead;

    fn request(id: u64, payload_len: usize) -> Frame {
        Frame::Request(RequestFrame {
            id,
            command: "echo".into(),
            session_id: String::new(),
            content_type: "application/json".into(),
            timeout_ms: 0,
            payload: vec![b'x'; payload_len].into(),
        })
    }

    /// A pipe that takes 64 bytes at a time: nearly every frame leaves a backlog for
    /// the writer task, while callers keep appending. Everything arrives, in order,
    /// and dropping the handle closes the pipe once the backlog is out.
    #[tokio::test]
    async fn frames_behind_a_full_pipe_go_out_in_order_then_the_pipe_closes() {
        let (host, worker) = tokio::io::duplex(64);
        let outbox = Outbox::start(host, FrameCodec::default());
        for id in 1..=50 {
            outbox.send(&request(id, 100)).unwrap();
        }
        drop(outbox);
        let frames: Vec<Frame> = FramedRead::new(worker, FrameCodec::default())
            .map(|f| f.unwrap())
            .collect()
            .await;
        let ids: Vec<u64> = frames.iter().map(Frame::request_id).collect();
        assert_eq!(ids, (1..=50).collect::<Vec<_>>());
    }

    /// With room in the pipe, the caller's own write puts the frame there at once:
    /// it is readable before the writer task has run at all (this test's runtime
    /// has one thread, and nothing here yields to it).
    #[tokio::test(flavor = "current_thread")]
    async fn a_frame_is_written_by_its_caller_when_the_pipe_has_room() {
        let (host, mut worker) = tokio::io::duplex(1 << 16);
        let outbox = Outbox::start(host, FrameCodec::default());
        outbox.send(&request(7, 10)).unwrap();
        let mut cx = Context::from_waker(futures_util::task::noop_waker_ref());
        let mut bytes = [0u8; 256];
        let mut rb = tokio::io::ReadBuf::new(&mut bytes);
        let polled = tokio::io::AsyncRead::poll_read(Pin::new(&mut worker), &mut cx, &mut rb);
        assert!(matches!(polled, Poll::Ready(Ok(()))), "{polled:?}");
        let mut buf = BytesMut::from(rb.filled());
        let frame = tokio_util::codec::Decoder::decode(&mut FrameCodec::default(), &mut buf);
        assert_eq!(frame.unwrap().map(|f| f.request_id()), Some(7));
    }

    /// A frame that cannot be encoded fails alone: the buffer is left clean and the
    /// next frame arrives intact.
    #[tokio::test]
    async fn a_frame_over_the_limit_fails_alone() {
        let (host, worker) = tokio::io::duplex(1 << 16);
        let outbox = Outbox::start(host, FrameCodec::new(1024));
        let err = outbox.send(&request(1, 4096)).unwrap_err();
        assert!(matches!(err, SendError::Encode(_)), "{err}");
        outbox.send(&request(2, 10)).unwrap();
        drop(outbox);
        let frames: Vec<Frame> = FramedRead::new(worker, FrameCodec::new(1024))
            .map(|f| f.unwrap())
            .collect()
            .await;
        assert_eq!(frames.len(), 1);
        assert_eq!(frames[0].request_id(), 2);
    }

    /// The worker's end is gone: the send says so, and so do the later ones.
    #[tokio::test]
    async fn a_closed_pipe_is_reported_to_the_sender() {
        let (host, worker) = tokio::io::duplex(1 << 16);
        drop(worker);
        let outbox = Outbox::start(host, FrameCodec::default());
        assert!(matches!(
            outbox.send(&request(1, 10)),
            Err(SendError::Closed)
        ));
        assert!(matches!(
            outbox.send(&Frame::Ping { seq: 1 }),
            Err(SendError::Closed)
        ));
    }
}
