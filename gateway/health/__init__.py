"""Instance health: active checks (control plane), outlier detection and panic mode (pure).

Submodules are imported directly (``gateway.health.outlier``, ``gateway.health.active``,
``gateway.health.panic``) so the data plane never pulls in aiohttp through this package.
"""
