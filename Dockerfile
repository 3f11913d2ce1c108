# Gateway image: slim official Python, non-root, config read from /etc/gateway/gateway.yaml.
#
#   docker build -t pygateway .
#   docker run --rm -p 8080:8080 -p 9901:9901 \
#     -v "$PWD/my-gateway.yaml:/etc/gateway/gateway.yaml:ro" pygateway
#
# Inside a container the admin server must listen on 0.0.0.0 to be scraped from outside; then
# give it a token (`admin: {address: 0.0.0.0:9901, token: "${env:GATEWAY_ADMIN_TOKEN}"}`): only
# /metrics, /healthz and /readyz stay open. The HEALTHCHECK below talks to 127.0.0.1 and works
# either way.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# A fixed uid so mounted files can be made readable to it.
RUN groupadd --system --gid 10001 gateway \
 && useradd --system --uid 10001 --gid gateway --no-create-home --shell /usr/sbin/nologin gateway

WORKDIR /src
# Metadata first, so the dependency layer is cached while only the code changes.
COPY pyproject.toml README.md ./
COPY gateway ./gateway
RUN pip install . && rm -rf /src

# Default config (the repository's config/gateway.yaml); mount your own over it.
COPY config/gateway.yaml /etc/gateway/gateway.yaml

WORKDIR /
USER gateway

# Client traffic and the admin server (/metrics, /healthz, /readyz, /admin/*).
EXPOSE 8080 9901

HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
  CMD ["python", "-c", "import urllib.request as u; u.urlopen('http://127.0.0.1:9901/healthz', timeout=2)"]

STOPSIGNAL SIGTERM
CMD ["gateway", "run", "-c", "/etc/gateway/gateway.yaml"]
