#!/usr/bin/env bash
# OPC-UA benchmark (issue 9): one server with 10,000 variables changing every second, read through
# subscriptions and then through polling; value changes/s, gateway CPU per million changes, peak RSS.
# Usage: bash tests/bench/opcua.sh [--items N] [--seconds N]
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --release --locked -p updraft-gateway -p updraft-tests --bin updraft --bin opcua-bench
./target/release/opcua-bench "$@"
