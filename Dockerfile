# syntax=docker/dockerfile:1
#
# mtls-sidecar image: the `proxy` sidecar and the `ca` service, one image, two console scripts.
#
#   docker build -t mtls-sidecar:0.1.0 .
#   docker run --read-only \
#     -v "$PWD/web-id:/run/identity:ro" -v "$PWD/sidecar.yaml:/etc/sidecar/config.yaml:ro" \
#     -p 8443:8443 mtls-sidecar:0.1.0
#   docker run ... --entrypoint ca mtls-sidecar:0.1.0 serve --listen 0.0.0.0:8443   # the CA service
#
# Mounts the image expects (nothing is baked in, and nothing under them is written):
#   /etc/sidecar/config.yaml  the sidecar config (read-only)
#   /run/identity/            cert.pem, key.pem, bundle.pem[, crl.pem] from `ca issue` (read-only)
# The root filesystem can be read-only: the process writes nothing but stderr.
#
# The base is pinned by version tag. For reproducible builds pin the digest you verified as well:
#   FROM python:3.11.17-slim-bookworm@sha256:<digest of `docker buildx imagetools inspect`>

# ---- builder: a wheel of the project, then a venv with it and its runtime dependencies -------------
FROM python:3.11.17-slim-bookworm AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /src
RUN python -m venv /opt/venv

# Only what the wheel is built from (see .dockerignore: everything else stays out of the context).
COPY pyproject.toml README.md ./
COPY ca/ ca/
COPY mtls/ mtls/
COPY proxy/ proxy/

# The wheel has no test extras; pip installs only the runtime dependencies named in pyproject.toml.
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels . \
    && /opt/venv/bin/pip install --no-cache-dir /wheels/*.whl \
    && /opt/venv/bin/python -m compileall -q /opt/venv/lib \
    && /opt/venv/bin/proxy --version \
    && /opt/venv/bin/ca --help > /dev/null

# Mount points, created here so the final stage needs no RUN (and so no shell) at all.
RUN mkdir -p /rootfs/etc/sidecar /rootfs/run/identity

# ---- egress-redirect: the one-shot `proxy redirect --apply` of the init container ------------------
# The same venv plus nftables, which `proxy redirect` drives. Built apart from the sidecar's image:
#   docker build --target egress-redirect -t mtls-sidecar-redirect:0.1.0 .
# It runs once per pod with NET_ADMIN (the only container that has it), writes the rules and exits.
FROM python:3.11.17-slim-bookworm AS egress-redirect

RUN apt-get update \
    && apt-get install -y --no-install-recommends nftables=1.0.6-2+deb12u2 \
    && rm -rf /var/lib/apt/lists/*

COPY --from=builder /opt/venv /opt/venv
ENV PATH="/opt/venv/bin:${PATH}" \
    PYTHONDONTWRITEBYTECODE=1 \
    PROXY_CONFIG=/etc/sidecar/config.yaml
# The pod gives it root for this one command (capabilities are granted to root only); the image itself
# does not run as root.
USER 65532:65532
HEALTHCHECK NONE
ENTRYPOINT ["proxy"]
CMD ["redirect", "--print"]

# ---- runtime: the interpreter from the same base, the venv, nothing else ---------------------------
FROM python:3.11.17-slim-bookworm AS runtime

LABEL org.opencontainers.image.title="mtls-sidecar" \
      org.opencontainers.image.description="Zero-trust mutual-TLS sidecar (proxy) and SPIFFE X.509-SVID CA (ca)" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.base.name="docker.io/library/python:3.11.17-slim-bookworm"

COPY --from=builder /opt/venv /opt/venv
COPY --from=builder /rootfs/ /

ENV PATH="/opt/venv/bin:${PATH}" \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PROXY_CONFIG=/etc/sidecar/config.yaml

# A numeric user and group with no entry in /etc/passwd: nothing in the image belongs to it, so it can
# write nothing but the volumes it is given. 65532 is the "nonroot" id of distroless images.
USER 65532:65532
WORKDIR /

# 8443: the inbound mTLS listener of the example configs; 15000: admin (/healthz, /readyz, /metrics).
# Outbound listeners bind loopback only and are not exposed.
EXPOSE 8443 15000

# Exec form everywhere: no shell is started at run time.
HEALTHCHECK --interval=15s --timeout=5s --start-period=10s --retries=3 \
    CMD ["proxy", "health", "--admin", "127.0.0.1:15000"]

ENTRYPOINT ["proxy"]
CMD ["run", "-c", "/etc/sidecar/config.yaml"]
