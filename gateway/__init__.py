__version__ = "0.1.0"

# The compiled hot path, when built and current (gateway/compiled.py; GATEWAY_PURE_PYTHON=1 off).
from gateway import compiled as _compiled

_compiled.install()
