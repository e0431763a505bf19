# syntax=docker/dockerfile:1
# Weir's container image: the `weir` binary plus the example function components, which
# `weir up` finds in /opt/weir/functions. Used by docker-compose.yml (`docker compose up`).

# ---- build: the functions (wasm32-wasip2 components) and the weir binary ----------------------
# The rust image has libssl-dev and pkg-config, which librdkafka's TLS and SCRAM build against.
FROM rust:1.95-bookworm AS builder
RUN rustup target add wasm32-wasip2
WORKDIR /src
# .dockerignore keeps target/ directories and .git out of the context.
COPY . .
RUN cd functions && cargo build --release --locked
RUN cargo build --release --locked -p weir-dispatcher --bin weir

# ---- run ------------------------------------------------------------------------------------
FROM debian:bookworm-slim
# curl is for the compose health check (GET /healthz); ca-certificates for TLS brokers; libssl3
# is the OpenSSL librdkafka is linked against.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl libssl3 \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home-dir /nonexistent --shell /usr/sbin/nologin weir
COPY --from=builder /src/target/release/weir /usr/local/bin/weir
COPY --from=builder /src/functions/target/wasm32-wasip2/release/*.wasm /opt/weir/functions/
USER weir
ENV WEIR_FUNCTIONS_DIR=/opt/weir/functions
EXPOSE 8080
ENTRYPOINT ["weir"]
CMD ["up", "--http", "0.0.0.0:8080"]
