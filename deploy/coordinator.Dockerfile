# The fedcoreml coordinator (`fedcoreml server`). Build from the repository root:
#   docker build -f deploy/coordinator.Dockerfile -t fedcoreml-coordinator:dev .
# The build context is filtered by deploy/coordinator.Dockerfile.dockerignore (BuildKit).
ARG PYTHON_IMAGE=python:3.11-slim
FROM ${PYTHON_IMAGE}

ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    FLWR_TELEMETRY_ENABLED=0 \
    FLWR_DISABLE_UPDATE_CHECK=1

# A fixed numeric user, so Kubernetes' runAsNonRoot can check it; /runs and /certs belong to it,
# and a fresh named volume mounted there takes that ownership.
RUN groupadd --system --gid 10001 fedcoreml \
 && useradd --system --uid 10001 --gid 10001 --home-dir /home/fedcoreml --create-home \
        --shell /usr/sbin/nologin fedcoreml \
 && install -d -o 10001 -g 10001 -m 0750 /runs /certs

# The base install, not editable (the image keeps no source): the coordinator never loads
# TensorFlow, so the image has none (379 MB of installed packages; the devices image: 2.2 GB).
COPY . /tmp/src
RUN --mount=type=cache,target=/root/.cache/pip \
    cd /tmp/src \
 && pip install . \
 && cd / && rm -rf /tmp/src \
 && fedcoreml --help > /dev/null
COPY --chmod=0755 deploy/coordinator-entrypoint.py /usr/local/bin/fedcoreml-coordinator
COPY --chmod=0755 deploy/make-certs.py /usr/local/bin/fedcoreml-make-certs

USER 10001:10001
WORKDIR /home/fedcoreml
VOLUME ["/runs"]
EXPOSE 50051

# No HTTP endpoint: healthy means the device port accepts a TCP connection (TLS or not).
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import socket; socket.create_connection(('127.0.0.1', 50051), timeout=3).close()"]

# Starts the run, or resumes it when /runs/run already holds one (a restarted container).
ENTRYPOINT ["fedcoreml-coordinator"]
CMD ["--listen", "0.0.0.0:50051", "--run-dir", "/runs/run", "--rounds", "5", "--min-devices", "10", \
     "--tls-cert", "/certs/server.pem", "--tls-key", "/certs/server-key.pem"]
