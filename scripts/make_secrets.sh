#!/usr/bin/env bash
# Create ./secrets for docker-compose: the data keyring, one Redis ACL user per role (gateway,
# worker, flower, healthcheck), Flower's basic auth, the gateway's metrics-scraper token, and the
# URLs each service reads.
# Modes: the folder 0700 (on the host only its owner, root for dockerd, gets in), the files 0444:
# Docker bind-mounts file secrets with the host file's owner and mode, and each container runs as
# its own non-root user (10001 gateway/Flower, 10002 worker, 999 Redis, 101 nginx), which must be
# able to read the few secrets mounted into it.
# Flower's user is read-only for real: no PUBLISH (so no remote control through Celery's pidbox),
# no CLIENT KILL/PAUSE, CONFIG or FLUSH*, no job key; its rules are shared.constants.FLOWER_ACL_RULES
# (tests/integration/test_deploy.py checks that both agree and that a real Flower still works).
# Refuses to overwrite an existing secrets folder (rotate keys as docs/OPERATIONS.md says).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -e secrets ] && { echo "secrets/ exists; not overwriting" >&2; exit 1; }
umask 077
mkdir -p secrets/tls
rand() { python3 -c 'import secrets; print(secrets.token_urlsafe(32))'; }
python3 -c 'import base64,secrets,time; print(f"k{int(time.time())}:" + base64.b64encode(secrets.token_bytes(32)).decode())' > secrets/data_keys
api=$(rand); worker=$(rand); flower=$(rand); health=$(rand)
# Celery needs its queue, kombu bindings, unacked bookkeeping and pub/sub channels; the
# limiter and job keys live under m2fp*. Dangerous commands are denied to every role.
common='~m2fp* ~_kombu.* ~unacked* ~celery* &* +@all -@dangerous +info'
cat > secrets/users.acl <<ACL
user default off
user gateway on >$api $common
user worker on >$worker $common
user flower on >$flower resetchannels &/0.celeryev/* resetkeys %R~m2fp %R~celery* %RW~_kombu.binding.celeryev %RW~_kombu.binding_permanent.celeryev %RW~_kombu.binding_deadlines -@all +@connection +@transaction -client +client|setname +client|id +psubscribe +punsubscribe +llen +info +ping +select +sadd +srem +smembers +zadd +zrem +zrangebyscore +exists +time +evalsha +eval +script|load +script|exists
user healthcheck on >$health -@all +ping
ACL
echo "redis://gateway:$api@redis:6379/0" > secrets/redis_url_api
echo "redis://worker:$worker@redis:6379/0" > secrets/redis_url_worker
echo "redis://flower:$flower@redis:6379/0" > secrets/redis_url_flower
echo "admin:$(rand)" > secrets/flower_auth
echo "$health" > secrets/redis_healthcheck
rand > secrets/metrics_token
find secrets -type f -exec chmod 0444 {} +
chmod 0755 secrets/tls
chmod 0700 secrets
echo "secrets written to ./secrets (Flower login in secrets/flower_auth, the metrics scraper's token in"
echo "secrets/metrics_token); add TLS fullchain.pem/privkey.pem to secrets/tls with mode 0444"
