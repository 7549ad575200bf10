# nginx for the compose TLS profile where the public nginx image cannot be pulled: Debian's
# nginx-light on the local base (deploy/images/build.sh). Runs as uid/gid 101 like the public
# image's worker user (compose sets user: "101:101"); deploy/nginx.conf listens on 8080/8443 and
# keeps its pid and temp files in /tmp, so nothing needs root.
ARG BASE_IMAGE=m2fp/debian-base:bookworm
FROM ${BASE_IMAGE}
RUN groupadd --system --gid 101 nginx && useradd --system --uid 101 --gid 101 --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin nginx \
    && apt-get update && apt-get install -y --no-install-recommends nginx-light \
    && apt-get clean && rm -rf /var/lib/apt/lists/* /var/log/apt /var/log/dpkg.log \
    && ln -sf /dev/stderr /var/log/nginx/error.log
USER 101:101
EXPOSE 8080 8443
STOPSIGNAL SIGQUIT
CMD ["nginx", "-g", "daemon off;"]
