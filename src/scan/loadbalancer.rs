//! `leak-scan`'s LoadBalancer addresses: those the LoadBalancer controller would release (their
//! Service gone or recreated, no longer Calico's, asking for another address or pool), reported
//! as `lb-unwanted` leaks. Only that controller releases them, so they are never releasable here
//! and stay `inUse: true` in calicoctl's map (`calicoctl ipam release --from-report` leaves them).
//!
//! Owns: what a dump or a live listing contributes (Services kept slim and only of type
//! LoadBalancer, each block's LB holdings, the handles of blocks that cannot be read), when the
//! observation is not enough to judge (no Services or IP pools read, Services read before IPAM,
//! copies that cannot be ordered, an `assignIPs` the controller refuses), and the report's
//! `loadBalancer` section.
//! Must not: decide by itself: every verdict is [`lb::decide_held`], the call the controller acts
//! on, over the holdings [`lb::holdings`] finds, as the controller finds them; nor turn a missing
//! observation into a leak (what cannot be judged is counted as not judged, with a note).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnet::IpNet;
use serde::Serialize;
use serde_json::Value;

use super::dump::DumpContents;
use super::order;
use super::report::{LeakEntry, LeakReport};
use crate::ipam::index::IpamIndex;
use crate::ipam::plan::{HeldBy, LeakReason};
use crate::loadbalancer::{self as lb, AssignMode, LbHolding, LbPool};
use crate::model::block::{Affinity, BlockView};
use crate::model::names::ip_sort_key;
use crate::model::time::Millis;
use crate::model::IpamBlock;

/// What a dump or a live listing holds for the LoadBalancer judgment.
#[derive(Debug, Default)]
pub struct LbInputs {
    /// `<namespace>/<name>` -> the slim Service ([`lb::slim_service`]), only those of type
    /// LoadBalancer: for any other the controller's decision is the one it makes for a gone
    /// Service (everything its handle holds is released), so they need not be kept.
    pub services: BTreeMap<String, Value>,
    /// Service objects read (any type).
    pub services_read: u64,
    /// A live scan listed the Services.
    pub services_listed: bool,
    /// A live scan could not list the Services: why.
    pub services_unlisted: Option<String>,
    /// Services whose copies could not be ordered, or that could not be read: their addresses
    /// are not judged.
    pub held_services: BTreeSet<String>,
    /// A Service so broken that it names no one: no LoadBalancer address is judged.
    pub unnamed_service: bool,
    /// Block object name -> the LoadBalancer addresses it holds.
    pub holdings: BTreeMap<String, Vec<LbHolding>>,
    /// Handles named by blocks that cannot be read: their Services are left as they are.
    pub unreadable_handles: BTreeSet<String>,
}

impl LbInputs {
    /// Takes the copy of a block the dump keeps (a newer copy replaces what an older one held).
    pub(crate) fn absorb_block(&mut self, block: &IpamBlock) {
        // Most blocks are hosts': they hold no LB address, and need no second validation.
        if matches!(Affinity::parse(block.spec.affinity.as_deref()), Affinity::Host(_)) {
            self.holdings.remove(block.name());
            return;
        }
        match BlockView::from_block(block) {
            Ok(view) => {
                let held = lb::holdings(&view);
                if held.is_empty() {
                    self.holdings.remove(block.name());
                } else {
                    self.holdings.insert(block.name().to_string(), held);
                }
            }
            Err(_) => {
                self.holdings.remove(block.name());
                self.unreadable_handles.extend(serde_json::to_value(block).map(|v| lb::unreadable_block_handles(&v)).unwrap_or_default());
            }
        }
    }
}

/// The report's `loadBalancer` section (leak-scan only).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LoadBalancerSection {
    /// The `assignIPs` the addresses were judged with (empty when none could be).
    #[serde(rename = "assignIPs")]
    pub assign_ips: String,
    /// LoadBalancer addresses the blocks hold, counted as the controller counts them.
    pub addresses: u64,
    /// Those whose Service no longer wants them: the `lb-unwanted` leaks.
    pub unwanted: u64,
    /// Those that could not be judged (`notes` says why): neither a leak nor proven wanted.
    pub not_judged: u64,
    pub notes: Vec<String>,
}

/// Whether the dump has a List of `list_kind` or an object counted as `kind`.
fn seen(dump: &DumpContents, kind: &str, list_kind: &str) -> bool {
    dump.kind_counts.get(kind).copied().unwrap_or(0) > 0 || dump.lists.iter().any(|l| l.head.kind == list_kind)
}

/// Why nothing of the LoadBalancer addresses can be judged, if so.
fn whole_reason(dump: &DumpContents) -> Option<String> {
    if let Some(e) = &dump.lb.services_unlisted {
        return Some(format!("the Services could not be listed ({e}); the scan's account needs `list services`"));
    }
    if !dump.lb.services_listed && dump.lb.services_read == 0 && !dump.lists.iter().any(|l| l.head.kind == "ServiceList") {
        return Some(
            "the dump has no Services, so whether their Services still want them is unknown; dump them after IPAM: \
             `kubectl get --raw /api/v1/services > dump/services.json` (or `leak-scan --save-dump`)"
                .into(),
        );
    }
    if dump.lb.unnamed_service {
        return Some("a Service of the dump could not be read, not even its name".into());
    }
    if !dump.read_live && !seen(dump, "IPPool", "IPPoolList") {
        return Some(
            "the dump has no IPPools, and without LoadBalancer pools every address would look unwanted; \
             dump them: `kubectl get --raw /apis/crd.projectcalico.org/v1/ippools > dump/ippools.json`"
                .into(),
        );
    }
    if dump.conflicting_settings {
        return Some("an IP pool or a configuration singleton came in copies that cannot be ordered".into());
    }
    order::services_before_ipam(dump)
}

/// Judges every LoadBalancer address of `dump` and adds the `lb-unwanted` leaks to `report`
/// (never releasable; counted in the summary) with the `loadBalancer` section.
pub fn judge(dump: &DumpContents, index: &IpamIndex, now: Millis, report: &mut LeakReport) {
    let held = lb::by_handle(dump.lb.holdings.values().flatten().cloned());
    let addresses: u64 = held.values().map(|(_, h)| h.len() as u64).sum();
    let mut section = LoadBalancerSection { addresses, ..LoadBalancerSection::default() };
    let configured = dump.kube_controllers_config.as_ref().map(|k| k.spec.controllers.load_balancer_assign_ips());
    let assign_ips = configured.flatten().unwrap_or("AllServices");
    let (mode, whole) = match AssignMode::from_config(assign_ips) {
        Ok(mode) => {
            section.assign_ips = assign_ips.to_string();
            (Some(mode), whole_reason(dump))
        }
        Err(e) => (None, Some(e.to_string())),
    };
    let (Some(mode), None, true) = (mode, &whole, addresses > 0) else {
        if let Some(reason) = whole.filter(|_| addresses > 0) {
            section.not_judged = addresses;
            section.notes.push(format!("{addresses} LoadBalancer addresses not judged: {reason}"));
        }
        report.load_balancer = Some(section);
        return;
    };
    match configured {
        // AllServices manages the most Services, so the fewest addresses look unwanted.
        None => section.notes.push("no KubeControllersConfiguration read: judged with assignIPs AllServices, the default".into()),
        Some(None) => section.notes.push(
            "the KubeControllersConfiguration has no loadBalancer section: judged with assignIPs AllServices; the LoadBalancer \
             controller runs (and releases unwanted addresses) only if ENABLED_CONTROLLERS names loadbalancer"
                .into(),
        ),
        Some(Some(_)) => {}
    }
    let lb_pools: Vec<LbPool> = dump.pools.iter().filter_map(|p| serde_json::to_value(p).ok()).filter_map(|p| LbPool::from_ip_pool(&p)).collect();
    let contested: BTreeSet<IpNet> = dump.held_blocks.iter().filter_map(|c| c.parse::<IpNet>().ok()).map(|c| c.trunc()).collect();
    let already: BTreeSet<String> = report.leaks.iter().map(|l| l.ip.clone()).collect();
    let mut unjudged_handles = 0u64;
    let mut entries = Vec::new();
    for (handle, (key, holding)) in &held {
        let name = format!("{}/{}", key.namespace, key.name);
        if dump.lb.unreadable_handles.contains(handle) || dump.lb.held_services.contains(&name) || holding.iter().any(|h| contested.contains(&h.cidr)) {
            section.not_judged += holding.len() as u64;
            unjudged_handles += 1;
            continue;
        }
        let d = lb::decide_held(dump.lb.services.get(&name), key, mode, holding, &lb_pools);
        for h in holding.iter().filter(|h| d.release.contains(&h.ip)) {
            let in_index = index.block_slot(&h.cidr).and_then(|s| index.block(s)).and_then(|b| b.alloc(h.ordinal)).is_some();
            let ip = h.ip.to_string();
            if !in_index || already.contains(&ip) {
                continue;
            }
            section.unwanted += 1;
            entries.push(entry(h, ip, now));
        }
    }
    if unjudged_handles > 0 {
        section.notes.push(format!(
            "{} addresses of {unjudged_handles} Services not judged: a block they are in could not be read or came in copies that \
             cannot be ordered, or so did the Service",
            section.not_judged
        ));
    }
    let s = &mut report.summary;
    for _ in &entries {
        *s.leaks_by_reason.entry(LeakReason::LoadBalancerUnwanted.as_str()).or_default() += 1;
        *s.held_by.entry(HeldBy::LoadBalancerController.as_str()).or_default() += 1;
    }
    s.leaks += entries.len() as u64;
    s.held_leaks += entries.len() as u64;
    report.leaks.extend(entries);
    report.leaks.sort_by_key(|l| l.ip.parse::<IpAddr>().map(|ip| ip_sort_key(&ip)).unwrap_or((0, 0)));
    report.load_balancer = Some(section);
}

fn entry(h: &LbHolding, ip: String, now: Millis) -> LeakEntry {
    LeakEntry {
        ip,
        block: h.cidr.to_string(),
        handle: h.key.handle.clone(),
        namespace: h.key.namespace.clone(),
        pod: String::new(),
        service: h.key.name.clone(),
        node: String::new(),
        reason: LeakReason::LoadBalancerUnwanted.as_str(),
        releasable: false,
        held_by: Some(HeldBy::LoadBalancerController.as_str()),
        // The controller has no grace period: its next round releases it.
        state: "confirmed",
        first_seen: now,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scan::dump::read_bytes;
    use crate::scan::report::{scan_dump, write_table, ScanOptions};
    use serde_json::json;

    const NOW: Millis = 1_800_000_000_000;

    /// A typed List as the API server writes it: kind and version before the items, which carry
    /// no kind of their own.
    fn list(kind: &str, rv: &str, items: Vec<Value>) -> String {
        let items: Vec<String> = items.iter().map(Value::to_string).collect();
        format!(r#"{{"kind":"{kind}List","apiVersion":"v1","metadata":{{"resourceVersion":"{rv}"}},"items":[{}]}}"#, items.join(","))
    }

    /// The GC's part: node n1, the live pod shop/live, and a host block holding its address and
    /// a gone pod's.
    fn gc_part(rv: &str) -> Vec<String> {
        vec![
            list("Node", rv, vec![json!({"metadata": {"name": "n1"}})]),
            list("Pod", rv, vec![json!({"metadata": {"name": "live", "namespace": "shop", "uid": "p1"}, "spec": {"nodeName": "n1"},
                "status": {"phase": "Running", "podIP": "10.0.0.1", "podIPs": [{"ip": "10.0.0.1"}]}})]),
        ]
    }

    fn host_block() -> Value {
        json!({"apiVersion": "crd.projectcalico.org/v1", "kind": "IPAMBlock", "metadata": {"name": "10-0-0-0-30"},
            "spec": {"cidr": "10.0.0.0/30", "affinity": "host:n1", "allocations": [null, 0, 1, null], "unallocated": [0, 3],
                "attributes": [{"handle_id": "k8s-pod-network.live", "secondary": {"namespace": "shop", "pod": "live", "node": "n1"}},
                               {"handle_id": "k8s-pod-network.dead", "secondary": {"namespace": "shop", "pod": "dead", "node": "n1"}}]}})
    }

    /// The LoadBalancer block 192.0.2.0/29: ordinal i held by the Service `owners[i]` (name,
    /// the uid its handle was made with).
    fn lb_block(owners: &[(&str, &str)]) -> Value {
        let mut allocations = vec![Value::Null; 8];
        let mut attributes = Vec::new();
        for (i, (name, uid)) in owners.iter().enumerate() {
            allocations[i] = json!(i);
            attributes.push(json!({"handle_id": lb::handle_id(name, "shop", uid), "secondary": {"namespace": "shop", "service": name, "type": "LoadBalancer", "timestamp": "t"}}));
        }
        json!({"apiVersion": "crd.projectcalico.org/v1", "kind": "IPAMBlock", "metadata": {"name": "192-0-2-0-29"},
            "spec": {"cidr": "192.0.2.0/29", "affinity": "virtual:load-balancer", "allocations": allocations, "unallocated": [], "attributes": attributes}})
    }

    fn pool() -> Value {
        json!({"apiVersion": "crd.projectcalico.org/v1", "kind": "IPPool", "metadata": {"name": "lb"}, "spec": {"cidr": "192.0.2.0/28", "allowedUses": ["LoadBalancer"]}})
    }

    fn service(name: &str, uid: &str, spec: Value, annotations: Value) -> Value {
        let mut s = json!({"metadata": {"name": name, "namespace": "shop", "uid": uid, "annotations": annotations},
            "spec": {"type": "LoadBalancer", "ipFamilies": ["IPv4"], "ipFamilyPolicy": "SingleStack", "ports": [{"port": 80}]}});
        for (k, v) in spec.as_object().unwrap() {
            s["spec"][k] = v.clone();
        }
        s
    }

    /// Six LoadBalancer addresses: web's (still wanted), then those of a gone Service, one turned
    /// ClusterIP, one of another class, one asking for another address, one recreated.
    const OWNERS: [(&str, &str); 6] = [("web", "u-web"), ("gone", "u-gone"), ("cip", "u-cip"), ("other", "u-other"), ("asks", "u-asks"), ("again", "u-old")];

    fn services() -> Vec<Value> {
        vec![
            service("web", "u-web", json!({}), json!({})),
            service("cip", "u-cip", json!({"type": "ClusterIP"}), json!({})),
            service("other", "u-other", json!({"loadBalancerClass": "metallb.io/metallb"}), json!({})),
            service("asks", "u-asks", json!({}), json!({"projectcalico.org/loadBalancerIPs": "[\"192.0.2.9\"]"})),
            service("again", "u-new", json!({}), json!({})),
            json!({"metadata": {"name": "kubernetes", "namespace": "default", "uid": "k"}, "spec": {"type": "ClusterIP"}}),
        ]
    }

    /// IPAM (rv 10), then the Services (`services`, rv 11) and the GC's part (rv 12).
    fn dump(extra_ipam: Vec<Value>, services: Option<Vec<Value>>) -> String {
        let mut parts = vec![list("IPAMBlock", "10", [vec![host_block(), lb_block(&OWNERS)], extra_ipam].concat()), list("IPPool", "10", vec![pool()])];
        if let Some(s) = services {
            parts.push(list("Service", "11", s));
        }
        parts.extend(gc_part("12"));
        parts.join("\n")
    }

    fn scan(text: &str) -> LeakReport {
        let mut d = read_bytes("dump.json", text.as_bytes()).unwrap();
        scan_dump(&mut d, NOW, &ScanOptions::default()).unwrap()
    }

    fn lb_leaks(r: &LeakReport) -> Vec<(&str, &str)> {
        r.leaks.iter().filter(|l| l.reason == "lb-unwanted").map(|l| (l.ip.as_str(), l.service.as_str())).collect()
    }

    fn in_use(r: &LeakReport, ip: &str) -> bool {
        r.allocations[ip][0].in_use
    }

    #[test]
    fn unwanted_lb_addresses_are_leaks_of_their_own_never_releasable_and_in_use_for_calicoctl() {
        let r = scan(&dump(Vec::new(), Some(services())));
        assert_eq!(lb_leaks(&r), [("192.0.2.1", "gone"), ("192.0.2.2", "cip"), ("192.0.2.3", "other"), ("192.0.2.4", "asks"), ("192.0.2.5", "again")]);
        for l in r.leaks.iter().filter(|l| l.reason == "lb-unwanted") {
            assert!(!l.releasable && l.held_by == Some("loadbalancer-controller") && l.namespace == "shop" && l.pod.is_empty(), "{l:?}");
            assert!(l.handle.starts_with("lb-"), "{l:?}");
            assert!(in_use(&r, &l.ip), "calicoctl must not free {}", l.ip);
        }
        assert!(in_use(&r, "192.0.2.0"), "web's address is wanted");
        assert!(!in_use(&r, "10.0.0.2"), "the GC's releasable leak is unchanged");
        assert_eq!(r.releasable_leaks(), 1, "only the gone pod's address is releasable");
        let s = &r.summary;
        assert_eq!((s.leaks, s.releasable_leaks, s.held_leaks), (6, 1, 5));
        assert_eq!(s.leaks_by_reason.get("lb-unwanted"), Some(&5));
        assert_eq!(s.held_by.get("loadbalancer-controller"), Some(&5));
        let lb = r.load_balancer.as_ref().unwrap();
        assert_eq!((lb.addresses, lb.unwanted, lb.not_judged, lb.assign_ips.as_str()), (6, 5, 0, "AllServices"));
        assert!(lb.notes.iter().any(|n| n.contains("no KubeControllersConfiguration")), "{:?}", lb.notes);
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["loadBalancer"]["unwanted"], 5);
        let gone = v["leaks"].as_array().unwrap().iter().find(|l| l["ip"] == "192.0.2.1").unwrap();
        assert_eq!((gone["reason"].as_str(), gone["service"].as_str(), gone["releasable"].as_bool()), (Some("lb-unwanted"), Some("gone"), Some(false)));
        assert!(v["leaks"].as_array().unwrap().iter().find(|l| l["ip"] == "10.0.0.2").unwrap().get("service").is_none(), "pod leaks carry no service");
        let mut table = Vec::new();
        write_table(&r, &mut table).unwrap();
        let table = String::from_utf8(table).unwrap();
        assert!(table.contains("lb-unwanted") && table.contains("service shop/gone (held: loadbalancer-controller)"), "{table}");
        assert!(table.contains("loadbalancer:       6 addresses (5 unwanted, 0 not judged; assignIPs AllServices)"), "{table}");
    }

    #[test]
    fn a_dump_without_services_judges_no_lb_address_and_says_how_to_dump_them() {
        let r = scan(&dump(Vec::new(), None));
        assert!(lb_leaks(&r).is_empty(), "no leak invented from a missing observation");
        assert_eq!(r.summary.leaks, 1);
        let lb = r.load_balancer.as_ref().unwrap();
        assert_eq!((lb.addresses, lb.unwanted, lb.not_judged), (6, 0, 6));
        assert!(lb.notes[0].contains("the dump has no Services") && lb.notes[0].contains("/api/v1/services"), "{:?}", lb.notes);
        let mut table = Vec::new();
        write_table(&r, &mut table).unwrap();
        assert!(String::from_utf8(table).unwrap().contains("note: 6 LoadBalancer addresses not judged: the dump has no Services"));
        // An empty Service List is an observation: Services there are none.
        let r = scan(&dump(Vec::new(), Some(Vec::new())));
        assert_eq!(lb_leaks(&r).len(), 6, "every Service is gone");
    }

    #[test]
    fn requested_services_only_from_the_configuration_leaves_unrequesting_services_without_addresses() {
        let kcc = json!({"apiVersion": "crd.projectcalico.org/v1", "kind": "KubeControllersConfiguration", "metadata": {"name": "default"},
            "spec": {"controllers": {"node": {}, "loadBalancer": {"assignIPs": "RequestedServicesOnly"}}}});
        let mut with_calico_class = services();
        with_calico_class.push(service("classy", "u-classy", json!({"loadBalancerClass": "calico"}), json!({})));
        let text = format!("{}\n{kcc}", dump(vec![], Some(with_calico_class)));
        let r = scan(&text);
        let unwanted: Vec<&str> = lb_leaks(&r).into_iter().map(|(_, s)| s).collect();
        assert_eq!(unwanted, ["web", "gone", "cip", "other", "asks", "again"], "web asks for nothing; asks still asks for another address");
        assert_eq!(r.load_balancer.as_ref().unwrap().assign_ips, "RequestedServicesOnly");
        // A configuration without a loadBalancer section: judged as AllServices, and said so.
        let kcc = json!({"apiVersion": "crd.projectcalico.org/v1", "kind": "KubeControllersConfiguration", "metadata": {"name": "default"}, "spec": {"controllers": {"node": {}}}});
        let r = scan(&format!("{}\n{kcc}", dump(vec![], Some(services()))));
        assert_eq!(lb_leaks(&r).len(), 5);
        assert!(r.load_balancer.as_ref().unwrap().notes.iter().any(|n| n.contains("no loadBalancer section")));
    }

    #[test]
    fn an_unknown_assign_ips_missing_pools_or_services_read_before_ipam_judge_nothing() {
        let kcc = json!({"apiVersion": "crd.projectcalico.org/v1", "kind": "KubeControllersConfiguration", "metadata": {"name": "default"},
            "spec": {"controllers": {"loadBalancer": {"assignIPs": "Sometimes"}}}});
        let r = scan(&format!("{}\n{kcc}", dump(vec![], Some(services()))));
        let lb = r.load_balancer.as_ref().unwrap();
        assert!(lb_leaks(&r).is_empty() && lb.not_judged == 6 && lb.notes[0].contains("Sometimes"), "{lb:?}");
        // No IP pools in the dump: without LB pools the controller would release everything.
        let text = dump(vec![], Some(services())).replace("\"allowedUses\":[\"LoadBalancer\"]", "\"allowedUses\":[\"Workload\"]");
        assert_eq!(lb_leaks(&scan(&text)).len(), 6, "an observed pool list without LB pools: the controller releases all");
        let no_pools: String = dump(vec![], Some(services())).lines().filter(|l| !l.contains("IPPoolList")).collect::<Vec<_>>().join("\n");
        let r = scan(&no_pools);
        assert!(lb_leaks(&r).is_empty() && r.load_balancer.as_ref().unwrap().notes[0].contains("no IPPools"), "{:?}", r.load_balancer);
        // Services listed before IPAM: a Service created in between would look gone.
        let early = dump(vec![], Some(services())).replace("\"resourceVersion\":\"11\"", "\"resourceVersion\":\"9\"");
        let r = scan(&early);
        assert!(lb_leaks(&r).is_empty(), "{:?}", r.leaks);
        assert!(r.load_balancer.as_ref().unwrap().notes[0].contains("were read before IPAMBlocks"), "{:?}", r.load_balancer);
    }

    #[test]
    fn a_service_in_an_unreadable_block_or_with_contested_copies_is_not_judged() {
        // A block that cannot be read names gone's handle: what else it holds is unknown.
        let broken = json!({"apiVersion": "crd.projectcalico.org/v1", "kind": "IPAMBlock", "metadata": {"name": "192-0-2-8-29"},
            "spec": {"cidr": "192.0.2.8/29", "affinity": "virtual:load-balancer", "allocations": "oops",
                     "attributes": [{"handle_id": lb::handle_id("gone", "shop", "u-gone")}]}});
        // cip twice, different, without versions to order them.
        let mut svcs = services();
        svcs.push(service("cip", "u-cip", json!({"type": "NodePort"}), json!({})));
        let r = scan(&dump(vec![broken], Some(svcs)));
        let unwanted: Vec<&str> = lb_leaks(&r).into_iter().map(|(_, s)| s).collect();
        assert_eq!(unwanted, ["other", "asks", "again"]);
        let lb = r.load_balancer.as_ref().unwrap();
        assert_eq!((lb.unwanted, lb.not_judged), (3, 2));
        assert!(lb.notes.iter().any(|n| n.starts_with("2 addresses of 2 Services not judged")), "{:?}", lb.notes);
        assert!(r.duplicates.iter().any(|d| d.kind == "Service" && d.name == "shop/cip" && d.resolution == "held"), "{:?}", r.duplicates);
    }

    #[test]
    fn a_dump_without_lb_addresses_has_an_empty_section_and_no_notes() {
        let text = [list("IPAMBlock", "10", vec![host_block()])].into_iter().chain(gc_part("12")).collect::<Vec<_>>().join("\n");
        let r = scan(&text);
        assert_eq!(r.load_balancer, Some(LoadBalancerSection { assign_ips: "AllServices".into(), ..LoadBalancerSection::default() }));
    }
}
