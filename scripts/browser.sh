#!/usr/bin/env bash
# Debian's chromium, for the headless check of `launcher report`'s page (tests/test_report.py). Optional: where it
# cannot be installed, setup goes on and that one test skips, saying why. Safe to re-run.
command -v chromium >/dev/null 2>&1 && exit 0
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "setup: not installing chromium (needs root and apt-get); the report's browser check will skip"
  exit 0
fi
echo "setup: installing chromium"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null 2>&1 || true
apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1 \
  || echo "setup: chromium could not be installed; the report's browser check will skip"
exit 0
