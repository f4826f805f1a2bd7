#!/usr/bin/env bash
# Lints what deploy/ and systemd/ ship: Prometheus alert rules (check + unit tests) and
# scrape config, the Grafana dashboard (valid JSON with panels), and the systemd unit
# (`systemd-analyze verify`, and `security` exposure at most 2.0). Needs promtool (Debian
# package `prometheus`) and python3; the systemd checks run where systemd-analyze exists.
set -euo pipefail
cd "$(dirname "$0")/.."

promtool check rules deploy/prometheus/routemq-bridge.rules.yml
promtool test rules deploy/prometheus/routemq-bridge.rules.test.yml
promtool check config deploy/prometheus/prometheus.yml

python3 - <<'PY'
import json
with open("deploy/grafana/routemq-bridge.json") as f:
    dashboard = json.load(f)
panels = dashboard.get("panels") or []
assert panels, "the dashboard has no panels"
for panel in panels:
    for target in panel.get("targets", []):
        assert target.get("expr"), f"panel {panel.get('title')!r} has a target without expr"
print(f"deploy/grafana/routemq-bridge.json: {len(panels)} panels, valid JSON")
PY

if command -v systemd-analyze >/dev/null 2>&1; then
    unit=systemd/routemq-bridge.service
    # verify wants ExecStart's binary to exist: point it at the build when not installed.
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    binary=/usr/bin/routemq-bridge
    if [ ! -x "$binary" ]; then
        cargo build --quiet --locked --bin routemq-bridge
        binary="$PWD/target/debug/routemq-bridge"
    fi
    sed "s#/usr/bin/routemq-bridge#$binary#g" "$unit" > "$tmp/routemq-bridge.service"
    systemd-analyze verify "$tmp/routemq-bridge.service"
    # --threshold is in tenths: 20 = exposure 2.0.
    systemd-analyze security --offline=true --threshold=20 "$unit" | tail -n 1
    echo "$unit: verify OK, exposure within 2.0"
else
    echo "systemd-analyze not found: systemd unit checks skipped"
fi
