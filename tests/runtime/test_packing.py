"""The CPU weight layouts of `kaito.runtime.packing`: the switch between oneDNN's packed layout and the dense
weight follows the rows decode steps have, one layer per step, and the outputs do not change with it."""

from __future__ import annotations

import time

import pytest
import torch
from kaito.runtime import cstep, packing
from kaito.runtime.engine import IDLE_LAYOUT_S, Engine
from kaito.runtime.executor import BatchExecutor
from kaito.runtime.loader import load
from kaito.runtime.packing import DENSE_AFTER, PackedLinear
from kaito.runtime.sampling import SamplingParams
from kaito.runtime.sequence import Sequence
from kaito.runtime.settings import RuntimeSettings

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="no oneDNN in this torch build")

PROMPTS = [[1, 50, 60, 70], [1, 5], [1, 300, 301, 302, 9, 9], [1, 8, 8], [1, 41], [1, 77, 78, 79, 80]]


def _fresh(tiny_model_dir) -> torch.nn.Module:
    return load(RuntimeSettings(model_dir=tiny_model_dir, preset="tiny-phi-3", device="cpu")).model


def _packed(linears: list[torch.nn.Module]) -> int:
    return sum(type(m) is PackedLinear for m in linears)


def _prompts(n: int, start: int = 0) -> list[list[int]]:
    """n of the PROMPTS from `start` on, cycling (the dense threshold may be above their count)."""
    return [PROMPTS[(start + i) % len(PROMPTS)] for i in range(n)]


def test_linears_go_dense_after_a_run_of_single_rows_and_back_when_rows_grow(tiny_model_dir, monkeypatch):
    monkeypatch.delenv("KAITO_PACKED_LINEARS", raising=False)
    model = _fresh(tiny_model_dir)
    fast = BatchExecutor(model)
    slow = BatchExecutor(model)
    slow.fast = None  # transformers' own forward over the same modules, whatever layout they hold
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    groups = fast.fast.layout.groups
    assert _packed(linears) == len(linears) and len(groups) == model.config.num_hidden_layers
    assert sum(len(g) for g in groups) == len(linears), "every packed linear, the LM head included, can switch"
    per_group = [len(g) for g in groups]

    for ex in (fast, slow):
        ex.prefill([PROMPTS[0]], [()])
    seen = []
    for step in range(DENSE_AFTER + len(groups) + 3):
        tok = [(11 * step) % 400 + 3]
        a, b = fast.decode(tok), slow.decode(tok)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        assert a.argmax(-1).tolist() == b.argmax(-1).tolist()
        seen.append(_packed(linears))
    # Packed for DENSE_AFTER - 1 steps; from then on one group per step turns dense, the first layers first.
    assert seen[:DENSE_AFTER - 1] == [len(linears)] * (DENSE_AFTER - 1)
    want = [len(linears) - sum(per_group[:k + 1]) for k in range(len(groups))]
    assert seen[DENSE_AFTER - 1:DENSE_AFTER - 1 + len(groups)] == want
    assert seen[-1] == 0 and all(m.weight.layout == torch.strided for m in linears)

    # The C step (kaito.runtime.cstep) keeps dense weights up to its DENSE_ROWS; without it packing's 2.
    assert fast.fast.layout.dense_rows == (cstep.DENSE_ROWS if fast.fast.step is not None else packing.DENSE_ROWS)
    rows = fast.fast.layout.dense_rows + 1
    for ex in (fast, slow):  # more rows join: the next steps pack again, a group per step
        ex.prefill(_prompts(rows - 1, 1), [()] * (rows - 1))
    seen = []
    for step in range(len(groups) + 2):
        toks = [(7 * step + r) % 400 + 3 for r in range(fast.batch_size)]
        a, b = fast.decode(toks), slow.decode(toks)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        assert a.argmax(-1).tolist() == b.argmax(-1).tolist()
        seen.append(_packed(linears))
    assert seen[:len(groups)] == [sum(per_group[len(groups) - k - 1:]) for k in range(len(groups))]
    assert seen[-1] == len(linears) and all(m.weight.is_mkldnn for m in linears)


def test_a_short_lull_keeps_the_packed_layout(tiny_model_dir, monkeypatch):
    """Fewer than DENSE_AFTER steps of few rows between larger batches never repack anything."""
    monkeypatch.delenv("KAITO_PACKED_LINEARS", raising=False)
    model = _fresh(tiny_model_dir)
    ex = BatchExecutor(model)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    rows = ex.fast.layout.dense_rows + 1
    for _ in range(3):
        ex.prefill(_prompts(rows - ex.batch_size), [()] * (rows - ex.batch_size))
        ex.decode([5] * rows)  # more rows than a dense step wins at: the run of short steps restarts
        ex.evict([0])
        for _ in range(DENSE_AFTER - 1):
            ex.decode([5])
            assert _packed(linears) == len(linears)
    ex.decode([5])  # the DENSE_AFTER-th short step in a row: the first layer goes dense
    assert 0 < _packed(linears) < len(linears)


@pytest.mark.parametrize("value", ["1", "0"])
def test_the_env_pins_the_layout(tiny_model_dir, monkeypatch, value):
    monkeypatch.setenv("KAITO_PACKED_LINEARS", value)
    model = _fresh(tiny_model_dir)
    ex = BatchExecutor(model)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    want = len(linears) if value == "1" else 0
    assert _packed(linears) == want
    ex.prefill([PROMPTS[0]], [()])
    for _ in range(DENSE_AFTER + 20):
        ex.decode([9])
    assert _packed(linears) == want and not ex.fast.layout.enabled


@pytest.mark.skipif(not packing._bf16_kernels(), reason="no oneDNN bf16 kernels on this CPU")
def test_bfloat16_linears_stay_packed(monkeypatch):
    """In bf16 the packed layout is faster at every row count: nothing switches."""
    from transformers import LlamaConfig, LlamaForCausalLM

    monkeypatch.delenv("KAITO_PACKED_LINEARS", raising=False)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, attn_implementation="sdpa")
    model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    ex = BatchExecutor(model)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert _packed(linears) == len(linears) and not ex.fast.layout.enabled
    ex.prefill([[1, 5, 9]], [()])
    for _ in range(DENSE_AFTER + 5):
        ex.decode([7])
    assert _packed(linears) == len(linears)


def _until(cond, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.01)
    return cond()


def test_an_idle_engine_turns_the_layout_dense_and_a_burst_packs_it_again(tiny_model_dir, monkeypatch):
    """A started engine with nothing to do turns its layers dense one at a time (a fresh server's first request
    decodes dense from its first step); a burst of more rows packs them again step by step, and the quiet after it
    turns them dense again. The tokens are the same whatever the layout."""
    monkeypatch.delenv("KAITO_PACKED_LINEARS", raising=False)
    loaded = load(RuntimeSettings(model_dir=tiny_model_dir, preset="tiny-phi-3", device="cpu"))
    model = loaded.model
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    e = Engine(BatchExecutor(model), loaded.tokenizer, eos_ids=loaded.eos_ids, max_model_len=loaded.max_model_len,
               max_batch_size=16)
    layout = e.ex.fast.layout
    assert _packed(linears) == len(linears) and layout.idle_pending
    seen: list[int] = []
    step = layout.step

    def spy(rows: int) -> None:
        step(rows)
        seen.append(_packed(linears))

    layout.step = spy  # type: ignore[method-assign]
    greedy = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    alone = Sequence(PROMPTS[0], greedy)
    e.start()
    try:
        assert _until(lambda: _packed(linears) == 0), "an idle engine turns every layer dense"
        assert not layout.idle_pending and seen[-1] == 0
        seen.clear()  # `idle` converts through `step` too
        e.submit([alone])
        assert _until(lambda: alone.finish_reason is not None)
        assert seen and set(seen) == {0}, "the first request decoded dense from its first step"
        seen.clear()
        burst = [Sequence(_prompts(1, i)[0], SamplingParams(max_tokens=len(layout.groups) + 6, temperature=0.0,
                                                            ignore_eos=True))
                 for i in range(layout.dense_rows + 2)]
        e.submit(burst)
        assert _until(lambda: all(s.finish_reason is not None for s in burst))
        assert max(seen) == len(linears), "a burst of more rows packs every layer again, a layer per step"
        assert _until(lambda: _packed(linears) == 0), "and the quiet after it turns them dense again"
        again = Sequence(PROMPTS[0], greedy)
        e.submit([again])
        assert _until(lambda: again.finish_reason is not None)
    finally:
        e.stop()
    assert e.error is None
    assert alone.output_ids == again.output_ids and len(alone.output_ids) == 12


def test_an_idle_engine_beside_a_prefill_thread_keeps_its_layout(tiny_model_dir, monkeypatch):
    """The prefill thread forwards beside the engine thread: no layout switch then, idle or not."""
    monkeypatch.delenv("KAITO_PACKED_LINEARS", raising=False)
    loaded = load(RuntimeSettings(model_dir=tiny_model_dir, preset="tiny-phi-3", device="cpu"))
    linears = [m for m in loaded.model.modules() if isinstance(m, torch.nn.Linear)]
    e = Engine(BatchExecutor(loaded.model), loaded.tokenizer, eos_ids=loaded.eos_ids,
               max_model_len=loaded.max_model_len, prefill_thread=True)
    e.start()
    try:
        time.sleep(10 * IDLE_LAYOUT_S)
        assert _packed(linears) == len(linears)
    finally:
        e.stop()
