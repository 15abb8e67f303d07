#!/usr/bin/env bash
# Plugin benchmark (issue 3): per-call overhead and points/s for batches of 1, 100 and 1000 points
# through a trivial plugin, and load time cold and warm.
set -euo pipefail
cd "$(dirname "$0")/../.."
if ! rustup target list --installed 2>/dev/null | grep -q '^wasm32-wasip2$'; then
  rustup target add wasm32-wasip2
fi
# Run from plugins/ so its .cargo/config.toml (target wasm32-wasip2) applies.
(cd plugins && cargo build --release --locked)
cargo build --release --locked -p updraft-tests --bin plugin-bench
./target/release/plugin-bench
