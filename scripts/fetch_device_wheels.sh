#!/usr/bin/env bash
# Download the wheels the GPU machine lacks (its Python 3.12 image has torch,
# triton, transformers, grpcio, anyio, uvloop, httpx) into .whl/, which the
# device tool carries. The REST gateway (serving.py --http) needs fastapi's and
# uvicorn's own requirements too: annotated-doc, opentelemetry-api (fastapi
# imports it), click (uvicorn imports it), h11; gguf and accelerate (GGUF loading
# and its tests); xgrammar and apache-tvm-ffi (structured output, mii[structured],
# benchmarks/structured.py); httpx2, httpcore2, truststore, sniffio (the openai client
# imports httpx2: tests/test_gateway.py did not collect there without them); jsonschema with
# attrs, jsonschema-specifications, referencing and rpds-py (tests/test_structured_output.py
# imports it: it did not collect there). Install there with:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
#   export PYTHONPATH=/tmp/site:$PWD/src
set -euo pipefail
cd "$(dirname "$0")/.."
exclude="$(git rev-parse --git-dir)/info/exclude"; mkdir -p "$(dirname "$exclude")"; touch "$exclude"
grep -qxF "/.whl/" "$exclude" || echo "/.whl/" >> "$exclude"
mkdir -p .whl
download() {
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform any -d .whl "$@"
}
download pydantic==2.13.4 pydantic-core==2.46.4 annotated-types==0.7.0 typing-inspection==0.4.2 \
  grpcio==1.85.1 grpcio-health-checking==1.85.1 grpcio-reflection==1.85.1 protobuf==7.35.1 \
  fastapi==0.165.0 starlette uvicorn==0.54.0 prometheus-client==0.26.0 \
  annotated-doc==0.0.7 opentelemetry-api==1.45.2 click==8.5.1 \
  pytest-asyncio==1.3.0 openai==3.57.0 jiter distro h11 gguf==0.19.0 accelerate==1.16.0 \
  httpx2 httpcore2 truststore sniffio \
  xgrammar==0.2.9 apache-tvm-ffi==0.1.15.post2 \
  jsonschema jsonschema-specifications referencing rpds-py attrs
ls -la .whl
