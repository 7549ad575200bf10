#!/usr/bin/env bash
# Build every image of docker-compose.yml on a machine that reaches no image registry, only
# Debian's package archive and the Python package indexes pip is configured with:
#
#   base     debootstrap of Debian (minbase + python3, python3-venv, ca-certificates), imported
#            as $M2FP_BASE_IMAGE (default m2fp/debian-base:bookworm); skipped when an image of the
#            same recipe exists (its label m2fp.base.recipe).
#   redis    $M2FP_REDIS_IMAGE (m2fp/redis:bookworm): Debian's redis-server on that base, uid 999.
#   nginx    $M2FP_NGINX_IMAGE (m2fp/nginx:bookworm): Debian's nginx-light on that base, uid 101.
#   wheels   build/wheelhouse/{api,worker}: `pip download` of requirements/*.txt with the host's
#            pip configuration (so torch is the CPU wheel the host's indexes carry, never CUDA).
#   api      $M2FP_API_IMAGE (m2fp-serve-api:local): Dockerfile.api FROM the base, from the wheelhouse.
#   worker   $M2FP_WORKER_IMAGE (m2fp-serve-worker:local): Dockerfile.worker likewise, with the
#            compiled deformable-attention op built in the image.
#
#   deploy/images/build.sh                 # all of them, in that order
#   deploy/images/build.sh base redis      # only those
#
# DEBIAN_SUITE (bookworm) and DEBIAN_MIRROR (default: the host's own apt source) choose the base.
# Root is needed for debootstrap. Builds use the host network (apt and pip inside the build reach
# what the host reaches) and Docker's layer cache: a rerun with nothing changed takes seconds.
# Each step prints its wall time ("build_images: <step> <seconds> s").
# Real deployments with registry access need none of this: `docker compose build` uses the public
# python:3.11-slim-bookworm base (docs/OPERATIONS.md, "Building the images without a registry").
set -euo pipefail
cd "$(dirname "$0")/../.."
SUITE="${DEBIAN_SUITE:-bookworm}"
BASE_IMAGE="${M2FP_BASE_IMAGE:-m2fp/debian-base:$SUITE}"
REDIS_IMAGE="${M2FP_REDIS_IMAGE:-m2fp/redis:$SUITE}"
NGINX_IMAGE="${M2FP_NGINX_IMAGE:-m2fp/nginx:$SUITE}"
API_IMAGE="${M2FP_API_IMAGE:-m2fp-serve-api:local}"
WORKER_IMAGE="${M2FP_WORKER_IMAGE:-m2fp-serve-worker:local}"
# pip for the wheelhouse: markers such as python_full_version are evaluated for the interpreter
# that runs pip (pip's --python-version does not change them), so it runs on the host's Debian
# /usr/bin/python3, the base image's own Python on a bookworm host: Debian's pip, else the venv's
# pip package run by that interpreter, else (another host) the venv's python.
if [ -z "${PIP:-}" ]; then
  venv_pip=$(.venv/bin/python -c 'import os, pip; print(os.path.dirname(pip.__file__))' 2>/dev/null || true)
  if /usr/bin/python3 -m pip --version >/dev/null 2>&1; then
    PIP="/usr/bin/python3 -m pip"
  elif [ -x /usr/bin/python3 ] && [ -n "$venv_pip" ]; then
    PIP="/usr/bin/python3 $venv_pip"
  else
    PIP=".venv/bin/python -m pip"
  fi
fi
WHEELHOUSE=build/wheelhouse
PACKAGES=python3,python3-venv,ca-certificates

log() { echo "build_images: $*" >&2; }
timed() {  # timed NAME CMD...: run, then print the wall time
  local name=$1 start=$SECONDS
  shift
  "$@"
  log "$name $((SECONDS - start)) s"
}

# The Debian mirror: $DEBIAN_MIRROR, else the host's own apt source (deb822 or one-line
# format), else debootstrap's default.
host_mirror() {
  local uri
  uri=$(grep -hsE '^URIs:' /etc/apt/sources.list.d/*.sources | awk '{print $2}' | grep -v -- '-security' | head -n1 || true)
  [ -n "$uri" ] || uri=$(grep -hsE '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list | awk '{print $2}' | grep -v -- '-security' | head -n1 || true)
  echo "$uri"
}
host_security_mirror() {
  grep -hsE '^URIs:.*-security|^deb .*-security' /etc/apt/sources.list /etc/apt/sources.list.d/* \
    | grep -oE '[a-z]+://[^ ]+' | head -n1 || true
}

build_base() {
  local mirror security recipe
  mirror="${DEBIAN_MIRROR:-$(host_mirror)}"
  security="$(host_security_mirror)"
  recipe=$(printf '%s\n' "$SUITE" "$PACKAGES" "minbase" "v1" | sha256sum | cut -c1-16)
  if [ "$(docker image inspect -f '{{ index .Config.Labels "m2fp.base.recipe" }}' "$BASE_IMAGE" 2>/dev/null)" = "$recipe" ]; then
    log "base $BASE_IMAGE exists (recipe $recipe); skipped"
    return
  fi
  [ "$(id -u)" = 0 ] || { log "debootstrap needs root"; exit 1; }
  command -v debootstrap >/dev/null || { log "debootstrap missing (apt-get install debootstrap)"; exit 1; }
  rootfs=$(mktemp -d /var/tmp/m2fp-rootfs.XXXXXX)
  trap 'rm -rf "${rootfs:-/nonexistent}"' EXIT
  log "debootstrap $SUITE (minbase, $PACKAGES) into $rootfs"
  debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$rootfs" ${mirror:+"$mirror"} >/dev/null
  # apt inside the builds: the same mirror, no recommends, no docs (as the slim images do).
  {
    echo "deb ${mirror:-http://deb.debian.org/debian} $SUITE main"
    echo "deb ${mirror:-http://deb.debian.org/debian} $SUITE-updates main"
    [ -z "$security" ] || echo "deb $security $SUITE-security main"
  } > "$rootfs/etc/apt/sources.list"
  echo 'APT::Install-Recommends "false"; APT::Install-Suggests "false";' > "$rootfs/etc/apt/apt.conf.d/90m2fp-norecommends"
  printf '%s\n' 'path-exclude /usr/share/doc/*' 'path-include /usr/share/doc/*/copyright' \
    'path-exclude /usr/share/man/*' 'path-exclude /usr/share/info/*' 'path-exclude /usr/share/locale/*' \
    > "$rootfs/etc/dpkg/dpkg.cfg.d/90m2fp-nodoc"
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/lib/apt/lists/* "$rootfs"/usr/share/man/* \
    "$rootfs"/usr/share/info/* "$rootfs"/usr/share/locale/* "$rootfs"/var/log/*.log "$rootfs"/tmp/*
  find "$rootfs/usr/share/doc" -mindepth 2 ! -name copyright -delete 2>/dev/null || true
  tar -C "$rootfs" --numeric-owner -c . | docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8' \
    --change 'CMD ["/bin/bash"]' \
    --change "LABEL m2fp.base.recipe=$recipe m2fp.base.suite=$SUITE" \
    - "$BASE_IMAGE" >/dev/null
  rm -rf "$rootfs"
  trap - EXIT
  log "base $BASE_IMAGE imported"
}

docker_build() {  # docker_build CONTEXT TAG DOCKERFILE [ARGS...]
  local context=$1 tag=$2 file=$3
  shift 3
  # Legacy builder and BuildKit alike; --network host: apt and pip reach what the host reaches.
  docker build --force-rm --network host --build-arg "BASE_IMAGE=$BASE_IMAGE" -f "$file" -t "$tag" "$@" "$context" >&2
}

# Redis and nginx need nothing from the repository: their context is this folder alone.
build_redis() { docker_build deploy/images "$REDIS_IMAGE" deploy/images/redis.Dockerfile; }
build_nginx() { docker_build deploy/images "$NGINX_IMAGE" deploy/images/nginx.Dockerfile; }

build_wheels() {
  # Only what the requirement files pin, as wheels for this Python (3.11, the image's too); made
  # anew each time (pip's cache makes that quick), so a re-pinned package leaves no stale wheel.
  rm -rf "$WHEELHOUSE"
  local host_py image_py
  host_py=$($PIP --version | sed -E 's/.*\(python ([0-9.]+)\)$/\1/')
  image_py=$(docker run --rm --network none "$BASE_IMAGE" python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null || true)
  [ -z "$image_py" ] || [ "$host_py" = "$image_py" ] \
    || log "WARNING: pip runs on Python $host_py, the base image has $image_py: wheels may not fit"
  $PIP download --quiet --disable-pip-version-check --only-binary=:all: \
    -r requirements/api.txt -r requirements/flower.txt -d "$WHEELHOUSE/api"
  $PIP download --quiet --disable-pip-version-check --only-binary=:all: \
    -r requirements/worker.txt -d "$WHEELHOUSE/worker"
  if ls "$WHEELHOUSE"/worker/nvidia_* >/dev/null 2>&1 || ! ls "$WHEELHOUSE"/worker/torch-*+cpu-*.whl >/dev/null 2>&1; then
    log "the wheelhouse has no CPU-only torch wheel (or has CUDA libraries): check the pip indexes"
    exit 1
  fi
  du -sh "$WHEELHOUSE/api" "$WHEELHOUSE/worker" >&2
}

pip_local=(--build-arg "PIP_INSTALL_ARGS=--no-index")
build_api() {
  docker_build . "$API_IMAGE" Dockerfile.api --build-arg "WHEELHOUSE=$WHEELHOUSE/api" "${pip_local[@]}"
}
build_worker() {
  docker_build . "$WORKER_IMAGE" Dockerfile.worker --build-arg "WHEELHOUSE=$WHEELHOUSE/worker" "${pip_local[@]}"
}

steps=("$@")
[ ${#steps[@]} -gt 0 ] || steps=(base redis nginx wheels api worker)
for step in "${steps[@]}"; do
  case "$step" in
    base | redis | nginx | wheels | api | worker) timed "$step" "build_$step" ;;
    *) log "unknown step $step (base redis nginx wheels api worker)"; exit 2 ;;
  esac
done
docker image ls --format '{{.Repository}}:{{.Tag}} {{.Size}}' \
  | grep -E "^($BASE_IMAGE|$REDIS_IMAGE|$NGINX_IMAGE|$API_IMAGE|$WORKER_IMAGE) " >&2 || true
# For .env (or the environment) of docker compose: point docker-compose.yml at these images.
printf '%s\n' "M2FP_BASE_IMAGE=$BASE_IMAGE" "M2FP_REDIS_IMAGE=$REDIS_IMAGE" "M2FP_NGINX_IMAGE=$NGINX_IMAGE" \
  "M2FP_API_IMAGE=$API_IMAGE" "M2FP_WORKER_IMAGE=$WORKER_IMAGE"
