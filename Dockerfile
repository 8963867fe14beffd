# spsa-nas: one image for the API (`spsa-nas serve`), the Ray head and the GPU Ray workers.
# The PyPI torch wheels for Linux bundle CUDA; the workers see GPUs through the NVIDIA runtime.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update && apt-get install -y --no-install-recommends libgomp1 && rm -rf /var/lib/apt/lists/*

WORKDIR /app
RUN pip install torch==2.14.1 torchvision==0.29.1
COPY pyproject.toml README.md ./
COPY spsa_nas ./spsa_nas
COPY search_spaces ./search_spaces
COPY workers ./workers
COPY service ./service
RUN pip install .

# Every container runs as this unprivileged user (fixed uid, so volumes keep their owner across
# rebuilds). Its home holds Ray's and the latency gate's per-user files (~/.ray, ~/.cache).
RUN groupadd --gid 10001 spsa && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/spsa spsa
# Volumes shared by the API and the workers (see docker-compose.yml); a new named volume takes
# its owner from these directories, so the user can write them.
RUN mkdir -p /srv/spsa-nas/artifacts /srv/spsa-nas/datasets /srv/spsa-nas/data \
    && chown -R 10001:10001 /srv/spsa-nas
USER 10001:10001
EXPOSE 8000
CMD ["spsa-nas", "serve", "--host", "0.0.0.0", "--port", "8000"]
