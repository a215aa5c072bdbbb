#!/usr/bin/env bash
# Turn credentials made by `fedtext federation credentials` into Kubernetes Secrets
# (printed as YAML; pipe to `kubectl apply -f -`). Nothing is written to disk.
#   deploy/scripts/k8s-secrets.sh OUT_DIR [NAMESPACE]
# Secrets: fedtext-superlink-tls (server.crt, server.key, ca.crt) and, per tenant,
# fedtext-node-TENANT (node.key, ca.crt). The CA key is never put in the cluster.
set -euo pipefail
if [ "$#" -lt 1 ]; then
  sed -n '2,6p' "$0" >&2
  exit 2
fi
out="$1"; ns="${2:-fedtext}"
kubectl create secret generic fedtext-superlink-tls --namespace "$ns" \
  --from-file=server.crt="$out/superlink/server.crt" \
  --from-file=server.key="$out/superlink/server.key" \
  --from-file=ca.crt="$out/superlink/ca.crt" \
  --dry-run=client -o yaml
for dir in "$out"/nodes/*/; do
  tenant="$(basename "$dir")"
  echo "---"
  kubectl create secret generic "fedtext-node-$tenant" --namespace "$ns" \
    --from-file=node.key="$dir/node.key" \
    --from-file=ca.crt="$dir/ca.crt" \
    --dry-run=client -o yaml
done
