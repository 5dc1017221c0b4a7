#!/usr/bin/env bash
# Starts and stops throwaway Kubernetes API servers for the end-to-end tests.
#
#   test-cluster.sh start DIR [--owner-pid PID]   start a cluster; prints DIR/kubeconfig and DIR/etcd-endpoints
#   test-cluster.sh stop DIR                       stop the processes started for DIR (nothing else)
#   test-cluster.sh env DIR                        print `export KUBECONFIG=...` and `export ETCD_ENDPOINTS=...`
#   test-cluster.sh restart DIR apiserver|etcd|calico-etcd   stop and start one component, same data and ports
#   test-cluster.sh build                          build (or reuse) the binaries, then the tools; prints both directories
#   test-cluster.sh build-tools                    build (or reuse) only helm, promtool and the monitoring CRDs
#
# A cluster is: one etcd for kube-apiserver (plain HTTP on loopback), kube-apiserver (TLS, client
# certificates, Node+RBAC, service-account tokens, audit log), the Calico CRDs, and a second etcd
# for Calico's etcd datastore mode (TLS with client certificates, under DIR/calico-etcd/).
# Everything listens on 127.0.0.1 ports reserved for DIR; several clusters can run side by side.
#
# What is deliberately missing: no kubelet, scheduler or controller-manager. Consequences tests must
# live with:
#   * New namespaces get no `default` ServiceAccount (the controller-manager makes it). The
#     ServiceAccount admission plugin stays on, so a pod is refused until its ServiceAccount exists:
#     tests create it.
#   * Nothing schedules or runs pods; tests set `spec.nodeName` themselves and write pod status
#     through the `/status` subresource.
#   * Deleting a pod bound to a node only sets deletionTimestamp (the kubelet would finish it); it
#     stays Terminating unless deleted with gracePeriodSeconds=0.
#   * Deleted namespaces stay Terminating; no garbage collection of owned objects; no node lifecycle.
#
# With --owner-pid PID (or CKC_TEST_OWNER_PID), a watchdog stops the cluster when PID exits, however
# it exits (panic, SIGKILL). Binaries are built from tests/cluster/ once per version set and cached in
# ${XDG_CACHE_HOME:-$HOME/.cache}/calico-kube-controllers/bin-<key>/; DIR/bin links to them. The
# deploy/ tests' tools (helm, promtool; the prometheus-operator CRDs in DIR/monitoring-crds) are
# built from tests/cluster/tools/ into .../tools-<key>/ and linked the same way.
#
# stdout carries only what a verb promises; diagnostics go to DIR/logs/ and failures to stderr as
# one line.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
self="$repo/scripts/test-cluster.sh"
cluster_src="$repo/tests/cluster"
cache_root="${XDG_CACHE_HOME:-$HOME/.cache}/calico-kube-controllers"
export PATH="$PATH:/usr/local/go/bin"

die() {
  echo "test-cluster: $*" >&2
  exit 1
}

# shellcheck source=../tests/cluster/versions.env
. "$cluster_src/versions.env"
# shellcheck source=../tests/cluster/tools/versions.env
. "$cluster_src/tools/versions.env"

# --- binaries ----------------------------------------------------------------------------------

bin_key() {
  local gover sum
  command -v go >/dev/null || die "go not found (looked in PATH and /usr/local/go/bin); it builds the test binaries"
  gover="$(go env GOVERSION)"
  # The key covers the pinned modules and this script's build recipe (BUILD_RECIPE in versions.env).
  sum="$(cat "$cluster_src/versions.env" "$cluster_src/k8s/go.mod" "$cluster_src/k8s/go.sum" "$cluster_src/etcd/go.mod" "$cluster_src/etcd/go.sum" |
    sha256sum | cut -c1-12)"
  echo "k8s${KUBERNETES_VERSION#v}-etcd${ETCD_VERSION#v}-${gover}-${sum}"
}

# Prints the directory holding etcd, etcdctl, kube-apiserver and kubectl, building them first if
# needed. A lock makes parallel callers wait for one build instead of racing.
ensure_bins() {
  local dir lock tmp log start
  dir="$cache_root/bin-$(bin_key)"
  if [[ -x "$dir/kube-apiserver" ]]; then
    echo "$dir"
    return
  fi
  mkdir -p "$cache_root"
  lock="$cache_root/build.lock"
  exec 9>"$lock"
  flock 9
  if [[ ! -x "$dir/kube-apiserver" ]]; then
    tmp="$dir.partial"
    log="$cache_root/build-$(bin_key).log"
    rm -rf "$tmp"
    mkdir -p "$tmp"
    echo "test-cluster: building kube-apiserver $KUBERNETES_VERSION, kubectl, etcd $ETCD_VERSION (first run only; log: $log)" >&2
    start=$SECONDS
    # -trimpath and -s -w keep the build cache and binaries small; CGO off needs no C toolchain.
    if ! (
      export GOTOOLCHAIN=local GOFLAGS="-trimpath -mod=readonly" CGO_ENABLED=0
      cd "$cluster_src/etcd"
      go build -ldflags='-s -w' -o "$tmp/etcd" go.etcd.io/etcd/server/v3
      go build -ldflags='-s -w' -o "$tmp/etcdctl" go.etcd.io/etcd/etcdctl/v3
      # Kubernetes stamps its version at link time (otherwise it reports v0.0.0-master, which
      # kubectl refuses to parse).
      minor="${KUBERNETES_VERSION#v1.}"
      minor="${minor%%.*}"
      ldflags="-s -w"
      for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
        ldflags+=" -X $pkg.gitVersion=$KUBERNETES_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
        ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
      done
      cd "$cluster_src/k8s"
      go build -ldflags="$ldflags" -o "$tmp/kube-apiserver" k8s.io/kubernetes/cmd/kube-apiserver
      go build -ldflags="$ldflags" -o "$tmp/kubectl" k8s.io/kubernetes/cmd/kubectl
    ) >"$log" 2>&1; then
      rm -rf "$tmp"
      flock -u 9
      die "building the test binaries failed: $(tail -n 3 "$log" | tr '\n' ' ')"
    fi
    mv "$tmp" "$dir"
    echo "test-cluster: built in $((SECONDS - start)) s into $dir" >&2
  fi
  flock -u 9
  exec 9>&-
  echo "$dir"
}

# The chart and alert tools the deploy/ tests use: helm and promtool from their Go modules
# (tests/cluster/tools/{helm,promtool}), and the prometheus-operator CRDs (ServiceMonitor,
# PrometheusRule) read from that module's example/ folder in the module cache. Cached apart from
# the cluster binaries (own key, lock and build log), so bumping one never rebuilds the other.
tools_key() {
  local sum
  sum="$(cat "$cluster_src/tools/versions.env" "$cluster_src"/tools/*/go.mod "$cluster_src"/tools/*/go.sum | sha256sum | cut -c1-12)"
  echo "tools-$(go env GOVERSION)-${sum}"
}

ensure_tools() {
  local dir lock tmp log start crds
  command -v go >/dev/null || die "go not found (looked in PATH and /usr/local/go/bin); it builds the test tools"
  dir="$cache_root/$(tools_key)"
  if [[ -x "$dir/helm" && -x "$dir/promtool" ]]; then
    echo "$dir"
    return
  fi
  mkdir -p "$cache_root"
  lock="$cache_root/tools.lock"
  exec 8>"$lock"
  flock 8
  if [[ ! -x "$dir/helm" || ! -x "$dir/promtool" ]]; then
    tmp="$dir.partial"
    log="$cache_root/build-$(tools_key).log"
    rm -rf "$tmp"
    mkdir -p "$tmp/monitoring-crds"
    echo "test-cluster: building helm $HELM_VERSION, promtool $PROMETHEUS_VERSION (first run only; log: $log)" >&2
    start=$SECONDS
    # Same flags as the cluster binaries; only the two commands are built, nothing else of
    # either module. The CRDs come from the module cache, checked against go.sum.
    if ! (
      export GOTOOLCHAIN=local GOFLAGS="-trimpath -mod=readonly" CGO_ENABLED=0
      set -x
      cd "$cluster_src/tools/helm"
      # As helm's Makefile stamps them: its version, and the Kubernetes version of its client-go
      # (the default for .Capabilities and lint's deprecation checks; else v1.20).
      k8s_minor="$(sed -n 's/^[[:space:]]*k8s.io\/client-go v0\.\([0-9]*\)\..*/\1/p' go.mod)"
      hflags="-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION"
      for pkg in helm.sh/helm/v3/pkg/lint/rules helm.sh/helm/v3/pkg/chartutil; do
        hflags+=" -X $pkg.k8sVersionMajor=1 -X $pkg.k8sVersionMinor=$k8s_minor"
      done
      go build -ldflags="$hflags" -o "$tmp/helm" helm.sh/helm/v3/cmd/helm
      cd "$cluster_src/tools/promtool"
      # remove_all_sd: no service-discovery plugins (cloud SDKs, a Kubernetes client); rule
      # checks and rule tests need none, and they are most of promtool's build.
      go build -tags remove_all_sd -ldflags='-s -w' -o "$tmp/promtool" github.com/prometheus/prometheus/cmd/promtool
      cd "$cluster_src/tools/monitoring-crds"
      crds="$(go mod download -json "github.com/prometheus-operator/prometheus-operator@$PROMETHEUS_OPERATOR_VERSION" |
        sed -n 's/.*"Dir": "\(.*\)".*/\1/p')"
      [[ -n "$crds" ]]
      for kind in servicemonitors prometheusrules; do
        cp "$crds/example/prometheus-operator-crd/monitoring.coreos.com_$kind.yaml" "$tmp/monitoring-crds/"
      done
    ) >"$log" 2>&1; then
      rm -rf "$tmp"
      flock -u 8
      die "building the test tools failed: $(tail -n 3 "$log" | tr '\n' ' ')"
    fi
    mv "$tmp" "$dir"
    echo "test-cluster: tools built in $((SECONDS - start)) s into $dir" >&2
  fi
  flock -u 8
  exec 8>&-
  echo "$dir"
}

# --- ports ---------------------------------------------------------------------------------------

# A port is reserved for a cluster by creating $cache_root/ports/PORT (mkdir is atomic, so two
# starts never take the same port) and listing it in DIR/ports.env. A reservation whose DIR no
# longer lists it is stale and is taken over. Candidates come from below Linux's ephemeral range
# (32768+) so outgoing connections cannot occupy them between reservation and bind.
port_free() {
  ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# Claims PORT for DIR: true if it is now reserved for DIR and nothing listens on it.
claim_port() {
  local dir="$1" port="$2" owner
  port_free "$port" || return 1
  if ! mkdir "$cache_root/ports/$port" 2>/dev/null; then
    owner="$(cat "$cache_root/ports/$port/owner" 2>/dev/null || true)"
    [[ "$owner" == "$dir" ]] && return 0
    if [[ -n "$owner" && -f "$owner/ports.env" ]] && grep -q "=$port\$" "$owner/ports.env"; then
      return 1
    fi
    # Stale (its cluster is gone) or being created this instant; only take it over when stale
    # for a while, so a reservation in the middle of being written is never stolen.
    [[ -n "$(find "$cache_root/ports/$port" -maxdepth 0 -mmin +1 2>/dev/null)" ]] || return 1
    rm -rf "$cache_root/ports/$port"
    mkdir "$cache_root/ports/$port" 2>/dev/null || return 1
  fi
  echo "$dir" >"$cache_root/ports/$port/owner"
}

reserve_port() {
  local dir="$1" port tries
  for tries in $(seq 1 200); do
    port=$((20000 + (RANDOM * 32768 + RANDOM) % 12000))
    if claim_port "$dir" "$port"; then
      echo "$port"
      return
    fi
  done
  die "no free port found on 127.0.0.1 after 200 tries"
}

# Reserves the five ports of DIR, keeping those of an earlier start when they are still free.
reserve_ports() {
  local dir="$1" name port ok=true
  mkdir -p "$cache_root/ports"
  if [[ -f "$dir/ports.env" ]]; then
    while IFS='=' read -r name port; do
      claim_port "$dir" "$port" || ok=false
    done <"$dir/ports.env"
    $ok && return 0
    release_ports "$dir"
  fi
  {
    echo "ETCD_PORT=$(reserve_port "$dir")"
    echo "ETCD_PEER_PORT=$(reserve_port "$dir")"
    echo "APISERVER_PORT=$(reserve_port "$dir")"
    echo "CALICO_ETCD_PORT=$(reserve_port "$dir")"
    echo "CALICO_ETCD_PEER_PORT=$(reserve_port "$dir")"
  } >"$dir/ports.env.tmp"
  mv "$dir/ports.env.tmp" "$dir/ports.env"
}

release_ports() {
  local dir="$1" port
  [[ -f "$dir/ports.env" ]] || return 0
  while IFS='=' read -r _ port; do
    [[ "$(cat "$cache_root/ports/$port/owner" 2>/dev/null || true)" == "$dir" ]] && rm -rf "$cache_root/ports/$port"
  done <"$dir/ports.env"
  return 0
}

# --- processes -----------------------------------------------------------------------------------

# True if the pid file names a live process that was started for this DIR (its command line
# mentions DIR), so a recycled pid never gets a signal from us.
ours() {
  local dir="$1" name="$2" pid
  pid="$(cat "$dir/pids/$name.pid" 2>/dev/null)" || return 1
  [[ -n "$pid" && -r "/proc/$pid/cmdline" ]] || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" | grep -F -- "$dir" >/dev/null
}

# Starts a detached process (own session, no inherited stdio, so a caller capturing our output or
# sending Ctrl-C to its process group does not hold or kill it).
launch() {
  local dir="$1" name="$2"
  shift 2
  mkdir -p "$dir/pids" "$dir/logs"
  setsid "$@" </dev/null >>"$dir/logs/$name.log" 2>&1 &
  echo $! >"$dir/pids/$name.pid"
}

log_tail() {
  tail -n 2 "$1" 2>/dev/null | cut -c1-400 | tr '\n' ' '
}

# Stops the named components together (their data is disposable, so there is no point in
# ordering them: each takes about 2 s to shut down cleanly), escalating to SIGKILL after 10 s.
stop_components() {
  local dir="$1" name pid pids=() i
  shift
  for name in "$@"; do
    if ours "$dir" "$name"; then
      pid="$(cat "$dir/pids/$name.pid")"
      kill -TERM "$pid" 2>/dev/null || true
      pids+=("$pid")
    fi
  done
  for i in $(seq 1 100); do
    alive "${pids[@]}" || break
    sleep 0.1
  done
  if alive "${pids[@]}"; then
    kill -KILL "${pids[@]}" 2>/dev/null || true
    while alive "${pids[@]}"; do sleep 0.05; done
  fi
  for name in "$@"; do rm -f "$dir/pids/$name.pid"; done
}

# True while any of the pids is a running (not zombie) process.
alive() {
  local pid state
  for pid in "$@"; do
    state="$(cut -d' ' -f3 "/proc/$pid/stat" 2>/dev/null)" || continue
    [[ "$state" != Z ]] && return 0
  done
  return 1
}

# Polls until CHECK succeeds; fails with the tail of NAME's log if NAME's process dies first.
wait_for() {
  local dir="$1" name="$2" seconds="$3" what="$4"
  shift 4
  local deadline=$((SECONDS + seconds))
  until "$@" >>"$dir/logs/setup.log" 2>&1; do
    if ! ours "$dir" "$name"; then
      grep -q "address already in use" "$dir/logs/$name.log" 2>/dev/null && retry_start_elsewhere "$dir" "$name"
      die "$name exited while waiting for $what: $(log_tail "$dir/logs/$name.log")"
    fi
    ((SECONDS < deadline)) || die "timed out after ${seconds} s waiting for $what (log: $dir/logs/$name.log): $(log_tail "$dir/logs/$name.log")"
    sleep 0.2
  done
}

# A port can be taken between its reservation and the bind by a process outside this harness
# (a listener that does not use the reservations). During `start` only, a component that failed
# to bind makes the start begin again on fresh ports and fresh etcd data, at most three times;
# the failed attempt's logs are kept beside the new ones.
start_attempt="${CKC_START_ATTEMPT:-1}"
start_args=()
retry_start_elsewhere() {
  local dir="$1" name="$2" f
  ((${#start_args[@]})) || return 0
  ((start_attempt < 3)) || return 0
  echo "test-cluster: $name could not bind its port (attempt $start_attempt); starting again on other ports" >&2
  trap - ERR EXIT
  bash "$self" stop "$dir" >/dev/null 2>&1 || true
  rm -f "$dir/ports.env"
  rm -rf "$dir/etcd/data" "$dir/calico-etcd/data"
  for f in "$dir"/logs/*.log; do
    [[ -f "$f" ]] && mv "$f" "${f%.log}.attempt$start_attempt.log"
  done
  CKC_START_ATTEMPT=$((start_attempt + 1)) exec bash "$self" start "${start_args[@]}"
}

# --- certificates ----------------------------------------------------------------------------------

# ECDSA P-256 keys: instant to generate and accepted by kube-apiserver, etcd and rustls.
new_key() {
  openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null
}

new_ca() {
  local out="$1" cn="$2"
  new_key "$out.key"
  openssl req -x509 -new -key "$out.key" -subj "/CN=$cn" -days 3650 -out "$out.crt" 2>/dev/null
}

# new_cert OUT CA SUBJECT EXTENSIONS
new_cert() {
  local out="$1" ca="$2" subject="$3" ext="$4"
  new_key "$out.key"
  openssl req -new -key "$out.key" -subj "$subject" -out "$out.csr" 2>/dev/null
  printf '%b\n' "$ext" >"$out.ext"
  openssl x509 -req -in "$out.csr" -CA "$ca.crt" -CAkey "$ca.key" -CAcreateserial -days 3650 \
    -extfile "$out.ext" -out "$out.crt" 2>/dev/null
  rm -f "$out.csr" "$out.ext"
}

make_pki() {
  local dir="$1" pki="$1/pki" server_ext client_ext
  [[ -f "$pki/done" ]] && return 0
  command -v openssl >/dev/null || die "openssl not found (Debian: apt-get install openssl)"
  rm -rf "$pki"
  mkdir -p "$pki" "$dir/calico-etcd"
  server_ext='basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,IP:10.96.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local'
  client_ext='basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth'
  new_ca "$pki/ca" "calico-kube-controllers-test-ca"
  new_cert "$pki/apiserver" "$pki/ca" "/CN=kube-apiserver" "$server_ext"
  new_cert "$pki/admin" "$pki/ca" "/O=system:masters/CN=calico-kube-controllers-test-admin" "$client_ext"
  new_key "$pki/service-account.key"
  openssl pkey -in "$pki/service-account.key" -pubout -out "$pki/service-account.pub" 2>/dev/null
  # Calico's etcd has its own CA, as in a real install.
  new_ca "$pki/calico-etcd-ca" "calico-etcd-test-ca"
  # serverAuth and clientAuth, as kubeadm issues etcd server certificates: etcd's v3 JSON gateway
  # (which the etcd backend talks to) dials etcd's own gRPC server presenting this certificate, and
  # with --client-cert-auth a serverAuth-only certificate is refused there (etcd issues 9785, 16590).
  new_cert "$pki/calico-etcd-server" "$pki/calico-etcd-ca" "/CN=calico-etcd" \
    "${server_ext%%extendedKeyUsage*}extendedKeyUsage=serverAuth,clientAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost"
  new_cert "$pki/calico-etcd-client" "$pki/calico-etcd-ca" "/CN=calico-kube-controllers" "$client_ext"
  cp "$pki/calico-etcd-ca.crt" "$dir/calico-etcd/ca.crt"
  cp "$pki/calico-etcd-client.crt" "$dir/calico-etcd/client.crt"
  cp "$pki/calico-etcd-client.key" "$dir/calico-etcd/client.key"
  chmod 600 "$pki"/*.key "$dir/calico-etcd/client.key"
  touch "$pki/done"
}

write_kubeconfig() {
  local dir="$1" port="$2"
  cat >"$dir/kubeconfig.tmp" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: test
  cluster:
    server: https://127.0.0.1:$port
    certificate-authority-data: $(base64 -w0 <"$dir/pki/ca.crt")
users:
- name: admin
  user:
    client-certificate-data: $(base64 -w0 <"$dir/pki/admin.crt")
    client-key-data: $(base64 -w0 <"$dir/pki/admin.key")
contexts:
- name: test
  context:
    cluster: test
    user: admin
    namespace: default
current-context: test
EOF
  mv "$dir/kubeconfig.tmp" "$dir/kubeconfig"
}

# --- components ----------------------------------------------------------------------------------

# etcd tuned for tests: no fsync (data is disposable), quiet logs, and short raft timers so the
# single member elects itself in ~0.1 s instead of ~1 s (loopback has no latency to allow for).
start_etcd_process() {
  local dir="$1" name="$2" data="$3" client_url="$4" peer_port="$5"
  shift 5
  launch "$dir" "$name" "$bins/etcd" --name "$name" --data-dir "$data" \
    --listen-client-urls "$client_url" --advertise-client-urls "$client_url" \
    --listen-peer-urls "http://127.0.0.1:$peer_port" --initial-advertise-peer-urls "http://127.0.0.1:$peer_port" \
    --initial-cluster "$name=http://127.0.0.1:$peer_port" --initial-cluster-state new \
    --heartbeat-interval 10 --election-timeout 100 \
    --unsafe-no-fsync --log-level warn --snapshot-count 10000 "$@"
}

launch_etcd() {
  start_etcd_process "$1" etcd "$1/etcd/data" "http://127.0.0.1:$ETCD_PORT" "$ETCD_PEER_PORT"
}

wait_etcd() {
  local dir="$1"
  wait_for "$dir" etcd 30 "etcd to be healthy" \
    "$bins/etcdctl" --endpoints "http://127.0.0.1:$ETCD_PORT" --command-timeout 2s endpoint health
}

launch_calico_etcd() {
  local dir="$1" pki="$1/pki"
  start_etcd_process "$dir" calico-etcd "$dir/calico-etcd/data" "https://127.0.0.1:$CALICO_ETCD_PORT" "$CALICO_ETCD_PEER_PORT" \
    --cert-file "$pki/calico-etcd-server.crt" --key-file "$pki/calico-etcd-server.key" \
    --client-cert-auth --trusted-ca-file "$pki/calico-etcd-ca.crt"
}

wait_calico_etcd() {
  local dir="$1"
  wait_for "$dir" calico-etcd 30 "Calico's etcd to be healthy" \
    "$bins/etcdctl" --endpoints "https://127.0.0.1:$CALICO_ETCD_PORT" --command-timeout 2s \
    --cacert "$dir/calico-etcd/ca.crt" --cert "$dir/calico-etcd/client.crt" --key "$dir/calico-etcd/client.key" \
    endpoint health
}

launch_apiserver() {
  local dir="$1" pki="$1/pki"
  # Metadata for every request, one event per request (RequestReceived would double them).
  cat >"$dir/audit-policy.yaml" <<'EOF'
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived]
rules:
- level: Metadata
EOF
  # --endpoint-reconciler-type none: the reconciler refuses a loopback advertise address, and the
  # `kubernetes` Service needs no endpoints when nothing runs in the cluster.
  # Dual-stack Service ranges (IPv4 first, so the `kubernetes` Service keeps 10.96.0.1): without an
  # IPv6 range the API server refuses RequireDualStack and IPv6-only Services, which the
  # LoadBalancer tests create.
  launch "$dir" kube-apiserver "$bins/kube-apiserver" \
    --etcd-servers "http://127.0.0.1:$ETCD_PORT" \
    --bind-address 127.0.0.1 --advertise-address 127.0.0.1 --secure-port "$APISERVER_PORT" \
    --tls-cert-file "$pki/apiserver.crt" --tls-private-key-file "$pki/apiserver.key" \
    --client-ca-file "$pki/ca.crt" \
    --service-account-issuer "https://kubernetes.default.svc.cluster.local" \
    --service-account-key-file "$pki/service-account.pub" \
    --service-account-signing-key-file "$pki/service-account.key" \
    --service-cluster-ip-range 10.96.0.0/16,fd00:10:96::/108 \
    --endpoint-reconciler-type none \
    --authorization-mode Node,RBAC \
    --audit-log-path "$dir/audit.log" --audit-policy-file "$dir/audit-policy.yaml" \
    --audit-log-maxsize 200 --audit-log-maxbackup 1 \
    --profiling=false --v=0
}

wait_apiserver() {
  local dir="$1"
  wait_for "$dir" kube-apiserver 90 "kube-apiserver /readyz" \
    "$bins/kubectl" --kubeconfig "$dir/kubeconfig" --request-timeout 5s get --raw /readyz
}

crd_files() {
  local src="$1" f
  for f in "$src"/*.yaml "$src"/*.yml; do
    [[ -f "$f" ]] && printf '%s\n' "$f"
  done
  return 0
}

install_crds() {
  local dir="$1" src="${CALICO_CRDS_DIR:-$cluster_src/crds}" args=() f names
  [[ -d "$src" ]] || die "CRD folder $src does not exist"
  while IFS= read -r f; do args+=(-f "$f"); done < <(crd_files "$src")
  ((${#args[@]} > 0)) || die "no CRD files (*.yaml, *.yml) in $src"
  # Server-side apply: idempotent on restart, and no last-applied annotation (Calico's largest
  # CRDs would not fit in one).
  names="$("$bins/kubectl" --kubeconfig "$dir/kubeconfig" apply --server-side --force-conflicts -o name "${args[@]}" 2>"$dir/logs/crds.err")" ||
    die "installing CRDs from $src failed: $(log_tail "$dir/logs/crds.err")"
  # shellcheck disable=SC2086
  "$bins/kubectl" --kubeconfig "$dir/kubeconfig" wait --for condition=Established --timeout 60s $names \
    >>"$dir/logs/setup.log" 2>"$dir/logs/crds.err" ||
    die "CRDs from $src did not become Established: $(log_tail "$dir/logs/crds.err")"
  echo "$src" >"$dir/crds-source"
}

# The marker tells tests that a cluster was made by this harness (see CKC_TEST_KUBECONFIG).
create_marker() {
  local dir="$1"
  wait_for "$dir" kube-apiserver 30 "the kube-system namespace" \
    "$bins/kubectl" --kubeconfig "$dir/kubeconfig" get namespace kube-system
  "$bins/kubectl" --kubeconfig "$dir/kubeconfig" -n kube-system create configmap calico-kube-controllers-test-cluster \
    --from-literal "dir=$dir" --from-literal "kubernetes=$KUBERNETES_VERSION" --from-literal "etcd=$ETCD_VERSION" \
    --from-literal "crds=$(cat "$dir/crds-source")" --dry-run=client -o yaml |
    "$bins/kubectl" --kubeconfig "$dir/kubeconfig" apply --server-side --force-conflicts -f - >>"$dir/logs/setup.log" 2>&1 ||
    die "creating the marker ConfigMap failed (see $dir/logs/setup.log)"
}

load_ports() {
  # shellcheck source=/dev/null
  . "$1/ports.env"
}

# --- watchdog ------------------------------------------------------------------------------------

# Stops the cluster once the owner process is gone. The owner is identified by pid and start time,
# so a recycled pid is not mistaken for it.
start_watchdog() {
  local dir="$1" owner="$2" started
  [[ -r "/proc/$owner/stat" ]] || die "owner process $owner does not exist"
  started="$(cut -d' ' -f22 "/proc/$owner/stat")"
  launch "$dir" watchdog bash "$self" _watchdog "$dir" "$owner" "$started"
}

watchdog() {
  local dir="$1" owner="$2" started="$3"
  while [[ "$(cut -d' ' -f22 "/proc/$owner/stat" 2>/dev/null || true)" == "$started" ]]; do
    sleep 1
  done
  echo "$(date -u +%FT%TZ) owner $owner exited; stopping $dir"
  rm -f "$dir/pids/watchdog.pid"
  exec bash "$self" stop "$dir"
}

# --- verbs ---------------------------------------------------------------------------------------

abs_dir() {
  [[ -n "${1:-}" ]] || die "missing DIR argument"
  mkdir -p "$1"
  (cd "$1" && pwd)
}

cmd_start() {
  local dir owner="${CKC_TEST_OWNER_PID:-}" name tools
  start_args=("$@")
  dir="$(abs_dir "${1:-}")"
  shift
  while (($#)); do
    case "$1" in
      --owner-pid) owner="${2:?--owner-pid needs a pid}"; shift 2 ;;
      *) die "unknown option for start: $1" ;;
    esac
  done
  for name in kube-apiserver etcd calico-etcd; do
    ours "$dir" "$name" && die "a cluster is already running in $dir ($name); stop it first"
  done
  bins="$(ensure_bins)" || exit 1
  mkdir -p "$dir/logs" "$dir/pids" "$dir/etcd" "$dir/calico-etcd" "$dir/bin"
  : >"$dir/logs/setup.log"
  for name in kubectl etcdctl etcd kube-apiserver; do ln -sfn "$bins/$name" "$dir/bin/$name"; done
  tools="$(ensure_tools)" || exit 1
  for name in helm promtool; do ln -sfn "$tools/$name" "$dir/bin/$name"; done
  ln -sfn "$tools/monitoring-crds" "$dir/monitoring-crds"

  # From here on, a failure stops whatever this start launched.
  trap 'bash "$self" stop "$dir" >/dev/null 2>&1 || true' ERR EXIT

  reserve_ports "$dir"
  load_ports "$dir"
  make_pki "$dir"
  write_kubeconfig "$dir" "$APISERVER_PORT"
  echo "http://127.0.0.1:$ETCD_PORT" >"$dir/etcd-endpoints"
  echo "https://127.0.0.1:$CALICO_ETCD_PORT" >"$dir/calico-etcd/endpoints"

  if [[ -n "$owner" ]]; then start_watchdog "$dir" "$owner"; fi
  # All three at once: kube-apiserver retries until its etcd answers.
  launch_etcd "$dir"
  launch_calico_etcd "$dir"
  launch_apiserver "$dir"
  wait_etcd "$dir"
  wait_calico_etcd "$dir"
  wait_apiserver "$dir"
  install_crds "$dir"
  create_marker "$dir"
  trap - ERR EXIT
  echo "$dir/kubeconfig"
  echo "$dir/etcd-endpoints"
}

cmd_stop() {
  local dir="${1:-}" name
  [[ -n "$dir" ]] || die "missing DIR argument"
  [[ -d "$dir" ]] || die "$dir does not exist"
  dir="$(cd "$dir" && pwd)"
  stop_components "$dir" kube-apiserver etcd calico-etcd
  # The watchdog runs this verb itself (by exec) when its owner exits; it removed its pid file
  # first, so this only stops a watchdog whose owner is still alive.
  stop_components "$dir" watchdog
  release_ports "$dir"
}

cmd_env() {
  local dir
  dir="$(abs_dir "${1:-}")"
  [[ -f "$dir/kubeconfig" && -f "$dir/etcd-endpoints" ]] || die "no cluster files in $dir (run start first)"
  printf 'export KUBECONFIG=%q\n' "$dir/kubeconfig"
  printf 'export ETCD_ENDPOINTS=%q\n' "$(cat "$dir/etcd-endpoints")"
}

cmd_restart() {
  local dir component="${2:-}"
  dir="$(abs_dir "${1:-}")"
  [[ -f "$dir/ports.env" ]] || die "no cluster in $dir (run start first)"
  load_ports "$dir"
  bins="$(ensure_bins)" || exit 1
  case "$component" in
    apiserver)
      stop_components "$dir" kube-apiserver
      launch_apiserver "$dir"
      wait_apiserver "$dir"
      ;;
    etcd)
      stop_components "$dir" etcd
      launch_etcd "$dir"
      wait_etcd "$dir"
      # The apiserver reconnects by itself; wait until it serves again.
      if ours "$dir" kube-apiserver; then
        wait_for "$dir" kube-apiserver 60 "kube-apiserver /readyz after the etcd restart" \
          "$bins/kubectl" --kubeconfig "$dir/kubeconfig" --request-timeout 5s get --raw /readyz
      fi
      ;;
    calico-etcd)
      stop_components "$dir" calico-etcd
      launch_calico_etcd "$dir"
      wait_calico_etcd "$dir"
      ;;
    *) die "restart needs a component: apiserver, etcd or calico-etcd" ;;
  esac
}

verb="${1:-}"
(($#)) && shift
case "$verb" in
  start) cmd_start "$@" ;;
  stop) cmd_stop "$@" ;;
  env) cmd_env "$@" ;;
  restart) cmd_restart "$@" ;;
  build) ensure_bins && ensure_tools ;;
  build-tools) ensure_tools ;;
  _watchdog) watchdog "$@" ;;
  *) die "usage: test-cluster.sh start DIR [--owner-pid PID] | stop DIR | env DIR | restart DIR apiserver|etcd|calico-etcd | build | build-tools" ;;
esac
