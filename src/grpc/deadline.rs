//! The client's deadline, from the `grpc-timeout` header, counted from the moment the
//! call arrived; and the backstop that answers an expired call with pitboss's own
//! DEADLINE_EXCEEDED.

use std::future::Future;
use std::task::Poll;
use std::time::Duration;

use tokio::time::Instant;
use tonic::metadata::MetadataMap;

/// When a call arrived at the Bridge listener, stamped by [`stamp_arrival`] into the
/// request's extensions.
#[derive(Debug, Clone, Copy)]
pub struct Arrived(pub Instant);

/// A tower `map_request` function for the listener: stamps [`Arrived`]. tonic starts
/// its own `grpc-timeout` timer just before it calls pitboss's layers (its timeout
/// service wraps them), so a deadline counted from this stamp is later than tonic's
/// by the time those calls take, well under a microsecond; tonic's timer wakes the
/// call on a millisecond tick at or after its deadline, and by then this one has
/// passed too.
pub fn stamp_arrival<B>(
    mut req: tonic::codegen::http::Request<B>,
) -> tonic::codegen::http::Request<B> {
    req.extensions_mut().insert(Arrived(Instant::now()));
    req
}

/// When the call arrived: its stamp, else now (a service called without the layer).
pub fn arrival(ext: &tonic::Extensions) -> Instant {
    ext.get::<Arrived>()
        .map(|a| a.0)
        .unwrap_or_else(Instant::now)
}

/// Parses `grpc-timeout` ("100m", "5S", "250000u", ...) per the gRPC HTTP/2 spec:
/// 1 to 8 ASCII digits, then one unit letter. Anything else is `None` (no sign, no
/// spaces: Rust's own integer parsing would take "+5").
pub fn parse_grpc_timeout(v: &str) -> Option<Duration> {
    if v.len() < 2 || v.len() > 9 {
        return None;
    }
    let (num, unit) = v.split_at(v.len() - 1);
    if !num.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = num.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// A `grpc-timeout` value that is not gRPC's form, as sent (lossy UTF-8).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed grpc-timeout {0:?}")]
pub struct MalformedTimeout(pub String);

/// The `grpc-timeout` of a request: `Ok(None)` when it sets none, `Err` with the value
/// as sent when it is malformed. A malformed timeout is
/// refused, not ignored: the client meant a deadline, and serving the call without one
/// would drop it silently (grpc-go's servers refuse it too; tonic ignores it).
pub fn grpc_timeout(headers: &http::HeaderMap) -> Result<Option<Duration>, MalformedTimeout> {
    let Some(value) = headers.get("grpc-timeout") else {
        return Ok(None);
    };
    value
        .to_str()
        .ok()
        .and_then(parse_grpc_timeout)
        .map(Some)
        .ok_or_else(|| MalformedTimeout(String::from_utf8_lossy(value.as_bytes()).into_owned()))
}

/// The absolute deadline of a call that arrived at `arrived`, if the client set one.
pub fn deadline_of(md: &MetadataMap, arrived: Instant) -> Option<Instant> {
    let v = md.get("grpc-timeout")?.to_str().ok()?;
    parse_grpc_timeout(v).map(|d| arrived + d)
}

/// Runs `call`; once `deadline` has passed with `call` unfinished, answers
/// `on_expiry()` instead (and drops `call`, which cancels what it was doing).
///
/// Why: tonic runs its own timer from the same `grpc-timeout` and, when it fires
/// first, answers CANCELLED "Timeout expired", without pitboss's class and trailers,
/// and the call is counted nowhere. Its timer wakes the call at a millisecond tick at
/// or after its deadline, which is then past `deadline` too; tonic polls the handler
/// before its timer, and this reads
/// the clock on every poll (a timer's wake-up alone may come after tonic's), so by the
/// time tonic's timer has expired, this has answered. A finished `call` wins a tie.
pub async fn answer_by<T>(
    deadline: Option<Instant>,
    call: impl Future<Output = T>,
    on_expiry: impl FnOnce() -> T,
) -> T {
    let Some(deadline) = deadline else {
        return call.await;
    };
    let mut call = std::pin::pin!(call);
    let mut timer = std::pin::pin!(tokio::time::sleep_until(deadline));
    let mut on_expiry = Some(on_expiry);
    std::future::poll_fn(|cx| {
        if let Poll::Ready(v) = call.as_mut().poll(cx) {
            return Poll::Ready(v);
        }
        if Instant::now() >= deadline || timer.as_mut().poll(cx).is_ready() {
            let expired = on_expiry
                .take()
                .expect("answer_by polled after it answered");
            return Poll::Ready(expired());
        }
        Poll::Pending
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units() {
        assert_eq!(parse_grpc_timeout("100m"), Some(Duration::from_millis(100)));
        assert_eq!(parse_grpc_timeout("2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("5u"), Some(Duration::from_micros(5)));
        assert_eq!(parse_grpc_timeout("5x"), None);
        assert_eq!(parse_grpc_timeout("m"), None);
        assert_eq!(parse_grpc_timeout("1234567890S"), None);
        assert_eq!(
            parse_grpc_timeout("99999999S"),
            Some(Duration::from_secs(99_999_999))
        );
        for bad in ["5", "+5m", "-5m", " 5m", "5 m", "5ms", "1.5S", "S5"] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_malformed_header_is_an_error_with_its_value_and_an_absent_one_is_none() {
        let mut headers = http::HeaderMap::new();
        assert_eq!(grpc_timeout(&headers), Ok(None));
        headers.insert("grpc-timeout", "250m".parse().unwrap());
        assert_eq!(grpc_timeout(&headers), Ok(Some(Duration::from_millis(250))));
        headers.insert("grpc-timeout", "5".parse().unwrap());
        assert_eq!(grpc_timeout(&headers), Err(MalformedTimeout("5".into())));
        headers.insert(
            "grpc-timeout",
            http::HeaderValue::from_bytes(b"5\xffm").unwrap(),
        );
        assert_eq!(
            grpc_timeout(&headers),
            Err(MalformedTimeout("5\u{fffd}m".into()))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_deadline_counts_from_the_arrival() {
        let arrived = Instant::now();
        let mut md = MetadataMap::new();
        md.insert("grpc-timeout", "100m".parse().unwrap());
        tokio::time::advance(Duration::from_millis(30)).await;
        assert_eq!(
            deadline_of(&md, arrived),
            Some(arrived + Duration::from_millis(100))
        );
        assert_eq!(deadline_of(&MetadataMap::new(), arrived), None);
    }

    #[tokio::test(start_paused = true)]
    async fn an_unfinished_call_is_answered_at_its_deadline() {
        let start = Instant::now();
        let deadline = start + Duration::from_millis(100);
        let r = answer_by(Some(deadline), std::future::pending::<&str>(), || "expired").await;
        assert_eq!(r, "expired");
        assert_eq!(Instant::now(), deadline);
        let r = answer_by(
            Some(deadline + Duration::from_secs(1)),
            async { "done" },
            || "expired",
        )
        .await;
        assert_eq!(r, "done");
        let r = answer_by(None, async { "done" }, || "expired").await;
        assert_eq!(r, "done");
    }

    /// tonic's timer, polled after the handler as tonic does, with the same deadline:
    /// the backstop answers first, whatever order the timers wake in.
    #[tokio::test(start_paused = true)]
    async fn the_backstop_answers_before_a_timer_polled_after_it() {
        let deadline = Instant::now() + Duration::from_millis(100);
        let ours = answer_by(Some(deadline), std::future::pending::<&str>(), || "pitboss");
        let mut ours = std::pin::pin!(ours);
        let mut tonic = std::pin::pin!(tokio::time::sleep_until(deadline));
        let winner = std::future::poll_fn(|cx| {
            if let Poll::Ready(v) = ours.as_mut().poll(cx) {
                return Poll::Ready(v);
            }
            tonic.as_mut().poll(cx).map(|()| "tonic")
        })
        .await;
        assert_eq!(winner, "pitboss");
    }
}
