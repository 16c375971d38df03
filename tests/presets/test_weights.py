"""Weight sources: local dirs, the hub at a pinned revision (local endpoint), tiny; pickle refused."""

import pytest

from kaito.presets import InvalidInput, KaitoError, get_preset, make_tiny
from kaito.presets.spec import GPURequirements, PresetSpec
from kaito.presets.weights import materialize_weights
from support.hub import HubState, serve_hub

REV = "0123456789abcdef0123456789abcdef01234567"


def _preset(**kw):
    base = dict(name="hubby", family="phi3", hf_repo="org/hubby", hf_revision=REV, image_tag="1",
                gpu=GPURequirements(total_gpu_memory_gib=1))
    return PresetSpec(**{**base, **kw})


def test_tiny_source(tmp_path):
    d = materialize_weights(get_preset("tiny-phi-3"), tmp_path / "w")
    assert (d / "model.safetensors").is_file() and (d / "config.json").is_file()


def test_local_directory_source_skips_pickles_and_code(tmp_path):
    src = make_tiny(tmp_path / "src")
    (src / "training_args.bin").write_bytes(b"\x80\x04pickle")
    (src / "modeling_evil.py").write_text("import os")
    d = materialize_weights(_preset(), tmp_path / "w", source=src)
    names = {p.name for p in d.iterdir()}
    assert "model.safetensors" in names and "training_args.bin" not in names and "modeling_evil.py" not in names


def test_pickle_only_weights_refused_and_nothing_left(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text("{}")
    (src / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(InvalidInput) as e:
        materialize_weights(_preset(), tmp_path / "w", source=src)
    assert "pytorch_model.bin" in str(e.value) and "execute code" in str(e.value) and "safetensors" in str(e.value)
    assert not (tmp_path / "w").exists()
    assert [p for p in tmp_path.iterdir() if p.name.startswith(".w.")] == []


def test_missing_weight_file_fails_atomically(tmp_path):
    src = make_tiny(tmp_path / "src")
    p = _preset(weight_files=["model-00001-of-00002.safetensors"])
    with pytest.raises(KaitoError, match="missing model-00001-of-00002.safetensors"):
        materialize_weights(p, tmp_path / "w", source=src)
    assert not (tmp_path / "w").exists()


@pytest.fixture
def hub(tmp_path):
    src = make_tiny(tmp_path / "hubsrc")
    files = {p.name: p.read_bytes() for p in src.iterdir()}
    files["pytorch_model.bin"] = b"\x80\x04pickle"
    state = HubState("org/hubby", REV, files)
    with serve_hub(state) as endpoint:
        yield endpoint, state, files


def test_hub_download_at_pinned_revision(tmp_path, hub, monkeypatch):
    endpoint, handler, files = hub
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False, raising=False)
    d = materialize_weights(_preset(), tmp_path / "w", endpoint=endpoint, cache_dir=tmp_path / "cache")
    assert (d / "model.safetensors").read_bytes() == files["model.safetensors"]
    assert not (d / "pytorch_model.bin").exists()
    assert not any("pytorch_model.bin" in h for h in handler.hits)  # the pickle was never fetched
    assert all(REV in h for h in handler.hits if "/resolve/" in h)
    # A second run is served from the cache: offline mode works once downloaded.
    d2 = materialize_weights(_preset(), tmp_path / "w2", endpoint=endpoint, cache_dir=tmp_path / "cache",
                             local_files_only=True)
    assert (d2 / "model.safetensors").read_bytes() == files["model.safetensors"]


def test_offline_without_cache_is_a_clear_error(tmp_path, hub, monkeypatch):
    endpoint, handler, files = hub
    with pytest.raises(InvalidInput, match="preset hubby: org/hubby@0123456789ab is not in the cache"):
        materialize_weights(_preset(), tmp_path / "w", cache_dir=tmp_path / "c", local_files_only=True)
    # HF_HUB_OFFLINE=1 (as in the tests' environment) also means: no network at all.
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True, raising=False)
    with pytest.raises(InvalidInput, match="downloads are off"):
        materialize_weights(_preset(), tmp_path / "w", endpoint=endpoint, cache_dir=tmp_path / "c")
    assert handler.hits == [] and not (tmp_path / "w").exists()


@pytest.fixture
def online(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False, raising=False)


def test_tampered_download_is_discarded(tmp_path, hub, online):
    endpoint, handler, files = hub
    handler.lfs_claims["model.safetensors"] = b"what the listing promised"
    with pytest.raises(KaitoError, match="model.safetensors of org/hubby@0123456789ab: sha256 mismatch"):
        materialize_weights(_preset(), tmp_path / "w", endpoint=endpoint, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "w").exists()
    assert not list((tmp_path / "cache").rglob("model.safetensors*"))


def test_hub_errors_are_wrapped(tmp_path, hub, online):
    endpoint, handler, files = hub
    bad = _preset(hf_repo="org/missing")
    with pytest.raises(KaitoError, match="for preset hubby"):
        materialize_weights(bad, tmp_path / "w", endpoint=endpoint, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "w").exists()


def test_hub_download_resumes_after_a_kill(tmp_path, hub, monkeypatch):
    """A download killed half way leaves a partial blob in the hub cache; the rerun asks only for the rest."""
    endpoint, handler, files = hub
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False, raising=False)
    body = files["model.safetensors"]
    half = len(body) // 2
    partial = tmp_path / "cache" / "org--hubby" / REV / "model.safetensors.part"
    partial.parent.mkdir(parents=True)
    partial.write_bytes(body[:half])  # what a download killed half way leaves behind
    d = materialize_weights(_preset(), tmp_path / "w", endpoint=endpoint, cache_dir=tmp_path / "cache")
    assert (d / "model.safetensors").read_bytes() == body
    assert ("model.safetensors", f"bytes={half}-") in handler.ranges, handler.ranges


def test_a_dropped_connection_is_resumed_in_the_same_run(tmp_path, hub, online):
    """Bytes received before the drop are on disk (written as they arrive), so the retry asks for the rest."""
    endpoint, handler, files = hub
    handler.cut.add("model.safetensors")
    d = materialize_weights(_preset(), tmp_path / "w", endpoint=endpoint, cache_dir=tmp_path / "cache")
    assert (d / "model.safetensors").read_bytes() == files["model.safetensors"]
    (name, rng), = [r for r in handler.ranges if r[0] == "model.safetensors"]
    assert int(rng.split("=")[1].rstrip("-")) > 0
