//! What pitboss knows of the transparent services: their methods, how each is called
//! (unary, server-streaming, client-streaming, bidi), what command a pool runs for it,
//! whether it may run twice, and where a call's sticky key is. Built once at start
//! from `[transparent]` and the services' descriptors, when pitboss has them.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use prost_reflect::{DescriptorPool, MessageDescriptor};

use crate::config::TransparentSection;

/// How a method's messages flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Unary,
    ServerStreaming,
    ClientStreaming,
    Bidi,
}

impl Kind {
    fn of(client_streaming: bool, server_streaming: bool) -> Kind {
        match (client_streaming, server_streaming) {
            (false, false) => Kind::Unary,
            (false, true) => Kind::ServerStreaming,
            (true, false) => Kind::ClientStreaming,
            (true, true) => Kind::Bidi,
        }
    }

    /// Whether the request is a stream of messages: such a call cannot be split (it is
    /// relayed whole to a `grpc_proxy` legacy, or refused).
    pub fn streams_requests(self) -> bool {
        matches!(self, Kind::ClientStreaming | Kind::Bidi)
    }
}

/// One method of a transparent service.
#[derive(Debug, Clone)]
pub struct Method {
    /// `/package.Service/Method`.
    pub path: Arc<str>,
    pub kind: Kind,
    /// The command a pool runs for it.
    pub command: String,
    /// Safe to run twice (`transparent.idempotent`).
    pub idempotent: bool,
    /// Its response message's type, from the descriptors.
    pub output: Option<MessageDescriptor>,
    /// Known from the descriptors or the config, not only called: its name is a
    /// metric label.
    pub known: bool,
}

/// Why the catalog cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("transparent.services lists {service:?}, which the descriptors ({source_name}) do not define; they define {defined}")]
    MissingService {
        service: String,
        source_name: String,
        defined: String,
    },
    #[error("the descriptors ({source_name}) are not valid: {message}")]
    Invalid {
        source_name: String,
        message: String,
    },
}

/// The services' descriptors and where they came from (for messages).
#[derive(Debug, Clone)]
pub struct Descriptors {
    pub set: prost_types::FileDescriptorSet,
    /// "FILE" or "legacy's reflection".
    pub source: String,
}

/// A method pattern of the config: one method, or a service's every method.
#[derive(Debug, Clone)]
enum Pattern {
    Method(String),
    Service(String),
}

impl Pattern {
    fn parse(text: &str) -> Pattern {
        match text.strip_suffix("/*") {
            Some(service) => Pattern::Service(format!("{service}/")),
            None => Pattern::Method(text.to_string()),
        }
    }

    fn matches(&self, path: &str) -> bool {
        match self {
            Pattern::Method(m) => m == path,
            Pattern::Service(prefix) => path.starts_with(prefix.as_str()),
        }
    }
}

/// The transparent services and their methods.
#[derive(Debug)]
pub struct Catalog {
    services: Vec<String>,
    /// Every method known by name (descriptors, config), by path.
    methods: HashMap<String, Arc<Method>>,
    server_streaming: Vec<Pattern>,
    client_streaming: Vec<Pattern>,
    idempotent: Vec<Pattern>,
    commands: BTreeMap<String, String>,
    routing_metadata: Vec<String>,
    descriptors: Option<Descriptors>,
}

impl Catalog {
    /// The catalog of `section`'s services, with their descriptors when pitboss has
    /// them: then every listed service must be in them, and they say each method's
    /// kind (over `server_streaming` and `client_streaming`).
    pub fn new(
        section: &TransparentSection,
        descriptors: Option<Descriptors>,
    ) -> Result<Catalog, CatalogError> {
        let patterns = |list: &[String]| list.iter().map(|p| Pattern::parse(p)).collect();
        let mut catalog = Catalog {
            services: section.services.clone(),
            methods: HashMap::new(),
            server_streaming: patterns(&section.server_streaming),
            client_streaming: patterns(&section.client_streaming),
            idempotent: patterns(&section.idempotent),
            commands: section.commands.clone(),
            routing_metadata: section.routing_metadata.clone(),
            descriptors: None,
        };
        // Methods the config names.
        let named = section
            .server_streaming
            .iter()
            .chain(&section.client_streaming)
            .chain(&section.idempotent)
            .chain(section.commands.keys())
            .filter(|p| !p.ends_with("/*"));
        for path in named {
            let method = catalog.method_from_config(path, true);
            catalog.methods.insert(path.clone(), Arc::new(method));
        }
        if let Some(d) = descriptors {
            let pool = DescriptorPool::from_file_descriptor_set(d.set.clone()).map_err(|e| {
                CatalogError::Invalid {
                    source_name: d.source.clone(),
                    message: e.to_string(),
                }
            })?;
            for name in &section.services {
                let Some(service) = pool.get_service_by_name(name) else {
                    let defined: Vec<String> =
                        pool.services().map(|s| s.full_name().to_string()).collect();
                    return Err(CatalogError::MissingService {
                        service: name.clone(),
                        source_name: d.source.clone(),
                        defined: if defined.is_empty() {
                            "no service".into()
                        } else {
                            defined.join(", ")
                        },
                    });
                };
                for m in service.methods() {
                    let path = format!("/{name}/{}", m.name());
                    let mut method = catalog.method_from_config(&path, true);
                    method.kind = Kind::of(m.is_client_streaming(), m.is_server_streaming());
                    method.output = Some(m.output());
                    catalog.methods.insert(path, Arc::new(method));
                }
            }
            catalog.descriptors = Some(d);
        }
        Ok(catalog)
    }

    /// A method as the config alone describes it.
    fn method_from_config(&self, path: &str, known: bool) -> Method {
        let any = |list: &[Pattern]| list.iter().any(|p| p.matches(path));
        Method {
            path: path.into(),
            kind: Kind::of(any(&self.client_streaming), any(&self.server_streaming)),
            command: self
                .commands
                .get(path)
                .cloned()
                .unwrap_or_else(|| path.to_string()),
            idempotent: any(&self.idempotent),
            output: None,
            known,
        }
    }

    /// The listed services.
    pub fn services(&self) -> &[String] {
        &self.services
    }

    /// The method at `path`, if its service is listed: known, or one the catalog has
    /// not heard of (which a backend may still have: a newer legacy, say).
    pub fn method(&self, path: &str) -> Option<Arc<Method>> {
        if let Some(m) = self.methods.get(path) {
            return Some(m.clone());
        }
        let (service, name) = path.strip_prefix('/')?.split_once('/')?;
        if name.is_empty() || !self.services.iter().any(|s| s == service) {
            return None;
        }
        Some(Arc::new(self.method_from_config(path, false)))
    }

    /// Every method known by name.
    pub fn known_methods(&self) -> impl Iterator<Item = &str> {
        self.methods.keys().map(String::as_str)
    }

    /// A call's sticky key: the value of the first of `transparent.routing_metadata`
    /// it carries.
    pub fn routing_key(&self, headers: &http::HeaderMap) -> Option<String> {
        self.routing_metadata.iter().find_map(|k| {
            headers
                .get(k.as_str())
                .and_then(|v| v.to_str().ok())
                .filter(|v| !v.is_empty())
                .map(str::to_string)
        })
    }

    /// The descriptors, for pitboss's reflection to list the services.
    pub fn descriptors(&self) -> Option<&Descriptors> {
        self.descriptors.as_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost_types::{
        DescriptorProto, FileDescriptorProto, FileDescriptorSet, MethodDescriptorProto,
        ServiceDescriptorProto,
    };

    fn section(text: &str) -> TransparentSection {
        let cfg = crate::config::Config::from_sources(
            "t.toml",
            Some(text),
            Vec::<(String, String)>::new(),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        cfg.transparent
    }

    fn calculator() -> Descriptors {
        let message = |name: &str| DescriptorProto {
            name: Some(name.into()),
            ..Default::default()
        };
        let method = |name: &str, cs: bool, ss: bool| MethodDescriptorProto {
            name: Some(name.into()),
            input_type: Some(".calc.In".into()),
            output_type: Some(".calc.Out".into()),
            client_streaming: Some(cs),
            server_streaming: Some(ss),
            ..Default::default()
        };
        Descriptors {
            set: FileDescriptorSet {
                file: vec![FileDescriptorProto {
                    name: Some("calc.proto".into()),
                    package: Some("calc".into()),
                    syntax: Some("proto3".into()),
                    message_type: vec![message("In"), message("Out")],
                    service: vec![ServiceDescriptorProto {
                        name: Some("Calculator".into()),
                        method: vec![
                            method("Add", false, false),
                            method("Range", false, true),
                            method("Sum", true, false),
                            method("Chat", true, true),
                        ],
                        ..Default::default()
                    }],
                    ..Default::default()
                }],
            },
            source: "calc.pb".into(),
        }
    }

    #[test]
    fn descriptors_say_each_methods_kind_and_type() {
        let s = section(
            "[transparent]\nservices = [\"calc.Calculator\"]\n\
             commands = { \"/calc.Calculator/Add\" = \"add\" }\n\
             idempotent = [\"/calc.Calculator/*\"]\n",
        );
        let c = Catalog::new(&s, Some(calculator())).unwrap();
        let add = c.method("/calc.Calculator/Add").unwrap();
        assert_eq!(add.kind, Kind::Unary);
        assert_eq!(add.command, "add");
        assert!(add.idempotent && add.known);
        assert_eq!(add.output.as_ref().unwrap().full_name(), "calc.Out");
        let range = c.method("/calc.Calculator/Range").unwrap();
        assert_eq!(
            (range.kind, range.command.as_str()),
            (Kind::ServerStreaming, "/calc.Calculator/Range")
        );
        assert_eq!(
            c.method("/calc.Calculator/Sum").unwrap().kind,
            Kind::ClientStreaming
        );
        assert!(c
            .method("/calc.Calculator/Chat")
            .unwrap()
            .kind
            .streams_requests());
        // A method the descriptors do not have is still the service's (a newer
        // legacy may have it), just not known.
        let newer = c.method("/calc.Calculator/Pow").unwrap();
        assert!(!newer.known && newer.output.is_none());
        assert!(c.method("/calc.Other/Add").is_none());
        assert!(c.method("/calc.Calculator/").is_none());
        let mut known: Vec<&str> = c.known_methods().collect();
        known.sort();
        assert_eq!(known.len(), 4, "{known:?}");
    }

    #[test]
    fn without_descriptors_the_config_says_the_kinds() {
        let s = section(
            "[transparent]\nservices = [\"calc.Calculator\"]\n\
             server_streaming = [\"/calc.Calculator/Range\"]\n\
             client_streaming = [\"/calc.Calculator/Sum\"]\n",
        );
        let c = Catalog::new(&s, None).unwrap();
        assert_eq!(c.method("/calc.Calculator/Add").unwrap().kind, Kind::Unary);
        assert!(!c.method("/calc.Calculator/Add").unwrap().known);
        assert_eq!(
            c.method("/calc.Calculator/Range").unwrap().kind,
            Kind::ServerStreaming
        );
        assert_eq!(
            c.method("/calc.Calculator/Sum").unwrap().kind,
            Kind::ClientStreaming
        );
        assert!(!c.method("/calc.Calculator/Add").unwrap().idempotent);
    }

    #[test]
    fn a_service_the_descriptors_lack_is_an_error_naming_what_they_have() {
        let s = section("[transparent]\nservices = [\"calc.Calculatorr\"]\n");
        let err = Catalog::new(&s, Some(calculator()))
            .unwrap_err()
            .to_string();
        assert!(err.contains("calc.Calculatorr"), "{err}");
        assert!(err.contains("calc.pb"), "{err}");
        assert!(err.contains("calc.Calculator"), "{err}");
    }

    #[test]
    fn the_sticky_key_is_the_first_routing_metadata_present() {
        let s = section("[transparent]\nservices = [\"calc.Calculator\"]\n");
        let c = Catalog::new(&s, None).unwrap();
        let mut h = http::HeaderMap::new();
        assert_eq!(c.routing_key(&h), None);
        h.insert("x-session-id", "s1".parse().unwrap());
        assert_eq!(c.routing_key(&h).as_deref(), Some("s1"));
        h.insert("x-routing-key", "user-7".parse().unwrap());
        assert_eq!(c.routing_key(&h).as_deref(), Some("user-7"));
    }
}
