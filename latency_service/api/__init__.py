"""HTTP API v1 of the latency service (FastAPI)."""
