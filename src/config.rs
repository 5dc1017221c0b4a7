//! Upstream's configuration surface, pure: the environment variables kube-controllers reads
//! (SPEC §2.1), the `default` KubeControllersConfiguration we create (§2.2), and the merge of the
//! two into the [`RunConfig`] the process runs with, plus the `status` we report back.
//!
//! Owns: env parsing and validation (every error names its variable), the merge rules (env
//! beats API; a controller runs iff the env list names it, else iff its API section exists),
//! log-level names, and which upstream controllers this version implements.
//! Must not: read the process environment, the clock, files or the network; callers pass a map.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use crate::model::config::{ControllersConfig, KubeControllersConfigurationSpec, NodeControllerConfig};
use crate::model::time::{Millis, format_go_duration, parse_go_duration};

/// Upstream's period for every periodic reconciler when the API section exists but gives none.
pub const DEFAULT_RECONCILER_PERIOD: Millis = 5 * 60 * 1000;
/// Upstream's etcd compaction interval; reported in status even though KDD never compacts.
pub const DEFAULT_COMPACTION_PERIOD: Millis = 10 * 60 * 1000;
/// libcalico fills this port in on create; we apply it whenever the field is unset, so a
/// KubeControllersConfiguration written with kubectl does not silently turn metrics off (§10.6).
pub const DEFAULT_METRICS_PORT: u16 = 9094;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("{var}={value:?}: {problem}")]
    Invalid { var: &'static str, value: String, problem: String },
}

impl ConfigError {
    fn invalid(var: &'static str, value: &str, problem: impl Into<String>) -> Self {
        ConfigError::Invalid { var, value: value.to_string(), problem: problem.into() }
    }
}

/// One setting as it was given: the variable actually used (with or without the `CALICO_`
/// prefix), so that every later error about it names what the operator wrote.
#[derive(Clone, PartialEq, Eq)]
pub struct Setting {
    pub var: &'static str,
    pub value: String,
}

impl std::fmt::Debug for Setting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.var.ends_with("PASSWORD") {
            write!(f, "{}=<redacted>", self.var)
        } else {
            write!(f, "{}={:?}", self.var, self.value)
        }
    }
}

/// One etcd member from `ETCD_ENDPOINTS`: `http(s)://host[:port]`, port 2379 when not given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdEndpoint {
    pub tls: bool,
    /// A DNS name, an IPv4 address, or an IPv6 address without its brackets.
    pub host: String,
    pub port: u16,
}

impl EtcdEndpoint {
    /// The base URL requests go to: `https://host:port`.
    pub fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        if self.host.contains(':') { format!("{scheme}://[{}]:{}", self.host, self.port) } else { format!("{scheme}://{}:{}", self.host, self.port) }
    }

    fn parse(text: &str) -> Result<Self, String> {
        let t = text.trim();
        let (tls, rest) = if let Some(r) = t.strip_prefix("https://") {
            (true, r)
        } else if let Some(r) = t.strip_prefix("http://") {
            (false, r)
        } else {
            return Err(format!("{t:?} must start with http:// or https://"));
        };
        let authority = rest.strip_suffix('/').unwrap_or(rest);
        if authority.is_empty() || authority.contains(['/', '?', '#', '@', ' ']) {
            return Err(format!("{t:?} must be scheme://host[:port] with no path, user or query"));
        }
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (h, after) = v6.split_once(']').ok_or_else(|| format!("{t:?} has an unclosed [ in its IPv6 address"))?;
            let port = match after.strip_prefix(':') {
                Some(p) => Some(p),
                None if after.is_empty() => None,
                None => return Err(format!("{t:?}: unexpected {after:?} after the IPv6 address")),
            };
            if h.parse::<std::net::Ipv6Addr>().is_err() {
                return Err(format!("{t:?}: {h:?} is not an IPv6 address"));
            }
            (h.to_string(), port)
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h.to_string(), Some(p)),
                None => (authority.to_string(), None),
            }
        };
        if host.is_empty() || host.contains(':') && !authority.starts_with('[') {
            return Err(format!("{t:?} has no usable host (IPv6 addresses go in brackets)"));
        }
        let port = match port {
            Some(p) => p.parse::<u16>().ok().filter(|p| *p > 0).ok_or_else(|| format!("{t:?}: port {p:?} is not a port number"))?,
            None => 2379,
        };
        Ok(EtcdEndpoint { tls, host, port })
    }
}

/// Calico's etcd v3 datastore (libcalico's `apiconfig` etcd settings), validated but not used:
/// files are read and members contacted by the etcd backend, which names these settings in its
/// errors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdConfig {
    /// `ETCD_ENDPOINTS` as given (the variable and the raw list) and parsed, in order: requests
    /// go to the first member that answers and fail over to the next.
    pub endpoints_setting: Setting,
    /// Empty when the members come from `discovery`.
    pub endpoints: Vec<EtcdEndpoint>,
    /// `ETCD_DISCOVERY_SRV`: the domain whose `_etcd-client-ssl._tcp` (https) and
    /// `_etcd-client._tcp` (http) SRV records name the members, looked up when the datastore
    /// first calls etcd and again whenever no member answers. It takes the place of
    /// `ETCD_ENDPOINTS`, as in libcalico.
    pub discovery: Option<Setting>,
    /// `CKC_DNS_SERVER` (`ip:port`): the DNS server discovery asks instead of `/etc/resolv.conf`'s.
    pub dns_server: Option<std::net::SocketAddr>,
    pub username: Option<Setting>,
    pub password: Option<Setting>,
    pub ca_cert_file: Option<Setting>,
    pub cert_file: Option<Setting>,
    pub key_file: Option<Setting>,
}

impl EtcdConfig {
    /// Whether the members talk TLS; with discovery, possibly (the records decide).
    pub fn tls(&self) -> bool {
        self.discovery.is_some() || self.endpoints.first().is_some_and(|e| e.tls)
    }
}

/// Metrics over TLS, as the Tigera operator configures it: `TLS_CRT_PATH` and `TLS_KEY_PATH` (PEM)
/// make the metrics listener serve HTTPS; with `CA_CRT_PATH` every client must present a
/// certificate signed by that bundle, and with `CLIENT_COMMON_NAME` also carry that common name.
/// Files are read when the listener is set up, which names these settings in its errors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetricsTlsConfig {
    pub cert_file: Setting,
    pub key_file: Setting,
    pub client_ca_file: Option<Setting>,
    pub client_common_name: Option<String>,
}

/// Every controller name upstream's `ENABLED_CONTROLLERS` accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ControllerName {
    Node,
    LoadBalancer,
    Policy,
    /// `namespace` and its alias `profile`.
    Namespace,
    ServiceAccount,
    WorkloadEndpoint,
    FlannelMigration,
}

impl ControllerName {
    pub const ALL: [ControllerName; 7] = [
        ControllerName::Node,
        ControllerName::LoadBalancer,
        ControllerName::Policy,
        ControllerName::Namespace,
        ControllerName::ServiceAccount,
        ControllerName::WorkloadEndpoint,
        ControllerName::FlannelMigration,
    ];

    pub fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "node" => ControllerName::Node,
            "loadbalancer" => ControllerName::LoadBalancer,
            "policy" => ControllerName::Policy,
            "namespace" | "profile" => ControllerName::Namespace,
            "serviceaccount" => ControllerName::ServiceAccount,
            "workloadendpoint" => ControllerName::WorkloadEndpoint,
            "flannelmigration" => ControllerName::FlannelMigration,
            _ => return None,
        })
    }

    /// The name as `ENABLED_CONTROLLERS` spells it (a bounded label).
    pub fn as_str(self) -> &'static str {
        match self {
            ControllerName::Node => "node",
            ControllerName::LoadBalancer => "loadbalancer",
            ControllerName::Policy => "policy",
            ControllerName::Namespace => "namespace",
            ControllerName::ServiceAccount => "serviceaccount",
            ControllerName::WorkloadEndpoint => "workloadendpoint",
            ControllerName::FlannelMigration => "flannelmigration",
        }
    }

    /// Only the node controller (its IPAM garbage collector) exists in this version.
    pub fn implemented(self) -> bool {
        matches!(self, ControllerName::Node | ControllerName::LoadBalancer)
    }
}

/// A log level, from upstream's logrus names (env) or the KCC's `logSeverityScreen`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogLevel {
    Trace,
    Debug,
    Info,
    Warning,
    Error,
    Fatal,
    Panic,
    /// `logSeverityScreen: None`: nothing is logged.
    Off,
}

impl LogLevel {
    /// `LOG_LEVEL`: logrus's names, any case.
    pub fn parse_env(text: &str) -> Option<Self> {
        Some(match text.trim().to_ascii_lowercase().as_str() {
            "trace" => LogLevel::Trace,
            "debug" => LogLevel::Debug,
            "info" => LogLevel::Info,
            "warn" | "warning" => LogLevel::Warning,
            "error" => LogLevel::Error,
            "fatal" => LogLevel::Fatal,
            "panic" => LogLevel::Panic,
            _ => return None,
        })
    }

    /// `logSeverityScreen`: the CRD's enum (None, Debug, Info, Warning, Error, Fatal, Panic).
    pub fn parse_api(text: &str) -> Option<Self> {
        match text.trim().to_ascii_lowercase().as_str() {
            "none" => Some(LogLevel::Off),
            "trace" => None,
            other => LogLevel::parse_env(other),
        }
    }

    /// The `tracing` filter directive. Fatal and panic have no tracing level: both mean "errors
    /// only", which is what a logrus process at those levels prints before it dies.
    pub fn filter_directive(self) -> &'static str {
        match self {
            LogLevel::Trace => "trace",
            LogLevel::Debug => "debug",
            LogLevel::Info => "info",
            LogLevel::Warning => "warn",
            LogLevel::Error | LogLevel::Fatal | LogLevel::Panic => "error",
            LogLevel::Off => "off",
        }
    }

    /// Title case, as upstream reports `status.runningConfig.logSeverityScreen`.
    pub fn title(self) -> &'static str {
        match self {
            LogLevel::Trace => "Trace",
            LogLevel::Debug => "Debug",
            LogLevel::Info => "Info",
            LogLevel::Warning => "Warning",
            LogLevel::Error => "Error",
            LogLevel::Fatal => "Fatal",
            LogLevel::Panic => "Panic",
            LogLevel::Off => "None",
        }
    }
}

/// What the environment says, validated. `None` everywhere means "not set, the API decides".
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EnvConfig {
    /// `DATASTORE_TYPE` was unset: upstream's default is etcdv3, we run on Kubernetes and say so.
    pub datastore_defaulted: bool,
    /// `DATASTORE_TYPE=etcdv3` (or unset with `ETCD_ENDPOINTS` given): Calico's objects live in
    /// this etcd; pods and nodes still come from Kubernetes.
    pub etcd: Option<EtcdConfig>,
    pub enabled_controllers: Option<Vec<ControllerName>>,
    pub log_level: Option<LogLevel>,
    pub health_enabled: Option<bool>,
    pub reconciler_period: Option<Millis>,
    pub compaction_period: Option<Millis>,
    pub sync_node_labels: Option<bool>,
    pub auto_host_endpoints: Option<bool>,
    /// libcalico's `USE_POD_CIDR=true` (host-local IPAM): a Kubernetes Node's IPIP tunnel address
    /// is its pod CIDR's first address (read for automatic host endpoints in KDD).
    pub use_pod_cidr: bool,
    /// `WORKLOAD_ENDPOINT_WORKERS`, `PROFILE_WORKERS`, `POLICY_WORKERS`, `NODE_WORKERS`.
    pub workers: BTreeMap<&'static str, u32>,
    /// `KUBECONFIG`, or libcalico's `CALICO_KUBECONFIG`.
    pub kubeconfig: Option<String>,
    /// `CKC_MASS_CHANGE_GUARD`, `CKC_MASS_CHANGE_SHARE`, `CKC_MASS_CHANGE_MIN_ADDRESSES`,
    /// `CKC_MASS_CHANGE_MIN_NODES` over the guard's defaults.
    pub guard: crate::guard::GuardConfig,
    /// `CKC_POLICY_BAD_RULES`: `drop-rule` (default: a NetworkPolicy rule that cannot be converted
    /// is dropped alone) or `upstream` (upstream's behaviour: some errors skip the whole policy).
    pub policy_bad_rules: crate::policy::BadRules,
    /// `CKC_CALICO_NODE_NAMESPACE`: where the policy-name migrator looks for the `calico-node`
    /// DaemonSet; unset, the ServiceAccount's namespace (upstream's rule), else `calico-system`.
    pub calico_node_namespace: Option<String>,
    /// `CKC_POLICY_MIGRATOR_INTERVAL`: how often the policy-name migrator looks again (upstream's
    /// 5 minutes when unset).
    pub policy_migrator_interval: Option<Millis>,
    /// `KUBE_CONTROLLERS_CONFIG_NAME` (the Tigera operator sets it): the KubeControllersConfiguration
    /// read, created when missing and given the status; `None` means `default`.
    pub kcc_name: Option<String>,
    /// `DISABLE_KUBE_CONTROLLERS_CONFIG_API=true`: run from the environment alone; the
    /// KubeControllersConfiguration is never watched, read, created or written.
    pub kcc_api_disabled: bool,
    /// `CA_CRT_PATH`: a PEM bundle trusted for the apiserver (besides the kubeconfig's or the
    /// ServiceAccount's CA) and, with metrics TLS, for the metrics clients' certificates.
    pub ca_crt_path: Option<Setting>,
    pub metrics_tls: Option<MetricsTlsConfig>,
    /// The variables consulted that were set, as upstream lists them in `status.environmentVars`.
    pub consulted: BTreeMap<String, String>,
}

/// The KubeControllersConfiguration's name when `KUBE_CONTROLLERS_CONFIG_NAME` is unset.
pub const DEFAULT_KCC_NAME: &str = "default";

impl EnvConfig {
    /// The KubeControllersConfiguration this process reads (and, leading, writes), or `None`
    /// when `DISABLE_KUBE_CONTROLLERS_CONFIG_API` turned the API off.
    pub fn kcc(&self) -> Option<&str> {
        (!self.kcc_api_disabled).then(|| self.kcc_name.as_deref().unwrap_or(DEFAULT_KCC_NAME))
    }

    /// A controller's `*_WORKERS` (writes in flight at once): upstream's default of 1 when unset.
    pub fn workers_for(&self, var: &str) -> usize {
        self.workers.get(var).map_or(1, |n| (*n).max(1) as usize)
    }
}

const WORKER_VARS: [&str; 4] = ["WORKLOAD_ENDPOINT_WORKERS", "PROFILE_WORKERS", "POLICY_WORKERS", "NODE_WORKERS"];

/// `0.2` or `20%`: a share in (0, 1].
fn parse_share(text: &str) -> Option<f64> {
    let t = text.trim();
    let v = match t.strip_suffix('%') {
        Some(p) => p.trim().parse::<f64>().ok()? / 100.0,
        None => t.parse::<f64>().ok()?,
    };
    (v > 0.0 && v <= 1.0).then_some(v)
}

/// Go's `strconv.ParseBool`, which envconfig uses.
fn parse_go_bool(text: &str) -> Option<bool> {
    match text {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
        _ => None,
    }
}

impl EnvConfig {
    /// Parses the variables out of `env` (the process environment in production). An empty
    /// value counts as unset, as it does for envconfig.
    pub fn from_env(env: &BTreeMap<String, String>) -> Result<Self, ConfigError> {
        let mut out = EnvConfig::default();
        let mut get = |name: &'static str| -> Option<String> {
            let v = env.get(name).filter(|v| !v.trim().is_empty())?.clone();
            out.consulted.insert(name.to_string(), v.clone());
            Some(v)
        };

        // libcalico accepts its datastore variables with and without the CALICO_ prefix.
        let datastore = get("DATASTORE_TYPE").map(|v| ("DATASTORE_TYPE", v)).or_else(|| get("CALICO_DATASTORE_TYPE").map(|v| ("CALICO_DATASTORE_TYPE", v)));
        let etcd_endpoints = get("ETCD_ENDPOINTS").map(|v| ("ETCD_ENDPOINTS", v)).or_else(|| get("CALICO_ETCD_ENDPOINTS").map(|v| ("CALICO_ETCD_ENDPOINTS", v)));
        let use_etcd = match datastore {
            Some((var, v)) => match v.trim().to_ascii_lowercase().as_str() {
                "kubernetes" => false,
                "etcdv3" => true,
                _ => return Err(ConfigError::invalid(var, &v, "expected kubernetes or etcdv3")),
            },
            // Unset means etcdv3 upstream; with etcd endpoints given that is clearly the intent.
            None if etcd_endpoints.is_some() => true,
            None => {
                out.datastore_defaulted = true;
                false
            }
        };
        if use_etcd {
            let mut setting = |name: &'static str| -> Option<Setting> {
                let prefixed: &'static str = match name {
                    "ETCD_DISCOVERY_SRV" => "CALICO_ETCD_DISCOVERY_SRV",
                    "ETCD_USERNAME" => "CALICO_ETCD_USERNAME",
                    "ETCD_CA_CERT_FILE" => "CALICO_ETCD_CA_CERT_FILE",
                    "ETCD_CERT_FILE" => "CALICO_ETCD_CERT_FILE",
                    _ => "CALICO_ETCD_KEY_FILE",
                };
                get(name).map(|value| Setting { var: name, value }).or_else(|| get(prefixed).map(|value| Setting { var: prefixed, value }))
            };
            let discovery = setting("ETCD_DISCOVERY_SRV");
            let username = setting("ETCD_USERNAME");
            let ca_cert_file = setting("ETCD_CA_CERT_FILE");
            let cert_file = setting("ETCD_CERT_FILE");
            let key_file = setting("ETCD_KEY_FILE");
            // The password is never recorded among the consulted variables (status shows those).
            let secret = |name: &'static str| env.get(name).filter(|v| !v.is_empty()).map(|v| Setting { var: name, value: v.clone() });
            let password = secret("ETCD_PASSWORD").or_else(|| secret("CALICO_ETCD_PASSWORD"));
            let mut cfg = etcd_config(etcd_endpoints, discovery, username, password, ca_cert_file, cert_file, key_file)?;
            if cfg.discovery.is_some()
                && let Some(raw) = get("CKC_DNS_SERVER")
            {
                cfg.dns_server = Some(raw.parse().map_err(|_| ConfigError::invalid("CKC_DNS_SERVER", &raw, "is not an ip:port (for example 10.96.0.10:53)"))?);
            }
            out.etcd = Some(cfg);
        }
        let kubeconfig = get("KUBECONFIG").or_else(|| get("CALICO_KUBECONFIG"));

        let enabled = match get("ENABLED_CONTROLLERS") {
            Some(v) => {
                let mut names = Vec::new();
                for part in v.split(',').map(str::trim).filter(|p| !p.is_empty()) {
                    let name = ControllerName::parse(&part.to_ascii_lowercase()).ok_or_else(|| {
                        ConfigError::invalid(
                            "ENABLED_CONTROLLERS",
                            &v,
                            format!("unknown controller {part:?} (known: node, loadbalancer, policy, namespace, profile, serviceaccount, workloadendpoint, flannelmigration)"),
                        )
                    })?;
                    if !names.contains(&name) {
                        names.push(name);
                    }
                }
                if names.contains(&ControllerName::FlannelMigration) && names.len() > 1 {
                    return Err(ConfigError::invalid("ENABLED_CONTROLLERS", &v, "flannelmigration must be the only controller when enabled"));
                }
                Some(names)
            }
            None => None,
        };
        let log_level = match get("LOG_LEVEL") {
            Some(v) => Some(LogLevel::parse_env(&v).ok_or_else(|| {
                ConfigError::invalid("LOG_LEVEL", &v, "expected trace, debug, info, warn, warning, error, fatal or panic")
            })?),
            None => None,
        };
        let mut boolean = |name: &'static str| -> Result<Option<bool>, ConfigError> {
            match get(name) {
                Some(v) => parse_go_bool(v.trim()).map(Some).ok_or_else(|| ConfigError::invalid(name, &v, "expected true or false")),
                None => Ok(None),
            }
        };
        let health_enabled = boolean("HEALTH_ENABLED")?;
        let sync_node_labels = boolean("SYNC_NODE_LABELS")?;
        let mut duration = |name: &'static str| -> Result<Option<Millis>, ConfigError> {
            match get(name) {
                Some(v) => match parse_go_duration(&v) {
                    Some(ms) if ms >= 0 => Ok(Some(ms)),
                    _ => Err(ConfigError::invalid(name, &v, "expected a Go duration such as 5m or 30s")),
                },
                None => Ok(None),
            }
        };
        let reconciler_period = duration("RECONCILER_PERIOD")?;
        let compaction_period = duration("COMPACTION_PERIOD")?;
        let policy_migrator_interval = match duration("CKC_POLICY_MIGRATOR_INTERVAL")? {
            Some(0) => return Err(ConfigError::invalid("CKC_POLICY_MIGRATOR_INTERVAL", "0", "expected a Go duration above zero such as 5m")),
            other => other,
        };
        let auto_host_endpoints = match get("AUTO_HOST_ENDPOINTS") {
            Some(v) => match v.trim().to_ascii_lowercase().as_str() {
                "enabled" => Some(true),
                "disabled" => Some(false),
                _ => return Err(ConfigError::invalid("AUTO_HOST_ENDPOINTS", &v, "expected enabled or disabled")),
            },
            None => None,
        };
        // As libcalico reads it: anything but `true` (in any case) is off.
        let use_pod_cidr = get("USE_POD_CIDR").is_some_and(|v| v.trim().eq_ignore_ascii_case("true"));
        let mut workers = BTreeMap::new();
        for name in WORKER_VARS {
            if let Some(v) = get(name) {
                match v.trim().parse::<u32>() {
                    Ok(n) if n > 0 => {
                        workers.insert(name, n);
                    }
                    _ => return Err(ConfigError::invalid(name, &v, "expected a positive number of workers")),
                }
            }
        }
        let mut guard = crate::guard::GuardConfig::default();
        if let Some(v) = get("CKC_MASS_CHANGE_GUARD") {
            guard.enabled = match v.trim().to_ascii_lowercase().as_str() {
                "enabled" | "on" | "true" => true,
                "disabled" | "off" | "false" => false,
                _ => return Err(ConfigError::invalid("CKC_MASS_CHANGE_GUARD", &v, "expected enabled or disabled")),
            };
        }
        if let Some(v) = get("CKC_MASS_CHANGE_SHARE") {
            guard.share = parse_share(&v).ok_or_else(|| ConfigError::invalid("CKC_MASS_CHANGE_SHARE", &v, "expected a share such as 0.2 or 20%, above 0 and at most 1"))?;
        }
        for (name, field) in [("CKC_MASS_CHANGE_MIN_ADDRESSES", &mut guard.min_addresses), ("CKC_MASS_CHANGE_MIN_NODES", &mut guard.min_nodes)] {
            if let Some(v) = get(name) {
                *field = v.trim().parse::<u64>().ok().filter(|n| *n > 0).ok_or_else(|| ConfigError::invalid(name, &v, "expected a positive count"))?;
            }
        }
        let policy_bad_rules = match get("CKC_POLICY_BAD_RULES").map(|v| v.trim().to_ascii_lowercase()) {
            None => crate::policy::BadRules::DropRule,
            Some(v) if v == "drop-rule" => crate::policy::BadRules::DropRule,
            Some(v) if v == "upstream" => crate::policy::BadRules::Upstream,
            Some(v) => return Err(ConfigError::invalid("CKC_POLICY_BAD_RULES", &v, "expected drop-rule or upstream")),
        };
        let calico_node_namespace = match get("CKC_CALICO_NODE_NAMESPACE") {
            Some(v) => {
                let ns = v.trim();
                let valid = ns.len() <= 63 && !ns.starts_with('-') && !ns.ends_with('-') && ns.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
                if !valid {
                    return Err(ConfigError::invalid("CKC_CALICO_NODE_NAMESPACE", &v, "expected a namespace name (lowercase letters, digits and '-')"));
                }
                Some(ns.to_string())
            }
            None => None,
        };
        // Object names as Kubernetes allows them (a DNS subdomain), so a typo fails here and not
        // as a 404 on every read.
        let kcc_name = match get("KUBE_CONTROLLERS_CONFIG_NAME") {
            Some(v) => {
                let name = v.trim();
                let valid = name.len() <= 253
                    && name.split('.').all(|l| {
                        !l.is_empty() && l.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-') && !l.starts_with('-') && !l.ends_with('-')
                    });
                if !valid {
                    return Err(ConfigError::invalid("KUBE_CONTROLLERS_CONFIG_NAME", &v, "expected an object name (lowercase letters, digits, '-' and '.')"));
                }
                Some(name.to_string())
            }
            None => None,
        };
        let kcc_api_disabled = match get("DISABLE_KUBE_CONTROLLERS_CONFIG_API") {
            Some(v) => parse_go_bool(v.trim()).ok_or_else(|| ConfigError::invalid("DISABLE_KUBE_CONTROLLERS_CONFIG_API", &v, "expected true or false"))?,
            None => false,
        };
        let ca_crt_path = get("CA_CRT_PATH").map(|value| Setting { var: "CA_CRT_PATH", value });
        let tls_crt = get("TLS_CRT_PATH").map(|value| Setting { var: "TLS_CRT_PATH", value });
        let tls_key = get("TLS_KEY_PATH").map(|value| Setting { var: "TLS_KEY_PATH", value });
        let client_common_name = get("CLIENT_COMMON_NAME").map(|v| v.trim().to_string());
        let metrics_tls = match (tls_crt, tls_key) {
            (Some(cert_file), Some(key_file)) => {
                if client_common_name.is_some() && ca_crt_path.is_none() {
                    return Err(ConfigError::invalid(
                        "CLIENT_COMMON_NAME",
                        client_common_name.as_deref().unwrap_or_default(),
                        "a client certificate's common name is checked only against a trusted CA: set CA_CRT_PATH too",
                    ));
                }
                Some(MetricsTlsConfig { cert_file, key_file, client_ca_file: ca_crt_path.clone(), client_common_name })
            }
            (None, None) => {
                if let Some(cn) = &client_common_name {
                    return Err(ConfigError::invalid("CLIENT_COMMON_NAME", cn, "needs metrics TLS: set TLS_CRT_PATH and TLS_KEY_PATH"));
                }
                None
            }
            (Some(s), None) | (None, Some(s)) => {
                return Err(ConfigError::invalid(s.var, &s.value, "metrics TLS needs both TLS_CRT_PATH and TLS_KEY_PATH"));
            }
        };
        out.ca_crt_path = ca_crt_path;
        out.metrics_tls = metrics_tls;
        out.kcc_api_disabled = kcc_api_disabled;
        out.kcc_name = kcc_name;
        out.guard = guard;
        out.policy_bad_rules = policy_bad_rules;
        out.calico_node_namespace = calico_node_namespace;
        out.policy_migrator_interval = policy_migrator_interval;
        out.kubeconfig = kubeconfig;
        out.enabled_controllers = enabled;
        out.log_level = log_level;
        out.health_enabled = health_enabled;
        out.sync_node_labels = sync_node_labels;
        out.reconciler_period = reconciler_period;
        out.compaction_period = compaction_period;
        out.auto_host_endpoints = auto_host_endpoints;
        out.use_pod_cidr = use_pod_cidr;
        out.workers = workers;
        Ok(out)
    }
}

/// Checks the etcd settings against each other; files and members are not touched here.
fn etcd_config(
    endpoints: Option<(&'static str, String)>,
    discovery: Option<Setting>,
    username: Option<Setting>,
    password: Option<Setting>,
    ca_cert_file: Option<Setting>,
    cert_file: Option<Setting>,
    key_file: Option<Setting>,
) -> Result<EtcdConfig, ConfigError> {
    match (&cert_file, &key_file) {
        (Some(c), None) => return Err(ConfigError::invalid(c.var, &c.value, "a client certificate needs its key in ETCD_KEY_FILE")),
        (None, Some(k)) => return Err(ConfigError::invalid(k.var, &k.value, "a client key needs its certificate in ETCD_CERT_FILE")),
        _ => {}
    }
    match (&username, &password) {
        (Some(u), None) => return Err(ConfigError::invalid(u.var, &u.value, "a user name needs ETCD_PASSWORD")),
        (None, Some(p)) => return Err(ConfigError::invalid(p.var, "<redacted>", "a password needs ETCD_USERNAME")),
        _ => {}
    }
    if let Some(d) = discovery {
        let domain = d.value.trim().trim_end_matches('.');
        if domain.is_empty() || domain.split('.').any(|l| l.is_empty() || l.len() > 63 || !l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')) {
            return Err(ConfigError::invalid(d.var, &d.value, "is not a DNS domain (for example example.com, whose _etcd-client-ssl._tcp and _etcd-client._tcp SRV records name the members)"));
        }
        // Discovery takes the place of the member list, as in libcalico.
        let endpoints_setting = Setting { var: d.var, value: d.value.clone() };
        return Ok(EtcdConfig { endpoints_setting, endpoints: Vec::new(), discovery: Some(d), dns_server: None, username, password, ca_cert_file, cert_file, key_file });
    }
    let Some((var, raw)) = endpoints else {
        return Err(ConfigError::invalid("ETCD_ENDPOINTS", "", "the etcdv3 datastore needs ETCD_ENDPOINTS (for example https://10.0.0.1:2379,https://10.0.0.2:2379)"));
    };
    let mut parsed = Vec::new();
    for part in raw.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let e = EtcdEndpoint::parse(part).map_err(|problem| ConfigError::invalid(var, &raw, problem))?;
        if !parsed.contains(&e) {
            parsed.push(e);
        }
    }
    if parsed.is_empty() {
        return Err(ConfigError::invalid(var, &raw, "lists no endpoint"));
    }
    if parsed.iter().any(|e| e.tls) && parsed.iter().any(|e| !e.tls) {
        return Err(ConfigError::invalid(var, &raw, "mixes http:// and https:// members; use one scheme for all"));
    }
    let tls = parsed[0].tls;
    if !tls && let Some(s) = [&ca_cert_file, &cert_file, &key_file].into_iter().flatten().next() {
        return Err(ConfigError::invalid(s.var, &s.value, format!("is set but {var} are plain http:// members; use https:// members to talk TLS")));
    }
    Ok(EtcdConfig { endpoints_setting: Setting { var, value: raw }, endpoints: parsed, discovery: None, dns_server: None, username, password, ca_cert_file, cert_file, key_file })
}

/// The `default` KubeControllersConfiguration as kube-controllers creates it (§2.2), with
/// libcalico's client-side defaults (metrics port, leak grace period, assignIPs) filled in.
pub fn default_kcc_spec() -> KubeControllersConfigurationSpec {
    let period = || json!({"reconcilerPeriod": "5m"});
    KubeControllersConfigurationSpec {
        log_severity_screen: Some("Info".into()),
        health_checks: Some("Enabled".into()),
        etcd_v3_compaction_period: Some("10m".into()),
        prometheus_metrics_port: Some(DEFAULT_METRICS_PORT),
        debug_profile_port: None,
        controllers: ControllersConfig {
            node: Some(NodeControllerConfig {
                reconciler_period: Some("5m".into()),
                sync_labels: Some("Enabled".into()),
                leak_grace_period: Some("15m".into()),
                host_endpoint: Some(json!({"autoCreate": "Disabled", "createDefaultHostEndpoint": "Enabled"})),
                extra: BTreeMap::new(),
            }),
            policy: Some(period()),
            workload_endpoint: Some(period()),
            service_account: Some(period()),
            namespace: Some(period()),
            load_balancer: Some(json!({"assignIPs": "AllServices"})),
            migration: Some(json!({"policyNameMigrator": "Enabled"})),
            extra: BTreeMap::new(),
        },
        extra: BTreeMap::new(),
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct NodeRunConfig {
    /// 0 = no periodic reconcile. Upstream reports it as nil and so do we.
    pub reconciler_period: Millis,
    /// Always false on the Kubernetes datastore (label sync is etcd-only).
    pub sync_labels: bool,
    /// `None` = unset in the API; the GC then uses 15 minutes (Part A).
    pub leak_grace_period: Option<Millis>,
    pub auto_create_host_endpoints: bool,
    pub create_default_host_endpoint: bool,
    /// The API's `hostEndpoint` section as written (templates included), read by
    /// [`crate::host_endpoints::HostEndpointConfig::from_api`].
    pub host_endpoint: Option<Value>,
    /// `AUTO_HOST_ENDPOINTS` (`Some(true)` = enabled), which replaces that section.
    pub host_endpoint_override: Option<bool>,
}

/// The effective configuration: env over API, per §2.2.
#[derive(Debug, Clone, PartialEq)]
pub struct RunConfig {
    pub log_level: LogLevel,
    pub health_enabled: bool,
    pub compaction_period: Millis,
    /// 0 disables the metrics listener.
    pub metrics_port: u16,
    pub debug_profile_port: Option<u16>,
    pub node: Option<NodeRunConfig>,
    /// Reconciler periods of the controllers that have one; `Some` = enabled.
    pub policy: Option<Millis>,
    pub workload_endpoint: Option<Millis>,
    pub service_account: Option<Millis>,
    pub namespace: Option<Millis>,
    /// `assignIPs`; `Some` = enabled.
    pub load_balancer: Option<String>,
    pub flannel_migration: bool,
    pub policy_name_migrator: bool,
    /// Env vars for `status.environmentVars`.
    pub environment: BTreeMap<String, String>,
    /// Calico's data is in etcd (`DATASTORE_TYPE=etcdv3`): the profile and policy controllers run.
    pub etcd: bool,
}

fn section_str<'a>(section: Option<&'a Value>, field: &str) -> Option<&'a str> {
    section?.get(field)?.as_str()
}

pub(crate) fn enabled_str(text: Option<&str>, default: bool) -> bool {
    match text.map(|t| t.trim().to_ascii_lowercase()) {
        Some(t) if t == "enabled" => true,
        Some(t) if t == "disabled" => false,
        _ => default,
    }
}

impl RunConfig {
    /// Merges env with the API's `default` object. `api` is `None` when there is none (yet):
    /// the defaults we would create stand in, as upstream always works from a created object.
    pub fn merge(env: &EnvConfig, api: Option<&KubeControllersConfigurationSpec>) -> RunConfig {
        let defaults;
        let api = match api {
            Some(a) => a,
            None => {
                defaults = default_kcc_spec();
                &defaults
            }
        };
        let c = &api.controllers;
        let listed = |name: ControllerName| env.enabled_controllers.as_ref().map(|l| l.contains(&name));
        let enabled = |name: ControllerName, section: bool| listed(name).unwrap_or(section);
        // A periodic reconciler's period: RECONCILER_PERIOD, else the API's value, else 5m, but
        // only when the API section exists (enabled by env alone ⇒ 0, upstream's quirk kept:
        // changing it would reconcile more often than operators configured).
        let period = |section: Option<&Value>| {
            env.reconciler_period.unwrap_or_else(|| match section {
                Some(s) => section_str(Some(s), "reconcilerPeriod").and_then(parse_go_duration).unwrap_or(DEFAULT_RECONCILER_PERIOD),
                None => 0,
            })
        };
        let simple = |name: ControllerName, section: Option<&Value>| enabled(name, section.is_some()).then(|| period(section));

        let node = enabled(ControllerName::Node, c.node.is_some()).then(|| {
            let api_node = c.node.clone().unwrap_or_default();
            let hep = api_node.host_endpoint.as_ref();
            let (auto_create, create_default) = match env.auto_host_endpoints {
                // The env override forces the default HEP on and ignores API templates (§1.6).
                Some(true) => (true, true),
                Some(false) => (false, enabled_str(section_str(hep, "createDefaultHostEndpoint"), true)),
                None => (enabled_str(section_str(hep, "autoCreate"), false), enabled_str(section_str(hep, "createDefaultHostEndpoint"), true)),
            };
            NodeRunConfig {
                reconciler_period: match (&c.node, &api_node.reconciler_period) {
                    (Some(_), Some(p)) => parse_go_duration(p).unwrap_or(DEFAULT_RECONCILER_PERIOD),
                    (Some(_), None) => DEFAULT_RECONCILER_PERIOD,
                    (None, _) => 0,
                },
                // Label sync is etcd-only (forced off on Kubernetes, as upstream);
                // SYNC_NODE_LABELS beats the API's `syncLabels` (default Enabled).
                sync_labels: env.etcd.is_some() && env.sync_node_labels.unwrap_or_else(|| enabled_str(api_node.sync_labels.as_deref(), true)),
                leak_grace_period: api_node.leak_grace_period.as_deref().and_then(parse_go_duration),
                auto_create_host_endpoints: auto_create,
                create_default_host_endpoint: create_default,
                host_endpoint: api_node.host_endpoint.clone(),
                host_endpoint_override: env.auto_host_endpoints,
            }
        });
        let load_balancer = enabled(ControllerName::LoadBalancer, c.load_balancer.is_some())
            .then(|| c.load_balancer_assign_ips().unwrap_or("AllServices").to_string());

        let log_level = env.log_level.unwrap_or_else(|| api.log_severity_screen.as_deref().and_then(LogLevel::parse_api).unwrap_or(LogLevel::Info));
        let health_enabled = env.health_enabled.unwrap_or_else(|| enabled_str(api.health_checks.as_deref(), true));
        let compaction_period = env
            .compaction_period
            .unwrap_or_else(|| api.etcd_v3_compaction_period.as_deref().and_then(parse_go_duration).unwrap_or(DEFAULT_COMPACTION_PERIOD));

        let mut environment = env.consulted.clone();
        // Only the variables that shape the running config; credentials and paths stay out.
        environment.retain(|k, _| {
            matches!(
                k.as_str(),
                "DATASTORE_TYPE"
                    | "CALICO_DATASTORE_TYPE"
                    | "ENABLED_CONTROLLERS"
                    | "LOG_LEVEL"
                    | "HEALTH_ENABLED"
                    | "RECONCILER_PERIOD"
                    | "COMPACTION_PERIOD"
                    | "SYNC_NODE_LABELS"
                    | "AUTO_HOST_ENDPOINTS"
            ) || WORKER_VARS.contains(&k.as_str())
        });
        if node.is_some() {
            environment.insert("DATASTORE_TYPE".into(), "kubernetes".into());
        }

        RunConfig {
            log_level,
            health_enabled,
            compaction_period,
            metrics_port: api.prometheus_metrics_port.unwrap_or(DEFAULT_METRICS_PORT),
            debug_profile_port: api.debug_profile_port,
            node,
            policy: simple(ControllerName::Policy, c.policy.as_ref()),
            workload_endpoint: simple(ControllerName::WorkloadEndpoint, c.workload_endpoint.as_ref()),
            service_account: simple(ControllerName::ServiceAccount, c.service_account.as_ref()),
            namespace: simple(ControllerName::Namespace, c.namespace.as_ref()),
            load_balancer,
            flannel_migration: listed(ControllerName::FlannelMigration).unwrap_or(false),
            policy_name_migrator: enabled_str(section_str(c.migration.as_ref(), "policyNameMigrator"), true),
            environment,
            etcd: env.etcd.is_some(),
        }
    }

    /// Whether the IPAM garbage collector (inside the node controller) runs.
    pub fn gc_enabled(&self) -> bool {
        self.node.is_some()
    }

    /// Whether the configuration sets `leakGracePeriod` (else [`RunConfig::leak_grace`] is the
    /// 15-minute default).
    pub fn leak_grace_is_set(&self) -> bool {
        self.node.as_ref().is_some_and(|n| n.leak_grace_period.is_some())
    }

    /// The effective leak grace period for the GC: unset means 15 minutes (Part A).
    pub fn leak_grace(&self) -> Millis {
        self.node.as_ref().and_then(|n| n.leak_grace_period).unwrap_or(crate::model::config::DEFAULT_LEAK_GRACE)
    }

    /// The enabled controllers, by `ENABLED_CONTROLLERS` name.
    pub fn enabled_controllers(&self) -> Vec<ControllerName> {
        let mut out = Vec::new();
        let mut push = |on: bool, name| {
            if on {
                out.push(name);
            }
        };
        push(self.node.is_some(), ControllerName::Node);
        push(self.load_balancer.is_some(), ControllerName::LoadBalancer);
        push(self.policy.is_some(), ControllerName::Policy);
        push(self.namespace.is_some(), ControllerName::Namespace);
        push(self.service_account.is_some(), ControllerName::ServiceAccount);
        push(self.workload_endpoint.is_some(), ControllerName::WorkloadEndpoint);
        push(self.flannel_migration, ControllerName::FlannelMigration);
        out
    }

    /// Enabled controllers this version does not implement (logged once, listed in the status
    /// file; never fatal, so a drop-in deployment keeps running its GC).
    pub fn not_implemented(&self) -> Vec<&'static str> {
        // On etcd the namespace, service-account, policy (runtime::light) and workload-endpoint
        // (runtime::endpoints) controllers run.
        // Node and LoadBalancer (runtime::loadbalancer) run on both.
        let runs = |c: &ControllerName| {
            c.implemented() || (self.etcd && matches!(c, ControllerName::Namespace | ControllerName::ServiceAccount | ControllerName::Policy | ControllerName::WorkloadEndpoint))
        };
        // The policy-name migrator runs on both datastores (runtime::migrator).
        self.enabled_controllers().into_iter().filter(|c| !runs(c)).map(ControllerName::as_str).collect()
    }

    /// `status` for the KubeControllersConfiguration: `runningConfig` in the spec's shape with
    /// effective values, and `environmentVars`.
    pub fn status(&self) -> Value {
        let period = |p: Millis| json!({"reconcilerPeriod": format_go_duration(p)});
        let mut controllers = serde_json::Map::new();
        if let Some(n) = &self.node {
            let mut node = json!({
                "syncLabels": if n.sync_labels { "Enabled" } else { "Disabled" },
                "hostEndpoint": {
                    "autoCreate": if n.auto_create_host_endpoints { "Enabled" } else { "Disabled" },
                    "createDefaultHostEndpoint": if n.create_default_host_endpoint { "Enabled" } else { "Disabled" },
                },
            });
            if let Some(g) = n.leak_grace_period {
                node["leakGracePeriod"] = json!(format_go_duration(g));
            }
            controllers.insert("node".into(), node);
        }
        for (key, p) in [
            ("policy", self.policy),
            ("workloadEndpoint", self.workload_endpoint),
            ("serviceAccount", self.service_account),
            ("namespace", self.namespace),
        ] {
            if let Some(p) = p {
                controllers.insert(key.into(), period(p));
            }
        }
        if let Some(lb) = &self.load_balancer {
            controllers.insert("loadBalancer".into(), json!({"assignIPs": lb}));
        }
        controllers.insert("migration".into(), json!({"policyNameMigrator": if self.policy_name_migrator { "Enabled" } else { "Disabled" }}));
        let mut running = json!({
            "logSeverityScreen": self.log_level.title(),
            "healthChecks": if self.health_enabled { "Enabled" } else { "Disabled" },
            "etcdV3CompactionPeriod": format_go_duration(self.compaction_period),
            "prometheusMetricsPort": self.metrics_port,
            "controllers": controllers,
        });
        if let Some(p) = self.debug_profile_port {
            running["debugProfilePort"] = json!(p);
        }
        json!({"runningConfig": running, "environmentVars": self.environment})
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> EnvConfig {
        EnvConfig::from_env(&pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()).unwrap()
    }

    fn env_err(pairs: &[(&str, &str)]) -> ConfigError {
        EnvConfig::from_env(&pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()).unwrap_err()
    }

    fn spec(v: Value) -> KubeControllersConfigurationSpec {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn no_env_and_no_api_object_runs_what_the_created_default_enables() {
        let e = env(&[]);
        assert!(e.datastore_defaulted, "unset DATASTORE_TYPE is noted so the caller can log it");
        let rc = RunConfig::merge(&e, None);
        assert_eq!(rc, RunConfig::merge(&e, Some(&default_kcc_spec())));
        assert_eq!(rc.log_level, LogLevel::Info);
        assert!(rc.health_enabled && rc.gc_enabled());
        assert_eq!(rc.metrics_port, 9094);
        assert_eq!(rc.leak_grace(), 15 * 60 * 1000);
        assert_eq!(rc.policy, Some(DEFAULT_RECONCILER_PERIOD));
        assert_eq!(rc.load_balancer.as_deref(), Some("AllServices"));
        assert_eq!(
            rc.not_implemented(),
            vec!["policy", "namespace", "serviceaccount", "workloadendpoint"],
            "loadbalancer runs on Kubernetes; the profile and policy controllers only on etcd"
        );
    }

    #[test]
    fn etcd_settings_parse_with_and_without_the_calico_prefix() {
        let e = env(&[
            ("DATASTORE_TYPE", "etcdv3"),
            ("ETCD_ENDPOINTS", "https://10.0.0.1:2379, https://etcd-2, https://[fd00::1]:4001/"),
            ("CALICO_ETCD_CA_CERT_FILE", "/c/ca.pem"),
            ("ETCD_CERT_FILE", "/c/cert.pem"),
            ("ETCD_KEY_FILE", "/c/key.pem"),
            ("CALICO_ETCD_USERNAME", "calico"),
            ("ETCD_PASSWORD", "s3cret"),
        ]);
        let etcd = e.etcd.expect("etcd settings");
        assert!(!e.datastore_defaulted && etcd.tls());
        let urls: Vec<_> = etcd.endpoints.iter().map(EtcdEndpoint::url).collect();
        assert_eq!(urls, ["https://10.0.0.1:2379", "https://etcd-2:2379", "https://[fd00::1]:4001"]);
        assert_eq!(etcd.ca_cert_file, Some(Setting { var: "CALICO_ETCD_CA_CERT_FILE", value: "/c/ca.pem".into() }));
        assert_eq!(etcd.username.as_ref().map(|u| u.var), Some("CALICO_ETCD_USERNAME"));
        assert_eq!(etcd.password.as_ref().map(|p| p.value.as_str()), Some("s3cret"));
        assert!(!format!("{etcd:?}").contains("s3cret"), "the password never reaches a log line");
        assert!(!e.consulted.values().any(|v| v == "s3cret"), "nor the status");
        // Unset DATASTORE_TYPE with endpoints given means etcd; CALICO_ prefixed type too.
        let e = env(&[("CALICO_ETCD_ENDPOINTS", "http://127.0.0.1:2379")]);
        assert_eq!(e.etcd.map(|c| c.endpoints_setting.var), Some("CALICO_ETCD_ENDPOINTS"));
        assert!(env(&[("CALICO_DATASTORE_TYPE", "etcdv3"), ("ETCD_ENDPOINTS", "http://e")]).etcd.is_some());
        assert!(env(&[("DATASTORE_TYPE", "kubernetes"), ("ETCD_ENDPOINTS", "x")]).etcd.is_none());
        assert!(!env(&[("CALICO_DATASTORE_TYPE", "Kubernetes")]).datastore_defaulted);
        assert!(env(&[]).datastore_defaulted && env(&[]).etcd.is_none());
    }

    #[test]
    fn the_operators_config_name_and_disable_switch_choose_the_configuration_object() {
        assert_eq!(env(&[]).kcc(), Some("default"));
        assert_eq!(env(&[("KUBE_CONTROLLERS_CONFIG_NAME", "tenant-a.kcc")]).kcc(), Some("tenant-a.kcc"));
        assert_eq!(env(&[("DISABLE_KUBE_CONTROLLERS_CONFIG_API", "false")]).kcc(), Some("default"));
        assert_eq!(env(&[("DISABLE_KUBE_CONTROLLERS_CONFIG_API", "true"), ("KUBE_CONTROLLERS_CONFIG_NAME", "x")]).kcc(), None);
        for bad in ["Default", "-a", "a..b", "a_b"] {
            assert!(env_err(&[("KUBE_CONTROLLERS_CONFIG_NAME", bad)]).to_string().contains("KUBE_CONTROLLERS_CONFIG_NAME"), "{bad}");
        }
        assert!(env_err(&[("DISABLE_KUBE_CONTROLLERS_CONFIG_API", "yes")]).to_string().contains("DISABLE_KUBE_CONTROLLERS_CONFIG_API"));
    }

    #[test]
    fn metrics_tls_settings_come_in_pairs_and_a_common_name_needs_a_ca() {
        assert_eq!(env(&[]).metrics_tls, None);
        let t = env(&[("TLS_CRT_PATH", "/t/tls.crt"), ("TLS_KEY_PATH", "/t/tls.key"), ("CA_CRT_PATH", "/ca.crt"), ("CLIENT_COMMON_NAME", "prom")]).metrics_tls.unwrap();
        assert_eq!((t.cert_file.value.as_str(), t.key_file.value.as_str()), ("/t/tls.crt", "/t/tls.key"));
        assert_eq!((t.client_ca_file.map(|s| s.value), t.client_common_name.as_deref()), (Some("/ca.crt".to_string()), Some("prom")));
        let plain = env(&[("TLS_CRT_PATH", "/c"), ("TLS_KEY_PATH", "/k")]).metrics_tls.unwrap();
        assert_eq!((plain.client_ca_file, plain.client_common_name), (None, None));
        assert!(env_err(&[("TLS_CRT_PATH", "/c")]).to_string().contains("TLS_KEY_PATH"));
        assert!(env_err(&[("TLS_CRT_PATH", "/c"), ("TLS_KEY_PATH", "/k"), ("CLIENT_COMMON_NAME", "p")]).to_string().contains("CA_CRT_PATH"));
        assert!(env_err(&[("CLIENT_COMMON_NAME", "p")]).to_string().contains("TLS_CRT_PATH"));
        assert_eq!(env(&[("CA_CRT_PATH", "/ca.crt")]).ca_crt_path.map(|s| s.value), Some("/ca.crt".to_string()));
    }

    #[test]
    fn etcd_discovery_takes_the_place_of_the_member_list() {
        let e = env(&[("DATASTORE_TYPE", "etcdv3"), ("CALICO_ETCD_DISCOVERY_SRV", "example.com."), ("ETCD_ENDPOINTS", "http://ignored:2379"), ("ETCD_CA_CERT_FILE", "/ca"), ("CKC_DNS_SERVER", "127.0.0.1:5353")]);
        let etcd = e.etcd.unwrap();
        assert_eq!(etcd.discovery.as_ref().map(|d| (d.var, d.value.as_str())), Some(("CALICO_ETCD_DISCOVERY_SRV", "example.com.")));
        assert!(etcd.endpoints.is_empty() && etcd.tls(), "the records decide; a CA file is allowed");
        assert_eq!(etcd.endpoints_setting.var, "CALICO_ETCD_DISCOVERY_SRV", "errors about the members name discovery");
        assert_eq!(etcd.dns_server, Some("127.0.0.1:5353".parse().unwrap()));
        assert_eq!(env(&[("ETCD_ENDPOINTS", "https://a"), ("CKC_DNS_SERVER", "bad")]).etcd.unwrap().dns_server, None, "only read for discovery");
    }

    #[test]
    fn bad_etcd_settings_are_errors_naming_the_setting() {
        for (pairs, var, says) in [
            (vec![("DATASTORE_TYPE", "etcdv3")], "ETCD_ENDPOINTS", "needs ETCD_ENDPOINTS"),
            (vec![("DATASTORE_TYPE", "etcdv3"), ("ETCD_ENDPOINTS", " , ")], "ETCD_ENDPOINTS", "no endpoint"),
            (vec![("ETCD_ENDPOINTS", "10.0.0.1:2379")], "ETCD_ENDPOINTS", "http:// or https://"),
            (vec![("ETCD_ENDPOINTS", "https://e:99999")], "ETCD_ENDPOINTS", "not a port"),
            (vec![("ETCD_ENDPOINTS", "https://e:2379/v3")], "ETCD_ENDPOINTS", "no path"),
            (vec![("ETCD_ENDPOINTS", "https://fd00::1:2379")], "ETCD_ENDPOINTS", "brackets"),
            (vec![("CALICO_ETCD_ENDPOINTS", "https://a,http://b")], "CALICO_ETCD_ENDPOINTS", "mixes"),
            (vec![("ETCD_ENDPOINTS", "http://a"), ("ETCD_CA_CERT_FILE", "/ca")], "ETCD_CA_CERT_FILE", "plain http"),
            (vec![("ETCD_ENDPOINTS", "https://a"), ("ETCD_CERT_FILE", "/c")], "ETCD_CERT_FILE", "ETCD_KEY_FILE"),
            (vec![("ETCD_ENDPOINTS", "https://a"), ("CALICO_ETCD_KEY_FILE", "/k")], "CALICO_ETCD_KEY_FILE", "ETCD_CERT_FILE"),
            (vec![("ETCD_ENDPOINTS", "https://a"), ("ETCD_USERNAME", "u")], "ETCD_USERNAME", "ETCD_PASSWORD"),
            (vec![("ETCD_ENDPOINTS", "https://a"), ("ETCD_PASSWORD", "p")], "ETCD_PASSWORD", "ETCD_USERNAME"),
            (vec![("DATASTORE_TYPE", "etcdv3"), ("ETCD_DISCOVERY_SRV", "exa mple..com")], "ETCD_DISCOVERY_SRV", "not a DNS domain"),
            (vec![("DATASTORE_TYPE", "etcdv3"), ("ETCD_DISCOVERY_SRV", "example.com"), ("CKC_DNS_SERVER", "10.0.0.10")], "CKC_DNS_SERVER", "ip:port"),
            (vec![("DATASTORE_TYPE", "consul")], "DATASTORE_TYPE", "kubernetes or etcdv3"),
        ] {
            let e = env_err(&pairs);
            let text = e.to_string();
            assert!(matches!(&e, ConfigError::Invalid { var: v, .. } if *v == var), "{pairs:?}: {e:?}");
            assert!(text.starts_with(var) && text.contains(says), "{pairs:?}: {text}");
            assert!(!text.contains("\"p\"") || var != "ETCD_PASSWORD", "password shown: {text}");
        }
    }

    #[test]
    fn every_upstream_controller_name_is_accepted_and_others_are_errors() {
        let e = env(&[("ENABLED_CONTROLLERS", "node, loadbalancer,policy,profile,namespace,serviceaccount,workloadendpoint")]);
        assert_eq!(e.enabled_controllers.as_ref().unwrap().len(), 6, "profile and namespace are one controller");
        assert_eq!(env(&[("ENABLED_CONTROLLERS", "flannelmigration")]).enabled_controllers, Some(vec![ControllerName::FlannelMigration]));
        let err = env_err(&[("ENABLED_CONTROLLERS", "node,ipam")]);
        assert!(err.to_string().contains("ENABLED_CONTROLLERS") && err.to_string().contains("\"ipam\""), "{err}");
        assert!(env_err(&[("ENABLED_CONTROLLERS", "node,flannelmigration")]).to_string().contains("only controller"));
    }

    #[test]
    fn env_controller_list_beats_api_sections() {
        let e = env(&[("ENABLED_CONTROLLERS", "node,loadbalancer")]);
        let rc = RunConfig::merge(&e, Some(&default_kcc_spec()));
        assert_eq!(rc.enabled_controllers(), vec![ControllerName::Node, ControllerName::LoadBalancer]);
        assert!(rc.not_implemented().is_empty(), "loadbalancer runs on Kubernetes");
        let on_etcd = RunConfig::merge(&env(&[("ENABLED_CONTROLLERS", "node,loadbalancer"), ("DATASTORE_TYPE", "etcdv3"), ("ETCD_ENDPOINTS", "http://127.0.0.1:2379")]), Some(&default_kcc_spec()));
        assert!(on_etcd.not_implemented().is_empty(), "and on etcd");
        // Without the env list, sections decide.
        let api = spec(json!({"controllers": {"policy": {}}}));
        let rc = RunConfig::merge(&env(&[]), Some(&api));
        assert_eq!(rc.enabled_controllers(), vec![ControllerName::Policy]);
        assert!(!rc.gc_enabled(), "no node section and no env list: the GC does not run");
    }

    #[test]
    fn a_controller_enabled_only_by_env_gets_no_periodic_reconcile_unless_reconciler_period_is_set() {
        let api = spec(json!({"controllers": {"policy": {"reconcilerPeriod": "1m"}}}));
        let rc = RunConfig::merge(&env(&[("ENABLED_CONTROLLERS", "policy,namespace,node")]), Some(&api));
        assert_eq!((rc.policy, rc.namespace), (Some(60_000), Some(0)));
        assert_eq!(rc.node.as_ref().unwrap().reconciler_period, 0);
        assert_eq!(rc.leak_grace(), 15 * 60 * 1000, "a node section absent from the API means the 15m default");
        let rc = RunConfig::merge(&env(&[("ENABLED_CONTROLLERS", "policy,namespace"), ("RECONCILER_PERIOD", "30s")]), Some(&api));
        assert_eq!((rc.policy, rc.namespace), (Some(30_000), Some(30_000)));
        let rc = RunConfig::merge(&env(&[]), Some(&spec(json!({"controllers": {"policy": {}}}))));
        assert_eq!(rc.policy, Some(DEFAULT_RECONCILER_PERIOD), "a section without a period gets 5m");
    }

    #[test]
    fn log_level_env_beats_api_and_bad_api_values_mean_info() {
        let api = spec(json!({"logSeverityScreen": "Debug", "controllers": {}}));
        assert_eq!(RunConfig::merge(&env(&[]), Some(&api)).log_level, LogLevel::Debug);
        assert_eq!(RunConfig::merge(&env(&[("LOG_LEVEL", "WARNING")]), Some(&api)).log_level, LogLevel::Warning);
        assert_eq!(RunConfig::merge(&env(&[]), Some(&spec(json!({"logSeverityScreen": "Loud", "controllers": {}})))).log_level, LogLevel::Info);
        assert_eq!(RunConfig::merge(&env(&[]), Some(&spec(json!({"logSeverityScreen": "None", "controllers": {}})))).log_level, LogLevel::Off);
        for (text, level) in [("trace", LogLevel::Trace), ("Warn", LogLevel::Warning), ("fatal", LogLevel::Fatal), ("PANIC", LogLevel::Panic)] {
            assert_eq!(LogLevel::parse_env(text), Some(level));
        }
        let err = env_err(&[("LOG_LEVEL", "verbose")]);
        assert!(err.to_string().starts_with("LOG_LEVEL=\"verbose\""), "{err}");
        assert_eq!(LogLevel::Fatal.filter_directive(), "error");
    }

    #[test]
    fn health_compaction_and_host_endpoint_env_overrides_beat_the_api() {
        let api = spec(json!({"healthChecks": "Disabled", "etcdV3CompactionPeriod": "1h",
            "controllers": {"node": {"hostEndpoint": {"autoCreate": "Enabled", "createDefaultHostEndpoint": "Disabled"}}}}));
        let rc = RunConfig::merge(&env(&[]), Some(&api));
        assert!(!rc.health_enabled);
        assert_eq!(rc.compaction_period, 3_600_000);
        let n = rc.node.unwrap();
        assert!(n.auto_create_host_endpoints && !n.create_default_host_endpoint);
        let e = env(&[("HEALTH_ENABLED", "true"), ("COMPACTION_PERIOD", "0"), ("AUTO_HOST_ENDPOINTS", "Enabled"), ("SYNC_NODE_LABELS", "true")]);
        let rc = RunConfig::merge(&e, Some(&api));
        assert!(rc.health_enabled);
        assert_eq!(rc.compaction_period, 0);
        let n = rc.node.unwrap();
        assert!(n.auto_create_host_endpoints && n.create_default_host_endpoint, "the env override forces the default HEP on");
        assert!(!n.sync_labels, "label sync is etcd-only, forced off on Kubernetes");
        let etcd = |extra: &[(&str, &str)]| {
            let mut vars = vec![("DATASTORE_TYPE", "etcdv3"), ("ETCD_ENDPOINTS", "http://127.0.0.1:2379")];
            vars.extend_from_slice(extra);
            env(&vars)
        };
        let node = |e: &EnvConfig, sync: Option<&str>| {
            let mut section = json!({});
            if let Some(s) = sync {
                section["syncLabels"] = json!(s);
            }
            RunConfig::merge(e, Some(&spec(json!({"controllers": {"node": section}})))).node.unwrap().sync_labels
        };
        assert!(node(&etcd(&[]), None), "on etcd label sync defaults to on");
        assert!(!node(&etcd(&[]), Some("Disabled")));
        assert!(node(&etcd(&[("SYNC_NODE_LABELS", "true")]), Some("Disabled")), "the env beats the API");
        assert!(!node(&etcd(&[("SYNC_NODE_LABELS", "false")]), Some("Enabled")));
        let rc = RunConfig::merge(&env(&[("AUTO_HOST_ENDPOINTS", "disabled")]), Some(&api));
        assert!(!rc.node.unwrap().auto_create_host_endpoints);
    }

    #[test]
    fn the_policy_bad_rules_setting_defaults_to_dropping_a_rule_and_is_checked() {
        assert_eq!(env(&[]).policy_bad_rules, crate::policy::BadRules::DropRule);
        assert_eq!(env(&[("CKC_POLICY_BAD_RULES", "Upstream")]).policy_bad_rules, crate::policy::BadRules::Upstream);
        let m = env(&[("CKC_CALICO_NODE_NAMESPACE", "kube-system"), ("CKC_POLICY_MIGRATOR_INTERVAL", "2s")]);
        assert_eq!((m.calico_node_namespace.as_deref(), m.policy_migrator_interval), (Some("kube-system"), Some(2000)));
        for (var, bad) in [("CKC_CALICO_NODE_NAMESPACE", "Kube_System"), ("CKC_POLICY_MIGRATOR_INTERVAL", "0"), ("CKC_POLICY_MIGRATOR_INTERVAL", "soon")] {
            assert!(env_err(&[(var, bad)]).to_string().contains(var), "{var}={bad}");
        }
        assert!(env_err(&[("CKC_POLICY_BAD_RULES", "lenient")]).to_string().contains("CKC_POLICY_BAD_RULES"));
    }

    #[test]
    fn the_mass_change_guard_is_on_by_default_and_its_settings_are_checked() {
        assert_eq!(env(&[]).guard, crate::guard::GuardConfig::default());
        let g = env(&[("CKC_MASS_CHANGE_SHARE", "35%"), ("CKC_MASS_CHANGE_MIN_ADDRESSES", "500"), ("CKC_MASS_CHANGE_MIN_NODES", "2")]).guard;
        assert_eq!((g.enabled, g.share, g.min_addresses, g.min_nodes), (true, 0.35, 500, 2));
        assert!(!env(&[("CKC_MASS_CHANGE_GUARD", "disabled")]).guard.enabled);
        assert_eq!(env(&[("CKC_MASS_CHANGE_SHARE", "0.5")]).guard.share, 0.5);
        for (var, bad) in [("CKC_MASS_CHANGE_SHARE", "0"), ("CKC_MASS_CHANGE_SHARE", "120%"), ("CKC_MASS_CHANGE_SHARE", "lots"), ("CKC_MASS_CHANGE_MIN_NODES", "0"), ("CKC_MASS_CHANGE_GUARD", "maybe")] {
            assert!(env_err(&[(var, bad)]).to_string().contains(var), "{var}={bad}");
        }
    }

    #[test]
    fn invalid_env_values_name_their_variable() {
        for (var, value) in [
            ("HEALTH_ENABLED", "yes"),
            ("SYNC_NODE_LABELS", "on"),
            ("RECONCILER_PERIOD", "5 minutes"),
            ("COMPACTION_PERIOD", "-"),
            ("AUTO_HOST_ENDPOINTS", "maybe"),
            ("POLICY_WORKERS", "0"),
            ("WORKLOAD_ENDPOINT_WORKERS", "many"),
        ] {
            let err = env_err(&[(var, value)]);
            assert!(err.to_string().starts_with(&format!("{var}=")), "{err}");
        }
        assert_eq!(env(&[("PROFILE_WORKERS", "4")]).workers.get("PROFILE_WORKERS"), Some(&4));
        assert_eq!(env(&[("PROFILE_WORKERS", "4")]).workers_for("PROFILE_WORKERS"), 4);
        assert_eq!(env(&[]).workers_for("POLICY_WORKERS"), 1, "upstream's default");
        assert_eq!(env(&[("LOG_LEVEL", "")]).log_level, None, "an empty value is unset");
    }

    #[test]
    fn leak_grace_and_metrics_port_come_from_the_api_with_client_side_defaults() {
        let api = spec(json!({"prometheusMetricsPort": 0, "controllers": {"node": {"leakGracePeriod": "2s"}}}));
        let rc = RunConfig::merge(&env(&[]), Some(&api));
        assert_eq!((rc.metrics_port, rc.leak_grace()), (0, 2000));
        let rc = RunConfig::merge(&env(&[]), Some(&spec(json!({"controllers": {"node": {}}}))));
        assert_eq!((rc.metrics_port, rc.leak_grace()), (9094, 15 * 60 * 1000), "kubectl-written objects keep metrics and GC on");
        assert_eq!(rc.node.unwrap().leak_grace_period, None, "reported as unset, as written");
    }

    #[test]
    fn load_balancer_is_not_defaulted_unless_enabled() {
        let api = spec(json!({"controllers": {"node": {}}}));
        assert_eq!(RunConfig::merge(&env(&[]), Some(&api)).load_balancer, None);
        let rc = RunConfig::merge(&env(&[("ENABLED_CONTROLLERS", "loadbalancer")]), Some(&api));
        assert_eq!(rc.load_balancer.as_deref(), Some("AllServices"));
        assert!(!rc.gc_enabled());
        let migr = spec(json!({"controllers": {"migration": {"policyNameMigrator": "Disabled"}}}));
        assert!(!RunConfig::merge(&env(&[]), Some(&migr)).policy_name_migrator);
    }

    #[test]
    fn status_reports_effective_values_and_the_env_that_shaped_them() {
        let e = env(&[("ENABLED_CONTROLLERS", "node"), ("LOG_LEVEL", "debug"), ("KUBECONFIG", "/secret/path")]);
        let s = RunConfig::merge(&e, Some(&default_kcc_spec())).status();
        let r = &s["runningConfig"];
        assert_eq!(r["logSeverityScreen"], "Debug");
        assert_eq!(r["healthChecks"], "Enabled");
        assert_eq!(r["etcdV3CompactionPeriod"], "10m0s");
        assert_eq!(r["prometheusMetricsPort"], 9094);
        assert_eq!(r["controllers"]["node"]["leakGracePeriod"], "15m0s");
        assert_eq!(r["controllers"]["node"]["reconcilerPeriod"], Value::Null, "upstream reports the node period as nil");
        assert_eq!(r["controllers"]["policy"], Value::Null);
        assert_eq!(
            s["environmentVars"],
            json!({"DATASTORE_TYPE": "kubernetes", "ENABLED_CONTROLLERS": "node", "LOG_LEVEL": "debug"}),
            "consulted variables only, and never paths or credentials"
        );
    }
}
