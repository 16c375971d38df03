"""Hand-built tar layers for the image builder's tests (test_pull, test_hostile): any entry, any format."""

from __future__ import annotations

import io
import tarfile


def tar_bytes(*members: tuple[tarfile.TarInfo, bytes], fmt=tarfile.PAX_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as t:
        for ti, data in members:
            t.addfile(ti, io.BytesIO(data) if data else None)
    return buf.getvalue()


def tar_info(name: str, type_=tarfile.REGTYPE, size=0, linkname="") -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type, ti.size, ti.linkname = type_, size, linkname
    return ti
