# Simulated iPhones (`fedcoreml devices`); also the image of the Flower SuperLink and SuperNodes
# in deploy/compose.flower.yaml. Build from the repository root:
#   docker build -f deploy/devices.Dockerfile -t fedcoreml-devices:dev .
# The build context is filtered by deploy/devices.Dockerfile.dockerignore (BuildKit). The steps
# up to the install are those of coordinator.Dockerfile, so the two builds share them.
ARG PYTHON_IMAGE=python:3.11-slim
FROM ${PYTHON_IMAGE}

ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    FLWR_TELEMETRY_ENABLED=0 \
    FLWR_DISABLE_UPDATE_CHECK=1

RUN groupadd --system --gid 10001 fedcoreml \
 && useradd --system --uid 10001 --gid 10001 --home-dir /home/fedcoreml --create-home \
        --shell /usr/sbin/nologin fedcoreml \
 && install -d -o 10001 -g 10001 -m 0750 /runs /certs

# The README's install command (`pip install -e ".[devices]"`), not editable: the image keeps
# no source. The devices extra brings TensorFlow and flwr-datasets.
COPY . /tmp/src
RUN --mount=type=cache,target=/root/.cache/pip \
    cd /tmp/src \
 && pip install ".[devices]" \
 && cd / && rm -rf /tmp/src \
 && fedcoreml --help > /dev/null

USER 10001:10001
WORKDIR /home/fedcoreml

# A client: nothing listens, so there is nothing for a health check to probe.
HEALTHCHECK NONE

ENTRYPOINT ["fedcoreml"]
CMD ["devices", "--server", "coordinator:50051", "--count", "10", "--ca-cert", "/certs/ca.pem"]
