#!/usr/bin/env bash
# Installs what the local Kubernetes control plane needs on Debian bookworm:
# etcd from Debian, and kube-apiserver built from Debian's kubernetes source
# package. The binary is cached outside the repository (KERNELFLOW_CACHE,
# default ~/.cache/kernelflow), so only the first run pays for the build.
set -euo pipefail

cache="${KERNELFLOW_CACHE:-$HOME/.cache/kernelflow}"
bin="$cache/bin"
mkdir -p "$bin"

sudo_() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

need_apt=()
command -v etcd >/dev/null || need_apt+=(etcd-server)
command -v openssl >/dev/null || need_apt+=(openssl)
if [ ! -x "$bin/kube-apiserver" ]; then
  command -v go >/dev/null || need_apt+=(golang-go)
  command -v rsync >/dev/null || need_apt+=(rsync)
  [ -d /usr/share/gocode/src/github.com/modern-go/reflect2 ] || need_apt+=(golang-github-modern-go-reflect2-dev)
  command -v dpkg-source >/dev/null || need_apt+=(dpkg-dev)
fi
if [ ${#need_apt[@]} -gt 0 ]; then
  sudo_ apt-get -o Acquire::Retries=5 update -qq
  DEBIAN_FRONTEND=noninteractive sudo_ apt-get -o Acquire::Retries=5 install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi
# Debian starts etcd as a service on install; the harness runs its own.
if command -v systemctl >/dev/null && systemctl is-active --quiet etcd 2>/dev/null; then
  sudo_ systemctl disable --now etcd >/dev/null 2>&1 || true
fi

if [ -x "$bin/kube-apiserver" ]; then
  echo "kube-apiserver: cached at $bin/kube-apiserver"
  exit 0
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
src_list=/etc/apt/sources.list.d/kernelflow-src.sources
if ! grep -rqsE '^(deb-src .*bookworm|Types:.*deb-src)' /etc/apt/sources.list /etc/apt/sources.list.d/; then
  printf '%s\n' 'Types: deb-src' 'URIs: http://deb.debian.org/debian' 'Suites: bookworm' 'Components: main' \
    'Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg' | sudo_ tee "$src_list" >/dev/null
  sudo_ apt-get -o Acquire::Retries=5 update -qq
fi
# Judged by the tree it leaves, not by its exit status; its output is shown when there is none.
(cd "$work" && apt-get -o Acquire::Retries=5 source -qq kubernetes >"$work/apt-source.log" 2>&1) || true
src=$(find "$work" -maxdepth 1 -type d -name 'kubernetes-*' | head -n1)
[ -n "$src" ] || {
  cat "$work/apt-source.log" >&2
  echo "apt-get source kubernetes gave no source tree" >&2
  exit 1
}

# The vendored reflect2 v1.0.1 segfaults under Go >= 1.18 (mapiterinit);
# Debian ships the fixed 1.0.2 sources.
rm -rf "$src/vendor/github.com/modern-go/reflect2"
cp -r /usr/share/gocode/src/github.com/modern-go/reflect2 "$src/vendor/github.com/modern-go/reflect2"

echo "building kube-apiserver (a few minutes, once)..."
(cd "$src" && KUBE_GIT_VERSION=v1.20.2 KUBE_GIT_TREE_STATE=clean GOFLAGS=-mod=vendor \
  make WHAT=cmd/kube-apiserver >"$work/build.log" 2>&1) || { tail -n 50 "$work/build.log" >&2; exit 1; }
built=$(find "$src/_output" -type f -name kube-apiserver -perm -u+x | head -n1)
install -m 0755 "$built" "$bin/kube-apiserver"
echo "kube-apiserver: built into $bin/kube-apiserver"
