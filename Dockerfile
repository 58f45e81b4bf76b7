# syntax=docker/dockerfile:1
#
# One small image holding both binaries:
#   /usr/local/bin/nerve-agent    the node agent (chart: DaemonSet)
#   /usr/local/bin/nerve-sidecar  the sidecar, its restore init container, and the webhook
#
#   docker build -t ghcr.io/nerve-io/nerve:0.1.0 .
#
# Static binaries on a libc-free base: the builder is Alpine, whose Rust toolchain targets musl
# and links it statically, so the binaries need nothing from the final image but the CA bundle
# (TLS to S3 and the API server) and a non-root user. musl also resolves DNS itself, where a
# static glibc binary would need NSS libraries at run time.
#
# What CI proves without Docker: CI machines can neither run Docker nor install the musl target,
# so .ci/deploy-checks builds the same two binaries statically against glibc instead
# (-C target-feature=+crt-static on x86_64-unknown-linux-gnu, cheaper profile) and runs their
# --help in an empty root filesystem that holds only them and the CA bundle. That shows the code
# links statically and starts with nothing around it; this Dockerfile's musl build itself is
# exercised only where Docker runs.

ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-alpine AS build
# ring (TLS) compiles a little C and assembly.
RUN apk add --no-cache musl-dev
WORKDIR /src
COPY . .
# --locked: exactly the dependency versions CI tested (Cargo.lock).
# The release profile (root Cargo.toml) is LTO, one codegen unit, stripped, panic=abort.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p nerve-agent -p nerve-sidecar --bins \
 && mkdir -p /out \
 && cp target/release/nerve-agent target/release/nerve-sidecar /out/

# distroless/static: CA certificates, /etc/passwd with the "nonroot" user (65532), tzdata, and no
# shell or package manager (about 2 MiB).
FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /out/nerve-agent /out/nerve-sidecar /usr/local/bin/
USER 65532:65532
# The chart and the injected containers name the binary they run; plain `docker run` gets the
# agent.
CMD ["/usr/local/bin/nerve-agent"]
