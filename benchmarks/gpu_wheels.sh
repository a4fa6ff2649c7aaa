#!/usr/bin/env bash
# The wheels a device machine (Python 3.12, its own torch/transformers image, no network) needs to run
# benchmarks/gpu_profile.sh: what `pip install -e .` installs that the machine's image lacks, plus the
# transformers and huggingface_hub this project is tested with. Run here, from the repository root;
# then carry `.whl` (about 43 MB). Versions: the ones the CPU environment had on 2026-11-27.
set -euo pipefail
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_27_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux1_x86_64 -d .whl \
  aiosqlite==0.22.1 \
  alembic==1.20.1 \
  annotated-types==0.8.0 \
  apache-tvm-ffi==0.1.15.post2 \
  diffusers==0.42.1 \
  distro==1.9.0 \
  httpcore2==2.16.2 \
  httpx2==2.16.2 \
  huggingface-hub==2.4.0 \
  importlib-metadata==10.2.0 \
  jsonpatch==1.48 \
  jsonpointer==3.12 \
  langchain-core==1.8.3 \
  langchain-protocol==0.0.20 \
  langgraph==1.2.24 \
  langgraph-checkpoint==4.3.2 \
  langgraph-checkpoint-postgres==3.2.0 \
  langgraph-checkpoint-sqlite==3.1.2 \
  langgraph-prebuilt==1.1.3 \
  langgraph-sdk==0.4.14 \
  langsmith==0.15.1 \
  lazy-importer==0.1.0 \
  mako==1.4.3 \
  orjson==3.13.0 \
  ormsgpack==1.13.1 \
  psycopg==3.3.9 \
  psycopg-pool==3.3.3 \
  pydantic==2.14.4 \
  pydantic-core==2.50.5 \
  requests-toolbelt==1.0.0 \
  sniffio==1.3.1 \
  sqlalchemy==2.1.9 \
  sqlite-vec==0.1.9 \
  tenacity==9.2.1 \
  transformers==5.24.0 \
  truststore==0.10.5 \
  typing-inspection==0.4.5 \
  uuid-utils==0.19.0 \
  websockets==17.4 \
  xgrammar==0.2.8 \
  zstandard==0.25.0 \
  && ls .whl | wc -l
