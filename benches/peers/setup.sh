#!/usr/bin/env bash
# Creates benches/peers/.venv (once) with grpcio and grpcio-tools, and prints the path of
# its python. Idempotent: a venv that already imports both is left alone.
#
#   PY=$(benches/peers/setup.sh) && "$PY" benches/peers/grpcio_peer.py --help
#
# PYTHON picks the interpreter that creates the venv (default: python3).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="$here/.venv"
py="$venv/bin/python"

if [ ! -x "$py" ]; then
    "${PYTHON:-python3}" -m venv "$venv" >&2
fi
if ! "$py" -c 'import grpc, grpc_tools.protoc' >/dev/null 2>&1; then
    "$py" -m pip install --quiet --disable-pip-version-check --upgrade pip >&2 || true
    "$py" -m pip install --quiet --disable-pip-version-check grpcio grpcio-tools >&2
fi
echo "$py"
