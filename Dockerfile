# syntax=docker/dockerfile:1
#
# The flowcraft image: one binary that is operator, worker, reconciler and CLI.
#   docker build -t flowcraft:dev --build-arg GIT_COMMIT=$(git rev-parse --short=12 HEAD) .
#   docker run --rm flowcraft:dev --version
# The build context has no .git (.dockerignore), so the commit `flowcraft --version` prints comes from the
# GIT_COMMIT build argument ("unknown" without it). Releases are built by .github/workflows/release.yml.
#
# Runtime: distroless cc (glibc, CA certificates, no shell), user 65532:65532, the binary at
# /usr/local/bin/flowcraft. Nothing is written to disk, so a read-only root filesystem works.

# ---- build -------------------------------------------------------------------------------------------
FROM rust:1-bookworm AS builder
WORKDIR /src

# Dependencies first: build them against a dummy crate so this layer is reused until Cargo.toml or
# Cargo.lock change.
# The manifest names bench targets, so they need (dummy) files for the manifest to parse; they stay, since only
# the binary is built below.
COPY Cargo.toml Cargo.lock ./
RUN mkdir -p src benches \
 && echo 'fn main() {}' > src/main.rs \
 && echo '' > src/lib.rs \
 && for b in $(awk '/^\[\[bench\]\]/{b=1;next} b&&/^name/{gsub(/"/,"",$3);print $3;b=0}' Cargo.toml); do echo 'fn main() {}' > "benches/$b.rs"; done \
 && cargo build --release --locked --lib \
 && rm -rf src \
 && rm -rf target/release/.fingerprint/flowcraft-* target/release/deps/flowcraft-* \
           target/release/deps/libflowcraft-* target/release/flowcraft*

# Then the crate itself, with everything it compiles in (include_str! of migrations/, crds/, README.md;
# the README.m[d] glob copies it when it exists and is not an error when it does not).
COPY Cargo.toml build.rs README.m[d] ./
COPY src ./src
COPY migrations ./migrations
COPY crds ./crds
# COPY keeps the context's mtimes, which may be older than the dummy build: touch so cargo rebuilds.
ARG GIT_COMMIT=unknown
RUN touch src/main.rs src/lib.rs \
 && FLOWCRAFT_GIT_COMMIT="$GIT_COMMIT" cargo build --release --locked --bin flowcraft \
 && cp target/release/flowcraft /usr/local/bin/flowcraft

# ---- runtime -----------------------------------------------------------------------------------------
FROM gcr.io/distroless/cc-debian12:nonroot
ARG GIT_COMMIT=unknown

LABEL org.opencontainers.image.title="flowcraft" \
      org.opencontainers.image.description="Distributed workflow engine on RabbitMQ, PostgreSQL and Redis, with a Kubernetes operator" \
      org.opencontainers.image.licenses="MIT" \
      org.opencontainers.image.revision="${GIT_COMMIT}"

COPY --from=builder /usr/local/bin/flowcraft /usr/local/bin/flowcraft
USER 65532:65532
# Admin port: /healthz, /readyz, /metrics.
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/flowcraft"]
