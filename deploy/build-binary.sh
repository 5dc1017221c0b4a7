#!/usr/bin/env bash
# Builds the controller as one static executable for the image: glibc linked statically
# (`-C target-feature=+crt-static`; the musl target is not needed), TLS by rustls (no OpenSSL).
# Prints the binary's path as its last line; everything else goes to stderr.
#
# Cargo profile `image` (Cargo.toml): release code without debug info, which makes the build
# cheaper than `release` and the binary smaller. The explicit `--target` keeps the static flag
# off build scripts and proc-macros (they run on the host and must stay dynamic) and gives the
# static build its own directory, target/x86_64-unknown-linux-gnu/image/.
#
# Name resolution in a static glibc binary: glibc 2.34+ has its `files` and `dns` sources built
# in, so getaddrinfo reads /etc/hosts and /etc/resolv.conf (which the kubelet mounts into every
# pod) without loading any libnss_*.so; only other NSS sources (ldap, mdns, systemd-resolved's
# `resolve`) would need the shared libraries of the glibc it was built with, and the image has
# none. The linker's warning about getaddrinfo in static programs is about those sources.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

target=x86_64-unknown-linux-gnu
profile=image
bin="target/$target/$profile/calico-kube-controllers"

if grep -q '^name = "openssl-sys"' Cargo.lock; then
  echo "build-binary: openssl-sys is in Cargo.lock; the image's binary must use rustls only" >&2
  exit 1
fi

start=$SECONDS
# Only the target's flags: host artifacts (build scripts, proc-macros) stay as they are.
CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS="-C target-feature=+crt-static" \
  cargo build --locked --profile "$profile" --target "$target" --bin calico-kube-controllers >&2
echo "build-binary: built in $((SECONDS - start)) s" >&2

# Static means no program interpreter and no shared libraries at all.
desc="$(file -b "$bin")"
case "$desc" in
  *"statically linked"* | *"static-pie linked"*) ;;
  *)
    echo "build-binary: $bin is not static: $desc" >&2
    exit 1
    ;;
esac
if ldd "$bin" >/dev/null 2>&1 && ! ldd "$bin" 2>&1 | grep "statically linked" >/dev/null; then
  echo "build-binary: ldd lists shared libraries for $bin:" >&2
  ldd "$bin" >&2
  exit 1
fi
echo "build-binary: $(stat -c %s "$bin") bytes, $desc" >&2
echo "$(pwd)/$bin"
