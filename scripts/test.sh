#!/usr/bin/env bash
# Every test of the project, as a new user and CI run it. Each stage prints how long it took:
#   stage NAME: N s
# Stages: the pure-core build (no kube, no tokio), lints, the test-cluster binaries (built once from
# their Go modules, then cached), unit + property + scenario + end-to-end tests (the end-to-end ones
# start real kube-apiserver + etcd clusters through scripts/test-cluster.sh and stop them), a small
# `simulate` whose independent checker must pass, the image (a static binary assembled into an OCI
# layout, then checked: config, files, the binary from it run as UID 999, and in-cluster as a
# container would run it), the fuzz targets (built and smoke-run), and the criterion benches
# (compiled, not run).
#
# Environment: CALICO_CRDS_DIR=DIR installs Calico's own CRDs into the test clusters instead of
# ours (CI points it at ../shared/calico-crds); FUZZ_SECONDS (default 20) per fuzz target.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH:/usr/local/go/bin"

declare -a SUMMARY=()
stage() {
  local name="$1"
  shift
  local start end
  start=$(date +%s)
  echo "=== stage $name: $*"
  "$@"
  end=$(date +%s)
  echo "stage $name: $((end - start)) s"
  SUMMARY+=("$(printf '%-14s %5d s' "$name" $((end - start)))")
}

need_packages() {
  local missing=()
  command -v openssl >/dev/null || missing+=(openssl)
  command -v cc >/dev/null || missing+=(build-essential)
  command -v jq >/dev/null || missing+=(jq)
  command -v file >/dev/null || missing+=(file)
  if [ "${#missing[@]}" -gt 0 ]; then
    echo "installing ${missing[*]}"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
}

core_build() { cargo build --no-default-features --lib; }
# Under `set -o pipefail` a reader that leaves early (`head`, `grep -q`) kills the writer with
# SIGPIPE and the pipeline fails with 141 when the writer had more to say: CI once died so.
early_exit_pipes() {
  local hits
  hits="$(grep -nE '\|[[:space:]]*(head|grep[[:space:]]+-[a-zA-Z]*q)' .ci/run scripts/*.sh deploy/*.sh || true)"
  if [ -n "$hits" ]; then
    echo "a pipe into head or grep -q (use sed -n 1p / grep >/dev/null):"
    echo "$hits"
    return 1
  fi
}
lint() {
  early_exit_pipes
  if cargo clippy --version >/dev/null 2>&1; then
    cargo clippy --no-default-features --lib --tests -- -D warnings
  else
    echo "clippy not installed: skipped"
  fi
}
cluster_bins() { scripts/test-cluster.sh build; }
tests() { cargo test --lib --bins --tests; }
simulate() {
  cargo build --bin calico-kube-controllers
  target/debug/calico-kube-controllers simulate --nodes 200 --pods-per-node 20 --repeats 1
}
image() {
  local layout
  layout="$(deploy/build-image.sh | tail -n 1)"
  # The in-cluster check chroots as UID 999, which needs root (CI is root).
  if [ "$(id -u)" = 0 ]; then deploy/check-image.sh "$layout" --cluster; else deploy/check-image.sh "$layout"; fi
}
fuzz() { scripts/fuzz-smoke.sh; }
benches() { cargo bench --no-run; }

total_start=$(date +%s)
stage packages need_packages
stage core-build core_build
stage lint lint
stage cluster-bins cluster_bins
stage tests tests
stage simulate simulate
stage image image
stage fuzz fuzz
stage benches benches
echo
echo "stage times:"
printf '  %s\n' "${SUMMARY[@]}"
echo "  total          $(( $(date +%s) - total_start )) s"
