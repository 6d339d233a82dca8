#!/usr/bin/env bash
# System packages the tests need: independent PLC-side clients (Debian mbpoll for Modbus,
# node-opcua-client from npm for OPC UA) and Chromium for the dashboard's browser test.
# Idempotent; skips what is already there.
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
command -v mbpoll >/dev/null || need+=(mbpoll)
command -v systemd-analyze >/dev/null || need+=(systemd)
command -v node >/dev/null || need+=(nodejs npm)
# the dashboard's browser test: Debian's Chromium, driven by Playwright (never a downloaded browser)
[ -x /usr/bin/chromium ] || need+=(chromium chromium-driver fonts-dejavu-core fonts-liberation2)
if [ ${#need[@]} -gt 0 ]; then
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
if [ ! -d tests/clients/node_modules/node-opcua-client ]; then
    (cd tests/clients && npm install --no-audit --no-fund --loglevel=error >/dev/null)
fi
