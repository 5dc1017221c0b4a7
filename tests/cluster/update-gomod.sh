#!/usr/bin/env bash
# Regenerates tests/cluster/{k8s,etcd}/go.mod and go.sum from versions.env.
#
# k8s.io/kubernetes is not meant to be imported: its go.mod requires every staging
# module (k8s.io/api, k8s.io/client-go, ...) at v0.0.0 and points them at ./staging
# with replace directives, which are ignored for dependencies. So the k8s module here
# carries its own replace directive for each of them, pinned to the published
# v0.<minor>.<patch> tag that matches the release.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
# shellcheck source=/dev/null
. "$here/versions.env"
export PATH="$PATH:/usr/local/go/bin" GOTOOLCHAIN=local GOFLAGS=-mod=mod

staging_version="v0.${KUBERNETES_VERSION#v1.}"
go_line="$(go env GOVERSION | sed -E 's/^go([0-9]+\.[0-9]+).*/\1/').0"

# --- Kubernetes: kube-apiserver and kubectl -------------------------------------------
kmod="$(cd "$here/k8s" && go mod download -json "k8s.io/kubernetes@$KUBERNETES_VERSION" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')"
{
  echo "module calico-kube-controllers.test/cluster/k8s"
  echo
  echo "go $go_line"
  echo
  echo "require k8s.io/kubernetes $KUBERNETES_VERSION"
  echo
  echo "replace ("
  sed -n '/^replace (/,/^)/p' "$kmod" | grep -E '=> \./staging/' | awk -v v="$staging_version" '{printf "\t%s => %s %s\n", $1, $1, v}'
  echo ")"
  echo
  echo "tool ("
  echo "	k8s.io/kubernetes/cmd/kube-apiserver"
  echo "	k8s.io/kubernetes/cmd/kubectl"
  echo ")"
} > "$here/k8s/go.mod"
# sample-* modules are never required; drop replaces that name modules which are not published.
(cd "$here/k8s" && rm -f go.sum && go mod tidy)

# --- etcd server and etcdctl --------------------------------------------------------------
{
  echo "module calico-kube-controllers.test/cluster/etcd"
  echo
  echo "go $go_line"
  echo
  echo "require ("
  echo "	go.etcd.io/etcd/server/v3 $ETCD_VERSION"
  echo "	go.etcd.io/etcd/etcdctl/v3 $ETCD_VERSION"
  echo ")"
  echo
  echo "tool ("
  echo "	go.etcd.io/etcd/server/v3"
  echo "	go.etcd.io/etcd/etcdctl/v3"
  echo ")"
} > "$here/etcd/go.mod"
(cd "$here/etcd" && rm -f go.sum && go mod tidy)
echo "regenerated go.mod/go.sum for kubernetes $KUBERNETES_VERSION (staging $staging_version), etcd $ETCD_VERSION"
