"""Shared pytest setup: offline Hugging Face, tiny models, real registries."""

pytest_plugins = ["support.models", "support.registry"]


def pytest_collection_modifyitems(config, items):
    """Hardware tests skip, with the reason, where torch sees too few CUDA GPUs (torch imported only then)."""
    import pytest

    wanted = [it for it in items if it.get_closest_marker("gpu") or it.get_closest_marker("multi_gpu")]
    if not wanted:
        return
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for it in wanted:
        need = 2 if it.get_closest_marker("multi_gpu") else 1
        if count < need:
            it.add_marker(pytest.mark.skip(reason=f"needs {need} CUDA GPU(s); torch sees {count}"))
