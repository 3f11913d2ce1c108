"""Route table: host map + path index, matchers, path rewrites (see ``table`` for the rules)."""

from gateway.routing.rewrite import PathRewriter, compile_path_rewrite
from gateway.routing.table import Route, RouteTable, normalize_host

__all__ = ["PathRewriter", "Route", "RouteTable", "compile_path_rewrite", "normalize_host"]
