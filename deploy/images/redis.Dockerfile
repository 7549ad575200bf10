# Redis for docker-compose where the public redis image cannot be pulled: Debian's redis-server
# on the local base (deploy/images/build.sh). Runs as uid/gid 999 like the public image (compose
# sets user: "999:999"); the config and ACL file are mounted by docker-compose.yml.
ARG BASE_IMAGE=m2fp/debian-base:bookworm
FROM ${BASE_IMAGE}
RUN groupadd --system --gid 999 redis && useradd --system --uid 999 --gid 999 --no-create-home \
        --home-dir /var/lib/redis --shell /usr/sbin/nologin redis \
    && apt-get update && apt-get install -y --no-install-recommends redis-server \
    && apt-get clean && rm -rf /var/lib/apt/lists/* /var/log/apt /var/log/dpkg.log
USER 999:999
WORKDIR /tmp
EXPOSE 6379
CMD ["redis-server", "/etc/redis/redis.conf"]
