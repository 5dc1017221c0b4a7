#!/usr/bin/env bash
# Checks a built image (an OCI layout from deploy/build-image.sh), not the Dockerfile's text:
#   1. the layout's blobs match their digests; the config runs as 999:0 with the binary as
#      ENTRYPOINT and carries the source/version/revision labels;
#   2. deploy/Dockerfile's final stage says the same (FROM scratch, one COPY of the staged root
#      filesystem, USER, ENTRYPOINT, ENV, LABEL keys) as the image's config;
#   3. the layer holds exactly the expected entries (types, modes, owners, link targets): no shell,
#      no package manager, nothing else;
#   4. the binary taken from the extracted root filesystem, as UID 999 / GID 0 in a working tree
#      it cannot write, answers `check-status -r` for ready and not-ready status files and runs
#      `simulate --nodes 50` whose independent checker must pass;
#   5. with --cluster: the extracted root filesystem as a container sees it (chroot, UID 999, the
#      kubelet's /etc/hosts and ServiceAccount files added), `calico component kube-controllers
#      --health-port=P` against a real test API server reached as `kubernetes.default.svc` (the
#      static glibc binary resolving a host name through /etc/hosts), until
#      `calico health --port=P --type=readiness` and `check-status -r` both say ready.
# Prints the image and binary sizes. Steps 4 and 5 run as UID 999 and so need root (CI is root).
#
#   deploy/check-image.sh LAYOUT [--cluster]
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$(pwd)"
layout="${1:?usage: $0 LAYOUT [--cluster]}"
with_cluster="${2:-}"
command -v jq >/dev/null || { echo "check-image: jq not found (Debian: apt-get install jq)" >&2; exit 1; }

fail() {
  echo "check-image: FAIL: $*" >&2
  exit 1
}
ok() { echo "check-image: ok: $*"; }
blob() { echo "$layout/blobs/sha256/${1#sha256:}"; }

# --- 1. the layout and the config ----------------------------------------------------------------
[[ "$(jq -r .imageLayoutVersion "$layout/oci-layout")" == 1.0.0 ]] || fail "oci-layout missing or not 1.0.0"
for f in "$layout"/blobs/sha256/*; do
  [[ "$(sha256sum "$f" | cut -d' ' -f1)" == "$(basename "$f")" ]] || fail "blob $(basename "$f") does not match its digest"
done
[[ "$(jq '.manifests | length' "$layout/index.json")" == 1 ]] || fail "index.json must list one manifest"
manifest="$(blob "$(jq -r '.manifests[0].digest' "$layout/index.json")")"
config="$(blob "$(jq -r .config.digest "$manifest")")"
[[ "$(jq '.layers | length' "$manifest")" == 1 ]] || fail "expected one layer"
[[ "$(jq -r '.layers[0].mediaType' "$manifest")" == application/vnd.oci.image.layer.v1.tar+gzip ]] || fail "layer media type"
layer="$(blob "$(jq -r '.layers[0].digest' "$manifest")")"
[[ "$(jq -r '.layers[0].size' "$manifest")" == "$(stat -c %s "$layer")" ]] || fail "layer size in the manifest"
[[ "sha256:$(gzip -dc "$layer" | sha256sum | cut -d' ' -f1)" == "$(jq -r '.rootfs.diff_ids[0]' "$config")" ]] || fail "diff_id does not match the layer"
[[ "$(jq -r .config.User "$config")" == 999:0 ]] || fail "User is $(jq -r .config.User "$config"), want 999:0"
[[ "$(jq -c .config.Entrypoint "$config")" == '["/usr/bin/kube-controllers"]' ]] || fail "Entrypoint is $(jq -c .config.Entrypoint "$config")"
[[ "$(jq -c '.config.Cmd // null' "$config")" == null ]] || fail "a Cmd would be passed to the controller as arguments"
version="$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | sed -n 1p)"
[[ "$(jq -r '.config.Labels["org.opencontainers.image.version"]' "$config")" == "$version" ]] || fail "version label is not $version"
for label in source revision; do
  v="$(jq -r ".config.Labels[\"org.opencontainers.image.$label\"] // empty" "$config")"
  [[ -n "$v" ]] || fail "label org.opencontainers.image.$label missing"
done
ok "layout, digests and config (User 999:0, Entrypoint /usr/bin/kube-controllers, labels)"

# --- 2. the Dockerfile's final stage against the config -------------------------------------------
# The final stage: everything after the last FROM, continuation lines joined, comments dropped.
stage="$(awk '/^FROM /{buf=""} {buf=buf $0 "\n"} END{printf "%s", buf}' deploy/Dockerfile |
  sed -e 's/[[:space:]]*#.*$//' -e '/^[[:space:]]*$/d')"
[[ "$(head -n 1 <<<"$stage")" == "FROM scratch" ]] || fail "Dockerfile's final stage is not FROM scratch"
grep -q '^RUN ' <<<"$stage" && fail "Dockerfile's final stage has a RUN (it has no shell)"
[[ "$(grep '^COPY ' <<<"$stage")" == "COPY --from=build /rootfs/ /" ]] || fail "the final stage must copy only the staged root filesystem"
grep -q 'deploy/stage-rootfs.sh .* /rootfs$' deploy/Dockerfile || fail "the build stage must stage /rootfs with deploy/stage-rootfs.sh"
[[ "$(sed -n 's/^USER //p' <<<"$stage")" == "$(jq -r .config.User "$config")" ]] || fail "Dockerfile USER differs from the image's"
[[ "$(sed -n 's/^ENTRYPOINT //p' <<<"$stage" | jq -c .)" == "$(jq -c .config.Entrypoint "$config")" ]] || fail "Dockerfile ENTRYPOINT differs from the image's"
[[ "$(sed -n 's/^ENV //p' <<<"$stage" | LC_ALL=C sort)" == "$(jq -r '.config.Env[]' "$config" | LC_ALL=C sort)" ]] || fail "Dockerfile ENV differs from the image's"
[[ "$(sed -n 's/^LABEL \([^=]*\)=.*/\1/p' <<<"$stage" | LC_ALL=C sort)" == "$(jq -r '.config.Labels | keys[]' "$config" | LC_ALL=C sort)" ]] ||
  fail "Dockerfile LABEL keys differ from the image's"
# Labels the Dockerfile fixes (not build arguments) must have the same values.
while IFS= read -r line; do
  key="${line%%=*}" value="${line#*=}"
  value="${value#\"}" value="${value%\"}"
  [[ "$value" == *'${'* ]] && continue
  [[ "$(jq -r ".config.Labels[\"$key\"]" "$config")" == "$value" ]] || fail "label $key differs from the Dockerfile's"
done < <(sed -n 's/^LABEL //p' <<<"$stage")
ok "deploy/Dockerfile's final stage agrees with the image (USER, ENTRYPOINT, ENV, LABELs, one COPY)"

# --- 3. exactly the expected files ----------------------------------------------------------------
expected="drwxr-xr-x 0/0 etc/
drwxr-xr-x 0/0 etc/ssl/
drwxr-xr-x 0/0 etc/ssl/certs/
-rw-r--r-- 0/0 etc/ssl/certs/ca-certificates.crt
drwxrwxr-x 999/0 status/
drwxr-xr-x 0/0 usr/
drwxr-xr-x 0/0 usr/bin/
lrwxrwxrwx 0/0 usr/bin/calico -> calico-kube-controllers
-rwxr-xr-x 0/0 usr/bin/calico-kube-controllers
lrwxrwxrwx 0/0 usr/bin/check-status -> calico-kube-controllers
lrwxrwxrwx 0/0 usr/bin/kube-controllers -> calico-kube-controllers"
actual="$(tar -tvzf "$layer" --numeric-owner | awk '{ $3=""; $4=""; $5=""; print }' | sed 's/  */ /g' | LC_ALL=C sort -k3)"
[[ "$actual" == "$expected" ]] || fail "unexpected layer contents:
$actual"
names="$(tar -tzf "$layer" | sed 's#/$##; s#.*/##')"
for forbidden in sh bash dash ash busybox zsh apt apt-get dpkg apk rpm yum dnf microdnf pip; do
  grep -qx "$forbidden" <<<"$names" && fail "$forbidden found in the image"
done
ok "the layer holds only the binary, its three names, the CA bundle and /status (no shell, no package manager)"

# --- 4. the binary from the image, as UID 999 in a read-only working tree --------------------------
work="$(mktemp -d)"
cleanup() {
  if [[ -n "${cluster_dir:-}" ]]; then scripts/test-cluster.sh stop "$cluster_dir" >/dev/null 2>&1 || true; fi
  if [[ -n "${controller_pid:-}" ]]; then kill "$controller_pid" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT
chmod 0755 "$work"
mkdir "$work/rootfs"
tar -xzf "$layer" -C "$work/rootfs" --numeric-owner
bin="$work/rootfs/usr/bin/calico-kube-controllers"
file -b "$bin" | grep -E 'statically linked|static-pie linked' >/dev/null || fail "the image's binary is not static: $(file -b "$bin")"
if [[ "$(id -u)" == 0 ]]; then
  as999=(setpriv --reuid=999 --regid=0 --clear-groups --)
else
  echo "check-image: not root: running the image's binary as $(id -u) instead of 999" >&2
  as999=()
fi
# The status files live outside the tree; the tree itself (root-owned, 0755) is not writable.
mkdir "$work/status"
echo '{"Readiness":{"Startup":{"Ready":true,"Reason":""},"KubeAPIServer":{"Ready":true,"Reason":""}}}' >"$work/status/ready.json"
echo '{"Readiness":{"Startup":{"Ready":true,"Reason":""},"KubeAPIServer":{"Ready":false,"Reason":"apiserver down"}}}' >"$work/status/not-ready.json"
chmod 0555 "$work/status"
run999() { (cd "$work/rootfs" && "${as999[@]}" "$@"); }
if [[ "$(id -u)" == 0 ]]; then
  run999 sh -c 'touch ./probe' 2>/dev/null && fail "UID 999 can write the working tree"
fi
out="$(run999 "$work/rootfs/usr/bin/check-status" -f "$work/status/ready.json" -r)" || fail "check-status -r on a ready file: $out"
[[ "$out" == Ready ]] || fail "check-status -r printed $out"
if out="$(run999 "$work/rootfs/usr/bin/check-status" -f "$work/status/not-ready.json" -r)"; then fail "check-status -r passed a not-ready file"; fi
[[ "$out" == "apiserver down" ]] || fail "check-status -r printed $out for a not-ready file"
ok "check-status -r as UID 999 (Ready / exit 1 with the reason)"
start=$SECONDS
run999 "$work/rootfs/usr/bin/calico-kube-controllers" simulate --nodes 50 --repeats 1 --dirty-samples 10 >"$work/simulate.txt" 2>&1 ||
  fail "simulate --nodes 50 as UID 999: $(tail -n 5 "$work/simulate.txt")"
ok "simulate --nodes 50 as UID 999 in a read-only working tree ($((SECONDS - start)) s; checker passed)"

# --- 5. in the image's filesystem against a real API server -----------------------------------------
if [[ "$with_cluster" == --cluster ]]; then
  [[ "$(id -u)" == 0 ]] || fail "--cluster needs root (chroot)"
  cluster_dir="$work/cluster"
  # sed, not head: head leaves after the first line and the script then dies of SIGPIPE (141).
  kubeconfig="$(scripts/test-cluster.sh start "$cluster_dir" --owner-pid $$ | sed -n 1p)"
  kubectl=("$cluster_dir/bin/kubectl" --kubeconfig "$kubeconfig")
  "${kubectl[@]}" apply -k deploy/base >/dev/null
  token="$("${kubectl[@]}" -n kube-system create token calico-kube-controllers --duration=1h)"
  port="$(sed -n 's#.*server: https://127.0.0.1:##p' "$kubeconfig")"
  # What the kubelet adds to a container: /etc/hosts and the ServiceAccount files. The rest of
  # the tree stays as the image has it (root-owned, read-only for 999; /status is 999's).
  root="$work/rootfs"
  sa="$root/var/run/secrets/kubernetes.io/serviceaccount"
  mkdir -p "$sa"
  printf '127.0.0.1 localhost\n127.0.0.1 kubernetes.default.svc\n' >"$root/etc/hosts"
  printf '%s' "$token" >"$sa/token"
  printf 'kube-system' >"$sa/namespace"
  cp "$cluster_dir/pki/ca.crt" "$sa/ca.crt"
  chmod -R a+rX "$root/var" "$root/etc/hosts"
  health_port=19440
  while (exec 3<>"/dev/tcp/127.0.0.1/$health_port") 2>/dev/null; do health_port=$((health_port + 1)); done
  # `env -i` leaves no PATH, and chroot lives in /usr/sbin: name it by its path.
  chroot_bin="$(command -v chroot)" || fail "chroot not found"
  env -i KUBERNETES_SERVICE_HOST=kubernetes.default.svc KUBERNETES_SERVICE_PORT="$port" \
    POD_NAMESPACE=kube-system POD_NAME=image-check DATASTORE_TYPE=kubernetes ENABLED_CONTROLLERS=node \
    "$chroot_bin" --userspec=999:0 "$root" /usr/bin/calico component kube-controllers --health-port="$health_port" --metrics-port=0 \
    >"$work/controller.log" 2>&1 &
  controller_pid=$!
  ready=""
  for _ in $(seq 1 120); do
    if chroot --userspec=999:0 "$root" /usr/bin/calico health --port="$health_port" --type=readiness >/dev/null 2>&1; then
      ready=yes
      break
    fi
    kill -0 "$controller_pid" 2>/dev/null || fail "the controller exited: $(tail -n 5 "$work/controller.log")"
    sleep 0.5
  done
  [[ -n "$ready" ]] || fail "not ready within 60 s: $(chroot --userspec=999:0 "$root" /usr/bin/calico health --port="$health_port" --type=readiness); log: $(tail -n 5 "$work/controller.log")"
  out="$(chroot --userspec=999:0 "$root" /usr/bin/check-status -r)" || fail "check-status -r in the image: $out"
  out="$(chroot --userspec=999:0 "$root" /usr/bin/calico health --port="$health_port" --type=liveness)" || fail "calico health liveness: $out"
  kill -TERM "$controller_pid"
  wait "$controller_pid" || fail "the controller did not exit cleanly on SIGTERM: $(tail -n 5 "$work/controller.log")"
  controller_pid=""
  ok "in the image's filesystem as 999:0: calico component kube-controllers against kubernetes.default.svc (in-cluster config, /etc/hosts), calico health and check-status -r ready"
fi

image_bytes=$(($(stat -c %s "$manifest") + $(stat -c %s "$config") + $(stat -c %s "$layer")))
echo "check-image: image $image_bytes bytes compressed ($(gzip -dc "$layer" | wc -c) bytes unpacked), binary $(stat -c %s "$bin") bytes"
