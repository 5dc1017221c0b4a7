#!/usr/bin/env bash
# Lays out the image's whole root filesystem in DEST from the static binary and a CA bundle.
# The one definition of what the image holds: the Dockerfile's build stage runs it and its final
# stage copies DEST as it is; deploy/build-image.sh runs it and packs DEST into the layer.
#
#   /usr/bin/calico-kube-controllers    the binary (0755)
#   /usr/bin/kube-controllers           symlink to it: the default ENTRYPOINT, runs the controller
#   /usr/bin/check-status               symlink to it: upstream's exec probe (`check-status -r|-l`)
#   /usr/bin/calico                     symlink to it: the operator's `calico component
#                                       kube-controllers` and `calico health --port=9440`
#   /etc/ssl/certs/ca-certificates.crt  the CA bundle (0644)
#   /status/                            owned 999:0, 0775: the default status file's folder, for
#                                       pods without a volume there (with a read-only root, mount
#                                       an emptyDir on /status)
#
# Usage: stage-rootfs.sh BINARY CA_BUNDLE DEST (DEST must not exist). As root, /status is chowned
# to 999:0; otherwise the packer sets that owner in the tarball.
set -euo pipefail
[[ $# -eq 3 ]] || { echo "usage: $0 BINARY CA_BUNDLE DEST" >&2; exit 2; }
binary="$1" ca="$2" dest="$3"
[[ -f "$binary" ]] || { echo "stage-rootfs: no binary at $binary" >&2; exit 1; }
[[ -s "$ca" ]] || { echo "stage-rootfs: no CA bundle at $ca" >&2; exit 1; }
[[ ! -e "$dest" ]] || { echo "stage-rootfs: $dest already exists" >&2; exit 1; }

umask 022
mkdir -p "$dest/usr/bin" "$dest/etc/ssl/certs" "$dest/status"
install -m 0755 "$binary" "$dest/usr/bin/calico-kube-controllers"
for name in kube-controllers check-status calico; do
  ln -s calico-kube-controllers "$dest/usr/bin/$name"
done
install -m 0644 "$ca" "$dest/etc/ssl/certs/ca-certificates.crt"
chmod 0775 "$dest/status"
if [[ "$(id -u)" == 0 ]]; then chown 999:0 "$dest/status"; fi
