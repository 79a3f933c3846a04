//! The operator's files in deploy/: the alert rules and the compose file's Prometheus
//! configuration pass `promtool`; the compose file starts with no Anodot variable set
//! (its interpolation resolved as compose does, mltap's environment accepted by
//! `mltap validate`), Prometheus and Grafana only under the `observability` profile;
//! the Helm chart is checked without helm (no registry this project can use ships a
//! helm binary): its templates are balanced, every `.Values` path they read is
//! declared and documented in values.yaml, and the files it embeds are the shipped
//! rules and dashboard.
//!
//! Needs `promtool` (Debian's `prometheus` package; scripts/test installs it).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use yaml_rust2::{Yaml, YamlLoader};

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn yaml(path: &str) -> Yaml {
    YamlLoader::load_from_str(&read(path)).unwrap_or_else(|e| panic!("{path} is not YAML: {e}")).remove(0)
}

fn promtool() -> Command {
    for dir in std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()) {
        if dir.join("promtool").is_file() {
            return Command::new(dir.join("promtool"));
        }
    }
    panic!("`promtool` is not installed: `apt-get install -y prometheus` (scripts/test does it)");
}

#[test]
fn promtool_accepts_the_alert_rules_and_the_compose_prometheus_config() {
    let output = promtool().args(["check", "rules"]).arg(repo("deploy/prometheus/mltap.rules.yml")).output().unwrap();
    let said = String::from_utf8_lossy(&output.stdout).to_string() + &String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success() && said.contains("SUCCESS"), "{said}");

    // The compose file mounts the rules at /etc/prometheus; check the config with the
    // rules where they are in the repository.
    let dir = tempfile::tempdir().unwrap();
    let config = read("deploy/prometheus/prometheus.yml")
        .replace("/etc/prometheus/mltap.rules.yml", &repo("deploy/prometheus/mltap.rules.yml").display().to_string());
    std::fs::write(dir.path().join("prometheus.yml"), config).unwrap();
    let output = promtool().args(["check", "config"]).arg(dir.path().join("prometheus.yml")).output().unwrap();
    let said = String::from_utf8_lossy(&output.stdout).to_string() + &String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{said}");
    // It scrapes mltap's admin port by the compose service name.
    let default_admin = mltap::config::Config::load(&mltap::cli::ServeArgs::default()).unwrap().admin_listen.port();
    assert!(read("deploy/prometheus/prometheus.yml").contains(&format!("mltap:{default_admin}")));
}

/// Compose's interpolation of `${VAR}`, `${VAR:-default}`, `${VAR-default}` and
/// `${VAR:?message}` against `env`; an error names a variable that must be set.
fn interpolate(text: &str, env: &BTreeMap<String, String>) -> Result<String, String> {
    let mut out = String::new();
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let end = rest[start..].find('}').ok_or("unclosed ${")? + start;
        let inner = &rest[start + 2..end];
        let value = if let Some((name, message)) = inner.split_once(":?") {
            match env.get(name).filter(|v| !v.is_empty()) {
                Some(v) => v.clone(),
                None => return Err(format!("{name} must be set: {message}")),
            }
        } else if let Some((name, default)) = inner.split_once(":-") {
            env.get(name).filter(|v| !v.is_empty()).cloned().unwrap_or_else(|| default.to_string())
        } else if let Some((name, default)) = inner.split_once('-') {
            env.get(name).cloned().unwrap_or_else(|| default.to_string())
        } else {
            env.get(inner).cloned().unwrap_or_default()
        };
        out.push_str(&value);
        rest = &rest[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

#[test]
fn the_compose_file_starts_without_anodot_and_observability_is_a_profile() {
    assert!(interpolate("${A:?set A}", &BTreeMap::new()).is_err(), "the interpolation detects required variables");
    let resolved = interpolate(&read("deploy/docker-compose.yml"), &BTreeMap::new())
        .unwrap_or_else(|e| panic!("the compose file needs a variable: {e}"));
    let compose = YamlLoader::load_from_str(&resolved).unwrap().remove(0);
    let services = compose["services"].as_hash().unwrap();
    let profiles = |name: &str| -> Vec<String> {
        compose["services"][name]["profiles"]
            .as_vec()
            .map(|v| v.iter().filter_map(|p| p.as_str().map(str::to_string)).collect())
            .unwrap_or_default()
    };
    for name in ["tfserving", "mltap"] {
        assert!(profiles(name).is_empty(), "{name} starts by default");
    }
    for name in ["prometheus", "grafana"] {
        assert_eq!(profiles(name), ["observability"], "{name} is optional");
    }
    assert_eq!(services.len(), 4);

    // mltap's resolved environment is a valid configuration, with delivery off.
    let env = compose["services"]["mltap"]["environment"].as_hash().unwrap();
    let mut validate = Command::new(env!("CARGO_BIN_EXE_mltap"));
    validate.arg("validate").env_clear();
    for (key, value) in env {
        let value = match value {
            Yaml::String(s) => s.clone(),
            Yaml::Integer(i) => i.to_string(),
            other => panic!("{other:?}"),
        };
        validate.env(key.as_str().unwrap(), value);
    }
    assert_eq!(env[&Yaml::String("MLTAP_ANODOT_URL".into())].as_str(), Some(""));
    let output = validate.output().unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));

    // Every file the services mount exists.
    for (name, service) in services {
        for volume in service["volumes"].as_vec().into_iter().flatten() {
            let source = volume.as_str().unwrap().split(':').next().unwrap();
            if source.starts_with("./") && source != "./models" {
                let path = repo("deploy").join(source);
                assert!(path.exists(), "{} mounts {} which is not there", name.as_str().unwrap(), path.display());
            }
        }
    }
}

/// Every `.Values.a.b` path a template reads.
fn values_paths(template: &str) -> Vec<Vec<String>> {
    let mut paths = Vec::new();
    for (i, _) in template.match_indices(".Values.") {
        let path: String = template[i + ".Values.".len()..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '.' || *c == '_')
            .collect();
        paths.push(path.trim_end_matches('.').split('.').map(str::to_string).collect());
    }
    paths
}

#[test]
fn the_helm_chart_templates_are_balanced_and_read_only_documented_values() {
    let chart = yaml("deploy/helm/mltap/Chart.yaml");
    assert_eq!(chart["apiVersion"].as_str(), Some("v2"));
    assert_eq!(chart["name"].as_str(), Some("mltap"));
    assert_eq!(chart["appVersion"].as_str(), Some(env!("CARGO_PKG_VERSION")));
    let values = yaml("deploy/helm/mltap/values.yaml");
    let values_text = read("deploy/helm/mltap/values.yaml");
    assert_eq!(values["mode"].as_str(), Some("sidecar"));
    let default_admin = mltap::config::Config::load(&mltap::cli::ServeArgs::default()).unwrap().admin_listen.port();
    assert_eq!(values["ports"]["admin"].as_i64(), Some(i64::from(default_admin)));

    // Every top-level key is documented by a comment above it.
    let lines: Vec<&str> = values_text.lines().collect();
    for (i, line) in lines.iter().enumerate() {
        let top_level = line.chars().next().is_some_and(|c| c.is_ascii_alphabetic()) && line.contains(':');
        if top_level && !matches!(*line, "podAnnotations: {}" | "nodeSelector: {}" | "tolerations: []" | "affinity: {}")
        {
            let documented =
                (0..i).rev().map(|j| lines[j]).take_while(|l| !l.trim().is_empty()).any(|l| l.starts_with('#'));
            assert!(documented, "values.yaml: `{line}` has no comment");
        }
    }

    let templates = repo("deploy/helm/mltap/templates");
    let mut kinds = Vec::new();
    for entry in std::fs::read_dir(&templates).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap().to_string();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.matches("{{").count(), text.matches("}}").count(), "{name}: unbalanced actions");
        // Block actions and their ends pair up.
        let mut depth = 0i32;
        for action in text.split("{{").skip(1) {
            let action = action.split("}}").next().unwrap().trim_start_matches('-').trim();
            let keyword = action.split_whitespace().next().unwrap_or_default();
            match keyword {
                "if" | "range" | "with" | "define" => depth += 1,
                "end" => depth -= 1,
                _ => {}
            }
            assert!(depth >= 0, "{name}: `end` without a block");
        }
        assert_eq!(depth, 0, "{name}: a block is not closed");
        for path in values_paths(&text) {
            let mut node = &values;
            for key in &path {
                node = &node[key.as_str()];
            }
            assert!(!node.is_badvalue(), "{name} reads .Values.{} which values.yaml does not declare", path.join("."));
        }
        if let Some(kind) = text.lines().find_map(|l| l.strip_prefix("kind: ")) {
            kinds.push(kind.to_string());
        }
    }
    kinds.sort();
    for kind in ["ConfigMap", "Deployment", "NetworkPolicy", "PrometheusRule", "Service", "ServiceMonitor"] {
        assert!(kinds.iter().any(|k| k == kind), "the chart has no {kind}: {kinds:?}");
    }
    let deployment = read("deploy/helm/mltap/templates/deployment.yaml");
    assert!(deployment.contains(r#"{{- if eq .Values.mode "sidecar" }}"#), "sidecar and standalone modes");

    // The files the chart embeds are the shipped rules and dashboard.
    for (embedded, shipped) in
        [("mltap.rules.yml", "deploy/prometheus/mltap.rules.yml"), ("mltap.json", "deploy/grafana/mltap.json")]
    {
        assert_eq!(read(&format!("deploy/helm/mltap/files/{embedded}")), read(shipped), "{embedded}");
    }
}
