//! Upstream's command lines against the built binary: `check-status` (as a subcommand, as a
//! program name, and as the chart's `calico component kube-controllers kube-controllers-health`),
//! `calico health`, the `kube-controllers` program name, unknown flags and invalid environment.
//! No cluster needed: every case ends before a client is built.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_calico-kube-controllers");

/// A directory of its own under the target tmpdir, with the binary linked in as `name`s.
fn scratch(label: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("cli-{label}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for name in ["kube-controllers", "check-status", "calico"] {
        std::os::unix::fs::symlink(BIN, dir.join(name)).unwrap();
    }
    dir
}

fn run(program: &Path, args: &[&str], env: &[(&str, &str)]) -> (i32, String) {
    let mut c = Command::new(program);
    c.args(args);
    for var in ["LOG_LEVEL", "ENABLED_CONTROLLERS", "DATASTORE_TYPE", "CALICO_DATASTORE_TYPE", "ETCD_ENDPOINTS", "LOG_FORMAT", "CKC_DRY_RUN"] {
        c.env_remove(var);
    }
    // Never reach a real cluster from these tests, whatever the environment holds.
    c.env("KUBECONFIG", "/nonexistent/kubeconfig");
    c.envs(env.iter().copied());
    let Output { status, stdout, stderr } = c.output().expect("running the binary");
    let text = format!("{}{}", String::from_utf8_lossy(&stdout), String::from_utf8_lossy(&stderr));
    (status.code().unwrap_or(-1), text)
}

fn write_status(dir: &Path, json: &str) -> PathBuf {
    let path = dir.join("status.json");
    std::fs::write(&path, json).unwrap();
    path
}

const READY: &str = r#"{"Readiness":{"Startup":{"Ready":true,"Reason":""},"CalicoDatastore":{"Ready":true,"Reason":""},"KubeAPIServer":{"Ready":true,"Reason":""}}}"#;
const NOT_READY: &str = r#"{"Readiness":{"Startup":{"Ready":true,"Reason":""},"CalicoDatastore":{"Ready":false,"Reason":"Error verifying datastore: x"},"KubeAPIServer":{"Ready":false,"Reason":"Error reaching apiserver: y"}}}"#;

#[test]
fn check_status_prints_ready_and_exits_zero_under_every_name() {
    let dir = scratch("ready");
    let file = write_status(&dir, READY);
    let file = file.to_str().unwrap();
    for (program, args) in [
        (Path::new(BIN).to_path_buf(), vec!["check-status", "-r", "-f", file]),
        (Path::new(BIN).to_path_buf(), vec!["check-status", "--live", "--file", file]),
        (dir.join("check-status"), vec!["-l", "-f", file]),
        (dir.join("check-status"), vec!["-r", "--file", file]),
        (dir.join("calico"), vec!["component", "kube-controllers", "kube-controllers-health", "-r", "-f", file]),
    ] {
        let (code, out) = run(&program, &args, &[]);
        assert_eq!((code, out.trim()), (0, "Ready"), "{} {args:?}", program.display());
    }
}

#[test]
fn check_status_joins_the_not_ready_reasons_and_exits_one() {
    let dir = scratch("notready");
    let file = write_status(&dir, NOT_READY);
    let (code, out) = run(&dir.join("check-status"), &["-r", "-f", file.to_str().unwrap()], &[]);
    assert_eq!(code, 1);
    assert_eq!(out.trim(), "Error verifying datastore: x; Error reaching apiserver: y");
    // Upstream's file has no liveness conditions: -l is -r, as upstream.
    assert_eq!(run(&dir.join("check-status"), &["-l", "-f", file.to_str().unwrap()], &[]).0, 1);
    // Ours does: an unreachable apiserver does not fail liveness.
    let ours = write_status(&dir, &NOT_READY.replace("}}}", "}},\"Liveness\":{\"EventLoop\":{\"Live\":true,\"Reason\":\"\"}}}"));
    assert_eq!(run(Path::new(BIN), &["check-status", "-l", "-f", ours.to_str().unwrap()], &[]).0, 0);
}

#[test]
fn check_status_without_a_readable_file_or_a_flag_fails() {
    let dir = scratch("nofile");
    let missing = dir.join("absent.json");
    let (code, out) = run(Path::new(BIN), &["check-status", "-r", "-f", missing.to_str().unwrap()], &[]);
    assert_eq!(code, 1);
    assert!(out.starts_with("Failed to read status file"), "{out}");
    let garbage = write_status(&dir, "not json");
    let (code, out) = run(Path::new(BIN), &["check-status", "-r", "-f", garbage.to_str().unwrap()], &[]);
    assert_eq!(code, 1);
    assert!(out.starts_with("Failed to read status file"), "{out}");
    let (code, out) = run(&dir.join("check-status"), &[], &[]);
    assert_eq!((code, out.trim()), (1, "No command specified to check-status"));
    let (code, out) = run(&dir.join("check-status"), &["-v"], &[]);
    assert_eq!((code, out.trim()), (0, env!("CARGO_PKG_VERSION")));
}

#[test]
fn unknown_flags_are_a_clear_error_with_exit_two() {
    let dir = scratch("flags");
    for (program, args) in [
        (Path::new(BIN).to_path_buf(), vec!["run", "--no-such-flag"]),
        (dir.join("kube-controllers"), vec!["--no-such-flag"]),
        (dir.join("calico"), vec!["component", "kube-controllers", "--no-such-flag"]),
        (dir.join("check-status"), vec!["-x"]),
        (dir.join("calico"), vec!["health", "--port", "1", "--type", "sideways"]),
    ] {
        let (code, out) = run(&program, &args, &[]);
        assert_eq!(code, 2, "{} {args:?}: {out}", program.display());
        assert!(out.contains("error:"), "{out}");
    }
}

#[test]
fn invalid_environment_stops_start_up_with_exit_two_naming_the_variable() {
    let dir = scratch("env");
    for (env, expected) in [
        (("LOG_LEVEL", "verbose"), "LOG_LEVEL"),
        (("DATASTORE_TYPE", "etcdv3"), "ETCD_ENDPOINTS"),
        (("ETCD_ENDPOINTS", "127.0.0.1:2379"), "ETCD_ENDPOINTS"),
        (("ENABLED_CONTROLLERS", "node,ipam"), "ENABLED_CONTROLLERS"),
        (("HEALTH_ENABLED", "maybe"), "HEALTH_ENABLED"),
    ] {
        let (code, out) = run(&dir.join("kube-controllers"), &[], &[env]);
        assert_eq!(code, 2, "{env:?}: {out}");
        assert!(out.contains(expected), "{env:?}: {out}");
    }
}

/// A one-shot-per-connection HTTP server: 200 on /readiness, 503 on everything else.
fn probe_server() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { continue };
            let mut buf = Vec::new();
            let mut chunk = [0u8; 1024];
            while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                match s.read(&mut chunk) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
            let request = String::from_utf8_lossy(&buf);
            let answer = if request.starts_with("GET /readiness ") { "200 OK" } else { "503 Service Unavailable" };
            let _ = write!(s, "HTTP/1.1 {answer}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        }
    });
    port
}

#[test]
fn calico_health_probes_the_local_port_and_exits_by_status() {
    let dir = scratch("health");
    let port = probe_server().to_string();
    let calico = dir.join("calico");
    let (code, out) = run(&calico, &["health", "--port", &port, "--type", "readiness"], &[]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(run(&calico, &["health", &format!("--port={port}"), "--type=liveness"], &[]).0, 1, "503 fails the probe");
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port().to_string();
    let (code, out) = run(&calico, &["health", "--port", &closed, "--type", "readiness"], &[]);
    assert_eq!(code, 1, "nothing listening fails the probe: {out}");
}

#[test]
fn log_format_json_writes_json_lines() {
    let dir = scratch("logjson");
    // DATASTORE_TYPE unset is logged at start; the missing kubeconfig then ends the run (exit 2).
    for (args, env) in [(vec![], vec![("LOG_FORMAT", "json")]), (vec!["--log-format", "json"], vec![])] {
        let (code, out) = run(&dir.join("kube-controllers"), &args, &env);
        assert_eq!(code, 2, "{out}");
        let line = out.lines().find(|l| l.contains("DATASTORE_TYPE unset")).unwrap_or_else(|| panic!("no start-up line: {out}"));
        let parsed: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert_eq!(parsed["level"], "INFO", "{line}");
    }
    let (_, out) = run(&dir.join("kube-controllers"), &[], &[]);
    let line = out.lines().find(|l| l.contains("DATASTORE_TYPE unset")).unwrap_or_else(|| panic!("no start-up line: {out}"));
    assert!(!line.starts_with('{'), "text by default: {line}");
}
