//! Property tests: random NetworkPolicies, good and bad, converted and then judged by two small
//! evaluators written here from the two languages' documented meaning, not from the converter.
//!
//! Laws: conversion never panics; every selector starts with the orchestrator term; in DropRule
//! mode the Calico policy never allows a packet the Kubernetes policy does not; for a policy
//! Kubernetes would accept, both allow exactly the same packets, nothing is dropped, and both
//! modes agree.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;
use proptest::prelude::*;
use serde_json::{Value, json};

use super::*;

type Labels = BTreeMap<String, String>;

// ---------------------------------------------------------------------------------------------
// The Kubernetes side, as a typed model that renders to JSON.

#[derive(Clone, Debug)]
struct Expr {
    key: String,
    op: String,
    values: Vec<String>,
}

#[derive(Clone, Debug)]
struct Sel {
    labels: Labels,
    exprs: Vec<Expr>,
}

#[derive(Clone, Debug)]
enum Peer {
    Selectors { pods: Option<Sel>, namespaces: Option<Sel> },
    Block { cidr: String, except: Vec<String> },
    Garbage(Value),
}

#[derive(Clone, Debug)]
enum PortValue {
    Num(i64),
    Name(String),
}

#[derive(Clone, Debug)]
enum Port {
    Entry { protocol: Option<String>, port: Option<PortValue>, end: Option<i64> },
    Garbage(Value),
}

#[derive(Clone, Debug)]
enum Rule {
    Rule { peers: Vec<Peer>, ports: Vec<Port> },
    Garbage(Value),
}

#[derive(Clone, Debug)]
struct Policy {
    pod_selector: Option<Sel>,
    ingress: Vec<Rule>,
    egress: Vec<Rule>,
    types: Option<Vec<String>>,
}

impl Sel {
    fn to_json(&self) -> Value {
        let exprs: Vec<Value> = self
            .exprs
            .iter()
            .map(|e| if e.values.is_empty() { json!({"key": e.key, "operator": e.op}) } else { json!({"key": e.key, "operator": e.op, "values": e.values}) })
            .collect();
        json!({"matchLabels": self.labels, "matchExpressions": exprs})
    }

    fn valid(&self) -> bool {
        let key_ok = |k: &str| k.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'/')) && !k.is_empty();
        let value_ok = |v: &str| v.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'));
        self.labels.iter().all(|(k, v)| key_ok(k) && value_ok(v))
            && self.exprs.iter().all(|e| {
                key_ok(&e.key)
                    && e.values.iter().all(|v| value_ok(v))
                    && match e.op.as_str() {
                        "In" | "NotIn" => !e.values.is_empty(),
                        "Exists" | "DoesNotExist" => e.values.is_empty(),
                        _ => false,
                    }
            })
    }

    fn matches(&self, labels: &Labels) -> bool {
        self.labels.iter().all(|(k, v)| labels.get(k) == Some(v))
            && self.exprs.iter().all(|e| match e.op.as_str() {
                "In" => labels.get(&e.key).is_some_and(|v| e.values.contains(v)),
                "NotIn" => labels.get(&e.key).is_none_or(|v| !e.values.contains(v)),
                "Exists" => labels.contains_key(&e.key),
                _ => !labels.contains_key(&e.key),
            })
    }
}

fn k8s_net(s: &str) -> Option<IpNet> {
    s.parse::<IpNet>().ok()
}

impl Peer {
    fn to_json(&self) -> Value {
        match self {
            Peer::Selectors { pods, namespaces } => {
                let mut m = serde_json::Map::new();
                if let Some(p) = pods {
                    m.insert("podSelector".into(), p.to_json());
                }
                if let Some(n) = namespaces {
                    m.insert("namespaceSelector".into(), n.to_json());
                }
                Value::Object(m)
            }
            Peer::Block { cidr, except } => json!({"ipBlock": {"cidr": cidr, "except": except}}),
            Peer::Garbage(v) => v.clone(),
        }
    }

    /// Kubernetes accepts the peer.
    fn valid(&self) -> bool {
        self.meaningful() && self.strict_excepts()
    }

    /// Every except lies strictly inside the CIDR (Kubernetes refuses others, but their meaning,
    /// the CIDR minus the excepts, is still plain: see [`Peer::meaningful`]).
    fn strict_excepts(&self) -> bool {
        let Peer::Block { cidr, except } = self else { return true };
        let Some(net) = k8s_net(cidr) else { return false };
        except.iter().all(|e| k8s_net(e).is_some_and(|x| x.prefix_len() > net.prefix_len() && net.contains(&x)))
    }

    /// The peer has a meaning Kubernetes would agree with, even if it refuses it as written.
    fn meaningful(&self) -> bool {
        match self {
            Peer::Selectors { pods: None, namespaces: None } | Peer::Garbage(_) => false,
            Peer::Selectors { pods, namespaces } => pods.iter().chain(namespaces).all(Sel::valid),
            Peer::Block { cidr, except } => {
                let Some(net) = k8s_net(cidr) else { return false };
                // Kubernetes wants each except a strict subset of the CIDR; IPv4-mapped IPv6 is left out.
                let mapped = |n: &IpNet| matches!(n, IpNet::V6(v6) if v6.addr().to_ipv4_mapped().is_some());
                !mapped(&net)
                    && except.iter().all(|e| {
                        k8s_net(e).is_some_and(|x| !mapped(&x) && x.addr().is_ipv4() == net.addr().is_ipv4())
                    })
            }
        }
    }

    fn matches(&self, remote: &Remote) -> bool {
        match self {
            Peer::Selectors { pods, namespaces } => match remote {
                Remote::Pod { labels, namespace_labels, same_namespace, .. } => {
                    let in_namespace = match namespaces {
                        None => *same_namespace,
                        Some(s) => s.matches(namespace_labels),
                    };
                    in_namespace && pods.as_ref().is_none_or(|s| s.matches(labels))
                }
                Remote::External(_) => false,
            },
            Peer::Block { cidr, except } => {
                let ip = remote.ip();
                k8s_net(cidr).is_some_and(|n| n.contains(&ip)) && !except.iter().filter_map(|e| k8s_net(e)).any(|n| n.contains(&ip))
            }
            Peer::Garbage(_) => false,
        }
    }
}

fn valid_service_name(s: &str) -> bool {
    (1..=15).contains(&s.len())
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && s.bytes().any(|b| b.is_ascii_lowercase())
        && !s.starts_with('-')
        && !s.ends_with('-')
        && !s.contains("--")
}

impl Port {
    fn to_json(&self) -> Value {
        match self {
            Port::Entry { protocol, port, end } => {
                let mut m = serde_json::Map::new();
                if let Some(p) = protocol {
                    m.insert("protocol".into(), json!(p));
                }
                match port {
                    Some(PortValue::Num(n)) => m.insert("port".into(), json!(n)),
                    Some(PortValue::Name(s)) => m.insert("port".into(), json!(s)),
                    None => None,
                };
                if let Some(e) = end {
                    m.insert("endPort".into(), json!(e));
                }
                Value::Object(m)
            }
            Port::Garbage(v) => v.clone(),
        }
    }

    fn valid(&self) -> bool {
        let Port::Entry { protocol, port, end } = self else { return false };
        let protocol_ok = protocol.as_deref().is_none_or(|p| ["TCP", "UDP", "SCTP"].iter().any(|k| k.eq_ignore_ascii_case(p)));
        protocol_ok
            && match (port, end) {
                (None, None) => true,
                (None, Some(_)) => false,
                (Some(PortValue::Num(n)), None) => (1..=65535).contains(n),
                (Some(PortValue::Num(n)), Some(e)) => (1..=65535).contains(n) && *n <= *e && *e <= 65535,
                (Some(PortValue::Name(s)), None) => valid_service_name(s),
                (Some(PortValue::Name(_)), Some(_)) => false,
            }
    }

    fn matches(&self, packet: &Packet) -> bool {
        let Port::Entry { protocol, port, end } = self else { return false };
        let protocol = protocol.as_deref().unwrap_or("TCP");
        protocol.eq_ignore_ascii_case(packet.protocol)
            && match port {
                None => true,
                Some(PortValue::Num(n)) => (*n..=end.unwrap_or(*n)).contains(&i64::from(packet.port)),
                Some(PortValue::Name(s)) => packet.port_name == Some(s.as_str()),
            }
    }
}

impl Rule {
    fn to_json(&self, peers_key: &str) -> Value {
        match self {
            Rule::Rule { peers, ports } => json!({
                peers_key: peers.iter().map(Peer::to_json).collect::<Vec<_>>(),
                "ports": ports.iter().map(Port::to_json).collect::<Vec<_>>(),
            }),
            Rule::Garbage(v) => v.clone(),
        }
    }

    fn valid(&self) -> bool {
        match self {
            Rule::Rule { peers, ports } => peers.iter().all(Peer::valid) && ports.iter().all(Port::valid),
            Rule::Garbage(_) => false,
        }
    }

    /// What Kubernetes allows by this rule; a rule without a meaning allows nothing.
    fn allows(&self, packet: &Packet) -> bool {
        let Rule::Rule { peers, ports } = self else { return false };
        peers.iter().all(Peer::meaningful)
            && ports.iter().all(Port::valid)
            && (peers.is_empty() || peers.iter().any(|p| p.matches(&packet.remote)))
            && (ports.is_empty() || ports.iter().any(|p| p.matches(packet)))
    }
}

impl Policy {
    fn to_json(&self) -> Value {
        let mut spec = serde_json::Map::new();
        if let Some(s) = &self.pod_selector {
            spec.insert("podSelector".into(), s.to_json());
        }
        spec.insert("ingress".into(), self.ingress.iter().map(|r| r.to_json("from")).collect());
        spec.insert("egress".into(), self.egress.iter().map(|r| r.to_json("to")).collect());
        if let Some(t) = &self.types {
            spec.insert("policyTypes".into(), json!(t));
        }
        json!({"metadata": {"name": "p", "namespace": "ns"}, "spec": spec})
    }

    fn valid(&self) -> bool {
        self.pod_selector.iter().all(Sel::valid) && self.ingress.iter().chain(&self.egress).all(Rule::valid)
    }

    /// The directions this policy polices: as listed, or ingress alone when none is.
    fn polices(&self, ingress: bool) -> bool {
        let listed = self.types.clone().unwrap_or_default();
        let (i, e) = (listed.iter().any(|t| t == "Ingress"), listed.iter().any(|t| t == "Egress"));
        if !i && !e { ingress } else if ingress { i } else { e }
    }

    fn allows(&self, packet: &Packet) -> bool {
        let rules = if packet.ingress { &self.ingress } else { &self.egress };
        rules.iter().any(|r| r.allows(packet))
    }
}

// ---------------------------------------------------------------------------------------------
// Packets and the Calico side.

#[derive(Clone, Debug)]
enum Remote {
    External(IpAddr),
    Pod { labels: Labels, namespace_labels: Labels, same_namespace: bool, ip: IpAddr },
}

impl Remote {
    fn ip(&self) -> IpAddr {
        match self {
            Remote::External(ip) | Remote::Pod { ip, .. } => *ip,
        }
    }
}

#[derive(Clone, Debug)]
struct Packet {
    ingress: bool,
    protocol: &'static str,
    port: u16,
    /// The name the destination pod gives the packet's port, if any.
    port_name: Option<&'static str>,
    remote: Remote,
}

/// Evaluates one term of the selector grammar the converter emits (terms joined by ` && `).
fn calico_term(term: &str, labels: &Labels) -> bool {
    let quoted = |s: &str| s.trim().trim_matches('\'').to_string();
    let set = |s: &str| s.trim().trim_start_matches('{').trim_end_matches('}').split(',').map(quoted).collect::<Vec<_>>();
    if term == "all()" {
        true
    } else if let Some(k) = term.strip_prefix("! has(").and_then(|t| t.strip_suffix(')')) {
        !labels.contains_key(k)
    } else if let Some(k) = term.strip_prefix("has(").and_then(|t| t.strip_suffix(')')) {
        labels.contains_key(k)
    } else if let Some((k, v)) = term.split_once(" == ") {
        labels.get(k) == Some(&quoted(v))
    } else if let Some((k, vs)) = term.split_once(" not in ") {
        labels.get(k).is_none_or(|v| !set(vs).contains(v))
    } else if let Some((k, vs)) = term.split_once(" in ") {
        labels.get(k).is_some_and(|v| set(vs).contains(v))
    } else {
        panic!("unexpected selector term {term:?}")
    }
}

fn calico_selector(selector: &str, labels: &Labels) -> bool {
    selector.split(" && ").all(|t| calico_term(t, labels))
}

fn calico_port(port: &Value, packet: &Packet) -> bool {
    match port {
        Value::Number(n) => n.as_u64() == Some(u64::from(packet.port)),
        Value::String(s) => match s.split_once(':') {
            Some((a, b)) => (a.parse::<u16>().unwrap()..=b.parse::<u16>().unwrap()).contains(&packet.port),
            None => packet.port_name == Some(s.as_str()),
        },
        other => panic!("unexpected port {other}"),
    }
}

fn calico_entity(entity: &Value, packet: &Packet) -> bool {
    let text = |k: &str| entity.get(k).and_then(Value::as_str);
    let nets = |k: &str| entity.get(k).and_then(Value::as_array).map(|a| a.iter().map(|n| n.as_str().unwrap().parse::<IpNet>().unwrap()).collect::<Vec<_>>());
    if text("selector").is_some() || text("namespaceSelector").is_some() {
        let Remote::Pod { labels, namespace_labels, same_namespace, .. } = &packet.remote else { return false };
        let mut endpoint_labels = labels.clone();
        endpoint_labels.insert("projectcalico.org/orchestrator".into(), "k8s".into());
        let in_namespace = match text("namespaceSelector") {
            None => *same_namespace,
            Some(s) => calico_selector(s, namespace_labels),
        };
        if !in_namespace || !text("selector").is_none_or(|s| calico_selector(s, &endpoint_labels)) {
            return false;
        }
    }
    let ip = packet.remote.ip();
    nets("nets").is_none_or(|n| n.iter().any(|n| n.contains(&ip))) && !nets("notNets").is_some_and(|n| n.iter().any(|n| n.contains(&ip)))
}

fn calico_rule_allows(rule: &Value, packet: &Packet) -> bool {
    assert_eq!(rule["action"], json!("Allow"));
    let protocol_ok = match rule.get("protocol") {
        None => true,
        Some(Value::String(p)) => p == packet.protocol,
        Some(Value::Number(n)) => matches!((n.as_u64(), packet.protocol), (Some(6), "TCP") | (Some(17), "UDP") | (Some(132), "SCTP") | (Some(1), "ICMP")),
        Some(other) => panic!("unexpected protocol {other}"),
    };
    let empty = json!({});
    let destination = rule.get("destination").unwrap_or(&empty);
    let source = rule.get("source").unwrap_or(&empty);
    let ports_ok = destination.get("ports").and_then(Value::as_array).is_none_or(|ps| ps.iter().any(|p| calico_port(p, packet)));
    let remote = if packet.ingress { source } else { destination };
    protocol_ok && ports_ok && calico_entity(remote, packet)
}

fn calico_polices(policy: &Value, ingress: bool) -> bool {
    let want = if ingress { "Ingress" } else { "Egress" };
    policy["spec"]["types"].as_array().unwrap().iter().any(|t| t == want)
}

fn calico_allows(policy: &Value, packet: &Packet) -> bool {
    let key = if packet.ingress { "ingress" } else { "egress" };
    policy["spec"].get(key).and_then(Value::as_array).is_some_and(|rules| rules.iter().any(|r| calico_rule_allows(r, packet)))
}

// ---------------------------------------------------------------------------------------------
// Strategies.

fn key() -> impl Strategy<Value = String> {
    prop_oneof![30 => prop::sample::select(vec!["app", "tier", "env"]).prop_map(String::from), 1 => Just("bad key".to_string())]
}

fn value() -> impl Strategy<Value = String> {
    prop_oneof![30 => prop::sample::select(vec!["a", "b", "c"]).prop_map(String::from), 1 => Just("x'y".to_string())]
}

fn labels() -> impl Strategy<Value = Labels> {
    prop::collection::btree_map(prop::sample::select(vec!["app", "tier", "env"]).prop_map(String::from), prop::sample::select(vec!["a", "b", "c"]).prop_map(String::from), 0..3)
}

fn selector() -> impl Strategy<Value = Sel> {
    let op = prop_oneof![20 => prop::sample::select(vec!["In", "NotIn", "Exists", "DoesNotExist"]), 1 => Just("Bogus")];
    let values = prop_oneof![10 => prop::collection::vec(value(), 1..3), 1 => Just(Vec::new())];
    let expr = (key(), op, values).prop_map(|(key, op, values)| {
        let values = if matches!(op, "Exists" | "DoesNotExist") { Vec::new() } else { values };
        Expr { key, op: op.to_string(), values }
    });
    (prop::collection::btree_map(key(), value(), 0..3), prop::collection::vec(expr, 0..3)).prop_map(|(labels, exprs)| Sel { labels, exprs })
}

const GOOD_CIDRS: [&str; 8] = ["10.0.0.0/8", "10.1.2.3/16", "10.1.0.0/24", "10.1.2.0/28", "192.168.1.0/24", "0.0.0.0/0", "fd00::/64", "fd00::/16"];
const BAD_CIDRS: [&str; 5] = ["10.0.0.1", "garbage", "10.0.0.0/33", "::ffff:10.0.0.0/104", ""];

fn peer() -> impl Strategy<Value = Peer> {
    let except = prop_oneof![
        8 => prop::sample::select(vec!["10.1.0.0/24", "10.1.2.0/28", "10.1.2.4/30", "fd00::/80", "192.168.1.128/25"]),
        1 => prop::sample::select(GOOD_CIDRS.to_vec()),
        1 => prop::sample::select(BAD_CIDRS.to_vec()),
    ]
    .prop_map(String::from);
    let cidr = || prop_oneof![12 => prop::sample::select(GOOD_CIDRS.to_vec()), 1 => prop::sample::select(BAD_CIDRS.to_vec())].prop_map(String::from);
    prop_oneof![
        4 => selector().prop_map(|s| Peer::Selectors { pods: Some(s), namespaces: None }),
        4 => selector().prop_map(|s| Peer::Selectors { pods: None, namespaces: Some(s) }),
        4 => (selector(), selector()).prop_map(|(p, n)| Peer::Selectors { pods: Some(p), namespaces: Some(n) }),
        8 => (cidr(), prop::collection::vec(except, 0..3)).prop_map(|(cidr, except)| Peer::Block { cidr, except }),
        1 => Just(Peer::Selectors { pods: None, namespaces: None }),
        1 => prop::sample::select(vec![json!("x"), json!(5), json!({"ipBlock": "x"}), json!({"podSelector": []}), json!(null), json!({})]).prop_map(Peer::Garbage),
    ]
}

fn port() -> impl Strategy<Value = Port> {
    // Mostly good values near each other, so that merged ranges and their gaps get exercised.
    let protocol = prop_oneof![
        8 => Just(None),
        8 => prop::sample::select(vec!["TCP", "tcp", "UDP", "Sctp"]).prop_map(|p| Some(p.to_string())),
        1 => prop::sample::select(vec!["HTTP", "ICMP", "", "6"]).prop_map(|p| Some(p.to_string())),
    ];
    let number = prop_oneof![
        16 => 78..=92i64,
        2 => prop::sample::select(vec![1i64, 22, 53, 443, 8080, 65535]),
        1 => prop::sample::select(vec![0i64, 70000, -1]),
    ]
    .prop_map(PortValue::Num);
    let name = prop::sample::select(vec!["http", "dns", "http", "dns", "http", "dns", "HTTP", "80", "bad--name"]).prop_map(|s| PortValue::Name(s.to_string()));
    let end = prop_oneof![6 => Just(None), 3 => (78..=95i64).prop_map(Some), 1 => prop::sample::select(vec![10i64, 65535, 70000]).prop_map(Some)];
    prop_oneof![
        40 => (protocol, prop_oneof![1 => Just(None), 4 => number.prop_map(Some), 1 => name.prop_map(Some)], end, 0..8u8).prop_map(|(protocol, port, end, odd)| {
            // An end port mostly on numbers and mostly above them; now and then anywhere.
            let end = match (&port, end) {
                (Some(PortValue::Num(n)), Some(e)) if odd != 0 => Some(e.max(*n)),
                (Some(PortValue::Num(_)), e) => e,
                (_, e) if odd == 0 => e,
                _ => None,
            };
            Port::Entry { protocol, port, end }
        }),
        1 => prop::sample::select(vec![json!(80), json!({"port": 1.5}), json!({"protocol": 6})]).prop_map(Port::Garbage),
    ]
}

fn rule() -> impl Strategy<Value = Rule> {
    prop_oneof![
        40 => (prop::collection::vec(peer(), 0..3), prop::collection::vec(port(), 0..4)).prop_map(|(peers, ports)| Rule::Rule { peers, ports }),
        1 => prop::sample::select(vec![json!("x"), json!({"from": "x", "to": "x"})]).prop_map(Rule::Garbage),
    ]
}

fn policy() -> impl Strategy<Value = Policy> {
    let types = prop::option::of(prop::collection::vec(prop::sample::select(vec!["Ingress", "Egress"]).prop_map(String::from), 0..3));
    (prop::option::of(selector()), prop::collection::vec(rule(), 0..3), prop::collection::vec(rule(), 0..3), types)
        .prop_map(|(pod_selector, ingress, egress, types)| Policy { pod_selector, ingress, egress, types })
}

fn packet() -> impl Strategy<Value = Packet> {
    let ip = prop::sample::select(vec!["10.0.0.5", "10.1.0.9", "10.1.2.9", "10.2.0.1", "192.168.1.7", "8.8.8.8", "fd00::1", "fd00:0:0:1::5", "2001:db8::1"])
        .prop_map(|s| s.parse::<IpAddr>().unwrap());
    let remote = prop_oneof![
        ip.clone().prop_map(Remote::External),
        (labels(), labels(), any::<bool>(), ip).prop_map(|(labels, namespace_labels, same_namespace, ip)| Remote::Pod { labels, namespace_labels, same_namespace, ip }),
    ];
    let port = prop_oneof![4 => 78..=92u16, 2 => prop::sample::select(vec![1u16, 22, 53, 100, 443, 8080, 65535]), 1 => 1..=65535u16];
    (any::<bool>(), prop::sample::select(vec!["TCP", "TCP", "TCP", "UDP", "SCTP", "ICMP"]), port, prop::option::of(prop::sample::select(vec!["http", "dns"])), remote)
        .prop_map(|(ingress, protocol, port, port_name, remote)| Packet { ingress, protocol, port, port_name, remote })
}

fn arbitrary_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<f64>().prop_map(|f| json!(f)),
        prop::sample::select(vec!["", "TCP", "10.0.0.0/8", "In", "Ingress", "http", "a", "x'y", "80:90", "::/0"]).prop_map(|s| json!(s)),
    ];
    let keys = prop::sample::select(vec![
        "metadata", "name", "namespace", "spec", "podSelector", "ingress", "egress", "from", "to", "ports", "port", "endPort", "protocol", "ipBlock",
        "cidr", "except", "namespaceSelector", "matchLabels", "matchExpressions", "key", "operator", "values", "policyTypes", "labels", "nodeName",
        "hostNetwork", "serviceAccountName",
    ]);
    leaf.prop_recursive(6, 64, 6, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map(keys.clone().prop_map(String::from), inner, 0..5).prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// DropRule output allows no packet the Kubernetes policy does not; for a policy Kubernetes
    /// accepts, the two allow the same packets and both modes agree.
    #[test]
    fn drop_rule_output_never_allows_more_than_kubernetes(policy in policy(), packets in prop::collection::vec(packet(), 48)) {
        let input = policy.to_json();
        let Ok(out) = network_policy(&input, BadRules::DropRule) else {
            // Only a bad policy-level selector refuses the whole policy.
            prop_assert!(!policy.pod_selector.iter().all(Sel::valid));
            return Ok(());
        };
        prop_assert!(out.object["spec"]["selector"].as_str().unwrap().starts_with(ORCHESTRATOR_TERM));
        let well_formed = policy.valid();
        for packet in &packets {
            prop_assert_eq!(calico_polices(&out.object, packet.ingress), policy.polices(packet.ingress));
            let (calico, k8s) = (calico_allows(&out.object, packet), policy.allows(packet));
            prop_assert!(!calico || k8s, "Calico allows more: {:?}\n{}\n{}", packet, input, out.object);
            if well_formed {
                prop_assert_eq!(calico, k8s, "{:?}\n{}\n{}", packet, input, out.object);
            }
        }
        let bad = |rules: &[Rule]| rules.iter().enumerate().filter(|(_, r)| !r.valid()).map(|(i, _)| i).collect::<Vec<_>>();
        let dropped = |d: Direction| out.dropped.iter().filter(|r| r.direction == d).map(|r| r.index).collect::<Vec<_>>();
        // Every rule Kubernetes refuses is dropped, bar those whose refusal changes nothing (an
        // except outside its CIDR, which Calico reads as Kubernetes would mean it).
        prop_assert!(dropped(Direction::Ingress).iter().all(|i| bad(&policy.ingress).contains(i)));
        prop_assert!(dropped(Direction::Egress).iter().all(|i| bad(&policy.egress).contains(i)));
        if well_formed {
            prop_assert_eq!(&out.dropped, &vec![]);
            let upstream = network_policy(&input, BadRules::Upstream).unwrap();
            prop_assert_eq!(upstream.object, out.object);
        }
    }

    /// Upstream mode never panics and always keeps the orchestrator term.
    #[test]
    fn upstream_mode_keeps_the_orchestrator_term(policy in policy()) {
        if let Ok(out) = network_policy(&policy.to_json(), BadRules::Upstream) {
            prop_assert!(out.object["spec"]["selector"].as_str().unwrap().starts_with(ORCHESTRATOR_TERM));
            prop_assert_eq!(out.dropped, vec![]);
        }
    }

    /// Any JSON at all: every converter returns, and a NetworkPolicy that converts keeps the term.
    #[test]
    fn any_json_converts_or_errors_without_panicking(v in arbitrary_json(), wrap in any::<bool>()) {
        let v = if wrap { json!({"metadata": {"name": "n", "namespace": "ns"}, "spec": v}) } else { v };
        for mode in [BadRules::DropRule, BadRules::Upstream] {
            if let Ok(out) = network_policy(&v, mode) {
                prop_assert!(out.object["spec"]["selector"].as_str().unwrap().starts_with(ORCHESTRATOR_TERM));
            }
        }
        // DropRule checks all that upstream checks: with nothing dropped, both modes agree.
        if let Ok(out) = network_policy(&v, BadRules::DropRule)
            && out.dropped.is_empty()
        {
            prop_assert_eq!(network_policy(&v, BadRules::Upstream).map(|u| u.object), Ok(out.object));
        }
        let _ = namespace_profile(&v);
        let _ = service_account_profile(&v);
        let _ = workload_endpoint(&v);
    }
}




