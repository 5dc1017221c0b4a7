//! The Tigera operator's environment against the real API server: `KUBE_CONTROLLERS_CONFIG_NAME`
//! (the named KubeControllersConfiguration is read, created and given the status; `default` is
//! left alone), `DISABLE_KUBE_CONTROLLERS_CONFIG_API` (no request on the kind at all, per the
//! audit log, and the configuration comes from the environment alone), and metrics over TLS with
//! real certificates (`TLS_CRT_PATH`, `TLS_KEY_PATH`, `CA_CRT_PATH`, `CLIENT_COMMON_NAME`): plain
//! HTTP, no client certificate, a wrong common name and a foreign CA are refused, the named
//! client is served, and the health port stays plain HTTP.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use kube::api::{Api, DynamicObject, Patch, PatchParams, PostParams};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::audit;
use crate::support::cluster::{private_cluster, shared_cluster, unique_name};
use crate::support::controller::{
    ChildGuard, calico, free_port, http_get, start_controller_env, wait_for,
};

fn kccs(client: &kube::Client) -> Api<DynamicObject> {
    Api::all_with(
        client.clone(),
        &calico(
            "KubeControllersConfiguration",
            "kubecontrollersconfigurations",
        ),
    )
}

fn kcc_object(name: &str, mut spec: serde_json::Value) -> DynamicObject {
    // Calico's CRD requires `spec.controllers` (an empty one means "none configured").
    if spec.get("controllers").is_none() {
        spec["controllers"] = json!({});
    }
    serde_json::from_value(json!({
        "apiVersion": "crd.projectcalico.org/v1", "kind": "KubeControllersConfiguration",
        "metadata": {"name": name}, "spec": spec,
    }))
    .unwrap()
}

fn status_dir(label: &str) -> PathBuf {
    let dir =
        PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("{label}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

#[tokio::test]
async fn the_configuration_named_by_the_operator_is_read_created_and_given_the_status() {
    let cluster = private_cluster();
    let client = cluster.client();
    let kccs = kccs(&client);
    // `default` exists and says Error: a process configured by `tenant-a` must not heed it.
    let default = kccs
        .create(
            &PostParams::default(),
            &kcc_object("default", json!({"logSeverityScreen": "Error"})),
        )
        .await
        .expect("creating default");

    let (health_port, status_file) = (free_port(), status_dir("kcc-name").join("status.json"));
    let (hp, sf) = (
        health_port.to_string(),
        status_file.to_str().unwrap().to_string(),
    );
    let guard = start_controller_env(
        &cluster,
        &[
            "component",
            "kube-controllers",
            "--health-port",
            &hp,
            "--metrics-port",
            "0",
            "--status-file",
            &sf,
        ],
        &[
            ("KUBE_CONTROLLERS_CONFIG_NAME", "tenant-a"),
            ("DATASTORE_TYPE", "kubernetes"),
            ("ENABLED_CONTROLLERS", "node"),
            ("POD_NAME", "kcc-name"),
        ],
        "kcc-name",
    );
    let created = wait_for(
        "KubeControllersConfiguration tenant-a with a status",
        || async {
            kccs.get_opt("tenant-a")
                .await
                .ok()
                .flatten()
                .filter(|k| k.data.get("status").is_some_and(|s| !s.is_null()))
        },
    )
    .await;
    assert_eq!(
        created.data["spec"]["controllers"]["node"]["leakGracePeriod"], "15m",
        "created with upstream's defaults: {:?}",
        created.data
    );
    assert_eq!(
        created.data["status"]["runningConfig"]["logSeverityScreen"], "Info",
        "{:?}",
        created.data["status"]
    );
    wait_for("readiness", || async {
        (http_get(health_port, "/readiness").await?.0 == 200).then_some(())
    })
    .await;

    // A change to tenant-a applies live; default is never read into the config nor written.
    let patch = json!({"spec": {"logSeverityScreen": "Debug", "controllers": {"node": {"leakGracePeriod": "4s"}}}});
    kccs.patch("tenant-a", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("editing tenant-a");
    wait_for("tenant-a's edit in its running config", || async {
        let k = kccs.get("tenant-a").await.ok()?;
        let running = &k.data["status"]["runningConfig"];
        (running["logSeverityScreen"] == "Debug"
            && running["controllers"]["node"]["leakGracePeriod"] == "4s")
            .then_some(())
    })
    .await;
    let after = kccs.get("default").await.expect("default still there");
    assert_eq!(
        after.metadata.resource_version, default.metadata.resource_version,
        "default was written: {:?}",
        after.data
    );
    assert!(
        after.data.get("status").is_none_or(|s| s.is_null()),
        "default got a status: {:?}",
        after.data
    );
    assert!(
        guard
            .log_text()
            .contains("KubeControllersConfiguration tenant-a"),
        "start-up names the configuration it reads"
    );
}

#[tokio::test]
async fn with_the_configuration_api_disabled_no_configuration_object_is_read_or_written() {
    let cluster = private_cluster();
    let client = cluster.client();
    let kccs = kccs(&client);
    // What the API would say if it were read: a metrics port, a log level, another grace period.
    let unused_port = free_port();
    let spec = json!({"logSeverityScreen": "Debug", "prometheusMetricsPort": unused_port, "controllers": {"node": {"leakGracePeriod": "1s"}}});
    let default = kccs
        .create(&PostParams::default(), &kcc_object("default", spec))
        .await
        .expect("creating default");

    let (health_port, status_file) = (free_port(), status_dir("kcc-off").join("status.json"));
    let (hp, sf) = (
        health_port.to_string(),
        status_file.to_str().unwrap().to_string(),
    );
    let started_ms = audit::now_ms();
    let guard = start_controller_env(
        &cluster,
        &[
            "component",
            "kube-controllers",
            "--health-port",
            &hp,
            "--status-file",
            &sf,
        ],
        &[
            ("DISABLE_KUBE_CONTROLLERS_CONFIG_API", "true"),
            ("KUBE_CONTROLLERS_CONFIG_NAME", "default"),
            ("DATASTORE_TYPE", "kubernetes"),
            ("ENABLED_CONTROLLERS", "node"),
            ("POD_NAME", "kcc-off"),
        ],
        "kcc-off",
    );
    wait_for("readiness without the configuration object", || async {
        (http_get(health_port, "/readiness").await?.0 == 200).then_some(())
    })
    .await;
    // The leader's start-of-day writes are done once ClusterInformation exists; give the writer
    // a moment beyond that, then read the audit log.
    let infos: Api<DynamicObject> = Api::all_with(
        client.clone(),
        &calico("ClusterInformation", "clusterinformations"),
    );
    wait_for("ClusterInformation default", || async {
        infos.get_opt("default").await.ok().flatten()
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;

    let dir = cluster.dir.as_deref().expect("a harness cluster");
    let ours: Vec<_> = audit::read(dir)
        .into_iter()
        .filter(|e| e.received_ms >= started_ms - 1000 && e.sent_by("kcc-off"))
        .collect();
    assert!(
        ours.iter().any(|e| e.resource == "ipamblocks"),
        "the audit log shows the controller's requests: {ours:?}"
    );
    let on_kcc: Vec<_> = ours
        .iter()
        .filter(|e| e.resource.starts_with("kubecontrollersconfigurations"))
        .collect();
    assert!(
        on_kcc.is_empty(),
        "requests on KubeControllersConfiguration with the API disabled: {on_kcc:?}"
    );
    let after = kccs.get("default").await.expect("default still there");
    assert_eq!(
        after.metadata.resource_version, default.metadata.resource_version,
        "default was written"
    );
    // The configuration is the environment's: not the object's metrics port nor its log level.
    assert_eq!(
        http_get(unused_port, "/metrics").await,
        None,
        "the object's prometheusMetricsPort was applied"
    );
    let log = guard.log_text();
    assert!(
        log.contains("environment only (DISABLE_KUBE_CONTROLLERS_CONFIG_API)"),
        "start-up says so: {log}"
    );
    assert!(
        !log.contains("log level applied\u{1b}") && !log.contains("level=\"Debug\""),
        "the object's log level was applied: {log}"
    );
}

// --- metrics over TLS ----------------------------------------------------------------------------

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("running openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA, as the harness's `make_pki` makes one.
fn new_ca(dir: &Path, name: &str) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-days",
            "2",
            "-subj",
            &format!("/CN={name}"),
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.crt"),
        ],
    );
}

/// A certificate for `subject` signed by `ca`, with `ext` (an extension section's lines).
fn new_cert(dir: &Path, name: &str, ca: &str, subject: &str, ext: &str) {
    std::fs::write(dir.join(format!("{name}.ext")), ext).unwrap();
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-subj",
            subject,
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.csr"),
        ],
    );
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            &format!("{ca}.crt"),
            "-CAkey",
            &format!("{ca}.key"),
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            &format!("{name}.ext"),
            "-out",
            &format!("{name}.crt"),
        ],
    );
}

/// One HTTPS GET of `/metrics` as `client` (a certificate name in `dir`, or none): the status
/// code, or the error that stopped it (handshake refused, connection closed).
async fn scrape(dir: &Path, port: u16, client: Option<&str>) -> Result<(u16, String), String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(dir.join("ca.crt")).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let config = match client {
        Some(name) => {
            let chain = CertificateDer::pem_file_iter(dir.join(format!("{name}.crt")))
                .unwrap()
                .map(Result::unwrap)
                .collect();
            let key = PrivateKeyDer::from_pem_file(dir.join(format!("{name}.key"))).unwrap();
            builder.with_client_auth_cert(chain, key).unwrap()
        }
        None => builder.with_no_client_auth(),
    };
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .map_err(|e| e.to_string())?;
    let mut tls = connector
        .connect(ServerName::try_from("127.0.0.1").unwrap(), tcp)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    // With TLS 1.3 the server judges the client's certificate after the client's handshake
    // ends: a refusal arrives as an alert on the first read.
    tls.write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .await
        .map_err(|e| format!("write: {e}"))?;
    let mut buf = Vec::new();
    tls.read_to_end(&mut buf)
        .await
        .map_err(|e| format!("read: {e}"))?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("no HTTP answer: {text:?}"))?;
    Ok((code, text))
}

#[tokio::test]
async fn metrics_over_tls_serve_only_the_client_named_by_client_common_name() {
    let cluster = shared_cluster();
    let pki = status_dir(&unique_name("metrics-tls"));
    std::fs::create_dir_all(&pki).unwrap();
    let client_ext = "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n";
    new_ca(&pki, "ca");
    new_ca(&pki, "other-ca");
    new_cert(
        &pki,
        "server",
        "ca",
        "/CN=calico-kube-controllers-metrics",
        "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n",
    );
    new_cert(
        &pki,
        "prometheus",
        "ca",
        "/O=monitoring/CN=calico-node-prometheus-client-tls",
        client_ext,
    );
    new_cert(&pki, "wrong-cn", "ca", "/CN=someone-else", client_ext);
    new_cert(
        &pki,
        "foreign",
        "other-ca",
        "/CN=calico-node-prometheus-client-tls",
        client_ext,
    );

    let (metrics_port, health_port) = (free_port(), free_port());
    let (mp, hp) = (metrics_port.to_string(), health_port.to_string());
    let sf = pki.join("status.json");
    let path = |f: &str| pki.join(f).to_str().unwrap().to_string();
    let (crt, key, ca) = (path("server.crt"), path("server.key"), path("ca.crt"));
    let guard: ChildGuard = start_controller_env(
        cluster,
        &[
            "run",
            "--dry-run",
            "--metrics-port",
            &mp,
            "--health-port",
            &hp,
            "--status-file",
            sf.to_str().unwrap(),
        ],
        &[
            ("TLS_CRT_PATH", crt.as_str()),
            ("TLS_KEY_PATH", key.as_str()),
            ("CA_CRT_PATH", ca.as_str()),
            ("CLIENT_COMMON_NAME", "calico-node-prometheus-client-tls"),
            ("DATASTORE_TYPE", "kubernetes"),
            ("ENABLED_CONTROLLERS", "node"),
        ],
        "metrics-tls",
    );
    let (code, body) = wait_for("a scrape as the named client", || async {
        scrape(&pki, metrics_port, Some("prometheus")).await.ok()
    })
    .await;
    assert_eq!(code, 200, "{body}");
    assert!(
        body.contains("ipam_gc_confirmed_leaks"),
        "the metrics: {body}"
    );

    assert_eq!(
        http_get(metrics_port, "/metrics").await,
        None,
        "plain HTTP on the TLS port must get no answer"
    );
    for (client, what) in [
        (None, "no client certificate"),
        (Some("wrong-cn"), "a wrong common name"),
        (Some("foreign"), "a certificate of another CA"),
    ] {
        let r = scrape(&pki, metrics_port, client).await;
        assert!(r.is_err(), "{what} was served: {r:?}");
    }
    // The health port is for `calico health` on loopback: plain HTTP, as before.
    assert_eq!(
        http_get(health_port, "/liveness").await.map(|r| r.0),
        Some(200)
    );
    let log = guard.log_text();
    assert!(
        log.contains("metrics client refused"),
        "the refused common name is logged: {log}"
    );
}

#[test]
fn a_common_name_without_a_ca_or_an_unreadable_certificate_stops_start_up_naming_the_setting() {
    let cluster = shared_cluster();
    let bin = env!("CARGO_BIN_EXE_calico-kube-controllers");
    let run = |env: &[(&str, &str)]| {
        let out = Command::new(bin)
            .args(["run", "--dry-run", "--metrics-port", "0", "--status-file"])
            .arg(status_dir(&unique_name("tls-bad")).join("status.json"))
            .env("KUBECONFIG", &cluster.kubeconfig)
            .envs(env.iter().copied())
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, err) = run(&[
        ("TLS_CRT_PATH", "/nonexistent/tls.crt"),
        ("TLS_KEY_PATH", "/nonexistent/tls.key"),
    ]);
    assert!(
        code == Some(2) && err.contains("TLS_CRT_PATH=/nonexistent/tls.crt: cannot read the file"),
        "{code:?} {err}"
    );
    let (code, err) = run(&[
        ("TLS_CRT_PATH", "/x.crt"),
        ("TLS_KEY_PATH", "/x.key"),
        ("CLIENT_COMMON_NAME", "prom"),
    ]);
    assert!(
        code == Some(2) && err.contains("CA_CRT_PATH"),
        "{code:?} {err}"
    );
    let (code, err) = run(&[("TLS_CRT_PATH", "/x.crt")]);
    assert!(
        code == Some(2) && err.contains("TLS_KEY_PATH"),
        "{code:?} {err}"
    );
}
