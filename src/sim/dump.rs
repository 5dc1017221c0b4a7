//! `simulate --write-dump DIR`: the synthetic cluster written in `leak-scan`'s input format, as
//! `kubectl get … -o json` prints it, so both commands can be run on the same data.
//!
//! Owns: the realistic rendering of pods (containers, conditions, managed fields, owner
//! references: a few KB each, like real ones) and nodes, and the streamed writing of four
//! `List` files. Must not: hold a whole file in memory (objects are written one at a time) or
//! write anything but the cluster as it was before the GC ran.

use std::fs::{self, File};
use std::io::{self, BufWriter, Write};
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;

use serde::Serialize;
use serde_json::{json, Value};

use super::cluster::{host_cidr, SimPod, SyntheticCluster, CREATED_AT};
use crate::model::time::format_rfc3339;

/// What was written.
#[derive(Debug, Clone, Default, Serialize)]
pub struct DumpStats {
    pub files: Vec<String>,
    pub bytes: u64,
    pub pods: usize,
    pub pod_bytes: u64,
}

/// Writes `pods.json`, `nodes.json`, `namespaces.json` and `ipam.json` into `dir` (created if needed).
pub fn write_dump(cluster: &SyntheticCluster, dir: &Path) -> io::Result<DumpStats> {
    fs::create_dir_all(dir)?;
    let to_file = |name: &str, write: &dyn Fn(&mut dyn Write) -> io::Result<u64>| -> io::Result<u64> {
        let mut out = BufWriter::with_capacity(1 << 20, File::create(dir.join(name))?);
        let n = write(&mut out)?;
        out.flush()?;
        Ok(n)
    };
    let pod_bytes = to_file("pods.json", &|w| write_pods(cluster, w))?;
    let node_bytes = to_file("nodes.json", &|w| write_nodes(cluster, w))?;
    let ns_bytes = to_file("namespaces.json", &|w| write_namespaces(cluster, w))?;
    let ipam_bytes = to_file("ipam.json", &|w| write_ipam(cluster, w))?;
    Ok(DumpStats {
        files: ["pods.json", "nodes.json", "namespaces.json", "ipam.json"].iter().map(|f| dir.join(f).display().to_string()).collect(),
        bytes: pod_bytes + node_bytes + ns_bytes + ipam_bytes,
        pods: cluster.pods.len(),
        pod_bytes,
    })
}

/// `kubectl get pods --all-namespaces -o json`. Returns the bytes written.
pub fn write_pods(cluster: &SyntheticCluster, out: &mut dyn Write) -> io::Result<u64> {
    write_list(out, cluster.pods.iter().enumerate().map(|(i, p)| pod_json(p, i)))
}

/// `kubectl get nodes -o json`.
pub fn write_nodes(cluster: &SyntheticCluster, out: &mut dyn Write) -> io::Result<u64> {
    write_list(out, cluster.nodes.iter().map(|n| node_json(&n.metadata.name, cluster.windows_nodes.contains(&n.metadata.name))))
}

/// `kubectl get namespaces -o json`.
pub fn write_namespaces(cluster: &SyntheticCluster, out: &mut dyn Write) -> io::Result<u64> {
    write_list(out, cluster.namespaces.iter().map(|n| namespace_json(n)))
}

/// `kubectl get ippools,ipamblocks,blockaffinities,ipamhandles -o json` (crd.projectcalico.org/v1).
pub fn write_ipam(cluster: &SyntheticCluster, out: &mut dyn Write) -> io::Result<u64> {
    let mut rv = 1000u64;
    let mut stamp = |mut v: Value| {
        rv += 1;
        if let Some(meta) = v.get_mut("metadata").and_then(Value::as_object_mut) {
            meta.insert("resourceVersion".into(), json!(rv.to_string()));
            meta.insert("uid".into(), json!(uid_from(rv)));
            meta.insert("creationTimestamp".into(), json!(format_rfc3339(CREATED_AT - 30 * 86_400_000)));
            meta.insert("generation".into(), json!(1));
        }
        v
    };
    let items = cluster
        .pools
        .iter()
        .map(|o| serde_json::to_value(o).unwrap_or(Value::Null))
        .chain(cluster.blocks.iter().map(|o| serde_json::to_value(o).unwrap_or(Value::Null)))
        .chain(cluster.affinities.iter().map(|o| serde_json::to_value(o).unwrap_or(Value::Null)))
        .chain(cluster.handles.iter().map(|h| h.value()))
        .map(&mut stamp);
    write_list(out, items)
}

/// A `v1 List` written item by item; returns the bytes written.
fn write_list(out: &mut dyn Write, items: impl Iterator<Item = Value>) -> io::Result<u64> {
    let mut out = CountingWriter { inner: out, bytes: 0 };
    out.write_all(b"{\n    \"apiVersion\": \"v1\",\n    \"items\": [\n")?;
    for (i, item) in items.enumerate() {
        if i > 0 {
            out.write_all(b",\n")?;
        }
        serde_json::to_writer_pretty(&mut out, &item).map_err(io::Error::other)?;
    }
    out.write_all(b"\n    ],\n    \"kind\": \"List\",\n    \"metadata\": {\n        \"resourceVersion\": \"\"\n    }\n}\n")?;
    Ok(out.bytes)
}

struct CountingWriter<W: Write> {
    inner: W,
    bytes: u64,
}

impl<W: Write> Write for CountingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.bytes += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

fn uid_from(n: u64) -> String {
    let h = n.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    format!("{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}", h >> 32, (h >> 16) & 0xffff, h & 0xfff, (h >> 20) & 0xfff, h & 0xffff_ffff_ffff)
}

/// The node's InternalIP: 172.16.0.0/12 by node number.
fn node_ip(name: &str) -> Ipv4Addr {
    let i: u32 = name.rsplit('-').next().and_then(|s| s.parse().ok()).unwrap_or(0);
    Ipv4Addr::from(u32::from(Ipv4Addr::new(172, 16, 0, 10)) + i)
}

fn ts(offset_ms: i64) -> String {
    format_rfc3339(CREATED_AT + offset_ms)
}

fn pod_json(p: &SimPod, i: usize) -> Value {
    let created = ts((i as i64 * 7_919) % 86_400_000);
    let started = ts((i as i64 * 7_919) % 86_400_000 + 4_000);
    let rs = format!("{}-{}", p.app, p.template_hash);
    let sandbox_id = &p.container_id;
    let container_id: String = sandbox_id.chars().rev().collect();
    let image = format!("registry.example.com/{}/{}:1.{}.{}", p.namespace, p.app, i % 17, i % 5);
    let ready = p.phase == "Running";
    let finished = matches!(p.phase, "Succeeded" | "Failed");
    let mut annotations = serde_json::Map::new();
    annotations.insert("cni.projectcalico.org/containerID".into(), json!(sandbox_id));
    if let Some(first) = p.annotation_ips.first() {
        annotations.insert("cni.projectcalico.org/podIP".into(), json!(host_cidr(*first)));
        annotations.insert(
            "cni.projectcalico.org/podIPs".into(),
            json!(p.annotation_ips.iter().map(|ip| host_cidr(*ip)).collect::<Vec<_>>().join(",")),
        );
    }
    annotations.insert("kubectl.kubernetes.io/restartedAt".into(), json!(ts(-86_400_000)));
    annotations.insert("prometheus.io/port".into(), json!("9090"));
    annotations.insert("prometheus.io/scrape".into(), json!("true"));
    let state = if finished {
        json!({"terminated": {"containerID": format!("containerd://{container_id}"), "exitCode": if p.phase == "Failed" { 1 } else { 0 },
            "finishedAt": ts(3_600_000), "reason": if p.phase == "Failed" { "Error" } else { "Completed" }, "startedAt": started}})
    } else if ready {
        json!({"running": {"startedAt": started}})
    } else {
        json!({"waiting": {"reason": "ContainerCreating"}})
    };
    let cond = |t: &str, s: bool| json!({"lastProbeTime": null, "lastTransitionTime": started, "status": if s { "True" } else { "False" }, "type": t});
    let mut status = json!({
        "conditions": [cond("PodReadyToStartContainers", !finished), cond("Initialized", true), cond("Ready", ready),
                       cond("ContainersReady", ready), cond("PodScheduled", true)],
        "containerStatuses": [{
            "containerID": format!("containerd://{container_id}"),
            "image": image, "imageID": format!("{image}@sha256:{}", &sandbox_id[..64.min(sandbox_id.len())]),
            "lastState": {}, "name": p.app, "ready": ready, "restartCount": i % 3, "started": ready, "state": state,
            "volumeMounts": [{"mountPath": "/var/run/secrets/kubernetes.io/serviceaccount", "name": "kube-api-access", "readOnly": true, "recursiveReadOnly": "Disabled"}]
        }],
        "hostIP": node_ip(&p.node).to_string(),
        "hostIPs": [{"ip": node_ip(&p.node).to_string()}],
        "phase": p.phase,
        "qosClass": "Burstable",
        "startTime": created
    });
    if let Some(first) = p.status_ips.first() {
        status["podIP"] = json!(first.to_string());
        status["podIPs"] = Value::Array(p.status_ips.iter().map(|ip: &IpAddr| json!({"ip": ip.to_string()})).collect());
    }
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "annotations": annotations,
            "creationTimestamp": created,
            "generateName": format!("{rs}-"),
            "labels": {"app": p.app, "app.kubernetes.io/name": p.app, "app.kubernetes.io/part-of": p.namespace, "pod-template-hash": p.template_hash},
            "managedFields": [
                {"apiVersion": "v1", "fieldsType": "FieldsV1", "fieldsV1": {
                    "f:metadata": {"f:annotations": {".": {}, "f:kubectl.kubernetes.io/restartedAt": {}, "f:prometheus.io/port": {}, "f:prometheus.io/scrape": {}},
                        "f:generateName": {}, "f:labels": {".": {}, "f:app": {}, "f:pod-template-hash": {}},
                        "f:ownerReferences": {".": {}, format!("k:{{\"uid\":\"{}\"}}", uid_from(i as u64)): {}}},
                    "f:spec": {"f:containers": {format!("k:{{\"name\":\"{}\"}}", p.app): {".": {}, "f:env": {}, "f:image": {}, "f:imagePullPolicy": {}, "f:name": {},
                        "f:ports": {}, "f:resources": {}, "f:terminationMessagePath": {}, "f:terminationMessagePolicy": {}}},
                        "f:dnsPolicy": {}, "f:enableServiceLinks": {}, "f:restartPolicy": {}, "f:schedulerName": {}, "f:securityContext": {}, "f:terminationGracePeriodSeconds": {}}},
                 "manager": "kube-controller-manager", "operation": "Update", "time": created},
                {"apiVersion": "v1", "fieldsType": "FieldsV1", "fieldsV1": {"f:metadata": {"f:annotations": {"f:cni.projectcalico.org/containerID": {},
                    "f:cni.projectcalico.org/podIP": {}, "f:cni.projectcalico.org/podIPs": {}}}},
                 "manager": "calico", "operation": "Update", "subresource": "status", "time": started},
                {"apiVersion": "v1", "fieldsType": "FieldsV1", "fieldsV1": {"f:status": {"f:conditions": {}, "f:containerStatuses": {}, "f:hostIP": {},
                    "f:hostIPs": {}, "f:phase": {}, "f:podIP": {}, "f:podIPs": {}, "f:startTime": {}}},
                 "manager": "kubelet", "operation": "Update", "subresource": "status", "time": started}
            ],
            "name": p.name,
            "namespace": p.namespace,
            "ownerReferences": [{"apiVersion": "apps/v1", "blockOwnerDeletion": true, "controller": true, "kind": "ReplicaSet", "name": rs, "uid": uid_from(i as u64)}],
            "resourceVersion": (100_000 + i).to_string(),
            "uid": p.uid
        },
        "spec": {
            "containers": [{
                "env": [{"name": "APP_NAME", "value": p.app}, {"name": "LOG_LEVEL", "value": "info"},
                        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.name"}}},
                        {"name": "POD_IP", "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": "status.podIP"}}}],
                "image": image,
                "imagePullPolicy": "IfNotPresent",
                "livenessProbe": {"failureThreshold": 3, "httpGet": {"path": "/healthz", "port": 8080, "scheme": "HTTP"}, "periodSeconds": 10, "successThreshold": 1, "timeoutSeconds": 1},
                "name": p.app,
                "ports": [{"containerPort": 8080, "name": "http", "protocol": "TCP"}, {"containerPort": 9090, "name": "metrics", "protocol": "TCP"}],
                "readinessProbe": {"failureThreshold": 3, "httpGet": {"path": "/ready", "port": 8080, "scheme": "HTTP"}, "periodSeconds": 5, "successThreshold": 1, "timeoutSeconds": 1},
                "resources": {"limits": {"cpu": "500m", "memory": "256Mi"}, "requests": {"cpu": "100m", "memory": "128Mi"}},
                "terminationMessagePath": "/dev/termination-log",
                "terminationMessagePolicy": "File",
                "volumeMounts": [{"mountPath": "/var/run/secrets/kubernetes.io/serviceaccount", "name": "kube-api-access", "readOnly": true}]
            }],
            "dnsPolicy": "ClusterFirst",
            "enableServiceLinks": true,
            "nodeName": p.node,
            "preemptionPolicy": "PreemptLowerPriority",
            "priority": 0,
            "restartPolicy": if finished { "Never" } else { "Always" },
            "schedulerName": "default-scheduler",
            "securityContext": {},
            "serviceAccount": "default",
            "serviceAccountName": "default",
            "terminationGracePeriodSeconds": 30,
            "tolerations": [
                {"effect": "NoExecute", "key": "node.kubernetes.io/not-ready", "operator": "Exists", "tolerationSeconds": 300},
                {"effect": "NoExecute", "key": "node.kubernetes.io/unreachable", "operator": "Exists", "tolerationSeconds": 300}
            ],
            "volumes": [{"name": "kube-api-access", "projected": {"defaultMode": 420, "sources": [
                {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
                {"configMap": {"items": [{"key": "ca.crt", "path": "ca.crt"}], "name": "kube-root-ca.crt"}},
                {"downwardAPI": {"items": [{"fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"}, "path": "namespace"}]}}
            ]}}]
        },
        "status": status
    })
}

fn node_json(name: &str, windows: bool) -> Value {
    let ip = node_ip(name).to_string();
    let os = if windows { "windows" } else { "linux" };
    let cond = |t: &str, s: &str, reason: &str| json!({"lastHeartbeatTime": ts(0), "lastTransitionTime": ts(-86_400_000), "message": reason, "reason": reason, "status": s, "type": t});
    json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "annotations": {"node.alpha.kubernetes.io/ttl": "0", "projectcalico.org/IPv4Address": format!("{ip}/16"),
                            "volumes.kubernetes.io/controller-managed-attach-detach": "true"},
            "creationTimestamp": ts(-30 * 86_400_000),
            "labels": {"beta.kubernetes.io/arch": "amd64", "beta.kubernetes.io/os": os, "kubernetes.io/arch": "amd64",
                       "kubernetes.io/hostname": name, "kubernetes.io/os": os, "node-role.kubernetes.io/worker": ""},
            "name": name,
            "resourceVersion": "4242",
            "uid": uid_from(name.len() as u64 * 31 + u64::from(u32::from(node_ip(name))))
        },
        "spec": {},
        "status": {
            "addresses": [{"address": ip, "type": "InternalIP"}, {"address": name, "type": "Hostname"}],
            "allocatable": {"cpu": "15800m", "ephemeral-storage": "95551679124", "memory": "63211Mi", "pods": "110"},
            "capacity": {"cpu": "16", "ephemeral-storage": "103668Mi", "memory": "64Gi", "pods": "110"},
            "conditions": [cond("MemoryPressure", "False", "KubeletHasSufficientMemory"), cond("DiskPressure", "False", "KubeletHasNoDiskPressure"),
                           cond("PIDPressure", "False", "KubeletHasSufficientPID"), cond("Ready", "True", "KubeletReady")],
            "nodeInfo": {"architecture": "amd64", "containerRuntimeVersion": "containerd://2.1.4", "kernelVersion": "6.8.0-79-generic",
                         "kubeProxyVersion": "", "kubeletVersion": "v1.34.1", "operatingSystem": os, "osImage": "Ubuntu 24.04.3 LTS"}
        }
    })
}

fn namespace_json(name: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Namespace",
        "metadata": {"creationTimestamp": ts(-60 * 86_400_000), "labels": {"kubernetes.io/metadata.name": name}, "name": name,
                     "resourceVersion": "17", "uid": uid_from(name.len() as u64 * 7919)},
        "spec": {"finalizers": ["kubernetes"]},
        "status": {"phase": "Active"}
    })
}
