"""The one module that speaks HTTP: the OCI distribution API over httpx.

`Registry` is one host: auth challenges (anonymous, Basic, Bearer token with
realm/service/scope), retries with backoff on 5xx/429 and connection errors,
and the blob and manifest calls push and pull are made of. `RemoteRepo` is a
repository as a blob source. Callers: kaito.image_builder.oci.push (upload
orchestration) and kaito.image_builder.pull. Errors carry method, redacted
URL and the registry's diagnostics; credentials never appear in them.
"""

from __future__ import annotations

import random
import re
import threading
import time
from typing import Callable, Iterable, Iterator, Optional, Union

import httpx

from kaito.image_builder.oci import values as V
from kaito.image_builder.oci.auth import Credential, credential_for
from kaito.image_builder.oci.errors import AuthError, OCIError, RegistryError
from kaito.image_builder.oci.layer import BlobSource
from kaito.presets.validate import is_loopback, redact

RETRY_STATUS = {408, 429, 500, 502, 503, 504}
Body = Union[None, bytes, Callable[[], Iterable[bytes]]]


def _diagnostics(r: httpx.Response) -> str:
    """The registry's own error codes and messages (distribution's `errors` list), else a short body excerpt."""
    try:
        errs = r.json().get("errors") or []
        return "; ".join(f"{e.get('code')}: {e.get('message')}" for e in errs)[:500]
    except Exception:
        try:
            return (r.text or "")[:200].strip()
        except Exception:
            return ""


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    scheme, _, rest = header.strip().partition(" ")
    params = dict(re.findall(r'(\w+)="([^"]*)"', rest))
    return scheme.lower(), params


class Registry:
    """A registry host and its auth state; safe to share between threads."""

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
    ) -> None:
        self.host = host
        loopback = is_loopback(host)
        self.credential = credential if credential is not None else credential_for(host, auth_file)
        self.retries, self.backoff = retries, backoff
        self._client_args = dict(
            timeout=httpx.Timeout(timeout, connect=15.0),
            limits=httpx.Limits(max_connections=32, max_keepalive_connections=16),
            verify=not insecure,
        )
        self._client: Optional[httpx.Client] = None
        self._lock = threading.Lock()
        self._auth_lock = threading.Lock()
        self._auth: dict[tuple[str, ...], str] = {}
        if loopback and insecure is None:
            self.scheme = "http"
        elif insecure:
            # Like docker's insecure registries: https without verification, else plain http.
            self.scheme = "https"
            try:
                self.client.get(f"https://{host}/v2/", timeout=5)
            except httpx.TransportError:
                self.scheme = "http"
        else:
            self.scheme = "https"

    def __repr__(self) -> str:
        return f"Registry({self.host!r})"

    @property
    def client(self) -> httpx.Client:
        """The HTTP client, reopened on demand: Image values read earlier may stream after a close."""
        with self._lock:
            if self._client is None or self._client.is_closed:
                self._client = httpx.Client(**self._client_args)
            return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()

    def url(self, path: str) -> str:
        return f"{self.scheme}://{self.host}{path}"

    # --- auth --------------------------------------------------------------------------------
    def _authenticate(self, challenge: str, scope: tuple[str, ...], doing: str, url: str) -> None:
        scheme, params = parse_challenge(challenge or "")
        cred = self.credential
        if scheme == "basic":
            if not cred:
                raise AuthError(
                    doing,
                    "GET",
                    redact(url),
                    401,
                    f"{self.host} requires credentials; pass --auth-file (docker config.json) or run docker login",
                )
            header = cred.basic_header()
        elif scheme == "bearer":
            realm = params.get("realm")
            if not realm:
                raise AuthError(doing, "GET", redact(url), 401, "bearer challenge without a realm")
            q = [("service", params["service"])] if params.get("service") else []
            q += [("scope", s) for s in (scope or ((params["scope"],) if params.get("scope") else ()))]
            try:
                if cred and cred.identity_token:
                    data = {
                        "grant_type": "refresh_token",
                        "refresh_token": cred.identity_token,
                        "service": params.get("service", ""),
                        "scope": " ".join(scope),
                        "client_id": "kaito",
                    }
                    r = self.client.post(realm, data=data)
                else:
                    r = self.client.get(realm, params=q, headers={"Authorization": cred.basic_header()} if cred else {})
            except httpx.TransportError as e:
                raise RegistryError(
                    f"{doing}: fetching a token", "GET", redact(realm), None, type(e).__name__
                ) from None
            if r.status_code in (401, 403):
                who = f"as {cred.username!r} (from {cred.source})" if cred else "anonymously"
                raise AuthError(
                    f"{doing}: fetching a token",
                    "GET",
                    redact(realm),
                    r.status_code,
                    f"the token server refused {who}; check the credentials in the auth file",
                )
            if r.status_code != 200:
                raise RegistryError(f"{doing}: fetching a token", "GET", redact(realm), r.status_code, _diagnostics(r))
            body = r.json()
            token = body.get("token") or body.get("access_token")
            if not token:
                raise AuthError(
                    f"{doing}: fetching a token", "GET", redact(realm), 200, "the token server sent no token"
                )
            header = f"Bearer {token}"
        else:
            raise AuthError(doing, "GET", redact(url), 401, f"unsupported auth challenge {scheme!r}")
        with self._lock:
            self._auth[scope] = header

    # --- requests ----------------------------------------------------------------------------
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
        """Send with auth, re-authenticating once on 401 and retrying transient failures with backoff."""
        ok = tuple(ok)
        reauthed = False
        attempt = 0
        while True:
            hdrs = dict(headers or {})
            with self._lock:
                if scope in self._auth:
                    hdrs["Authorization"] = self._auth[scope]
            content = body() if callable(body) else body
            try:
                req = self.client.build_request(method, url, headers=hdrs, content=content, params=params)
                r = self.client.send(req, stream=stream)
            except httpx.TransportError as e:
                if retry and attempt < self.retries:
                    attempt += 1
                    time.sleep(self.backoff * 2 ** (attempt - 1) * (0.5 + random.random()))
                    continue
                raise RegistryError(
                    doing, method, redact(url), None, f"{type(e).__name__}: {e}".replace(str(url), redact(url))
                ) from None
            except httpx.HTTPError as e:  # bad URL, bad header values: not worth retrying
                raise RegistryError(doing, method, redact(url), None, type(e).__name__) from None
            if r.status_code == 401 and not reauthed:
                challenge = r.headers.get("www-authenticate", "")
                r.close()
                sent_with = hdrs.get("Authorization")
                with self._auth_lock:  # parallel blob threads share one token fetch per scope
                    if self._auth.get(scope) == sent_with:
                        self._authenticate(challenge, scope, doing, url)
                reauthed = True
                continue
            if r.status_code in (401, 403):
                diag = _diagnostics(r) if not stream else ""
                r.close()
                who = (
                    f"as {self.credential.username!r} (credentials from {self.credential.source})"
                    if self.credential
                    else "anonymously"
                )
                raise AuthError(
                    doing,
                    method,
                    redact(url),
                    r.status_code,
                    f"the registry refused access {who}; check the auth file or run docker login. {diag}".strip(),
                )
            if r.status_code in RETRY_STATUS and retry and attempt < self.retries:
                r.close()
                attempt += 1
                delay = float(r.headers.get("retry-after", 0) or 0) or self.backoff * 2 ** (attempt - 1) * (
                    0.5 + random.random()
                )
                time.sleep(min(delay, 30))
                continue
            if r.status_code not in ok:
                if stream:
                    r.read()
                diag = _diagnostics(r)
                r.close()
                raise RegistryError(doing, method, redact(url), r.status_code, diag)
            return r

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
            r = self.client.send(self.client.build_request("GET", loc, headers=hdrs), stream=True)
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

    def start_upload(self, repo: str, mount: Optional[tuple[str, str]] = None) -> tuple[Optional[str], bool]:
        """POST an upload session; with `mount=(digest, from_repo)` try a cross-repo mount first.

        Returns (location, mounted): mounted=True means the blob is already there.
        """
        scope = (f"repository:{repo}:pull,push",) + ((f"repository:{mount[1]}:pull",) if mount else ())
        params = {"mount": mount[0], "from": mount[1]} if mount else None
        r = self.request(
            "POST",
            self.url(f"/v2/{repo}/blobs/uploads/"),
            scope=scope,
            params=params,
            doing=f"starting an upload to {self.host}/{repo}",
            ok=(201, 202),
        )
        if r.status_code == 201:
            return None, True
        return str(httpx.URL(self.url("/")).join(r.headers["location"])), False

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
