"""Loader, presets, export and tokenizer: exact errors, round trips, HF interoperability."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_models_harness import PagedHarness

from backends.engine.config import parse_model_config
from backends.engine.loader import export_checkpoint, export_preset, load_model
from backends.engine.presets import PRESETS
from backends.engine.tokenizer import Tokenizer, byte_level_tokenizer

TEXT = "héllo 世界 🙂"


def _exported(tmp_path: Path, name: str = "tiny-llama") -> Path:
    return export_preset(name, tmp_path / name)


def _edit_config(directory: Path, **changes: Any) -> None:
    path = directory / "config.json"
    raw = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            raw.pop(key, None)
        else:
            raw[key] = value
    path.write_text(json.dumps(raw))


def test_byte_tokenizer_round_trips_utf8() -> None:
    tok = byte_level_tokenizer()
    ids = tok.encode(TEXT)
    assert ids == [b + 3 for b in TEXT.encode("utf-8")]
    assert tok.decode(ids) == TEXT
    assert tok.decode([tok.bos_token_id or 0, *ids, tok.eos_token_id]) == TEXT
    assert (tok.vocab_size, tok.bos_token_id, tok.eos_token_id) == (259, 1, 2)


def test_exported_tokenizer_loads_in_ours_and_transformers(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    directory = _exported(tmp_path)
    ours = Tokenizer.from_dir(directory)
    assert ours.encode(TEXT) == byte_level_tokenizer().encode(TEXT)
    hf = transformers.AutoTokenizer.from_pretrained(str(directory))
    assert hf(TEXT).input_ids == ours.encode(TEXT)
    assert hf.decode(ours.encode(TEXT)) == TEXT
    assert (hf.eos_token_id, hf.bos_token_id, hf.pad_token_id) == (2, 1, 0)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_and_exported_dir_load_identically(tmp_path: Path, name: str) -> None:
    preset = load_model(name)
    loaded = load_model(str(_exported(tmp_path, name)))
    assert loaded.config == preset.config
    for (key, a), (_, b) in zip(preset.model.state_dict().items(),
                                loaded.model.state_dict().items(), strict=True):
        assert torch.equal(a, b), key


def test_preset_weights_are_deterministic() -> None:
    a, b = load_model("tiny-mla").model, load_model("tiny-mla").model
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))


def test_sharded_checkpoint_loads(tmp_path: Path) -> None:
    directory = _exported(tmp_path)
    state = load_file(str(directory / "model.safetensors"))
    names = sorted(state)
    half = len(names) // 2
    (directory / "model.safetensors").unlink()
    save_file({k: state[k] for k in names[:half]}, str(directory / "model-00001-of-00002.safetensors"))
    save_file({k: state[k] for k in names[half:]}, str(directory / "model-00002-of-00002.safetensors"))
    loaded = load_model(str(directory))
    assert torch.equal(loaded.model.state_dict()["lm_head.weight"], state["lm_head.weight"])


def test_unknown_preset_raises() -> None:
    with pytest.raises(ValueError, match=r"source: 'tiny-gpt' is not one of smollm2-135m-instruct, "
                                         r"tiny-llama, tiny-mla, a .gguf file or an HF "
                                         r"checkpoint directory"):
        load_model("tiny-gpt")


@pytest.mark.parametrize("missing", ["config.json", "tokenizer.json", "model.safetensors"])
def test_missing_file_raises(tmp_path: Path, missing: str) -> None:
    directory = _exported(tmp_path)
    (directory / missing).unlink()
    shown = "*.safetensors" if missing == "model.safetensors" else missing
    with pytest.raises(ValueError, match=rf"missing file '{shown}'".replace("*", r"\*")) as info:
        load_model(str(directory))
    assert str(directory) in str(info.value)


def test_unsupported_architecture_raises(tmp_path: Path) -> None:
    directory = _exported(tmp_path)
    _edit_config(directory, architectures=["GPT2LMHeadModel"])
    with pytest.raises(ValueError, match=r"unsupported architectures \['GPT2LMHeadModel'\]"):
        load_model(str(directory))


@pytest.mark.parametrize(("changes", "message"), [
    ({"hidden_size": None}, r"missing required field 'hidden_size'"),
    ({"num_hidden_layers": "4"}, r"field 'num_hidden_layers' must be an integer, got '4'"),
    ({"hidden_act": "gelu"}, r"unsupported hidden_act 'gelu'"),
    ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, r"unsupported rope_type 'dynamic'"),
    ({"num_key_value_heads": 3}, r"num_attention_heads=4 is not a multiple of num_key_value_heads=3"),
])
def test_bad_llama_config_raises(changes: dict[str, Any], message: str) -> None:
    raw = {**PRESETS["tiny-llama"].hf_config, **changes}
    raw = {k: v for k, v in raw.items() if v is not None}
    with pytest.raises(ValueError, match=message):
        parse_model_config(raw)


def test_moe_config_missing_field_raises() -> None:
    raw = {k: v for k, v in PRESETS["tiny-mla"].hf_config.items() if k != "num_experts_per_tok"}
    parse_model_config(raw)  # all layers dense: the MoE fields are not needed
    with pytest.raises(ValueError, match=r"missing required field 'num_experts_per_tok'"):
        parse_model_config({**raw, "first_k_dense_replace": 1})


def test_moe_config_parses_hf_defaults() -> None:
    moe = parse_model_config({**PRESETS["tiny-mla"].hf_config, "first_k_dense_replace": 1}).moe
    assert moe is not None
    assert (moe.num_experts, moe.num_experts_per_tok, moe.scoring, moe.topk_method, moe.n_group,
            moe.topk_group, moe.norm_topk_prob, moe.routed_scaling_factor) == (
        4, 2, "sigmoid", "noaux_tc", 1, 1, True, 2.5)


def test_mla_missing_q_lora_rank_raises() -> None:
    raw = {k: v for k, v in PRESETS["tiny-mla"].hf_config.items() if k != "q_lora_rank"}
    with pytest.raises(ValueError, match=r"missing required field 'q_lora_rank'"):
        parse_model_config(raw)


def test_kv_width_matches_contract() -> None:
    assert load_model("tiny-llama").model.kv_width == 2 * 2 * 32
    assert load_model("tiny-mla").model.kv_width == 64 + 16


VARIANTS = {
    # DeepSeek-V2 (complex-pair rope), no q LoRA, tied embeddings.
    "v2-no-q-lora-tied": {**PRESETS["tiny-mla"].hf_config, "architectures": ["DeepseekV2ForCausalLM"],
                          "model_type": "deepseek_v2", "q_lora_rank": None,
                          "tie_word_embeddings": True, "num_hidden_layers": 2,
                          "first_k_dense_replace": 2},
    # DeepSeek-V3 with rope_interleave off (rotate-half on the rope part).
    "v3-no-interleave": {**PRESETS["tiny-mla"].hf_config, "rope_interleave": False,
                         "num_hidden_layers": 2, "first_k_dense_replace": 2},
    # DeepSeek-V3 with yarn rope (legacy "type" key): cos/sin attention factor + mscale^2.
    "v3-yarn": {**PRESETS["tiny-mla"].hf_config, "num_hidden_layers": 2,
                "first_k_dense_replace": 2, "max_position_embeddings": 4096,
                "rope_scaling": {"type": "yarn", "factor": 8.0, "beta_fast": 32, "beta_slow": 1,
                                 "mscale": 1.0, "mscale_all_dim": 0.8,
                                 "original_max_position_embeddings": 512}},
    # DeepSeek-V3 MoE after one dense layer: sigmoid router, correction bias, groups.
    "v3-moe": {**PRESETS["tiny-mla"].hf_config, "num_hidden_layers": 2, "first_k_dense_replace": 1,
               "n_routed_experts": 8, "num_experts_per_tok": 3, "n_group": 4, "topk_group": 2,
               "n_shared_experts": 1, "moe_intermediate_size": 32, "routed_scaling_factor": 1.5},
    # DeepSeek-V2 MoE everywhere: softmax router, group-limited greedy, two shared experts.
    "v2-moe-grouped": {**PRESETS["tiny-mla"].hf_config, "architectures": ["DeepseekV2ForCausalLM"],
                       "model_type": "deepseek_v2", "num_hidden_layers": 2,
                       "first_k_dense_replace": 0, "n_routed_experts": 8, "num_experts_per_tok": 2,
                       "topk_method": "group_limited_greedy", "n_group": 4, "topk_group": 2,
                       "n_shared_experts": 2, "moe_intermediate_size": 32},
    # Llama with tied embeddings, plain rope, MHA.
    "llama-tied-mha": {**PRESETS["tiny-llama"].hf_config, "tie_word_embeddings": True,
                       "rope_scaling": None, "num_key_value_heads": 4, "num_hidden_layers": 2},
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_config_variants_match_hf(tmp_path: Path, variant: str) -> None:
    transformers = pytest.importorskip("transformers")
    directory = export_checkpoint(VARIANTS[variant], 99, tmp_path / variant)
    ours = load_model(str(directory))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(directory)).eval()
    ids = byte_level_tokenizer().encode("variant check: crossing a block of sixteen")
    harness = PagedHarness(ours.model, 16)
    logits = torch.cat([harness.step([(0, ids[:-1])]),
                        harness.step([(0, ids[-1:])], decode_only=True)])
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(logits, ref, atol=1e-4, rtol=0)


def test_cli_export_preset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import argparse

    from backends.engine import cli
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["export-preset", "tiny-mla", str(tmp_path / "out")])
    assert args.func(args) == 0
    assert capsys.readouterr().out == f"wrote preset tiny-mla to {tmp_path / 'out'}\n"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
        "tokenizer_config.json"]
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == "deepseek_v3"


def test_per_expert_checkpoint_names_load(tmp_path: Path) -> None:
    """Hub DeepSeek checkpoints name experts one by one; they stack into the same tensors."""
    directory = export_checkpoint(VARIANTS["v3-moe"], 5, tmp_path / "moe")
    stacked = load_file(str(directory / "model.safetensors"))
    per_expert: dict[str, torch.Tensor] = {}
    for key, value in stacked.items():
        if key.endswith("experts.gate_up_proj"):
            prefix = key.removesuffix("gate_up_proj")
            for e, (gate, up) in enumerate(t.chunk(2) for t in value):
                per_expert[f"{prefix}{e}.gate_proj.weight"] = gate.contiguous()
                per_expert[f"{prefix}{e}.up_proj.weight"] = up.contiguous()
        elif key.endswith("experts.down_proj"):
            prefix = key.removesuffix("down_proj")
            for e, down in enumerate(value):
                per_expert[f"{prefix}{e}.down_proj.weight"] = down.contiguous()
        else:
            per_expert[key] = value
    save_file(per_expert, str(directory / "model.safetensors"))
    loaded = load_model(str(directory)).model.state_dict()
    assert sorted(loaded) == sorted(stacked)
    assert all(torch.equal(loaded[k], stacked[k]) for k in stacked)
