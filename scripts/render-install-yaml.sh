#!/usr/bin/env bash
# Prints examples/install.yaml, the plain manifest for `kubectl apply` users: the chart with
# its default values rendered into the kernelflow-system namespace, CRDs included, after that
# Namespace. Regenerate with `make install-yaml`; a test fails when the file is out of date.
set -euo pipefail
cd "$(dirname "$0")/.."
cache="${KERNELFLOW_CACHE:-$HOME/.cache/kernelflow}"
# The helm that `make deps` pins, so that the output does not vary with another install.
helm="${HELM:-$cache/bin/helm}"
[ -x "$helm" ] || helm=$(command -v helm) || { echo "helm not found: run make deps" >&2; exit 1; }

cat <<'YAML'
# Generated from charts/kernelflow by `make install-yaml`; do not edit.
# Install: kubectl apply --server-side -f examples/install.yaml
apiVersion: v1
kind: Namespace
metadata:
  name: kernelflow-system
YAML
"$helm" template kernelflow charts/kernelflow --namespace kernelflow-system --include-crds
