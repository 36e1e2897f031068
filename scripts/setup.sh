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
