"""Shared pytest setup: offline Hugging Face, tiny models, real registries."""

pytest_plugins = ["support.models", "support.registry"]


# The suites that need the runtime base image (tests/e2e/container.py's base_steps). They run last: `.ci/run`
# builds the base in the background meanwhile, and they find it cached (or wait on its lock) instead of
# spending their first minutes building it.
NEEDS_BASE = ("cluster/test_seed_workspaces.py", "e2e/test_container.py")


def pytest_collection_modifyitems(config, items):
    """The base image's suites go last (stable order otherwise); hardware tests skip, with the reason, where
    torch sees too few CUDA GPUs (torch imported only then)."""
    import pytest

    items.sort(key=lambda it: any(it.nodeid.startswith("tests/" + name) for name in NEEDS_BASE))
    wanted = [it for it in items if it.get_closest_marker("gpu") or it.get_closest_marker("multi_gpu")]
    if not wanted:
        return
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for it in wanted:
        need = 2 if it.get_closest_marker("multi_gpu") else 1
        if count < need:
            it.add_marker(pytest.mark.skip(reason=f"needs {need} CUDA GPU(s); torch sees {count}"))
