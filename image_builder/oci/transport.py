"""The registry client's transports, layered like go-containerregistry's: HTTP, scheme, auth, retry.

Each layer is a small object with `send(Request) -> httpx.Response` wrapping
the one below: `HTTPTransport` owns the httpx client and turns a dropped
connection into a `TransportFailure`; `SchemeTransport` resolves a path to a URL,
probing https then http once, on first use, for insecure registries (no I/O in
any constructor); `AuthTransport` answers a 401 challenge (Basic, or a Bearer
token from realm/service/scope) and re-sends once; `RetryTransport` retries
connection failures and the statuses of `kaito.presets.retry` with its one
policy. `remote.Registry` builds the stack and puts the OCI API on top; nothing
else in the image builder talks HTTP. Errors carry the method, a redacted URL
and the registry's diagnostics; credentials never appear in them.
"""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Iterable, Optional, Union

import httpx

from kaito.image_builder.oci.auth import Credential
from kaito.image_builder.oci.errors import AuthError, RegistryError
from kaito.presets import retry
from kaito.presets.validate import redact

Body = Union[None, bytes, Callable[[], Iterable[bytes]]]


@dataclass(frozen=True)
class Request:
    """One registry call: `url` is absolute, or a path (`/v2/...`) the scheme layer completes."""

    method: str
    url: str
    scope: tuple[str, ...]
    doing: str
    headers: dict = field(default_factory=dict)
    body: Body = None  # a callable is called per attempt, so a retried stream starts afresh
    params: Optional[dict] = None
    stream: bool = False
    retry: bool = True


class TransportFailure(retry.TransientError):
    """A transient failure carrying the `RegistryError` to raise once the retries are spent."""

    def __init__(self, error: RegistryError, retry_after: Optional[str] = None) -> None:
        super().__init__(str(error), status=error.status, retry_after=retry_after)
        self.error = error


def diagnostics(r: httpx.Response) -> str:
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
    """`Bearer realm="...",service="..."` -> ("bearer", {"realm": ..., "service": ...})."""
    scheme, _, rest = header.strip().partition(" ")
    return scheme.lower(), dict(re.findall(r'(\w+)="([^"]*)"', rest))


class HTTPTransport:
    """The httpx client, opened on demand (Image values read earlier may stream after a close)."""

    def __init__(self, *, timeout: float = 120.0, verify: bool = True) -> None:
        self._timeout = httpx.Timeout(timeout, connect=15.0)
        self._verify = verify
        self._client: Optional[httpx.Client] = None
        self._lock = threading.Lock()

    @property
    def client(self) -> httpx.Client:
        with self._lock:
            if self._client is None or self._client.is_closed:
                self._client = httpx.Client(
                    timeout=self._timeout,
                    limits=httpx.Limits(max_connections=32, max_keepalive_connections=16),
                    verify=self._verify,
                )
            return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()

    def send(self, req: Request) -> httpx.Response:
        content = req.body() if callable(req.body) else req.body
        try:
            built = self.client.build_request(
                req.method, req.url, headers=req.headers, content=content, params=req.params
            )
            return self.client.send(built, stream=req.stream)
        except httpx.TransportError as e:
            detail = f"{type(e).__name__}: {e}".replace(str(req.url), redact(req.url))
            raise TransportFailure(RegistryError(req.doing, req.method, redact(req.url), None, detail)) from None
        except httpx.HTTPError as e:  # a bad URL or header value: not worth retrying
            raise RegistryError(req.doing, req.method, redact(req.url), None, type(e).__name__) from None


class SchemeTransport:
    """Completes `/v2/...` paths with the host's scheme, found lazily and cached.

    Loopback hosts speak http unless told otherwise; `insecure=True` is docker's
    insecure-registry rule (https without verification, else plain http), probed once.
    """

    def __init__(self, inner: HTTPTransport, host: str, insecure: Optional[bool], loopback: bool) -> None:
        self.inner, self.host, self.insecure, self.loopback = inner, host, insecure, loopback
        self._scheme: Optional[str] = None
        self._lock = threading.Lock()

    @property
    def scheme(self) -> str:
        with self._lock:
            if self._scheme is None:
                self._scheme = self._probe()
            return self._scheme

    def _probe(self) -> str:
        if self.loopback and self.insecure is None:
            return "http"
        if not self.insecure:
            return "https"
        try:
            self.inner.client.get(f"https://{self.host}/v2/", timeout=5).close()
            return "https"
        except httpx.TransportError:
            return "http"

    def url(self, path: str) -> str:
        return f"{self.scheme}://{self.host}{path}"

    def send(self, req: Request) -> httpx.Response:
        if req.url.startswith("/"):
            req = replace(req, url=self.url(req.url))
        return self.inner.send(req)


class AuthTransport:
    """Adds the Authorization cached for a request's scope; on a 401, answers the challenge and re-sends once."""

    def __init__(self, inner: SchemeTransport, host: str, credential: Callable[[], Optional[Credential]]) -> None:
        self.inner, self.host, self.credential = inner, host, credential
        self._auth: dict[tuple[str, ...], str] = {}
        self._lock = threading.Lock()
        self._fetch_lock = threading.Lock()  # parallel blob threads share one token fetch per scope

    def send(self, req: Request) -> httpx.Response:
        with self._lock:
            sent_with = self._auth.get(req.scope)
        r = self.inner.send(self._with_auth(req, sent_with))
        if r.status_code != 401:
            return r
        challenge = r.headers.get("www-authenticate", "")
        r.close()
        with self._fetch_lock:
            with self._lock:
                current = self._auth.get(req.scope)
            if current == sent_with:
                current = self._authenticate(challenge, req)
                with self._lock:
                    self._auth[req.scope] = current
        return self.inner.send(self._with_auth(req, current))

    @staticmethod
    def _with_auth(req: Request, header: Optional[str]) -> Request:
        return replace(req, headers={**req.headers, "Authorization": header}) if header else req

    def _authenticate(self, challenge: str, req: Request) -> str:
        scheme, params = parse_challenge(challenge)
        cred = self.credential()
        if scheme == "basic":
            if not cred:
                raise AuthError(
                    req.doing,
                    req.method,
                    redact(req.url),
                    401,
                    f"{self.host} requires credentials; pass --auth-file (docker config.json) or run docker login",
                )
            return cred.basic_header()
        if scheme == "bearer":
            return f"Bearer {self._token(params, req, cred)}"
        what = f"unsupported auth challenge {scheme!r}" if scheme else "401 without an auth challenge"
        raise AuthError(req.doing, req.method, redact(req.url), 401, what)

    def _token(self, params: dict[str, str], req: Request, cred: Optional[Credential]) -> str:
        """Exchange credentials (or nothing) for a Bearer token at the challenge's realm."""
        realm, doing = params.get("realm"), f"{req.doing}: fetching a token"
        if not realm:
            raise AuthError(req.doing, req.method, redact(req.url), 401, "bearer challenge without a realm")
        scopes = req.scope or ((params["scope"],) if params.get("scope") else ())
        client = self.inner.inner.client
        try:
            if cred and cred.identity_token:
                data = {
                    "grant_type": "refresh_token",
                    "refresh_token": cred.identity_token,
                    "service": params.get("service", ""),
                    "scope": " ".join(scopes),
                    "client_id": "kaito",
                }
                r = client.post(realm, data=data)
            else:
                q = [("service", params["service"])] if params.get("service") else []
                q += [("scope", s) for s in scopes]
                r = client.get(realm, params=tuple(q), headers={"Authorization": cred.basic_header()} if cred else {})
        except httpx.TransportError as e:
            raise TransportFailure(RegistryError(doing, "GET", redact(realm), None, type(e).__name__)) from None
        if r.status_code in (401, 403):
            who = f"as {cred.username!r} (from {cred.source})" if cred else "anonymously"
            raise AuthError(
                doing,
                "GET",
                redact(realm),
                r.status_code,
                f"the token server refused {who}; check the credentials in the auth file",
            )
        if r.status_code != 200:
            error = RegistryError(doing, "GET", redact(realm), r.status_code, diagnostics(r))
            if retry.retryable_status(r.status_code):
                raise TransportFailure(error, r.headers.get("retry-after"))
            raise error
        token = r.json().get("token") or r.json().get("access_token")
        if not token:
            raise AuthError(doing, "GET", redact(realm), 200, "the token server sent no token")
        return token


class RetryTransport:
    """Retries dropped connections and retryable statuses with `kaito.presets.retry`'s policy."""

    def __init__(
        self, inner: AuthTransport, policy: retry.Backoff, sleep: Callable[[float], None] = time.sleep
    ) -> None:
        self.inner, self.policy, self.sleep = inner, policy, sleep

    def _once(self, req: Request) -> httpx.Response:
        r = self.inner.send(req)
        if not retry.retryable_status(r.status_code):
            return r
        if req.stream:
            r.read()
        error = RegistryError(req.doing, req.method, redact(str(r.request.url)), r.status_code, diagnostics(r))
        r.close()
        raise TransportFailure(error, r.headers.get("retry-after"))

    def send(self, req: Request) -> httpx.Response:
        # A body that cannot be replayed (a PATCH chunk) is sent once; the pusher resumes from the registry's offset.
        policy = self.policy if req.retry else retry.Backoff(attempts=1)
        try:
            return retry.call(lambda: self._once(req), policy=policy, transient=(TransportFailure,), sleep=self.sleep)
        except TransportFailure as e:
            raise e.error from None
