"""Registry credentials: docker `config.json`, podman `auth.json` and Kubernetes dockerconfigjson Secrets.

No network here: `remote.Registry` looks up `credential_for(host)` when the auth
transport (`oci/transport.py`) meets a registry's challenge, or at once for an
auth file the user named. Credentials never reach logs or messages: `Credential`'s repr
redacts them and errors name only the user and the file they came from.
Search order: the explicit auth file, $REGISTRY_AUTH_FILE, $DOCKER_CONFIG/config.json,
~/.docker/config.json, $XDG_RUNTIME_DIR/containers/auth.json.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import yaml

from kaito.presets.errors import InvalidInput


@dataclass(frozen=True)
class Credential:
    """A user/password (or identity token) for one registry host."""

    username: str = ""
    password: str = field(default="", repr=False)
    identity_token: str = field(default="", repr=False)
    source: str = ""  # the file it came from, for messages

    def __repr__(self) -> str:
        return f"Credential(username={self.username!r}, password=<redacted>, source={self.source!r})"

    def basic_header(self) -> str:
        return "Basic " + base64.b64encode(f"{self.username}:{self.password}".encode()).decode()


def _host_key(key: str) -> str:
    k = key.split("://", 1)[-1]
    k = k.split("/", 1)[0]
    return "registry-1.docker.io" if k in ("index.docker.io", "docker.io") else k


def _entries(doc: dict, path: Path) -> dict:
    """The `auths` map of a config.json, a dockerconfigjson payload, a Secret object or a legacy .dockercfg."""
    if doc.get("kind") == "Secret":
        data = doc.get("data") or {}
        string_data = doc.get("stringData") or {}
        for key in (".dockerconfigjson", ".dockercfg"):
            if key in string_data:
                return _entries(json.loads(string_data[key]), path)
            if key in data:
                return _entries(json.loads(base64.b64decode(data[key])), path)
        raise InvalidInput(
            f"auth file {path}: Secret has no .dockerconfigjson key; create it with type kubernetes.io/dockerconfigjson"
        )
    if "auths" in doc:
        return doc["auths"] or {}
    return {k: v for k, v in doc.items() if isinstance(v, dict) and ("auth" in v or "username" in v)}


def load_auth_file(path: Union[str, Path]) -> dict[str, Credential]:
    """host -> Credential from one auth file (JSON or a YAML Secret manifest)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise InvalidInput(
            f"auth file {path}: cannot read it ({e.strerror}); pass an existing docker config.json"
        ) from None
    try:
        doc = json.loads(text)
    except ValueError:
        try:
            doc = yaml.safe_load(text)
        except yaml.YAMLError:
            doc = None
    if not isinstance(doc, dict):
        raise InvalidInput(f"auth file {path}: not a docker config.json or dockerconfigjson Secret")
    creds: dict[str, Credential] = {}
    for key, entry in _entries(doc, path).items():
        if not isinstance(entry, dict):
            continue
        user, pw = entry.get("username", ""), entry.get("password", "")
        if entry.get("auth"):
            try:
                user, _, pw = base64.b64decode(entry["auth"]).decode().partition(":")
            except (ValueError, UnicodeDecodeError):
                raise InvalidInput(f"auth file {path}: the 'auth' of {key!r} is not base64 of user:password") from None
        creds[_host_key(key)] = Credential(user, pw, entry.get("identitytoken", ""), str(path))
    return creds


def default_auth_files() -> list[Path]:
    out = []
    for env in ("REGISTRY_AUTH_FILE",):
        if os.environ.get(env):
            out.append(Path(os.environ[env]))
    if os.environ.get("DOCKER_CONFIG"):
        out.append(Path(os.environ["DOCKER_CONFIG"]) / "config.json")
    out.append(Path.home() / ".docker" / "config.json")
    if os.environ.get("XDG_RUNTIME_DIR"):
        out.append(Path(os.environ["XDG_RUNTIME_DIR"]) / "containers" / "auth.json")
    return out


def _helper(path: Path, host: str) -> Optional[str]:
    """The credential helper docker would use for `host` (credHelpers, else credsStore), if any."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict):
        return None
    helpers = {_host_key(k): v for k, v in (doc.get("credHelpers") or {}).items()}
    return helpers.get(_host_key(host)) or doc.get("credsStore")


def from_helper(name: str, host: str, source: str) -> Optional[Credential]:
    """Ask `docker-credential-<name> get` (docker's protocol: host on stdin, JSON out)."""
    exe = shutil.which(f"docker-credential-{name}")
    if not exe:
        return None
    for server in (host, f"https://{host}"):
        try:
            r = subprocess.run([exe, "get"], input=server, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        if r.returncode == 0:
            try:
                d = json.loads(r.stdout)
            except ValueError:
                return None
            user, secret = d.get("Username", ""), d.get("Secret", "")
            if user == "<token>":
                return Credential("", "", secret, f"{source} (helper {name})")
            return Credential(user, secret, "", f"{source} (helper {name})")
    return None  # the helper's output may echo what it was given: never surface it


def credential_for(host: str, auth_file: Optional[Union[str, Path]] = None) -> Optional[Credential]:
    """Credentials for `host` from the explicit auth file, else the first default file that has some.

    Inline `auths` entries win; docker's credential helpers (credHelpers/credsStore) are asked next.
    """
    files = [Path(auth_file)] if auth_file is not None else [p for p in default_auth_files() if p.is_file()]
    for p in files:
        try:
            found = load_auth_file(p).get(_host_key(host))
        except InvalidInput:
            if auth_file is not None:
                raise
            continue
        if found:
            return found
        helper = _helper(p, host)
        if helper:
            cred = from_helper(helper, _host_key(host), str(p))
            if cred:
                return cred
    return None
