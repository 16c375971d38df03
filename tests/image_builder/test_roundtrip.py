"""Property tests: random images round-trip through a real registry and a layout; random tars never escape."""

from __future__ import annotations

import io
import itertools
import os
import tarfile

import pytest
from hypothesis import HealthCheck, example, given, settings, strategies as st

from kaito.image_builder import Connection, Layer, OCIError, append, empty_image, pull, push, read_image
from kaito.image_builder.oci.extract import extract_tar
from kaito.image_builder.oci.image import validate

_names = st.text(alphabet="abcdefghijklmnop_-.0123456789", min_size=1, max_size=12).filter(
    lambda s: s not in (".", "..") and not s.startswith(".wh.")
)
_files = st.dictionaries(
    st.lists(_names, min_size=1, max_size=3).map("/".join), st.binary(max_size=5000), min_size=1, max_size=5
).filter(lambda d: not any(a != b and b.startswith(a + "/") for a, b in itertools.permutations(d, 2)))
_counter = itertools.count()


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(layers=st.lists(_files, min_size=1, max_size=3), compression=st.sampled_from([None, "gzip", "zstd"]))
def test_random_images_roundtrip(registry, tmp_path, layers, compression):
    n = next(_counter)
    img = append(
        empty_image(),
        [Layer.from_bytes({f"data/{k}": v for k, v in f.items()}, compression=compression) for f in layers],
    )
    validate(img)
    ref = f"{registry.host}/prop/img{n}:v1"
    res = push(img, ref)
    assert res.digest == img.digest
    with Connection() as c:
        back = read_image(ref, c)
    assert back.digest == img.digest and [x.digest for x in back.layers] == [x.digest for x in img.layers]
    push(back, f"oci:{tmp_path / f'l{n}'}:v1")  # registry -> layout keeps the digest
    got = pull(f"oci:{tmp_path / f'l{n}'}:v1", tmp_path / f"out{n}", full=True)
    expected: dict[str, bytes] = {}
    for f in layers:  # OCI changesets: a later entry replaces what was at its path, its parents, its children
        for k, v in f.items():
            p = f"data/{k}"
            expected = {q: w for q, w in expected.items() if not (p.startswith(q + "/") or q.startswith(p + "/"))}
            expected[p] = v
    assert got.digest == img.digest
    assert {p: (tmp_path / f"out{n}" / p).read_bytes() for p in got.files} == expected


def test_a_layer_listed_twice_is_applied_at_each_place_and_files_become_directories(tmp_path):
    """[A, B, A]: A's file wins again after B; a later layer's directory replaces an earlier file."""
    a = Layer.from_bytes({"data/x": b"a", "data/d": b"a file"})
    b = Layer.from_bytes({"data/x": b"b", "data/y": b"y", "data/d/e": b"e"})
    img = append(empty_image(), [a, b, a])
    assert [x.digest for x in img.layers].count(a.digest) == 2
    push(img, f"oci:{tmp_path / 'lay'}:v1")
    got = pull(f"oci:{tmp_path / 'lay'}:v1", tmp_path / "out", full=True)
    out = tmp_path / "out"
    assert (out / "data/x").read_bytes() == b"a" and (out / "data/y").read_bytes() == b"y"
    # A again: its file "data/d" replaces B's directory "data/d" (OCI changesets replace by path).
    assert (out / "data/d").is_file() and (out / "data/d").read_bytes() == b"a file"
    assert sorted(got.files) == ["data/d", "data/x", "data/y"]
    c = Layer.from_bytes({"data/d": b"a file"})
    d = Layer.from_bytes({"data/d/e": b"e"})
    push(append(empty_image(), [c, d]), f"oci:{tmp_path / 'lay2'}:v1")
    got = pull(f"oci:{tmp_path / 'lay2'}:v1", tmp_path / "out2", full=True)
    assert sorted(got.files) == ["data/d/e"] and (tmp_path / "out2/data/d").is_dir()


def _inside(path: str, root: str) -> bool:
    """Whether `path`, resolved through every symlink, stays in `root` (a sibling `root2` is outside)."""
    real, real_root = os.path.realpath(path), os.path.realpath(root)
    return os.path.commonpath([real, real_root]) == real_root


_CHAIN = [  # the escape from issue 12: each link "inside" on paper, the pair outside
    ("d/e/f", tarfile.SYMTYPE, "../.."),
    ("n", tarfile.SYMTYPE, "d/e/f/../x"),
]
_LOOSE = st.tuples(  # one entry of any kind, names and targets from a small pool (collisions are the point)
    st.sampled_from(["a", "b/c", "../x", "/abs", "a/../../y", "d/e/f", "l", "l/z", "./n", "n", "h"]),
    st.sampled_from([tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE]),
    st.sampled_from(["", "a", "..", "../..", "/etc", "b", "l/../..", "d/e/f/../x", "n", "l/z"]),
)
_DIR_LINKS = ["a", "b/c", "d/e/f", "g/h"]  # no name is under another, so each one's parent is a real directory


def _up(n: int) -> list[str]:
    return [".."] * n


@st.composite
def _link_chains(draw) -> list[list[tuple[str, bytes, str]]]:
    """Layers of tar entries built around link chains that are inside on paper and may leave the root for real.

    Directory links climb with `../` runs, some through another directory link; file links (symbolic or hard)
    are routed through them. Read alone, every target stays inside (the lexical rule); resolved through the
    links on disk, many reach `x` beside the root or the sibling's `secret`. The entries, mixed with loose
    ones, come in random order and are split across layers.
    """
    dirs = draw(st.lists(st.sampled_from(_DIR_LINKS), min_size=1, max_size=3, unique=True))
    entries = []
    for name in dirs:
        depth = name.count("/")  # of the link's parent: the most `..` its text can climb on paper
        via = draw(st.sampled_from([None] + [d for d in dirs if d != name]))
        if via is None:
            target = _up(draw(st.integers(0, depth))) or ["."]
        else:  # to the root on paper, into `via`, back up at most as far as `via` went down, maybe sideways
            target = _up(depth) + [via] + _up(draw(st.integers(0, via.count("/") + 1)))
            target += draw(st.sampled_from([[], ["root-sibling"]]))
        entries.append((name, tarfile.SYMTYPE, "/".join(target)))
    for name in draw(st.lists(st.sampled_from(["n", "m", "h"]), min_size=1, max_size=2, unique=True)):
        via, leaf = draw(st.sampled_from(dirs)), draw(st.sampled_from(["x", "root-sibling/secret"]))
        if draw(st.integers(0, 3)):
            target = [via] + _up(draw(st.integers(1, via.count("/") + 1))) + [leaf]
            entries.append((name, tarfile.SYMTYPE, "/".join(target)))
        else:  # a hard link's name may hold no `..`: it can only reach out through the directory link itself
            entries.append((name, tarfile.LNKTYPE, f"{via}/{draw(st.sampled_from(['x', 'secret']))}"))
    # a real `x` in the root, so that a hard link resolved inside has its file, and some noise
    entries += [("x", tarfile.REGTYPE, "")] + draw(st.lists(_LOOSE, max_size=1))
    entries = draw(st.permutations(entries))
    cuts = sorted(draw(st.lists(st.integers(0, len(entries)), max_size=2)))
    return [entries[a:b] for a, b in zip([0] + cuts, cuts + [len(entries)])]


def _tar(entries) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for name, type_, link in entries:
            ti = tarfile.TarInfo(name)
            ti.type, ti.linkname = type_, link
            data = b"x" if type_ == tarfile.REGTYPE else b""
            ti.size = len(data)
            t.addfile(ti, io.BytesIO(data) if data else None)
    return buf.getvalue()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(layers=st.one_of(st.lists(_LOOSE, max_size=6).map(lambda e: [e]), _link_chains()))
@example(layers=[_CHAIN])
@example(layers=[list(reversed(_CHAIN))])
@example(layers=[[("l", tarfile.SYMTYPE, "../root-sibling"), ("h", tarfile.LNKTYPE, "l/secret")]])
def test_random_tars_never_write_outside(tmp_path, layers):
    n = next(_counter)
    outer = tmp_path / f"case{n}"
    root = outer / "root"
    root.mkdir(parents=True)
    sibling = outer / "root-sibling"  # same prefix as the root: a prefix test would call it inside
    sibling.mkdir()
    (sibling / "secret").write_text("s")
    (outer / "x").write_text("outside")
    try:
        for i, entries in enumerate(layers):  # one root, layer after layer, as a pull applies them
            extract_tar([_tar(entries)], root, f"fuzz layer {i}")
    except OCIError:
        pass  # unsafe or conflicting entries; other exception types would be a bug
    assert sorted(os.listdir(outer)) == ["root", "root-sibling", "x"]  # nothing new beside the root
    assert os.listdir(sibling) == ["secret"] and os.stat(sibling / "secret").st_nlink == 1
    assert os.stat(outer / "x").st_nlink == 1  # no hard link inside the root shares an outside file
    # Accepted or refused, no entry left on disk may lead out (a refused layer's doors are removed too).
    for dirpath, dirnames, filenames in os.walk(root):
        for f in dirnames + filenames:  # every entry, symlinks included, must resolve inside
            p = os.path.join(dirpath, f)
            assert _inside(p, str(root)), f"{os.path.relpath(p, root)} -> {os.path.realpath(p)} is outside"


def test_a_refused_layer_keeps_no_door_out(tmp_path):
    """`m` is inside when made (`a` is no link yet); `a -> .` then sends it out; the bad hard link stops the layer."""
    root = tmp_path / "root"
    root.mkdir()
    (tmp_path / "x").write_text("outside")
    layer = [("m", tarfile.SYMTYPE, "a/../x"), ("a", tarfile.SYMTYPE, "."), ("h", tarfile.LNKTYPE, "a/missing")]
    with pytest.raises(OCIError, match="hard link 'h'"):
        extract_tar([_tar(layer)], root, "fuzz")
    doors = [p.name for p in root.iterdir() if not _inside(str(p), str(root))]
    assert doors == [], f"{doors} lead out of the refused tree"
