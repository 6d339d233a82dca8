"""The daemon's HTTP API."""

from appliance.api.server import API_PREFIX, ApiServer, build_app

__all__ = ["API_PREFIX", "ApiServer", "build_app"]
