"""Tiny model factory: offline, deterministic Phi-3 checkpoints for the embedded presets.

Called by the weight sources (`kaito.presets.weights`) for presets with
`embedded:` set, by `kaito presets make-tiny`, by tests and benchmarks. It
writes a random-initialised `Phi3ForCausalLM` checkpoint (safetensors, float32)
plus a byte-level BPE tokenizer trained here from an embedded corpus, with
Phi-3's special tokens and chat template. Only numpy, safetensors and
tokenizers are used, so `kaito.presets` stays free of torch and transformers;
`AutoModelForCausalLM` / `AutoTokenizer` load the result with HF_HUB_OFFLINE=1.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np

from kaito.presets.errors import InvalidInput

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<|endoftext|>", "<|assistant|>", "<|end|>", "<|user|>", "<|system|>"]
UNK, BOS, EOS_DOC, ASSISTANT, END, USER, SYSTEM = 0, 1, 3, 4, 5, 6, 7

# Phi-3's chat template (system/user/assistant turns closed by <|end|>).
PHI3_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ '<|system|>\n' + message['content'] + '<|end|>\n' }}"
    "{% elif message['role'] == 'user' %}{{ '<|user|>\n' + message['content'] + '<|end|>\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ '<|assistant|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)


@dataclass(frozen=True)
class TinySize:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    max_position_embeddings: int


SIZES: dict[str, TinySize] = {
    # ~0.2M parameters, < 2 MB on disk: unit and integration tests.
    "tiny": TinySize(1024, 64, 128, 2, 4, 1024),
    # ~4M parameters: benchmarks, where a forward pass must cost something.
    "small": TinySize(2048, 256, 512, 4, 4, 1024),
}

_TOPICS = [
    ("Kubernetes", "schedules containers onto nodes and restarts them when they fail"),
    ("a GPU", "runs thousands of small arithmetic operations at the same time"),
    ("a language model", "predicts the next token from the tokens before it"),
    ("a container image", "packs a program and its files into layers addressed by digest"),
    ("an adapter", "changes a few low-rank matrices instead of the whole model"),
    ("a registry", "stores image manifests and blobs and serves them over HTTP"),
    ("quantization", "stores weights in fewer bits so that a model fits in less memory"),
    ("a tokenizer", "splits text into pieces that the model has a number for"),
    ("the operator", "watches workspaces and creates the objects that serve a model"),
    ("fine-tuning", "continues training a model on examples of the task you care about"),
    ("a workspace", "describes the model, the nodes and the adapters a team wants"),
    ("batching", "runs many requests through the model in one forward pass"),
]


def corpus() -> list[str]:
    """The tokenizer's training text: plain sentences and Q&A in the seed's style."""
    lines = []
    for i, (thing, does) in enumerate(_TOPICS):
        lines.append(f"What is {thing}? {thing[0].upper()}{thing[1:]} {does}.")
        lines.append(f"Explain {thing} in one sentence. In short, {thing} {does}.")
        lines.append(f"Question {i}: why would a team use {thing}? Because {thing} {does}, which saves time and money.")
        lines.append(f"The quick brown fox asked how {thing} works; the answer: it {does}.")
    lines.append("Numbers 0 1 2 3 4 5 6 7 8 9 10 100 1000, punctuation: , . ; : ! ? ' \" ( ) [ ] { } - _ / = + * # @ %")
    lines.append("Write a short poem about the sea. The sea is wide, the sea is deep, the waves are where the sailors sleep.")
    return lines


def _train_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus() * 4, trainer=trainer)
    return tok


def _config(size: TinySize) -> dict:
    return {
        "architectures": ["Phi3ForCausalLM"],
        "model_type": "phi3",
        "vocab_size": size.vocab_size,
        "hidden_size": size.hidden_size,
        "intermediate_size": size.intermediate_size,
        "num_hidden_layers": size.num_hidden_layers,
        "num_attention_heads": size.num_attention_heads,
        "num_key_value_heads": size.num_attention_heads,
        "max_position_embeddings": size.max_position_embeddings,
        "original_max_position_embeddings": size.max_position_embeddings,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "initializer_range": 0.02,
        "attention_dropout": 0.0,
        "embd_pdrop": 0.0,
        "resid_pdrop": 0.0,
        "sliding_window": None,
        "tie_word_embeddings": False,
        "use_cache": True,
        "bos_token_id": BOS,
        "eos_token_id": EOS_DOC,
        "pad_token_id": EOS_DOC,
        "torch_dtype": "float32",
    }


def _weights(size: TinySize, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    h, i, v = size.hidden_size, size.intermediate_size, size.vocab_size

    def normal(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.02).astype(np.float32)

    w = {"model.embed_tokens.weight": normal(v, h)}
    for layer in range(size.num_hidden_layers):
        p = f"model.layers.{layer}."
        w[p + "self_attn.qkv_proj.weight"] = normal(3 * h, h)  # [q;k;v] rows, kv heads == heads
        w[p + "self_attn.o_proj.weight"] = normal(h, h)
        w[p + "mlp.gate_up_proj.weight"] = normal(2 * i, h)
        w[p + "mlp.down_proj.weight"] = normal(h, i)
        w[p + "input_layernorm.weight"] = np.ones(h, np.float32)
        w[p + "post_attention_layernorm.weight"] = np.ones(h, np.float32)
    w["model.norm.weight"] = np.ones(h, np.float32)
    w["lm_head.weight"] = normal(v, h)
    return w


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def make_tiny(dest: Union[str, Path], size: str = "tiny", seed: int = 0, overwrite: bool = False) -> Path:
    """Write a tiny Phi-3 checkpoint into `dest` atomically and return it.

    Same size and seed give byte-identical files. The directory appears only
    when complete (written beside it, then renamed).
    """
    if size not in SIZES:
        raise InvalidInput(f"size {size!r} is not one of {', '.join(SIZES)}")
    from safetensors.numpy import save_file

    dest = Path(dest)
    occupied = dest.is_file() or (dest.is_dir() and any(dest.iterdir()))
    if occupied and not overwrite:
        raise InvalidInput(f"{dest} exists and is not empty; pass overwrite=True (--force) to replace it")
    spec = SIZES[size]
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        tok = _train_tokenizer(spec.vocab_size)
        if tok.get_vocab_size() > spec.vocab_size:
            raise AssertionError("tokenizer larger than the embedding")
        tok.save(str(tmp / "tokenizer.json"))
        _write_json(
            tmp / "tokenizer_config.json",
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": "<s>",
                "eos_token": "<|endoftext|>",
                "unk_token": "<unk>",
                "pad_token": "<|endoftext|>",
                "additional_special_tokens": SPECIAL_TOKENS[4:],
                "add_bos_token": False,
                "add_eos_token": False,
                "clean_up_tokenization_spaces": False,
                "model_max_length": spec.max_position_embeddings,
                "padding_side": "left",
                "chat_template": PHI3_CHAT_TEMPLATE,
            },
        )
        _write_json(
            tmp / "special_tokens_map.json",
            {"bos_token": "<s>", "eos_token": "<|endoftext|>", "unk_token": "<unk>", "pad_token": "<|endoftext|>"},
        )
        _write_json(tmp / "config.json", _config(spec))
        _write_json(
            tmp / "generation_config.json",
            {"bos_token_id": BOS, "eos_token_id": [EOS_DOC, END], "pad_token_id": EOS_DOC, "do_sample": False},
        )
        save_file(_weights(spec, seed), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        for f in tmp.iterdir():
            os.chmod(f, 0o644)
        os.chmod(tmp, 0o755)
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest
