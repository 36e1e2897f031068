#!/usr/bin/env bash
# One command: install what is missing, then run every test (unit,
# integration, CLI, doc) of the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh
cargo test --workspace --features tollgate/conformance "$@"
