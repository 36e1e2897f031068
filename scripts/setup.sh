#!/usr/bin/env bash
# Installs what a fresh Debian/Ubuntu machine lacks to build and test Tollgate.
# Sourced by scripts/demo.sh and scripts/test.sh; safe to run again.
# It never downloads prebuilt binaries: only distribution packages and crates.
set -euo pipefail

need=()
command -v cmake >/dev/null 2>&1 || need+=(cmake)        # libz-ng-sys (Pingora's compression)
command -v cc >/dev/null 2>&1 || need+=(build-essential)  # ring, zstd-sys
command -v python3 >/dev/null 2>&1 || need+=(python3)     # the example upstream API
command -v curl >/dev/null 2>&1 || need+=(curl)
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)  # tests start their own servers
command -v redis-cli >/dev/null 2>&1 || need+=(redis-tools)
command -v perl >/dev/null 2>&1 || need+=(perl)
# What only the test suite needs (scripts/test.sh sets TOLLGATE_SETUP=test):
# the dashboard test drives a real headless Chromium through chromedriver.
testing=${TOLLGATE_SETUP:-}
if [ "$testing" = test ]; then
  [ -x /usr/bin/chromium ] || need+=(chromium)
  [ -x /usr/bin/chromedriver ] || need+=(chromium-driver)
  python3 -m pip --version >/dev/null 2>&1 || need+=(python3-pip)
  # promtool checks the alert rules; a real Prometheus scrapes a test Tollgate.
  command -v promtool >/dev/null 2>&1 || need+=(prometheus)
  command -v systemd-analyze >/dev/null 2>&1 || need+=(systemd)
fi

if [ ${#need[@]} -gt 0 ]; then
  echo "tollgate setup: installing ${need[*]}" >&2
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "tollgate setup: please install ${need[*]} with your package manager" >&2
    exit 1
  fi
  sudo=""
  [ "$(id -u)" -ne 0 ] && sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null 2>&1; then
  echo "tollgate setup: cargo (Rust 1.89 or newer) is required; install it with rustup or your distribution" >&2
  exit 1
fi

# Python libraries the tests use as real peers: Stripe's official SDK and
# the Standard Webhooks library sign webhook deliveries, PyJWT makes JWTs,
# Selenium drives Chromium, schemathesis tests the admin API against its
# OpenAPI document, openapi-spec-validator checks generated documents. Installed from PyPI, never as prebuilt browsers or drivers.
if [ "$testing" = test ]; then
  py_need=()
  python3 -c "import stripe" 2>/dev/null || py_need+=("stripe>=16")
  python3 -c "import standardwebhooks" 2>/dev/null || py_need+=("standardwebhooks>=1.0")
  python3 -c "import selenium" 2>/dev/null || py_need+=("selenium>=4.20")
  python3 -c "import jwt, cryptography" 2>/dev/null || py_need+=("pyjwt[crypto]>=2.8")
  python3 -c "import schemathesis" 2>/dev/null || py_need+=("schemathesis>=4.0")
  python3 -c "import openapi_spec_validator" 2>/dev/null || py_need+=("openapi-spec-validator>=0.7")
  python3 -c "import requests" 2>/dev/null || py_need+=("requests>=2.28")
  if [ ${#py_need[@]} -gt 0 ]; then
    echo "tollgate setup: installing Python packages ${py_need[*]}" >&2
    python3 -m pip install --quiet "${py_need[@]}" 2>/dev/null \
      || python3 -m pip install --quiet --break-system-packages "${py_need[@]}"
  fi
fi
