#!/usr/bin/env bash
# Runs the whole test suite on a fresh machine: installs the test peers, then runs every test.
# Usage: bash tests/run.sh [extra nextest arguments]
set -euo pipefail
cd "$(dirname "$0")/.."

# The stand-in cloud broker (mosquitto), openssl (test certificates), socat (virtual serial
# lines for Modbus RTU) and chromium (the dashboard's browser test) come from Debian.
if ! command -v mosquitto >/dev/null 2>&1 || ! command -v openssl >/dev/null 2>&1 || ! command -v socat >/dev/null 2>&1 \
   || ! command -v chromium >/dev/null 2>&1; then
  SUDO=""
  if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends mosquitto openssl socat chromium >/dev/null
  # The tests start their own mosquitto on free ports. The package's service would hold port 1883,
  # which the demo's embedded broker uses, so it is switched off where systemd runs it.
  if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet mosquitto 2>/dev/null; then
    $SUDO systemctl disable --now mosquitto >/dev/null 2>&1 || true
  fi
fi

# Independent protocol peers (pymodbus) live in a project-local venv.
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
if ! .venv/bin/python -c 'import pymodbus' 2>/dev/null \
   || ! cmp -s tests/peers/requirements.txt .venv/.requirements 2>/dev/null; then
  .venv/bin/pip install --quiet --disable-pip-version-check -r tests/peers/requirements.txt
  cp tests/peers/requirements.txt .venv/.requirements
fi
export UPDRAFT_PYTHON="$PWD/.venv/bin/python"

# The example plugins and the misbehaving test fixtures are WASM components built from source.
if ! rustup target list --installed 2>/dev/null | grep -q '^wasm32-wasip2$'; then
  rustup target add wasm32-wasip2
fi
# Run from plugins/ so its .cargo/config.toml (target wasm32-wasip2) applies.
(cd plugins && cargo build --release --locked)

# The plugin SDK's own unit tests (its helpers: windows, alarms, durations, marks, integrator),
# natively: they call no import of the gateway.
(cd plugin-sdk && cargo test --lib --locked --quiet)

# The vendored broker's own unit tests (its router, logs and session store; patches 2-8). It is
# not a workspace member, so that it keeps upstream's formatting and lints.
cargo test -p rumqttd --lib --locked --quiet

if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --locked --profile ci "$@"
else
  cargo test --workspace --locked "$@"
fi
