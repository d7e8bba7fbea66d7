//! The write side of a worker's stdin, without a hop to another task on the common
//! path.
//!
//! A caller encodes its frame into the shared queue and, when nobody is writing,
//! writes the queue itself: non-blocking writes on its own task. Frames that other
//! callers append meanwhile go out in the same round (flush combining, as tokio-util's
//! and mini-redis's writers do): nobody waits behind another's write syscall, and with
//! requests pipelined the worker gets them in one read. Only what the pipe cannot take
//! at once (the worker is slow to read) is handed to the writer task, which drains it
//! when the pipe is writable again; callers only append behind it.
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

/// Who writes to the pipe now. Only one party ever does, so the pipe's own lock is
/// never contended and no caller waits behind another's write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Writing {
    /// Nobody: the next caller writes.
    Idle,
    /// A caller is writing what is queued; frames appended meanwhile go out with it.
    Caller,
    /// The pipe was full: the writer task owns writing until the queue is empty.
    Task,
}

/// What callers append to, under a lock held only to append or to take the batch.
struct Queue {
    buf: BytesMut,
    codec: FrameCodec,
    writing: Writing,
    /// Every handle is gone: write what is left, then close the pipe.
    closing: bool,
    /// A write failed: the worker is gone, nothing more is sent.
    failed: bool,
    /// Bytes ever appended: where each caller's frame ends in the stream.
    appended: u64,
}

/// The pipe and the batch being written to it; touched only by whoever is
/// [`Writing`].
struct Pipe {
    writer: Writer,
    out: BytesMut,
    /// Bytes the pipe has taken so far. After a failed write it tells a caller whether
    /// its own frame went out whole (the worker may have run it) or not (it cannot
    /// have: a worker acts only on a whole frame).
    written: u64,
}

impl Pipe {
    /// Writes `out` until it is empty (`Ready(Ok)`), the pipe is full (`Pending`, with
    /// `cx`'s waker registered), or the write fails.
    fn write_out(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        while !self.out.is_empty() {
            match self.writer.as_mut().poll_write(cx, &self.out) {
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
                }
                Poll::Ready(Ok(n)) => {
                    self.out.advance(n);
                    self.written += n as u64;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        self.writer.as_mut().poll_flush(cx)
    }
}

/// How a round of writing ended.
enum Round {
    /// The queue is empty and written; writing is `Idle` again.
    Done,
    /// The pipe is full; the waker in `cx` is registered for when it drains.
    Full,
    /// The pipe failed; the queue is marked failed.
    Failed,
}

/// The shared write side; see the module docs.
pub struct Outbox {
    queue: Mutex<Queue>,
    pipe: Mutex<Pipe>,
    /// Wakes the writer task: a full pipe to drain, or the last handle gone.
    wake_writer: Notify,
}

impl Outbox {
    /// An outbox over `writer`, and the task that drains a full pipe and closes it
    /// once every [`OutboxHandle`] is gone.
    pub fn start<W>(writer: W, codec: FrameCodec) -> OutboxHandle
    where
        W: AsyncWrite + Send + 'static,
    {
        let outbox = Arc::new(Outbox {
            queue: Mutex::new(Queue {
                buf: BytesMut::with_capacity(8 * 1024),
                codec,
                writing: Writing::Idle,
                closing: false,
                failed: false,
                appended: 0,
            }),
            pipe: Mutex::new(Pipe {
                writer: Box::pin(writer),
                out: BytesMut::with_capacity(8 * 1024),
                written: 0,
            }),
            wake_writer: Notify::new(),
        });
        tokio::spawn(drain(outbox.clone()));
        OutboxHandle(outbox)
    }

    fn queue(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn pipe(&self) -> MutexGuard<'_, Pipe> {
        self.pipe.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sends `frame`: appended to the queue, and written from here when nobody else
    /// is writing. `Ok` means it went out, or will unless the worker dies first;
    /// `Closed` means the worker cannot have seen it, so it is safe to send elsewhere.
    pub fn send(&self, frame: &Frame) -> Result<(), SendError> {
        let ends_at;
        {
            let mut q = self.queue();
            if q.failed || q.closing {
                return Err(SendError::Closed);
            }
            let Queue { codec, buf, .. } = &mut *q;
            let before = buf.len();
            codec.encode(frame, buf)?;
            q.appended += (q.buf.len() - before) as u64;
            ends_at = q.appended;
            if q.writing != Writing::Idle {
                return Ok(()); // whoever is writing takes it with what it has
            }
            q.writing = Writing::Caller;
        }
        // Without waiting: a noop waker, because a full pipe goes to the writer task,
        // which registers its own.
        let mut cx = Context::from_waker(futures_util::task::noop_waker_ref());
        match self.write_round(&mut cx) {
            Round::Done => Ok(()),
            Round::Full => {
                self.queue().writing = Writing::Task;
                self.wake_writer.notify_one();
                Ok(())
            }
            // The worker is gone (the reader sees EOF and the supervisor reaps it). A
            // round can write this frame and fail on one appended behind it: then this
            // frame was delivered, and may have run, so it is not "not sent".
            Round::Failed if self.pipe().written >= ends_at => Ok(()),
            Round::Failed => Err(SendError::Closed),
        }
    }

    /// Takes what is queued and writes it, until the queue is empty or the pipe full.
    /// Only the party that is [`Writing`] calls it.
    fn write_round(&self, cx: &mut Context<'_>) -> Round {
        let mut pipe = self.pipe();
        loop {
            if pipe.out.is_empty() {
                let mut q = self.queue();
                if q.buf.is_empty() {
                    q.writing = Writing::Idle;
                    return Round::Done;
                }
                std::mem::swap(&mut q.buf, &mut pipe.out);
            }
            match pipe.write_out(cx) {
                Poll::Ready(Ok(())) => pipe.out.clear(),
                Poll::Pending => return Round::Full,
                Poll::Ready(Err(_)) => {
                    pipe.out.clear();
                    let mut q = self.queue();
                    q.failed = true;
                    q.buf.clear();
                    q.writing = Writing::Idle;
                    return Round::Failed;
                }
            }
        }
    }
}

/// A handle to the outbox. When the last one is dropped (every connection handle is
/// gone), the writer task writes what is left and closes the pipe, which asks the
/// worker to exit.
pub struct OutboxHandle(Arc<Outbox>);

impl std::ops::Deref for OutboxHandle {
    type Target = Outbox;

    fn deref(&self) -> &Outbox {
        &self.0
    }
}

impl Drop for OutboxHandle {
    fn drop(&mut self) {
        self.0.queue().closing = true;
        self.0.wake_writer.notify_one();
    }
}

/// The writer task: drains a full pipe whenever a caller hands it one, and once every
/// handle is gone writes what is left and closes the pipe.
async fn drain(outbox: Arc<Outbox>) {
    loop {
        outbox.wake_writer.notified().await;
        let done = std::future::poll_fn(|cx| {
            {
                let mut q = outbox.queue();
                match q.writing {
                    Writing::Task => {}
                    // The last handle is gone and nobody writes: the rest is ours.
                    Writing::Idle if q.closing => q.writing = Writing::Task,
                    // A stale wake-up: a caller writes (and hands over if it must).
                    _ => return Poll::Ready(false),
                }
            }
            match outbox.write_round(cx) {
                Round::Full => {
                    outbox.queue().writing = Writing::Task;
                    Poll::Pending
                }
                Round::Failed => Poll::Ready(true),
                Round::Done => {
                    if !outbox.queue().closing {
                        return Poll::Ready(false);
                    }
                    let mut pipe = outbox.pipe();
                    let _ = std::task::ready!(pipe.writer.as_mut().poll_shutdown(cx));
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
            context: None,
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

    /// Eight tasks on four threads send at once through a small pipe: every frame
    /// arrives whole (no two writes interleave), and each sender's frames in the order
    /// it sent them.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_senders_never_interleave_and_keep_their_order() {
        let (host, worker) = tokio::io::duplex(512);
        let outbox = Arc::new(Outbox::start(host, FrameCodec::default()));
        let reader = tokio::spawn(async move {
            FramedRead::new(worker, FrameCodec::default())
                .map(|f| f.unwrap().request_id())
                .collect::<Vec<u64>>()
                .await
        });
        let senders: Vec<_> = (0..8u64)
            .map(|sender| {
                let outbox = outbox.clone();
                tokio::spawn(async move {
                    for i in 0..500u64 {
                        outbox.send(&request(sender * 1_000_000 + i, 40)).unwrap();
                        if i % 16 == 0 {
                            tokio::task::yield_now().await;
                        }
                    }
                })
            })
            .collect();
        for s in senders {
            s.await.unwrap();
        }
        drop(Arc::into_inner(outbox).expect("the last handle"));
        let ids = reader.await.unwrap();
        assert_eq!(ids.len(), 8 * 500);
        for sender in 0..8u64 {
            let mine: Vec<u64> = ids
                .iter()
                .filter(|id| *id / 1_000_000 == sender)
                .map(|id| id % 1_000_000)
                .collect();
            assert_eq!(mine, (0..500).collect::<Vec<_>>(), "sender {sender}");
        }
    }

    /// A pipe that takes the first write whole and fails every later one, as a pipe
    /// does when the worker reads a frame and is then killed. During that first
    /// write it runs `during_first` (another caller appending behind it).
    struct DiesAfterFirstWrite {
        writes: usize,
        during_first: Option<Box<dyn FnOnce() + Send>>,
        taken: Arc<Mutex<Vec<u8>>>,
    }

    impl AsyncWrite for DiesAfterFirstWrite {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            self.writes += 1;
            if self.writes > 1 {
                return Poll::Ready(Err(std::io::ErrorKind::BrokenPipe.into()));
            }
            self.taken.lock().unwrap().extend_from_slice(buf);
            if let Some(f) = self.during_first.take() {
                f();
            }
            Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    /// Regression (the chaos test caught non-idempotent calls running twice): a
    /// caller's round wrote its own frame, then failed on a frame appended behind
    /// it. The caller was told "not sent", so its call was retried on another
    /// worker although this one had it. Now the caller hears `Ok` (its call then
    /// fails as "sent, may have run"), and only frames the pipe never took are
    /// "not sent".
    #[tokio::test]
    async fn a_frame_the_pipe_took_is_not_reported_unsent_when_a_later_write_fails() {
        let taken = Arc::new(Mutex::new(Vec::new()));
        let outbox: Arc<std::sync::OnceLock<OutboxHandle>> = Default::default();
        let second = Arc::new(Mutex::new(None));
        let during_first = {
            let (outbox, second) = (outbox.clone(), second.clone());
            Box::new(move || {
                let r = outbox.get().unwrap().send(&request(2, 10));
                *second.lock().unwrap() = Some(r.is_ok());
            })
        };
        let pipe = DiesAfterFirstWrite {
            writes: 0,
            during_first: Some(during_first),
            taken: taken.clone(),
        };
        assert!(outbox
            .set(Outbox::start(pipe, FrameCodec::default()))
            .is_ok());
        let outbox = outbox.get().unwrap();

        let first = outbox.send(&request(1, 10));
        assert!(first.is_ok(), "frame 1 reached the worker: {first:?}");
        // Frame 2 was queued behind a write in progress, so its sender heard Ok,
        // and its call fails when the worker's death is seen.
        assert_eq!(*second.lock().unwrap(), Some(true));
        // The worker got exactly frame 1.
        let mut bytes = BytesMut::from(&taken.lock().unwrap()[..]);
        let mut codec = FrameCodec::default();
        let got = tokio_util::codec::Decoder::decode(&mut codec, &mut bytes).unwrap();
        assert_eq!(got.map(|f| f.request_id()), Some(1));
        assert!(bytes.is_empty());
        // After the failure nothing is sent, and the sender is told so.
        assert!(matches!(
            outbox.send(&request(3, 10)),
            Err(SendError::Closed)
        ));
    }

    /// The pipe failed before taking any of the frame: "not sent", safe to send
    /// elsewhere.
    #[tokio::test]
    async fn a_frame_the_pipe_never_took_is_reported_unsent() {
        let pipe = DiesAfterFirstWrite {
            writes: 1,
            during_first: None,
            taken: Default::default(),
        };
        let outbox = Outbox::start(pipe, FrameCodec::default());
        assert!(matches!(
            outbox.send(&request(1, 10)),
            Err(SendError::Closed)
        ));
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
