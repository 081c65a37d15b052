# CPU image of medreport: serves the web UI on the shipped demo model.
#   docker build -t medreport .
#   docker run --rm -p 7860:7860 medreport
# The demo model is trained on synthetic data - not for clinical use.
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    OMP_NUM_THREADS=4 \
    GRADIO_ANALYTICS_ENABLED=False

# libsndfile for soundfile; g++ builds the compiled CPU kernels (MoE, attention; core/csrc) once, below.
RUN apt-get update \
    && apt-get install -y --no-install-recommends libsndfile1 g++ \
    && rm -rf /var/lib/apt/lists/*

RUN useradd --create-home --uid 1000 medreport
WORKDIR /opt/medreport

# Dependencies first (better layer caching), then the code.
# Pass --build-arg PIP_EXTRA_INDEX_URL=... to use a CPU-only torch wheel index of your choice.
ARG PIP_EXTRA_INDEX_URL=""
COPY pyproject.toml README.md ./
COPY app ./app
COPY core ./core
COPY data ./data
COPY multimodal ./multimodal
COPY examples ./examples
COPY models ./models
RUN pip install '.[ui,export]'

USER 1000
# Build the compiled MoE kernel into the user's cache now, not at the first request.
RUN python -c "import sys, core.ext; sys.exit(core.ext.main())"
EXPOSE 7860
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:7860/', timeout=4)"]
# The model and examples are named explicitly: a non-editable install puts the code in
# site-packages, where the checkout-relative defaults (models/demo, examples/) do not exist.
CMD ["medreport", "serve", "--host", "0.0.0.0", "--port", "7860", \
     "--model", "/opt/medreport/models/demo", "--examples", "/opt/medreport/examples"]
