# Builds the tokend image: a Rust builder stage, then a small runtime stage that runs
# as a non-root user. Build from the repository root:
#   docker build -t registry.example.com/tokend:0.1.0 .

FROM rust:1.95-bookworm AS builder
WORKDIR /src
COPY . .
# The cache mounts keep the crate registry and compiled dependencies between builds.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked \
    && cp target/release/tokend /tokend \
    && strip /tokend

# distroless/cc has glibc and libgcc, which the binary links, and no shell. Its
# nonroot user is 65532, as the Kubernetes Deployment expects.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=builder /tokend /usr/local/bin/tokend
USER 65532:65532
EXPOSE 50051 9090
ENTRYPOINT ["/usr/local/bin/tokend"]
CMD ["serve"]
