"""The C decode glue (`kaito.runtime.cglue`): each kernel against torch's math, the decoder that uses it against
transformers' own greedy decode on every architecture the fast path serves, and how the library is built."""

from __future__ import annotations

import os
import threading

import pytest
import torch
import torch.nn.functional as F
from kaito.runtime import cglue, fastpath
from kaito.runtime.executor import BatchExecutor


@pytest.fixture(scope="module")
def glue() -> cglue.CpuGlue:
    g = cglue.load()
    assert g is not None, "the C glue did not build: is a C compiler installed? (CI installs gcc)"
    return g


class _Norm:
    def __init__(self, d: int):
        self.weight = torch.randn(d)
        self.variance_epsilon = 1e-5


def test_rmsnorm_and_silu_mul_match_the_torch_ops(glue):
    torch.manual_seed(0)
    for n, d in ((1, 768), (3, 37), (4, 256)):
        x, norm = torch.randn(n, d) * 3, _Norm(d)
        torch.testing.assert_close(glue.rmsnorm(x, norm.weight, norm.variance_epsilon, torch.empty(n, d)),
                                   fastpath._rms(norm, x), atol=1e-5, rtol=1e-5)
        gu = torch.randn(n, 2 * d) * 4  # fused gate|up, as Phi-3's gate_up_proj gives them
        gate, up = gu[:, :d], gu[:, d:]
        torch.testing.assert_close(glue.silu_mul(gate, up, torch.empty(n, d)), up * F.silu(gate), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("heads,kv_heads,head_dim,rot,width,padded", [
    (4, 4, 64, 64, 9, False),      # Phi-3: full rotary, no GQA
    (8, 2, 32, 32, 30, True),      # Llama/Qwen2 GQA, left padding in the window
    (4, 1, 48, 24, 5, True),       # partial rotary (Phi-3 small variants), multi-query
    (2, 2, 256, 256, 600, False),  # the largest head, a long context
])
@pytest.mark.parametrize("threaded", [True, False], ids=["omp", "one-thread"])
def test_attention_and_rope_kv_match_rope_then_sdpa(glue, heads, kv_heads, head_dim, rot, width, padded, threaded,
                                                    monkeypatch):
    """Rotated K/V land at column `width` of each row's cache, and each row's output is SDPA of its rotated
    query over the columns its mask keeps: the same as `fastpath._rope` + torch's attention, whether the
    (row, kv head) items are split over torch's OpenMP team or not."""
    monkeypatch.setattr(glue, "threaded", threaded)
    torch.manual_seed(heads * 100 + width)
    n, C = 3, width + 4
    qkv = torch.randn(n, (heads + 2 * kv_heads) * head_dim)
    qd, kd = heads * head_dim, kv_heads * head_dim
    q, k, v = qkv[:, :qd], qkv[:, qd:qd + kd], qkv[:, qd + kd:]
    ang = torch.randn(n, rot // 2) * 3
    cos, sin = torch.cat([ang.cos(), ang.cos()], -1), torch.cat([ang.sin(), ang.sin()], -1)
    kb, vb = torch.randn(n, kv_heads, C, head_dim), torch.randn(n, kv_heads, C, head_dim)
    mask = torch.ones(n, width + 1, dtype=torch.bool)
    if padded:
        mask[0, :width // 2] = False
        mask[2, :1] = False

    kr, vr = kb.clone(), vb.clone()
    c4, s4 = cos[:, None, None, :], sin[:, None, None, :]
    qh = fastpath._rope(q.view(n, 1, heads, head_dim).transpose(1, 2), c4, s4)
    kr[:, :, width:width + 1] = fastpath._rope(k.view(n, 1, kv_heads, head_dim).transpose(1, 2), c4, s4)
    vr[:, :, width:width + 1] = v.view(n, 1, kv_heads, head_dim).transpose(1, 2)
    scale = head_dim ** -0.5
    want = F.scaled_dot_product_attention(qh, kr[:, :, :width + 1], vr[:, :, :width + 1], attn_mask=mask[:, None, None],
                                          scale=scale, enable_gqa=heads != kv_heads).reshape(n, -1)

    kg, vg = kb.clone(), vb.clone()
    out = glue.attention(q, k, v, cos, sin, kg, vg, width, mask if padded else None, heads, kv_heads, head_dim,
                         scale, torch.empty(n, qd))
    torch.testing.assert_close(kg, kr, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(vg, vr)
    torch.testing.assert_close(out, want, atol=2e-5, rtol=1e-4)

    kg, vg = kb.clone(), vb.clone()
    qo = glue.rope_kv(q, k, v, cos, sin, kg, vg, width, heads, kv_heads, head_dim, torch.empty(n, qd))
    torch.testing.assert_close(qo.view(n, heads, 1, head_dim).transpose(1, 2), qh.transpose(1, 2), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(kg, kr, atol=1e-5, rtol=1e-5)


def _model(arch: str) -> torch.nn.Module:
    """A random tiny decoder of each architecture the fast path mirrors (GQA, qkv bias, partial rotary)."""
    import transformers as tr

    torch.manual_seed(3)
    common = dict(vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=512, attn_implementation="sdpa")
    if arch == "llama":
        model = tr.LlamaForCausalLM(tr.LlamaConfig(num_key_value_heads=2, **common))
    elif arch == "qwen2":
        model = tr.Qwen2ForCausalLM(tr.Qwen2Config(num_key_value_heads=1, **common))
    elif arch == "mistral":
        model = tr.MistralForCausalLM(tr.MistralConfig(num_key_value_heads=2, sliding_window=None, **common))
    else:
        model = tr.Phi3ForCausalLM(tr.Phi3Config(num_key_value_heads=4, partial_rotary_factor=0.5, pad_token_id=0,
                                                 **common))
    with torch.no_grad():  # logits far enough apart that float rounding never decides a greedy token
        for p in model.parameters():
            p.mul_(12.0)
    return model.eval()


def _hf_greedy(model: torch.nn.Module, prompt: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = model(input_ids=torch.tensor([prompt]), use_cache=True)
        toks = [int(out.logits[0, -1].argmax())]
        for _ in range(n - 1):
            out = model(input_ids=torch.tensor([[toks[-1]]]), past_key_values=out.past_key_values, use_cache=True)
            toks.append(int(out.logits[0, -1].argmax()))
    return toks


def test_the_glue_shares_torchs_openmp_runtime(glue):
    """Built with OpenMP against the libgomp torch already mapped: one runtime, one team per forward thread
    (a second runtime would keep its own spinning workers beside torch's)."""
    assert glue.threaded, "the glue should build with -fopenmp here (gcc, torch's libgomp.so.1)"
    assert len(cglue._gomp_paths()) == 1, cglue._gomp_paths()


@pytest.mark.parametrize("arch", ["phi3", "llama", "qwen2", "mistral"])
@pytest.mark.parametrize("mode", ["omp", "one-thread", "torch-attention-and-silu"])
def test_glue_decode_is_token_equal_to_transformers_greedy(glue, arch, mode, monkeypatch):
    """One row alone and three left-padded rows together: each row's tokens are transformers' greedy tokens for
    its prompt, and every step went through the glue: its own attention on torch's OpenMP team (`omp`); built
    without OpenMP, its own attention for a single row with a small cache and torch's SDPA after its K/V write
    for the batch (`one-thread`); or SDPA throughout, with torch's SiLU past GLUE_SILU_ROWS rows."""
    if mode != "omp":
        monkeypatch.setattr(glue, "threaded", False)
    if mode == "torch-attention-and-silu":
        monkeypatch.setattr(fastpath, "GLUE_ATTEND_BYTES", 64)
        monkeypatch.setattr(fastpath, "GLUE_SILU_ROWS", 1)
    model = _model(arch)
    prompts = [[3, 17, 29, 4, 90, 11], [5, 8], [7, 140, 2, 66]]
    want = [_hf_greedy(model, p, 12) for p in prompts]
    ex = BatchExecutor(model)
    assert ex.fast is not None and ex.fast.glue is glue
    calls = {"attention": 0, "rope_kv": 0, "rmsnorm": 0, "silu_mul": 0}

    class Counting:
        def __getattr__(self, name):
            fn = getattr(glue, name)
            if not callable(fn):
                return fn

            def counted(*a):
                calls[name] += 1
                return fn(*a)
            return counted

    ex.fast.glue = Counting()  # type: ignore[assignment]
    for batch in ([prompts[0]], prompts):
        logits = ex.prefill(batch, [()] * len(batch))
        got = [[int(t)] for t in logits.argmax(-1)]
        for _ in range(11):
            nxt = ex.decode([g[-1] for g in got]).argmax(-1).tolist()
            for g, t in zip(got, nxt):
                g.append(t)
        assert got == want[:len(batch)], f"{arch}: rows diverged from transformers' greedy decode"
        ex.evict([])
    steps = 2 * 11  # 2 layers x 11 decode steps, alone and then as a batch
    assert calls["rmsnorm"] == 2 * (2 * steps + 11), calls  # two per layer, one before the LM head
    attention, rope_kv, silu = {"omp": (2 * steps, 0, 2 * steps), "one-thread": (steps, steps, 2 * steps),
                                "torch-attention-and-silu": (0, 2 * steps, steps)}[mode]
    assert (calls["attention"], calls["rope_kv"], calls["silu_mul"]) == (attention, rope_kv, silu), calls


def test_the_decoder_keeps_the_torch_ops_without_the_glue(tiny_model_dir, monkeypatch):
    """KAITO_CPU_GLUE=0 (or no compiler) gives a decoder without the glue whose logits match the glue's."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa").eval()
    with_glue = BatchExecutor(model)
    monkeypatch.setenv("KAITO_CPU_GLUE", "0")
    assert cglue.load() is None
    without = BatchExecutor(model)
    assert with_glue.fast.glue is not None and without.fast.glue is None
    for ex in (with_glue, without):
        ex.prefill([[1, 50, 60], [1, 70]], [(), ()])
    for step in range(5):
        toks = [9 + step, 30 + step]
        torch.testing.assert_close(with_glue.decode(toks), without.decode(toks), atol=1e-4, rtol=1e-4)


def test_the_library_is_built_once_atomically_and_only_where_it_can_be(tmp_path, monkeypatch):
    cache = tmp_path / "kernels"
    monkeypatch.setenv("KAITO_KERNEL_CACHE", str(cache))
    results: list[cglue.CpuGlue | None] = []
    threads = [threading.Thread(target=lambda: results.append(cglue._build())) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(g is not None for g in results) and len({g.path for g in results if g}) == 1
    built = results[0].path  # type: ignore[union-attr]
    assert built.parent == cache and [p.name for p in cache.iterdir()] == [built.name], "a temporary file was left"
    mtime = built.stat().st_mtime_ns
    again = cglue._build()
    assert again is not None and again.path == built and built.stat().st_mtime_ns == mtime, "rebuilt a cached library"

    # An unusable cache directory (here a file): the build goes to the temporary directory instead.
    blocked = tmp_path / "not-a-dir"
    blocked.write_text("x")
    monkeypatch.setenv("KAITO_KERNEL_CACHE", str(blocked))
    elsewhere = cglue._build()
    assert elsewhere is not None and blocked not in elsewhere.path.parents

    # Nor in a shared temporary directory that someone else could write: a library there would be loaded.
    monkeypatch.setattr(cglue.tempfile, "gettempdir", lambda: str(tmp_path / "shared-tmp"))
    planted = tmp_path / "shared-tmp" / f"kaito-kernels-{os.getuid()}"
    planted.mkdir(parents=True)
    planted.chmod(0o777)
    assert cglue._build() is None and not any(planted.iterdir())
    planted.chmod(0o700)
    mine = cglue._build()
    assert mine is not None and mine.path.parent == planted

    # No compiler anywhere: no glue, and no error.
    monkeypatch.setenv("KAITO_KERNEL_CACHE", str(tmp_path / "fresh"))
    monkeypatch.setenv("KAITO_PREBUILT_KERNELS", str(tmp_path / "no-prebuilt"))
    monkeypatch.setenv("CC", "/nonexistent/cc")
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    assert cglue._build() is None and cglue.load_prebuilt() is None
    assert not (tmp_path / "fresh").exists() or not os.listdir(tmp_path / "fresh")


def test_without_a_compiler_the_best_prebuilt_library_for_this_cpu_loads(tmp_path, tiny_model_dir, monkeypatch):
    """What the runtime image does (Dockerfiles/base prebuilds in its build stage; the slim image has no
    compiler): the best level this CPU runs, OpenMP where torch's libgomp is the only one, none for another
    source's digest, and its decoder's logits those of the torch ops."""
    from transformers import AutoModelForCausalLM

    built = cglue.prebuild(tmp_path / "prebuilt")
    assert len(built) == 2 * len(cglue._levels()) and not [p for p in (tmp_path / "prebuilt").iterdir() if p not in built]
    monkeypatch.setenv("KAITO_PREBUILT_KERNELS", str(tmp_path / "prebuilt"))
    monkeypatch.setenv("CC", "/nonexistent/cc")
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    monkeypatch.setattr(cglue, "_loaded", {})
    glue = cglue.load()
    assert glue is not None and glue.path.parent == tmp_path / "prebuilt" and glue.threaded
    flags = set(cglue._cpu_flags().split(":", 1)[-1].split())
    best = next(level for level, needs in cglue._levels() if needs <= flags)
    assert glue.path.name.startswith(f"decode_glue-{best}-omp-"), glue.path.name

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa").eval()
    with_glue = BatchExecutor(model)
    assert with_glue.fast.glue is glue
    monkeypatch.setenv("KAITO_CPU_GLUE", "0")
    without = BatchExecutor(model)
    for ex in (with_glue, without):
        ex.prefill([[1, 50, 60], [1, 70]], [(), ()])
    for step in range(4):
        toks = [9 + step, 30 + step]
        torch.testing.assert_close(with_glue.decode(toks), without.decode(toks), atol=1e-4, rtol=1e-4)
    monkeypatch.delenv("KAITO_CPU_GLUE")

    if cglue._levels()[0][0] == "x86-64-v4":  # a CPU without AVX-512 gets v3, one without AVX2 v2
        monkeypatch.setattr(cglue, "_cpu_flags", lambda: "flags : " + " ".join(sorted(cglue._V3)))
        assert "-x86-64-v3-omp-" in cglue.load_prebuilt().path.name  # type: ignore[union-attr]
        monkeypatch.setattr(cglue, "_cpu_flags", lambda: "flags : " + " ".join(sorted(cglue._V2)))
        assert "-x86-64-v2-omp-" in cglue.load_prebuilt().path.name  # type: ignore[union-attr]
        monkeypatch.setattr(cglue, "_cpu_flags", lambda: "flags : fpu sse sse2")
        assert cglue.load_prebuilt() is None
        monkeypatch.undo()
        monkeypatch.setenv("KAITO_PREBUILT_KERNELS", str(tmp_path / "prebuilt"))
    # Libraries of another source (an upgrade left them behind) are not loaded.
    for p in built:
        p.rename(p.with_name(p.name.rsplit("-", 1)[0] + "-0123456789abcdef.so"))
    assert cglue.load_prebuilt() is None


def test_prebuilding_without_a_compiler_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv("CC", "/nonexistent/cc")
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    with pytest.raises(RuntimeError, match="no C compiler"):
        cglue.prebuild(tmp_path / "out")
    assert cglue.main(["--prebuild", str(tmp_path / "out")]) == 1
