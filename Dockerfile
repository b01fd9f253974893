# syntax=docker/dockerfile:1
# The operator and agent images the chart runs (charts/kernelflow/values.yaml):
#   docker build --target operator -t ghcr.io/kernelflow/kernelflow-operator:0.1.0 .
#   docker build --target agent    -t ghcr.io/kernelflow/kernelflow-agent:0.1.0 .
# (`make images` builds both.) The chart passes only `args`: each image's entrypoint is its
# binary, and both run as the non-root user 65532 the chart's securityContext names.

FROM docker.io/library/rust:1.95-bookworm AS build
# aws-lc-sys (rustls' crypto, through object_store) may build with CMake.
RUN apt-get -o Acquire::Retries=5 update && apt-get -o Acquire::Retries=5 install -y --no-install-recommends cmake && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p kernelflow-operator -p kernelflow-agent \
    && install -D -t /out target/release/kernelflow-operator target/release/kernelflow-agent

# glibc and CA certificates (the kube client trusts the cluster's CA from the service account).
FROM gcr.io/distroless/cc-debian12:nonroot AS operator
COPY --from=build /out/kernelflow-operator /usr/local/bin/kernelflow-operator
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/kernelflow-operator"]

# The agent loads cuBLAS and cuDNN 9 at run time (cudarc's dynamic loading, CUDA 12.8
# bindings); the NVIDIA container toolkit mounts the node driver's libcuda. Without them it
# falls back to its CPU backend (`--backend auto`). CA certificates: the remote artifact store.
FROM docker.io/nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 AS agent
COPY --from=build /out/kernelflow-agent /usr/local/bin/kernelflow-agent
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/kernelflow-agent"]
