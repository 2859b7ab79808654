# syntax=docker/dockerfile:1
# The image that `fldsl compile --target kubernetes|compose` files run (docs/deploy.md):
#
#   docker build -t fldsl:0.1.0 .                    # attestation sim (the default, last stage)
#   docker build --target sgx -t fldsl:0.1.0-sgx .   # attestation dcap: adds Gramine and Intel's DCAP QVL
#
# Tag it with the version of the source it is built from (fldsl/__init__.py), and build it from the very source
# that compiles the pipeline: a node's simulated measurement covers the installed fldsl code, and the
# compiled manifests list the files of the environment that compiled them, so every party compiles inside
# this image (docker run --rm -u "$(id -u):$(id -g)" -v "$PWD:/w" -w /w fldsl:0.1.0 compile ...).
#
# fldsl is installed (a regular install, not editable) into a venv at /opt/fldsl/venv, whose bin/ comes first
# on PATH: `python3 -I -m fldsl.runtime.node` (isolated mode, how every node starts) runs the venv's Python
# with the venv's packages. The image runs as the non-root user 10001:10001; the entrypoint is `fldsl`.
ARG DEBIAN=debian:bookworm-slim

FROM ${DEBIAN} AS os
ENV DEBIAN_FRONTEND=noninteractive LANG=C.UTF-8
# Debian 12: Python 3.11 (fldsl needs >= 3.11), and the distribution Gramine v1.9 is tested on here.
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 ca-certificates \
 && rm -rf /var/lib/apt/lists/*
# Mount points, owned by root and read-only to the node, except where the node writes: /fldsl/sealed (sim)
# and /fldsl/work/run (dcap), owned by the image's group with setgid, so that a named volume created on them
# is writable by the node's group whatever its uid (compose runs it as the trust folder's owner).
RUN groupadd --system --gid 10001 fldsl \
 && useradd --system --uid 10001 --gid 10001 --home-dir /tmp --no-create-home --shell /usr/sbin/nologin fldsl \
 && install -d -m 0755 /fldsl /fldsl/node /fldsl/run /fldsl/trust /fldsl/data /fldsl/nodes \
      /fldsl/work /fldsl/work/node /fldsl/work/pycache /fldsl/work/data /fldsl/work/trust \
 && install -d -o 10001 -g 10001 -m 2770 /fldsl/sealed /fldsl/work/run
ENV PATH=/opt/fldsl/venv/bin:$PATH HOME=/tmp TF_CPP_MIN_LOG_LEVEL=2 TF_ENABLE_ONEDNN_OPTS=0

FROM os AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3-venv \
 && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/fldsl/venv
COPY pyproject.toml setup.py README.md /src/
COPY fldsl/ /src/fldsl/
COPY compiler/ /src/compiler/
COPY runtime/ /src/runtime/
COPY stdlib/ /src/stdlib/
COPY grammar/ /src/grammar/
COPY pipelines/ /src/pipelines/
# A wheel built from /src and installed: the venv holds its own copy of the code (nothing points back at /src,
# which stays in this stage), compiled to bytecode now because the nodes' root filesystem is read-only.
RUN /opt/fldsl/venv/bin/pip install --no-cache-dir /src \
 && /opt/fldsl/venv/bin/fldsl --help > /dev/null

FROM os AS sgx
# Gramine from its apt repository, and Intel's DCAP quote verification library and quote provider (a node
# under attestation dcap verifies its peers' quotes with them; quotes themselves come from the host's AESM
# service through /var/run/aesmd). As in Gramine's installation guide for Debian 12, Intel's packages come
# from its Ubuntu 22.04 (jammy) repository. Pin Gramine with --build-arg GRAMINE=gramine=<version>
# (`apt-cache policy gramine` lists them; docs/trust.md describes the v1.9 tested here with gramine-direct).
ARG GRAMINE=gramine
ARG GRAMINE_SUITE=bookworm
ARG INTEL_SGX_SUITE=jammy
RUN apt-get update \
 && apt-get install -y --no-install-recommends curl \
 && install -d -m 0755 /etc/apt/keyrings \
 && curl -fsSLo /etc/apt/keyrings/gramine-keyring-${GRAMINE_SUITE}.gpg \
      https://packages.gramineproject.io/gramine-keyring-${GRAMINE_SUITE}.gpg \
 && echo "deb [arch=amd64 signed-by=/etc/apt/keyrings/gramine-keyring-${GRAMINE_SUITE}.gpg] https://packages.gramineproject.io/ ${GRAMINE_SUITE} main" \
      > /etc/apt/sources.list.d/gramine.list \
 && curl -fsSLo /etc/apt/keyrings/intel-sgx-deb.asc https://download.01.org/intel-sgx/sgx_repo/ubuntu/intel-sgx-deb.key \
 && echo "deb [arch=amd64 signed-by=/etc/apt/keyrings/intel-sgx-deb.asc] https://download.01.org/intel-sgx/sgx_repo/ubuntu ${INTEL_SGX_SUITE} main" \
      > /etc/apt/sources.list.d/intel-sgx.list \
 && apt-get update \
 && apt-get install -y --no-install-recommends ${GRAMINE} libsgx-dcap-quote-verify libsgx-dcap-default-qpl \
 && apt-get purge -y curl && apt-get autoremove -y \
 && rm -rf /var/lib/apt/lists/* \
 && gramine-sgx-sign --help > /dev/null
COPY --from=build /opt/fldsl/venv /opt/fldsl/venv
USER 10001:10001
WORKDIR /fldsl
ENTRYPOINT ["fldsl"]
CMD ["--help"]

FROM os AS fldsl
COPY --from=build /opt/fldsl/venv /opt/fldsl/venv
USER 10001:10001
WORKDIR /fldsl
ENTRYPOINT ["fldsl"]
CMD ["--help"]
