#!/usr/bin/env bash
# Builds every fuzz target and runs each for a short smoke time (FUZZ_SECONDS, default 20).
# With a nightly toolchain and cargo-fuzz this is coverage-guided (`cargo +nightly fuzz run`);
# without them the targets are built as plain libFuzzer binaries and run uninstrumented, which
# still exercises the parsers and the differential checks on random input.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
secs="${FUZZ_SECONDS:-20}"
targets=(index_ops block_json dump_parse pod_json policy_convert selector_parse dns_answer)
if rustup toolchain list 2>/dev/null | grep '^nightly' >/dev/null && ! command -v cargo-fuzz >/dev/null; then
  cargo install cargo-fuzz --locked >/dev/null 2>&1 || echo "fuzz-smoke: cargo-fuzz could not be installed; running uninstrumented" >&2
fi
for t in "${targets[@]}"; do
  mkdir -p "corpus/$t"
  cp -n seeds/"$t"/* "corpus/$t/" 2>/dev/null || true
done
if rustup toolchain list 2>/dev/null | grep '^nightly' >/dev/null && command -v cargo-fuzz >/dev/null; then
  for t in "${targets[@]}"; do
    cargo +nightly fuzz run "$t" "corpus/$t" -- -max_total_time="$secs" -rss_limit_mb=2048 2>&1 | tail -n 1
  done
else
  cargo build --release --bins
  for t in "${targets[@]}"; do
    "target/release/$t" "corpus/$t" -max_total_time="$secs" -rss_limit_mb=2048 2>&1 | tail -n 1
  done
fi
