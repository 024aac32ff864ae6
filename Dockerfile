# hpsearch worker/dashboard image. torch 2.14.1 from PyPI is a CUDA build: the same image runs on GPUs
# (with the NVIDIA container toolkit) and on CPUs.
FROM python:3.11-slim
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install "torch==2.14.1" "torchvision==0.29.1" && pip install ".[s3]"
COPY studies ./studies
# Data and pretrained weights are mounted, not baked in.
VOLUME ["/data", "/artifacts"]
ENTRYPOINT ["hpsearch"]
CMD ["--help"]
