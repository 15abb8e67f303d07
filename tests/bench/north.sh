#!/usr/bin/env bash
# Store-and-forward benchmark (issue 4): sustained points/s through an MQTT sink with its disk
# buffer to a loopback mosquitto, disk bytes per point, and the drain rate after an outage.
# Usage: bash tests/bench/north.sh [--rates 200000,300000] [--seconds N] [--live N] [--outage N]
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --release --locked -p updraft-tests --bin north-bench
./target/release/north-bench "$@"
