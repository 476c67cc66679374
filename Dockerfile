# nuclei-seg: CPU inference service. Build: docker build -t nuclei-seg .  Run: docker run -p 8000:8000 nuclei-seg
# For Dask workers (nuclei-seg segment --scheduler): docker build --build-arg EXTRAS=dask -t nuclei-seg:dask .
FROM python:3.11-slim
ARG EXTRAS=""

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    NUCLEI_HOST=0.0.0.0 \
    NUCLEI_PORT=8000 \
    NUCLEI_MODEL_DIR=/app/models/default

WORKDIR /app
COPY constraints.txt pyproject.toml README.md ./
COPY service ./service
RUN pip install --constraint constraints.txt ".${EXTRAS:+[$EXTRAS]}" \
    && useradd --uid 10001 --no-create-home --shell /usr/sbin/nologin app
COPY models/default ./models/default

USER 10001
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('NUCLEI_PORT', '8000') + '/healthz', timeout=4)"]
ENTRYPOINT ["nuclei-serve"]
