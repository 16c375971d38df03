"""Per-row LoRA: strength math against peft, mixed adapters in one batch, bad adapter files."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from kaito.presets.errors import InvalidInput
from kaito.runtime.engine import Engine, Sequence, run_to_completion
from kaito.runtime.executor import BatchExecutor
from kaito.runtime.lora import discover_adapters, read_adapter
from kaito.runtime.sampling import SamplingParams
from safetensors.torch import save_file


@pytest.fixture(scope="module")
def base(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def ex(base, adapters_dir):
    ex = BatchExecutor(base)
    for name, path in discover_adapters(adapters_dir):
        ex.lora.add(read_adapter(path, name, base))
    return ex


def peft_logits(tiny_model_dir, adapter_dir, ids, scale=1.0):
    """Reference: peft's own model, with its LoRA scale multiplied by `scale`."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    m = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32), adapter_dir).eval()
    if scale != 1.0:
        for mod in m.modules():
            if hasattr(mod, "scaling") and isinstance(mod.scaling, dict) and "default" in mod.scaling:
                mod.scaling["default"] *= scale
    with torch.no_grad():
        return m(torch.tensor([ids])).logits[0, -1]


def run_rows(ex, prompts, rows):
    ex.evict([])
    logits = ex.prefill(prompts, rows)
    ex.evict([])
    return logits


IDS = [1, 100, 200, 300, 42, 7]


def test_strength_zero_half_one_match_peft(ex, base, tiny_model_dir, adapters_dir):
    with torch.no_grad():
        base_logits = base(torch.tensor([IDS])).logits[0, -1]
    full = peft_logits(tiny_model_dir, adapters_dir / "alpha", IDS)
    half = peft_logits(tiny_model_dir, adapters_dir / "alpha", IDS, scale=0.5)
    assert (full - base_logits).abs().max() > 1e-2  # the adapter really changes the model
    got = run_rows(ex, [IDS] * 4, [(("alpha", 0.0),), (("alpha", 1.0),), (("alpha", 0.5),), ()])
    torch.testing.assert_close(got[0], base_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1], full, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got[2], half, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got[3], base_logits, atol=1e-5, rtol=1e-5)


def test_merged_adapters_add_their_weighted_deltas(ex, base, tiny_model_dir, adapters_dir):
    # Reference: merge both deltas into a copy of the weights by hand (W + s_a*dW_a + s_b*dW_b).
    import copy

    ref = copy.deepcopy(base)
    mods = dict(ref.named_modules())
    for name, s in (("alpha", 0.7), ("beta", 0.3)):
        ad = ex.lora.adapters[name]
        for mod, (a, b) in ad.weights.items():
            mods[mod].weight.data += s * ad.scaling[mod] * (b @ a)
    with torch.no_grad():
        want = ref(torch.tensor([IDS])).logits[0, -1]
    got = run_rows(ex, [IDS], [(("alpha", 0.7), ("beta", 0.3))])
    torch.testing.assert_close(got[0], want, atol=1e-4, rtol=1e-4)


def test_mixed_adapter_batch_equals_each_alone(ex, base):
    specs = [(), (("alpha", 1.0),), (("beta", 1.0),), (("alpha", 0.5), ("beta", 2.0))]
    prompts = [[1, 50, 60], [1, 70, 80, 90, 100], [1, 5], [1, 300, 301, 302]]

    def greedy(spec, prompt, batch):
        e = Engine(ex, None, eos_ids=[], max_model_len=1024)
        seqs = [Sequence(p, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True), lora=s) for p, s in batch]
        e.tok = _NoTok()
        run_to_completion(e, seqs)
        ex.evict([])
        return [s.output_ids for s in seqs]

    together = greedy(None, None, list(zip(prompts, specs)))
    alone = [greedy(None, None, [(p, s)])[0] for p, s in zip(prompts, specs)]
    assert together == alone
    assert len({tuple(x) for x in alone}) == 4  # the adapters really lead to different outputs


def test_prefill_thread_keeps_each_rows_adapters(ex, base):
    """A row decoding on one adapter while rows on other adapters are prefilled on the prefill thread:
    each thread's forward applies its own rows' adapter plan, so every output equals the row alone."""
    import time

    specs = [(("alpha", 1.0),), (), (("beta", 1.0),), (("alpha", 0.5), ("beta", 2.0))]
    prompts = [[1, 50, 60], [1, 70, 80, 90, 100], [1, 5], [1, 300, 301, 302]]
    lengths = [60, 10, 10, 10]

    def run(batch, thread):
        e = Engine(ex, None, eos_ids=[], max_model_len=1024, prefill_thread=thread)
        e.tok = _NoTok()
        seqs = [Sequence(p, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True), lora=s) for p, s, n in batch]
        if not thread:
            run_to_completion(e, seqs)
        else:
            e.start()
            try:
                e.submit(seqs[:1])
                end = time.monotonic() + 60
                while len(seqs[0].output_ids) < 3 and time.monotonic() < end:
                    time.sleep(0.002)
                for s in seqs[1:]:
                    e.submit([s])
                while any(s.finish_reason is None for s in seqs) and time.monotonic() < end:
                    time.sleep(0.002)
            finally:
                e.stop()
        ex.evict([])
        return [s.output_ids for s in seqs]

    batch = list(zip(prompts, specs, lengths))
    alone = [run([b], False)[0] for b in batch]
    assert run(batch, True) == alone


class _NoTok:
    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(65 + i % 26) for i in ids)


def test_bad_adapters_are_refused_with_reasons(base, adapters_dir, tmp_path):
    good = adapters_dir / "alpha"

    def variant(name, mutate):
        d = tmp_path / name
        shutil.copytree(good, d)
        mutate(d)
        return d

    cases = {
        "no-config": (lambda d: (d / "adapter_config.json").unlink(), "adapter_config.json"),
        "pickle": (lambda d: ((d / "adapter_model.safetensors").rename(d / "adapter_model.bin")), "safetensors"),
        "dora": (lambda d: _edit(d, use_dora=True), "DoRA"),
        "badjson": (lambda d: (d / "adapter_config.json").write_text("{nope"), "not valid JSON"),
        "shape": (lambda d: save_file({"base_model.model.model.layers.0.self_attn.o_proj.lora_A.weight": torch.zeros(4, 7),
                                       "base_model.model.model.layers.0.self_attn.o_proj.lora_B.weight": torch.zeros(64, 4)},
                                      str(d / "adapter_model.safetensors")), "does not fit"),
        "module": (lambda d: save_file({"base_model.model.model.nothing.lora_A.weight": torch.zeros(4, 7),
                                        "base_model.model.model.nothing.lora_B.weight": torch.zeros(64, 4)},
                                       str(d / "adapter_model.safetensors")), "not a Linear"),
    }
    for name, (mutate, needle) in cases.items():
        with pytest.raises(InvalidInput, match=needle):
            read_adapter(variant(name, mutate), name, base)
    with pytest.raises(InvalidInput, match="adapter name"):
        read_adapter(good, "../evil", base)


def _edit(d, **kw):
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg.update(kw)
    (d / "adapter_config.json").write_text(json.dumps(cfg))


def test_discover_follows_kaito_layout(adapters_dir, tmp_path):
    (tmp_path / "empty").mkdir()
    assert discover_adapters(tmp_path) == []
    assert [n for n, _ in discover_adapters(adapters_dir)] == ["alpha", "beta"]
    assert discover_adapters(tmp_path / "missing") == []


def test_an_adapter_row_decodes_the_same_across_the_layout_switch(ex, base):
    """A lone adapter row runs long enough for the linears to go dense (LoRA's hooks then ride on plain
    Linears): every step's logits equal those of the same row with the layout pinned packed."""
    from kaito.runtime.packing import DENSE_AFTER, PackedLinear

    layout = ex.fast.layout
    linears = [m for g in layout.groups for m in g]
    steps = DENSE_AFTER + len(layout.groups) + 4

    def run() -> list[torch.Tensor]:
        ex.evict([])
        out = [ex.prefill([IDS], [(("alpha", 1.0),)])]
        out += [ex.decode([(13 * i) % 400 + 3]) for i in range(steps)]
        ex.evict([])
        return out

    layout.enabled = True  # an earlier test's prefill thread froze it on this shared executor
    while layout.dense:  # whatever earlier tests' single rows left dense: packed again, as a batch would
        layout.step(layout.dense_rows + 1)
    assert all(type(m) is PackedLinear for m in linears)
    switched = run()
    assert not any(type(m) is PackedLinear for m in linears), "the lone row's run should end on dense weights"
    while layout.dense:  # packed again, then pinned
        layout.step(layout.dense_rows + 1)
    layout.enabled = False
    try:
        assert all(type(m) is PackedLinear for m in linears)
        pinned = run()
    finally:
        layout.enabled = True
    for a, b in zip(switched, pinned):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        plain = base(torch.tensor([IDS])).logits[0, -1]
    assert (switched[0][0] - plain).abs().max() > 1e-2, "the adapter really applies"
