#!/usr/bin/env bash
# Assembles deploy/Dockerfile's final stage without a container engine or a registry: the
# host-built static binary and the host's CA bundle laid out by deploy/stage-rootfs.sh, packed
# into one layer, with the stage's config (USER, ENTRYPOINT, ENV, LABELs), written as an OCI
# image layout (oci-layout, index.json, blobs/sha256/). Prints that directory as its last line.
#
#   deploy/build-image.sh [--binary PATH] [--out DIR]
#
# --binary skips the build (default: deploy/build-binary.sh's output); --out defaults to
# target/image/oci. Load it elsewhere with any OCI tool, e.g. `skopeo copy oci:DIR:TAG docker://…`
# or `crane push DIR …`. The layout is reproducible: every timestamp is the commit's time
# (SOURCE_DATE_EPOCH overrides), owners are numeric, entries sorted.
# Environment: CA_BUNDLE (default /etc/ssl/certs/ca-certificates.crt), SOURCE (the source label;
# default the git remote `origin`).
set -euo pipefail
cd "$(dirname "$0")/.."

binary="" out="target/image/oci"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --binary) binary="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    *) echo "usage: $0 [--binary PATH] [--out DIR]" >&2; exit 2 ;;
  esac
done
if [[ -z "$binary" ]]; then
  binary="$(deploy/build-binary.sh | tail -n 1)"
fi
ca="${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}"

version="$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | sed -n 1p)"
revision="$(git rev-parse HEAD 2>/dev/null || echo unknown)"
if ! git diff --quiet HEAD 2>/dev/null; then revision="$revision-dirty"; fi
source="${SOURCE:-$(git remote get-url origin 2>/dev/null || echo unknown)}"
epoch="${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || echo 0)}"
created="$(date -u -d "@$epoch" +%Y-%m-%dT%H:%M:%SZ)"

# A JSON string literal of $1 (labels come from git and the environment).
json() {
  local s="${1//\\/\\\\}"
  s="${s//\"/\\\"}"
  printf '"%s"' "$s"
}

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
deploy/stage-rootfs.sh "$binary" "$ca" "$work/rootfs"

# The layer: root-owned files first, then /status owned by 999:0 (as stage-rootfs.sh does when
# run as root), so no root is needed here. ustar: no per-file atime/ctime headers.
tar_opts=(--format=ustar --numeric-owner --mtime="@$epoch" --sort=name --no-recursion -C "$work/rootfs")
(cd "$work/rootfs" && find usr etc | LC_ALL=C sort) >"$work/root.list"
tar -cf "$work/layer.tar" "${tar_opts[@]}" --owner=0 --group=0 -T "$work/root.list"
tar -rf "$work/layer.tar" "${tar_opts[@]}" --owner=999 --group=0 status
gzip -n -6 <"$work/layer.tar" >"$work/layer.tar.gz"

rm -rf "$out"
mkdir -p "$out/blobs/sha256"
# Moves a file into blobs/ under its digest; prints "sha256:<hex> <size>".
put_blob() {
  local hex size
  hex="$(sha256sum "$1" | cut -d' ' -f1)"
  size="$(stat -c %s "$1")"
  mv "$1" "$out/blobs/sha256/$hex"
  echo "sha256:$hex $size"
}
diff_id="sha256:$(sha256sum "$work/layer.tar" | cut -d' ' -f1)"
read -r layer_digest layer_size < <(put_blob "$work/layer.tar.gz")

# The config: what deploy/Dockerfile's final stage sets.
cat >"$work/config.json" <<EOF
{
  "created": "$created",
  "architecture": "amd64",
  "os": "linux",
  "config": {
    "User": "999:0",
    "Env": ["PATH=/usr/bin", "SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt"],
    "Entrypoint": ["/usr/bin/kube-controllers"],
    "WorkingDir": "/",
    "Labels": {
      "org.opencontainers.image.source": $(json "$source"),
      "org.opencontainers.image.version": $(json "$version"),
      "org.opencontainers.image.revision": $(json "$revision"),
      "org.opencontainers.image.title": "calico-kube-controllers",
      "org.opencontainers.image.licenses": "Apache-2.0"
    }
  },
  "rootfs": {"type": "layers", "diff_ids": ["$diff_id"]},
  "history": [{"created": "$created", "created_by": "deploy/build-image.sh: COPY rootfs (deploy/stage-rootfs.sh) /"}]
}
EOF
read -r config_digest config_size < <(put_blob "$work/config.json")

cat >"$work/manifest.json" <<EOF
{
  "schemaVersion": 2,
  "mediaType": "application/vnd.oci.image.manifest.v1+json",
  "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": "$config_digest", "size": $config_size},
  "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": "$layer_digest", "size": $layer_size}],
  "annotations": {"org.opencontainers.image.version": $(json "$version"), "org.opencontainers.image.revision": $(json "$revision")}
}
EOF
read -r manifest_digest manifest_size < <(put_blob "$work/manifest.json")

cat >"$out/index.json" <<EOF
{
  "schemaVersion": 2,
  "mediaType": "application/vnd.oci.image.index.v1+json",
  "manifests": [{
    "mediaType": "application/vnd.oci.image.manifest.v1+json",
    "digest": "$manifest_digest",
    "size": $manifest_size,
    "platform": {"architecture": "amd64", "os": "linux"},
    "annotations": {"org.opencontainers.image.ref.name": $(json "$version")}
  }]
}
EOF
echo '{"imageLayoutVersion": "1.0.0"}' >"$out/oci-layout"

echo "build-image: $manifest_digest, layer $layer_size bytes compressed ($(stat -c %s "$work/layer.tar") uncompressed), binary $(stat -c %s "$binary") bytes" >&2
echo "$(cd "$out" && pwd)"
