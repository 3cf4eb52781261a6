#!/usr/bin/env bash
# A local Kubernetes cluster running Flowcraft, from a clone to a Succeeded FlowRun in one command:
#
#   bash scripts/kind.sh                  # build the image, create the kind cluster "flowcraft", install, run
#   bash scripts/kind.sh --use-current    # install into the current kubectl context instead of a new cluster
#
# Steps: build the image (docker build), create a kind cluster (or use the current context), load the image into
# it (kind load; for another cluster, push it: --image must then name your registry), install PostgreSQL,
# RabbitMQ and Redis (deploy/local/*.yaml, namespace flowcraft-data), install the chart with the connection
# Secret (deploy/local/helm-values.yaml), apply the example blueprints, worker pool and FlowRuns
# (deploy/kubernetes/), and wait until every FlowRun has Succeeded.
#
# Needs docker, kubectl, kind (unless --use-current) and helm (scripts/helm.sh fetches it when missing).
# Options: --use-current, --cluster NAME (default flowcraft), --image REPO:TAG (default flowcraft:dev),
# --skip-build (use an existing image), --timeout SECONDS (each wait, default 300).
# Remove it all with: kind delete cluster --name flowcraft
set -euo pipefail
cd "$(dirname "$0")/.."

cluster=flowcraft
image=flowcraft:dev
use_current=false
build=true
timeout=300
ns=flowcraft-system
data_ns=flowcraft-data

step() { printf '\n==> %s\n' "$*"; }
die() { printf 'kind.sh: %s\n' "$*" >&2; exit 1; }
need() { command -v "$1" >/dev/null 2>&1 || die "$1 is required: $2"; }
usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit "${1:-0}"; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    --use-current) use_current=true ;;
    --cluster) cluster=$2; shift ;;
    --image) image=$2; shift; [[ "${image##*/}" == *:* ]] || die "--image needs a tag: REPO:TAG" ;;
    --skip-build) build=false ;;
    --timeout) timeout=$2; shift ;;
    -h | --help) usage 0 ;;
    *) echo "kind.sh: unknown option $1" >&2; usage 2 ;;
  esac
  shift
done

# wait_until DESCRIPTION COMMAND...: run COMMAND every 2 s until it succeeds or $timeout seconds pass.
wait_until() {
  local what=$1 deadline=$((SECONDS + timeout))
  shift
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || die "timed out after ${timeout}s waiting for $what"
    sleep 2
  done
}

need docker "https://docs.docker.com/get-docker/"
need kubectl "https://kubernetes.io/docs/tasks/tools/"
$use_current || need kind "https://kind.sigs.k8s.io/docs/user/quick-start/#installation"
helm=$(bash scripts/helm.sh)

if $build; then
  step "Building image $image"
  docker build -t "$image" --build-arg "GIT_COMMIT=$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)" .
fi

if $use_current; then
  context=$(kubectl config current-context) || die "no current kubectl context"
  step "Using the current context $context"
else
  context=kind-$cluster
  if kind get clusters 2>/dev/null | grep -qx "$cluster"; then
    step "Using the existing kind cluster $cluster"
  else
    step "Creating the kind cluster $cluster"
    kind create cluster --name "$cluster" --wait 120s
  fi
fi
kube() { kubectl --context "$context" "$@"; }

if [[ "$context" == kind-* ]]; then
  step "Loading $image into kind cluster ${context#kind-}"
  kind load docker-image "$image" --name "${context#kind-}"
else
  step "Pushing $image (the cluster pulls it from the registry)"
  docker push "$image"
fi

step "Installing PostgreSQL, RabbitMQ and Redis (namespace $data_ns)"
kube apply -f deploy/local/namespace.yaml
kube apply -f deploy/local/postgres.yaml -f deploy/local/rabbitmq.yaml -f deploy/local/redis.yaml
for app in postgres rabbitmq redis; do
  kube -n "$data_ns" rollout status "deployment/$app" --timeout "${timeout}s"
done

step "Installing the flowcraft chart (namespace $ns)"
"$helm" upgrade --install flowcraft charts/flowcraft --kube-context "$context" -n "$ns" --create-namespace \
  -f deploy/local/helm-values.yaml --set "image.repository=${image%:*}" --set "image.tag=${image##*:}" \
  --wait --timeout "${timeout}s"

step "Applying the example blueprints, worker pool and FlowRuns"
kube -n "$ns" apply -f deploy/kubernetes/blueprints-configmap.yaml
kube -n "$ns" apply -f deploy/kubernetes/workerpool.yaml
wait_until "the worker Deployment orders-worker" kube -n "$ns" get deployment/orders-worker
kube -n "$ns" rollout status deployment/orders-worker --timeout "${timeout}s"
kube -n "$ns" apply -f deploy/kubernetes/flowrun.yaml

step "Waiting until every FlowRun has Succeeded"
for run in $(kube -n "$ns" get -f deploy/kubernetes/flowrun.yaml -o name); do
  if ! kube -n "$ns" wait "$run" --for=jsonpath='{.status.phase}'=Succeeded --timeout "${timeout}s"; then
    kube -n "$ns" describe "$run" >&2
    die "$run did not succeed"
  fi
done
kube -n "$ns" get flowcraftworkerpools,flowruns

step "Done"
cat <<EOF
Flowcraft runs in context $context, namespace $ns. Next:
  kubectl -n $ns get fwp,fr                          # pools and runs
  kubectl -n $ns logs deploy/orders-worker           # worker logs
  kubectl -n $ns delete fr hello-world && kubectl -n $ns apply -f deploy/kubernetes/flowrun.yaml
EOF
$use_current || echo "  kind delete cluster --name $cluster              # remove everything"
