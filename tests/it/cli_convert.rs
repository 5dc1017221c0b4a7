//! `convert` as a user runs it: files, folders and standard input of `kubectl get -o` output in,
//! a List of Calico objects on stdout, dropped rules on stderr, and the exit code that says which.
//! No cluster needed.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_calico-kube-controllers");

fn scratch(label: &str) -> PathBuf {
    crate::support::scratch_dir(&format!("convert-{label}"))
}

/// Runs `convert ARGS` with `stdin`; returns (exit code, stdout, stderr).
fn convert(args: &[&str], stdin: &[u8]) -> (i32, String, String) {
    let mut child = Command::new(BIN)
        .arg("convert")
        .args(args)
        .env("KUBECONFIG", "/nonexistent/kubeconfig")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running the binary");
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    let out = child.wait_with_output().unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

fn items(stdout: &str) -> Vec<Value> {
    let list: Value = serde_json::from_str(stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"));
    assert_eq!((list["apiVersion"].as_str(), list["kind"].as_str()), (Some("v1"), Some("List")), "{list}");
    list["items"].as_array().unwrap().clone()
}

fn find<'a>(items: &'a [Value], kind: &str, name: &str) -> &'a Value {
    items.iter().find(|i| i["kind"] == kind && i["metadata"]["name"] == name).unwrap_or_else(|| panic!("no {kind} {name} in {items:?}"))
}

fn allow_frontend() -> Value {
    json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": {"name": "allow-fe", "namespace": "web"},
        "spec": {"podSelector": {"matchLabels": {"app": "web"}}, "policyTypes": ["Ingress"],
                 "ingress": [{"from": [{"podSelector": {"matchLabels": {"role": "fe"}}}], "ports": [{"protocol": "TCP", "port": 80}]}]}})
}

#[test]
fn a_folder_of_kubectl_output_becomes_the_calico_objects_the_controllers_write() {
    let dir = scratch("folder");
    std::fs::create_dir_all(dir.join("more")).unwrap();
    let namespaces = json!({"apiVersion": "v1", "kind": "NamespaceList", "items": [{"metadata": {"name": "web", "labels": {"team": "a"}}}]});
    std::fs::write(dir.join("namespaces.json"), namespaces.to_string()).unwrap();
    let rest = json!({"apiVersion": "v1", "kind": "List", "items": [
        allow_frontend(),
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "api", "namespace": "web", "labels": {"tier": "be"}}},
        {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web-0", "namespace": "web", "labels": {"app": "web"}},
         "spec": {"nodeName": "node-1", "serviceAccountName": "api", "containers": [{"name": "c", "image": "i"}]},
         "status": {"podIP": "10.0.0.5"}},
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x", "namespace": "web"}},
    ]});
    std::fs::write(dir.join("more/rest.yaml"), serde_saphyr::to_string(&rest).unwrap()).unwrap();

    let (code, stdout, stderr) = convert(&["-f", dir.to_str().unwrap(), "-o", "json"], b"");
    assert_eq!(code, 0, "{stderr}");
    let items = items(&stdout);
    assert_eq!(items.len(), 4, "{items:?}");
    for item in &items {
        assert_eq!(item["apiVersion"], "projectcalico.org/v3", "{item}");
    }
    let np = find(&items, "NetworkPolicy", "knp.default.allow-fe");
    assert_eq!(np["metadata"]["namespace"], "web");
    assert_eq!(np["spec"]["order"], 1000);
    assert_eq!(np["spec"]["selector"], "projectcalico.org/orchestrator == 'k8s' && app == 'web'");
    assert_eq!(np["spec"]["types"], json!(["Ingress"]));
    let rule = &np["spec"]["ingress"][0];
    assert_eq!((&rule["action"], &rule["protocol"]), (&json!("Allow"), &json!("TCP")), "{np}");
    assert_eq!(rule["source"]["selector"], "projectcalico.org/orchestrator == 'k8s' && role == 'fe'");
    assert_eq!(rule["destination"]["ports"], json!([80]));

    let ns = find(&items, "Profile", "kns.web");
    assert_eq!(ns["spec"]["labelsToApply"], json!({"pcns.team": "a", "pcns.projectcalico.org/name": "web"}));
    let sa = find(&items, "Profile", "ksa.web.api");
    assert_eq!(sa["spec"]["labelsToApply"], json!({"pcsa.tier": "be", "pcsa.projectcalico.org/name": "api"}));
    let wep = find(&items, "WorkloadEndpoint", "node--1-k8s-web--0-eth0");
    assert_eq!(wep["metadata"]["namespace"], "web");
    assert_eq!(wep["metadata"]["labels"]["app"], "web");
    assert_eq!(wep["metadata"]["labels"]["projectcalico.org/namespace"], "web");
    assert_eq!(wep["metadata"]["labels"]["projectcalico.org/orchestrator"], "k8s");
    assert_eq!(wep["metadata"]["labels"]["projectcalico.org/serviceaccount"], "api");
    assert_eq!(wep["spec"]["serviceAccountName"], "api");
    assert!(stderr.contains("ConfigMap x1"), "what was not converted is said: {stderr}");

    // YAML by default, the same objects.
    let (code, yaml, _) = convert(&["-f", dir.to_str().unwrap()], b"");
    assert_eq!(code, 0);
    let from_yaml: Value = serde_saphyr::from_str(&yaml).unwrap();
    assert_eq!(from_yaml["items"].as_array().unwrap(), &items);
}

#[test]
fn a_rule_that_cannot_be_converted_is_dropped_alone_reported_and_exits_one() {
    let mut np = allow_frontend();
    np["metadata"]["name"] = json!("mixed");
    // The second rule has a port range that ends before it starts.
    np["spec"]["ingress"].as_array_mut().unwrap().push(json!({"ports": [{"protocol": "TCP", "port": 9000, "endPort": 8000}]}));
    let (code, stdout, stderr) = convert(&["-f", "-", "-o", "json"], np.to_string().as_bytes());
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("web/mixed") && stderr.contains("ingress rule 1"), "{stderr}");
    let written_items = items(&stdout);
    let written = find(&written_items, "NetworkPolicy", "knp.default.mixed");
    assert_eq!(written["spec"]["ingress"].as_array().unwrap().len(), 1, "the good rule stays, the bad one is gone: {written}");
    assert_eq!(written["spec"]["types"], json!(["Ingress"]));

    // Upstream's behaviour, asked for by name: the whole policy is skipped.
    let (code, stdout, stderr) = convert(&["-f", "-", "-o", "json", "--bad-rules", "upstream"], np.to_string().as_bytes());
    assert_eq!(code, 1, "{stderr}");
    assert!(items(&stdout).is_empty());
    assert!(stderr.contains("web/mixed"), "{stderr}");
}

#[test]
fn unreadable_input_exits_two_and_says_where() {
    let dir = scratch("bad");
    std::fs::write(dir.join("broken.json"), "{\"kind\": \"List\", \"items\": [").unwrap();
    let (code, _, stderr) = convert(&["-f", dir.join("broken.json").to_str().unwrap()], b"");
    assert_eq!(code, 2);
    assert!(stderr.contains("broken.json"), "{stderr}");
    let (code, _, stderr) = convert(&["-f", dir.join("missing.yaml").to_str().unwrap()], b"");
    assert_eq!(code, 2);
    assert!(stderr.contains("no such file"), "{stderr}");
    // A namespace without a name is named as unreadable; the rest still converts.
    let input = json!({"kind": "List", "items": [{"apiVersion": "v1", "kind": "Namespace", "metadata": {}}, {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "ok"}}]});
    let (code, stdout, stderr) = convert(&["-f", "-", "-o", "json"], input.to_string().as_bytes());
    assert_eq!(code, 2, "{stderr}");
    assert_eq!(items(&stdout).len(), 1);
    assert!(stderr.contains("Namespace"), "{stderr}");
}
