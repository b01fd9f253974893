# The two commands of the README: `make demo` and `make test`.
CARGO ?= cargo

.PHONY: demo test deps crds install-yaml images lint

## Install etcd, build kube-apiserver, install helm, kubectl and promtool, once (cached in
## ~/.cache/kernelflow or installed from Debian).
deps:
	scripts/install-control-plane.sh
	scripts/install-tools.sh

## The local demo: embedded control plane (or $KUBECONFIG), operator, three agents, examples.
demo: deps
	$(CARGO) build --workspace --bins
	target/debug/kernelflow-demo

## Every test, the end-to-end ones against a real kube-apiserver and etcd.
test: deps
	$(CARGO) build --workspace --bins
	$(CARGO) test --workspace

## Regenerate the CRD YAML (crds/, the chart's crds/) and docs/crd-reference.md from the types.
crds:
	$(CARGO) run -p kernelflow-crds --bin crdgen

## Regenerate examples/install.yaml (plain manifests for kubectl) from the Helm chart.
install-yaml:
	scripts/render-install-yaml.sh > examples/install.yaml.new
	mv examples/install.yaml.new examples/install.yaml

## The operator and agent images (Dockerfile), named and tagged as the chart pulls them.
DOCKER ?= docker
IMAGE_REGISTRY ?= ghcr.io/kernelflow
IMAGE_TAG ?= $(shell sed -n 's/^appVersion: "\(.*\)"/\1/p' charts/kernelflow/Chart.yaml)
images:
	$(DOCKER) build --target operator -t $(IMAGE_REGISTRY)/kernelflow-operator:$(IMAGE_TAG) .
	$(DOCKER) build --target agent -t $(IMAGE_REGISTRY)/kernelflow-agent:$(IMAGE_TAG) .

lint:
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
