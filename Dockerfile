# mongobranch: the proxy plus the embedded SecantusDB server (used when no --upstream
# is given). Build from the repository root:
#
#   docker build -t mongobranch .
#   docker run -p 27018:27018 -p 9090:9090 mongobranch                        # embedded server
#   docker run -p 27018:27018 -p 9090:9090 mongobranch --upstream mongodb://db:27017/
#
# Arguments after the image name are appended to `mongobranch serve`; a repeated option
# (e.g. --listen 127.0.0.1:27018) overrides the one in the entrypoint. The upstream URI can
# also come from the MONGOBRANCH_UPSTREAM environment variable.
#
# The admin API listens on 0.0.0.0:9090, so it needs a bearer token: the proxy refuses
# to start without one. It is read from the secret file below (Docker/Compose secrets are
# mounted under /run/secrets/), e.g.
#
#   openssl rand -hex 32 > admin-token
#   docker run --mount type=bind,src=$PWD/admin-token,dst=/run/secrets/mongobranch_admin_token,readonly ...
#
# (or pass MONGOBRANCH_ADMIN_TOKEN with MONGOBRANCH_ADMIN_TOKEN_FILE set empty).

# Build stage: the package's wheel, with its compiled relay checks (proxy/wire/_cwire.pyx,
# Cython; pip fetches Cython as a build requirement). The image's Python headers are there;
# gcc is added here only.
FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY proxy ./proxy
RUN pip wheel --no-deps --wheel-dir /wheels . \
    && python -c "import sys, zipfile, glob; \
names = zipfile.ZipFile(glob.glob('/wheels/*.whl')[0]).namelist(); \
sys.exit(0 if any(n.startswith('proxy/wire/_cwire') and n.endswith('.so') for n in names) \
         else 'the compiled extension is missing from the wheel')"

FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MONGOBRANCH_ADMIN_TOKEN_FILE=/run/secrets/mongobranch_admin_token

# Every dependency, SecantusDB included, ships manylinux wheels; mongobranch's own wheel
# comes from the build stage: no compiler in this image.
COPY --from=build /wheels /wheels
RUN pip install "$(ls /wheels/mongobranch-*.whl)[embedded]" && rm -rf /wheels \
    && useradd --system --uid 10001 --home-dir /data --create-home mongobranch

USER mongobranch
WORKDIR /data
# Data of the embedded server; unused with --upstream (branch metadata lives upstream).
VOLUME ["/data"]

# Main port, admin HTTP API, branch ports.
EXPOSE 27018 9090 27100-27199

HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9090/healthz', timeout=2)"]

ENTRYPOINT ["mongobranch", "serve", "--listen", "0.0.0.0:27018", "--admin", "0.0.0.0:9090", \
            "--data-dir", "/data"]
