#!/usr/bin/env bash
# Create (or complete) a federation's TLS and node-authentication material.
#   deploy/scripts/make-credentials.sh OUT_DIR SUPERLINK_HOST[,HOST...] TENANT [TENANT...]
# Example: deploy/scripts/make-credentials.sh deploy/credentials coordinator,fl.example.org acme globex
# Existing keys are kept; keys are 0600 in 0700 directories. Ship OUT_DIR/superlink/ to the
# coordinator and OUT_DIR/nodes/TENANT/ to each tenant; keep OUT_DIR/ca/ca.key offline.
set -euo pipefail
if [ "$#" -lt 3 ]; then
  sed -n '2,6p' "$0" >&2
  exit 2
fi
out="$1"; hosts="$2"; shift 2
args=()
IFS=',' read -ra host_list <<< "$hosts"
for h in "${host_list[@]}"; do args+=(--host "$h"); done
for t in "$@"; do args+=(--tenant "$t"); done
exec "${FEDTEXT:-fedtext}" federation credentials --out "$out" "${args[@]}"
