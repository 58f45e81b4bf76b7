# syntax=docker/dockerfile:1
#
# One small image holding both binaries:
#   /usr/local/bin/nerve-agent    the node agent (chart: DaemonSet)
#   /usr/local/bin/nerve-sidecar  the sidecar, its restore init container, and the webhook
#
#   docker build -t ghcr.io/nerve-io/nerve:0.1.0 .
#
# Static binaries on an empty base: the builder is Alpine, whose Rust toolchain targets musl
# and links it statically, so the binaries need nothing from the final image but the CA bundle
# (TLS to S3 and the API server) and a non-root user. musl also resolves DNS itself, where a
# static glibc binary would need NSS libraries at run time.
#
# Allocator: both binaries set mimalloc as the Rust global allocator, so musl's malloc (one lock
# for all threads) is not on the transfer path, and the image runs the same allocator as the
# glibc builds the benchmarks measure (docs/deploy.md, "Allocator"). Its C compiles with the same
# compiler as ring's.
#
# What CI proves without Docker: CI machines can neither run Docker nor install the musl target,
# so .ci/deploy-checks builds the same two binaries statically against glibc instead
# (-C target-feature=+crt-static on x86_64-unknown-linux-gnu, cheaper profile) and runs their
# --help in an empty root filesystem that holds only them and the CA bundle. That shows the code
# links statically and starts with nothing around it; this Dockerfile's musl build itself is
# exercised only where Docker runs.

ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-alpine AS build
# ring (TLS) compiles a little C and assembly; ca-certificates provides the bundle the final
# image carries.
RUN apk add --no-cache musl-dev ca-certificates
WORKDIR /src
COPY . .
# --locked: exactly the dependency versions CI tested (Cargo.lock).
# The release profile (root Cargo.toml) is LTO, one codegen unit, stripped, panic=abort.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p nerve-agent -p nerve-sidecar --bins \
 && mkdir -p /out \
 && cp target/release/nerve-agent target/release/nerve-sidecar /out/

# Nothing but the two binaries and the CA bundle, at a path rustls-native-certs finds.
# Measured with glibc (+crt-static, this release profile): the stripped binaries are 10.2 MiB
# (agent) and 13.5 MiB (sidecar), 23.7 MiB together; musl's should be about the same or smaller
# (no static NSS or locale code) but are not measured here. That leaves room for the 0.2 MiB CA
# bundle under the 25 MiB target, and not for a distroless base (about 2 MiB). 65532 is the
# conventional "nonroot" user; no /etc/passwd is needed to run as a number.
FROM scratch
COPY --from=build /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
COPY --from=build /out/nerve-agent /out/nerve-sidecar /usr/local/bin/
USER 65532:65532
# The chart and the injected containers name the binary they run; plain `docker run` gets the
# agent.
CMD ["/usr/local/bin/nerve-agent"]
