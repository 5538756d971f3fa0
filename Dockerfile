# usage-agent: the wheel is built in the first stage; the image holds only its install.
# Runs as a numeric non-root user with a read-only root filesystem: the spool and /tmp are volumes.

FROM python:3.13.9-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY agent ./agent
# the wheel alone, then installed with its dependencies into a venv that has no pip of its own
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /dist . \
 && python -m venv --without-pip /opt/usage-agent \
 && pip --python /opt/usage-agent/bin/python install --no-cache-dir --compile /dist/usage_agent-*.whl

FROM python:3.13.9-slim-bookworm
LABEL org.opencontainers.image.title="usage-agent" \
      org.opencontainers.image.description="Billing-grade infrastructure usage agent" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /opt/usage-agent /opt/usage-agent
RUN mkdir -p /var/lib/usage-agent /etc/usage-agent \
 && chown 10001:10001 /var/lib/usage-agent
ENV PATH=/opt/usage-agent/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    TMPDIR=/tmp
USER 10001:10001
VOLUME ["/var/lib/usage-agent", "/tmp"]
EXPOSE 9464
# No HEALTHCHECK: the address is set in the config (server.listen), and orchestrators probe
# /healthz and /readyz themselves (the Helm chart does).
ENTRYPOINT ["usage-agent"]
CMD ["run", "-c", "/etc/usage-agent/config.yaml"]
