//! Object-name encodings Calico uses for IPAM objects, and IP <-> ordinal arithmetic.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;
use sha2::{Digest, Sha256};

/// Kubernetes object names are DNS subdomains: at most 253 characters.
const MAX_NAME: usize = 253;

/// `10.0.0.0/26` -> `10-0-0-0-26`, `fd00:1::/122` -> `fd00-1---122` (KDD IPAMBlock names and the
/// affinity-name suffix). etcd keys use a different form, see [`cidr_to_etcd_key_part`].
pub fn cidr_to_name(cidr: &IpNet) -> String {
    cidr.to_string().replace(['.', ':', '/'], "-")
}

/// etcd keys keep the dots and colons and replace only the slash: `10.0.0.0-26`.
pub fn cidr_to_etcd_key_part(cidr: &IpNet) -> String {
    cidr.to_string().replace('/', "-")
}

/// The KDD BlockAffinity name for `host` and `cidr`: `<host>-<cidrname>`, or, when that would
/// reach the 253-character limit, the host truncated and an 11-hex-digit SHA-256 suffix of
/// `<host>+<cidrname>` appended so that distinct hosts stay distinct.
pub fn affinity_name(host: &str, cidr: &IpNet) -> String {
    let cidr_name = cidr_to_name(cidr);
    let plain = format!("{host}-{cidr_name}");
    if plain.len() < MAX_NAME {
        return plain;
    }
    let digest = Sha256::digest(format!("{host}+{cidr_name}").as_bytes());
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    // 1 dash + cidr name + 1 dash + 11 hex digits, within 252 characters.
    let keep = (MAX_NAME - 1).saturating_sub(cidr_name.len() + 13);
    let prefix: String = host.chars().take(keep).collect();
    format!("{prefix}-{cidr_name}-{}", &hex[..11])
}

/// `<host>-<cidrname>` unhashed, however long: the name an affinity has where names are not
/// Kubernetes object names (etcd keys hold host and CIDR as they are).
pub fn plain_affinity_name(host: &str, cidr: &IpNet) -> String {
    format!("{host}-{}", cidr_to_name(cidr))
}

/// Whether `name` names `host`'s affinity for `cidr`: KDD's name ([`affinity_name`]) or, where
/// names are not Kubernetes object names, the plain one (which KDD can never hold when it
/// differs: it is then 253 characters or more).
pub fn is_affinity_name(name: &str, host: &str, cidr: &IpNet) -> bool {
    name == affinity_name(host, cidr) || name == plain_affinity_name(host, cidr)
}

/// Whether `name` names the handle with ID `id`: KDD's lowercased name or, where names are not
/// Kubernetes object names (etcd keys), the ID as it is (KDD can never hold that name when it
/// differs: Kubernetes names have no upper-case letters).
pub fn is_handle_name(name: &str, id: &str) -> bool {
    is_handle_object_name(name, id) || name == sanitize_handle(id)
}

/// KDD IPAMHandle objects are named by the lowercased handle ID.
pub fn handle_object_name(handle_id: &str) -> String {
    sanitize_handle(handle_id).to_lowercase()
}

/// Whether `name` is [`handle_object_name`] of `handle_id`, without building that name (a bulk
/// load checks every handle).
pub fn is_handle_object_name(name: &str, handle_id: &str) -> bool {
    // The common case, checked without branching per byte: the name is the ID itself and the ID
    // is already a lowercase DNS name (so sanitizing and lowercasing leave it as it is).
    if name == handle_id
        && name.bytes().fold(true, |ok, b| ok & matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.'))
    {
        return true;
    }
    let id = sanitize_handle(handle_id);
    if id.is_ascii() {
        name.len() == id.len() && name.bytes().zip(id.bytes()).all(|(n, i)| n == i.to_ascii_lowercase())
    } else {
        name == id.to_lowercase()
    }
}

/// The IPAM library drops anything from a carriage return on (old CNI versions wrote `\r\n`).
pub fn sanitize_handle(handle_id: &str) -> &str {
    match handle_id.bytes().position(|b| b == b'\r') {
        Some(cut) => &handle_id[..cut],
        None => handle_id,
    }
}

/// Number of addresses in a block, if the block is small enough to be a Calico block (at most 4096:
/// Calico's smallest allowed block size is /20 for IPv4 and /116 for IPv6).
pub fn block_size(cidr: &IpNet) -> Option<u32> {
    let host_bits = u32::from(cidr.max_prefix_len() - cidr.prefix_len());
    (host_bits <= 12).then(|| 1u32 << host_bits)
}

fn addr_to_u128(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v4) => u128::from(u32::from(v4)),
        IpAddr::V6(v6) => u128::from(v6),
    }
}

/// The address at `ordinal` in the block.
pub fn ordinal_to_ip(cidr: &IpNet, ordinal: u32) -> IpAddr {
    let base = addr_to_u128(cidr.network()) + u128::from(ordinal);
    match cidr {
        IpNet::V4(_) => IpAddr::V4(Ipv4Addr::from(base as u32)),
        IpNet::V6(_) => IpAddr::V6(Ipv6Addr::from(base)),
    }
}

/// The ordinal of `ip` in the block, or None if the block does not contain it.
pub fn ip_to_ordinal(cidr: &IpNet, ip: IpAddr) -> Option<u32> {
    if !cidr.contains(&ip) {
        return None;
    }
    u32::try_from(addr_to_u128(ip) - addr_to_u128(cidr.network())).ok()
}

/// A sortable key for an address: IPv4 before IPv6, numeric within a family.
pub fn ip_sort_key(ip: &IpAddr) -> (u8, u128) {
    match ip {
        IpAddr::V4(_) => (4, addr_to_u128(*ip)),
        IpAddr::V6(_) => (6, addr_to_u128(*ip)),
    }
}

/// Calico's WorkloadEndpoint name for a Kubernetes pod: `<node>-k8s-<pod>-<endpoint>` with
/// every dash inside a segment doubled (used for `owners` in check reports).
/// The `projectcalico.org/hostname-hash` label libcalico puts on KDD BlockAffinities (and
/// selects them by): SHA3-256 of the host name, RFC 4648 base32 without padding (52 characters,
/// a valid label value for any host name).
pub fn hostname_hash(host: &str) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let digest = sha3::Sha3_256::digest(host.as_bytes());
    let mut out = String::with_capacity(52);
    let (mut acc, mut bits) = (0u32, 0u32);
    for byte in digest {
        acc = (acc << 8) | u32::from(byte);
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(ALPHABET[((acc >> bits) & 31) as usize] as char);
        }
    }
    if bits > 0 {
        out.push(ALPHABET[((acc << (5 - bits)) & 31) as usize] as char);
    }
    out
}

pub fn workload_endpoint_name(node: &str, pod: &str, endpoint: &str) -> String {
    let esc = |s: &str| s.replace('-', "--");
    format!("{}-k8s-{}-{}", esc(node), esc(pod), esc(endpoint))
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        /// The allocation-free check agrees with building the name, for ASCII, non-ASCII and
        /// carriage-return-suffixed IDs.
        #[test]
        fn is_handle_object_name_agrees_with_handle_object_name(
            id in "[a-zA-Z0-9.\\-\r\n\u{e9}\u{130}]{0,12}",
            other in "[a-z0-9.\\-\u{e9}]{0,12}",
        ) {
            let expected = handle_object_name(&id);
            proptest::prop_assert!(is_handle_object_name(&expected, &id));
            proptest::prop_assert_eq!(is_handle_object_name(&other, &id), other == expected);
            let upper = expected.to_uppercase();
            proptest::prop_assert_eq!(is_handle_object_name(&upper, &id), upper == expected);
        }
    }

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn hostname_hash_is_unpadded_base32_of_sha3_256() {
        // Reference values: Python's hashlib.sha3_256 and base64.b32encode, padding stripped.
        assert_eq!(hostname_hash("load-balancer"), "TAU2RK2F2FG7MIS72DPZYC6FJ3U3BIWIDZAMUTQY7ZXMSKQZ5GSQ");
        assert_eq!(hostname_hash(""), "U774N6F7D3LWMUOBI5LKAYOWML2YB72N4Q5UT6UC3AFEXAHYINFA");
        assert_eq!(hostname_hash("node-1").len(), 52);
    }

    #[test]
    fn cidr_names_replace_dots_colons_and_slash() {
        assert_eq!(cidr_to_name(&net("10.0.0.0/26")), "10-0-0-0-26");
        assert_eq!(cidr_to_name(&net("fd00:1::/122")), "fd00-1---122");
        assert_eq!(cidr_to_etcd_key_part(&net("10.0.0.0/26")), "10.0.0.0-26");
    }

    #[test]
    fn short_affinity_names_are_host_dash_cidr() {
        assert_eq!(affinity_name("node1", &net("10.0.0.0/26")), "node1-10-0-0-0-26");
    }

    #[test]
    fn long_affinity_names_are_hashed_within_the_limit_and_stay_distinct() {
        let a = "a".repeat(250);
        let b = format!("{}b", "a".repeat(249));
        let na = affinity_name(&a, &net("10.0.0.0/26"));
        let nb = affinity_name(&b, &net("10.0.0.0/26"));
        assert!(na.len() < MAX_NAME, "{}", na.len());
        assert!(na.contains("-10-0-0-0-26-"));
        assert_ne!(na, nb);
    }

    #[test]
    fn handle_names_are_lowercased_and_cut_at_carriage_return() {
        assert_eq!(handle_object_name("k8s-pod-network.ABC\r\n"), "k8s-pod-network.abc");
    }

    #[test]
    fn workload_endpoint_names_double_dashes_per_segment() {
        assert_eq!(workload_endpoint_name("node-1", "nginx-abc", "eth0"), "node--1-k8s-nginx--abc-eth0");
    }

    #[test]
    fn ordinals_map_to_addresses_and_back() {
        let v4 = net("10.0.0.64/26");
        assert_eq!(ordinal_to_ip(&v4, 5).to_string(), "10.0.0.69");
        assert_eq!(ip_to_ordinal(&v4, "10.0.0.69".parse().unwrap()), Some(5));
        assert_eq!(ip_to_ordinal(&v4, "10.0.0.1".parse().unwrap()), None);
        let v6 = net("fd00:1::40/122");
        assert_eq!(ordinal_to_ip(&v6, 63).to_string(), "fd00:1::7f");
        assert_eq!(ip_to_ordinal(&v6, "fd00:1::7f".parse().unwrap()), Some(63));
        assert_eq!(block_size(&v4), Some(64));
        assert_eq!(block_size(&net("10.0.0.0/16")), None);
    }
}
