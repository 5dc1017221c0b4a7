//! Automatic host endpoints (SPEC §1.6), pure: which HostEndpoints each node should have, and the
//! writes that make the datastore's managed ones exactly those.
//!
//! Owns: reading the KubeControllersConfiguration's `controllers.node.hostEndpoint` (with the
//! `AUTO_HOST_ENDPOINTS` override) into templates, and reporting each template it cannot use; the
//! facts kept per node (labels, addresses, interfaces) from a Calico Node (etcd) or a Kubernetes
//! Node (KDD, as libcalico-go converts one); the objects upstream builds (names and their hashing,
//! labels, annotations, `expectedIPs`, `interfaceName`, profiles); upstream's drift rule; and the
//! plan (create, update, delete; never a HostEndpoint without the created-by label).
//! Must not: do I/O or read the clock; write or delete a HostEndpoint this controller did not
//! create (a user's HostEndpoint that holds a wanted name is reported, not taken over).
//!
//! Upstream: `kube-controllers/pkg/controllers/node/hostendpoints.go` (building, drift, deletes),
//! `kube-controllers/pkg/config/runconfig.go` (`mergeAutoHostEndpoints`),
//! `libcalico-go/lib/backend/k8s/resources/node.go` (`K8sNodeToCalico`: annotations, addresses,
//! interfaces), `libcalico-go/lib/apis/internalapi/node.go` (the Calico Node's field names).
//!
//! # Departures from upstream, each for a reason
//!
//! * Addresses are written in Go's canonical form (`net.IP.String()`, an IPv4-mapped IPv6
//!   address as IPv4) with any `/prefix` removed, and are deduplicated across every source.
//!   Upstream keeps most of them as written: a CIDR-form tunnel or interface address would make
//!   a HostEndpoint the API rejects (`expectedIPs` must be IPs), and its first seven sources are
//!   appended without a duplicate check. What calico-node and kubelet write is already
//!   canonical, plain and distinct, so the objects are the same in practice.
//! * A template that cannot be used (bad selector, CIDR or pattern, or a pattern without a
//!   `generateName`) is reported and skipped, so its HostEndpoints go as stale. Upstream stops
//!   the node's whole sync on a bad selector (leaving its HostEndpoints as they are), panics on a
//!   bad pattern, and treats a bad CIDR as "no address matches".
//! * Labels and annotations compare as maps: absent, `null` and `{}` are the same. Upstream's
//!   `reflect.DeepEqual` tells a nil map from an empty one.
//! * An update keeps the stored object's other metadata (owner references, finalizers, its own
//!   annotations are replaced though): upstream writes the object it built with only the stored
//!   `resourceVersion`, `uid` and `creationTimestamp` carried over. The `spec` is replaced whole
//!   in both.
//! * `autoCreate`/`createDefaultHostEndpoint` are read case-insensitively, as
//!   [`crate::config::RunConfig::merge`] reads them (upstream wants `Enabled` exactly; its API
//!   validation admits nothing else).
//! * Two nodes whose HostEndpoint names collide (node `a-b`'s default and node `a`'s template
//!   `b`): the node first in name order keeps the name. Upstream lets them overwrite each other.
//! * `interfacePattern` is Rust's `regex`, which shares Go's RE2 syntax; `\d`, `\w`, `\s` and
//!   `\b` are Unicode-aware here and ASCII in Go (interface names are ASCII), and a few rare
//!   constructs (`\Q...\E`, `\C`) parse only in Go.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnet::IpNet;
use regex::Regex;
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

use crate::config::enabled_str;
use crate::datastore::Stored;
use crate::datastore::etcd_layout::V3_API_VERSION;
use crate::reconcile::Write;
use crate::selector::{Selector, SelectorError};

/// The label that marks a HostEndpoint as this controller's (upstream `controller.go`).
pub const CREATED_BY_LABEL: &str = "projectcalico.org/created-by";
pub const CREATED_BY_VALUE: &str = "calico-kube-controllers";
/// The profile every automatic HostEndpoint carries, templates' included (libcalico-go
/// `resources.DefaultAllowProfileName`).
pub const DEFAULT_ALLOW_PROFILE: &str = "projectcalico-default-allow";
/// The default HostEndpoint covers all of the node's interfaces.
pub const DEFAULT_INTERFACE: &str = "*";
const NAME_SUFFIX: &str = "auto-hep";
/// A HostEndpoint's name is a DNS-1123 subdomain: at most 253 bytes.
pub const MAX_NAME_LEN: usize = 253;

// -------------------------------------------------------------------------------------------------
// Configuration.

/// What to create: `controllers.node.hostEndpoint` of the KubeControllersConfiguration, merged
/// with `AUTO_HOST_ENDPOINTS`.
#[derive(Debug, Clone, Default)]
pub struct HostEndpointConfig {
    /// Off: no HostEndpoint is wanted, so every managed one is deleted.
    pub auto_create: bool,
    /// `<node>-auto-hep` for every node.
    pub create_default: bool,
    /// The usable templates, in the configuration's order.
    pub templates: Vec<Template>,
}

/// One entry of `hostEndpoint.templates`, parsed.
#[derive(Debug, Clone)]
pub struct Template {
    /// Goes into the name: `<node>-<generateName>[-<interface>]-auto-hep`.
    pub generate_name: String,
    /// Which nodes (by label) get this template's HostEndpoints; `all()` when unset.
    pub node_selector: Selector,
    /// A node address is a template HostEndpoint's expected IP when one of these holds it.
    pub interface_cidrs: Vec<IpNet>,
    /// `Some`: one HostEndpoint per node interface whose name this matches (anywhere in it).
    pub interface_pattern: Option<Regex>,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
}

/// A template left out, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("host endpoint template {index} ({generate_name:?}) is skipped: {problem}")]
pub struct TemplateError {
    /// Its position in `templates`.
    pub index: usize,
    pub generate_name: String,
    pub problem: TemplateProblem,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateProblem {
    #[error("not a template: {0}")]
    Malformed(String),
    #[error("nodeSelector: {0}")]
    Selector(SelectorError),
    #[error("interfaceCIDRs: {0:?} is not a CIDR")]
    Cidr(String),
    #[error("interfacePattern {pattern:?} is not a regular expression: {message}")]
    Pattern { pattern: String, message: String },
    #[error("interfacePattern needs a generateName to name its host endpoints")]
    MissingGenerateName,
}

impl TemplateProblem {
    /// A bounded label for metrics.
    pub fn category(&self) -> &'static str {
        match self {
            TemplateProblem::Malformed(_) => "malformed",
            TemplateProblem::Selector(_) => "selector",
            TemplateProblem::Cidr(_) => "cidr",
            TemplateProblem::Pattern { .. } => "pattern",
            TemplateProblem::MissingGenerateName => "generate_name",
        }
    }
}

/// A template as written; serde checks the types, [`Template::parse`] the contents.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct TemplateText {
    generate_name: String,
    node_selector: String,
    #[serde(rename = "interfaceCIDRs")]
    interface_cidrs: Vec<String>,
    interface_pattern: String,
    labels: BTreeMap<String, String>,
    annotations: BTreeMap<String, String>,
}

impl HostEndpointConfig {
    /// The configuration from the API's `hostEndpoint` section (`None` when absent) and the
    /// parsed `AUTO_HOST_ENDPOINTS` (`Some(true)` = `enabled`), as upstream's
    /// `mergeAutoHostEndpoints`: the variable, when set, replaces the section entirely
    /// (`enabled`: auto-create with the default HostEndpoint and no templates; `disabled`: off).
    /// Without it, `autoCreate` defaults to off and `createDefaultHostEndpoint` to on (the same
    /// reading as [`crate::config::RunConfig::merge`]). Templates that cannot be used are
    /// left out and returned with the reason.
    pub fn from_api(host_endpoint: Option<&Value>, env_override: Option<bool>) -> (HostEndpointConfig, Vec<TemplateError>) {
        match env_override {
            Some(true) => return (HostEndpointConfig { auto_create: true, create_default: true, templates: Vec::new() }, Vec::new()),
            Some(false) => return (HostEndpointConfig { auto_create: false, create_default: true, templates: Vec::new() }, Vec::new()),
            None => {}
        }
        let text = |field: &str| host_endpoint.and_then(|h| h.get(field)).and_then(Value::as_str);
        let mut cfg = HostEndpointConfig {
            auto_create: enabled_str(text("autoCreate"), false),
            create_default: enabled_str(text("createDefaultHostEndpoint"), true),
            templates: Vec::new(),
        };
        let mut errors = Vec::new();
        match host_endpoint.and_then(|h| h.get("templates")) {
            None | Some(Value::Null) => {}
            Some(Value::Array(list)) => {
                for (index, raw) in list.iter().enumerate() {
                    match Template::parse(raw) {
                        Ok(t) => cfg.templates.push(t),
                        Err((generate_name, problem)) => errors.push(TemplateError { index, generate_name, problem }),
                    }
                }
            }
            Some(other) => errors.push(TemplateError {
                index: 0,
                generate_name: String::new(),
                problem: TemplateProblem::Malformed(format!("templates is {}, not a list", json_type(other))),
            }),
        }
        (cfg, errors)
    }
}

impl Template {
    /// One template from its JSON; on failure its `generateName` (if readable) and the problem.
    fn parse(raw: &Value) -> Result<Template, (String, TemplateProblem)> {
        let generate_name = raw.get("generateName").and_then(Value::as_str).unwrap_or_default().to_string();
        let fail = |problem| Err((generate_name.clone(), problem));
        // Fields written as `null` read as unset.
        let raw = match raw {
            Value::Object(m) => Value::Object(m.iter().filter(|(_, v)| !v.is_null()).map(|(k, v)| (k.clone(), v.clone())).collect()),
            other => other.clone(),
        };
        let text: TemplateText = match serde_json::from_value(raw) {
            Ok(t) => t,
            Err(e) => return fail(TemplateProblem::Malformed(e.to_string())),
        };
        let node_selector = match Selector::parse(&text.node_selector) {
            Ok(s) => s,
            Err(e) => return fail(TemplateProblem::Selector(e)),
        };
        let mut interface_cidrs = Vec::with_capacity(text.interface_cidrs.len());
        for cidr in &text.interface_cidrs {
            match parse_cidr(cidr) {
                Some(net) => interface_cidrs.push(net),
                None => return fail(TemplateProblem::Cidr(cidr.clone())),
            }
        }
        let interface_pattern = if text.interface_pattern.is_empty() {
            None
        } else {
            if text.generate_name.is_empty() {
                return fail(TemplateProblem::MissingGenerateName);
            }
            match Regex::new(&text.interface_pattern) {
                Ok(re) => Some(re),
                Err(e) => return fail(TemplateProblem::Pattern { pattern: text.interface_pattern.clone(), message: e.to_string() }),
            }
        };
        Ok(Template {
            generate_name: text.generate_name,
            node_selector,
            interface_cidrs,
            interface_pattern,
            labels: text.labels,
            annotations: text.annotations,
        })
    }
}

fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

// -------------------------------------------------------------------------------------------------
// Addresses, read as Go reads them.

/// An address as Go's `net.ParseIP` and `ParseCIDROrIP` take it, an IPv4-mapped IPv6 address
/// folded to IPv4 (Go's `To4`, which its `String()` and `IPNet.Contains` apply).
fn go_ip(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(addr),
        v4 => v4,
    }
}

/// `a.b.c.d/n` or `x::y/n` as Go's `net.ParseCIDR` reads it: the address as written (not the
/// network's) and the prefix length (decimal digits, at most the address's bits).
fn parse_prefixed(text: &str) -> Option<(IpAddr, u8)> {
    let (addr, prefix) = text.split_once('/')?;
    let addr: IpAddr = addr.parse().ok()?;
    if prefix.is_empty() || !prefix.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let bits = if addr.is_ipv4() { 32 } else { 128 };
    // Leading zeros are digits to Go too; a long run of them must not overflow.
    let len: u32 = prefix.trim_start_matches('0').parse().unwrap_or(0);
    if prefix.trim_start_matches('0').len() > 3 || len > bits {
        return None;
    }
    Some((addr, len as u8))
}

/// Libcalico's `ParseCIDROrIP`: a plain address or a CIDR; the address and, for a CIDR, its prefix.
fn parse_ip_or_cidr(text: &str) -> Option<(IpAddr, Option<u8>)> {
    if let Some((addr, len)) = parse_prefixed(text) {
        return Some((addr, Some(len)));
    }
    text.parse::<IpAddr>().ok().map(|a| (a, None))
}

/// A template's `interfaceCIDRs` entry (Go's `net.ParseCIDR`: a plain address is not one).
fn parse_cidr(text: &str) -> Option<IpNet> {
    let (addr, len) = parse_prefixed(text)?;
    let addr = match (addr, go_ip(addr)) {
        // `::ffff:a.b.c.d/n` stays an IPv6 network, as in Go.
        (IpAddr::V6(_), IpAddr::V4(_)) => addr,
        (_, a) => a,
    };
    IpNet::new(addr, len).ok()
}

/// Libcalico's `validateIPv4Network`/`validateIPv6Network`, which the Kubernetes Node's tunnel
/// annotations must pass: a plain address of that family, or a CIDR whose address is its network.
fn strict_network(text: &str, v4: bool) -> bool {
    match parse_ip_or_cidr(text) {
        Some((addr, prefix)) => {
            let addr = go_ip(addr);
            addr.is_ipv4() == v4
                && prefix.is_none_or(|len| IpNet::new(addr, len).map(|n| n.network() == addr).unwrap_or(false))
        }
        None => false,
    }
}

/// Libcalico's `ValidateCIDRv4`/`ValidateCIDRv6` (the BGP address annotations): a plain address
/// or any CIDR of that family.
fn loose_network(text: &str, v4: bool) -> bool {
    parse_ip_or_cidr(text).is_some_and(|(addr, _)| go_ip(addr).is_ipv4() == v4)
}

/// A node's addresses in order, each once.
#[derive(Default)]
struct AddressList {
    seen: BTreeSet<String>,
    list: Vec<String>,
}

impl AddressList {
    /// Adds an address or CIDR (as its address, in Go's canonical form); anything else is dropped.
    fn push(&mut self, text: &str) {
        if let Some(ip) = canonical_ip(text)
            && self.seen.insert(ip.clone())
        {
            self.list.push(ip);
        }
    }
}

/// `text` (an address or a CIDR) as Go prints its address; `None` when it is neither.
fn canonical_ip(text: &str) -> Option<String> {
    parse_ip_or_cidr(text).map(|(addr, _)| go_ip(addr).to_string())
}

// -------------------------------------------------------------------------------------------------
// Nodes.

/// What the controller keeps of one node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeData {
    pub name: String,
    /// The Calico Node's labels (on KDD: the Kubernetes labels over libcalico's own).
    pub labels: BTreeMap<String, String>,
    /// The default HostEndpoint's `expectedIPs`, in upstream's order: BGP IPv4 and IPv6, IPIP
    /// tunnel, VXLAN IPv4 and IPv6 tunnels, WireGuard IPv4 and IPv6 interfaces, the `InternalIP`
    /// addresses, then every interface's addresses. Canonical, without prefixes, each once.
    pub addresses: Vec<String>,
    /// The interfaces calico-node found, in its order (it sorts them by name).
    pub interfaces: Vec<NodeInterface>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeInterface {
    pub name: String,
    /// Canonical, without prefixes, each once; invalid ones dropped.
    pub addresses: Vec<String>,
}

/// A node's address sources, in upstream's order, before validation.
#[derive(Default)]
struct AddressSources<'a> {
    bgp_v4: Option<&'a str>,
    bgp_v6: Option<&'a str>,
    ipip_v4: Option<String>,
    vxlan_v4: Option<&'a str>,
    vxlan_v6: Option<&'a str>,
    wireguard_v4: Option<String>,
    wireguard_v6: Option<&'a str>,
    internal_ips: Vec<&'a str>,
}

/// The `InternalIP` entries of a Calico Node's `spec.addresses` or a Kubernetes Node's
/// `status.addresses` (both `[{address, type}]`).
fn internal_ips(addresses: Option<&Value>) -> Vec<&str> {
    addresses
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter(|a| a.get("type").and_then(Value::as_str) == Some("InternalIP"))
        .filter_map(|a| a.get("address").and_then(Value::as_str))
        .collect()
}

fn string_map(v: Option<&Value>) -> BTreeMap<String, String> {
    v.and_then(Value::as_object)
        .map(|m| m.iter().filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string()))).collect())
        .unwrap_or_default()
}

fn non_empty(v: Option<&Value>) -> Option<&str> {
    v.and_then(Value::as_str).filter(|s| !s.is_empty())
}

/// Interfaces as `spec.interfaces` (or the `projectcalico.org/Interfaces` annotation) holds them:
/// `[{"name": ..., "addresses": [...]}]`.
fn interfaces_of(list: Option<&Value>) -> Vec<NodeInterface> {
    let Some(list) = list.and_then(Value::as_array) else { return Vec::new() };
    list.iter()
        .map(|iface| {
            let mut addresses = AddressList::default();
            for a in iface.get("addresses").and_then(Value::as_array).into_iter().flatten().filter_map(Value::as_str) {
                addresses.push(a);
            }
            NodeInterface { name: iface.get("name").and_then(Value::as_str).unwrap_or_default().to_string(), addresses: addresses.list }
        })
        .collect()
}

impl NodeData {
    /// From a `projectcalico.org/v3` Node (etcd mode): `spec.bgp.ipv4Address`/`ipv6Address`/
    /// `ipv4IPIPTunnelAddr`, `spec.ipv4VXLANTunnelAddr`/`ipv6VXLANTunnelAddr`,
    /// `spec.wireguard.interfaceIPv4Address`/`interfaceIPv6Address`, `spec.addresses[]` of type
    /// `InternalIP`, `spec.interfaces[]`. `None` without a name.
    pub fn from_calico_node(node: &Value) -> Option<NodeData> {
        let name = non_empty(node.pointer("/metadata/name"))?.to_string();
        let spec = &node["spec"];
        let sources = AddressSources {
            bgp_v4: non_empty(spec.pointer("/bgp/ipv4Address")),
            bgp_v6: non_empty(spec.pointer("/bgp/ipv6Address")),
            ipip_v4: non_empty(spec.pointer("/bgp/ipv4IPIPTunnelAddr")).map(str::to_string),
            vxlan_v4: non_empty(spec.get("ipv4VXLANTunnelAddr")),
            vxlan_v6: non_empty(spec.get("ipv6VXLANTunnelAddr")),
            wireguard_v4: non_empty(spec.pointer("/wireguard/interfaceIPv4Address")).map(str::to_string),
            wireguard_v6: non_empty(spec.pointer("/wireguard/interfaceIPv6Address")),
            internal_ips: internal_ips(spec.get("addresses")),
        };
        Some(NodeData::build(name, string_map(node.pointer("/metadata/labels")), &sources, interfaces_of(spec.get("interfaces"))))
    }

    /// From a Kubernetes Node (KDD), as libcalico-go's `K8sNodeToCalico` converts it: labels are
    /// the `projectcalico.org/labels` annotation's with the Kubernetes labels over them; the
    /// `projectcalico.org/IPv4Address`/`IPv6Address` (BGP), `IPv4IPIPTunnelAddr`,
    /// `IPv4VXLANTunnelAddr`/`IPv6VXLANTunnelAddr` and `IPv4WireguardInterfaceAddr`/
    /// `IPv6WireguardInterfaceAddr` annotations, each dropped unless it passes libcalico's
    /// validator for it; `status.addresses` of type `InternalIP`; interfaces from the
    /// `projectcalico.org/Interfaces` annotation (JSON). `use_pod_cidr` is libcalico's
    /// `USE_POD_CIDR` (host-local IPAM): then the IPIP tunnel address is the first address of
    /// `spec.podCIDR` (and the WireGuard IPv4 one too when the node has a WireGuard public key),
    /// instead of the annotations. `None` without a name.
    pub fn from_kubernetes_node(node: &Value, use_pod_cidr: bool) -> Option<NodeData> {
        let name = non_empty(node.pointer("/metadata/name"))?.to_string();
        let annotations = node.pointer("/metadata/annotations");
        let annotation = |key: &str| non_empty(annotations.and_then(|a| a.get(key)));
        let checked = |key: &str, valid: fn(&str, bool) -> bool, v4: bool| annotation(key).filter(|t| valid(t, v4));

        let mut labels: BTreeMap<String, String> = annotation("projectcalico.org/labels")
            .and_then(|t| serde_json::from_str::<BTreeMap<String, String>>(t).ok())
            .unwrap_or_default();
        labels.extend(string_map(node.pointer("/metadata/labels")));

        let pod_cidr = non_empty(node.pointer("/spec/podCIDR")).filter(|_| use_pod_cidr);
        let (ipip_v4, wireguard_v4, wireguard_v6) = match pod_cidr {
            Some(cidr) => {
                let tunnel = static_tunnel_address(cidr);
                let wireguard = tunnel.clone().filter(|_| annotation("projectcalico.org/WireguardPublicKey").is_some());
                (tunnel, wireguard, None)
            }
            None => (
                checked("projectcalico.org/IPv4IPIPTunnelAddr", strict_network, true).map(str::to_string),
                checked("projectcalico.org/IPv4WireguardInterfaceAddr", strict_network, true).map(str::to_string),
                checked("projectcalico.org/IPv6WireguardInterfaceAddr", strict_network, false),
            ),
        };
        let sources = AddressSources {
            bgp_v4: checked("projectcalico.org/IPv4Address", loose_network, true),
            bgp_v6: checked("projectcalico.org/IPv6Address", loose_network, false),
            ipip_v4,
            vxlan_v4: checked("projectcalico.org/IPv4VXLANTunnelAddr", strict_network, true),
            vxlan_v6: checked("projectcalico.org/IPv6VXLANTunnelAddr", strict_network, false),
            wireguard_v4,
            wireguard_v6,
            internal_ips: internal_ips(node.pointer("/status/addresses")),
        };
        // An annotation that is not a JSON list of interfaces gives none, as in libcalico.
        let interfaces = annotation("projectcalico.org/Interfaces")
            .and_then(|t| serde_json::from_str::<Value>(t).ok())
            .map(|v| interfaces_of(Some(&v)))
            .unwrap_or_default();
        Some(NodeData::build(name, labels, &sources, interfaces))
    }

    fn build(name: String, labels: BTreeMap<String, String>, s: &AddressSources<'_>, interfaces: Vec<NodeInterface>) -> NodeData {
        let mut addresses = AddressList::default();
        let singles = [s.bgp_v4, s.bgp_v6, s.ipip_v4.as_deref(), s.vxlan_v4, s.vxlan_v6, s.wireguard_v4.as_deref(), s.wireguard_v6];
        for a in singles.into_iter().flatten().chain(s.internal_ips.iter().copied()) {
            addresses.push(a);
        }
        for a in interfaces.iter().flat_map(|i| &i.addresses) {
            addresses.push(a);
        }
        NodeData { name, labels, addresses: addresses.list, interfaces }
    }
}

/// Libcalico's host-local tunnel address: the pod CIDR's address as written with its last IPv4
/// byte incremented (wrapping, as Go's byte arithmetic). `None` for an IPv6 CIDR; also for an
/// unparsable one, where libcalico fails the whole conversion (here the node just has no tunnel
/// address).
fn static_tunnel_address(pod_cidr: &str) -> Option<String> {
    let (addr, _) = parse_prefixed(pod_cidr)?;
    match go_ip(addr) {
        IpAddr::V4(v4) => {
            let mut octets = v4.octets();
            octets[3] = octets[3].wrapping_add(1);
            Some(std::net::Ipv4Addr::from(octets).to_string())
        }
        IpAddr::V6(_) => None,
    }
}

// -------------------------------------------------------------------------------------------------
// The wanted objects.

/// Upstream's `generateAutoHostEndpointName`: `<node>-auto-hep` (no template),
/// `<node>-<template>-auto-hep`, `<node>-<template>-<interface>-auto-hep`; `None` for an
/// interface without a template. Hashed when longer than [`MAX_NAME_LEN`].
pub fn host_endpoint_name(node: &str, template: &str, interface: &str) -> Option<String> {
    let name = match (template.is_empty(), interface.is_empty()) {
        (true, true) => format!("{node}-{NAME_SUFFIX}"),
        (false, true) => format!("{node}-{template}-{NAME_SUFFIX}"),
        (false, false) => format!("{node}-{template}-{interface}-{NAME_SUFFIX}"),
        (true, false) => return None,
    };
    Some(hash_if_too_long(name))
}

/// Upstream's `hashNameIfTooLong`: a name over 253 bytes becomes the unpadded URL-safe base64 of
/// its SHA-256 with `-`, `_` and `.` removed, lowercased, then `-auto-hep` (52 bytes at most, so
/// upstream's final cut to 253 never applies).
pub fn hash_if_too_long(name: String) -> String {
    if name.len() <= MAX_NAME_LEN {
        return name;
    }
    let digest = Sha256::digest(name.as_bytes());
    let mut hashed: String = base64_url(&digest).chars().filter(|c| !matches!(c, '-' | '_' | '.')).collect();
    hashed.push('-');
    hashed.push_str(NAME_SUFFIX);
    hashed.make_ascii_lowercase();
    hashed.truncate(MAX_NAME_LEN);
    hashed
}

/// RFC 4648 §5 base64 without padding (Go's `base64.RawURLEncoding`); the core has no base64 crate.
fn base64_url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |n, (i, b)| n | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..=chunk.len() {
            out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
        }
    }
    out
}

/// Upstream's `generateAutoHostEndpoint`: labels are the node's, then the template's over them,
/// then the created-by label; annotations are the template's only (none when it has none).
fn host_endpoint(node: &NodeData, template: Option<&Template>, name: &str, expected_ips: Vec<String>, interface_name: &str) -> Value {
    let mut labels = node.labels.clone();
    if let Some(t) = template {
        labels.extend(t.labels.iter().map(|(k, v)| (k.clone(), v.clone())));
    }
    labels.insert(CREATED_BY_LABEL.into(), CREATED_BY_VALUE.into());
    let mut metadata = json!({"name": name, "labels": labels});
    if let Some(t) = template.filter(|t| !t.annotations.is_empty()) {
        metadata["annotations"] = json!(t.annotations);
    }
    // The API omits empty fields (`omitempty`), so the wanted object does too.
    let mut spec = Map::new();
    spec.insert("node".into(), json!(node.name));
    if !interface_name.is_empty() {
        spec.insert("interfaceName".into(), json!(interface_name));
    }
    if !expected_ips.is_empty() {
        spec.insert("expectedIPs".into(), json!(expected_ips));
    }
    spec.insert("profiles".into(), json!([DEFAULT_ALLOW_PROFILE]));
    json!({"apiVersion": V3_API_VERSION, "kind": "HostEndpoint", "metadata": metadata, "spec": spec})
}

/// The node's addresses that one of the template's CIDRs holds, in the node's order
/// (upstream's `getExpectedIPsMatchingInterfaceCIDRs`).
fn addresses_in(node: &NodeData, cidrs: &[IpNet]) -> Vec<String> {
    node.addresses
        .iter()
        .filter(|a| a.parse::<IpAddr>().is_ok_and(|ip| cidrs.iter().any(|c| c.contains(&ip))))
        .cloned()
        .collect()
}

/// The HostEndpoints `node` should have (name -> object): none when auto-create is off; else the
/// default one (if enabled), then each template's whose selector matches the node's labels,
/// without a pattern one HostEndpoint with the template-filtered addresses (none when no address
/// matches), with a pattern one per matching interface with the filtered addresses followed by
/// that interface's own. When two of them share a name the later one stands, as upstream's
/// successive writes leave it.
pub fn desired(node: &NodeData, cfg: &HostEndpointConfig) -> BTreeMap<String, Value> {
    let mut out = BTreeMap::new();
    if !cfg.auto_create {
        return out;
    }
    if cfg.create_default
        && let Some(name) = host_endpoint_name(&node.name, "", "")
    {
        let hep = host_endpoint(node, None, &name, node.addresses.clone(), DEFAULT_INTERFACE);
        out.insert(name, hep);
    }
    for t in cfg.templates.iter().filter(|t| t.node_selector.matches_map(&node.labels)) {
        let matched = addresses_in(node, &t.interface_cidrs);
        match &t.interface_pattern {
            None if matched.is_empty() => {}
            None => {
                if let Some(name) = host_endpoint_name(&node.name, &t.generate_name, "") {
                    let hep = host_endpoint(node, Some(t), &name, matched, "");
                    out.insert(name, hep);
                }
            }
            Some(pattern) => {
                for iface in node.interfaces.iter().filter(|i| pattern.is_match(&i.name)) {
                    let Some(name) = host_endpoint_name(&node.name, &t.generate_name, &iface.name) else { continue };
                    let mut ips = matched.clone();
                    for a in &iface.addresses {
                        if !ips.contains(a) {
                            ips.push(a.clone());
                        }
                    }
                    let hep = host_endpoint(node, Some(t), &name, ips, &iface.name);
                    out.insert(name, hep);
                }
            }
        }
    }
    out
}

/// [`desired`] for every node. A name two nodes want goes to the node first in name order.
pub fn desired_all<'a>(nodes: impl IntoIterator<Item = &'a NodeData>, cfg: &HostEndpointConfig) -> BTreeMap<String, Value> {
    let mut nodes: Vec<&NodeData> = nodes.into_iter().collect();
    nodes.sort_by(|a, b| a.name.cmp(&b.name));
    let mut out = BTreeMap::new();
    for node in nodes {
        for (name, hep) in desired(node, cfg) {
            out.entry(name).or_insert(hep);
        }
    }
    out
}

// -------------------------------------------------------------------------------------------------
// Drift and the plan.

/// Whether this controller made `hep`: it carries `projectcalico.org/created-by=calico-kube-controllers`.
pub fn is_managed(hep: &Value) -> bool {
    hep.pointer(&format!("/metadata/labels/{}", CREATED_BY_LABEL.replace('/', "~1"))).and_then(Value::as_str) == Some(CREATED_BY_VALUE)
}

fn map_field<'a>(v: &'a Value, pointer: &str) -> Option<&'a Map<String, Value>> {
    v.pointer(pointer).and_then(Value::as_object).filter(|m| !m.is_empty())
}

/// Upstream's `hostEndpointNeedsUpdate`: labels, annotations, `expectedIPs` (in order) or
/// `interfaceName` differ. Nothing else counts: a changed profile or port list stays until one
/// of these changes too. Absent and empty are the same.
pub fn needs_update(current: &Value, desired: &Value) -> bool {
    let list = |v: &Value| v.pointer("/spec/expectedIPs").and_then(Value::as_array).filter(|l| !l.is_empty()).cloned();
    let text = |v: &Value| v.pointer("/spec/interfaceName").and_then(Value::as_str).unwrap_or_default().to_string();
    map_field(current, "/metadata/labels") != map_field(desired, "/metadata/labels")
        || map_field(current, "/metadata/annotations") != map_field(desired, "/metadata/annotations")
        || list(current) != list(desired)
        || text(current) != text(desired)
}

/// The stored HostEndpoint rewritten as upstream's update writes it: the wanted labels,
/// annotations and whole `spec`; the rest of the stored object (its identity, revision and any
/// other metadata) kept.
fn updated(current: &Value, desired: &Value) -> Value {
    let mut value = current.clone();
    if !value.is_object() {
        value = json!({});
    }
    if !value["metadata"].is_object() {
        value["metadata"] = json!({});
    }
    let metadata = value["metadata"].as_object_mut().expect("made an object above");
    metadata.insert("labels".into(), desired.pointer("/metadata/labels").cloned().unwrap_or_else(|| json!({})));
    match desired.pointer("/metadata/annotations") {
        Some(a) => metadata.insert("annotations".into(), a.clone()),
        None => metadata.remove("annotations"),
    };
    value["spec"] = desired.get("spec").cloned().unwrap_or_else(|| json!({}));
    value
}

/// What one round does.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HostEndpointPlan {
    /// Creates and updates in name order, then deletes in name order (a round cut short never
    /// removes before it adds).
    pub writes: Vec<Write>,
    /// Wanted names held by a HostEndpoint this controller did not create: left alone (upstream
    /// fails to create them on every sync), for the shell to report.
    pub blocked: Vec<String>,
}

/// The writes that make the managed HostEndpoints among `listed` (all HostEndpoints, as listed)
/// exactly `desired` ([`desired_all`]; empty when auto-create is off, which deletes every managed
/// one): a create for each wanted name nobody holds, an update for each managed one that
/// [`needs_update`], a delete for each managed one not wanted. A HostEndpoint without the
/// created-by label is never written or deleted.
pub fn plan<'a>(desired: &BTreeMap<String, Value>, listed: impl IntoIterator<Item = &'a Stored>) -> HostEndpointPlan {
    let by_name: BTreeMap<&str, &Stored> = listed.into_iter().map(|s| (s.name.as_str(), s)).collect();
    let mut out = HostEndpointPlan::default();
    for (name, want) in desired {
        match by_name.get(name.as_str()) {
            // The shell writes `desired[name]`.
            None => out.writes.push(Write::Create { name: name.clone() }),
            Some(current) if !is_managed(&current.value) => out.blocked.push(name.clone()),
            Some(current) if needs_update(&current.value, want) => {
                out.writes.push(Write::Update { current: (*current).clone(), value: updated(&current.value, want) })
            }
            Some(_) => {}
        }
    }
    for (name, current) in &by_name {
        if is_managed(&current.value) && !desired.contains_key(*name) {
            out.writes.push(Write::Delete { current: (*current).clone() });
        }
    }
    out
}

/// The node a HostEndpoint is on (`spec.node`), if it names one.
pub fn node_of(hep: &Value) -> Option<&str> {
    hep.pointer("/spec/node").and_then(Value::as_str).filter(|n| !n.is_empty())
}

/// The HostEndpoints this controller did not create whose node `known` does not know: in KDD
/// they go with their node, as the etcd-mode node deleter's cascade takes every HostEndpoint of a
/// deleted node (upstream leaves them in KDD, projectcalico/calico#8822). Managed ones of such a
/// node are already [`plan`]'s deletes. The shell proves each node gone before deleting.
pub fn of_unknown_nodes<'a>(listed: impl IntoIterator<Item = &'a Stored>, known: impl Fn(&str) -> bool) -> Vec<&'a Stored> {
    listed.into_iter().filter(|s| !is_managed(&s.value) && node_of(&s.value).is_some_and(|n| !known(n))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{EnvConfig, RunConfig};
    use proptest::prelude::*;

    fn cfg(v: Value) -> HostEndpointConfig {
        let (cfg, errors) = HostEndpointConfig::from_api(Some(&v), None);
        assert!(errors.is_empty(), "{errors:?}");
        cfg
    }

    fn node(name: &str, labels: &[(&str, &str)], addresses: &[&str], interfaces: &[(&str, &[&str])]) -> NodeData {
        NodeData {
            name: name.into(),
            labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            addresses: addresses.iter().map(|a| a.to_string()).collect(),
            interfaces: interfaces
                .iter()
                .map(|(n, a)| NodeInterface { name: n.to_string(), addresses: a.iter().map(|a| a.to_string()).collect() })
                .collect(),
        }
    }

    fn stored(value: Value) -> Stored {
        let name = value["metadata"]["name"].as_str().unwrap().to_string();
        Stored { name, revision: "7".into(), uid: "u-1".into(), value }
    }

    fn names(m: &BTreeMap<String, Value>) -> Vec<&str> {
        m.keys().map(String::as_str).collect()
    }

    const DEFAULT_ON: &str = r#"{"autoCreate": "Enabled"}"#;

    #[test]
    fn the_default_host_endpoint_of_a_calico_node_lists_every_address_in_upstreams_order() {
        let n = NodeData::from_calico_node(&json!({
            "apiVersion": "projectcalico.org/v3", "kind": "Node",
            "metadata": {"name": "worker-1", "labels": {"zone": "a", "odd": 3}},
            "spec": {
                "bgp": {"ipv4Address": "10.0.0.1/24", "ipv6Address": "FD00:0:0::1/64", "ipv4IPIPTunnelAddr": "10.1.0.1"},
                "ipv4VXLANTunnelAddr": "10.2.0.1", "ipv6VXLANTunnelAddr": "fd01::1",
                "wireguard": {"interfaceIPv4Address": "10.3.0.1", "interfaceIPv6Address": "fd02::1"},
                "addresses": [
                    {"address": "10.0.0.1/24", "type": "CalicoNodeIP"},
                    {"address": "192.168.0.5", "type": "InternalIP"},
                    {"address": "203.0.113.9", "type": "ExternalIP"},
                    {"address": "10.0.0.1", "type": "InternalIP"},
                    {"address": "not-an-ip", "type": "InternalIP"},
                    {"address": "::ffff:192.168.0.6", "type": "InternalIP"}
                ],
                "interfaces": [
                    {"name": "eth0", "addresses": ["10.0.0.1", "192.168.0.9"]},
                    {"name": "eth1", "addresses": ["bogus", "fd00::2/64"]}
                ]
            }
        }))
        .unwrap();
        assert_eq!(n.labels, [("zone".to_string(), "a".to_string())].into(), "a label that is not a string is not a label");
        assert_eq!(n.interfaces[1], NodeInterface { name: "eth1".into(), addresses: vec!["fd00::2".into()] });
        let want = desired(&n, &cfg(json!({"autoCreate": "Enabled"})));
        assert_eq!(names(&want), ["worker-1-auto-hep"]);
        assert_eq!(
            want["worker-1-auto-hep"],
            json!({
                "apiVersion": "projectcalico.org/v3", "kind": "HostEndpoint",
                "metadata": {"name": "worker-1-auto-hep", "labels": {"zone": "a", "projectcalico.org/created-by": "calico-kube-controllers"}},
                "spec": {
                    "node": "worker-1", "interfaceName": "*",
                    "expectedIPs": ["10.0.0.1", "fd00::1", "10.1.0.1", "10.2.0.1", "fd01::1", "10.3.0.1", "fd02::1",
                                    "192.168.0.5", "192.168.0.6", "192.168.0.9", "fd00::2"],
                    "profiles": ["projectcalico-default-allow"]
                }
            })
        );
    }

    #[test]
    fn a_kubernetes_node_gives_what_libcalico_converts_from_its_annotations_and_status() {
        let interfaces = json!([{"name": "eth0", "addresses": ["192.168.0.5", "192.168.0.7", "x"]}, {"name": "lo"}]).to_string();
        let k8s = json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": "kdd-1", "labels": {"shared": "k8s", "zone": "b"}, "annotations": {
                "projectcalico.org/labels": "{\"calico\":\"x\",\"shared\":\"calico\"}",
                "projectcalico.org/IPv4Address": "10.0.0.2/16",
                "projectcalico.org/IPv6Address": "10.0.0.3",
                "projectcalico.org/IPv4IPIPTunnelAddr": "10.1.0.2",
                "projectcalico.org/IPv4VXLANTunnelAddr": "10.2.0.2/24",
                "projectcalico.org/IPv6VXLANTunnelAddr": "fd01::2/128",
                "projectcalico.org/IPv4WireguardInterfaceAddr": "10.3.0.2",
                "projectcalico.org/IPv6WireguardInterfaceAddr": "fd02::2",
                "projectcalico.org/Interfaces": interfaces
            }},
            "spec": {"podCIDR": "10.244.3.0/24"},
            "status": {"addresses": [
                {"type": "Hostname", "address": "kdd-1"},
                {"type": "InternalIP", "address": "192.168.0.5"},
                {"type": "ExternalIP", "address": "203.0.113.10"}
            ]}
        });
        let n = NodeData::from_kubernetes_node(&k8s, false).unwrap();
        assert_eq!(n.name, "kdd-1");
        let labels: Vec<(&str, &str)> = n.labels.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        assert_eq!(labels, [("calico", "x"), ("shared", "k8s"), ("zone", "b")], "Kubernetes labels over libcalico's own");
        // IPv6Address holds an IPv4 address and the VXLAN one a CIDR that is not a network: both
        // fail libcalico's validators and are dropped; `fd01::2/128` is a network and stays.
        assert_eq!(n.addresses, ["10.0.0.2", "10.1.0.2", "fd01::2", "10.3.0.2", "fd02::2", "192.168.0.5", "192.168.0.7"]);
        assert_eq!(n.interfaces.len(), 2);
        assert_eq!(n.interfaces[0].addresses, ["192.168.0.5", "192.168.0.7"]);
        let want = desired(&n, &cfg(json!({"autoCreate": "Enabled"})));
        assert_eq!(want["kdd-1-auto-hep"]["spec"]["expectedIPs"], json!(n.addresses));
        assert_eq!(want["kdd-1-auto-hep"]["metadata"]["labels"]["calico"], "x");

        // Host-local IPAM: the tunnel address comes from the pod CIDR and the annotations are not read;
        // WireGuard gets the same address only with a public key.
        let host_local = NodeData::from_kubernetes_node(&k8s, true).unwrap();
        assert_eq!(host_local.addresses, ["10.0.0.2", "10.244.3.1", "fd01::2", "192.168.0.5", "192.168.0.7"]);
        let mut keyed = k8s.clone();
        keyed["metadata"]["annotations"]["projectcalico.org/WireguardPublicKey"] = json!("key=");
        assert_eq!(NodeData::from_kubernetes_node(&keyed, true).unwrap().addresses[1..3], ["10.244.3.1", "fd01::2"], "one address, listed once");

        let mut broken = k8s.clone();
        broken["metadata"]["annotations"]["projectcalico.org/Interfaces"] = json!("[{");
        assert!(NodeData::from_kubernetes_node(&broken, false).unwrap().interfaces.is_empty(), "an unreadable annotation gives no interfaces");
        assert_eq!(NodeData::from_kubernetes_node(&json!({"metadata": {}}), false), None);
        assert_eq!(NodeData::from_calico_node(&json!({"spec": {}})), None);
    }

    #[test]
    fn the_static_tunnel_address_is_the_pod_cidrs_address_plus_one() {
        for (cidr, want) in [("10.244.3.0/24", Some("10.244.3.1")), ("10.244.3.5/24", Some("10.244.3.6")), ("10.0.0.255/24", Some("10.0.0.0")),
                             ("fd00::/64", None), ("garbage", None)] {
            assert_eq!(static_tunnel_address(cidr).as_deref(), want, "{cidr}");
        }
    }

    #[test]
    fn templates_follow_their_selector_cidrs_and_interface_pattern() {
        let c = cfg(json!({"autoCreate": "Enabled", "createDefaultHostEndpoint": "Disabled", "templates": [
            {"generateName": "internal", "nodeSelector": "role == 'worker'", "interfaceCIDRs": ["192.168.0.0/16", "fd00::/16"]},
            {"generateName": "public", "interfaceCIDRs": ["203.0.113.0/24"]},
            {"generateName": "eth", "nodeSelector": "has(role)", "interfaceCIDRs": ["10.0.0.0/8"], "interfacePattern": "^eth[0-9]$"},
            {"generateName": "never", "nodeSelector": "role == 'none'", "interfaceCIDRs": ["0.0.0.0/0"]}
        ]}));
        let worker = node("w1", &[("role", "worker")], &["10.0.0.1", "192.168.0.5", "fd00::1", "192.168.1.1"],
                          &[("eth0", &["192.168.0.5", "172.16.0.1"]), ("eth10", &["172.16.0.2"]), ("veth1", &[]), ("eth1", &[])]);
        let want = desired(&worker, &c);
        assert_eq!(names(&want), ["w1-eth-eth0-auto-hep", "w1-eth-eth1-auto-hep", "w1-internal-auto-hep"],
                   "no default; `public` matched no address; `never` not the node; the pattern is a search, so `eth10` is out and `veth1` too only because of `^`");
        let internal = &want["w1-internal-auto-hep"];
        assert_eq!(internal["spec"], json!({"node": "w1", "expectedIPs": ["192.168.0.5", "fd00::1", "192.168.1.1"], "profiles": ["projectcalico-default-allow"]}),
                   "no interfaceName without a pattern; template HostEndpoints carry the default-allow profile too");
        let eth0 = &want["w1-eth-eth0-auto-hep"]["spec"];
        assert_eq!(eth0["interfaceName"], "eth0");
        assert_eq!(eth0["expectedIPs"], json!(["10.0.0.1", "192.168.0.5", "172.16.0.1"]), "the filtered addresses, then the interface's own, each once");
        assert_eq!(want["w1-eth-eth1-auto-hep"]["spec"]["expectedIPs"], json!(["10.0.0.1"]));

        let no_match = node("w2", &[("role", "worker")], &["172.16.5.5"], &[("eth0", &[])]);
        let want = desired(&no_match, &c);
        assert_eq!(names(&want), ["w2-eth-eth0-auto-hep"], "an empty address list skips a template without a pattern, not one with");
        assert!(want["w2-eth-eth0-auto-hep"]["spec"].get("expectedIPs").is_none());

        let unlabelled = node("w3", &[], &["203.0.113.7"], &[("eth0", &["10.0.0.9"])]);
        assert_eq!(names(&desired(&unlabelled, &c)), ["w3-public-auto-hep"], "an unset selector is all()");
    }

    #[test]
    fn template_labels_beat_node_labels_and_the_created_by_label_beats_both() {
        let c = cfg(json!({"autoCreate": "Enabled", "templates": [{"generateName": "t", "interfaceCIDRs": ["10.0.0.0/8"],
            "labels": {"zone": "template", "projectcalico.org/created-by": "someone", "extra": "1"},
            "annotations": {"note": "from-template"}}]}));
        let n = node("n", &[("zone", "node"), ("projectcalico.org/created-by", "node"), ("keep", "k")], &["10.0.0.1"], &[]);
        let want = desired(&n, &c);
        let t = &want["n-t-auto-hep"]["metadata"];
        assert_eq!(t["labels"], json!({"zone": "template", "extra": "1", "keep": "k", "projectcalico.org/created-by": "calico-kube-controllers"}));
        assert_eq!(t["annotations"], json!({"note": "from-template"}));
        let d = &want["n-auto-hep"]["metadata"];
        assert_eq!(d["labels"], json!({"zone": "node", "keep": "k", "projectcalico.org/created-by": "calico-kube-controllers"}), "the default HostEndpoint has no template labels");
        assert!(d.get("annotations").is_none(), "nor annotations: node annotations are never copied");
    }

    #[test]
    fn a_template_without_generate_name_or_sharing_a_name_ends_as_upstreams_later_write_leaves_it() {
        let c = cfg(json!({"autoCreate": "Enabled", "templates": [{"interfaceCIDRs": ["10.0.0.0/8"], "labels": {"from": "template"}}]}));
        let want = desired(&node("n", &[], &["10.0.0.1", "192.168.0.1"], &[]), &c);
        assert_eq!(names(&want), ["n-auto-hep"]);
        assert_eq!(want["n-auto-hep"]["metadata"]["labels"]["from"], "template");
        assert_eq!(want["n-auto-hep"]["spec"]["expectedIPs"], json!(["10.0.0.1"]));
        assert!(want["n-auto-hep"]["spec"].get("interfaceName").is_none());
    }

    #[test]
    fn names_longer_than_253_bytes_are_hashed_as_upstream_does() {
        // Expected values computed with upstream's algorithm in Go (sha256, base64.RawURLEncoding,
        // `[-_.]` removed, lowercased, `-auto-hep`).
        let long = "n".repeat(250);
        assert_eq!(host_endpoint_name(&long, "", "").unwrap(), "fsetawr4cyeogg79xle7sas6qytoq8j2wa55iiu0owe-auto-hep");
        assert_eq!(host_endpoint_name(&long, "tmpl", "").unwrap(), "7hefupbstohyvnw72651lpgbsnbkxhcwnmpj3paed8w-auto-hep");
        assert_eq!(host_endpoint_name(&long, "tmpl", "eth0").unwrap(), "qt3npm1wo26s37mi6yfnzgtndusi9jlsxaa3ed3h4-auto-hep",
                   "a removed `-` or `_` shortens the hash");
        let at_limit = "a".repeat(244);
        assert_eq!(host_endpoint_name(&at_limit, "", "").unwrap().len(), 253, "253 bytes is not too long");
        assert_eq!(host_endpoint_name(&"a".repeat(245), "", "").unwrap(), "1potisfi0yhllercvrn7uhsf5oclgfbk6tc67himady-auto-hep");
        assert_eq!(host_endpoint_name("n", "", "eth0"), None);
        assert_eq!(host_endpoint_name("n", "t", "eth0").unwrap(), "n-t-eth0-auto-hep");
    }

    #[test]
    fn base64_url_matches_rfc_4648_without_padding() {
        for (input, want) in [(&b""[..], ""), (b"f", "Zg"), (b"fo", "Zm8"), (b"foo", "Zm9v"), (b"foob", "Zm9vYg"), (b"fooba", "Zm9vYmE"),
                              (b"foobar", "Zm9vYmFy"), (&[0xfb, 0xff], "-_8")] {
            assert_eq!(base64_url(input), want);
        }
    }

    #[test]
    fn the_environment_variable_replaces_the_api_section_and_ignores_its_templates() {
        let api = json!({"autoCreate": "Disabled", "createDefaultHostEndpoint": "Disabled",
                         "templates": [{"generateName": "t", "interfaceCIDRs": ["bad"]}]});
        let (on, errors) = HostEndpointConfig::from_api(Some(&api), Some(true));
        assert!(on.auto_create && on.create_default && on.templates.is_empty() && errors.is_empty());
        let (off, errors) = HostEndpointConfig::from_api(Some(&api), Some(false));
        assert!(!off.auto_create && off.templates.is_empty() && errors.is_empty());
        assert!(desired(&node("n", &[], &["10.0.0.1"], &[]), &off).is_empty());

        let (unset, _) = HostEndpointConfig::from_api(None, None);
        assert!(!unset.auto_create && unset.create_default, "upstream's defaults: off, with the default HostEndpoint when turned on");
        let c = cfg(serde_json::from_str(DEFAULT_ON).unwrap());
        assert!(c.auto_create && c.create_default);
    }

    #[test]
    fn the_two_switches_read_as_the_run_config_reads_them() {
        for (section, vars) in [
            (json!({"autoCreate": "Enabled", "createDefaultHostEndpoint": "Disabled"}), vec![]),
            (json!({"autoCreate": " enabled "}), vec![]),
            (json!({"autoCreate": "Disabled"}), vec![("AUTO_HOST_ENDPOINTS", "ENABLED")]),
            (json!({"autoCreate": "Enabled"}), vec![("AUTO_HOST_ENDPOINTS", "disabled")]),
            (json!({}), vec![]),
        ] {
            let env = EnvConfig::from_env(&vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()).unwrap();
            let spec = serde_json::from_value(json!({"controllers": {"node": {"hostEndpoint": section}}})).unwrap();
            let run = RunConfig::merge(&env, Some(&spec)).node.unwrap();
            let (hep, _) = HostEndpointConfig::from_api(Some(&section), env.auto_host_endpoints);
            assert_eq!(hep.auto_create, run.auto_create_host_endpoints, "{section} {vars:?}");
            if hep.auto_create {
                assert_eq!(hep.create_default, run.create_default_host_endpoint, "{section} {vars:?}");
            }
        }
    }

    #[test]
    fn unusable_templates_are_reported_and_skipped_and_the_rest_kept_in_order() {
        let api = json!({"autoCreate": "Enabled", "templates": [
            {"generateName": "ok1", "interfaceCIDRs": ["10.0.0.0/8"], "interfacePattern": null},
            {"generateName": "sel", "nodeSelector": "a == ", "interfaceCIDRs": ["10.0.0.0/8"]},
            {"generateName": "cidr", "interfaceCIDRs": ["10.0.0.0/8", "10.0.0.1"]},
            {"generateName": "wide", "interfaceCIDRs": ["10.0.0.0/33"]},
            {"generateName": "re", "interfacePattern": "eth("},
            {"interfacePattern": "eth0"},
            {"generateName": "types", "labels": {"a": 1}},
            "not an object",
            {"generateName": "ok2", "interfacePattern": "eth0", "interfaceCIDRs": ["::ffff:10.0.0.0/104"]}
        ]});
        let (c, errors) = HostEndpointConfig::from_api(Some(&api), None);
        let kept: Vec<&str> = c.templates.iter().map(|t| t.generate_name.as_str()).collect();
        assert_eq!(kept, ["ok1", "ok2"]);
        let got: Vec<(usize, &str, &str)> = errors.iter().map(|e| (e.index, e.generate_name.as_str(), e.problem.category())).collect();
        assert_eq!(got, [(1, "sel", "selector"), (2, "cidr", "cidr"), (3, "wide", "cidr"), (4, "re", "pattern"), (5, "", "generate_name"),
                         (6, "types", "malformed"), (7, "", "malformed")]);
        assert_eq!(errors[1].problem, TemplateProblem::Cidr("10.0.0.1".into()));
        assert!(errors[0].to_string().starts_with("host endpoint template 1 (\"sel\") is skipped: nodeSelector: "), "{}", errors[0]);

        let (_, errors) = HostEndpointConfig::from_api(Some(&json!({"templates": {"a": 1}})), None);
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].problem.category(), "malformed");

        // An IPv4-mapped IPv6 network holds no IPv4 address, as in Go.
        let want = desired(&node("n", &[], &["10.0.0.1"], &[("eth0", &[])]), &c);
        assert_eq!(want["n-ok2-eth0-auto-hep"]["spec"].get("expectedIPs"), None);
    }

    fn hep(name: &str, labels: Value, annotations: Option<Value>, spec: Value) -> Value {
        let mut v = json!({"apiVersion": "projectcalico.org/v3", "kind": "HostEndpoint", "metadata": {"name": name, "labels": labels}, "spec": spec});
        if let Some(a) = annotations {
            v["metadata"]["annotations"] = a;
        }
        v
    }

    #[test]
    fn drift_is_labels_annotations_expected_ips_in_order_and_interface_name_only() {
        let managed = json!({"projectcalico.org/created-by": "calico-kube-controllers"});
        let want = hep("n-auto-hep", managed.clone(), None, json!({"node": "n", "interfaceName": "*", "expectedIPs": ["10.0.0.1", "10.0.0.2"], "profiles": ["projectcalico-default-allow"]}));
        let with = |f: &dyn Fn(&mut Value)| {
            let mut v = want.clone();
            f(&mut v);
            v
        };
        let cases: Vec<(&str, Value, bool)> = vec![
            ("identical", want.clone(), false),
            ("empty annotations are none", with(&|v| v["metadata"]["annotations"] = json!({})), false),
            ("null annotations are none", with(&|v| v["metadata"]["annotations"] = Value::Null), false),
            ("the stored object's own fields", with(&|v| { v["metadata"]["resourceVersion"] = json!("9"); v["metadata"]["uid"] = json!("x"); }), false),
            ("profiles are not compared", with(&|v| v["spec"]["profiles"] = json!(["other"])), false),
            ("ports are not compared", with(&|v| v["spec"]["ports"] = json!([{"name": "p", "protocol": "TCP", "port": 1}])), false),
            ("node is not compared", with(&|v| v["spec"]["node"] = json!("elsewhere")), false),
            ("a label added", with(&|v| v["metadata"]["labels"]["x"] = json!("1")), true),
            ("a label changed", with(&|v| v["metadata"]["labels"]["projectcalico.org/created-by"] = json!("me")), true),
            ("an annotation added", with(&|v| v["metadata"]["annotations"] = json!({"a": "b"})), true),
            ("expected IPs reordered", with(&|v| v["spec"]["expectedIPs"] = json!(["10.0.0.2", "10.0.0.1"])), true),
            ("an expected IP gone", with(&|v| v["spec"]["expectedIPs"] = json!(["10.0.0.1"])), true),
            ("interface name changed", with(&|v| v["spec"]["interfaceName"] = json!("eth0")), true),
            ("interface name gone", with(&|v| { v["spec"].as_object_mut().unwrap().remove("interfaceName"); }), true),
        ];
        for (what, current, drift) in cases {
            assert_eq!(needs_update(&current, &want), drift, "{what}");
        }
        let no_ips = hep("n-auto-hep", managed, None, json!({"node": "n"}));
        assert!(!needs_update(&with(&|v| v["spec"]["expectedIPs"] = json!([])), &with(&|v| { v["spec"].as_object_mut().unwrap().remove("expectedIPs"); })));
        assert!(needs_update(&no_ips, &want));
    }

    #[test]
    fn only_the_created_by_label_makes_a_host_endpoint_managed() {
        assert!(is_managed(&json!({"metadata": {"labels": {"projectcalico.org/created-by": "calico-kube-controllers"}}})));
        assert!(!is_managed(&json!({"metadata": {"labels": {"projectcalico.org/created-by": "someone-else"}}})));
        assert!(!is_managed(&json!({"metadata": {"labels": {}}})));
        assert!(!is_managed(&json!({"metadata": {}})));
        assert!(!is_managed(&json!("nonsense")));
    }

    #[test]
    fn the_plan_creates_updates_and_deletes_managed_host_endpoints_and_leaves_the_users_alone() {
        let c = cfg(json!({"autoCreate": "Enabled"}));
        let nodes = [node("a", &[("zone", "1")], &["10.0.0.1"], &[]), node("b", &[], &["10.0.0.2"], &[]), node("c", &[], &[], &[])];
        let want = desired_all(&nodes, &c);
        assert_eq!(names(&want), ["a-auto-hep", "b-auto-hep", "c-auto-hep"]);

        let mut stale_a = want["a-auto-hep"].clone();
        stale_a["metadata"]["labels"] = json!({"projectcalico.org/created-by": "calico-kube-controllers"});
        stale_a["metadata"]["annotations"] = json!({"old": "x"});
        stale_a["metadata"]["resourceVersion"] = json!("7");
        stale_a["metadata"]["creationTimestamp"] = json!("2024-01-01T00:00:00Z");
        stale_a["spec"]["ports"] = json!([{"name": "p", "protocol": "TCP", "port": 1}]);
        let users_c = hep("c-auto-hep", json!({"mine": "yes"}), None, json!({"node": "c"}));
        let orphan = hep("gone-auto-hep", json!({"projectcalico.org/created-by": "calico-kube-controllers"}), None, json!({"node": "gone"}));
        let users_other = hep("hand-made", json!({}), None, json!({"node": "a"}));
        let listed = [stored(stale_a), stored(users_c), stored(orphan), stored(users_other)];

        let p = plan(&want, &listed);
        let ops: Vec<(&str, &str)> = p.writes.iter().map(|w| (w.op(), w.name())).collect();
        assert_eq!(ops, [("update", "a-auto-hep"), ("create", "b-auto-hep"), ("delete", "gone-auto-hep")]);
        assert_eq!(p.blocked, ["c-auto-hep"], "a user's HostEndpoint holding a wanted name is reported, not taken over");
        let Write::Update { current, value } = &p.writes[0] else { panic!() };
        assert_eq!(current.revision, "7");
        assert_eq!(value["metadata"]["labels"], want["a-auto-hep"]["metadata"]["labels"]);
        assert!(value["metadata"].get("annotations").is_none(), "the wanted annotations replace the stored ones");
        assert_eq!(value["metadata"]["creationTimestamp"], "2024-01-01T00:00:00Z", "the rest of the stored object is kept");
        assert_eq!(value["spec"], want["a-auto-hep"]["spec"], "the whole spec is the wanted one, as upstream writes it");

        // Turned off: nothing is wanted, so every managed HostEndpoint goes and no other.
        let off = HostEndpointConfig { auto_create: false, ..c };
        let p = plan(&desired_all(&nodes, &off), &listed);
        let ops: Vec<(&str, &str)> = p.writes.iter().map(|w| (w.op(), w.name())).collect();
        assert_eq!(ops, [("delete", "a-auto-hep"), ("delete", "gone-auto-hep")]);
        assert!(p.blocked.is_empty());
    }

    #[test]
    fn a_name_two_nodes_want_goes_to_the_first_node_by_name() {
        let c = cfg(json!({"autoCreate": "Enabled", "templates": [{"generateName": "b", "interfaceCIDRs": ["0.0.0.0/0"]}]}));
        let nodes = [node("a-b", &[], &["10.0.0.2"], &[]), node("a", &[], &["10.0.0.1"], &[])];
        let want = desired_all(&nodes, &c);
        assert_eq!(want["a-b-auto-hep"]["spec"]["node"], "a");
        assert_eq!(want["a-b-b-auto-hep"]["spec"]["node"], "a-b");
    }

    // --- Properties -----------------------------------------------------------------------------

    fn arb_node() -> impl Strategy<Value = NodeData> {
        let name = prop_oneof![3 => "[a-c]{1,3}(-[a-c]{1,2})?", 1 => "[a-z]{240,260}"];
        let labels = proptest::collection::btree_map("(zone|role|projectcalico.org/created-by)", "[ab]", 0..3);
        let address = prop_oneof![
            (0u8..3, 0u8..3).prop_map(|(a, b)| format!("10.{a}.0.{b}")),
            (0u8..3).prop_map(|a| format!("192.168.0.{a}")),
            (0u16..3).prop_map(|a| format!("fd00::{a}")),
        ];
        let interfaces = proptest::collection::vec(("(eth|veth|lo)[0-2]?", proptest::collection::vec(address.clone(), 0..3)), 0..3);
        (name, labels, proptest::collection::vec(address, 0..5), interfaces).prop_map(|(name, labels, addrs, ifaces)| {
            let mut list = AddressList::default();
            let interfaces: Vec<NodeInterface> = ifaces
                .into_iter()
                .map(|(n, a)| {
                    let mut l = AddressList::default();
                    a.iter().for_each(|a| l.push(a));
                    NodeInterface { name: n, addresses: l.list }
                })
                .collect();
            addrs.iter().chain(interfaces.iter().flat_map(|i| &i.addresses)).for_each(|a| list.push(a));
            NodeData { name, labels, addresses: list.list, interfaces }
        })
    }

    fn arb_config() -> impl Strategy<Value = HostEndpointConfig> {
        let template = (
            "[a-z]{1,3}",
            prop_oneof![Just(""), Just("role == 'a'"), Just("!has(zone)")],
            proptest::sample::subsequence(vec!["10.0.0.0/16", "192.168.0.0/24", "fd00::/120", "10.1.0.0/16"], 0..3),
            prop_oneof![Just(""), Just("^eth"), Just("[0-9]$")],
            proptest::collection::btree_map("(zone|tier|projectcalico.org/created-by)", "[xy]", 0..2),
        )
            .prop_map(|(g, s, c, p, l)| json!({"generateName": g, "nodeSelector": s, "interfaceCIDRs": c, "interfacePattern": p, "labels": l}));
        (any::<bool>(), any::<bool>(), proptest::collection::vec(template, 0..3)).prop_map(|(auto, default, templates)| {
            let api = json!({"autoCreate": if auto { "Enabled" } else { "Disabled" },
                             "createDefaultHostEndpoint": if default { "Enabled" } else { "Disabled" }, "templates": templates});
            let (c, errors) = HostEndpointConfig::from_api(Some(&api), None);
            assert!(errors.is_empty(), "{errors:?}");
            c
        })
    }

    fn arb_listed() -> impl Strategy<Value = Vec<Value>> {
        let one = ("[a-c]{1,3}(-[a-c]{1,3})?-auto-hep|[a-z]{1,4}", any::<bool>(), "[a-c]{1,3}", proptest::collection::vec("10\\.0\\.0\\.[0-3]", 0..2))
            .prop_map(|(name, managed, node, ips)| {
                let labels = if managed { json!({"projectcalico.org/created-by": "calico-kube-controllers"}) } else { json!({"user": "x"}) };
                hep(&name, labels, None, json!({"node": node, "expectedIPs": ips}))
            });
        proptest::collection::vec(one, 0..8)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn every_wanted_host_endpoint_is_managed_valid_and_named_for_its_node(n in arb_node(), c in arb_config()) {
            let want = desired(&n, &c);
            if !c.auto_create {
                prop_assert!(want.is_empty());
            }
            for (name, hep) in &want {
                prop_assert!(is_managed(hep), "{}", name);
                prop_assert_eq!(hep["metadata"]["name"].as_str(), Some(name.as_str()));
                prop_assert_eq!(hep["spec"]["node"].as_str(), Some(n.name.as_str()));
                prop_assert!(name.len() <= MAX_NAME_LEN && name.ends_with("-auto-hep"), "{}", name);
                // Either `<node>-...-auto-hep`, or the hash of one of the node's too-long names.
                let mut candidates = vec![format!("{}-auto-hep", n.name)];
                for t in &c.templates {
                    candidates.push(format!("{}-{}-auto-hep", n.name, t.generate_name));
                    candidates.extend(n.interfaces.iter().map(|i| format!("{}-{}-{}-auto-hep", n.name, t.generate_name, i.name)));
                }
                let plain = name.starts_with(&format!("{}-", n.name));
                let hashed = candidates.into_iter().any(|full| full.len() > MAX_NAME_LEN && hash_if_too_long(full) == *name);
                prop_assert!(plain || hashed, "{} for node {}", name, n.name);
                prop_assert_eq!(&hep["spec"]["profiles"], &json!([DEFAULT_ALLOW_PROFILE]));
                let ips = hep["spec"]["expectedIPs"].as_array().cloned().unwrap_or_default();
                prop_assert!(ips.iter().all(|ip| ip.as_str().is_some_and(|s| s.parse::<IpAddr>().is_ok())));
                prop_assert!(!ips.is_empty() || hep["spec"].get("interfaceName").is_some(), "a HostEndpoint without an interface needs addresses");
            }
        }

        #[test]
        fn the_plan_never_touches_an_unmanaged_host_endpoint_and_converges(
            nodes in proptest::collection::vec(arb_node(), 0..4), c in arb_config(), listed in arb_listed()
        ) {
            let want = desired_all(&nodes, &c);
            let mut by_name: BTreeMap<String, Stored> = BTreeMap::new();
            for v in listed {
                let s = stored(v);
                by_name.entry(s.name.clone()).or_insert(s);
            }
            let listed: Vec<Stored> = by_name.values().cloned().collect();
            let p = plan(&want, &listed);
            let mut after = by_name.clone();
            for w in &p.writes {
                match w {
                    Write::Create { name } => {
                        prop_assert!(!by_name.contains_key(name));
                        after.insert(name.clone(), stored(want[name].clone()));
                    }
                    Write::Update { current, value } => {
                        prop_assert!(is_managed(&current.value), "updated a user's {}", current.name);
                        after.insert(current.name.clone(), stored(value.clone()));
                    }
                    Write::Delete { current } => {
                        prop_assert!(is_managed(&current.value), "deleted a user's {}", current.name);
                        prop_assert!(!want.contains_key(&current.name));
                        after.remove(&current.name);
                    }
                }
            }
            for s in &listed {
                if !is_managed(&s.value) {
                    prop_assert_eq!(after.get(&s.name).map(|a| &a.value), Some(&s.value), "{} changed", s.name);
                }
            }
            for (name, hep) in &want {
                prop_assert!(after.contains_key(name));
                prop_assert!(p.blocked.contains(name) || !needs_update(&after[name].value, hep), "{} still drifts", name);
            }
            let again = plan(&want, &after.values().cloned().collect::<Vec<_>>());
            prop_assert!(again.writes.is_empty(), "a second round wrote {:?}", again.writes.iter().map(|w| (w.op(), w.name().to_string())).collect::<Vec<_>>());
            prop_assert_eq!(again.blocked, p.blocked);
        }
    }
}
