"""Benchmark harness (``python -m loadtest``): the gateway vs direct, nginx, haproxy, caddy."""
