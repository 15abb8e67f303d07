#!/usr/bin/env bash
# Modbus RTU line benchmark (issue 12): reads/s and points/s on one serial line at 115200 baud 8N1
# against the line's physical capacity, through a relay that releases bytes at the baud rate.
# Needs socat. Usage: bash tests/bench/rtu.sh [--baud N] [--registers N] [--seconds N]
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --release --locked -p updraft-gateway -p updraft-tests --bin updraft --bin rtu-bench
./target/release/rtu-bench "$@"
