"""Status conditions: transitions keep their time, changes are detected, generation is recorded."""

from __future__ import annotations

from kaito.operator.reconcile import _cond, merge_conditions


def test_unchanged_conditions_are_not_a_change_and_keep_their_time() -> None:
    first, changed = merge_conditions([], [_cond("ResourceReady", False, "NodesNotReady", "0 of 1")], 1)
    assert changed and first[0]["observedGeneration"] == 1 and first[0]["lastTransitionTime"]
    first[0]["lastTransitionTime"] = "2020-01-01T00:00:00Z"
    again, changed = merge_conditions(first, [_cond("ResourceReady", False, "NodesNotReady", "0 of 1")], 1)
    assert not changed and again[0]["lastTransitionTime"] == "2020-01-01T00:00:00Z"


def test_flip_message_and_generation_changes_are_detected() -> None:
    base = [{"type": "ResourceReady", "status": "False", "reason": "NodesNotReady", "message": "0 of 1",
             "observedGeneration": 1, "lastTransitionTime": "2020-01-01T00:00:00Z"}]
    flipped, changed = merge_conditions(base, [_cond("ResourceReady", True, "NodesReady", "1 of 1")], 1)
    assert changed and flipped[0]["status"] == "True" and flipped[0]["lastTransitionTime"] != "2020-01-01T00:00:00Z"
    _, changed = merge_conditions(base, [_cond("ResourceReady", False, "NodesNotReady", "0 of 1")], 2)
    assert changed
    _, changed = merge_conditions(base, [_cond("ResourceReady", False, "NodesNotReady", "0 of 2")], 1)
    assert changed


def test_conditions_not_set_this_pass_are_kept() -> None:
    base = [{"type": "WorkspaceDeleting", "status": "True", "reason": "Deleting", "message": "m"}]
    out, _ = merge_conditions(base, [_cond("ResourceReady", True, "NodesReady", "1 of 1")], None)
    assert [c["type"] for c in out] == ["ResourceReady", "WorkspaceDeleting"]
    assert "observedGeneration" not in out[0]


async def test_warning_event_is_a_valid_core_event() -> None:
    import kubernetes_validate
    from kaito.operator.reconcile import post_event

    class Recorder:  # our own client's boundary: capture what would be sent
        def __init__(self) -> None:
            self.created: list[dict] = []

        async def create(self, obj: dict) -> dict:
            self.created.append(obj)
            return obj

    api = Recorder()
    body = {"apiVersion": "kaito.sh/v1beta1", "metadata": {"name": "ws", "namespace": "team", "uid": "u-1"}}
    await post_event(api, body, "InvalidWorkspace", "resource.count: is immutable after creation")  # type: ignore[arg-type]
    event = api.created[0]
    kubernetes_validate.validate(event, "1.30.0", strict=True)
    assert event["involvedObject"]["uid"] == "u-1" and event["type"] == "Warning"


def test_workspace_ready_mirrors_workspace_succeeded() -> None:
    """The seed's users wait on WorkspaceReady; newer Kaito's WorkspaceSucceeded says the same."""
    from kaito.operator.reconcile import with_workspace_ready

    conds = with_workspace_ready([_cond("ResourceReady", True, "NodesReady", "1 of 1"),
                                  _cond("WorkspaceSucceeded", False, "Pending", "waiting")])
    ready = next(c for c in conds if c["type"] == "WorkspaceReady")
    assert (ready["status"], ready["reason"], ready["message"]) == ("False", "Pending", "waiting")
    assert with_workspace_ready([_cond("WorkspaceDeleting", True, "Deleting", "d")]) == [
        _cond("WorkspaceDeleting", True, "Deleting", "d")]
