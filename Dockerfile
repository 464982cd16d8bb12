# syntax=docker/dockerfile:1
# amqp-gateway: multi-stage build, small runtime image, non-root user.
#   docker build -t amqp-gateway .
#   docker run -p 8080:8080 -p 1883:1883 -p 5672:5672 amqp-gateway
# Inside the container MQTT uses the standard 1883 and AMQP 5672 (there is no broker beside it).
# TLS: mount a certificate and key and point at them; HTTPS/WSS then serve on 8080, MQTTS on 8883
# and AMQPS on 5671 (kill -HUP 1 reloads the files):
#   docker run -v /etc/gw-tls:/tls:ro -e GATEWAY_TLS__CERT=/tls/cert.pem \
#     -e GATEWAY_TLS__KEY=/tls/key.pem -p 8080:8080 -p 8883:8883 -p 5671:5671 amqp-gateway

FROM rust:1.95-bookworm AS build
WORKDIR /src
# Dependencies first, in their own layer, so source edits do not rebuild them.
# The bench is a workspace member: its manifest must be there, its code is not built here.
COPY Cargo.toml Cargo.lock ./
COPY bench/Cargo.toml ./bench/
RUN mkdir -p src bench/src && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
    && echo 'fn main() {}' > bench/src/main.rs \
    && cargo build --release --locked -p amqp-gateway \
    && rm -rf src
COPY src ./src
# The browser client and console are compiled into the binary (include_str!).
COPY web ./web
COPY config ./config
RUN touch src/main.rs src/lib.rs \
    && cargo build --release --locked -p amqp-gateway \
    && cp target/release/amqp-gateway /usr/local/bin/amqp-gateway

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --user-group --home-dir /var/lib/amqp-gateway --create-home gateway
COPY --from=build /usr/local/bin/amqp-gateway /usr/local/bin/amqp-gateway
COPY config/gateway.toml /etc/amqp-gateway/gateway.toml
ENV GATEWAY_HTTP__LISTEN=0.0.0.0:8080 \
    GATEWAY_MQTT__LISTEN=0.0.0.0:1883 \
    GATEWAY_AMQP__LISTEN=0.0.0.0:5672 \
    GATEWAY_ENGINE__DATA_DIR=/var/lib/amqp-gateway \
    GATEWAY_LOG__FORMAT=json
USER gateway:gateway
WORKDIR /var/lib/amqp-gateway
VOLUME ["/var/lib/amqp-gateway"]
EXPOSE 8080 1883 5672 8883 5671
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/amqp-gateway", "--config", "/etc/amqp-gateway/gateway.toml"]
