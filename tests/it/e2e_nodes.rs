//! End-to-end node deletion (SPEC §5.11, §9.4 KDD part): three nodes holding their own,
//! borrowed and unaffine pod addresses and tunnel addresses. With a grace period of an hour,
//! nothing on a live node is touched; deleting a node releases exactly what belonged to it (its
//! pods' addresses wherever they are, its tunnels, its affinities), keeps blocks that still
//! hold other nodes' addresses with the deleted node's affinity (upstream's `mustBeEmpty`) until
//! those addresses go, and after the last node nothing of IPAM remains. One handle ID
//! carries the `\r` suffix that broken CNI versions wrote.

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Node;
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use serde_json::{Value, json};

use crate::support::cluster::private_cluster;
use crate::support::controller::{free_port, http_get, start_controller, wait_for};
use crate::support::ipam::{Alloc, Ipam, pod_attrs, tunnel_attrs};

const A: &str = "10.70.0.0/28";
const B: &str = "10.70.0.16/28";
const C: &str = "10.70.0.32/28";
const D: &str = "10.70.0.48/28";

fn allocated(spec: &Value, ordinal: usize) -> bool {
    !spec["allocations"][ordinal].is_null()
}

#[tokio::test]
async fn deleting_nodes_one_by_one_releases_exactly_their_ipam_and_finally_all_of_it() {
    let cluster = private_cluster();
    let client = cluster.client();
    let nodes: Api<Node> = Api::all(client.clone());
    for n in ["n-a", "n-b", "n-c"] {
        nodes.create(&PostParams::default(), &serde_json::from_value(json!({"metadata": {"name": n}})).unwrap()).await.expect("node");
    }
    let ipam = Ipam::new(&client);
    let pa = "k8s-pod-network.pa";
    let pb_borrowed = "k8s-pod-network.pb-borrowed";
    let pb = "k8s-pod-network.pb\r";
    let pc = "k8s-pod-network.pc";
    let tun_a = "ipip-tunnel-addr-n-a";
    let tun_b = "vxlan-tunnel-addr-n-b";
    let block_a = ipam
        .block(A, Some("n-a"), &[
            Alloc { ordinal: 1, handle: pa, secondary: pod_attrs("ns", "pa", "n-a") },
            Alloc { ordinal: 2, handle: pb_borrowed, secondary: pod_attrs("ns", "pb-borrowed", "n-b") },
            Alloc { ordinal: 3, handle: tun_a, secondary: tunnel_attrs("n-a", "ipipTunnelAddress") },
        ])
        .await;
    let block_b = ipam
        .block(B, Some("n-b"), &[
            Alloc { ordinal: 1, handle: pb, secondary: pod_attrs("ns", "pb", "n-b") },
            Alloc { ordinal: 2, handle: tun_b, secondary: tunnel_attrs("n-b", "vxlanTunnelAddress") },
        ])
        .await;
    let block_c = ipam.block(C, None, &[Alloc { ordinal: 1, handle: pc, secondary: pod_attrs("ns", "pc", "n-c") }]).await;
    let block_d = ipam.block(D, Some("n-c"), &[]).await;

    let port = free_port();
    let _controller = start_controller(&cluster, &["--leak-grace-period", "1h"], port, "nodes");
    wait_for("the controller's first report", || async { http_get(port, "/leak-report").await.filter(|(c, _)| *c == 200) }).await;
    // Live nodes, an hour of grace: a few passes change nothing.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let before = ipam.all_names().await;
    assert_eq!(before.len(), 4 + 6 + 3, "4 blocks, 6 handles, 3 affinities untouched: {before:?}");

    // n-a goes: its pod and tunnel in A are released, n-b's borrowed address in A stays, and
    // so does A, still affine to n-a, with n-a's affinity (a block that is not empty is held).
    let t = Instant::now();
    nodes.delete("n-a", &DeleteParams::default()).await.expect("deleting n-a");
    let spec_a = wait_for("n-a's addresses released", || async {
        let spec = ipam.block_spec(&block_a).await?;
        let handles_gone = !ipam.handle_exists(pa).await && !ipam.handle_exists(tun_a).await;
        (!allocated(&spec, 1) && !allocated(&spec, 3) && handles_gone).then_some(spec)
    })
    .await;
    eprintln!("n-a cleaned {:.1} s after its deletion", t.elapsed().as_secs_f64());
    assert!(allocated(&spec_a, 2), "n-b's borrowed address survives n-a's deletion: {spec_a}");
    // A few retries of n-a's release later, A is still held.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let spec_a = ipam.block_spec(&block_a).await.expect("block A stays");
    assert_eq!(spec_a["affinity"], "host:n-a", "a block that is not empty keeps its affinity: {spec_a}");
    assert!(ipam.affinity_exists("n-a", A).await, "and so does the deleted node's affinity for it");
    assert!(ipam.handle_exists(pb_borrowed).await && ipam.handle_exists(pb).await && ipam.handle_exists(pc).await);
    assert!(ipam.block_spec(&block_b).await.is_some_and(|s| allocated(&s, 1) && allocated(&s, 2)), "n-b's block untouched");
    assert!(ipam.block_spec(&block_c).await.is_some_and(|s| allocated(&s, 1)), "n-c's unaffine address untouched");
    assert!(ipam.block_spec(&block_d).await.is_some() && ipam.affinity_exists("n-c", D).await, "n-c's empty block untouched");

    // n-b goes: its borrowed address empties A, so n-a's retried release deletes A and n-a's
    // affinity; n-b's own block B with the `\r` handle and the VXLAN tunnel goes entirely.
    let t = Instant::now();
    nodes.delete("n-b", &DeleteParams::default()).await.expect("deleting n-b");
    wait_for("n-b's IPAM cleaned", || async {
        let gone = ipam.block_spec(&block_a).await.is_none()
            && !ipam.affinity_exists("n-a", A).await
            && ipam.block_spec(&block_b).await.is_none()
            && !ipam.affinity_exists("n-b", B).await
            && !ipam.handle_exists(pb).await
            && !ipam.handle_exists(pb_borrowed).await
            && !ipam.handle_exists(tun_b).await;
        gone.then_some(())
    })
    .await;
    eprintln!("n-b cleaned {:.1} s after its deletion", t.elapsed().as_secs_f64());
    assert!(ipam.block_spec(&block_c).await.is_some_and(|s| allocated(&s, 1)), "n-c's address survives n-b's deletion");

    // n-c goes: nothing of IPAM remains.
    let t = Instant::now();
    nodes.delete("n-c", &DeleteParams::default()).await.expect("deleting n-c");
    wait_for("every IPAM object gone", || async { ipam.all_names().await.is_empty().then_some(()) }).await;
    eprintln!("n-c cleaned {:.1} s after its deletion", t.elapsed().as_secs_f64());

    // Every cleanup is visible on its Node: one NodeIPAMReleased Event per deleted node, and the
    // released pod and tunnel addresses as IPAddressesReleased.
    let events: Api<Event> = Api::namespaced(client.clone(), "default");
    let seen = wait_for("the cleanup Events", || async {
        let list = events.list(&ListParams::default()).await.ok()?;
        let of = |reason: &str| -> Vec<String> {
            let mut v: Vec<String> = list.items.iter().filter(|e| e.reason.as_deref() == Some(reason)).filter_map(|e| e.regarding.as_ref()?.name.clone()).collect();
            v.sort();
            v
        };
        let cleaned = of("NodeIPAMReleased");
        (cleaned == ["n-a", "n-b", "n-c"]).then(|| (cleaned, of("IPAddressesReleased")))
    })
    .await;
    assert_eq!(seen.1, ["n-a", "n-b", "n-c"], "each node's released addresses are reported on it");
}

/// The mass-change guard on the real cluster: deleting 5 of 6 nodes at once (more than 20%, at
/// least 5) cleans nothing; the hold is visible in readiness, metrics and an Event, and the
/// operator's approval of the published id lets exactly that set go.
#[tokio::test]
async fn deleting_most_nodes_at_once_is_held_until_an_operator_approves_it() {
    let cluster = private_cluster();
    let client = cluster.client();
    let nodes: Api<Node> = Api::all(client.clone());
    let ipam = Ipam::new(&client);
    let names: Vec<String> = (0..6).map(|i| format!("m-{i}")).collect();
    let mut blocks = Vec::new();
    for (i, n) in names.iter().enumerate() {
        nodes.create(&PostParams::default(), &serde_json::from_value(json!({"metadata": {"name": n}})).unwrap()).await.expect("node");
        let tunnel = format!("ipip-tunnel-addr-{n}");
        let cidr = format!("10.71.0.{}/28", i * 16);
        blocks.push(ipam.block(&cidr, Some(n), &[Alloc { ordinal: 1, handle: &tunnel, secondary: tunnel_attrs(n, "ipipTunnelAddress") }]).await);
    }
    let port = free_port();
    let _controller = start_controller(&cluster, &["--leak-grace-period", "1h"], port, "mass-change");
    wait_for("the controller's first report", || async { http_get(port, "/leak-report").await.filter(|(c, _)| *c == 200) }).await;
    for n in &names[..5] {
        nodes.delete(n, &DeleteParams::default()).await.expect("deleting a node");
    }
    let held = "kube_controllers_mass_change_held{scope=\"ipam-nodes\"} 5";
    wait_for("the guard holding the five node cleanups", || async {
        let (_, metrics) = http_get(port, "/metrics").await?;
        metrics.contains(held).then_some(())
    })
    .await;
    let (code, readiness) = http_get(port, "/readiness").await.expect("readiness answers");
    assert_ne!(code, 200, "not ready while a mass change waits: {readiness}");
    let key = "calico-kube-controllers/approve-mass-change=";
    let at = readiness.find(key).unwrap_or_else(|| panic!("readiness names the approval: {readiness}"));
    let id: String = readiness[at + key.len()..].chars().take_while(|c| c.is_ascii_hexdigit()).collect();
    assert_eq!(id.len(), 16, "{readiness}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    for b in &blocks {
        assert!(ipam.block_spec(b).await.is_some_and(|s| allocated(&s, 1)), "nothing cleaned while held: {b}");
    }
    let events: Api<Event> = Api::namespaced(client.clone(), "default");
    let warning = events.list(&ListParams::default()).await.expect("events").items.into_iter().find(|e| e.reason.as_deref() == Some("MassChangeHeld"));
    let warning = warning.expect("a MassChangeHeld Event");
    assert_eq!(warning.type_.as_deref(), Some("Warning"));
    assert!(warning.note.as_deref().is_some_and(|n| n.contains(&id)), "{warning:?}");

    // The operator approves the published set.
    let kcc = kube::api::ApiResource {
        group: "crd.projectcalico.org".into(),
        version: "v1".into(),
        api_version: "crd.projectcalico.org/v1".into(),
        kind: "KubeControllersConfiguration".into(),
        plural: "kubecontrollersconfigurations".into(),
    };
    let kccs: Api<kube::api::DynamicObject> = Api::all_with(client.clone(), &kcc);
    let patch = json!({"metadata": {"annotations": {"calico-kube-controllers/approve-mass-change": id}}});
    kccs.patch("default", &PatchParams::default(), &Patch::Merge(&patch)).await.expect("annotating the configuration");
    wait_for("the five nodes cleaned", || async {
        let mut left = 0;
        for b in &blocks[..5] {
            left += usize::from(ipam.block_spec(b).await.is_some());
        }
        (left == 0).then_some(())
    })
    .await;
    assert!(ipam.block_spec(&blocks[5]).await.is_some_and(|s| allocated(&s, 1)), "the live node keeps its tunnel");
    wait_for("ready again", || async { http_get(port, "/readiness").await.filter(|(c, _)| *c == 200) }).await;
}

/// A block whose deleter died between KDD's two steps (marked `deleted`, never deleted) is
/// finished by the leader before anything touches its handle: the block goes first, and the
/// handle it named is only then an orphan (deleted after its own two observations).
#[tokio::test]
async fn a_half_soft_deleted_block_is_finished_before_its_handle_is_touched() {
    let cluster = private_cluster();
    let client = cluster.client();
    let nodes: Api<Node> = Api::all(client.clone());
    nodes.create(&PostParams::default(), &serde_json::from_value(json!({"metadata": {"name": "n-s"}})).unwrap()).await.expect("node");
    let ipam = Ipam::new(&client);
    let handle = "k8s-pod-network.half-deleted";
    let block = ipam.block("10.72.0.0/28", Some("n-s"), &[Alloc { ordinal: 1, handle, secondary: pod_attrs("ns", "gone", "n-s") }]).await;
    // A second block keeps n-s from losing its last block to the empty-block rule.
    ipam.block("10.72.0.16/28", Some("n-s"), &[]).await;
    let mark = json!({"spec": {"deleted": true}});
    ipam.blocks.patch(&block, &PatchParams::default(), &Patch::Merge(&mark)).await.expect("marking the block deleted");
    let port = free_port();
    let _controller = start_controller(&cluster, &[], port, "half-deleted");
    wait_for("the half-deleted block finished", || async { ipam.block_spec(&block).await.is_none().then_some(()) }).await;
    assert!(ipam.handle_exists(handle).await, "the handle outlives the block it was named by");
    wait_for("the handle, an orphan now, deleted after its two observations", || async { (!ipam.handle_exists(handle).await).then_some(()) }).await;
}
