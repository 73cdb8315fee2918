"""Builds an engine adapter from its configuration."""

from __future__ import annotations

from mesh.config import EmbeddedEngineConfig, EngineConfig, OpenAIEngineConfig
from mesh.engines.base import Engine


def build_engine(config: EngineConfig, public_model: str) -> Engine:
    if isinstance(config, OpenAIEngineConfig):
        from mesh.engines.openai_compat import OpenAIEngine

        return OpenAIEngine(config, public_model)
    if isinstance(config, EmbeddedEngineConfig):
        # Imported lazily: llama.cpp loads only where a model is embedded.
        from pathlib import Path

        from mesh.engines.embedded import EmbeddedEngine

        return EmbeddedEngine(config, public_model, cache_dir=Path(config.cache_dir))
    raise TypeError(f"unknown engine config {type(config).__name__}")  # pragma: no cover
