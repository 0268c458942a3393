# gharial-gateway: the websocket gateway (FastAPI + uvicorn).
# Build from the repository root:
#   docker build -f deploy/docker/gateway.Dockerfile --build-arg PIP_INDEX_URL=<your PyPI mirror> \
#     --build-arg TORCH_INDEX_URL=<index holding the CPU torch 2.13.0 wheel> -t gharial-gateway .
# Multi-stage: wheels are built in "build"; the runtime image holds only the virtual environment,
# runs as a non-root user and works with a read-only root filesystem.

FROM python:3.11.7-slim-bookworm AS build
ARG PIP_INDEX_URL
ARG TORCH_INDEX_URL
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
RUN pip install "pip==25.3" setuptools wheel \
 && pip install --index-url "${TORCH_INDEX_URL:-${PIP_INDEX_URL}}" "torch==2.13.0"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY libs ./libs
COPY services ./services
COPY protos ./protos
RUN pip install grpcio-tools==1.85.1 \
 && python -m grpc_tools.protoc -Iprotos --python_out=libs/gharial/protos --pyi_out=libs/gharial/protos \
      --grpc_python_out=libs/gharial/protos protos/*.proto \
 && sed -i -E 's/^import ([a-z_]+_pb2)( as|$)/from . import \1\2/' libs/gharial/protos/*_pb2*.py \
 && touch libs/gharial/protos/__init__.py \
 && pip uninstall -y grpcio-tools \
 && pip install .

FROM python:3.11.7-slim-bookworm
RUN groupadd --system --gid 10001 gharial \
 && useradd --system --uid 10001 --gid gharial --home-dir /opt/gharial --shell /usr/sbin/nologin gharial
COPY --from=build /opt/venv /opt/venv

ENV PATH=/opt/venv/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 HOME=/tmp
WORKDIR /opt/gharial
USER 10001:10001
EXPOSE 3030
ENTRYPOINT ["gharial-gateway"]
CMD ["--host", "0.0.0.0"]
