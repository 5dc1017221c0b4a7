//! DNS SRV discovery of etcd members (`ETCD_DISCOVERY_SRV`), as etcd's Go client does it for
//! libcalico: the members are the targets of `_etcd-client-ssl._tcp.<domain>` (https) and
//! `_etcd-client._tcp.<domain>` (http); one of the two lookups may fail, not both.
//!
//! Owns: the query a lookup sends and the reading of the answer (pure: [`query`], [`parse`]),
//! and the exchange with the resolver (UDP, then TCP when the answer was truncated; the servers
//! of `/etc/resolv.conf` in order, or `CKC_DNS_SERVER`).
//! Must not: follow CNAMEs or resolve the targets (the HTTP client resolves host names when it
//! connects), cache answers (the datastore asks again when no member answers), or panic on any
//! answer, however malformed.

use std::net::SocketAddr;
#[cfg(feature = "cli")]
use std::time::Duration;

/// One SRV record: a member's host name and port.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct SrvRecord {
    pub priority: u16,
    pub weight: u16,
    pub port: u16,
    /// The host name, without the root's trailing dot.
    pub target: String,
}

/// What an answer says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    Records(Vec<SrvRecord>),
    /// The name does not exist, or has no SRV records.
    NoRecords,
    /// Cut short for UDP: ask again over TCP.
    Truncated,
}

const TYPE_SRV: u16 = 33;
const CLASS_IN: u16 = 1;
const RCODE_NXDOMAIN: u8 = 3;

/// The query message for the SRV records of `name` (recursion desired).
pub fn query(id: u16, name: &str) -> Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(name.len() + 18);
    out.extend_from_slice(&id.to_be_bytes());
    out.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.trim_end_matches('.').split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err(format!("{name:?} is not a DNS name (empty label, or one longer than 63 bytes)"));
        }
        out.push(label.len() as u8);
        out.extend_from_slice(label.as_bytes());
    }
    out.push(0);
    if out.len() - 12 > 255 {
        return Err(format!("{name:?} is longer than a DNS name may be"));
    }
    out.extend_from_slice(&TYPE_SRV.to_be_bytes());
    out.extend_from_slice(&CLASS_IN.to_be_bytes());
    Ok(out)
}

struct Reader<'a> {
    msg: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self.at.checked_add(n).filter(|e| *e <= self.msg.len()).ok_or("the answer ends early")?;
        let s = &self.msg[self.at..end];
        self.at = end;
        Ok(s)
    }

    fn u16(&mut self) -> Result<u16, String> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    /// A possibly compressed name starting at the cursor; the cursor moves past its first form.
    fn name(&mut self) -> Result<String, String> {
        let mut labels: Vec<String> = Vec::new();
        let mut pos = self.at;
        let mut jumped = false;
        // Each pointer must go backwards, so a loop cannot run forever; the count bounds it too.
        for _ in 0..128 {
            let len = *self.msg.get(pos).ok_or("a name runs past the answer")?;
            match len & 0xc0 {
                0x00 if len == 0 => {
                    if !jumped {
                        self.at = pos + 1;
                    }
                    return Ok(labels.join("."));
                }
                0x00 => {
                    let label = self.msg.get(pos + 1..pos + 1 + len as usize).ok_or("a label runs past the answer")?;
                    labels.push(String::from_utf8_lossy(label).into_owned());
                    pos += 1 + len as usize;
                }
                0xc0 => {
                    let low = *self.msg.get(pos + 1).ok_or("a name pointer runs past the answer")?;
                    let target = (usize::from(len & 0x3f) << 8) | usize::from(low);
                    if target >= pos {
                        return Err("a name pointer points forwards".into());
                    }
                    if !jumped {
                        self.at = pos + 2;
                        jumped = true;
                    }
                    pos = target;
                }
                _ => return Err("a label of an unknown kind".into()),
            }
        }
        Err("a name with too many labels or pointers".into())
    }
}

/// Reads the answer to [`query`]`(id, name)`: the SRV records for `name`, sorted by priority,
/// then weight (heaviest first), then target and port.
pub fn parse(id: u16, name: &str, msg: &[u8]) -> Result<Answer, String> {
    let mut r = Reader { msg, at: 0 };
    let got = r.u16()?;
    if got != id {
        return Err(format!("an answer to another query (id {got}, not {id})"));
    }
    let flags = r.u16()?;
    if flags & 0x8000 == 0 {
        return Err("a query, not an answer".into());
    }
    if flags & 0x0200 != 0 {
        return Ok(Answer::Truncated);
    }
    let rcode = (flags & 0x000f) as u8;
    if rcode == RCODE_NXDOMAIN {
        return Ok(Answer::NoRecords);
    }
    if rcode != 0 {
        let what = match rcode {
            1 => "format error",
            2 => "server failure",
            4 => "not implemented",
            5 => "refused",
            _ => "error",
        };
        return Err(format!("the DNS server answered {what} (rcode {rcode})"));
    }
    let (questions, answers) = (r.u16()?, r.u16()?);
    r.take(4)?;
    for _ in 0..questions {
        r.name()?;
        r.take(4)?;
    }
    let wanted = name.trim_end_matches('.');
    let mut records = Vec::new();
    for _ in 0..answers {
        let owner = r.name()?;
        let (rtype, class) = (r.u16()?, r.u16()?);
        r.take(4)?;
        let len = usize::from(r.u16()?);
        let end = r.at + len;
        if end > msg.len() {
            return Err("a record runs past the answer".into());
        }
        if rtype == TYPE_SRV && class == CLASS_IN && owner.eq_ignore_ascii_case(wanted) {
            let (priority, weight, port) = (r.u16()?, r.u16()?, r.u16()?);
            let target = r.name()?;
            if r.at > end {
                return Err("an SRV record longer than its length says".into());
            }
            // "." means the service is not offered at this name.
            if !target.is_empty() {
                records.push(SrvRecord { priority, weight, port, target });
            }
        }
        r.at = end;
    }
    if records.is_empty() {
        return Ok(Answer::NoRecords);
    }
    records.sort_by(|a, b| (a.priority, std::cmp::Reverse(a.weight), &a.target, a.port).cmp(&(b.priority, std::cmp::Reverse(b.weight), &b.target, b.port)));
    records.dedup();
    Ok(Answer::Records(records))
}

/// The answer a DNS server gives to `query` with `records` `(priority, weight, port, target)`
/// (the records name the question by a pointer), with `flags` (0x8180: a plain answer; 0x8183:
/// no such name). For tests and test DNS servers; [`parse`] reads it back.
pub fn answer(query: &[u8], flags: u16, records: &[(u16, u16, u16, &str)]) -> Vec<u8> {
    if query.len() < 12 {
        return Vec::new();
    }
    let mut out = query.to_vec();
    out[2..4].copy_from_slice(&flags.to_be_bytes());
    out[6..8].copy_from_slice(&(records.len() as u16).to_be_bytes());
    for (priority, weight, port, target) in records {
        out.extend_from_slice(&[0xc0, 12]); // the question's name
        out.extend_from_slice(&TYPE_SRV.to_be_bytes());
        out.extend_from_slice(&CLASS_IN.to_be_bytes());
        out.extend_from_slice(&60u32.to_be_bytes());
        let mut rdata = Vec::new();
        for v in [priority, weight, port] {
            rdata.extend_from_slice(&v.to_be_bytes());
        }
        for label in target.trim_end_matches('.').split('.').filter(|l| !l.is_empty()) {
            rdata.push(label.len() as u8);
            rdata.extend_from_slice(label.as_bytes());
        }
        rdata.push(0);
        out.extend_from_slice(&(rdata.len() as u16).to_be_bytes());
        out.extend_from_slice(&rdata);
    }
    out
}

/// The `nameserver` lines of a resolv.conf, port 53.
pub fn nameservers(resolv_conf: &str) -> Vec<SocketAddr> {
    resolv_conf
        .lines()
        .filter_map(|l| l.split('#').next()?.trim().strip_prefix("nameserver"))
        .filter_map(|rest| rest.trim().split('%').next()?.parse::<std::net::IpAddr>().ok())
        .map(|ip| SocketAddr::new(ip, 53))
        .collect()
}

#[cfg(feature = "cli")]
/// The members `domain` names: `https://target:port` for `_etcd-client-ssl._tcp`, then
/// `http://target:port` for `_etcd-client._tcp`. An error when both lookups fail, or neither
/// has a record.
pub async fn discover(domain: &str, servers: &[SocketAddr]) -> Result<Vec<String>, String> {
    let mut members = Vec::new();
    let mut problems = Vec::new();
    for (service, scheme) in [("_etcd-client-ssl._tcp", "https"), ("_etcd-client._tcp", "http")] {
        let name = format!("{service}.{}", domain.trim_end_matches('.'));
        match lookup(&name, servers).await {
            Ok(records) if records.is_empty() => problems.push(format!("{name}: no SRV records")),
            Ok(records) => members.extend(records.into_iter().map(|r| format!("{scheme}://{}:{}", r.target, r.port))),
            Err(e) => problems.push(format!("{name}: {e}")),
        }
    }
    if members.is_empty() {
        return Err(problems.join("; "));
    }
    Ok(members)
}

#[cfg(feature = "cli")]
const TIMEOUT: Duration = Duration::from_secs(2);

#[cfg(feature = "cli")]
/// The SRV records of `name`, asking each server in turn until one answers.
pub async fn lookup(name: &str, servers: &[SocketAddr]) -> Result<Vec<SrvRecord>, String> {
    if servers.is_empty() {
        return Err("no DNS server to ask (no nameserver in /etc/resolv.conf; CKC_DNS_SERVER sets one)".into());
    }
    let mut failures = Vec::new();
    for server in servers {
        let id = query_id(name);
        let msg = query(id, name)?;
        match ask(*server, id, name, &msg).await {
            Ok(records) => return Ok(records),
            Err(e) => failures.push(format!("{server}: {e}")),
        }
    }
    Err(failures.join("; "))
}

#[cfg(feature = "cli")]
/// An id that differs between queries (a stale answer is told apart), without a random source.
fn query_id(name: &str) -> u16 {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    let h = name.bytes().fold(nanos, |h, b| h.rotate_left(5) ^ u32::from(b));
    (h ^ (h >> 16)) as u16
}

#[cfg(feature = "cli")]
async fn ask(server: SocketAddr, id: u16, name: &str, msg: &[u8]) -> Result<Vec<SrvRecord>, String> {
    let bind: SocketAddr = if server.is_ipv4() { "0.0.0.0:0".parse().unwrap_or(server) } else { "[::]:0".parse().unwrap_or(server) };
    let socket = tokio::net::UdpSocket::bind(bind).await.map_err(|e| format!("UDP socket: {e}"))?;
    socket.connect(server).await.map_err(|e| format!("UDP: {e}"))?;
    socket.send(msg).await.map_err(|e| format!("UDP send: {e}"))?;
    let mut buf = vec![0u8; 4096];
    let answer = loop {
        let n = match tokio::time::timeout(TIMEOUT, socket.recv(&mut buf)).await {
            Err(_) => return Err(format!("no answer in {TIMEOUT:?}")),
            Ok(Err(e)) => return Err(format!("UDP receive: {e}")),
            Ok(Ok(n)) => n,
        };
        match parse(id, name, &buf[..n]) {
            // A late answer to an earlier query: wait for ours.
            Err(e) if e.starts_with("an answer to another query") => continue,
            other => break other?,
        }
    };
    match answer {
        Answer::Records(r) => Ok(r),
        Answer::NoRecords => Ok(Vec::new()),
        Answer::Truncated => ask_tcp(server, id, name, msg).await,
    }
}

#[cfg(feature = "cli")]
async fn ask_tcp(server: SocketAddr, id: u16, name: &str, msg: &[u8]) -> Result<Vec<SrvRecord>, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(server).await.map_err(|e| format!("TCP: {e}"))?;
        let mut framed = (msg.len() as u16).to_be_bytes().to_vec();
        framed.extend_from_slice(msg);
        stream.write_all(&framed).await.map_err(|e| format!("TCP send: {e}"))?;
        let mut len = [0u8; 2];
        stream.read_exact(&mut len).await.map_err(|e| format!("TCP receive: {e}"))?;
        let mut answer = vec![0u8; usize::from(u16::from_be_bytes(len))];
        stream.read_exact(&mut answer).await.map_err(|e| format!("TCP receive: {e}"))?;
        Ok::<_, String>(answer)
    };
    let answer = tokio::time::timeout(TIMEOUT, exchange).await.map_err(|_| format!("no TCP answer in {TIMEOUT:?}"))??;
    match parse(id, name, &answer)? {
        Answer::Records(r) => Ok(r),
        Answer::NoRecords => Ok(Vec::new()),
        Answer::Truncated => Err("the answer is truncated over TCP too".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_query_asks_for_srv_records_of_the_name() {
        let q = query(0x1234, "_etcd-client._tcp.example.com.").unwrap();
        assert_eq!(&q[..4], &[0x12, 0x34, 0x01, 0x00]);
        assert_eq!(&q[12..43], b"\x0c_etcd-client\x04_tcp\x07example\x03com\x00");
        assert_eq!(&q[43..], &[0, 33, 0, 1]);
        assert!(query(1, "a..b").is_err());
        assert!(query(1, &format!("{}.com", "x".repeat(64))).is_err());
        assert!(query(1, &["abcdefgh"; 40].join(".")).is_err(), "longer than 255 bytes");
    }

    #[test]
    fn answers_give_sorted_targets_without_the_trailing_dot() {
        let name = "_etcd-client-ssl._tcp.example.com";
        let q = query(7, name).unwrap();
        let a = answer(&q, 0x8180, &[(10, 5, 2379, "etcd-b.example.com."), (0, 1, 2379, "etcd-c.example.com"), (10, 50, 2380, "etcd-a.example.com")]);
        let Answer::Records(r) = parse(7, name, &a).unwrap() else { panic!("records") };
        let got: Vec<(&str, u16)> = r.iter().map(|r| (r.target.as_str(), r.port)).collect();
        assert_eq!(got, [("etcd-c.example.com", 2379), ("etcd-a.example.com", 2380), ("etcd-b.example.com", 2379)], "priority, then the heaviest");
        assert_eq!(parse(8, name, &a).unwrap_err(), "an answer to another query (id 7, not 8)");
        assert_eq!(parse(7, name, &answer(&q, 0x8183, &[])).unwrap(), Answer::NoRecords, "NXDOMAIN");
        assert_eq!(parse(7, name, &answer(&q, 0x8180, &[])).unwrap(), Answer::NoRecords);
        assert_eq!(parse(7, name, &answer(&q, 0x8180, &[(0, 0, 0, ".")])).unwrap(), Answer::NoRecords, "the service is not offered");
        assert_eq!(parse(7, name, &answer(&q, 0x8380, &[])).unwrap(), Answer::Truncated);
        assert!(parse(7, name, &answer(&q, 0x8182, &[])).unwrap_err().contains("server failure"));
        assert!(parse(7, name, &q).unwrap_err().contains("a query"));
        // Records for another name are not ours.
        assert_eq!(parse(7, "_etcd-client._tcp.example.com", &a).unwrap(), Answer::NoRecords);
    }

    #[test]
    fn malformed_answers_are_errors_never_panics() {
        let name = "_etcd-client._tcp.example.com";
        let q = query(9, name).unwrap();
        let a = answer(&q, 0x8180, &[(0, 0, 2379, "etcd.example.com")]);
        for cut in 0..a.len() {
            let _ = parse(9, name, &a[..cut]);
        }
        let mut forward = a.clone();
        let at = q.len();
        forward[at] = 0xc0;
        forward[at + 1] = 0xff;
        assert!(parse(9, name, &forward).is_err(), "a pointer forwards");
        let mut self_loop = a.clone();
        self_loop[at + 1] = at as u8;
        assert!(parse(9, name, &self_loop).is_err(), "a pointer to itself");
        let mut odd = a;
        odd[at] = 0x80;
        assert!(parse(9, name, &odd).is_err());
        // Every byte flipped in turn: an answer or an error.
        let good = answer(&q, 0x8180, &[(0, 0, 2379, "etcd.example.com")]);
        for i in 0..good.len() {
            for v in [0u8, 0x3f, 0xc0, 0xff] {
                let mut m = good.clone();
                m[i] = v;
                let _ = parse(9, name, &m);
            }
        }
    }

    #[test]
    fn nameservers_come_from_resolv_conf() {
        let conf = "# generated\nsearch example.com\nnameserver 10.0.0.10\nnameserver fe80::1%eth0 # link-local\n  nameserver   192.0.2.53\nnameserver not-an-ip\noptions ndots:5\n";
        assert_eq!(nameservers(conf), ["10.0.0.10:53".parse::<SocketAddr>().unwrap(), "[fe80::1]:53".parse().unwrap(), "192.0.2.53:53".parse().unwrap()]);
    }

    #[cfg(feature = "cli")]
    #[tokio::test]
    async fn discovery_asks_both_services_and_one_may_fail() {
        // A DNS server on loopback: https members only.
        let server = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = server.local_addr().unwrap();
        let serve = tokio::spawn(async move {
            let mut buf = [0u8; 512];
            for _ in 0..2 {
                let (n, from) = server.recv_from(&mut buf).await.unwrap();
                let q = &buf[..n];
                let ssl = q.windows(16).any(|w| w == b"_etcd-client-ssl");
                let reply = if ssl { answer(q, 0x8180, &[(0, 0, 2379, "etcd-0.example.test."), (0, 0, 2379, "etcd-1.example.test.")]) } else { answer(q, 0x8183, &[]) };
                server.send_to(&reply, from).await.unwrap();
            }
        });
        let members = discover("example.test", &[addr]).await.unwrap();
        assert_eq!(members, ["https://etcd-0.example.test:2379", "https://etcd-1.example.test:2379"]);
        serve.await.unwrap();
        // Nobody answers: both lookups fail, and the error says where it asked.
        let silent = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let err = discover("example.test", &[silent.local_addr().unwrap()]).await.unwrap_err();
        assert!(err.contains("_etcd-client-ssl._tcp.example.test") && err.contains("_etcd-client._tcp.example.test") && err.contains("no answer"), "{err}");
        assert!(lookup("x.test", &[]).await.unwrap_err().contains("resolv.conf"));
    }
}
