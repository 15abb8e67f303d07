#!/usr/bin/env bash
# Polling benchmark (issue 2): 100 devices × 100 tags at 1 s, then as fast as the devices answer.
# Prints points/s, gateway CPU-seconds per million points, peak RSS and polls on schedule.
# Usage: bash tests/bench/poll.sh [--seconds N]
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --release --locked -p updraft-gateway -p updraft-tests --bin updraft --bin poll-bench
./target/release/poll-bench --devices 100 --tags 100 --poll 1s "$@"
./target/release/poll-bench --devices 100 --tags 100 --poll 10ms "$@"
# The same load with every point also forwarded through a cloud sink (disk buffer) to mosquitto.
./target/release/poll-bench --devices 100 --tags 100 --poll 1s --cloud "$@"
