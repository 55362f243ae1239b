"""The web dashboard: server-rendered pages over the Store, mounted beside the JSON API."""

from postroom.web.routes import mount

__all__ = ["mount"]
