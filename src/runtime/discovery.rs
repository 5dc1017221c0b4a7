//! The start-up check that the cluster serves Calico's IPAM kinds where this version reads them
//! (SPEC Part A: `crd.projectcalico.org/v1` only; a `projectcalico.org/v3` cluster is refused,
//! since watching an empty v1 view and acting on it would be dangerous).
//!
//! Owns: the API discovery requests and the decision (kept in a pure function).
//! Must not: start anything or retry forever: a refusal is final and the process exits with it.

use std::time::Duration;

use kube::Client;

/// The group this version reads and writes.
pub const SUPPORTED: &str = "crd.projectcalico.org/v1";
/// Calico's newer API group, served natively (v3 CRDs); not supported yet.
pub const V3: &str = "projectcalico.org/v3";
/// Discovery answers other than 200/404 (apiserver starting, a flaky network) are retried this
/// many times, `DISCOVERY_PAUSE` apart: long enough to ride out an apiserver restart, short
/// enough that a broken setup is reported within half a minute.
const DISCOVERY_ATTEMPTS: u32 = 10;
const DISCOVERY_PAUSE: Duration = Duration::from_secs(3);

#[derive(Debug, thiserror::Error)]
pub enum ApiGroupError {
    #[error(
        "this version supports crd.projectcalico.org/v1 only, but the cluster serves Calico's IPAM kinds under projectcalico.org/v3; \
         refusing to start rather than act on an empty view"
    )]
    V3Only,
    #[error("CALICO_API_GROUP={0:?}: this version supports crd.projectcalico.org/v1 only")]
    Configured(String),
    #[error("Calico CRDs not installed: neither crd.projectcalico.org/v1 nor projectcalico.org/v3 serves ipamblocks")]
    NotInstalled,
    #[error("API discovery of {group} failed: {source}")]
    Discovery { group: &'static str, source: kube::Error },
}

impl ApiGroupError {
    /// 2 for a cluster or setting this version refuses (a configuration problem a restart will
    /// not fix), 1 otherwise.
    pub fn exit_code(&self) -> i32 {
        match self {
            ApiGroupError::V3Only | ApiGroupError::Configured(_) => 2,
            ApiGroupError::NotInstalled | ApiGroupError::Discovery { .. } => 1,
        }
    }
}

/// The decision, from `CALICO_API_GROUP` and which groups serve `ipamblocks`.
pub fn decide(configured: Option<&str>, v1_serves: bool, v3_serves: bool) -> Result<(), ApiGroupError> {
    match configured.map(str::trim).filter(|c| !c.is_empty()) {
        Some(c) if c != SUPPORTED => return Err(ApiGroupError::Configured(c.to_string())),
        _ => {}
    }
    match (v1_serves, v3_serves) {
        (true, _) => Ok(()),
        (false, true) => Err(ApiGroupError::V3Only),
        (false, false) => Err(ApiGroupError::NotInstalled),
    }
}

/// Asks the apiserver which groups serve `ipamblocks` and decides.
pub async fn check_api_group(client: &Client, configured: Option<&str>) -> Result<(), ApiGroupError> {
    // A refusal by setting needs no request.
    decide(configured, true, false)?;
    let v1 = serves_ipamblocks(client, SUPPORTED).await?;
    let v3 = if v1 { false } else { serves_ipamblocks(client, V3).await? };
    decide(configured, v1, v3)
}

async fn serves_ipamblocks(client: &Client, group: &'static str) -> Result<bool, ApiGroupError> {
    let mut attempt = 0;
    loop {
        match client.list_api_group_resources(group).await {
            Ok(list) => return Ok(list.resources.iter().any(|r| r.name == "ipamblocks")),
            Err(kube::Error::Api(s)) if s.code == 404 => return Ok(false),
            Err(source) => {
                attempt += 1;
                if attempt >= DISCOVERY_ATTEMPTS {
                    return Err(ApiGroupError::Discovery { group, source });
                }
                tracing::warn!(group, error = %source, "API discovery failed; retrying");
                tokio::time::sleep(DISCOVERY_PAUSE).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_v1_cluster_is_accepted_whether_or_not_v3_is_also_served() {
        assert!(decide(None, true, false).is_ok());
        assert!(decide(None, true, true).is_ok());
        assert!(decide(Some("crd.projectcalico.org/v1"), true, false).is_ok());
        assert!(decide(Some(""), true, false).is_ok(), "an empty setting is no setting");
    }

    #[test]
    fn a_cluster_serving_ipam_only_under_v3_is_refused_with_exit_code_2() {
        let e = decide(None, false, true).unwrap_err();
        assert!(matches!(e, ApiGroupError::V3Only));
        assert_eq!(e.exit_code(), 2);
        assert!(e.to_string().contains("supports crd.projectcalico.org/v1 only"), "{e}");
    }

    #[test]
    fn calico_api_group_set_to_v3_or_anything_else_is_refused() {
        let e = decide(Some("projectcalico.org/v3"), true, true).unwrap_err();
        assert!(matches!(e, ApiGroupError::Configured(_)));
        assert_eq!(e.exit_code(), 2);
        let e = decide(Some("example.org/v9"), true, false).unwrap_err();
        assert_eq!((e.exit_code(), e.to_string()), (2, r#"CALICO_API_GROUP="example.org/v9": this version supports crd.projectcalico.org/v1 only"#.to_string()));
    }

    #[test]
    fn a_cluster_without_calico_crds_gets_a_clear_error() {
        let e = decide(None, false, false).unwrap_err();
        assert!(e.to_string().starts_with("Calico CRDs not installed"), "{e}");
        assert_eq!(e.exit_code(), 1);
    }
}
