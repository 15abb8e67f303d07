#!/usr/bin/env bash
# Builds the updraft .deb from a built binary and the example plugins, with dpkg-deb alone (no
# packaging toolchain to install): the binary, the hardened systemd unit, /etc/updraft/updraft.toml
# as a conffile, the example plugins and the docs.
#
# Usage: packaging/build-deb.sh [--binary PATH] [--arch amd64|arm64] [--out DIR] [--fast]
#   --binary  the updraft binary (default target/release/updraft; for ARM64 the cross-built one)
#   --arch    Debian architecture of that binary (default: this machine's)
#   --out     where the .deb goes (default target/deb)
#   --fast    light compression (for tests)
# Prints the path of the .deb.
set -euo pipefail
cd "$(dirname "$0")/.."

binary=target/release/updraft
arch=$(dpkg --print-architecture)
out=target/deb
compress=(-Zxz -z6)
while [ $# -gt 0 ]; do
  case "$1" in
    --binary) binary=$2; shift 2 ;;
    --arch) arch=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --fast) compress=(-Zgzip -z1); shift ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
[ -x "$binary" ] || { echo "no binary at $binary: cargo build --release first" >&2; exit 1; }

version=$(sed -n '/^\[workspace.package\]/,/^\[/s/^version = "\(.*\)"/\1/p' Cargo.toml)
plugins=plugins/target/wasm32-wasip2/release
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT

install -d "$stage/DEBIAN" "$stage/usr/bin" "$stage/lib/systemd/system" "$stage/etc/updraft" \
  "$stage/usr/share/updraft/plugins" "$stage/usr/share/doc/updraft"
# A release binary is already stripped; a debug one (tests) is stripped here to keep the package small.
strip -o "$stage/usr/bin/updraft" "$binary" 2>/dev/null || cp "$binary" "$stage/usr/bin/updraft"
chmod 0755 "$stage/usr/bin/updraft"
install -m 0644 packaging/updraft.service "$stage/lib/systemd/system/updraft.service"
install -m 0644 packaging/updraft.toml "$stage/etc/updraft/updraft.toml"
for p in scale window_avg threshold_alarm deadband thingsboard energy_shift; do
  [ -f "$plugins/$p.wasm" ] || { echo "missing $plugins/$p.wasm: (cd plugins && cargo build --release)" >&2; exit 1; }
  install -m 0644 "$plugins/$p.wasm" "$stage/usr/share/updraft/plugins/$p.wasm"
done
install -m 0644 README.md "$stage/usr/share/doc/updraft/README.md"
install -m 0644 configs/gateway.toml "$stage/usr/share/doc/updraft/gateway.toml.example"
cat > "$stage/usr/share/doc/updraft/copyright" <<EOF
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: updraft
Files: *
License: Apache-2.0
 On Debian systems the full text is in /usr/share/common-licenses/Apache-2.0.
EOF

installed_size=$(du -sk --exclude=DEBIAN "$stage" | cut -f1)
cat > "$stage/DEBIAN/control" <<EOF
Package: updraft
Version: $version
Architecture: $arch
Maintainer: Updraft developers <updraft@localhost>
Installed-Size: $installed_size
Depends: adduser
Section: net
Priority: optional
Description: edge gateway for smart industrial parks
 Polls Modbus TCP/RTU and OPC-UA equipment, publishes every reading on an
 embedded MQTT broker, runs sandboxed WASM plugins and forwards to the cloud
 (MQTT, HTTP) through a disk-backed store-and-forward buffer.
EOF
echo /etc/updraft/updraft.toml > "$stage/DEBIAN/conffiles"

cat > "$stage/DEBIAN/postinst" <<'EOF'
#!/bin/sh
set -e
if [ "$1" = configure ]; then
  if ! getent passwd updraft >/dev/null; then
    adduser --system --group --home /var/lib/updraft --no-create-home --quiet updraft
  fi
  # Serial ports for Modbus RTU.
  if getent group dialout >/dev/null; then adduser --quiet updraft dialout || true; fi
  # The config may name secrets: readable by the service's group, not by everyone.
  chown root:updraft /etc/updraft/updraft.toml
  chmod 0640 /etc/updraft/updraft.toml
fi
if [ -d /run/systemd/system ]; then
  systemctl daemon-reload >/dev/null || true
  if [ "$1" = configure ] && [ -z "$2" ]; then
    systemctl enable --now updraft.service >/dev/null || true
  else
    systemctl try-restart updraft.service >/dev/null || true
  fi
fi
EOF
cat > "$stage/DEBIAN/prerm" <<'EOF'
#!/bin/sh
set -e
if [ -d /run/systemd/system ] && [ "$1" = remove ]; then
  systemctl stop updraft.service >/dev/null || true
fi
EOF
cat > "$stage/DEBIAN/postrm" <<'EOF'
#!/bin/sh
set -e
if [ "$1" = purge ]; then
  if [ -d /run/systemd/system ]; then systemctl disable updraft.service >/dev/null 2>&1 || true; fi
  # Purging removes the buffered data and certificates with the package.
  rm -rf /var/lib/updraft
fi
if [ -d /run/systemd/system ]; then systemctl daemon-reload >/dev/null || true; fi
EOF
chmod 0755 "$stage/DEBIAN/postinst" "$stage/DEBIAN/prerm" "$stage/DEBIAN/postrm"

mkdir -p "$out"
deb="$out/updraft_${version}_${arch}.deb"
dpkg-deb --root-owner-group "${compress[@]}" --build "$stage" "$deb" >/dev/null
echo "$deb"
