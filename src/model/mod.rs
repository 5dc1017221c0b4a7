//! Calico and Kubernetes data as serde types.
