//! Kubernetes NetworkPolicy -> Calico NetworkPolicy `knp.default.<name>` (SPEC §6.4).
//!
//! Owns: selectors, port grouping and range merging, peers, `types`, and which rules are bad.
//! In [`BadRules::Upstream`] mode every quirk of upstream's converter is kept (libcalico-go
//! `K8sNetworkPolicyToCalico`), including the ones that fail open, plus the write-time validation
//! that makes upstream drop the whole policy. In [`BadRules::DropRule`] mode (Part A) a rule upstream
//! would mishandle, or that Kubernetes itself would refuse, is dropped alone: its traffic is denied.
//! This departs from upstream on purpose (SPEC §10.12): its converter means to drop bad rules alone, but the
//! error-type check never matches, so one bad rule loses the whole policy (fails open), while an
//! unparsable CIDR turns into "anywhere" (fails open too).
//! Must not: do I/O or panic on any JSON.

use std::collections::BTreeMap;
use std::collections::btree_map::Entry;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use serde_json::{Map, Value, json};

use super::json::{array, element, envelope, field, int32, object, string, string_map, strings};
use super::{API_VERSION, BadRules, ConvertError, Converted, Direction, DroppedRule, ORCHESTRATOR_TERM};

/// Prefix upstream gives converted policies so they never clash with Calico-native ones.
pub const NAME_PREFIX: &str = "knp.default.";
/// Upstream puts every converted policy at this order (after most hand-written Calico policies).
const ORDER: u32 = 1000;
/// The selector tokenizer refuses longer label names.
const MAX_LABEL_LENGTH: usize = 512;
/// Protocols Calico's validator accepts by name (after case-insensitive canonicalisation).
const CALICO_PROTOCOLS: [&str; 6] = ["UDP", "TCP", "ICMP", "ICMPv6", "SCTP", "UDPLite"];
/// Protocols a Kubernetes NetworkPolicyPort may name.
const K8S_PROTOCOLS: [&str; 3] = ["TCP", "UDP", "SCTP"];

/// Why one Kubernetes rule cannot be converted.
#[derive(Debug)]
enum Fault {
    /// Go's decoder would refuse the object: upstream never sees it.
    Undecodable(String),
    /// Upstream's converter or the Calico validator refuses it: upstream skips the policy.
    /// In DropRule mode also anything Kubernetes would refuse that upstream would widen.
    Rejected(String),
}

impl Fault {
    fn message(self) -> String {
        match self {
            Fault::Undecodable(m) | Fault::Rejected(m) => m,
        }
    }
}

impl From<String> for Fault {
    fn from(m: String) -> Self {
        Fault::Undecodable(m)
    }
}

/// Converts a Kubernetes NetworkPolicy (as JSON) into the Calico NetworkPolicy upstream writes.
///
/// In [`BadRules::DropRule`] mode a bad rule is left out and listed in [`Converted::dropped`]; in
/// [`BadRules::Upstream`] mode it makes the whole policy [`ConvertError::PolicySkipped`], except where
/// upstream silently converts it (an unparsable CIDR becomes an empty peer, a bad `except` entry
/// ends the list). An object Go could not decode is [`ConvertError::Malformed`] in both modes, and so
/// is, in DropRule mode, a `spec.podSelector` that cannot be written exactly (an unknown operator, a
/// label the Calico selector syntax cannot hold): leaving a term out would widen what the policy
/// applies to.
pub fn network_policy(np: &Value, mode: BadRules) -> Result<Converted, ConvertError> {
    let np = envelope(np, "NetworkPolicy").map_err(ConvertError::Malformed)?;
    let (name, namespace) = (np.name, np.namespace);
    let empty = Map::new();
    let spec = object(np.top, "spec", "NetworkPolicy").map_err(ConvertError::Malformed)?.unwrap_or(&empty);

    // A selector upstream's validator refuses only counts once the whole object has decoded.
    let (selector, selector_fault) = match selector(field(spec, "podSelector"), SelectorKind::Pod, "spec.podSelector", mode) {
        Ok(s) => (s, None),
        Err(Fault::Rejected(m)) if mode == BadRules::Upstream => (String::new(), Some(m)),
        Err(f) => return Err(ConvertError::Malformed(f.message())),
    };
    let listed = strings(spec, "policyTypes", "spec").map_err(ConvertError::Malformed)?;
    let mut types = Vec::new();
    if listed.contains(&"Ingress") {
        types.push("Ingress");
    }
    if listed.contains(&"Egress") {
        types.push("Egress");
    }
    // No types listed: a policy from before `policyTypes` existed, which polices ingress only.
    if types.is_empty() {
        types.push("Ingress");
    }

    let mut rules = [Vec::new(), Vec::new()];
    let mut faults = Vec::new();
    for (slot, (direction, key)) in [(Direction::Ingress, "ingress"), (Direction::Egress, "egress")].into_iter().enumerate() {
        for (index, rule) in array(spec, key, "spec").map_err(ConvertError::Malformed)?.iter().enumerate() {
            match k8s_rule(rule, direction, &format!("spec.{key}[{index}]"), mode) {
                Ok(converted) => rules[slot].extend(converted),
                Err(fault) => faults.push((direction, index, fault)),
            }
        }
    }

    let mut dropped = Vec::new();
    match mode {
        BadRules::Upstream => {
            // Decoding happens before conversion: an undecodable rule hides any conversion error.
            if let Some(pos) = faults.iter().position(|(_, _, f)| matches!(f, Fault::Undecodable(_))) {
                return Err(ConvertError::Malformed(faults.swap_remove(pos).2.message()));
            }
            if let Some(m) = selector_fault {
                return Err(ConvertError::PolicySkipped(format!("NetworkPolicy {name:?}: {m}")));
            }
            if let Some((_, _, fault)) = faults.into_iter().next() {
                return Err(ConvertError::PolicySkipped(format!("NetworkPolicy {name:?}: {}", fault.message())));
            }
        }
        BadRules::DropRule => {
            dropped = faults.into_iter().map(|(direction, index, f)| DroppedRule { direction, index, reason: f.message() }).collect();
        }
    }

    let mut out = Map::new();
    out.insert("tier".into(), json!("default"));
    out.insert("order".into(), json!(ORDER));
    out.insert("selector".into(), json!(selector));
    out.insert("types".into(), json!(types));
    let [ingress, egress] = rules;
    if !ingress.is_empty() {
        out.insert("ingress".into(), Value::Array(ingress));
    }
    if !egress.is_empty() {
        out.insert("egress".into(), Value::Array(egress));
    }
    let object = json!({
        "apiVersion": API_VERSION,
        "kind": "NetworkPolicy",
        "metadata": {"name": format!("{NAME_PREFIX}{name}"), "namespace": namespace},
        "spec": out,
    });
    Ok(Converted { object, dropped })
}

/// One Calico destination port: a range (a single port is `min == max`) or a named port.
#[derive(Clone, Debug, PartialEq, Eq)]
enum CalicoPort {
    Range(u16, u16),
    Named(String),
}

impl CalicoPort {
    fn to_json(&self) -> Value {
        match self {
            CalicoPort::Range(a, b) if a == b => json!(a),
            CalicoPort::Range(a, b) => json!(format!("{a}:{b}")),
            CalicoPort::Named(n) => json!(n),
        }
    }
}

/// The Calico fields of one peer; all empty is "anywhere" (no peers, or upstream's failed CIDR).
#[derive(Clone, Debug, Default)]
struct Peer {
    selector: String,
    namespace_selector: String,
    nets: Vec<Net>,
    not_nets: Vec<Net>,
}

/// A parsed CIDR, printed as Go prints the network.
#[derive(Clone, Debug)]
struct Net {
    text: String,
    v6: bool,
    /// An IPv4-mapped IPv6 network, which Go prints (and Calico matches) as IPv4.
    mapped: bool,
}

/// One Kubernetes rule to its Calico rules: one per protocol (sorted) and per peer.
fn k8s_rule(rule: &Value, direction: Direction, path: &str, mode: BadRules) -> Result<Vec<Value>, Fault> {
    let empty = Map::new();
    let rule = element(rule, path)?.unwrap_or(&empty);
    let peers_key = if direction == Direction::Ingress { "from" } else { "to" };
    let peer_values = array(rule, peers_key, path)?;
    let port_values = array(rule, "ports", path)?;

    // protocol -> its ports, `None` meaning all ports of the protocol. The empty protocol is "any".
    let mut groups: BTreeMap<String, Option<Vec<CalicoPort>>> = BTreeMap::new();
    if port_values.is_empty() {
        groups.insert(String::new(), None);
    }
    let mut first_error = None;
    for (i, value) in port_values.iter().enumerate() {
        match port_entry(value, &format!("{path}.ports[{i}]"), mode) {
            Ok((protocol, None)) => {
                groups.insert(protocol, None);
            }
            Ok((protocol, Some(port))) => match groups.entry(protocol) {
                Entry::Vacant(e) => {
                    e.insert(Some(vec![port]));
                }
                Entry::Occupied(mut e) => {
                    if let Some(ports) = e.get_mut() {
                        ports.push(port);
                    }
                }
            },
            // Keep decoding: an undecodable later entry outranks a conversion error.
            Err(Fault::Undecodable(m)) => return Err(Fault::Undecodable(m)),
            Err(f) => {
                first_error.get_or_insert(f);
            }
        }
    }
    let mut peers = Vec::new();
    for (i, value) in peer_values.iter().enumerate() {
        match peer(value, &format!("{path}.{peers_key}[{i}]"), mode) {
            Ok(p) => peers.push(p),
            Err(Fault::Undecodable(m)) => return Err(Fault::Undecodable(m)),
            Err(f) => {
                first_error.get_or_insert(f);
            }
        }
    }
    if let Some(f) = first_error {
        return Err(f);
    }
    if peer_values.is_empty() {
        peers.push(Peer::default());
    }
    for (protocol, ports) in &groups {
        check_protocol_ports(protocol, ports.as_deref().unwrap_or(&[]), path)?;
    }

    let mut out = Vec::new();
    for (protocol, ports) in groups {
        let ports = simplify_ports(ports.unwrap_or_default());
        for peer in &peers {
            out.push(calico_rule(&protocol, &ports, peer, direction));
        }
    }
    Ok(out)
}

/// What the Calico validator checks of a rule's protocol and its ports. Upstream validates the
/// rules it writes, so a port swallowed by an all-ports entry of its protocol is never checked.
fn check_protocol_ports(protocol: &str, ports: &[CalicoPort], path: &str) -> Result<(), Fault> {
    for port in ports {
        match port {
            CalicoPort::Range(min, _) if *min < 1 => return Err(Fault::Rejected(format!("{path}: port numbers start at 1"))),
            CalicoPort::Named(n) if !valid_port_name(n) => return Err(Fault::Rejected(format!("{path}: {n:?} is not a valid port name"))),
            _ => {}
        }
    }
    let numeric = ports.iter().any(|p| matches!(p, CalicoPort::Range(..)));
    if protocol.is_empty() {
        return if numeric { Err(Fault::Rejected(format!("{path}: port numbers without a protocol"))) } else { Ok(()) };
    }
    match protocol_number(protocol) {
        Some(0) => return Err(Fault::Rejected(format!("{path}: protocol number 0 is invalid"))),
        Some(_) => {}
        None if !CALICO_PROTOCOLS.contains(&protocol) => return Err(Fault::Rejected(format!("{path}: invalid protocol {protocol:?}"))),
        None => {}
    }
    let supports_ports = match protocol_number(protocol) {
        Some(n) => matches!(n, 6 | 17 | 132),
        None => matches!(protocol, "TCP" | "UDP" | "SCTP"),
    };
    if !ports.is_empty() && !supports_ports {
        return Err(Fault::Rejected(format!("{path}: protocol {protocol} does not take ports")));
    }
    Ok(())
}

/// A protocol string that Calico reads as a number (Go's `ParseUint(s, 10, 8)`).
fn protocol_number(protocol: &str) -> Option<u8> {
    if protocol.is_empty() || !protocol.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    protocol.parse().ok()
}

/// Calico's canonical spelling of a protocol name (matched as Go's `EqualFold` does), or the input.
fn canonical_protocol(raw: &str) -> String {
    // Go's Unicode case folding also maps U+017F (long s) to 's' and U+212A (Kelvin) to 'k'.
    let folded: String = raw.chars().map(|c| if c == '\u{17f}' { 's' } else if c == '\u{212a}' { 'k' } else { c }).collect();
    CALICO_PROTOCOLS.iter().find(|p| p.eq_ignore_ascii_case(&folded)).map_or_else(|| raw.to_string(), |p| p.to_string())
}

/// A port entry's value as written.
enum PortValue<'a> {
    Int(i64),
    Name(&'a str),
}

/// One NetworkPolicyPort to (canonical protocol, port or `None` for all ports).
fn port_entry(value: &Value, path: &str, mode: BadRules) -> Result<(String, Option<CalicoPort>), Fault> {
    let empty = Map::new();
    let entry = element(value, path)?.unwrap_or(&empty);
    let raw_protocol = string(entry, "protocol", path)?;
    let end = int32(entry, "endPort", path)?;
    let port = match field(entry, "port") {
        None => None,
        Some(Value::String(s)) => Some(PortValue::Name(s)),
        Some(_) => Some(PortValue::Int(int32(entry, "port", path)?.unwrap_or(0))),
    };
    // An absent protocol is TCP before grouping, so `{}` means TCP on all ports.
    let protocol = canonical_protocol(raw_protocol.unwrap_or("TCP"));
    if mode == BadRules::DropRule && !K8S_PROTOCOLS.contains(&protocol.as_str()) {
        return Err(Fault::Rejected(format!("{path}: invalid protocol {:?}", raw_protocol.unwrap_or(""))));
    }
    let Some(port) = port else {
        if mode == BadRules::DropRule && end.is_some() {
            return Err(Fault::Rejected(format!("{path}: endPort without port")));
        }
        return Ok((protocol, None));
    };
    if mode == BadRules::DropRule {
        match (&port, end) {
            (PortValue::Int(n), _) if !(1..=65535).contains(n) => return Err(Fault::Rejected(format!("{path}: port {n} is out of range"))),
            (PortValue::Int(n), Some(e)) if e < *n || e > 65535 => {
                return Err(Fault::Rejected(format!("{path}: endPort {e} is below port {n} or above 65535")));
            }
            (PortValue::Name(s), _) if !valid_port_name(s) => return Err(Fault::Rejected(format!("{path}: {s:?} is not a valid port name"))),
            (PortValue::Name(s), Some(_)) => return Err(Fault::Rejected(format!("{path}: named port {s:?} with endPort"))),
            _ => {}
        }
    }
    // Upstream turns the port into text, appends the end port, and parses that back.
    let mut text = match port {
        PortValue::Int(n) => n.to_string(),
        PortValue::Name(s) => s.to_string(),
    };
    if let Some(e) = end {
        text = format!("{text}:{e}");
    }
    let parsed = port_from_string(&text).map_err(|m| Fault::Rejected(format!("{path}: invalid port {text:?}: {m}")))?;
    Ok((protocol, Some(parsed)))
}

/// Calico's reading of a port string: digits, `digits:digits`, or a name.
fn port_from_string(s: &str) -> Result<CalicoPort, String> {
    let digits = |t: &str| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit());
    if digits(s) {
        return s.parse::<u16>().map(|p| CalicoPort::Range(p, p)).map_err(|_| "not a port number".to_string());
    }
    if let Some((a, b)) = s.split_once(':')
        && digits(a)
        && digits(b)
    {
        let min = a.parse::<u16>().map_err(|_| "invalid minimum port".to_string())?;
        let max = b.parse::<u16>().map_err(|_| "invalid maximum port".to_string())?;
        if min > max {
            return Err(format!("minimum port {min} is above maximum port {max}"));
        }
        return Ok(CalicoPort::Range(min, max));
    }
    let name_char = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-');
    if (1..=128).contains(&s.len()) && s.bytes().all(name_char) {
        return Ok(CalicoPort::Named(s.to_string()));
    }
    Err("not a port name".to_string())
}

/// Kubernetes' IANA service name rule for named ports.
fn valid_port_name(s: &str) -> bool {
    (1..=15).contains(&s.len())
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && s.bytes().any(|b| b.is_ascii_lowercase())
        && !s.starts_with('-')
        && !s.ends_with('-')
        && !s.contains("--")
}

/// The smallest list of ranges covering the numeric ports, named ports first in their order.
/// Like upstream, a list with at most one numeric port is returned as it is.
fn simplify_ports(ports: Vec<CalicoPort>) -> Vec<CalicoPort> {
    let numeric: u32 = ports.iter().map(|p| if let CalicoPort::Range(a, b) = p { u32::from(*b) - u32::from(*a) + 1 } else { 0 }).sum();
    if ports.len() <= 1 || numeric <= 1 {
        return ports;
    }
    let mut ranges: Vec<(u16, u16)> = ports.iter().filter_map(|p| if let CalicoPort::Range(a, b) = p { Some((*a, *b)) } else { None }).collect();
    ranges.sort_unstable();
    let mut out: Vec<CalicoPort> = ports.into_iter().filter(|p| matches!(p, CalicoPort::Named(_))).collect();
    let mut merged: Vec<(u16, u16)> = Vec::new();
    for (a, b) in ranges {
        match merged.last_mut() {
            Some(last) if u32::from(a) <= u32::from(last.1) + 1 => last.1 = last.1.max(b),
            _ => merged.push((a, b)),
        }
    }
    out.extend(merged.into_iter().map(|(a, b)| CalicoPort::Range(a, b)));
    out
}

/// One NetworkPolicyPeer to its Calico fields.
fn peer(value: &Value, path: &str, mode: BadRules) -> Result<Peer, Fault> {
    let empty = Map::new();
    let entry = element(value, path)?.unwrap_or(&empty);
    let pods = selector(field(entry, "podSelector"), SelectorKind::Pod, &format!("{path}.podSelector"), mode);
    let namespaces = selector(field(entry, "namespaceSelector"), SelectorKind::Namespace, &format!("{path}.namespaceSelector"), mode);
    let has_selectors = field(entry, "podSelector").is_some() || field(entry, "namespaceSelector").is_some();
    let Some(block) = object(entry, "ipBlock", path)? else {
        // Upstream reads a peer with nothing set as "pods of this namespace"; Kubernetes refuses it.
        if mode == BadRules::DropRule && !has_selectors {
            return Err(Fault::Rejected(format!("{path}: a peer needs a podSelector, a namespaceSelector or an ipBlock")));
        }
        return Ok(Peer { selector: pods?, namespace_selector: namespaces?, ..Peer::default() });
    };
    // With an ipBlock the selectors are ignored, but Go still has to decode them.
    for s in [pods, namespaces] {
        if let Err(Fault::Undecodable(m)) = s {
            return Err(Fault::Undecodable(m));
        }
    }
    let block_path = format!("{path}.ipBlock");
    // Upstream ignores the selectors next to an ipBlock; Kubernetes refuses the combination.
    if mode == BadRules::DropRule && has_selectors {
        return Err(Fault::Rejected(format!("{block_path}: an ipBlock cannot be combined with selectors")));
    }
    let cidr = string(block, "cidr", &block_path)?.unwrap_or("");
    let except = strings(block, "except", &block_path)?;
    let mut peer = Peer::default();
    match parse_cidr(cidr) {
        Some(net) if mode == BadRules::DropRule && net.mapped => {
            return Err(Fault::Rejected(format!("{block_path}.cidr: IPv4-mapped IPv6 CIDR {cidr:?}")));
        }
        Some(net) => peer.nets.push(net),
        // Upstream logs and returns an empty peer: the rule then allows anywhere.
        None if mode == BadRules::Upstream => return Ok(Peer::default()),
        None => return Err(Fault::Rejected(format!("{block_path}.cidr: cannot parse CIDR {cidr:?}"))),
    }
    for (i, e) in except.iter().enumerate() {
        match parse_cidr(e) {
            Some(net) if mode == BadRules::DropRule && net.mapped => {
                return Err(Fault::Rejected(format!("{block_path}.except[{i}]: IPv4-mapped IPv6 CIDR {e:?}")));
            }
            Some(net) => peer.not_nets.push(net),
            // Upstream stops at the first bad entry and keeps the ones before it.
            None if mode == BadRules::Upstream => break,
            None => return Err(Fault::Rejected(format!("{block_path}.except[{i}]: cannot parse CIDR {e:?}"))),
        }
    }
    // The Calico validator: one IP version per rule, and no catch-all network to exclude.
    let v6 = peer.nets.iter().chain(&peer.not_nets).filter(|n| n.v6).count();
    if v6 != 0 && v6 != peer.nets.len() + peer.not_nets.len() {
        return Err(Fault::Rejected(format!("{block_path}: mixes IPv4 and IPv6 CIDRs")));
    }
    if peer.not_nets.iter().any(|n| n.text == "0.0.0.0/0" || n.text == "::/0") {
        return Err(Fault::Rejected(format!("{block_path}.except: excludes every address")));
    }
    Ok(peer)
}

/// Go's `net.ParseCIDR` followed by `IPNet.String()`: the network address and prefix length.
fn parse_cidr(s: &str) -> Option<Net> {
    let (addr, len) = s.split_once('/')?;
    let ip: IpAddr = addr.parse().ok()?;
    if len.is_empty() || !len.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let bits: u32 = len.parse().ok()?;
    match ip {
        IpAddr::V4(v4) => {
            if bits > 32 {
                return None;
            }
            let mask = u32::MAX.checked_shl(32 - bits).unwrap_or(0);
            Some(Net { text: format!("{}/{bits}", Ipv4Addr::from(u32::from(v4) & mask)), v6: false, mapped: false })
        }
        IpAddr::V6(v6) => {
            if bits > 128 {
                return None;
            }
            let mask = u128::MAX.checked_shl(128 - bits).unwrap_or(0);
            let network = Ipv6Addr::from(u128::from(v6) & mask);
            match network.to_ipv4_mapped() {
                Some(v4) => Some(Net { text: format!("{v4}/{}", bits - 96), v6: false, mapped: true }),
                None => Some(Net { text: format!("{network}/{bits}"), v6: true, mapped: false }),
            }
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum SelectorKind {
    Pod,
    Namespace,
}

/// A LabelSelector to a Calico selector. A pod selector always starts with the orchestrator term;
/// a namespace selector is `""` when absent (the policy's own namespace) and `all()` when empty.
fn selector(value: Option<&Value>, kind: SelectorKind, path: &str, mode: BadRules) -> Result<String, Fault> {
    let mut terms = Vec::new();
    if kind == SelectorKind::Pod {
        terms.push(ORCHESTRATOR_TERM.to_string());
    }
    let Some(value) = value else { return Ok(terms.join(" && ")) };
    let Value::Object(sel) = value else { return Err(Fault::Undecodable(format!("{path}: not an object"))) };
    let mut labels = string_map(sel, "matchLabels", path)?;
    let expressions = array(sel, "matchExpressions", path)?;
    let mut decoded = Vec::with_capacity(expressions.len());
    let empty = Map::new();
    for (i, e) in expressions.iter().enumerate() {
        let e_path = format!("{path}.matchExpressions[{i}]");
        let e = element(e, &e_path)?.unwrap_or(&empty);
        decoded.push((string(e, "key", &e_path)?.unwrap_or(""), string(e, "operator", &e_path)?.unwrap_or(""), strings(e, "values", &e_path)?, e_path));
    }
    if kind == SelectorKind::Namespace && labels.is_empty() && decoded.is_empty() {
        return Ok("all()".to_string());
    }
    labels.sort_unstable();
    for (k, v) in labels {
        check_label(k, &[v], path)?;
        terms.push(format!("{k} == '{v}'"));
    }
    for (key, operator, values, e_path) in decoded {
        let term = match operator {
            "In" => format!("{key} in {{ '{}' }}", values.join("', '")),
            "NotIn" => format!("{key} not in {{ '{}' }}", values.join("', '")),
            "Exists" => format!("has({key})"),
            "DoesNotExist" => format!("! has({key})"),
            // Upstream leaves the term out, which widens the selector.
            _ if mode == BadRules::Upstream => continue,
            other => return Err(Fault::Rejected(format!("{e_path}: unknown operator {other:?}"))),
        };
        let checked: &[&str] = if matches!(operator, "In" | "NotIn") { &values } else { &[] };
        // Upstream writes `k in { '' }`, which matches the empty value; Kubernetes refuses empty sets.
        if mode == BadRules::DropRule && matches!(operator, "In" | "NotIn") && values.is_empty() {
            return Err(Fault::Rejected(format!("{e_path}: operator {operator} needs values")));
        }
        check_label(key, checked, &e_path)?;
        terms.push(term);
    }
    Ok(terms.join(" && "))
}

/// What the Calico selector parser needs of a key and its quoted values (they are not escaped).
fn check_label(key: &str, values: &[&str], path: &str) -> Result<(), Fault> {
    let ident = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'/' | b'-');
    if key.is_empty() || key.len() > MAX_LABEL_LENGTH || !key.bytes().all(ident) {
        return Err(Fault::Rejected(format!("{path}: label key {key:?} cannot be used in a selector")));
    }
    if let Some(v) = values.iter().find(|v| v.contains('\'')) {
        return Err(Fault::Rejected(format!("{path}: label value {v:?} cannot be used in a selector")));
    }
    Ok(())
}

/// One Calico rule: ingress puts the peer in `source`, egress in `destination`; ports are always
/// destination ports.
fn calico_rule(protocol: &str, ports: &[CalicoPort], peer: &Peer, direction: Direction) -> Value {
    let mut rule = Map::new();
    rule.insert("action".into(), json!("Allow"));
    if !protocol.is_empty() {
        let value = protocol_number(protocol).map_or_else(|| json!(protocol), |n| json!(n));
        rule.insert("protocol".into(), value);
    }
    let mut entity = Map::new();
    if !peer.selector.is_empty() {
        entity.insert("selector".into(), json!(peer.selector));
    }
    if !peer.namespace_selector.is_empty() {
        entity.insert("namespaceSelector".into(), json!(peer.namespace_selector));
    }
    if !peer.nets.is_empty() {
        entity.insert("nets".into(), peer.nets.iter().map(|n| json!(n.text)).collect());
    }
    if !peer.not_nets.is_empty() {
        entity.insert("notNets".into(), peer.not_nets.iter().map(|n| json!(n.text)).collect());
    }
    let mut ports_entity = Map::new();
    if !ports.is_empty() {
        ports_entity.insert("ports".into(), ports.iter().map(CalicoPort::to_json).collect());
    }
    let (source, destination) = match direction {
        Direction::Ingress => (entity, ports_entity),
        Direction::Egress => {
            let mut destination = entity;
            destination.extend(ports_entity);
            (Map::new(), destination)
        }
    };
    if !source.is_empty() {
        rule.insert("source".into(), Value::Object(source));
    }
    if !destination.is_empty() {
        rule.insert("destination".into(), Value::Object(destination));
    }
    Value::Object(rule)
}
