"""The HTTP server: an OpenAI-compatible API, idletune's own /api, and the web page."""
from .app import create_app

__all__ = ["create_app"]
