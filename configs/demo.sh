#!/usr/bin/env bash
# Runs the built-in demo: builds the example plugins (WASM), then the gateway, then runs it on
# configs/demo.toml (two simulated Modbus machines, one OPC-UA press, three plugins). Stop it with Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! rustup target list --installed 2>/dev/null | grep -q '^wasm32-wasip2$'; then
  rustup target add wasm32-wasip2
fi
# Run from plugins/ so its .cargo/config.toml (target wasm32-wasip2) applies.
(cd plugins && cargo build --release --locked)
exec cargo run --release --locked -- run -c configs/demo.toml
