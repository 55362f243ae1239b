"""Postroom: a self-hosted email delivery service."""

__version__ = "0.1.0"
