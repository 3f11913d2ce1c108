"""Filters: per-route API policies (auth, CORS, compression, headers, ...) and user Python code.

``gateway.filters.api`` is the contract with the data plane; the rest of the package compiles
config into ``FilterChain`` objects.
"""
