"""Pushing to a real registry: HEAD-skip, zero-byte rebuilds, cross-repo mounts, retries, manifest last, auth."""

from __future__ import annotations

import json

import httpx
import pytest

from kaito.image_builder import AuthError, Layer, RegistryError, append, build_adapter, build_preset, empty_image, push
from kaito.image_builder.oci import values as V
from kaito.image_builder.oci.push import Pusher
from kaito.image_builder.oci.remote import Registry
from kaito.presets.errors import InvalidInput


def _manifest(registry, repo, tag):
    r = httpx.get(f"{registry.url}/v2/{repo}/manifests/{tag}", headers={"Accept": V.ACCEPT})
    return r


def test_adapter_image_layout_and_annotation(registry, adapter_dir):
    res = build_adapter(adapter_dir, f"{registry.host}/adapters/a1:v1", preset_name="tiny-phi-3")
    r = _manifest(registry, "adapters/a1", "v1")
    assert r.status_code == 200 and V.sha256_digest(r.content) == res.digest
    m = r.json()
    assert m["annotations"]["sh.kaito.model.name"] == "tiny-phi-3"
    paths = [x["annotations"][V.MODEL_FILEPATH] for x in m["layers"]]
    assert paths == ["adapter_config.json", "adapter_model.safetensors"]


def test_incomplete_adapter_is_never_pushed(registry, adapter_dir):
    (adapter_dir / "adapter_model.safetensors").unlink()
    with pytest.raises(InvalidInput, match="adapter_model.safetensors"):
        build_adapter(adapter_dir, f"{registry.host}/adapters/broken:v1")
    assert _manifest(registry, "adapters/broken", "v1").status_code == 404


def test_preset_build_reproducible_and_rebuild_uploads_nothing(registry, weights_dir, isolated_cache):
    a = build_preset("tiny-phi-3", registry.host, tag="r1", weights_dir=weights_dir)
    assert a.bytes_uploaded > 0
    b = build_preset("tiny-phi-3", registry.host, tag="r1", weights_dir=weights_dir)
    assert b.digest == a.digest and b.modelpack_digest == a.modelpack_digest
    assert b.bytes_uploaded == 0
    # Without the digest cache (fresh machine), same inputs still give the same digests and no upload.
    import shutil

    shutil.rmtree(isolated_cache)
    c = build_preset("tiny-phi-3", registry.host, tag="r1", weights_dir=weights_dir)
    assert (c.digest, c.bytes_uploaded) == (a.digest, 0)


def test_modelpack_follows_the_spec_and_the_image_has_one_layer_per_file(registry, weights_dir):
    res = build_preset("tiny-phi-3", registry.host, tag="mp", weights_dir=weights_dir)
    img = _manifest(registry, "kaito-tiny-phi-3", "mp").json()
    mp = _manifest(registry, "kaito-tiny-phi-3-weights", "mp").json()
    assert res.modelpack_ref == f"{registry.host}/kaito-tiny-phi-3-weights:mp"
    assert mp["mediaType"] == V.OCI_MANIFEST and mp["artifactType"] == V.MODEL_ARTIFACT
    assert mp["config"]["mediaType"] == V.MODEL_CONFIG
    files = sorted(p.name for p in weights_dir.iterdir())
    # one layer per file; the filepath annotation is the model-relative path (what the tar holds)
    assert sorted(x["annotations"][V.MODEL_FILEPATH] for x in mp["layers"]) == files
    kinds = {x["annotations"][V.MODEL_FILEPATH]: x["mediaType"] for x in mp["layers"]}
    assert kinds["model.safetensors"] == V.MODEL_WEIGHT_TAR and kinds["config.json"] == V.MODEL_WEIGHT_CONFIG_TAR
    # the image: one uncompressed layer per file under /workspace/weights, annotated with its tar path
    assert sorted(x["annotations"][V.MODEL_FILEPATH] for x in img["layers"]) == [f"workspace/weights/{f}" for f in files]
    assert all(x["mediaType"] == V.OCI_LAYER for x in img["layers"])
    assert img["annotations"]["sh.kaito.model.name"] == "tiny-phi-3"


def test_head_skip_and_cross_repo_mount(registry, weights_dir):
    base = build_preset("tiny-phi-3", registry.host, tag="base", weights_dir=weights_dir, modelpack=False)
    # An image in another repository built on that one: base layers are mounted, not re-sent.
    extra = Layer.from_bytes({"workspace/tfs/extra.txt": b"extra"})
    from kaito.image_builder import Connection, read_image, write_image

    with Connection() as conn:
        src = read_image(base.ref, conn)
        res = write_image(append(src, [extra]), f"{registry.host}/derived/img:v1", conn)
        assert len(res.mounted) == len(src.layers)
        assert res.bytes_uploaded == extra.size + len(append(src, [extra]).config_bytes)
        again = write_image(append(src, [extra]), f"{registry.host}/derived/img:v2", conn)
        assert again.bytes_uploaded == 0 and len(again.skipped) == len(src.layers) + 2


def test_retries_on_5xx_and_manifest_last(registry, fault_proxy, adapter_dir):
    fault_proxy.fail("HEAD", "/blobs/", 503, times=2)
    fault_proxy.fail("PUT", "/manifests/", 502, times=1)
    res = build_adapter(adapter_dir, f"{fault_proxy.host}/retry/a:v1")
    assert _manifest(registry, "retry/a", "v1").status_code == 200
    assert V.sha256_digest(_manifest(registry, "retry/a", "v1").content) == res.digest
    statuses = [s for _, _, s in fault_proxy.log]
    assert statuses.count(503) == 2 and statuses.count(502) == 1
    # Manifest PUT strictly after every blob upload completed
    puts = [i for i, (m, p, s) in enumerate(fault_proxy.log) if m == "PUT" and "/blobs/uploads/" in p and s == 201]
    man = [i for i, (m, p, s) in enumerate(fault_proxy.log) if m == "PUT" and "/manifests/" in p and s == 201]
    assert puts and man and max(puts) < min(man)


def test_failed_blob_means_no_manifest(registry, fault_proxy, adapter_dir):
    fault_proxy.fail("POST", "/blobs/uploads/", 400, times=100)  # not retryable
    with pytest.raises(RegistryError, match="HTTP 400"):
        build_adapter(adapter_dir, f"{fault_proxy.host}/nomani/a:v1")
    assert _manifest(registry, "nomani/a", "v1").status_code == 404


def test_source_changed_after_build_is_refused(registry, tmp_path):
    f = tmp_path / "w.safetensors"
    f.write_bytes(b"a" * 4096)
    img = append(empty_image(), [Layer.from_file(f, "workspace/weights/w.safetensors")])
    f.write_bytes(b"b" * 4096)  # same size, different bytes
    with pytest.raises(Exception, match="changed since the build"):
        push(img, f"{registry.host}/changed/a:v1")
    assert _manifest(registry, "changed/a", "v1").status_code == 404


def test_basic_auth_and_wrong_password_message(auth_registry, adapter_dir, tmp_path):
    good = auth_registry.dockerconfig(tmp_path / "good.json")
    res = build_adapter(adapter_dir, f"{auth_registry.host}/private/a:v1", auth_file=good)
    assert res.digest.startswith("sha256:")
    bad = auth_registry.dockerconfig(tmp_path / "bad.json", password="wr0ng-pa55-XYZ")
    with pytest.raises(AuthError) as e:
        build_adapter(adapter_dir, f"{auth_registry.host}/private/a:v2", auth_file=bad)
    msg = str(e.value)
    assert "401" in msg and "kaito" in msg
    assert "wr0ng-pa55-XYZ" not in msg and auth_registry.password not in msg
    assert "Basic " not in msg and "Authorization" not in repr(e.value.args)
    with pytest.raises(AuthError, match="requires credentials"):
        build_adapter(adapter_dir, f"{auth_registry.host}/private/a:v3")


def test_dockerconfigjson_secret_file(auth_registry, adapter_dir, tmp_path):
    import base64

    cfg = auth_registry.dockerconfig(tmp_path / "c.json").read_text()
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "kubernetes.io/dockerconfigjson",
        "metadata": {"name": "push-secret"},
        "data": {".dockerconfigjson": base64.b64encode(cfg.encode()).decode()},
    }
    (tmp_path / "secret.json").write_text(json.dumps(secret))
    res = build_adapter(adapter_dir, f"{auth_registry.host}/private/s:v1", auth_file=tmp_path / "secret.json")
    assert res.digest.startswith("sha256:")


def test_docker_config_found_through_env(auth_registry, adapter_dir, tmp_path, monkeypatch):
    d = tmp_path / "dockercfg"
    d.mkdir()
    auth_registry.dockerconfig(d / "config.json")
    monkeypatch.setenv("DOCKER_CONFIG", str(d))
    assert build_adapter(adapter_dir, f"{auth_registry.host}/private/env:v1").digest


def test_bearer_token_auth(token_registry, adapter_dir, tmp_path):
    server, tokens = token_registry
    cfg = server.dockerconfig(tmp_path / "t.json")
    res = build_adapter(adapter_dir, f"{server.host}/tok/a:v1", auth_file=cfg)
    assert any("repository:tok/a:pull,push" in r["scopes"] for r in tokens.requests)
    reg = Registry(server.host, auth_file=cfg)
    try:
        raw, _ = reg.get_manifest("tok/a", "v1")
        assert V.sha256_digest(raw) == res.digest
    finally:
        reg.close()
    bad = server.dockerconfig(tmp_path / "b.json", password="n0pe-n0pe")
    with pytest.raises(AuthError) as e:
        build_adapter(adapter_dir, f"{server.host}/tok/a:v2", auth_file=bad)
    assert "n0pe-n0pe" not in str(e.value) and "token" in str(e.value)


def test_parallel_pusher_counts_outcomes(registry, tmp_path):
    layers = [Layer.from_bytes({f"f{i}": bytes([i]) * (1000 + i)}) for i in range(8)]
    img = append(empty_image(), layers)
    reg = Registry(registry.host)
    try:
        p = Pusher(reg, "par/img", jobs=4)
        digest = p.push_image(img, "v1")
        assert digest == img.digest and len(p.stats.uploaded) == 9
        assert p.stats.bytes_uploaded == sum(x.size for x in img.blobs())
    finally:
        reg.close()


def test_preset_on_a_base_image_reuses_base_layers(registry, weights_dir, tmp_path):
    from kaito.image_builder import pull

    code = Layer.from_bytes({"workspace/tfs/serve.py": b"print('serve')\n"}, compression="gzip")
    base_ref = f"{registry.host}/kaito-base:0.1.0"
    base = append(empty_image(), [code], env={"PATH": "/usr/bin"}, user="1000")
    push(base, base_ref)
    b = build_preset("tiny-phi-3", registry.host, tag="onbase", weights_dir=weights_dir, base=base_ref)
    m = _manifest(registry, "kaito-tiny-phi-3", "onbase").json()
    assert m["layers"][0]["digest"] == code.digest  # the base layer, by digest, not rebuilt
    assert m["annotations"]["org.opencontainers.image.base.digest"] == base.digest
    cfg = httpx.get(f"{registry.url}/v2/kaito-tiny-phi-3/blobs/{m['config']['digest']}").json()
    assert cfg["config"]["User"] == "1000" and "KAITO_MODEL_DIR=/workspace/weights" in cfg["config"]["Env"]
    # The preset image serves by default: `docker run IMAGE` starts the runtime on the baked weights.
    assert cfg["config"]["Entrypoint"] == ["python", "-m", "kaito.runtime"] and cfg["config"]["Cmd"] == []
    assert "KAITO_PRESET=tiny-phi-3" in cfg["config"]["Env"]
    root = pull(b.ref, tmp_path / "rootfs", full=True)
    assert "workspace/tfs/serve.py" in root.files and "workspace/weights/model.safetensors" in root.files
    weights = pull(b.ref, tmp_path / "plain")  # the plain pull skips the base layers
    assert "serve.py" not in " ".join(weights.files) and "model.safetensors" in weights.files


def test_insecure_falls_back_to_http_and_secure_refuses(registry, adapter_dir):
    assert build_adapter(adapter_dir, f"{registry.host}/insecure/a:v1", insecure=True).digest
    with pytest.raises(RegistryError, match="https://"):
        build_adapter(adapter_dir, f"{registry.host}/insecure/a:v2", insecure=False)


def test_empty_blob_and_empty_file_layers(registry, tmp_path):
    (tmp_path / "empty.json").write_bytes(b"")
    layer = Layer.from_file(tmp_path / "empty.json", "data/empty.json")
    img = append(empty_image(), [layer], annotations={V.ANN_CONTENT_ROOT: "data"})
    reg = Registry(registry.host)
    try:
        p = Pusher(reg, "empty/blob")
        assert p.push_blob(Layer.blob(b"", "application/octet-stream")) == "uploaded"
        assert reg.head_blob("empty/blob", V.sha256_digest(b"")) == 0
    finally:
        reg.close()
    push(img, f"{registry.host}/empty/file:v1")
    from kaito.image_builder import pull

    got = pull(f"{registry.host}/empty/file:v1", tmp_path / "out")
    assert got.files == ("empty.json",) and (tmp_path / "out" / "empty.json").read_bytes() == b""


def test_push_memory_does_not_grow_with_file_size(registry, tmp_path):
    """Streaming: pushing a 96 MiB layer must not hold it in memory (oras-py would, +96 MiB)."""
    import os
    import subprocess
    import sys

    f = tmp_path / "big.safetensors"
    with open(f, "wb") as fh:
        for _ in range(6):
            fh.write(os.urandom(16 << 20))
    code = f"""
import os
from kaito.image_builder import Layer, append, empty_image, push
def hwm():
    return int([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]) // 1024
layer = Layer.from_file({str(f)!r}, 'workspace/weights/big.safetensors')
before = hwm()
push(append(empty_image(), [layer]), '{registry.host}/mem/big:v1')
print(hwm() - before)
"""
    env = {**os.environ, "KAITO_IMAGE_CHUNK_SIZE": str(64 << 20)}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert int(r.stdout.strip()) < 32, f"push grew peak RSS by {r.stdout.strip()} MiB"


def test_docker_credential_helper(auth_registry, adapter_dir, tmp_path, monkeypatch):
    """credHelpers in config.json: `docker-credential-<name> get` is asked, as docker does."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    helper = bindir / "docker-credential-kaitotest"
    log = tmp_path / "helper.log"
    answer = json.dumps({"ServerURL": auth_registry.host, "Username": "kaito", "Secret": auth_registry.password})
    helper.write_text(f"#!/bin/sh\ncat >> {log}\necho >> {log}\necho '{answer}'\n")
    helper.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}:{__import__('os').environ['PATH']}")
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"auths": {}, "credHelpers": {auth_registry.host: "kaitotest"}}))
    assert build_adapter(adapter_dir, f"{auth_registry.host}/private/helper:v1", auth_file=cfg).digest
    assert auth_registry.host in log.read_text()


def test_cross_repo_mount_under_bearer_auth(token_registry, adapter_dir, tmp_path):
    from kaito.image_builder import Connection, read_image, write_image

    server, tokens = token_registry
    cfg = server.dockerconfig(tmp_path / "t.json")
    build_adapter(adapter_dir, f"{server.host}/tok/src:v1", auth_file=cfg)
    with Connection(cfg) as conn:
        res = write_image(read_image(f"{server.host}/tok/src:v1", conn), f"{server.host}/tok/dst:v1", conn)
    assert len(res.mounted) == 3 and res.bytes_uploaded == 0  # both layers and the config: mounted, not sent
    assert any({"repository:tok/dst:pull,push", "repository:tok/src:pull"} <= set(r["scopes"]) for r in tokens.requests)
