"""``python -m latency_service`` is ``latency-service``."""

from latency_service.cli import app

if __name__ == "__main__":
    app(prog_name="latency-service")
