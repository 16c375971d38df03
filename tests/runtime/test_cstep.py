"""The whole decode step in C (`kaito.runtime.cstep`): token-equal to transformers' greedy decode on every
architecture the fast path serves, used only while every linear is dense and hook-free, and left for the glue
path whenever something it does not compute is there (hooks, packed weights, too many rows, odd cache strides)."""

from __future__ import annotations

import re

import pytest
import torch
from kaito.runtime import cglue, cstep
from kaito.runtime.executor import BatchExecutor
from kaito.runtime.fastpath import FastDecoder

from .test_cglue import _hf_greedy, _model


class _Counter:
    """Stands in for the step's CpuGlue and counts its whole-step calls."""

    def __init__(self, glue: cglue.CpuGlue):
        self.glue, self.calls = glue, 0

    def __getattr__(self, name):
        return getattr(self.glue, name)

    def decode_step(self, *a):
        self.calls += 1
        return self.glue.decode_step(*a)


def _counting(ex: BatchExecutor) -> _Counter:
    assert ex.fast is not None and ex.fast.step is not None
    counter = _Counter(ex.fast.step.glue)
    ex.fast.step.glue = counter  # type: ignore[assignment]
    return counter


def _greedy(ex: BatchExecutor, batch: list[list[int]], n: int) -> list[list[int]]:
    logits = ex.prefill(batch, [()] * len(batch))
    got = [[int(t)] for t in logits.argmax(-1)]
    for _ in range(n - 1):
        for g, t in zip(got, ex.decode([g[-1] for g in got]).argmax(-1).tolist()):
            g.append(t)
    ex.evict([])
    return got


@pytest.mark.parametrize("arch", ["phi3", "llama", "qwen2", "mistral"])
def test_the_c_step_is_token_equal_to_transformers_greedy(glue, arch, monkeypatch):
    """Dense weights (KAITO_PACKED_LINEARS=0): one row alone, then five left-padded rows together (past the
    four-row blocks of its dot products), every decode step one C call; partial rotary (Phi-3 here), GQA,
    multi-query with qkv bias (Qwen2), separate and fused projections."""
    monkeypatch.setenv("KAITO_PACKED_LINEARS", "0")
    model = _model(arch)
    with torch.no_grad():  # transformers starts biases at zero, which would hide a misplaced one
        for m in model.modules():
            if isinstance(m, torch.nn.Linear) and m.bias is not None:
                m.bias.normal_(0, 2.0)
    prompts = [[3, 17, 29, 4, 90, 11], [5, 8], [7, 140, 2, 66], [9], [12, 13, 14, 15, 16, 17, 18, 19]]
    want = [_hf_greedy(model, p, 12) for p in prompts]
    ex = BatchExecutor(model)
    counter = _counting(ex)
    for batch in ([prompts[0]], prompts):
        assert _greedy(ex, batch, 12) == want[:len(batch)], f"{arch}: rows diverged from transformers' greedy decode"
    assert counter.calls == 2 * 11


def test_the_c_step_matches_the_glue_path_logits(glue, tiny_model_dir, monkeypatch):
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("KAITO_PACKED_LINEARS", "0")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa").eval()
    with_step, without = BatchExecutor(model), BatchExecutor(model)
    without.fast.step = None
    counter = _counting(with_step)
    for ex in (with_step, without):
        ex.prefill([[1, 50, 60], [1, 70], [1, 2, 3, 4, 5]], [(), (), ()])
    for step in range(6):
        toks = [9 + step, 30 + step, 200 + step]
        torch.testing.assert_close(with_step.decode(toks), without.decode(toks), atol=1e-4, rtol=1e-4)
    assert counter.calls == 6


def test_a_hook_or_a_packed_weight_sends_the_step_back_to_the_glue_path(glue, monkeypatch):
    """A forward hook added after the table was built (an adapter load, a quantization wrapper) must run: the
    step notices it, the glue path runs the hook, and the C step comes back once it is gone. Packed weights
    (the layout switch's other side) are not read by the C step either."""
    monkeypatch.setenv("KAITO_PACKED_LINEARS", "0")
    model = _model("llama")
    ex = BatchExecutor(model)
    counter = _counting(ex)
    ex.prefill([[3, 17, 29]], [()])
    plain = ex.decode([5])
    assert counter.calls == 1
    o_proj = model.model.layers[1].self_attn.o_proj
    handle = o_proj.register_forward_hook(lambda m, args, out: out + 0.5)
    ex.evict([])
    ex.prefill([[3, 17, 29]], [()])
    hooked = ex.decode([5])
    assert counter.calls == 1, "the C step ran past a forward hook"
    assert not torch.allclose(plain, hooked), "the hook did not run"
    handle.remove()
    ex.evict([])
    ex.prefill([[3, 17, 29]], [()])
    torch.testing.assert_close(ex.decode([5]), plain, atol=1e-5, rtol=1e-5)
    assert counter.calls == 2

    from kaito.runtime.packing import pack
    with torch.no_grad():
        pack(model.model.layers[0].mlp.down_proj)
    assert not ex.fast.step.ready()


def test_rows_past_its_limit_or_uneven_cache_strides_take_the_glue_path(glue, monkeypatch):
    monkeypatch.setenv("KAITO_PACKED_LINEARS", "0")
    model = _model("phi3")
    fd = FastDecoder.build(model)
    assert fd is not None and fd.step is not None
    counter = _Counter(fd.step.glue)
    fd.step.glue = counter  # type: ignore[assignment]
    cfg = model.config
    hk, d = cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    torch.manual_seed(1)

    def caches(n: int, widths: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(torch.randn(n, hk, w, d), torch.randn(n, hk, w, d)) for w in widths]

    def both(n: int, widths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        kv = caches(n, widths)
        ids, pos = torch.randint(0, cfg.vocab_size, (n, 1)), torch.full((n, 1), 7)
        a = fd.forward(ids, pos, None, [(k.clone(), v.clone()) for k, v in kv], 7)
        step, fd.step = fd.step, None
        b = fd.forward(ids, pos, None, [(k.clone(), v.clone()) for k, v in kv], 7)
        fd.step = step
        return a, b

    a, b = both(2, [16, 16])
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert counter.calls == 1
    a, b = both(2, [16, 24])  # one layer's buffer is wider: its strides differ from the first's
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert counter.calls == 1
    monkeypatch.setattr(cstep, "MAX_ROWS", 2)
    a, b = both(3, [16, 16])
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert counter.calls == 1


def test_the_row_limit_is_the_c_one():
    """MAX_ROWS guards the C step's stack arrays (STEP_ROWS): the two must agree."""
    source = cglue.SOURCE.read_text()
    assert int(re.search(r"#define STEP_ROWS (\d+)", source).group(1)) == cstep.MAX_ROWS


def test_too_many_rows_is_an_error_not_a_crash(glue, monkeypatch):
    """Past STEP_ROWS the C function refuses (-3) instead of overrunning its buffers, and the binding says so."""
    monkeypatch.setenv("KAITO_PACKED_LINEARS", "0")
    model = _model("llama")
    fd = FastDecoder.build(model)
    assert fd is not None and fd.step is not None and fd.step.ready()
    cfg = model.config
    n, hk, d = cstep.MAX_ROWS + 1, cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    kv = [(torch.zeros(n, hk, 8, d), torch.zeros(n, hk, 8, d)) for _ in range(cfg.num_hidden_layers)]
    h = torch.randn(n, cfg.hidden_size)
    cos, sin = torch.ones(n, d), torch.zeros(n, d)
    with pytest.raises(ValueError, match="rows"):
        fd.step.run(h, cos, sin, kv, 3, None)


def test_kaito_cpu_step_0_keeps_the_glue_path(glue, monkeypatch):
    """The A/B switch the benchmarks use: the decoder keeps the glue but not the whole C step."""
    monkeypatch.setenv("KAITO_PACKED_LINEARS", "0")
    monkeypatch.setenv("KAITO_CPU_STEP", "0")
    fd = FastDecoder.build(_model("llama"))
    assert fd is not None and fd.glue is not None and fd.step is None
