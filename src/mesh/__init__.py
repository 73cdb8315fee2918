"""Mesh: a self-hostable API platform for open-weight LLMs."""

__version__ = "0.1.0"
