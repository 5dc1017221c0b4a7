//! deploy/ proven with the real tools on the real API server: every kustomize overlay and the
//! Helm chart under several value sets render (`kubectl kustomize`, `helm template`) and are
//! accepted by the API server (server-side dry run, with the prometheus-operator CRDs so
//! ServiceMonitor and PrometheusRule are validated too); `helm lint` is clean; the generated
//! kustomize copies agree with the chart; the alert rules parse and every alert fires and stays
//! quiet as its `promtool test rules` cases say; the dashboard's queries parse; every metric the
//! rules and the dashboard name is one a running controller exports; and the chart's roles are
//! sufficient (no 403 across the controller and the live leak-scan on both datastores) and
//! minimal (every granted pair used by those runs, or listed in deploy/README.md).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::api::{Api, DeleteParams};
use serde_json::{Value, json};

use calico_kube_controllers::config::EnvConfig;
use calico_kube_controllers::datastore::etcd::EtcdDatastore;
use calico_kube_controllers::datastore::{Datastore, Kind};

use crate::support::audit;
use crate::support::cluster::{TestCluster, private_cluster, shared_cluster};
use crate::support::controller::{NODE, free_port, http_get, setup, start_controller_with, wait_for};
use crate::support::ipam::{Alloc, affinity_object, block_object, handle_object, pod_attrs};

const REPO: &str = env!("CARGO_MANIFEST_DIR");
const CHART: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/helm/calico-kube-controllers");
/// The test cluster's version: helm renders for it.
const KUBE_VERSION: &str = "1.37.2";

fn tool(cluster: &TestCluster, name: &str) -> PathBuf {
    cluster.bin_dir().expect("a harness cluster").join(name)
}

fn tmp_dir(label: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("chart-{label}-{}-{}", std::process::id(), crate::support::cluster::unique_number()));
    std::fs::create_dir_all(&dir).expect("a temporary folder");
    dir
}

/// Runs `command` (stdin from `input`), failing the test with its output unless it succeeds.
fn run(command: &mut Command, input: Option<&str>, what: &str) -> String {
    command.stdin(if input.is_some() { Stdio::piped() } else { Stdio::null() }).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = command.spawn().unwrap_or_else(|e| panic!("{what}: starting: {e}"));
    if let Some(text) = input {
        use std::io::Write;
        child.stdin.take().expect("stdin").write_all(text.as_bytes()).expect("writing stdin");
    }
    let out = child.wait_with_output().expect("waiting");
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned());
    assert!(out.status.success(), "{what} failed ({}):\n{stderr}\n{stdout}", out.status);
    stdout
}

fn helm_template(cluster: &TestCluster, sets: &[&str]) -> String {
    let mut c = Command::new(tool(cluster, "helm"));
    c.args(["template", "calico-kube-controllers", CHART, "--namespace", "kube-system", "--kube-version", KUBE_VERSION]);
    for s in sets {
        c.args(["--set", s]);
    }
    run(&mut c, None, &format!("helm template {sets:?}"))
}

fn kustomize(cluster: &TestCluster, dir: &str) -> String {
    run(Command::new(tool(cluster, "kubectl")).args(["kustomize", &format!("{REPO}/{dir}")]), None, &format!("kubectl kustomize {dir}"))
}

/// The YAML stream's objects (empty documents dropped).
fn objects(yaml: &str) -> Vec<Value> {
    let docs: Vec<Value> = serde_saphyr::from_multiple(yaml).unwrap_or_else(|e| panic!("rendered YAML does not parse: {e}\n{yaml}"));
    docs.into_iter().filter(|d| d.is_object()).collect()
}

fn find<'a>(objs: &'a [Value], kind: &str, name: &str) -> Option<&'a Value> {
    objs.iter().find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
}

fn kubectl(cluster: &TestCluster, args: &[&str], input: Option<&str>, what: &str) -> String {
    let mut c = Command::new(tool(cluster, "kubectl"));
    c.arg("--kubeconfig").arg(&cluster.kubeconfig).args(args);
    run(&mut c, input, what)
}

/// The API server accepts every object (admission, schema, the CRDs' validation), writing nothing.
fn accepted(cluster: &TestCluster, yaml: &str, what: &str) {
    let out = kubectl(
        cluster,
        &["apply", "--server-side", "--force-conflicts", "--dry-run=server", "-o", "name", "-f", "-"],
        Some(yaml),
        &format!("applying {what}"),
    );
    let applied = out.lines().count();
    assert_eq!(applied, objects(yaml).len(), "{what}: every object applied: {out}");
}

/// ServiceMonitor and PrometheusRule from the prometheus-operator module (linked by the harness).
fn install_monitoring_crds(cluster: &TestCluster) {
    // A symlinked folder: kubectl would read the link as a file, so name the files.
    let dir = cluster.dir.as_ref().expect("a harness cluster").join("monitoring-crds");
    let files: Vec<String> = ["servicemonitors", "prometheusrules"].iter().map(|k| dir.join(format!("monitoring.coreos.com_{k}.yaml")).display().to_string()).collect();
    kubectl(cluster, &["apply", "--server-side", "-f", &files[0], "-f", &files[1]], None, "installing the prometheus-operator CRDs");
    kubectl(
        cluster,
        &[
            "wait",
            "--for",
            "condition=Established",
            "--timeout",
            "60s",
            "crd/servicemonitors.monitoring.coreos.com",
            "crd/prometheusrules.monitoring.coreos.com",
        ],
        None,
        "waiting for the prometheus-operator CRDs",
    );
}

fn env_value(container: &Value, name: &str) -> Option<String> {
    container["env"].as_array()?.iter().find(|e| e["name"] == name).and_then(|e| e["value"].as_str()).map(str::to_string)
}

/// Value sets the chart is proven with, each with a check of what it must have rendered.
type Check = fn(&[Value]);
const VALUE_SETS: &[(&str, &[&str], Check)] = &[
    ("defaults", &[], |o| {
        let d = find(o, "Deployment", "calico-kube-controllers").expect("the Deployment");
        assert_eq!(d["spec"]["replicas"], 2);
        let c = &d["spec"]["template"]["spec"]["containers"][0];
        assert_eq!(env_value(c, "DATASTORE_TYPE").as_deref(), Some("kubernetes"));
        assert_eq!(env_value(c, "ENABLED_CONTROLLERS").as_deref(), Some("node,loadbalancer"));
        assert_eq!(c["securityContext"]["runAsUser"], 999);
        assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
        assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/liveness");
        assert_eq!(d["spec"]["template"]["spec"]["priorityClassName"], "system-cluster-critical");
        assert!(find(o, "PodDisruptionBudget", "calico-kube-controllers").is_some());
        assert!(find(o, "Role", "calico-kube-controllers-leader-election").is_some());
        assert!(find(o, "CronJob", "calico-kube-controllers-leak-scan").is_none(), "the CronJob is opt-in");
    }),
    ("etcd", &["datastore=etcdv3"], |o| {
        let d = find(o, "Deployment", "calico-kube-controllers").expect("the Deployment");
        let spec = &d["spec"]["template"]["spec"];
        let c = &spec["containers"][0];
        assert_eq!(env_value(c, "DATASTORE_TYPE").as_deref(), Some("etcdv3"));
        assert_eq!(env_value(c, "ENABLED_CONTROLLERS").as_deref(), Some("policy,namespace,serviceaccount,workloadendpoint,node,loadbalancer"));
        let endpoints = c["env"].as_array().unwrap().iter().find(|e| e["name"] == "ETCD_ENDPOINTS").expect("ETCD_ENDPOINTS");
        assert_eq!(endpoints["valueFrom"]["configMapKeyRef"], json!({"name": "calico-config", "key": "etcd_endpoints"}));
        let vol = spec["volumes"].as_array().unwrap().iter().find(|v| v["name"] == "etcd-certs").expect("the etcd secret volume");
        assert_eq!(vol["secret"], json!({"secretName": "calico-etcd-secrets", "defaultMode": 0o440}));
        let role = find(o, "ClusterRole", "calico-kube-controllers").expect("the ClusterRole");
        assert!(!role.to_string().contains("crd.projectcalico.org"), "no Calico CRDs on etcd: {role}");
    }),
    (
        "tls and exec probes",
        &[
            "metrics.tls.enabled=true",
            "metrics.tls.secretName=calico-kube-controllers-metrics-tls",
            "metrics.tls.clientCommonName=calico-node-prometheus-client-tls",
            "probes.type=exec",
            "monitoring.serviceMonitor.enabled=true",
            "monitoring.serviceMonitor.tlsConfig.serverName=calico-kube-controllers-metrics",
        ],
        |o| {
            let d = find(o, "Deployment", "calico-kube-controllers").expect("the Deployment");
            let c = &d["spec"]["template"]["spec"]["containers"][0];
            assert_eq!(env_value(c, "TLS_CRT_PATH").as_deref(), Some("/metrics-tls/tls.crt"));
            assert_eq!(env_value(c, "TLS_KEY_PATH").as_deref(), Some("/metrics-tls/tls.key"));
            assert_eq!(env_value(c, "CLIENT_COMMON_NAME").as_deref(), Some("calico-node-prometheus-client-tls"));
            assert_eq!(env_value(c, "CA_CRT_PATH").as_deref(), Some("/metrics-tls/ca.crt"));
            assert_eq!(c["readinessProbe"]["exec"]["command"], json!(["/usr/bin/check-status", "-r"]));
            assert_eq!(c["livenessProbe"]["exec"]["command"], json!(["/usr/bin/check-status", "-l"]));
            let sm = find(o, "ServiceMonitor", "calico-kube-controllers").expect("the ServiceMonitor");
            assert_eq!(sm["spec"]["endpoints"][0]["scheme"], "https");
        },
    ),
    (
        "leak-scan to a ConfigMap, monitoring",
        &["leakScan.enabled=true", "monitoring.serviceMonitor.enabled=true", "monitoring.prometheusRule.enabled=true"],
        |o| {
            let job = find(o, "CronJob", "calico-kube-controllers-leak-scan").expect("the CronJob");
            let c = &job["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0];
            let args: Vec<&str> = c["args"].as_array().unwrap().iter().filter_map(Value::as_str).collect();
            assert!(args.contains(&"--report-configmap=kube-system/calico-ipam-leak-report") && args.contains(&"--leaks-exit-code=0"), "{args:?}");
            assert!(find(o, "Role", "calico-kube-controllers-leak-report").is_some());
            assert!(find(o, "PersistentVolumeClaim", "calico-kube-controllers-leak-report").is_none());
            assert!(find(o, "PrometheusRule", "calico-kube-controllers").is_some());
        },
    ),
    ("leak-scan to a PVC on etcd", &["datastore=etcdv3", "leakScan.enabled=true", "leakScan.storage=pvc", "gc.leakGracePeriodSeconds=600"], |o| {
        let job = find(o, "CronJob", "calico-kube-controllers-leak-scan").expect("the CronJob");
        let spec = &job["spec"]["jobTemplate"]["spec"]["template"]["spec"];
        assert_eq!(spec["volumes"][0]["persistentVolumeClaim"]["claimName"], "calico-kube-controllers-leak-report");
        assert_eq!(env_value(&spec["containers"][0], "DATASTORE_TYPE").as_deref(), Some("etcdv3"));
        assert!(find(o, "PersistentVolumeClaim", "calico-kube-controllers-leak-report").is_some());
        assert!(find(o, "Role", "calico-kube-controllers-leak-report").is_none(), "no ConfigMap write with a PVC");
        let d = find(o, "Deployment", "calico-kube-controllers").expect("the Deployment");
        let args = d["spec"]["template"]["spec"]["containers"][0]["args"].to_string();
        assert!(args.contains("--leak-grace-period=600s"), "{args}");
    }),
    (
        "dry run beside upstream",
        &[
            "name=calico-kube-controllers-dryrun",
            "gc.dryRun=true",
            "monitoring.prometheusRule.enabled=true",
            "image.digest=sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
        ],
        |o| {
            let d = find(o, "Deployment", "calico-kube-controllers-dryrun").expect("the Deployment under its own name");
            assert_eq!(d["spec"]["selector"]["matchLabels"]["k8s-app"], "calico-kube-controllers-dryrun");
            let c = &d["spec"]["template"]["spec"]["containers"][0];
            assert!(c["args"].as_array().unwrap().contains(&json!("--dry-run")));
            assert!(c["image"].as_str().unwrap().contains("@sha256:"), "pulled by digest");
            assert!(
                o.iter().all(|x| x["metadata"]["name"].as_str().is_some_and(|n| n.starts_with("calico-kube-controllers-dryrun"))),
                "no object of upstream's name"
            );
            assert!(find(o, "Role", "calico-kube-controllers-dryrun-leader-election").is_none(), "a dry run holds no Lease");
            let rules = find(o, "PrometheusRule", "calico-kube-controllers-dryrun").expect("the rules").to_string();
            assert!(!rules.contains("CalicoKubeControllersNoLeader"), "no leader alert for a dry run");
            assert!(rules.contains(r#"job=\"calico-kube-controllers-dryrun\""#), "its own job: {rules}");
        },
    ),
];

const OVERLAYS: &[&str] = &[
    "deploy/base",
    "deploy/overlays/kdd",
    "deploy/overlays/etcd",
    "deploy/overlays/exec-probes",
    "deploy/monitoring",
    "deploy/leak-scan/configmap",
    "deploy/leak-scan/pvc",
];

#[tokio::test]
async fn every_overlay_and_chart_value_set_renders_lints_clean_and_is_accepted_by_the_api_server() {
    let cluster = private_cluster();
    install_monitoring_crds(&cluster);
    for dir in OVERLAYS {
        let yaml = kustomize(&cluster, dir);
        assert!(!objects(&yaml).is_empty(), "{dir} renders objects");
        accepted(&cluster, &yaml, dir);
    }
    let exec = objects(&kustomize(&cluster, "deploy/overlays/exec-probes"));
    let probe = &find(&exec, "Deployment", "calico-kube-controllers").unwrap()["spec"]["template"]["spec"]["containers"][0]["readinessProbe"];
    assert_eq!(probe["exec"]["command"], json!(["/usr/bin/check-status", "-r"]), "{probe}");

    for (label, sets, check) in VALUE_SETS {
        let yaml = helm_template(&cluster, sets);
        check(&objects(&yaml));
        accepted(&cluster, &yaml, &format!("the chart with {label}"));
        let mut lint = Command::new(tool(&cluster, "helm"));
        lint.args(["lint", "--strict", CHART, "--namespace", "kube-system", "--kube-version", KUBE_VERSION]);
        for s in *sets {
            lint.args(["--set", s]);
        }
        let out = run(&mut lint, None, &format!("helm lint --strict with {label}"));
        assert!(!out.contains("[WARNING]") && !out.contains("[ERROR]"), "helm lint with {label}: {out}");
    }
    // Wrong values are refused with a message, not rendered into something broken.
    let mut bad = Command::new(tool(&cluster, "helm"));
    bad.args(["template", "x", CHART, "--set", "datastore=etcd"]).stdout(Stdio::null()).stderr(Stdio::piped());
    let out = bad.output().expect("helm");
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("datastore must be kubernetes or etcdv3"), "{out:?}");

    // The overlays' roles are the chart's: one set of rules per datastore.
    let rules = |yaml: &str| find(&objects(yaml), "ClusterRole", "calico-kube-controllers").expect("the ClusterRole")["rules"].clone();
    assert_eq!(
        rules(&kustomize(&cluster, "deploy/overlays/kdd")),
        rules(&helm_template(&cluster, &[])),
        "deploy/base/rbac.yaml and the chart's kubernetes rules differ"
    );
    assert_eq!(
        rules(&kustomize(&cluster, "deploy/overlays/etcd")),
        rules(&helm_template(&cluster, &["datastore=etcdv3"])),
        "overlays/etcd and the chart's etcdv3 rules differ"
    );

    // The generated kustomize copies are the chart's current output.
    let out = tmp_dir("render");
    let path = format!("{}:{}", cluster.bin_dir().unwrap().display(), std::env::var("PATH").unwrap_or_default());
    run(Command::new(format!("{REPO}/deploy/render-from-chart.sh")).arg(&out).env("PATH", path), None, "deploy/render-from-chart.sh");
    for file in ["monitoring/prometheusrule.yaml", "leak-scan/configmap/leak-scan.yaml", "leak-scan/pvc/leak-scan.yaml"] {
        let fresh = std::fs::read_to_string(out.join(file)).expect("rendered");
        let committed = std::fs::read_to_string(format!("{REPO}/deploy/{file}")).expect("committed");
        assert!(fresh == committed, "deploy/{file} is stale: run deploy/render-from-chart.sh");
    }
}

/// The groups of the chart's PrometheusRule, as a Prometheus rule file (JSON is YAML).
fn rule_file(cluster: &TestCluster, sets: &[&str]) -> Value {
    let mut all = vec!["monitoring.prometheusRule.enabled=true"];
    all.extend_from_slice(sets);
    let objs = objects(&helm_template(cluster, &all));
    let rule = find(&objs, "PrometheusRule", "calico-kube-controllers").expect("the PrometheusRule");
    json!({"groups": rule["spec"]["groups"]})
}

fn alerts(rules: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for g in rules["groups"].as_array().expect("groups") {
        for r in g["rules"].as_array().expect("rules") {
            out.push((r["alert"].as_str().expect("alert rules only").to_string(), r["expr"].as_str().expect("expr").to_string()));
        }
    }
    out
}

#[test]
fn alert_rules_parse_and_every_alert_fires_and_stays_quiet_as_its_cases_say() {
    let cluster = shared_cluster();
    let promtool = tool(cluster, "promtool");
    let dir = tmp_dir("rules");
    let rules = rule_file(cluster, &[]);
    std::fs::write(dir.join("rules.yaml"), serde_json::to_vec_pretty(&rules).unwrap()).unwrap();
    let cases = std::fs::read_to_string(format!("{REPO}/deploy/monitoring/alerts.promtool-test.yaml")).expect("the test cases");
    std::fs::write(dir.join("alerts.test.yaml"), &cases).unwrap();
    run(Command::new(&promtool).args(["check", "rules"]).arg(dir.join("rules.yaml")), None, "promtool check rules");
    let out = run(Command::new(&promtool).args(["test", "rules"]).arg(dir.join("alerts.test.yaml")), None, "promtool test rules");
    assert!(out.contains("SUCCESS"), "{out}");

    let readme = std::fs::read_to_string(format!("{REPO}/deploy/README.md")).unwrap();
    let names = alerts(&rules);
    assert_eq!(names.len(), 6, "{names:?}");
    for (alert, _) in &names {
        // Each alert has a case that fires it and one where it stays quiet, and a runbook.
        let evals: Vec<&str> = cases.split("- eval_time:").skip(1).filter(|e| e.contains(&format!("alertname: {alert}\n"))).collect();
        assert!(evals.iter().any(|e| e.contains("exp_labels")), "no case fires {alert}");
        assert!(evals.iter().any(|e| e.contains("exp_alerts: []")), "no case keeps {alert} quiet");
        assert!(readme.contains(&format!("### {alert}\n")), "deploy/README.md has no runbook for {alert}");
    }
    // The threshold follows the grace period the chart is given: three passes of grace/2.
    let short = rule_file(cluster, &["gc.leakGracePeriodSeconds=600"]);
    let pass = alerts(&short).into_iter().find(|(a, _)| a == "CalicoIPAMGCNoSuccessfulPass").unwrap().1;
    assert!(pass.trim_end().ends_with("> 900"), "{pass}");
}

/// The dashboard's queries with its variables substituted as Grafana would for this job.
fn dashboard_queries() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(format!("{REPO}/deploy/grafana/calico-kube-controllers.json")).expect("the dashboard");
    let dash: Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    let mut out = Vec::new();
    for p in dash["panels"].as_array().expect("panels") {
        for t in p["targets"].as_array().expect("targets") {
            let expr = t["expr"].as_str().expect("expr");
            let expr = expr.replace("$job", "calico-kube-controllers").replace("$ippool", ".*").replace("$__rate_interval", "2m");
            assert!(!expr.contains('$'), "an unknown variable in {expr}");
            out.push((format!("{} / {}", p["title"].as_str().unwrap(), t["refId"].as_str().unwrap()), expr));
        }
    }
    out
}

/// PromQL's aggregation operators, which may stand before `by (…)` instead of their `(`.
const AGGREGATIONS: &[&str] =
    &["sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values", "bottomk", "topk", "quantile", "limitk", "limit_ratio"];

/// Metric names in a PromQL expression: identifiers that are not functions, keywords, label
/// names (inside `{…}`, `by (…)`, `on(…)`) or durations.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes: Vec<char> = expr.chars().collect();
    let mut i = 0;
    let mut depth_braces = 0;
    let mut in_string = false;
    let mut label_list = false;
    while i < bytes.len() {
        let c = bytes[i];
        if in_string {
            if c == '\\' {
                i += 1;
            } else if c == '"' {
                in_string = false;
            }
            i += 1;
            continue;
        }
        match c {
            '"' => in_string = true,
            '{' => depth_braces += 1,
            '}' => depth_braces -= 1,
            '[' => {
                while i < bytes.len() && bytes[i] != ']' {
                    i += 1;
                }
            }
            ')' => label_list = false,
            c if c.is_ascii_alphabetic() || c == '_' || c == ':' => {
                let start = i;
                while i + 1 < bytes.len() && (bytes[i + 1].is_ascii_alphanumeric() || bytes[i + 1] == '_' || bytes[i + 1] == ':') {
                    i += 1;
                }
                let word: String = bytes[start..=i].iter().collect();
                let mut j = i + 1;
                while j < bytes.len() && bytes[j] == ' ' {
                    j += 1;
                }
                let next = bytes.get(j).copied();
                let keyword = matches!(word.as_str(), "by" | "on" | "without" | "ignoring" | "group_left" | "group_right");
                if keyword {
                    label_list = next == Some('(');
                } else if depth_braces == 0
                    && !label_list
                    && next != Some('(')
                    && !matches!(word.as_str(), "and" | "or" | "unless" | "bool" | "offset")
                    && !AGGREGATIONS.contains(&word.as_str())
                {
                    names.insert(word);
                }
            }
            _ => {}
        }
        i += 1;
    }
    names
}

#[test]
fn metric_names_are_found_in_promql() {
    let names = metric_names(r#"sum by (ippool) (rate(a_total{job="x", l=~"y{2}"}[5m])) / on(ippool) max(b) and on() c > 0.9 or vector(0)"#);
    assert_eq!(names.into_iter().collect::<Vec<_>>(), ["a_total", "b", "c"]);
}

/// Every metric family `/metrics` declares (`# TYPE`), histograms with their series names.
fn exported_names(scrape: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in scrape.lines() {
        let Some(rest) = line.strip_prefix("# TYPE ") else { continue };
        let mut parts = rest.split_whitespace();
        let (Some(name), Some(kind)) = (parts.next(), parts.next()) else { continue };
        if kind == "histogram" {
            for suffix in ["_bucket", "_sum", "_count"] {
                names.insert(format!("{name}{suffix}"));
            }
        } else {
            names.insert(name.to_string());
        }
    }
    names
}

#[tokio::test]
async fn dashboard_queries_parse_and_rules_and_dashboard_name_only_metrics_a_running_controller_exports() {
    let cluster = private_cluster();
    let s = setup(&cluster).await;
    let port = free_port();
    let controller = start_controller_with(&cluster.kubeconfig, &[], &[("POD_NAMESPACE", "kube-system"), ("POD_NAME", "ckc-chart-0")], port, "chart-metrics");
    wait_for("the gone pod's IP freed", || async {
        let block = s.blocks.get(&s.block_name).await.ok()?;
        block.data["spec"]["allocations"][2].is_null().then_some(())
    })
    .await;
    let scrape = wait_for("a scrape with the leader's series", || async {
        http_get(port, "/metrics").await.filter(|(code, body)| *code == 200 && body.contains("kube_controllers_leader 1")).map(|(_, b)| b)
    })
    .await;
    drop(controller);
    let exported = exported_names(&scrape);

    // The dashboard's queries as recording rules: promtool parses each with the PromQL parser.
    let queries = dashboard_queries();
    assert!(queries.len() >= 14, "{queries:?}");
    let records: Vec<Value> = queries.iter().enumerate().map(|(i, (_, e))| json!({"record": format!("dashboard:query_{i}"), "expr": e})).collect();
    let dir = tmp_dir("dashboard");
    std::fs::write(dir.join("dashboard.yaml"), serde_json::to_vec_pretty(&json!({"groups": [{"name": "dashboard", "rules": records}]})).unwrap()).unwrap();
    run(
        Command::new(tool(&cluster, "promtool")).args(["check", "rules"]).arg(dir.join("dashboard.yaml")),
        None,
        "promtool check rules (the dashboard's queries)",
    );

    let mut used = BTreeSet::new();
    for (what, expr) in queries.iter().chain(alerts(&rule_file(&cluster, &[])).iter()) {
        let names = metric_names(expr);
        assert!(!names.is_empty(), "{what}: no metric in {expr}");
        for name in names {
            assert!(exported.contains(&name), "{what} uses {name}, which the controller does not export; it exports {exported:?}");
            used.insert(name);
        }
    }
    eprintln!("metrics used by the dashboard and the alerts: {used:?}");
}

// ---------------------------------------------------------------------------------------------
// The roles: sufficient and minimal.

/// `verb resource` pairs a rendered role grants (resourceNames narrow, never widen).
fn granted(objs: &[Value], kind: &str, name: &str) -> BTreeSet<String> {
    let role = find(objs, kind, name).unwrap_or_else(|| panic!("{kind} {name}"));
    let mut out = BTreeSet::new();
    for rule in role["rules"].as_array().expect("rules") {
        for r in rule["resources"].as_array().expect("resources") {
            for v in rule["verbs"].as_array().expect("verbs") {
                out.insert(format!("{} {}", v.as_str().unwrap(), r.as_str().unwrap()));
            }
        }
    }
    out
}

/// Pairs deploy/README.md lists, with the code needing them, as not exercised by the suites
/// here: the first column of the table under "## The roles, rule by rule", each pair in backticks.
fn listed_in_readme() -> BTreeSet<String> {
    let readme = std::fs::read_to_string(format!("{REPO}/deploy/README.md")).unwrap();
    let section = readme.split("## The roles, rule by rule").nth(1).expect("the roles section");
    let mut out = BTreeSet::new();
    for line in section.lines().filter(|l| l.starts_with("| `")) {
        let first = line.split('|').nth(1).unwrap_or_default();
        for pair in first.split('`').skip(1).step_by(2) {
            out.insert(pair.to_string());
        }
    }
    out
}

fn used_by(events: &[audit::AuditEvent], user: &str, since_ms: i64) -> BTreeSet<String> {
    events.iter().filter(|e| e.user == user && e.received_ms >= since_ms && !e.resource.is_empty()).map(|e| e.rbac_pair()).collect()
}

fn forbidden(events: &[audit::AuditEvent], user: &str) -> Vec<String> {
    events.iter().filter(|e| e.user == user && e.code == 403).map(|e| format!("{} {}/{}", e.rbac_pair(), e.namespace, e.name)).collect()
}

const CONTROLLER: &str = "system:serviceaccount:kube-system:calico-kube-controllers";
const SCANNER: &str = "system:serviceaccount:kube-system:calico-kube-controllers-leak-scan";

/// Runs `leak-scan` as the scan's ServiceAccount the way the CronJob does; returns its exit code.
fn leak_scan(kubeconfig: &Path, extra: &[&str], env: &[(&str, &str)]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_calico-kube-controllers"))
        .args(["leak-scan", "--output=json", "--leaks-exit-code=0"])
        .args(extra)
        .env("KUBECONFIG", kubeconfig)
        .env_remove("DATASTORE_TYPE")
        .envs(env.iter().copied())
        .output()
        .expect("running leak-scan");
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[tokio::test]
async fn the_charts_roles_are_sufficient_and_minimal_on_both_datastores_and_for_the_leak_scan() {
    let cluster = private_cluster();
    let listed = listed_in_readme();
    let mut unused_report = Vec::new();

    // --- Kubernetes datastore: the chart's objects applied for real, the controller and the
    // scheduled scan run with its ServiceAccounts.
    let kdd_yaml = helm_template(&cluster, &["leakScan.enabled=true"]);
    kubectl(&cluster, &["apply", "--server-side", "-f", "-"], Some(&kdd_yaml), "applying the chart (kubernetes)");
    let kdd = objects(&kdd_yaml);
    let controller_kc = tmp_dir("sa").join("controller");
    cluster.kubeconfig_for_service_account("kube-system", "calico-kube-controllers", &controller_kc).await;
    let scanner_kc = tmp_dir("sa").join("scanner");
    cluster.kubeconfig_for_service_account("kube-system", "calico-kube-controllers-leak-scan", &scanner_kc).await;

    let s = setup(&cluster).await;
    let kdd_from = audit::now_ms();
    // The scan first, while the gone pod's IP is still a leak: the report lands in the ConfigMap.
    let (code, stderr) = leak_scan(&scanner_kc, &["--report-configmap=kube-system/calico-ipam-leak-report"], &[]);
    assert_eq!(code, 0, "leaks found is a successful scheduled scan: {stderr}");
    let cms: Api<ConfigMap> = Api::namespaced(cluster.client(), "kube-system");
    let cm = cms.get("calico-ipam-leak-report").await.expect("the report ConfigMap");
    let report: Value = serde_json::from_str(cm.data.as_ref().and_then(|d| d.get("leaks.json")).expect("leaks.json")).expect("the report is JSON");
    assert!(report["leaks"].as_array().is_some_and(|l| l.iter().any(|x| x["ip"] == s.gone_ip && x["releasable"] == true)), "{report:#}");
    let annotations = cm.metadata.annotations.clone().unwrap_or_default();
    assert_eq!(annotations.get("projectcalico.org/releasable-leaks").map(String::as_str), Some("1"), "{annotations:?}");
    // A second run replaces it; the file form (the PVC's) is written atomically.
    let file = tmp_dir("report").join("leaks.json");
    let (code, stderr) = leak_scan(&scanner_kc, &["--report-configmap=kube-system/calico-ipam-leak-report", &format!("--report-file={}", file.display())], &[]);
    assert_eq!(code, 0, "{stderr}");
    let from_file: Value = serde_json::from_slice(&std::fs::read(&file).expect("the report file")).expect("JSON");
    let cm = cms.get("calico-ipam-leak-report").await.expect("the report ConfigMap");
    let again: Value = serde_json::from_str(cm.data.as_ref().and_then(|d| d.get("leaks.json")).expect("leaks.json")).expect("JSON");
    assert_eq!(from_file, again, "the file and the ConfigMap hold the same report");
    assert_eq!(again["leaks"].as_array().map(Vec::len), report["leaks"].as_array().map(Vec::len), "the second scan replaced the first");

    let port = free_port();
    let controller = start_controller_with(&controller_kc, &[], &[("POD_NAMESPACE", "kube-system"), ("POD_NAME", "ckc-chart-kdd")], port, "chart-kdd");
    wait_for("the gone pod's IP freed", || async {
        let block = s.blocks.get(&s.block_name).await.ok()?;
        block.data["spec"]["allocations"][2].is_null().then_some(())
    })
    .await;
    // A second release on the same node within the series window: the Event is patched.
    let ns = s.live_handle.strip_prefix("k8s-pod-network.live-").expect("fixture handle naming").to_string();
    let pods: Api<Pod> = Api::namespaced(cluster.client(), &ns);
    pods.delete("live", &DeleteParams::default().grace_period(0)).await.expect("deleting the live pod");
    wait_for("the deleted pod's IP freed", || async {
        let block = s.blocks.get(&s.block_name).await.ok()?;
        block.data["spec"]["allocations"][1].is_null().then_some(())
    })
    .await;
    drop(controller);
    let events = audit::read(cluster.dir.as_ref().unwrap());
    for user in [CONTROLLER, SCANNER] {
        let denied = forbidden(&events, user);
        assert!(denied.is_empty(), "the chart's role for {user} lacks rights the code used (kubernetes): {denied:#?}");
    }
    let kdd_used = used_by(&events, CONTROLLER, kdd_from);
    let scan_used = used_by(&events, SCANNER, kdd_from);
    eprintln!("kubernetes: the controller used {kdd_used:?}\nthe leak scan used {scan_used:?}");
    let mut controller_grants = granted(&kdd, "ClusterRole", "calico-kube-controllers");
    controller_grants.extend(granted(&kdd, "Role", "calico-kube-controllers-leader-election"));
    unused_report.extend(controller_grants.difference(&kdd_used).filter(|p| !listed.contains(*p)).map(|p| format!("kubernetes controller: {p}")));
    let mut scan_grants = granted(&kdd, "ClusterRole", "calico-kube-controllers-leak-scan");
    scan_grants.extend(granted(&kdd, "Role", "calico-kube-controllers-leak-report"));
    unused_report.extend(scan_grants.difference(&scan_used).filter(|p| !listed.contains(*p)).map(|p| format!("kubernetes leak scan: {p}")));
    assert!(
        scan_grants.iter().all(|p| p.starts_with("list ") || p == "patch configmaps"),
        "the scan's roles read only (and patch their report): {scan_grants:?}"
    );

    // --- etcd: the chart's etcdv3 roles replace the kubernetes ones; Calico's data in etcd.
    let etcd_yaml = helm_template(&cluster, &["datastore=etcdv3", "leakScan.enabled=true"]);
    kubectl(&cluster, &["apply", "--server-side", "--force-conflicts", "-f", "-"], Some(&etcd_yaml), "applying the chart (etcdv3)");
    let etcd = objects(&etcd_yaml);
    let ce = cluster.calico_etcd.clone().expect("the harness's Calico etcd");
    let (ca, cert, key) = (ce.ca_cert.display().to_string(), ce.client_cert.display().to_string(), ce.client_key.display().to_string());
    let env = [
        ("DATASTORE_TYPE", "etcdv3"),
        ("ETCD_ENDPOINTS", ce.endpoints.as_str()),
        ("ETCD_CA_CERT_FILE", ca.as_str()),
        ("ETCD_CERT_FILE", cert.as_str()),
        ("ETCD_KEY_FILE", key.as_str()),
    ];
    let etcd_fixture = EtcdLeak::plant(&env).await;
    let etcd_from = audit::now_ms();
    let (code, stderr) = leak_scan(&scanner_kc, &["--report-configmap=kube-system/calico-ipam-leak-report"], &env);
    assert_eq!(code, 0, "{stderr}");
    let port = free_port();
    let controller = start_controller_with(
        &controller_kc,
        &[],
        &[&[("POD_NAMESPACE", "kube-system"), ("POD_NAME", "ckc-chart-etcd")][..], &env[..]].concat(),
        port,
        "chart-etcd",
    );
    etcd_fixture.wait_freed().await;
    let ready = wait_for("readiness 200 on etcd", || async { http_get(port, "/readiness").await.filter(|r| r.0 == 200) }).await;
    assert_eq!(ready.0, 200, "{}", controller.log_text());
    drop(controller);
    let events = audit::read(cluster.dir.as_ref().unwrap());
    let etcd_events: Vec<_> = events.into_iter().filter(|e| e.received_ms >= etcd_from).collect();
    for user in [CONTROLLER, SCANNER] {
        let denied = forbidden(&etcd_events, user);
        assert!(denied.is_empty(), "the chart's etcdv3 role for {user} lacks rights the code used: {denied:#?}");
    }
    let etcd_used = used_by(&etcd_events, CONTROLLER, etcd_from);
    let etcd_scan_used = used_by(&etcd_events, SCANNER, etcd_from);
    eprintln!("etcd: the controller used {etcd_used:?}\nthe leak scan used {etcd_scan_used:?}");
    let mut controller_grants = granted(&etcd, "ClusterRole", "calico-kube-controllers");
    controller_grants.extend(granted(&etcd, "Role", "calico-kube-controllers-leader-election"));
    unused_report.extend(controller_grants.difference(&etcd_used).filter(|p| !listed.contains(*p)).map(|p| format!("etcdv3 controller: {p}")));
    let mut scan_grants = granted(&etcd, "ClusterRole", "calico-kube-controllers-leak-scan");
    scan_grants.extend(granted(&etcd, "Role", "calico-kube-controllers-leak-report"));
    unused_report.extend(scan_grants.difference(&etcd_scan_used).filter(|p| !listed.contains(*p)).map(|p| format!("etcdv3 leak scan: {p}")));

    assert!(
        unused_report.is_empty(),
        "granted but neither used by these runs nor listed in deploy/README.md (\"The roles, rule by rule\"): {unused_report:#?}"
    );
}

/// A gone pod's address on the live node `n1`, in the harness's Calico etcd.
struct EtcdLeak {
    ds: EtcdDatastore,
    block: String,
    handle: String,
}

impl EtcdLeak {
    const CIDR: &str = "10.67.0.0/26";

    async fn plant(env: &[(&str, &str)]) -> EtcdLeak {
        let vars = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let cfg = EnvConfig::from_env(&vars).expect("valid settings").etcd.expect("etcd settings");
        let ds = EtcdDatastore::connect(&cfg).await.expect("connects to Calico's etcd");
        let handle = "k8s-pod-network.gone-etcd".to_string();
        let block = block_object(Self::CIDR, Some(NODE), &[Alloc { ordinal: 3, handle: &handle, secondary: pod_attrs("no-such-namespace", "gone", NODE) }]);
        let name = block.metadata.name.clone().expect("named");
        let body = |o: kube::api::DynamicObject| serde_json::to_value(o).expect("JSON");
        ds.create(Kind::IpamBlock, &name, body(block)).await.expect("block in etcd");
        ds.create(Kind::IpamHandle, &handle, body(handle_object(&handle, Self::CIDR, 1))).await.expect("handle in etcd");
        let affinity = affinity_object(NODE, Self::CIDR);
        let affinity_name = affinity.metadata.name.clone().expect("named");
        ds.create(Kind::BlockAffinity, &affinity_name, body(affinity)).await.expect("affinity in etcd");
        // As calico-node writes it in an etcd-mode cluster: the Calico Node stands for the
        // Kubernetes Node (without one, the node counts as gone on etcd).
        let calico_node = serde_json::json!({"apiVersion": "projectcalico.org/v3", "kind": "Node", "metadata": {"name": NODE},
                                             "spec": {"orchRefs": [{"orchestrator": "k8s", "nodeName": NODE}]}});
        ds.create(Kind::CalicoNode, NODE, calico_node).await.expect("Calico Node in etcd");
        EtcdLeak { ds, block: name, handle }
    }

    async fn wait_freed(&self) {
        wait_for("the gone pod's IP and handle freed in etcd", || async {
            let block = self.ds.get(Kind::IpamBlock, &self.block).await.ok()?;
            let handle_gone = self.ds.get(Kind::IpamHandle, &self.handle).await.is_err_and(|e| e.is_not_found());
            (block.value["spec"]["allocations"][3].is_null() && handle_gone).then_some(())
        })
        .await;
    }
}

#[test]
fn leak_scan_refuses_a_report_configmap_that_is_not_namespace_slash_name() {
    for bad in ["calico-ipam-leak-report", "/x", "kube-system/", "a/b/c"] {
        let out = Command::new(env!("CARGO_BIN_EXE_calico-kube-controllers"))
            .args(["leak-scan", "--from-dump", "/nonexistent", "--report-configmap", bad])
            .output()
            .expect("running leak-scan");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{bad}: {stderr}");
        assert!(stderr.contains("expected NAMESPACE/NAME"), "{bad}: {stderr}");
    }
}
