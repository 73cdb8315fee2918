"""Stored responses: the Responses API's server-side conversation state."""

from mesh.conversations.store import ResponseStore, purge

__all__ = ["ResponseStore", "purge"]
