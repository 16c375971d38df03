"""Data inputs: parallel URL downloads with retries, Range resume, size limit, redaction; dirs; image refs."""

from __future__ import annotations

import os

import pytest
from kaito.presets.cli import main as kaito_main
from kaito.presets.errors import InvalidInput, KaitoError
from kaito.presets.validate import redact
from kaito.tuning.fetch import fetch_urls, image_ref, resolve_data


def _files(server, n=3, size=300_000):
    out = {}
    for i in range(n):
        body = os.urandom(size + i)
        (server.root / f"part-{i}.parquet").write_bytes(body)
        out[f"part-{i}.parquet"] = body
    return out


def test_parallel_download_of_several_urls(file_server, tmp_path):
    bodies = _files(file_server)
    urls = [f"{file_server.url}/{name}?download=true&sig=SECRET" for name in bodies]
    got = fetch_urls(urls, tmp_path / "data", parallel=3, show_progress=False)
    assert [p.name for p in got] == list(bodies)
    for p in got:
        assert p.read_bytes() == bodies[p.name]
    assert not list((tmp_path / "data").glob("*.part"))


def test_retries_after_server_errors(file_server, tmp_path):
    bodies = _files(file_server, n=1)
    file_server.fail_next = 2
    [p] = fetch_urls([f"{file_server.url}/part-0.parquet"], tmp_path, retries=3, show_progress=False)
    assert p.read_bytes() == bodies["part-0.parquet"]
    assert len(file_server.requests) == 3


def test_gives_up_after_retries_without_leaking_the_query(file_server, tmp_path):
    _files(file_server, n=1)
    file_server.fail_next = 10
    with pytest.raises(KaitoError) as e:
        fetch_urls([f"{file_server.url}/part-0.parquet?sig=SECRET"], tmp_path, retries=2, show_progress=False)
    assert "gave up after 2 retries" in str(e.value) and "SECRET" not in str(e.value)
    assert not (tmp_path / "part-0.parquet").exists()


def test_cut_connection_resumes_with_range(file_server, tmp_path):
    bodies = _files(file_server, n=1, size=2_000_000)
    file_server.cut_after = 700_000
    [p] = fetch_urls([f"{file_server.url}/part-0.parquet"], tmp_path, retries=3, show_progress=False)
    assert p.read_bytes() == bodies["part-0.parquet"]
    ranges = [r for _, r in file_server.requests]
    assert ranges[0] is None and ranges[-1] is not None and ranges[-1].startswith("bytes=")
    assert int(ranges[-1][6:].rstrip("-")) > 0


def test_partial_file_from_a_killed_run_is_resumed(file_server, tmp_path):
    bodies = _files(file_server, n=1)
    body = bodies["part-0.parquet"]
    (tmp_path / "part-0.parquet.part").write_bytes(body[:1000])
    [p] = fetch_urls([f"{file_server.url}/part-0.parquet"], tmp_path, show_progress=False)
    assert p.read_bytes() == body
    assert file_server.requests == [("part-0.parquet", "bytes=1000-")]
    # a completed file is not downloaded again
    fetch_urls([f"{file_server.url}/part-0.parquet"], tmp_path, show_progress=False)
    assert len(file_server.requests) == 1


def test_size_limit(file_server, tmp_path):
    _files(file_server, n=1, size=5000)
    with pytest.raises(InvalidInput, match="exceeds the size limit 1000 \\(--max-bytes\\)"):
        fetch_urls([f"{file_server.url}/part-0.parquet"], tmp_path, max_bytes=1000, show_progress=False)
    assert not list(tmp_path.glob("part-0.parquet*"))


def test_not_found_is_bad_input(file_server, tmp_path):
    with pytest.raises(InvalidInput, match=r"downloading http://127.0.0.1:\d+/missing.parquet\?\.\.\.: HTTP 404"):
        fetch_urls([f"{file_server.url}/missing.parquet?token=abc"], tmp_path, retries=1, show_progress=False)


def test_cli_fetch_data(file_server, tmp_path, capsys):
    bodies = _files(file_server, n=2, size=1000)
    rc = kaito_main(["tune", "fetch-data", "--dest", str(tmp_path / "d")] + [f"{file_server.url}/{n}" for n in bodies])
    assert rc == 0
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == sorted(bodies)
    assert kaito_main(["tune", "fetch-data", "--dest", str(tmp_path / "d"), "ftp://x/y"]) == 2


def test_resolve_data_inputs(tmp_path):
    d = tmp_path / "vol"
    d.mkdir()
    assert resolve_data([str(d)], tmp_path / "w") == d
    with pytest.raises(InvalidInput, match="either URLs, or one directory"):
        resolve_data([str(d), "http://127.0.0.1/x"], tmp_path / "w")
    with pytest.raises(InvalidInput, match="no such directory"):
        resolve_data([str(tmp_path / "nope")], tmp_path / "w")
    with pytest.raises(InvalidInput, match="--data is required"):
        resolve_data([], tmp_path / "w")


def test_image_refs_and_redaction():
    assert image_ref("image:reg.io/data:1") == "reg.io/data:1"
    assert image_ref("myacr.azurecr.io/datasets/dolly:0.1") == "myacr.azurecr.io/datasets/dolly:0.1"
    assert image_ref("127.0.0.1:5000/d@sha256:" + "a" * 64)
    assert image_ref("./data") is None and image_ref("https://h/x.parquet") is None
    assert redact("https://u:p@h.net:8443/a/b.parquet?sig=1") == "https://h.net:8443/a/b.parquet?..."
