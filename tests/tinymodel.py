"""A tiny random-weight llama model for integration tests with real ``mlx_lm.server`` processes.

``build_tiny_model`` writes, offline and deterministically, a model directory that
``mlx_lm.utils.load`` and transformers' ``AutoTokenizer`` accept: a 2-layer llama
(hidden 64) in float32 safetensors and a byte-level BPE tokenizer (256 byte tokens,
a few merges, ``<s>``/``</s>``) with a Jinja chat template.

The weights are random, but the output head never picks EOS, a lone space or a
non-printable/non-ASCII byte: residual dimension 0 is held at 1.0 (the embeddings set
it, no layer writes it), so after the final RMSNorm it is always positive and the
lm_head column 0 acts as a logit bias of about -1e3 or worse for those tokens.
Generation therefore always runs to ``max_tokens`` and every token decodes at once
to printable ASCII. Models built with different seeds share the same tokenizer, so
one can serve as the other's draft model.

Caveat (mlx-lm 0.32.2): with ``--draft-model`` (even the model itself), reusing the prompt
cache corrupts greedy output once a request has shared a prefix with a cached one: repeats of
the same request then differ from the plain server. ``extra_args=("--prompt-cache-size", "0")``
restores output identical to the plain server.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

BOS, EOS = "<s>", "</s>"
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
# Multi-character tokens, each merged as (s[:-1], s[-1]) in this order; "_" is a space.
MERGED = "_t _a _s _o _i _w _th _the _an _and _to _of _in th he in er an re on at en nd es or te ed"
MERGED += " is it al ar st to ng ou the ing ent"
_BANNED_LOGIT = -1e4


def _byte_chars() -> list[str]:
    """GPT-2's byte -> printable unicode character table, indexed by byte value."""
    keep = {*range(33, 127), *range(161, 173), *range(174, 256)}
    moved = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(moved)) for b in range(256)]


def _write_tokenizer(path: Path) -> tuple[int, list[int]]:
    """Write the tokenizer files; return the vocab size and the ids never to generate."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    chars = _byte_chars()
    vocab = {c: i for i, c in enumerate(chars)}
    merges: list[tuple[str, str]] = []
    for word in MERGED.split():
        s = "".join(chars[ord(" ")] if ch == "_" else ch for ch in word)
        assert s[:-1] in vocab and s not in vocab, word
        merges.append((s[:-1], s[-1]))
        vocab[s] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (BOS, EOS)])
    bos_id, eos_id = len(vocab), len(vocab) + 1
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    tok.save(str(path / "tokenizer.json"))
    specials = {"bos_token": BOS, "eos_token": EOS, "pad_token": EOS}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **specials,
        "chat_template": CHAT_TEMPLATE,
        "model_max_length": 2048,
        "clean_up_tokenization_spaces": False,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (path / "special_tokens_map.json").write_text(json.dumps(specials, indent=2))
    banned = [b for b in range(256) if not 0x21 <= b <= 0x7E] + [bos_id, eos_id]
    return tok.get_vocab_size(), banned


def build_tiny_model(path: Path, *, seed: int = 0, num_layers: int = 2) -> Path:
    """Write a tiny random-weight llama model that mlx_lm can load and serve offline."""
    import mlx.core as mx

    path.mkdir(parents=True, exist_ok=True)
    vocab_size, banned = _write_tokenizer(path)
    hidden, heads, kv_heads, inter = 64, 4, 2, 128
    head_dim = hidden // heads
    config = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": hidden,
        "num_hidden_layers": num_layers,
        "intermediate_size": inter,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "vocab_size": vocab_size,
        "max_position_embeddings": 2048,
        "tie_word_embeddings": False,
        "bos_token_id": vocab_size - 2,
        "eos_token_id": vocab_size - 1,
        "torch_dtype": "float32",
    }
    (path / "config.json").write_text(json.dumps(config, indent=2))

    rng = np.random.default_rng(seed)

    def linear(out_dim: int, in_dim: int) -> np.ndarray:
        return rng.normal(0.0, in_dim**-0.5, (out_dim, in_dim)).astype(np.float32)

    embed = rng.normal(0.0, 1.0, (vocab_size, hidden)).astype(np.float32)
    embed[:, 0] = 1.0  # the constant "bias" feature
    lm_head = linear(vocab_size, hidden)
    lm_head[:, 0] = 0.0
    lm_head[banned, 0] = _BANNED_LOGIT
    w: dict[str, np.ndarray] = {
        "model.embed_tokens.weight": embed,
        "model.norm.weight": np.ones(hidden, np.float32),
        "lm_head.weight": lm_head,
    }
    for i in range(num_layers):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = np.ones(hidden, np.float32)
        w[p + "post_attention_layernorm.weight"] = np.ones(hidden, np.float32)
        w[p + "self_attn.q_proj.weight"] = linear(heads * head_dim, hidden)
        w[p + "self_attn.k_proj.weight"] = linear(kv_heads * head_dim, hidden)
        w[p + "self_attn.v_proj.weight"] = linear(kv_heads * head_dim, hidden)
        w[p + "self_attn.o_proj.weight"] = linear(hidden, heads * head_dim)
        w[p + "mlp.gate_proj.weight"] = linear(inter, hidden)
        w[p + "mlp.up_proj.weight"] = linear(inter, hidden)
        w[p + "mlp.down_proj.weight"] = linear(hidden, inter)
        for out in ("self_attn.o_proj.weight", "mlp.down_proj.weight"):
            w[p + out][0, :] = 0.0  # no layer writes the bias feature
    weights = {k: mx.array(v) for k, v in w.items()}
    mx.save_safetensors(str(path / "model.safetensors"), weights, metadata={"format": "mlx"})
    return path
