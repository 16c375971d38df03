"""Bench models: random-weight Phi-3 checkpoints with a word-level tokenizer, `small` and `medium`.

Called by `bench/serving.py` (and usable alone: `python bench/models.py DEST --size medium`). Why a
word-level tokenizer: with byte-level BPE a random model often emits pieces of a multi-byte character,
which a streaming detokenizer holds back, so a chunk is not one token; here every token is one word and
every decode step streams. Weights and configs come from `kaito.presets.tiny` (same Phi-3 layout and
init), only the sizes and the tokenizer are the bench's own, so the embedded tiny presets stay unchanged.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from kaito.presets import tiny

# small: 3.7M parameters (hidden 256 x 4 layers); medium: ~88M (hidden 768 x 12 layers, 352 MB in fp32).
SIZES = {
    "small": tiny.TinySize(2048, 256, 512, 4, 4, 2048),
    "medium": tiny.TinySize(2048, 768, 2048, 12, 12, 2048),
}


def _words(n: int) -> list[str]:
    """The corpus's words first (so bench prompts tokenize without <unk>), then filler words up to n."""
    seen: dict[str, None] = {}
    for line in tiny.corpus():
        for w in line.split():
            seen.setdefault(w, None)
    words = [w for w in seen if w not in tiny.SPECIAL_TOKENS]
    i = 0
    while len(words) < n:
        words.append(f"w{i}")
        i += 1
    return words[:n]


def _tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    words = _words(vocab_size - len(tiny.SPECIAL_TOKENS))
    vocab = {t: i for i, t in enumerate(tiny.SPECIAL_TOKENS + words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with single spaces
    tok.add_special_tokens(tiny.SPECIAL_TOKENS)
    return tok


def make_bench_model(dest: Path, size: str, seed: int = 0) -> Path:
    """Write the `size` bench model into dest (created; reused when already complete) and return it."""
    import numpy as np
    from safetensors.numpy import save_file

    spec = SIZES[size]
    dest = Path(dest)
    if (dest / "model.safetensors").is_file():
        return dest
    dest.mkdir(parents=True, exist_ok=True)
    _tokenizer(spec.vocab_size).save(str(dest / "tokenizer.json"))
    tok_cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<unk>",
        "pad_token": "<|endoftext|>",
        "additional_special_tokens": tiny.SPECIAL_TOKENS[4:],
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": spec.max_position_embeddings,
        "padding_side": "left",
        "chat_template": tiny.PHI3_CHAT_TEMPLATE,
    }
    (dest / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2))
    (dest / "config.json").write_text(json.dumps(tiny._config(spec), indent=2))
    gen = {
        "bos_token_id": tiny.BOS,
        "eos_token_id": [tiny.EOS_DOC, tiny.END],
        "pad_token_id": tiny.EOS_DOC,
        "do_sample": False,
    }
    (dest / "generation_config.json").write_text(json.dumps(gen, indent=2))
    weights = tiny._weights(spec, seed)
    tmp = dest / "model.safetensors.tmp"
    save_file({k: np.ascontiguousarray(v) for k, v in weights.items()}, str(tmp), metadata={"format": "pt"})
    tmp.chmod(0o644)
    tmp.rename(dest / "model.safetensors")
    return dest


def n_params(size: str) -> int:
    s = SIZES[size]
    h, i, v, n = s.hidden_size, s.intermediate_size, s.vocab_size, s.num_hidden_layers
    return 2 * v * h + n * (4 * h * h + 3 * h * i + 2 * h) + h


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dest", type=Path)
    ap.add_argument("--size", choices=sorted(SIZES), default="small")
    a = ap.parse_args()
    print(make_bench_model(a.dest, a.size), f"{n_params(a.size) / 1e6:.1f}M parameters")
    sys.exit(0)
