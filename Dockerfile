# syntax=docker/dockerfile:1
# Build: docker build -t ctwa-relay .
# Run:   docker run -p 8080:8080 -v ctwa-data:/data -e CTWA_APP_SECRETS=... -e CTWA_VERIFY_TOKEN=... -e CTWA_ADMIN_TOKEN=... ctwa-relay

FROM rust:1-slim-bookworm AS build
WORKDIR /src
# Dependencies first, so that source edits do not rebuild them.
COPY Cargo.toml Cargo.lock ./
RUN mkdir -p src/bin/ctwa-bench && touch src/lib.rs \
    && echo 'fn main() {}' | tee src/main.rs src/bin/ctwa-bench/main.rs >/dev/null \
    && cargo build --release --locked --bin ctwa-relay \
    && rm -rf src
COPY src ./src
# Make sure cargo sees the real sources as newer than the placeholder build.
RUN touch src/main.rs src/lib.rs && cargo build --release --locked --bin ctwa-relay

FROM debian:bookworm-slim AS runtime
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 ctwa \
    && useradd --system --uid 10001 --gid ctwa --home-dir /data --shell /usr/sbin/nologin ctwa \
    && mkdir -p /data && chown ctwa:ctwa /data
COPY --from=build /src/target/release/ctwa-relay /usr/local/bin/ctwa-relay
USER ctwa:ctwa
ENV CTWA_LISTEN=0.0.0.0:8080 \
    CTWA_DATA_DIR=/data \
    CTWA_LOG_FORMAT=json
VOLUME ["/data"]
EXPOSE 8080
# /healthz answers 503 once a disk failure has broken the store (it stays broken until a
# restart); the image has no curl, so bash's /dev/tcp asks. Swarm, Kubernetes or an autoheal
# container restart an unhealthy one. Follows CTWA_LISTEN's port if you change it.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/${CTWA_LISTEN##*:} && printf 'GET /healthz HTTP/1.0\\r\\n\\r\\n' >&3 && head -n 1 <&3 | grep -q ' 200 '"]
# actix drains requests on SIGTERM; the store is flushed before exit.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/ctwa-relay"]
CMD ["serve"]
