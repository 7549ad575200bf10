#!/usr/bin/env bash
# Fill deploy/k8s/credentials/secrets/ (git-ignored) from the output of scripts/make_secrets.sh,
# for `kubectl apply -k deploy/k8s/credentials`: the same keyring, ACL users and URLs as
# docker-compose, plus KEDA's Redis login (the read-only flower user) split out of its URL.
#   scripts/k8s_secrets.sh [SOURCE_DIR [TARGET_DIR]]     (defaults: secrets, deploy/k8s/credentials/secrets)
# Refuses to overwrite an existing target (rotate as docs/OPERATIONS.md says).
set -euo pipefail
cd "$(dirname "$0")/.."
src="${1:-secrets}"
dst="${2:-deploy/k8s/credentials/secrets}"
files=(data_keys users.acl redis_url_api redis_url_worker redis_url_flower flower_auth metrics_token)
for f in "${files[@]}"; do
  [ -s "$src/$f" ] || { echo "$src/$f is missing: run scripts/make_secrets.sh first" >&2; exit 1; }
done
[ -e "$dst" ] && { echo "$dst exists; not overwriting" >&2; exit 1; }
umask 077
mkdir -p "$dst"
for f in "${files[@]}"; do cp "$src/$f" "$dst/$f"; done
# No trailing newline: KEDA passes these to Redis's AUTH as they are.
python3 - "$src/redis_url_flower" "$dst" <<'PY'
import pathlib, sys
from urllib.parse import unquote, urlparse

url = urlparse(pathlib.Path(sys.argv[1]).read_text().strip())
if not url.username or not url.password:
    sys.exit("redis_url_flower has no user and password")
pathlib.Path(sys.argv[2], "keda_redis_username").write_text(unquote(url.username))
pathlib.Path(sys.argv[2], "keda_redis_password").write_text(unquote(url.password))
PY
echo "written to $dst; now: kubectl apply -k deploy/k8s/credentials"
