#!/usr/bin/env bash
# End-to-end run against a real cluster: create a kind cluster, build and load both images,
# install the chart, run `helm test`, then the end-to-end tests against the installed API.
#
# Needs Docker, kind, kubectl and helm on PATH. `make e2e-kind` calls this script.
# Settings (environment variables):
#   SECAPI_KIND_CLUSTER  name of the kind cluster (default secapi-e2e)
#   SECAPI_KIND_KEEP=1   keep the cluster afterwards (default: delete it)
#   SECAPI_KIND_TESTS    pytest paths of the end-to-end suite (default tests/e2e/cluster)
# The tests get the cluster through SECAPI_E2E_KUBECONFIG and the API through
# SECAPI_E2E_BASE_URL (a port-forward on 127.0.0.1); KUBECONFIG points at the kind cluster.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$repo_root"

cluster="${SECAPI_KIND_CLUSTER:-secapi-e2e}"
tests="${SECAPI_KIND_TESTS:-tests/e2e/cluster}"
namespace="secapi-e2e"
# The release name contains the chart name, so object names are "secapi-api" and so on.
release="secapi"
work_dir="$(mktemp -d)"
kubeconfig="$work_dir/kubeconfig"
python="${PYTHON:-.venv/bin/python}"
port_forward_pid=""

for tool in docker kind kubectl helm; do
    if ! command -v "$tool" >/dev/null; then
        echo "run.sh: $tool is not on PATH; install it to run the kind end-to-end suite" >&2
        exit 2
    fi
done
if [ ! -d "$tests" ]; then
    echo "run.sh: the end-to-end suite $tests does not exist; set SECAPI_KIND_TESTS" >&2
    exit 2
fi

cleanup() {
    if [ -n "$port_forward_pid" ]; then
        kill "$port_forward_pid" 2>/dev/null || true
    fi
    if [ "${SECAPI_KIND_KEEP:-0}" = "1" ]; then
        echo "run.sh: keeping kind cluster $cluster (kubeconfig: $kubeconfig)"
    else
        kind delete cluster --name "$cluster" >/dev/null 2>&1 || true
        rm -rf "$work_dir"
    fi
}
trap cleanup EXIT

echo "run.sh: creating kind cluster $cluster"
kind create cluster --name "$cluster" --config tests/kind/kind-config.yaml \
    --kubeconfig "$kubeconfig" --wait 120s
export KUBECONFIG="$kubeconfig"

echo "run.sh: building the images"
revision="$(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
docker build --file Dockerfile.api --tag secapi/api:e2e --build-arg REVISION="$revision" .
docker build --file Dockerfile.operator --tag secapi/operator:e2e --build-arg REVISION="$revision" .
kind load docker-image --name "$cluster" secapi/api:e2e secapi/operator:e2e

echo "run.sh: installing the chart into namespace $namespace"
kubectl create namespace "$namespace"
# Every pod of the release, and every scan pod, must pass the restricted profile.
kubectl label namespace "$namespace" pod-security.kubernetes.io/enforce=restricted
helm install "$release" charts/secapi --namespace "$namespace" \
    --values tests/kind/values.yaml --wait --timeout 10m
helm test "$release" --namespace "$namespace" --logs --timeout 2m

# An empty local port (":80") lets kubectl pick a free one, and it prints the one it chose.
kubectl --namespace "$namespace" port-forward "service/$release-api" :80 \
    --address 127.0.0.1 >"$work_dir/port-forward.log" 2>&1 &
port_forward_pid=$!
for _ in $(seq 1 50); do
    local_port="$(sed -n 's/^Forwarding from 127.0.0.1:\([0-9]*\) .*/\1/p' "$work_dir/port-forward.log" | head -n 1)"
    [ -n "$local_port" ] && break
    sleep 0.2
done
if [ -z "${local_port:-}" ]; then
    echo "run.sh: kubectl port-forward did not start:" >&2
    cat "$work_dir/port-forward.log" >&2
    exit 1
fi

export SECAPI_E2E_KUBECONFIG="$kubeconfig"
export SECAPI_E2E_BASE_URL="http://127.0.0.1:$local_port"
export SECAPI_E2E_NAMESPACE="$namespace"
echo "run.sh: running $tests against $SECAPI_E2E_BASE_URL"
"$python" -m pytest -p no:cacheprovider "$tests"
