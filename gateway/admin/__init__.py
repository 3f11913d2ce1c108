"""Admin server (aiohttp): /healthz, /readyz, /metrics, /admin/*."""

from gateway.admin.app import STATE_KEY, AdminState, create_admin_app

__all__ = ["STATE_KEY", "AdminState", "create_admin_app"]
