//! Shadow comparison (GitHub Scientist for a sidecar): the pure parts.
//!
//! Legacy answers the client; new runs alongside and its result is compared here.
//! The comparison is bytewise, or as JSON with configured fields ignored (timestamps,
//! request ids: fields that differ on every call and say nothing about correctness).

use super::flags::Compare;

/// What a shadow comparison found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Match,
    Mismatch,
    /// One side failed (or the shadow call was refused): nothing to compare.
    Error,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Match => "match",
            Outcome::Mismatch => "mismatch",
            Outcome::Error => "error",
        }
    }
}

/// Whether two payloads are equal under the configured comparison. `ignore` names
/// JSON fields: a plain name (`"ts"`) is ignored at any depth, a dotted path
/// (`"meta.ts"`) only there. A payload that is not JSON is compared bytewise.
pub fn same(compare: Compare, ignore: &[String], legacy: &[u8], new: &[u8]) -> bool {
    if legacy == new {
        return true;
    }
    if compare == Compare::Bytes {
        return false;
    }
    let (Ok(mut a), Ok(mut b)) = (
        serde_json::from_slice::<serde_json::Value>(legacy),
        serde_json::from_slice::<serde_json::Value>(new),
    ) else {
        return false;
    };
    for field in ignore {
        strip(&mut a, field);
        strip(&mut b, field);
    }
    a == b
}

fn strip(v: &mut serde_json::Value, field: &str) {
    if let Some((head, rest)) = field.split_once('.') {
        if let Some(inner) = v.as_object_mut().and_then(|o| o.get_mut(head)) {
            strip_path(inner, rest);
        }
        return;
    }
    match v {
        serde_json::Value::Object(o) => {
            o.remove(field);
            for inner in o.values_mut() {
                strip(inner, field);
            }
        }
        serde_json::Value::Array(items) => {
            for inner in items {
                strip(inner, field);
            }
        }
        _ => {}
    }
}

fn strip_path(v: &mut serde_json::Value, path: &str) {
    let Some(o) = v.as_object_mut() else { return };
    match path.split_once('.') {
        Some((head, rest)) => {
            if let Some(inner) = o.get_mut(head) {
                strip_path(inner, rest);
            }
        }
        None => {
            o.remove(path);
        }
    }
}

/// A payload for a log line: lossy UTF-8, cut to `max` bytes.
pub fn excerpt(payload: &[u8], max: usize) -> String {
    let cut = &payload[..payload.len().min(max)];
    let mut s = String::from_utf8_lossy(cut).into_owned();
    if payload.len() > max {
        s.push_str(&format!("... ({} bytes)", payload.len()));
    }
    s
}

/// Which mismatches are logged: the first ten, then one in a hundred, so a broken
/// new backend cannot flood the logs.
pub fn log_this_mismatch(nth: u64) -> bool {
    nth <= 10 || nth % 100 == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_and_json_comparisons() {
        assert!(same(Compare::Bytes, &[], b"abc", b"abc"));
        assert!(!same(
            Compare::Bytes,
            &[],
            br#"{"a":1,"b":2}"#,
            br#"{"b":2,"a":1}"#
        ));
        assert!(same(
            Compare::Json,
            &[],
            br#"{"a":1,"b":2}"#,
            br#"{"b": 2, "a": 1}"#
        ));
        assert!(!same(Compare::Json, &[], br#"{"a":1}"#, br#"{"a":2}"#));
        assert!(!same(Compare::Json, &[], b"not json", b"not json!"));
    }

    #[test]
    fn ignored_fields_at_any_depth_or_by_path() {
        let ignore = vec!["ts".to_string(), "meta.host".to_string()];
        let a = br#"{"v":1,"ts":5,"items":[{"ts":1,"x":2}],"meta":{"host":"a","n":1}}"#;
        let b = br#"{"v":1,"ts":9,"items":[{"ts":7,"x":2}],"meta":{"host":"b","n":1}}"#;
        assert!(same(Compare::Json, &ignore, a, b));
        let c = br#"{"v":1,"ts":9,"items":[{"ts":7,"x":3}],"meta":{"host":"b","n":1}}"#;
        assert!(!same(Compare::Json, &ignore, a, c));
        // A dotted path is only that path.
        let d = br#"{"v":1,"host":"z","meta":{"host":"b","n":1}}"#;
        let e = br#"{"v":1,"host":"y","meta":{"host":"c","n":1}}"#;
        assert!(!same(Compare::Json, &ignore, d, e));
    }

    #[test]
    fn excerpts_are_cut_and_logging_is_sampled() {
        assert_eq!(excerpt(b"hello", 10), "hello");
        assert_eq!(excerpt(b"hello world", 5), "hello... (11 bytes)");
        let logged = (1..=1000).filter(|n| log_this_mismatch(*n)).count();
        assert_eq!(logged, 10 + 10);
    }
}
