"""Kopf handlers of the Kaito operator: thin wrappers over `kaito.operator.reconcile`.

`build_registry(state)` returns a fresh `kopf.OperatorRegistry` (no
module-global handlers), used by `kaito operator run`, the integration tests
and the benchmark through `run_operator`. Handlers:
- login: Kopf's own login (service account or kubeconfig), or the
  ConnectionInfo given (tests); it also builds the operator's `KubeAPI`.
- create/update/resume: a reconcile pass (immutable fields are checked
  against the spec pinned in the `kaito.sh/immutable-spec` annotation at the
  first valid pass, so timers and child events refuse them too); invalid specs raise
  `kopf.PermanentError` (after a False condition and a Warning Event), waits
  raise `kopf.TemporaryError` so Kopf retries with a delay.
- child events (Deployments, StatefulSets, Jobs, NodeClaims, Nodes labelled
  with kaito.sh/workspace): re-run the owning workspace's pass at once.
- timer: re-checks status (a pod crashed, a node went away) without writes
  when nothing changed; it also notices a readiness timeout (the preset's,
  see `kaito.operator.readiness`), reported once by a condition and a Warning Event.
- delete: deletes the workspace's NodeClaims (Kopf's finalizer holds the
  object until then).
- validate: the admission webhook (`/validate-workspace`), on when a port is set
  and its TLS files exist (`webhook_enabled`); off, with one log line, otherwise.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypedDict

import kopf
from kaito.operator import admission, reconcile, schema
from kaito.operator.kube import APIError, KubeAPI
from kaito.operator.settings import OperatorSettings
from kaito.presets.skus import DEFAULT_MAX_REPLICAS

FINALIZER = "workspace.finalizer.kaito.sh"


class _ResourceKwargs(TypedDict):
    """Kopf's resource selector as keywords, typed so `**WORKSPACES` checks against each decorator."""

    group: str
    version: str
    plural: str


WORKSPACES: _ResourceKwargs = {"group": schema.GROUP, "version": schema.STORAGE_VERSION, "plural": schema.PLURAL}
CHILD_LABELS = {schema.LABEL_WORKSPACE: kopf.PRESENT}
log = logging.getLogger("kaito.operator")


def webhook_enabled(settings: OperatorSettings) -> bool:
    """Whether to serve the admission webhook; says once, in the log, why not and how to turn it on.

    Outside a cluster (`kaito operator run` with a kubeconfig) there are no cert-manager
    certificates: the operator still runs, and its reconcile passes apply the same rules.
    """
    if not settings.webhook_port:
        return False
    cert_dir = settings.webhook_cert_dir
    if cert_dir is None:
        return True  # plain HTTP (tests)
    missing = [f for f in ("tls.crt", "tls.key") if not os.path.isfile(os.path.join(cert_dir, f))]
    if missing:
        log.warning(
            "admission webhook off: no %s in %s; to turn it on set KAITO_WEBHOOK_CERT_DIR to a directory with "
            "tls.crt and tls.key (KAITO_WEBHOOK_PORT=0 turns it off without this line). Workspaces are still "
            "validated by every reconcile pass.",
            " or ".join(missing), cert_dir,
        )
        return False
    return True


@dataclass
class OperatorState:
    """Shared by the handlers of one operator: the API client and per-workspace locks."""

    settings: OperatorSettings
    connection: Any | None = None  # kopf.ConnectionInfo forced by tests; None: Kopf's login
    api: KubeAPI | None = None
    locks: dict[tuple[str, str], asyncio.Lock] = field(default_factory=lambda: defaultdict(asyncio.Lock))
    passes: int = 0
    tune_kopf: Callable[[kopf.OperatorSettings], None] | None = None
    """Adjusts Kopf's settings after ours (tests and the benchmark shorten Kopf's exit timeouts)."""


async def _pass(
    state: OperatorState, body: dict[str, Any], logger: kopf.Logger, old: dict[str, Any] | None = None
) -> reconcile.Outcome:
    meta = body["metadata"]
    key = (meta.get("namespace") or "default", meta["name"])
    async with state.locks[key]:
        assert state.api is not None, "the login handler builds the API client first"
        fresh = await state.api.get("Workspace", key[0], key[1])
        if fresh is None or (fresh.get("metadata") or {}).get("deletionTimestamp"):
            return reconcile.Outcome(done=True)
        state.passes += 1
        out = await reconcile.reconcile(state.api, fresh, state.settings, old)
    if out.created or out.patched:
        logger.info("workspace %s/%s: created %s, patched %s", key[0], key[1], out.created, out.patched)
    if out.invalid and out.conditions_changed:
        await reconcile.post_event(state.api, fresh, "InvalidWorkspace", out.invalid)
    for reason, message in out.events:
        try:
            await reconcile.post_event(state.api, fresh, reason, message)
        except APIError as e:  # the condition already says it; a lost Event must not fail the pass
            logger.warning("could not post %s Event for %s/%s: %s", reason, key[0], key[1], e)
    return out


def build_registry(state: OperatorState) -> kopf.OperatorRegistry:
    """A fresh registry with every handler of one operator, as a list of named groups."""
    registry = kopf.OperatorRegistry()
    webhook = webhook_enabled(state.settings)
    _on_lifecycle(registry, state, webhook)
    _on_workspace(registry, state)
    _on_children(registry, state)
    _on_delete(registry, state)
    if webhook:
        _on_validate(registry, state.settings)
    return registry


def _on_lifecycle(registry: kopf.OperatorRegistry, state: OperatorState, webhook: bool) -> None:
    """Kopf's settings (and the webhook server), the login that builds our API client, its cleanup."""

    @kopf.on.startup(registry=registry)
    def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        settings.persistence.finalizer = FINALIZER
        settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="kaito.sh")
        settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
            prefix="kaito.sh", key="last-handled-configuration"
        )
        # Waits are logged as errors on every retry; posting those as Events would flood the
        # namespace. Our own Warning Event (kopf.warn on invalid specs) is posted regardless.
        settings.posting.level = logging.CRITICAL
        if webhook:
            cert_dir = state.settings.webhook_cert_dir
            settings.admission.server = kopf.WebhookServer(
                addr="0.0.0.0",
                port=state.settings.webhook_port,
                host=state.settings.webhook_host,
                certfile=f"{cert_dir}/tls.crt" if cert_dir else None,
                pkeyfile=f"{cert_dir}/tls.key" if cert_dir else None,
                insecure=cert_dir is None,
            )
        if state.tune_kopf is not None:
            state.tune_kopf(settings)

    @kopf.on.login(registry=registry)
    def login(**kwargs: Any) -> Any:
        info = state.connection
        if info is None:
            info = kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)
        if info is not None and state.api is None:
            state.api = KubeAPI.from_connection_info(info, state.settings)
        return info

    @kopf.on.cleanup(registry=registry)
    async def close(**_: Any) -> None:
        if state.api is not None:
            await state.api.close()


def _on_workspace(registry: kopf.OperatorRegistry, state: OperatorState) -> None:
    """Reconcile on create, update and resume, and re-check every resync period."""
    settings = state.settings

    async def handle(body: Any, logger: kopf.Logger, old: Any = None, reason: str = "", **_: Any) -> None:
        # Only updates carry an old spec to check immutability against (Kaito enforces it in the webhook).
        previous = dict(old) if reason == "update" and old and old.get("resource") else None
        try:
            out = await _pass(state, dict(body), logger, previous)
        except APIError as e:
            raise kopf.TemporaryError(f"API error, will retry: {e}", delay=settings.retry_seconds) from None
        if out.invalid:
            raise kopf.PermanentError(out.invalid)
        if out.waiting and not out.done:
            raise kopf.TemporaryError(out.waiting, delay=settings.retry_seconds)

    for decorator in (kopf.on.create, kopf.on.update, kopf.on.resume):
        decorator(**WORKSPACES, registry=registry, id="reconcile")(handle)

    @kopf.timer(**WORKSPACES, registry=registry, interval=settings.resync_seconds, idle=settings.resync_seconds)
    async def resync(body: Any, logger: kopf.Logger, **_: Any) -> None:
        try:
            await _pass(state, dict(body), logger)
        except APIError as e:
            logger.warning("resync of %s failed, next tick retries: %s", body["metadata"]["name"], e)


def _on_children(registry: kopf.OperatorRegistry, state: OperatorState) -> None:
    """Reconcile a workspace when one of its children (or its nodes) changes."""

    async def child_event(body: Any, logger: kopf.Logger, type: str | None, **_: Any) -> None:
        labels = body.get("metadata", {}).get("labels") or {}
        name, ns = labels.get(schema.LABEL_WORKSPACE), labels.get(schema.LABEL_WORKSPACE_NS)
        if not name or not ns or state.api is None:
            return
        try:
            await _pass(state, {"metadata": {"name": name, "namespace": ns}}, logger)
        except (APIError, kopf.PermanentError) as e:  # the workspace's own handlers report these
            logger.debug("child event for %s/%s: %s", ns, name, e)

    for group, version, plural in (
        ("apps", "v1", "deployments"),
        ("apps", "v1", "statefulsets"),
        ("batch", "v1", "jobs"),
        ("karpenter.sh", "v1", "nodeclaims"),
        ("", "v1", "nodes"),
    ):
        kopf.on.event(
            group=group, version=version, plural=plural, labels=CHILD_LABELS, registry=registry, id=f"child-{plural}"
        )(child_event)


def _on_delete(registry: kopf.OperatorRegistry, state: OperatorState) -> None:
    """On deletion: WorkspaceDeleting, then the NodeClaims go (the finalizer waits for it)."""
    settings = state.settings

    @kopf.on.delete(**WORKSPACES, registry=registry, id="finalize")
    async def on_delete(body: Any, logger: kopf.Logger, **_: Any) -> None:
        assert state.api is not None
        try:
            await reconcile.write_status(
                state.api, dict(body), [reconcile._cond("WorkspaceDeleting", True, "Deleting", "deleting NodeClaims")]
            )
            n = await reconcile.finalize(state.api, dict(body))
        except APIError as e:
            raise kopf.TemporaryError(f"deleting NodeClaims: {e}", delay=settings.retry_seconds) from None
        logger.info("deleted %d NodeClaim(s)", n)


def _on_validate(registry: kopf.OperatorRegistry, settings: OperatorSettings) -> None:
    """The validating webhook, with this operator's replica cap."""

    @kopf.on.validate(**WORKSPACES, registry=registry, id="validate-workspace")
    # Kopf passes `old` and `operation` to admission handlers through **kwargs (WebhookFn leaves them out).
    def on_validate(body: Any, old: Any = None, operation: str | None = None, **_: Any) -> None:
        validate_webhook(body, old, operation, max_replicas=settings.max_replicas)


def validate_webhook(
    body: Any, old: Any, operation: str | None, max_replicas: int = DEFAULT_MAX_REPLICAS, **_: Any
) -> None:
    """The admission webhook: reject a Workspace that breaks a rule, naming the fields."""
    try:
        admission.validate(dict(body), dict(old) if operation == "UPDATE" and old else None, max_replicas)
    except admission.WorkspaceInvalid as e:
        raise kopf.AdmissionError(str(e), code=422) from None
    except Exception as e:  # never a traceback to the user: a bug here still answers with a reason
        log.exception("validating workspace")
        raise kopf.AdmissionError(f"the operator could not validate this Workspace: {type(e).__name__}: {e}",
                                  code=500) from None


async def run_operator(
    state: OperatorState,
    stop_flag: asyncio.Event | None = None,
    ready_flag: asyncio.Event | None = None,
    namespaces: list[str] | None = None,
) -> None:
    """Run the operator in this event loop until stop_flag is set (clusterwide unless namespaces)."""
    await kopf.operator(
        registry=build_registry(state),
        clusterwide=not namespaces,
        namespaces=namespaces or (),
        stop_flag=stop_flag,
        ready_flag=ready_flag,
        standalone=True,
    )
