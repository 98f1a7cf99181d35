"""An OpenAI-compatible embeddings server for jembed models (the optional `serve` extra).

    pip install 'jembed[serve]'
    python -m jembed.serve --model path/to/all-MiniLM-L6-v2 --port 8000

The app lives in jembed.serve.app (FastAPI), the dynamic batcher in jembed.serve.batcher, the
request schema in jembed.serve.protocol and the Prometheus metrics in jembed.serve.metrics. This
module imports none of them, so `python -m jembed.serve` can say what to install when FastAPI is
missing.
"""
