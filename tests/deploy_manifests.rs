//! The Kubernetes manifests in `config/k8s` (docs/DEPLOY.md): every YAML document is
//! parsed with PyYAML (a `python3 -c` script that prints them as JSON) and checked
//! here: the probes, the drain (preStop and a grace period that covers
//! `server.shutdown_grace`), the Prometheus annotations, the flags ConfigMap mounted as
//! a directory, the admin port kept off the pod's ports, the headless Service; and the
//! `pitboss.toml` and `flags.toml` inside the ConfigMaps are parsed with pitboss's own
//! parsers, with each Deployment's `PITBOSS_*` variables applied.
//!
//! Without PyYAML the test prints SKIPPED and passes, unless PITBOSS_REQUIRE_YAML=1.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;
use pitboss::config::Config;
use pitboss::rollout::{Flags, LiveFlags, Mode};
use serde_json::Value;

const K8S_DIR: &str = "config/k8s";
const EXPECTED_FILES: [&str; 4] = [
    "configmaps.yaml",
    "etcd.yaml",
    "shared-tier.yaml",
    "sidecar.yaml",
];
const METRICS_PORT: i64 = 9464;
const GRPC_PORT: i64 = 50051;
const ADMIN_PORT: i64 = 50052;
const CONFIG_PATH: &str = "/etc/pitboss/pitboss.toml";
const FLAGS_DIR: &str = "/etc/pitboss/flags";

/// Prints every file's documents as JSON: {"path": [doc, ...], ...}. Exit 3: no PyYAML.
const LOAD_YAML: &str = r#"
import json, sys
try:
    import yaml
except ImportError as e:
    sys.stderr.write("cannot import yaml: %s\n" % e)
    sys.exit(3)
out = {}
for path in sys.argv[1:]:
    with open(path) as f:
        out[path] = [d for d in yaml.safe_load_all(f) if d is not None]
json.dump(out, sys.stdout, default=str)
"#;

fn k8s_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(K8S_DIR)
}

fn yaml_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(k8s_dir())
        .expect("config/k8s exists")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    files.sort();
    files
}

/// Every document of every YAML file, by file name; `None` when PyYAML is missing
/// (and not required).
fn load_manifests() -> Option<BTreeMap<String, Vec<Value>>> {
    let files = yaml_files();
    let out = Command::new("python3")
        .arg("-c")
        .arg(LOAD_YAML)
        .args(&files)
        .output();
    let required = std::env::var("PITBOSS_REQUIRE_YAML").is_ok_and(|v| v == "1");
    let out = match out {
        Ok(out) => out,
        Err(e) if !required => {
            eprintln!(
                "SKIPPED: cannot run python3 ({e}); set PITBOSS_REQUIRE_YAML=1 to fail instead"
            );
            return None;
        }
        Err(e) => panic!("cannot run python3: {e}"),
    };
    if out.status.code() == Some(3) {
        let why = String::from_utf8_lossy(&out.stderr);
        assert!(
            !required,
            "PITBOSS_REQUIRE_YAML=1 but PyYAML is missing: {why}"
        );
        eprintln!(
            "SKIPPED: PyYAML is not installed ({}); set PITBOSS_REQUIRE_YAML=1 to fail instead",
            why.trim()
        );
        return None;
    }
    assert!(
        out.status.success(),
        "PyYAML could not parse config/k8s: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let by_path: BTreeMap<String, Vec<Value>> =
        serde_json::from_slice(&out.stdout).expect("the script prints JSON");
    Some(
        by_path
            .into_iter()
            .map(|(path, docs)| {
                let name = Path::new(&path)
                    .file_name()
                    .unwrap()
                    .to_string_lossy()
                    .into_owned();
                (name, docs)
            })
            .collect(),
    )
}

fn str_at<'a>(v: &'a Value, pointer: &str) -> Option<&'a str> {
    v.pointer(pointer).and_then(Value::as_str)
}

fn name_of(doc: &Value) -> String {
    format!(
        "{} {}",
        str_at(doc, "/kind").unwrap_or("?"),
        str_at(doc, "/metadata/name").unwrap_or("?")
    )
}

fn docs_of_kind<'a>(
    all: &'a BTreeMap<String, Vec<Value>>,
    kind: &'a str,
) -> impl Iterator<Item = (&'a str, &'a Value)> {
    all.iter().flat_map(move |(file, docs)| {
        docs.iter()
            .filter(move |d| str_at(d, "/kind") == Some(kind))
            .map(move |d| (file.as_str(), d))
    })
}

/// A ConfigMap's `data` entry.
fn configmap_data<'a>(all: &'a BTreeMap<String, Vec<Value>>, name: &str, key: &str) -> &'a str {
    docs_of_kind(all, "ConfigMap")
        .find(|(_, d)| str_at(d, "/metadata/name") == Some(name))
        .unwrap_or_else(|| panic!("no ConfigMap {name} in config/k8s"))
        .1
        .pointer(&format!("/data/{key}"))
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("ConfigMap {name} has no data key {key}"))
}

/// A probe's or a hook's port: a number, or the name of one of the container's ports.
fn port_number(container: &Value, port: &Value) -> Option<i64> {
    match port {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => s.parse().ok().or_else(|| {
            container["ports"]
                .as_array()?
                .iter()
                .find(|p| p["name"].as_str() == Some(s))
                .and_then(|p| p["containerPort"].as_i64())
        }),
        _ => None,
    }
}

/// The seconds a preStop hook waits: `exec: [sleep, N]`, `sh -c "sleep N"`, or the
/// `sleep: {seconds: N}` action.
fn pre_stop_seconds(pre_stop: &Value) -> Option<u64> {
    if let Some(s) = pre_stop.pointer("/sleep/seconds").and_then(Value::as_u64) {
        return Some(s);
    }
    let command: Vec<&str> = pre_stop
        .pointer("/exec/command")?
        .as_array()?
        .iter()
        .filter_map(Value::as_str)
        .collect();
    let words: Vec<&str> = command.iter().flat_map(|c| c.split_whitespace()).collect();
    let at = words
        .iter()
        .position(|w| *w == "sleep" || w.ends_with("/sleep"))?;
    words.get(at + 1)?.parse().ok()
}

/// The pitboss config a container runs: the ConfigMap's pitboss.toml with the
/// container's literal `PITBOSS_*` variables applied (and nothing from this process's
/// environment).
fn effective_config(all: &BTreeMap<String, Vec<Value>>, container: &Value, what: &str) -> Config {
    effective_config_of(all, "pitboss-config", container, what)
}

/// The config of ConfigMap `configmap`'s `pitboss.toml` with `container`'s
/// `PITBOSS_*` variables applied.
fn effective_config_of(
    all: &BTreeMap<String, Vec<Value>>,
    configmap: &str,
    container: &Value,
    what: &str,
) -> Config {
    let text = configmap_data(all, configmap, "pitboss.toml");
    let env: Vec<(String, String)> = container["env"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| {
            Some((
                e["name"].as_str()?.to_string(),
                e["value"].as_str()?.to_string(),
            ))
        })
        .filter(|(name, _)| name.starts_with("PITBOSS_"))
        .collect();
    Config::from_sources(
        &format!("{what}: {configmap}/pitboss.toml"),
        Some(text),
        env,
    )
    .unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn every_manifest_is_valid_and_the_pitboss_pods_drain_and_reload_safely() {
    let files: Vec<String> = yaml_files()
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    for f in EXPECTED_FILES {
        assert!(files.iter().any(|x| x == f), "config/k8s/{f} is missing");
    }
    let Some(all) = load_manifests() else {
        return;
    };

    // Every document names its API, kind and name.
    for (file, docs) in &all {
        assert!(!docs.is_empty(), "{file}: no YAML document");
        for (i, d) in docs.iter().enumerate() {
            for key in ["/apiVersion", "/kind", "/metadata/name"] {
                assert!(
                    str_at(d, key).is_some_and(|s| !s.is_empty()),
                    "{file}: document {} ({}) has no {key}",
                    i + 1,
                    name_of(d)
                );
            }
        }
    }

    // The ConfigMaps parse with pitboss's own parsers.
    let config = effective_config(&all, &Value::Null, "configmaps.yaml");
    let flags_text = configmap_data(&all, "pitboss-flags", "flags.toml");
    Flags::parse("configmaps.yaml: pitboss-flags/flags.toml", flags_text)
        .unwrap_or_else(|e| panic!("{e}"));
    let flags_file = PathBuf::from(&config.rollout.flags_file);
    assert_eq!(
        flags_file.parent(),
        Some(Path::new(FLAGS_DIR)),
        "rollout.flags_file must be inside the flags ConfigMap's directory mount"
    );
    let flags_key = flags_file
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    configmap_data(&all, "pitboss-flags", &flags_key);
    let secrets: Vec<&str> = docs_of_kind(&all, "Secret")
        .filter_map(|(_, d)| str_at(d, "/metadata/name"))
        .collect();

    let deployments: Vec<(&str, &Value)> = docs_of_kind(&all, "Deployment").collect();
    assert!(
        deployments.len() >= 2,
        "expected the sidecar and the shared-tier Deployments"
    );
    for (file, d) in &deployments {
        let what = format!("{file}: {}", name_of(d));
        let pod = &d["spec"]["template"];
        let spec = &pod["spec"];
        let containers: Vec<&Value> = spec["containers"]
            .as_array()
            .into_iter()
            .chain(spec["initContainers"].as_array())
            .flatten()
            .collect();
        let pb = *containers
            .iter()
            .find(|c| c["name"].as_str() == Some("pitboss"))
            .unwrap_or_else(|| panic!("{what}: no container named pitboss"));
        let cfg = effective_config(&all, pb, &what);

        assert_eq!(
            pb["args"],
            serde_json::json!(["--config", CONFIG_PATH]),
            "{what}: pitboss's args"
        );

        // Probes on the metrics listener, which must be reachable from the kubelet.
        for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
            let get = &pb[probe]["httpGet"];
            assert_eq!(get["path"].as_str(), Some(path), "{what}: {probe} path");
            assert_eq!(
                port_number(pb, &get["port"]),
                Some(METRICS_PORT),
                "{what}: {probe} port"
            );
        }
        assert_eq!(
            cfg.server.metrics_listen.port() as i64,
            METRICS_PORT,
            "{what}: metrics_listen port"
        );
        assert!(
            cfg.server.metrics_listen.ip().is_unspecified(),
            "{what}: metrics_listen {} is not reachable by the kubelet's probes or Prometheus",
            cfg.server.metrics_listen
        );

        // Ports: gRPC and metrics exposed, the admin API kept on loopback.
        let ports: Vec<i64> = pb["ports"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| p["containerPort"].as_i64())
            .collect();
        assert!(
            ports.contains(&GRPC_PORT),
            "{what}: port {GRPC_PORT} not listed"
        );
        assert!(
            ports.contains(&METRICS_PORT),
            "{what}: port {METRICS_PORT} not listed"
        );
        assert!(
            !ports.contains(&ADMIN_PORT),
            "{what}: the admin port must not be exposed"
        );
        assert!(
            cfg.server.admin_listen.ip().is_loopback(),
            "{what}: admin_listen must stay on loopback"
        );
        assert_eq!(
            cfg.server.listen.port() as i64,
            GRPC_PORT,
            "{what}: listen port"
        );
        // A sidecar serves its own pod only; a standalone tier serves the network.
        let listen: SocketAddr = cfg.server.listen;
        if spec["containers"].as_array().map_or(0, Vec::len) > 1 {
            assert!(
                listen.ip().is_loopback(),
                "{what}: a sidecar listens on loopback, not {listen}"
            );
        } else {
            assert!(
                listen.ip().is_unspecified(),
                "{what}: a shared tier listens on 0.0.0.0, not {listen}"
            );
        }

        // The admin token comes from a Secret defined alongside.
        let token = pb["env"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|e| e["name"].as_str() == Some("PITBOSS_ADMIN_TOKEN"))
            .unwrap_or_else(|| panic!("{what}: no PITBOSS_ADMIN_TOKEN"));
        let secret = str_at(token, "/valueFrom/secretKeyRef/name")
            .unwrap_or_else(|| panic!("{what}: PITBOSS_ADMIN_TOKEN must come from a Secret"));
        assert!(
            secrets.contains(&secret),
            "{what}: Secret {secret} is not in config/k8s"
        );

        // Drain: preStop, then shutdown_grace for in-flight calls, within the grace period.
        let pre_stop = &pb["lifecycle"]["preStop"];
        assert!(!pre_stop.is_null(), "{what}: pitboss has no preStop hook");
        let pre_stop = pre_stop_seconds(pre_stop)
            .unwrap_or_else(|| panic!("{what}: cannot read the preStop sleep from {pre_stop}"));
        assert!(pre_stop > 0, "{what}: preStop must wait");
        let grace = spec["terminationGracePeriodSeconds"]
            .as_u64()
            .unwrap_or_else(|| panic!("{what}: no terminationGracePeriodSeconds"));
        let shutdown_grace = cfg.server.shutdown_grace.0;
        assert!(
            shutdown_grace >= Duration::from_secs(30),
            "{what}: shutdown_grace is {shutdown_grace:?}; this check assumes the default 30 s or more"
        );
        assert!(
            Duration::from_secs(grace) >= shutdown_grace + Duration::from_secs(pre_stop),
            "{what}: terminationGracePeriodSeconds {grace} < preStop {pre_stop} s + shutdown_grace {shutdown_grace:?}"
        );

        // Prometheus annotations on the pod template.
        let ann = &pod["metadata"]["annotations"];
        assert_eq!(
            ann["prometheus.io/scrape"].as_str(),
            Some("true"),
            "{what}: prometheus.io/scrape"
        );
        assert_eq!(
            ann["prometheus.io/port"].as_str(),
            Some("9464"),
            "{what}: prometheus.io/port"
        );
        assert_eq!(
            ann["prometheus.io/path"].as_str(),
            Some("/metrics"),
            "{what}: prometheus.io/path"
        );

        // The volumes: the config file, and the flags ConfigMap as a directory.
        let volumes = spec["volumes"].as_array().cloned().unwrap_or_default();
        let configmap_of = |mount: &Value| -> Option<String> {
            let name = mount["name"].as_str()?;
            let v = volumes.iter().find(|v| v["name"].as_str() == Some(name))?;
            v.pointer("/configMap/name")
                .and_then(Value::as_str)
                .map(String::from)
        };
        let mounts = pb["volumeMounts"].as_array().cloned().unwrap_or_default();
        let flags_mount = mounts
            .iter()
            .find(|m| m["mountPath"].as_str().map(|p| p.trim_end_matches('/')) == Some(FLAGS_DIR))
            .unwrap_or_else(|| panic!("{what}: nothing mounted at {FLAGS_DIR}"));
        assert!(
            flags_mount.get("subPath").is_none() && flags_mount.get("subPathExpr").is_none(),
            "{what}: the flags ConfigMap must be mounted as a directory: a subPath mount never sees updates"
        );
        assert_eq!(
            configmap_of(flags_mount).as_deref(),
            Some("pitboss-flags"),
            "{what}: {FLAGS_DIR} must be the pitboss-flags ConfigMap"
        );
        let config_mount = mounts
            .iter()
            .find(|m| {
                let path = m["mountPath"].as_str().unwrap_or("");
                path == CONFIG_PATH
                    || (m.get("subPath").is_none()
                        && Path::new(CONFIG_PATH).parent() == Some(Path::new(path)))
            })
            .unwrap_or_else(|| panic!("{what}: {CONFIG_PATH} is not mounted"));
        assert_eq!(
            configmap_of(config_mount).as_deref(),
            Some("pitboss-config"),
            "{what}: {CONFIG_PATH} must come from the pitboss-config ConfigMap"
        );
    }

    // pitboss's Services are headless (a virtual IP would break session affinity)
    // and carry the gRPC and metrics ports. (etcd.yaml's are checked below.)
    let services: Vec<(&str, &Value)> = docs_of_kind(&all, "Service")
        .filter(|(_, s)| str_at(s, "/metadata/labels/app.kubernetes.io~1name") == Some("pitboss"))
        .collect();
    assert!(!services.is_empty(), "expected the shared tier's Service");
    for (file, s) in services {
        let what = format!("{file}: {}", name_of(s));
        assert_eq!(
            s["spec"]["clusterIP"].as_str(),
            Some("None"),
            "{what}: not headless"
        );
        let ports: Vec<i64> = s["spec"]["ports"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| p["port"].as_i64())
            .collect();
        assert!(
            ports.contains(&GRPC_PORT) && ports.contains(&METRICS_PORT),
            "{what}: ports {ports:?}"
        );
        assert!(
            !ports.contains(&ADMIN_PORT),
            "{what}: the admin port must not be exposed"
        );
    }
}

/// The value of `--flag=` in a container's command or args.
fn flag<'a>(container: &'a Value, flag: &str) -> Option<&'a str> {
    container["command"]
        .as_array()
        .into_iter()
        .chain(container["args"].as_array())
        .flatten()
        .filter_map(Value::as_str)
        .find_map(|a| a.strip_prefix(&format!("--{flag}=")))
}

#[test]
fn the_etcd_option_is_a_three_member_cluster_and_the_pitboss_config_for_it_points_at_it() {
    let Some(all) = load_manifests() else {
        return;
    };
    let doc = |kind: &str, name: &str| -> Value {
        docs_of_kind(&all, kind)
            .find(|(_, d)| str_at(d, "/metadata/name") == Some(name))
            .unwrap_or_else(|| panic!("no {kind} {name} in config/k8s"))
            .1
            .clone()
    };
    let sts = doc("StatefulSet", "pitboss-etcd");
    let replicas = sts["spec"]["replicas"].as_u64().unwrap();
    assert_eq!(replicas, 3, "a quorum that survives one member's loss");
    let service_name = str_at(&sts, "/spec/serviceName").unwrap();
    let service = doc("Service", service_name);
    assert_eq!(
        service["spec"]["clusterIP"].as_str(),
        Some("None"),
        "headless"
    );
    assert_eq!(
        service["spec"]["publishNotReadyAddresses"].as_bool(),
        Some(true),
        "members must resolve each other before they have a quorum"
    );
    let ports: Vec<i64> = service["spec"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["port"].as_i64())
        .collect();
    assert_eq!(ports, vec![2379, 2380]);
    let selector = &sts["spec"]["selector"]["matchLabels"];
    assert_eq!(
        &service["spec"]["selector"], selector,
        "the Service selects the members"
    );
    assert_eq!(&sts["spec"]["template"]["metadata"]["labels"], selector);

    // Each member names itself after its pod and is reached through the Service.
    let etcd = &sts["spec"]["template"]["spec"]["containers"][0];
    let pod_name = etcd["env"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "POD_NAME")
        .expect("POD_NAME");
    assert_eq!(
        str_at(pod_name, "/valueFrom/fieldRef/fieldPath"),
        Some("metadata.name")
    );
    assert_eq!(flag(etcd, "name"), Some("$(POD_NAME)"));
    let member = |i: u64| format!("pitboss-etcd-{i}.{service_name}");
    assert_eq!(
        flag(etcd, "initial-advertise-peer-urls"),
        Some(format!("http://$(POD_NAME).{service_name}:2380").as_str())
    );
    assert_eq!(
        flag(etcd, "advertise-client-urls"),
        Some(format!("http://$(POD_NAME).{service_name}:2379").as_str())
    );
    let cluster: Vec<String> = (0..replicas)
        .map(|i| format!("pitboss-etcd-{i}=http://{}:2380", member(i)))
        .collect();
    assert_eq!(
        flag(etcd, "initial-cluster"),
        Some(cluster.join(",").as_str())
    );
    assert_eq!(flag(etcd, "initial-cluster-state"), Some("new"));
    assert!(
        flag(etcd, "data-dir").is_some_and(|d| etcd["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["mountPath"].as_str() == Some(d))),
        "the data dir must be the persistent volume"
    );
    let pdb = doc("PodDisruptionBudget", "pitboss-etcd");
    assert_eq!(pdb["spec"]["maxUnavailable"].as_i64(), Some(1));
    assert_eq!(&pdb["spec"]["selector"]["matchLabels"], selector);

    // The pitboss config for it: configmaps.yaml's, plus the store, on every member.
    let tier = doc("Deployment", "pitboss");
    let pb = tier["spec"]["template"]["spec"]["containers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "pitboss")
        .unwrap()
        .clone();
    let cfg = effective_config_of(&all, "pitboss-config-etcd", &pb, "etcd.yaml");
    let store = &cfg.rollout.store;
    assert_eq!(store.kind, pitboss::config::StoreKind::Etcd);
    let endpoints: Vec<String> = (0..replicas)
        .map(|i| format!("http://{}:2379", member(i)))
        .collect();
    assert_eq!(store.endpoints, endpoints);
    let cache = Path::new(&store.cache_file);
    let writable: Vec<&str> = pb["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["readOnly"].as_bool() != Some(true))
        .filter_map(|m| m["mountPath"].as_str())
        .collect();
    assert!(
        writable.iter().any(|m| cache.starts_with(m)),
        "cache_file {} is not on a writable mount of the shared tier ({writable:?})",
        cache.display()
    );
    let mut without_store = cfg.clone();
    without_store.rollout.store = effective_config(&all, &pb, "shared-tier.yaml")
        .rollout
        .store;
    assert_eq!(
        without_store,
        effective_config(&all, &pb, "shared-tier.yaml"),
        "pitboss-config-etcd must be pitboss-config plus [rollout.store]"
    );
    // The pods need stable names for the audit log and the election.
    let id = pb["env"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "PITBOSS_INSTANCE_ID")
        .expect("PITBOSS_INSTANCE_ID");
    assert_eq!(
        str_at(id, "/valueFrom/fieldRef/fieldPath"),
        Some("metadata.name")
    );
    // Only pitboss's pods reach the client port.
    let policy = doc("NetworkPolicy", "pitboss-etcd");
    assert_eq!(&policy["spec"]["podSelector"]["matchLabels"], selector);
    let from_pitboss = policy["spec"]["ingress"]
        .as_array()
        .unwrap()
        .iter()
        .any(|r| {
            r["from"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/name"] == "pitboss"
                && r["ports"][0]["port"] == 2379
        });
    assert!(from_pitboss, "pitboss's pods cannot reach etcd: {policy}");
    // docs/DEPLOY.md refers to the option.
    let deploy =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/DEPLOY.md"))
            .unwrap();
    assert!(deploy.contains("config/k8s/etcd.yaml"), "docs/DEPLOY.md");
}

// What follows is how pitboss sees the kubelet's updates of the flags volume (a
// ConfigMap directory mount): it follows the `..data` swap, and its own reads of the
// file do not trigger further reloads.

/// The kubelet's AtomicWriter: the files live in a timestamped directory, `..data`
/// points to it, and each key is a symlink `key -> ..data/key`. An update writes a new
/// directory, points `..data_tmp` at it, renames `..data_tmp` over `..data` and removes
/// the old directory: the key's own symlink is never touched.
fn kubelet_write(dir: &Path, generation: u32, flags: &str) {
    let data = format!("..2026_11_24_00_00_0{generation}.000000000");
    std::fs::create_dir(dir.join(&data)).unwrap();
    std::fs::write(dir.join(&data).join("flags.toml"), flags).unwrap();
    let old = std::fs::read_link(dir.join("..data")).ok();
    std::os::unix::fs::symlink(&data, dir.join("..data_tmp")).unwrap();
    std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).unwrap();
    if !dir.join("flags.toml").exists() {
        std::os::unix::fs::symlink("..data/flags.toml", dir.join("flags.toml")).unwrap();
    }
    if let Some(old) = old {
        std::fs::remove_dir_all(dir.join(old)).unwrap();
    }
}

#[tokio::test]
async fn an_edit_of_the_flags_configmap_reaches_a_running_pitboss() {
    let dir = temp_dir("k8s-kubelet");
    kubelet_write(&dir, 1, "mode = \"off\"\n");
    let live = LiveFlags::load(&dir.join("flags.toml")).unwrap();
    let _watch = live.watch().unwrap();
    assert_eq!(live.get().mode, Mode::Off);
    kubelet_write(&dir, 2, "mode = \"shadow\"\ncommands = [\"*\"]\n");
    let seen = eventually(Duration::from_secs(3), || live.get().mode == Mode::Shadow).await;
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        seen,
        "the kubelet's update of the flags volume was not reloaded"
    );
}

#[tokio::test]
async fn one_edit_of_the_flags_file_means_one_reload() {
    let dir = temp_dir("k8s-loop");
    let path = dir.join("flags.toml");
    std::fs::write(&path, "mode = \"off\"\n").unwrap();
    let live = LiveFlags::load(&path).unwrap();
    let _watch = live.watch().unwrap();
    std::fs::write(
        dir.join(".flags.toml.tmp"),
        "mode = \"shadow\"\ncommands = [\"*\"]\n",
    )
    .unwrap();
    std::fs::rename(dir.join(".flags.toml.tmp"), &path).unwrap();
    assert!(eventually(Duration::from_secs(3), || live.get().mode == Mode::Shadow).await);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (ok, failed) = live.reloads();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        ok + failed <= 3,
        "one edit caused {ok} reloads (and {failed} failed) in a second"
    );
}
