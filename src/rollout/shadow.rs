//! Shadow comparison (GitHub Scientist for a sidecar): the pure parts.
//!
//! Legacy answers the client; new runs alongside and its result is compared here.
//! The comparison is bytewise, or as JSON with configured fields ignored (timestamps,
//! request ids: fields that differ on every call and say nothing about correctness).
//! A transparent call's messages (protobuf) are compared field by field when their
//! type is known: both are decoded through its descriptor, written as JSON with the
//! proto field names, and compared as JSON, so `ignore_fields` name proto fields.

use prost_reflect::{DynamicMessage, MessageDescriptor, SerializeOptions};

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
    let (Ok(a), Ok(b)) = (
        serde_json::from_slice::<serde_json::Value>(legacy),
        serde_json::from_slice::<serde_json::Value>(new),
    ) else {
        return false;
    };
    same_values(a, b, ignore)
}

/// Whether two answers are equal under the configured comparison, knowing the type of
/// the message they are when it is known (a transparent call with descriptors): then
/// `json` compares them field by field (see the module docs). A message that does not
/// decode as its type is equal only to the same bytes.
pub fn same_answer(
    compare: Compare,
    ignore: &[String],
    message: Option<&MessageDescriptor>,
    legacy: &[u8],
    new: &[u8],
) -> bool {
    let Some(desc) = message else {
        return same(compare, ignore, legacy, new);
    };
    if legacy == new {
        return true;
    }
    if compare == Compare::Bytes {
        return false;
    }
    match (as_json(desc, legacy), as_json(desc, new)) {
        (Some(a), Some(b)) => same_values(a, b, ignore),
        _ => false,
    }
}

/// A protobuf message as JSON: proto field names, fields at their default left out
/// (so a default sent explicitly equals one left out, as protobuf means it).
fn as_json(desc: &MessageDescriptor, bytes: &[u8]) -> Option<serde_json::Value> {
    let message = DynamicMessage::decode(desc.clone(), bytes).ok()?;
    let options = SerializeOptions::new().use_proto_field_name(true);
    message
        .serialize_with_options(serde_json::value::Serializer, &options)
        .ok()
}

/// An answer for a log line: a message of a known type as its JSON, else
/// [`excerpt`].
pub fn describe(message: Option<&MessageDescriptor>, payload: &[u8], max: usize) -> String {
    match message.and_then(|d| as_json(d, payload)) {
        Some(json) => excerpt(json.to_string().as_bytes(), max),
        None => excerpt(payload, max),
    }
}

fn same_values(mut a: serde_json::Value, mut b: serde_json::Value, ignore: &[String]) -> bool {
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

    /// A message type like the test Calculator's reply, built without protoc.
    fn reply_type() -> MessageDescriptor {
        use prost_types::field_descriptor_proto::{Label, Type};
        let field = |name: &str, number: i32, ty: Type| prost_types::FieldDescriptorProto {
            name: Some(name.into()),
            number: Some(number),
            label: Some(Label::Optional as i32),
            r#type: Some(ty as i32),
            json_name: None,
            ..Default::default()
        };
        let file = prost_types::FileDescriptorProto {
            name: Some("calc.proto".into()),
            package: Some("calc".into()),
            syntax: Some("proto3".into()),
            message_type: vec![prost_types::DescriptorProto {
                name: Some("Reply".into()),
                field: vec![
                    field("sum", 1, Type::Int64),
                    field("computed_by", 2, Type::String),
                ],
                ..Default::default()
            }],
            ..Default::default()
        };
        let pool = prost_reflect::DescriptorPool::from_file_descriptor_set(
            prost_types::FileDescriptorSet { file: vec![file] },
        )
        .unwrap();
        pool.get_message_by_name("calc.Reply").unwrap()
    }

    #[test]
    fn messages_of_a_known_type_are_compared_field_by_field() {
        use prost_reflect::{DynamicMessage, Value};
        let ty = reply_type();
        let encode = |fields: &[(&str, Value)]| {
            let mut m = DynamicMessage::new(ty.clone());
            for (name, v) in fields {
                m.set_field_by_name(name, v.clone());
            }
            prost::Message::encode_to_vec(&m)
        };
        let legacy = encode(&[
            ("sum", Value::I64(5)),
            ("computed_by", Value::String("legacy".into())),
        ]);
        let new = encode(&[
            ("computed_by", Value::String("new".into())),
            ("sum", Value::I64(5)),
        ]);
        let wrong = encode(&[
            ("sum", Value::I64(6)),
            ("computed_by", Value::String("new".into())),
        ]);
        let ignore = vec!["computed_by".to_string()];
        assert!(same_answer(
            Compare::Json,
            &ignore,
            Some(&ty),
            &legacy,
            &new
        ));
        assert!(!same_answer(
            Compare::Json,
            &ignore,
            Some(&ty),
            &legacy,
            &wrong
        ));
        assert!(!same_answer(Compare::Json, &[], Some(&ty), &legacy, &new));
        assert!(!same_answer(
            Compare::Bytes,
            &ignore,
            Some(&ty),
            &legacy,
            &new
        ));
        // A default sent explicitly is the default left out.
        let zero = encode(&[("sum", Value::I64(0))]);
        assert!(same_answer(Compare::Json, &[], Some(&ty), &zero, &[]));
        // Bytes that are not the message equal only themselves.
        assert!(!same_answer(
            Compare::Json,
            &[],
            Some(&ty),
            &[0xff, 0xff],
            &[0xff]
        ));
        assert!(same_answer(Compare::Json, &[], Some(&ty), &[0xff], &[0xff]));
        let text = describe(Some(&ty), &wrong, 100);
        assert!(
            text.contains(r#""sum":"6""#) && text.contains(r#""computed_by":"new""#),
            "{text}"
        );
    }

    #[test]
    fn excerpts_are_cut_and_logging_is_sampled() {
        assert_eq!(excerpt(b"hello", 10), "hello");
        assert_eq!(excerpt(b"hello world", 5), "hello... (11 bytes)");
        let logged = (1..=1000).filter(|n| log_this_mismatch(*n)).count();
        assert_eq!(logged, 10 + 10);
    }
}
