# syntax=docker/dockerfile:1
# Image holding lade-agent (the entrypoint, run by charts/lade on every node) and the lade CLI.
#
#   docker build -t REGISTRY/lade:0.1.0 --build-arg SOURCE_URL=https://... .

# Any stable Rust at or above the workspace's rust-version (1.88); pin with --build-arg.
ARG RUST_VERSION=1

FROM rust:${RUST_VERSION}-bookworm AS build
# protoc compiles the gRPC contract and the CRI client of the agent and the tests (proto/build.rs).
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends protobuf-compiler \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# Every workspace member is copied, not only the two built: cargo resolves the whole
# workspace (and checks Cargo.lock with --locked) before building any package of it.
COPY Cargo.toml Cargo.lock ./
COPY proto/ proto/
COPY oci/ oci/
COPY agent/ agent/
COPY coordinator/ coordinator/
COPY testkit/ testkit/
COPY tests/ tests/
COPY bench/ bench/
# The cache mounts keep downloaded crates between builds; target/ stays in the layer so the
# next stage can copy the binaries out of it.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    cargo build --release --locked -p lade-agent -p lade

# glibc and libgcc_s: both binaries link them dynamically, nothing else (no shell, no package
# manager in the final image).
FROM gcr.io/distroless/cc-debian12
ARG SOURCE_URL=""
LABEL org.opencontainers.image.source="${SOURCE_URL}" \
      org.opencontainers.image.title="lade" \
      org.opencontainers.image.description="lade-agent (per-node loader of offline image bundles into containerd or Docker) and the lade CLI" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="0.1.0"
COPY --from=build /src/target/release/lade-agent /usr/local/bin/lade-agent
COPY --from=build /src/target/release/lade /usr/local/bin/lade
# Root on purpose: the agent talks to the node's root-owned runtime socket (containerd or
# Docker, mode 0660), which only uid 0 may open; the chart drops every capability and makes
# the root filesystem read-only. Running only the CLI, `--user 65532` (distroless's nonroot) works.
USER 0:0
EXPOSE 7700 7701
ENTRYPOINT ["/usr/local/bin/lade-agent"]
