#!/usr/bin/env bash
# Builds the Debian package (binary, systemd unit, example config as a conffile, examples
# under /usr/share/doc/routemq-bridge/) with cargo-deb, installing cargo-deb first if it is
# missing, and lists what the package holds. Extra arguments go to `cargo deb`
# (e.g. --target aarch64-unknown-linux-gnu for an ARM gateway).
#
#   deploy/build-deb.sh && sudo apt-get install ./target/debian/routemq-bridge_*.deb
set -euo pipefail
cd "$(dirname "$0")/.."

if ! cargo deb --version >/dev/null 2>&1; then
    echo "cargo-deb is missing: installing it (cargo install cargo-deb --locked)"
    cargo install cargo-deb --locked
fi

# cargo deb builds the release binary and prints the path of the .deb it wrote last.
deb=$(cargo deb "$@" | tail -n 1)
if [ ! -f "$deb" ]; then
    echo "cargo deb did not report a package file (got: $deb)" >&2
    exit 1
fi
echo "== $deb"
dpkg-deb --info "$deb"
echo "== contents"
dpkg-deb --contents "$deb"
