//! The LoadBalancer IP controller on the real API server (KDD, SPEC §6.6): a LoadBalancer Service
//! gets an address from the LoadBalancer pool in its status, claimed in a `virtual:load-balancer`
//! block with its handle; a requested address is honoured and, when taken, refused with an Event;
//! GC passes leave the addresses alone; a restarted controller gives no Service a second address;
//! a Service turned into ClusterIP or deleted frees its address, which another Service then gets.
//! Dual-stack Services get one address of each family (the test API server serves both); a full
//! pool is reported in an Event and the metrics; of two replicas only the leader writes, and the
//! standby that takes over from a killed leader gives no Service a second address.

use std::time::Duration;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use serde_json::{Value, json};

use crate::support::audit;
use crate::support::cluster::private_cluster;
use crate::support::controller::{ChildGuard, DEADLINE, calico, free_port, http_get, metric_sum, start_controller, wait_for};
use crate::support::ha::{lease, replica, sole_leader};

const POOL: &str = "203.0.113.0/28";

pub fn service(name: &str, annotations: Value) -> Service {
    serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": "default", "annotations": annotations},
        "spec": {"type": "LoadBalancer", "ports": [{"port": 80, "targetPort": 8080}], "selector": {"app": name}}
    }))
    .unwrap()
}

pub fn ingress(s: &Service) -> Vec<String> {
    s.status.as_ref().and_then(|st| st.load_balancer.as_ref()).and_then(|lb| lb.ingress.clone()).unwrap_or_default().into_iter().filter_map(|i| i.ip).collect()
}

/// Every allocated address in the LoadBalancer blocks, with its handle.
async fn lb_allocations(blocks: &Api<DynamicObject>) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for b in blocks.list(&ListParams::default()).await.expect("blocks").items {
        let spec = &b.data["spec"];
        if spec["affinity"] != "virtual:load-balancer" {
            continue;
        }
        let cidr: ipnet::IpNet = spec["cidr"].as_str().unwrap().parse().unwrap();
        for (ord, slot) in spec["allocations"].as_array().unwrap().iter().enumerate() {
            if let Some(a) = slot.as_u64() {
                let attr = &spec["attributes"][a as usize];
                if attr["releasedAt"].is_null() {
                    let ip = calico_kube_controllers::model::names::ordinal_to_ip(&cidr, ord as u32).to_string();
                    out.push((ip, attr["handle_id"].as_str().unwrap_or_default().to_string()));
                }
            }
        }
    }
    out.sort();
    out
}

#[tokio::test]
async fn load_balancer_services_get_pool_addresses_keep_them_across_restarts_and_free_them() {
    let cluster = private_cluster();
    let client = cluster.client();
    let pools: Api<DynamicObject> = Api::all_with(client.clone(), &calico("IPPool", "ippools"));
    let pool: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "crd.projectcalico.org/v1", "kind": "IPPool", "metadata": {"name": "lb-pool"},
        "spec": {"cidr": POOL, "blockSize": 29, "allowedUses": ["LoadBalancer"], "nodeSelector": "all()"}
    }))
    .unwrap();
    pools.create(&PostParams::default(), &pool).await.expect("the LoadBalancer pool");
    let services: Api<Service> = Api::namespaced(client.clone(), "default");
    let blocks: Api<DynamicObject> = Api::all_with(client.clone(), &calico("IPAMBlock", "ipamblocks"));
    let affinities: Api<DynamicObject> = Api::all_with(client.clone(), &calico("BlockAffinity", "blockaffinities"));

    let port = free_port();
    let start = |label: &str| start_controller(&cluster, &[], port, label);
    let mut controller: ChildGuard = start("lb-1");
    services.create(&PostParams::default(), &service("web", json!({}))).await.expect("web");
    services.create(&PostParams::default(), &service("pinned", json!({"projectcalico.org/loadBalancerIPs": "[\"203.0.113.9\"]"}))).await.expect("pinned");
    let web_ip = wait_for("web's address in its status", || async { ingress(&services.get("web").await.ok()?).first().cloned() }).await;
    let net: ipnet::IpNet = POOL.parse().unwrap();
    assert!(net.contains(&web_ip.parse::<std::net::IpAddr>().unwrap()), "{web_ip} is from the LoadBalancer pool");
    wait_for("pinned gets the address it asked for", || async { (ingress(&services.get("pinned").await.ok()?) == ["203.0.113.9"]).then_some(()) }).await;
    let allocs = lb_allocations(&blocks).await;
    assert_eq!(allocs.len(), 2, "one address each: {allocs:?}");
    assert!(allocs.iter().all(|(_, h)| h.starts_with("lb-")), "{allocs:?}");
    let affinity = affinities.list(&ListParams::default()).await.unwrap().items.into_iter().find(|a| a.data["spec"]["node"] == "load-balancer").expect("the virtual affinity");
    assert_eq!((affinity.data["spec"]["type"].as_str(), affinity.data["spec"]["state"].as_str()), (Some("virtual"), Some("confirmed")));

    // The same address again: refused, with an Event on the Service.
    services.create(&PostParams::default(), &service("taken", json!({"projectcalico.org/loadBalancerIPs": "[\"203.0.113.9\"]"}))).await.expect("taken");
    let events: Api<Event> = Api::namespaced(client.clone(), "default");
    let event = wait_for("the Event on the refused Service", || async {
        events.list(&ListParams::default()).await.ok()?.items.into_iter().find(|e| e.reason.as_deref() == Some("LoadBalancerIPAssignmentFailed") && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("taken"))
    })
    .await;
    assert!(event.note.as_deref().unwrap_or_default().contains("203.0.113.9"), "{:?}", event.note);
    assert!(ingress(&services.get("taken").await.unwrap()).is_empty());

    // GC passes (2 s grace here) leave the LoadBalancer addresses alone; a restart gives nobody
    // a second address.
    tokio::time::sleep(Duration::from_secs(4)).await;
    drop(controller);
    controller = start("lb-2");
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(lb_allocations(&blocks).await, allocs, "after GC passes and a restart: the same two addresses, nothing more\n{}", controller.log_text());
    assert_eq!(ingress(&services.get("web").await.unwrap()), std::slice::from_ref(&web_ip));

    // web becomes ClusterIP: its address goes. pinned is deleted: taken gets 203.0.113.9.
    let to_cluster_ip = json!({"spec": {"type": "ClusterIP", "ports": [{"port": 80, "targetPort": 8080, "nodePort": null}]}});
    services.patch("web", &PatchParams::default(), &Patch::Merge(&to_cluster_ip)).await.expect("web to ClusterIP");
    services.delete("pinned", &DeleteParams::default()).await.expect("deleting pinned");
    wait_for("taken gets the freed address", || async { (ingress(&services.get("taken").await.ok()?) == ["203.0.113.9"]).then_some(()) }).await;
    let left = wait_for("web's address freed", || async {
        let a = lb_allocations(&blocks).await;
        (a.len() == 1).then_some(a)
    })
    .await;
    assert_eq!(left[0].0, "203.0.113.9", "{left:?}");
    assert!(!controller.log_text().contains("panicked"), "{}", controller.log_text());
}

/// A LoadBalancer Service with `spec` merged over the plain one (families, policy).
fn service_spec(name: &str, spec: Value) -> Service {
    let mut s = serde_json::to_value(service(name, json!({}))).unwrap();
    for (k, v) in spec.as_object().unwrap() {
        s["spec"][k] = v.clone();
    }
    serde_json::from_value(s).unwrap()
}

fn dual_stack(name: &str, policy: &str, families: &[&str]) -> Service {
    service_spec(name, json!({"ipFamilyPolicy": policy, "ipFamilies": families}))
}

fn lb_pool(name: &str, cidr: &str, block_size: u8) -> DynamicObject {
    serde_json::from_value(json!({
        "apiVersion": "crd.projectcalico.org/v1", "kind": "IPPool", "metadata": {"name": name},
        "spec": {"cidr": cidr, "blockSize": block_size, "allowedUses": ["LoadBalancer"], "nodeSelector": "all()"}
    }))
    .unwrap()
}

/// The status addresses of `name`, parsed, once there are `n` of them.
async fn wait_ingress(services: &Api<Service>, name: &str, n: usize) -> Vec<std::net::IpAddr> {
    wait_for(&format!("{n} status address(es) on {name}"), || async {
        let ips = ingress(&services.get(name).await.ok()?);
        (ips.len() == n).then(|| ips.iter().map(|ip| ip.parse().unwrap()).collect())
    })
    .await
}

/// The value of the one sample `series` (name and labels, exactly as rendered) in a scrape.
fn sample(body: &str, series: &str) -> Option<f64> {
    body.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// Each `(name, n)` Service's status names exactly the `n` addresses its handle holds, one per
/// family, and no address is allocated twice or to no Service.
async fn one_address_per_family(services: &Api<Service>, blocks: &Api<DynamicObject>, expected: &[(&str, usize)]) {
    let allocs = lb_allocations(blocks).await;
    let ips: std::collections::BTreeSet<&str> = allocs.iter().map(|(ip, _)| ip.as_str()).collect();
    assert_eq!(ips.len(), allocs.len(), "an address allocated twice: {allocs:?}");
    let mut seen = 0;
    for (name, n) in expected {
        let status = ingress(&services.get(name).await.expect("the Service"));
        assert_eq!(status.len(), *n, "{name}: {status:?}");
        let handles: std::collections::BTreeSet<&str> = allocs.iter().filter(|(ip, _)| status.contains(ip)).map(|(_, h)| h.as_str()).collect();
        assert_eq!(handles.len(), 1, "{name}'s addresses {status:?} are held by one handle: {allocs:?}");
        let held: Vec<&str> = allocs.iter().filter(|(_, h)| handles.contains(h.as_str())).map(|(ip, _)| ip.as_str()).collect();
        assert_eq!(held.len(), *n, "{name}'s handle holds only its status addresses: {allocs:?}");
        let families: std::collections::BTreeSet<bool> = status.iter().map(|ip| ip.parse::<std::net::IpAddr>().unwrap().is_ipv4()).collect();
        assert_eq!(families.len(), *n, "{name}: one address per family: {status:?}");
        seen += n;
    }
    assert_eq!(seen, allocs.len(), "every allocated address is in some Service's status: {allocs:?}");
}

const V4_SMALL: &str = "203.0.113.0/30";
const V6_POOL: &str = "2001:db8:5::/120";

#[tokio::test]
async fn dual_stack_services_get_one_address_per_family_and_an_exhausted_pool_is_reported() {
    let cluster = private_cluster();
    let client = cluster.client();
    let pools: Api<DynamicObject> = Api::all_with(client.clone(), &calico("IPPool", "ippools"));
    // Four IPv4 addresses in one block: two dual-stack Services and two IPv4 ones fill it.
    pools.create(&PostParams::default(), &lb_pool("lb-v4", V4_SMALL, 30)).await.expect("the IPv4 pool");
    pools.create(&PostParams::default(), &lb_pool("lb-v6", V6_POOL, 122)).await.expect("the IPv6 pool");
    let services: Api<Service> = Api::namespaced(client.clone(), "default");
    let blocks: Api<DynamicObject> = Api::all_with(client.clone(), &calico("IPAMBlock", "ipamblocks"));
    let port = free_port();
    let controller = start_controller(&cluster, &[], port, "lb-dual");

    for s in [
        dual_stack("require", "RequireDualStack", &["IPv4", "IPv6"]),
        dual_stack("prefer", "PreferDualStack", &["IPv6", "IPv4"]),
        dual_stack("v6-only", "SingleStack", &["IPv6"]),
        service("fill-a", json!({})),
        service("fill-b", json!({})),
    ] {
        services.create(&PostParams::default(), &s).await.unwrap_or_else(|e| panic!("{}: {e}", s.metadata.name.as_deref().unwrap_or_default()));
    }
    let (v4, v6): (ipnet::IpNet, ipnet::IpNet) = (V4_SMALL.parse().unwrap(), V6_POOL.parse().unwrap());
    for name in ["require", "prefer"] {
        let ips = wait_ingress(&services, name, 2).await;
        assert!(ips.iter().any(|ip| ip.is_ipv4() && v4.contains(ip)) && ips.iter().any(|ip| ip.is_ipv6() && v6.contains(ip)), "{name}: one address of each pool: {ips:?}");
    }
    let only = wait_ingress(&services, "v6-only", 1).await;
    assert!(v6.contains(&only[0]), "the IPv6-only Service gets an IPv6 address alone: {only:?}");
    for name in ["fill-a", "fill-b"] {
        wait_ingress(&services, name, 1).await;
    }
    one_address_per_family(&services, &blocks, &[("require", 2), ("prefer", 2), ("v6-only", 1), ("fill-a", 1), ("fill-b", 1)]).await;

    // The IPv4 pool is full: the next IPv4 Service gets nothing, an Event, and a failure counted.
    services.create(&PostParams::default(), &service("starved", json!({}))).await.expect("starved");
    let events: Api<Event> = Api::namespaced(client.clone(), "default");
    let event = wait_for("the Event on the starved Service", || async {
        events.list(&ListParams::default()).await.ok()?.items.into_iter().find(|e| e.reason.as_deref() == Some("LoadBalancerIPAssignmentFailed") && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("starved"))
    })
    .await;
    let note = event.note.clone().unwrap_or_default();
    assert!(note.contains("no free IPv4 address") && note.contains("lb-v4"), "the note says the pool is exhausted: {note:?}");
    assert_eq!(event.type_.as_deref(), Some("Warning"));
    let body = wait_for("the exhausted pool in the metrics", || async {
        let (code, body) = http_get(port, "/metrics").await?;
        let failures = sample(&body, "kube_controllers_loadbalancer_assignment_failures_total{reason=\"exhausted\"}")?;
        (code == 200 && failures >= 1.0).then_some(body)
    })
    .await;
    assert_eq!(sample(&body, "kube_controllers_loadbalancer_addresses{pool=\"lb-v4\"}"), Some(4.0), "the IPv4 pool's four addresses in use");
    assert_eq!(sample(&body, "kube_controllers_loadbalancer_addresses{pool=\"lb-v6\"}"), Some(3.0), "the IPv6 pool's three");
    assert!(ingress(&services.get("starved").await.unwrap()).is_empty());

    // An address freed: the starved Service gets it.
    let freed = ingress(&services.get("fill-a").await.unwrap());
    services.delete("fill-a", &DeleteParams::default()).await.expect("deleting fill-a");
    let got = wait_ingress(&services, "starved", 1).await;
    assert_eq!(vec![got[0].to_string()], freed, "starved gets fill-a's address");
    one_address_per_family(&services, &blocks, &[("require", 2), ("prefer", 2), ("v6-only", 1), ("fill-b", 1), ("starved", 1)]).await;
    assert!(!controller.log_text().contains("panicked"), "{}", controller.log_text());
}

#[tokio::test]
async fn of_two_replicas_only_the_leader_assigns_and_the_standby_takes_over_without_a_second_address() {
    let cluster = private_cluster();
    let client = cluster.client();
    let pools: Api<DynamicObject> = Api::all_with(client.clone(), &calico("IPPool", "ippools"));
    // Blocks of four: six Services need two IPv4 blocks, claimed by whichever replica leads.
    pools.create(&PostParams::default(), &lb_pool("lb-v4", POOL, 30)).await.expect("the IPv4 pool");
    pools.create(&PostParams::default(), &lb_pool("lb-v6", V6_POOL, 122)).await.expect("the IPv6 pool");
    let services: Api<Service> = Api::namespaced(client.clone(), "default");
    let blocks: Api<DynamicObject> = Api::all_with(client.clone(), &calico("IPAMBlock", "ipamblocks"));
    let tmp = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let status = |name: &str| tmp.join(format!("status-{name}-{}.json", std::process::id())).to_string_lossy().into_owned();
    let (status_a, status_b) = (status("lb-ha-a"), status("lb-ha-b"));
    let a = replica(&cluster, "lb-ha-a", &["--status-file", &status_a]);
    let b = replica(&cluster, "lb-ha-b", &["--status-file", &status_b]);
    // Created while the replicas start: both see them before either leads.
    let names = ["s1", "s2", "s3", "s4", "s5"];
    for name in names {
        services.create(&PostParams::default(), &dual_stack(name, "RequireDualStack", &["IPv4", "IPv6"])).await.expect(name);
    }
    let first = sole_leader(&cluster, &[&a, &b], DEADLINE).await;
    let (mut leader, follower) = if first == 0 { (a, b) } else { (b, a) };
    for name in names {
        wait_ingress(&services, name, 2).await;
    }
    let expected: Vec<(&str, usize)> = names.iter().map(|n| (*n, 2)).collect();
    one_address_per_family(&services, &blocks, &expected).await;

    // The standby wrote nothing: no LoadBalancer write counted, none in the audit log.
    let metrics = http_get(follower.port, "/metrics").await.expect("the standby's metrics").1;
    assert_eq!(metric_sum(&metrics, "kube_controllers_loadbalancer_writes_total"), 0.0, "the standby's LoadBalancer writes");
    let lb_write = |e: &audit::AuditEvent| e.is_ipam_write() || (e.resource == "services" && e.is_write());
    let events = audit::read(cluster.dir.as_ref().unwrap());
    assert!(events.iter().any(|e| lb_write(e) && e.sent_by(leader.name)), "the leader's writes are in the audit log");
    let strays: Vec<_> = events.iter().filter(|e| lb_write(e) && e.sent_by(follower.name)).collect();
    assert!(strays.is_empty(), "writes from the standby: {strays:#?}");

    // SIGKILL: the standby leads once the Lease runs out and gives a new Service its addresses.
    let killed_at = audit::now_ms();
    leader.guard.child.kill().expect("SIGKILL");
    let _ = leader.guard.child.wait();
    services.create(&PostParams::default(), &dual_stack("after-kill", "RequireDualStack", &["IPv4", "IPv6"])).await.expect("after-kill");
    sole_leader(&cluster, &[&follower], Duration::from_secs(30)).await;
    wait_ingress(&services, "after-kill", 2).await;
    let mut expected = expected;
    expected.push(("after-kill", 2));
    one_address_per_family(&services, &blocks, &expected).await;
    let v4_blocks = blocks.list(&ListParams::default()).await.unwrap().items.iter().filter(|b| b.data["spec"]["affinity"] == "virtual:load-balancer" && !b.data["spec"]["cidr"].as_str().unwrap().contains(':')).count();
    assert_eq!(v4_blocks, 2, "six IPv4 addresses in two blocks of four");

    let acquired_ms = lease(&cluster).await.and_then(|l| l.spec).and_then(|s| s.acquire_time).map(|t| t.0.as_millisecond()).expect("acquireTime");
    let events = audit::read(cluster.dir.as_ref().unwrap());
    let early: Vec<_> = events.iter().filter(|e| lb_write(e) && e.sent_by(follower.name) && e.received_ms < acquired_ms).collect();
    assert!(early.is_empty(), "the standby wrote before it took over at {acquired_ms}: {early:#?}");
    assert!(events.iter().any(|e| lb_write(e) && e.sent_by(follower.name)), "the new leader assigned after-kill's addresses");
    assert!(events.iter().filter(|e| lb_write(e) && e.sent_by(leader.name)).all(|e| e.received_ms <= killed_at), "the killed leader wrote after its death?");
    assert!(!follower.guard.log_text().contains("panicked"), "{}", follower.guard.log_text());
}
