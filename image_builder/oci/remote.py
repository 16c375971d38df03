"""The OCI distribution API on top of the layered transports of `oci/transport.py`.

`Registry` is one host: it builds the transport stack (HTTP -> scheme ->
auth -> retry; no network I/O until the first call) and offers the blob and
manifest calls push and pull are made of, mapping unexpected statuses to
`RegistryError`/`AuthError`. `RemoteRepo` is a repository as a blob source.
Callers: kaito.image_builder.oci.push (upload orchestration) and
kaito.image_builder.transfer (which build, pull, inspect and copy go through). Errors carry method, redacted URL and
the registry's diagnostics; credentials never appear in them.
"""

from __future__ import annotations

import threading
import time
from typing import Callable, Iterable, Iterator, Optional

import httpx

from kaito.image_builder.oci import values as V
from kaito.image_builder.oci.auth import Credential, credential_for
from kaito.image_builder.oci.errors import AuthError, OCIError, RegistryError
from kaito.image_builder.oci.layer import BlobSource
from kaito.image_builder.oci.transport import (
    AuthTransport,
    Body,
    HTTPTransport,
    Request,
    RetryTransport,
    SchemeTransport,
    TransportFailure,
    diagnostics,
    parse_challenge,
)
from kaito.presets import retry
from kaito.presets.validate import is_loopback, redact

__all__ = ["Registry", "RemoteRepo", "parse_challenge"]


class Registry:
    """A registry host and its auth state; safe to share between threads. Constructing it does no I/O."""

    def __init__(
        self,
        host: str,
        *,
        insecure: Optional[bool] = None,
        auth_file=None,
        credential: Optional[Credential] = None,
        retries: int = 4,
        backoff: float = 0.5,
        timeout: float = 120.0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.host = host
        self.retries, self.backoff = retries, backoff
        self.policy = retry.Backoff(attempts=retries + 1, base=backoff)
        self._auth_file = auth_file
        self._credential = credential
        self._looked_up = credential is not None
        if auth_file is not None and credential is None:
            # A file the user named is read now, so a wrong path fails before any work; the
            # default files (and credential helpers, which may be slow) wait for a challenge.
            self._credential, self._looked_up = credential_for(host, auth_file), True
        self._cred_lock = threading.Lock()
        self._http = HTTPTransport(timeout=timeout, verify=not insecure)
        self._scheme = SchemeTransport(self._http, host, insecure, is_loopback(host))
        self._transport = RetryTransport(AuthTransport(self._scheme, host, lambda: self.credential), self.policy, sleep)

    def __repr__(self) -> str:
        return f"Registry({self.host!r})"

    @property
    def credential(self) -> Optional[Credential]:
        """Credentials for this host, looked up on first need (a credential helper may be slow)."""
        with self._cred_lock:
            if not self._looked_up:
                self._credential, self._looked_up = credential_for(self.host, self._auth_file), True
            return self._credential

    @property
    def client(self) -> httpx.Client:
        return self._http.client

    @property
    def scheme(self) -> str:
        return self._scheme.scheme

    def close(self) -> None:
        self._http.close()

    def url(self, path: str) -> str:
        return self._scheme.url(path)

    def request(
        self,
        method: str,
        url: str,
        *,
        scope: tuple[str, ...],
        doing: str,
        headers: Optional[dict] = None,
        body: Body = None,
        params: Optional[dict] = None,
        stream: bool = False,
        retry: bool = True,
        ok: Iterable[int] = (200, 201, 202, 204, 206),
    ) -> httpx.Response:
        """Send through the transport stack; a status outside `ok` becomes a `RegistryError` (`AuthError` for 401/403)."""
        req = Request(method, url, scope, doing, dict(headers or {}), body, params, stream, retry)
        r = self._transport.send(req)
        if r.status_code in tuple(ok):
            return r
        if stream:
            r.read()
        diag = diagnostics(r)
        r.close()
        shown = redact(str(r.request.url))
        if r.status_code in (401, 403):
            cred = self.credential
            who = f"as {cred.username!r} (credentials from {cred.source})" if cred else "anonymously"
            raise AuthError(
                doing,
                method,
                shown,
                r.status_code,
                f"the registry refused access {who}; check the auth file or run docker login. {diag}".strip(),
            )
        raise RegistryError(doing, method, shown, r.status_code, diag)

    # --- blobs -------------------------------------------------------------------------------
    def head_blob(self, repo: str, digest: str) -> Optional[int]:
        r = self.request(
            "HEAD",
            self.url(f"/v2/{repo}/blobs/{digest}"),
            scope=(f"repository:{repo}:pull",),
            doing=f"checking blob {digest[:19]} in {self.host}/{repo}",
            ok=(200, 404),
        )
        return int(r.headers.get("content-length", -1)) if r.status_code == 200 else None

    def open_blob(self, repo: str, digest: str, offset: int = 0) -> Iterator[bytes]:
        """Stream a blob (following storage redirects without our credentials)."""
        doing = f"downloading blob {digest[:19]} from {self.host}/{repo}"
        hdrs = {"Range": f"bytes={offset}-"} if offset else {}
        r = self.request(
            "GET",
            self.url(f"/v2/{repo}/blobs/{digest}"),
            scope=(f"repository:{repo}:pull",),
            doing=doing,
            headers=hdrs,
            stream=True,
            ok=(200, 206, 307, 302, 303),
        )
        if r.status_code in (302, 303, 307):
            loc = r.headers["location"]
            r.close()
            # Storage (S3, Azure blob) gets a signed URL, never our registry credentials.
            try:
                r = self._http.send(Request("GET", loc, (), doing, hdrs, stream=True))
            except TransportFailure as e:  # the pull's own retry resumes the blob from its offset
                raise e.error from None
            if r.status_code not in (200, 206):
                r.close()
                raise RegistryError(doing, "GET", redact(loc), r.status_code)
        if offset and r.status_code != 206:
            r.close()
            raise RegistryError(doing, "GET", redact(r.url), r.status_code, "the registry ignored the Range request")

        def gen() -> Iterator[bytes]:
            try:
                yield from r.iter_raw(1 << 20)
            except httpx.TransportError as e:
                raise RegistryError(
                    doing, "GET", redact(r.url), r.status_code, f"connection lost: {type(e).__name__}"
                ) from None
            finally:
                r.close()

        return gen()

    def start_upload(self, repo: str) -> str:
        """POST a new upload session; returns its location."""
        location = self._post_upload(repo, None)
        if location is None:
            raise RegistryError(
                f"starting an upload to {self.host}/{repo}",
                "POST",
                redact(self.url(f"/v2/{repo}/blobs/uploads/")),
                201,
                "the registry answered 201 Created to a request that sent no blob; expected 202 Accepted",
            )
        return location

    def mount_blob(self, repo: str, digest: str, from_repo: str) -> Optional[str]:
        """Cross-repo mount `digest` from `from_repo`: None when mounted, else the upload session opened instead."""
        return self._post_upload(repo, (digest, from_repo))

    def _post_upload(self, repo: str, mount: Optional[tuple[str, str]]) -> Optional[str]:
        """POST an upload session (trying the mount `(digest, from_repo)` first): its location, None when created."""
        scope = (f"repository:{repo}:pull,push",) + ((f"repository:{mount[1]}:pull",) if mount else ())
        params = {"mount": mount[0], "from": mount[1]} if mount else None
        doing = f"starting an upload to {self.host}/{repo}"
        url = self.url(f"/v2/{repo}/blobs/uploads/")
        r = self.request("POST", url, scope=scope, params=params, doing=doing, ok=(201, 202))
        if r.status_code == 201:
            return None
        if "location" not in r.headers:
            raise RegistryError(doing, "POST", redact(url), r.status_code, "the answer has no Location header")
        return str(httpx.URL(self.url("/")).join(r.headers["location"]))

    def upload_offset(self, repo: str, location: str) -> Optional[tuple[str, int]]:
        """Where an interrupted upload stands: (location, bytes the registry holds), None when it is gone."""
        try:
            r = self.request(
                "GET",
                location,
                scope=(f"repository:{repo}:pull,push",),
                doing=f"resuming an upload to {self.host}/{repo}",
                ok=(204, 200),
            )
        except RegistryError as e:
            if isinstance(e, AuthError) or e.status is None:
                raise
            return None
        rng = r.headers.get("range", "0--1")
        end = int(rng.rsplit("-", 1)[-1])
        return str(httpx.URL(location).join(r.headers.get("location", location))), end + 1

    def patch(self, repo: str, location: str, start: int, length: int, chunks: Callable[[], Iterable[bytes]]) -> str:
        r = self.request(
            "PATCH",
            location,
            scope=(f"repository:{repo}:pull,push",),
            body=chunks,
            retry=False,
            doing=f"uploading bytes {start}-{start + length - 1} to {self.host}/{repo}",
            headers={
                "Content-Type": "application/octet-stream",
                "Content-Length": str(length),
                "Content-Range": f"{start}-{start + length - 1}",
            },
            ok=(202,),
        )
        return str(httpx.URL(location).join(r.headers["location"]))

    def finish_upload(self, repo: str, location: str, digest: str) -> None:
        url = httpx.URL(location).copy_merge_params({"digest": digest})
        self.request(
            "PUT",
            str(url),
            scope=(f"repository:{repo}:pull,push",),
            headers={"Content-Length": "0"},
            doing=f"committing blob {digest[:19]} to {self.host}/{repo}",
            ok=(201, 204),
        )

    def cancel_upload(self, repo: str, location: str) -> None:
        try:
            self.request(
                "DELETE",
                location,
                scope=(f"repository:{repo}:pull,push",),
                retry=False,
                doing="cancelling an upload",
                ok=(204, 200, 404),
            )
        except OCIError:
            pass  # the registry garbage-collects abandoned uploads

    # --- manifests ---------------------------------------------------------------------------
    def get_manifest(self, repo: str, target: str) -> tuple[bytes, str]:
        r = self.request(
            "GET",
            self.url(f"/v2/{repo}/manifests/{target}"),
            scope=(f"repository:{repo}:pull",),
            headers={"Accept": V.ACCEPT},
            doing=f"reading manifest {self.host}/{repo}:{target}",
            ok=(200,),
        )
        raw = r.content
        if V.is_digest(target):
            V.verify_bytes(raw, target, f"manifest {self.host}/{repo}@{target}")
        return raw, r.headers.get("content-type", "").split(";")[0]

    def put_manifest(self, repo: str, target: str, raw: bytes, media_type: str) -> str:
        r = self.request(
            "PUT",
            self.url(f"/v2/{repo}/manifests/{target}"),
            scope=(f"repository:{repo}:pull,push",),
            headers={"Content-Type": media_type},
            body=raw,
            doing=f"pushing manifest {self.host}/{repo}:{target}",
            ok=(201, 200),
        )
        digest = V.sha256_digest(raw)
        got = r.headers.get("docker-content-digest")
        if got and got != digest:
            raise OCIError(f"pushing manifest {self.host}/{repo}:{target}: registry stored {got}, we sent {digest}")
        return digest


class RemoteRepo(BlobSource):
    """A registry repository as a blob source (pull, or copy to another place)."""

    def __init__(self, registry: Registry, repository: str) -> None:
        self.registry, self.repository = registry, repository
        self.mount_from = (registry.host, repository)

    def open_blob(self, digest: str, size: int, offset: int = 0) -> Iterator[bytes]:
        return self.registry.open_blob(self.repository, digest, offset)
