"""Shared pytest setup: offline Hugging Face, tiny models, real registries."""

pytest_plugins = ["support.models", "support.registry"]
