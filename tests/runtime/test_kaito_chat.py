"""The pure steps of POST /chat (kaito.runtime.kaito_chat): context fitting and sampling params.
The HTTP contract itself is pinned in test_api.py against the real tiny model."""

import pytest
from kaito.runtime.kaito_chat import _fit_context, _sampling_params
from kaito.runtime.protocol import GenerateKwargs, KaitoChatRequest
from kaito.runtime.serving import ApiError


def _req(**kw) -> KaitoChatRequest:
    gk = kw.pop("gk", {})
    return KaitoChatRequest(prompt="x", generate_kwargs=gk, **kw)


def test_max_length_counts_prompt_and_new_tokens():
    assert _fit_context([1] * 10, _req(gk={"max_length": 15}), 100) == ([1] * 10, 5)
    assert _fit_context([1] * 10, _req(gk={"max_length": 15, "max_new_tokens": 7}), 100) == ([1] * 10, 7)


def test_too_long_is_refused_naming_the_limit_and_the_fix():
    with pytest.raises(ApiError) as e:
        _fit_context([1] * 10, _req(gk={"max_length": 10}), 100)
    assert "max_length 10" in e.value.message and "hole" in e.value.message
    with pytest.raises(ApiError) as e:
        _fit_context([1] * 90, _req(gk={"max_new_tokens": 20}), 100)
    assert "100 tokens" in e.value.message and "90 tokens" in e.value.message


def test_hole_cuts_the_prompt_from_the_left():
    ids = list(range(90))
    kept, new = _fit_context(ids, _req(handle_long_generation="hole", gk={"max_new_tokens": 20}), 100)
    assert new == 20 and kept == ids[-80:]
    kept, new = _fit_context(ids, _req(handle_long_generation="hole", gk={"max_length": 50}), 100)
    assert new == 1 and kept == ids  # max_length already reached: one new token, the prompt fits whole


def test_sampling_params_greedy_seeds_and_min_tokens():
    ps = _sampling_params(GenerateKwargs(do_sample=False, seed=7, num_return_sequences=3, min_length=12), 5, 10)
    assert [p.seed for p in ps] == [7, 8, 9]
    assert all(p.temperature == 0.0 and p.max_tokens == 5 and p.min_tokens == 2 for p in ps)
    (p,) = _sampling_params(GenerateKwargs(temperature=0.5), 5, 10)
    assert p.temperature == 0.5 and p.seed is None and p.min_tokens == 0
