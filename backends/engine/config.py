"""Typed model configuration parsed from a Hugging Face `config.json` dict.

Supported architectures: LlamaForCausalLM (RMSNorm, RoPE with optional llama3 scaling, GQA,
SwiGLU, tied or untied embeddings) and DeepseekV2ForCausalLM / DeepseekV3ForCausalLM
(multi-head latent attention; dense SwiGLU MLPs and DeepSeek MoE layers).
`parse_model_config` raises ValueError naming the field and value for anything it cannot run.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

LLAMA = "LlamaForCausalLM"
DEEPSEEK_V2 = "DeepseekV2ForCausalLM"
DEEPSEEK_V3 = "DeepseekV3ForCausalLM"
SUPPORTED_ARCHITECTURES = (LLAMA, DEEPSEEK_V2, DEEPSEEK_V3)
MODEL_TYPES = {LLAMA: "llama", DEEPSEEK_V2: "deepseek_v2", DEEPSEEK_V3: "deepseek_v3"}
ROPE_TYPES = ("default", "llama3", "yarn")


@dataclass(frozen=True, slots=True)
class RopeConfig:
    """Rotary embedding, as HF's rope_parameters: `rope_type` 'default', 'llama3' (factor,
    low/high_freq_factor, original_max_position_embeddings) or 'yarn' (factor, beta_fast,
    beta_slow, mscale, mscale_all_dim, attention_factor, truncate, original_max_...)."""

    theta: float
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 0.0
    mscale_all_dim: float = 0.0
    attention_factor: float | None = None
    truncate: bool = True


@dataclass(frozen=True, slots=True)
class MLAConfig:
    """DeepSeek multi-head latent attention dimensions; q_lora_rank None = plain q_proj."""

    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    rope_interleave: bool

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim


@dataclass(frozen=True, slots=True)
class MoEConfig:
    """DeepSeek mixture-of-experts layers (layers >= first_k_dense_replace).

    scoring 'softmax' + topk_method 'greedy' | 'group_limited_greedy' (V2) or 'sigmoid' with
    a score-correction bias and group top-2 selection (V3)."""

    num_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int
    num_shared_experts: int
    routed_scaling_factor: float
    scoring: str
    topk_method: str
    n_group: int | None
    topk_group: int | None
    norm_topk_prob: bool
    first_k_dense_replace: int


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """Everything a model module needs; `mla` is set exactly for the DeepSeek architectures."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    mlp_bias: bool
    rope: RopeConfig
    mla: MLAConfig | None = None
    moe: MoEConfig | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    @property
    def model_type(self) -> str:
        return MODEL_TYPES[self.architecture]

    @property
    def kv_width(self) -> int:
        """Cache elements per token per layer (contracts.md: K then V, or latent then rope key)."""
        if self.mla is not None:
            return self.mla.kv_lora_rank + self.mla.qk_rope_head_dim
        return 2 * self.num_kv_heads * self.head_dim


def _require(raw: Mapping[str, Any], key: str, kind: type) -> Any:
    if key not in raw or raw[key] is None:
        raise ValueError(f"config.json: missing required field {key!r}")
    value = raw[key]
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ValueError(f"config.json: field {key!r} must be an integer, got {value!r}")
    if kind is float and not isinstance(value, (int, float)):
        raise ValueError(f"config.json: field {key!r} must be a number, got {value!r}")
    if kind is int and value <= 0:
        raise ValueError(f"config.json: field {key!r} must be positive, got {value!r}")
    return value


def _optional(raw: Mapping[str, Any], key: str, kind: type, default: Any) -> Any:
    if raw.get(key) is None:
        return default
    return _require(raw, key, kind)


def _architecture(raw: Mapping[str, Any]) -> str:
    archs = raw.get("architectures")
    if archs is None:
        by_type = {v: k for k, v in MODEL_TYPES.items()}
        model_type = raw.get("model_type")
        if model_type not in by_type:
            raise ValueError(
                f"config.json: unsupported model_type {model_type!r} and no 'architectures' "
                f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
            )
        return by_type[model_type]
    if not isinstance(archs, list) or len(archs) != 1 or archs[0] not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"config.json: unsupported architectures {archs!r} "
            f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    return str(archs[0])


def _rope(raw: Mapping[str, Any]) -> RopeConfig:
    params = raw.get("rope_parameters")
    if params is None:
        params = dict(raw.get("rope_scaling") or {})
        params.setdefault("rope_theta", raw.get("rope_theta", 10000.0))
    if not isinstance(params, Mapping):
        raise ValueError(f"config.json: rope_parameters must be an object, got {params!r}")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ValueError(
            f"config.json: unsupported rope_type {rope_type!r} (supported: {', '.join(ROPE_TYPES)})"
        )
    theta = float(_require(params, "rope_theta", float))
    if rope_type == "default":
        return RopeConfig(theta=theta)
    if rope_type == "yarn":
        return _yarn(params, theta, _optional(raw, "max_position_embeddings", int, 2048))
    return RopeConfig(
        theta=theta,
        rope_type=rope_type,
        factor=float(_require(params, "factor", float)),
        low_freq_factor=float(_require(params, "low_freq_factor", float)),
        high_freq_factor=float(_require(params, "high_freq_factor", float)),
        original_max_position_embeddings=int(
            _require(params, "original_max_position_embeddings", int)
        ),
    )


def _yarn(params: Mapping[str, Any], theta: float, max_positions: int) -> RopeConfig:
    original = int(_require(params, "original_max_position_embeddings", int))
    factor = params.get("factor")
    attention_factor = params.get("attention_factor")
    return RopeConfig(
        theta=theta,
        rope_type="yarn",
        factor=float(factor) if factor is not None else max_positions / original,
        original_max_position_embeddings=original,
        beta_fast=float(params.get("beta_fast") or 32.0),
        beta_slow=float(params.get("beta_slow") or 1.0),
        mscale=float(params.get("mscale") or 0.0),
        mscale_all_dim=float(params.get("mscale_all_dim") or 0.0),
        attention_factor=float(attention_factor) if attention_factor is not None else None,
        truncate=bool(params.get("truncate", True)),
    )


def _group_field(raw: Mapping[str, Any], key: str, v2: bool, v3_default: int) -> int:
    return int(_require(raw, key, int)) if v2 else int(_optional(raw, key, int, v3_default))


def _moe(raw: Mapping[str, Any], architecture: str, num_layers: int) -> MoEConfig | None:
    """None when every layer is dense (HF defaults apply to absent optional fields)."""
    v2 = architecture == DEEPSEEK_V2
    first_dense = raw.get("first_k_dense_replace")
    first_dense = (0 if v2 else 3) if first_dense is None else first_dense
    if not isinstance(first_dense, int) or first_dense < 0:
        raise ValueError(f"config.json: field 'first_k_dense_replace' is invalid: {first_dense!r}")
    if first_dense >= num_layers or raw.get("n_routed_experts", 1) == 0:
        return None
    topk_method = (raw.get("topk_method") or "greedy") if v2 else "noaux_tc"
    if topk_method not in ("greedy", "group_limited_greedy", "noaux_tc"):
        raise ValueError(f"config.json: unsupported topk_method {topk_method!r}")
    grouped = topk_method != "greedy"
    return MoEConfig(
        num_experts=_require(raw, "n_routed_experts", int),
        num_experts_per_tok=_require(raw, "num_experts_per_tok", int),
        moe_intermediate_size=_require(raw, "moe_intermediate_size", int),
        num_shared_experts=_optional(raw, "n_shared_experts", int, 2 if v2 else 1),
        routed_scaling_factor=float(_optional(raw, "routed_scaling_factor", float,
                                              1.0 if v2 else 2.5)),
        scoring="softmax" if v2 else "sigmoid",
        topk_method=topk_method,
        n_group=_group_field(raw, "n_group", v2, 8) if grouped else None,
        topk_group=_group_field(raw, "topk_group", v2, 4) if grouped else None,
        norm_topk_prob=not v2 and bool(raw.get("norm_topk_prob", True)),
        first_k_dense_replace=first_dense,
    )


def _mla(raw: Mapping[str, Any], architecture: str) -> MLAConfig:
    if "q_lora_rank" not in raw:
        raise ValueError("config.json: missing required field 'q_lora_rank' (null = no q LoRA)")
    return MLAConfig(
        q_lora_rank=_optional(raw, "q_lora_rank", int, None),
        kv_lora_rank=_require(raw, "kv_lora_rank", int),
        qk_nope_head_dim=_require(raw, "qk_nope_head_dim", int),
        qk_rope_head_dim=_require(raw, "qk_rope_head_dim", int),
        v_head_dim=_require(raw, "v_head_dim", int),
        rope_interleave=architecture == DEEPSEEK_V2 or bool(raw.get("rope_interleave", True)),
    )


def _eos_ids(raw: Mapping[str, Any]) -> tuple[int, ...]:
    eos = raw.get("eos_token_id")
    if eos is None:
        return ()
    return tuple(int(e) for e in eos) if isinstance(eos, list) else (int(eos),)


def parse_model_config(raw: Mapping[str, Any]) -> ModelConfig:
    """Parse an HF config.json dict; ValueError naming the field and value when unsupported."""
    architecture = _architecture(raw)
    act = raw.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"config.json: unsupported hidden_act {act!r} (supported: 'silu')")
    hidden = _require(raw, "hidden_size", int)
    num_heads = _require(raw, "num_attention_heads", int)
    num_kv_heads = _optional(raw, "num_key_value_heads", int, num_heads)
    if num_heads % num_kv_heads:
        raise ValueError(
            f"config.json: num_attention_heads={num_heads} is not a multiple of "
            f"num_key_value_heads={num_kv_heads}"
        )
    num_layers = _require(raw, "num_hidden_layers", int)
    is_mla = architecture != LLAMA
    bos = raw.get("bos_token_id")
    return ModelConfig(
        architecture=architecture,
        vocab_size=_require(raw, "vocab_size", int),
        hidden_size=hidden,
        intermediate_size=_require(raw, "intermediate_size", int),
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=_optional(raw, "head_dim", int, hidden // num_heads) if not is_mla else 0,
        rms_norm_eps=float(_optional(raw, "rms_norm_eps", float, 1e-6)),
        max_position_embeddings=_optional(raw, "max_position_embeddings", int, 2048),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        attention_bias=bool(raw.get("attention_bias", False)),
        mlp_bias=bool(raw.get("mlp_bias", False)),
        rope=_rope(raw),
        mla=_mla(raw, architecture) if is_mla else None,
        moe=_moe(raw, architecture, num_layers) if is_mla else None,
        bos_token_id=int(bos) if isinstance(bos, int) else None,
        eos_token_ids=_eos_ids(raw),
    )
