"""The OpenAI-compatible HTTP front of `disagg serve` (FastAPI + uvicorn, in the serve process,
on the same controller as gRPC): /v1/completions, /v1/chat/completions, /v1/models, /health."""
