"""Peak memory of response log-probs + entropy: full fp32 logits (the old actor path) vs chunked.

    python scripts/benchmark_logprob_memory.py [--world DIR] [--lengths 256 512 1024] [--batch 4]

Uses a tiny world with the real 151,657-token Qwen vocabulary (built into --world if it holds none,
as `python scripts/make_tiny_world.py --out DIR --real-vocab` would), so the vocabulary-sized
tensors are real-sized while the model itself is small. Each case runs in a fresh process with one
torch thread; it loads the model, makes the inputs, runs a short warm-up of the same path (so
one-time allocations and the parameter gradients, which persist across gradient-accumulation
micro-batches, are in the baseline), records the resident set size as the baseline, resets the
kernel's high-water mark and runs the measured pass. "Above baseline" is the peak minus that RSS.

Paths: `full` and `chunked` as above; `model_only` runs the model up to the LM head's input and
no head at all: the floor under any log-prob method (attention activations, for instance, grow
with the sequence). Modes: `no_grad` is the log-prob pass (log-probs and entropy under
torch.no_grad); `backward` is the update pass (loss = sum(adv * logp) - c * sum(entropy), then
backward; c is --entropy-coeff, default 0.01, and 0 leaves the entropy out of the loss as the actor
does with entropy_coeff 0). No pass/fail: numbers to compare within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_WORLD = Path(tempfile.gettempdir()) / "vision_sr1_tiny_world_real_vocab"
PATHS = ("full", "chunked", "model_only")
MODES = ("no_grad", "backward")


def ensure_world(world: Path) -> None:
    """Builds a real-vocabulary tiny world into `world` unless one is there already."""
    manifest = world / "manifest.json"
    if manifest.is_file():
        if not json.loads(manifest.read_text())["real_vocab"]:
            raise SystemExit(f"{world} holds a tiny world without --real-vocab; choose another --world")
        return
    print(f"building a real-vocabulary tiny world in {world} ...", flush=True)
    subprocess.run(
        [sys.executable, str(ROOT / "scripts/make_tiny_world.py"), "--out", str(world), "--real-vocab"],
        check=True,
        stdout=subprocess.DEVNULL,
    )


# ------------------------------------------------------------------------------------------
# One case, in its own process.


def _status_kib(field: str) -> int | None:
    match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    return int(match.group(1)) if match else None


def _reset_peak() -> bool:
    """Resets VmHWM to the current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def run_case(args: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(1)
    from verl.models.loading import load_model
    from verl.models.logprobs import capture_lm_head_input, response_log_probs
    from verl.models.positions import compute_position_ids

    model = load_model(str(Path(args.world) / "models" / args.model))
    model.train(args.mode == "backward")
    vocab = model.get_output_embeddings().weight.shape[0]

    def make_inputs(length: int) -> tuple[dict, torch.Tensor]:
        generator = torch.Generator().manual_seed(length)
        # Plain text ids (well below the special tokens) for prompt and responses.
        ids = torch.randint(0, 100_000, (args.batch, args.prompt_length + length), generator=generator)
        mask = torch.ones_like(ids)
        positions = compute_position_ids(model, ids, mask, None, prompt_length=args.prompt_length)
        if positions.dim() == 3:
            positions = positions.transpose(0, 1)
        kwargs = {"input_ids": ids, "attention_mask": mask, "position_ids": positions, "use_cache": False}
        return kwargs, ids[:, args.prompt_length :]

    def full_path(kwargs: dict, responses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # As the actor did: (b, T, V) logits upcast to fp32 and tempered, log_softmax + gather, and
        # entropy = logsumexp(z) - sum softmax(z) z from the same logits.
        output = model(**kwargs, logits_to_keep=responses.shape[1] + 1)
        logits = output.logits[:, :-1, :].float()
        del output
        logits = logits / args.temperature
        log_probs = torch.gather(logits.log_softmax(-1), -1, responses.unsqueeze(-1)).squeeze(-1)
        entropy = torch.logsumexp(logits, dim=-1) - (torch.softmax(logits, dim=-1) * logits).sum(-1)
        return log_probs, entropy

    def chunked_path(kwargs: dict, responses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return response_log_probs(model, kwargs, responses, args.temperature, args.chunk_size, with_entropy=True)

    def model_only(kwargs: dict, responses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # The floor for any log-prob method: the model up to the LM head's input, no head at all.
        with capture_lm_head_input(model) as captured:
            model(**kwargs, logits_to_keep=responses.shape[1] + 1)
        hidden = captured.single()[0][:, :-1, :].float()
        return hidden.sum(-1), hidden.mean(-1)

    compute = {"full": full_path, "chunked": chunked_path, "model_only": model_only}[args.path]

    def one_pass(kwargs: dict, responses: torch.Tensor) -> float:
        if args.mode == "no_grad":
            with torch.no_grad():
                log_probs, entropy = compute(kwargs, responses)
        else:
            log_probs, entropy = compute(kwargs, responses)
            advantages = torch.linspace(-1.0, 1.0, log_probs.numel()).view_as(log_probs)
            loss = (advantages * log_probs).sum()
            if args.entropy_coeff != 0:
                loss = loss - args.entropy_coeff * entropy.sum()
            # With 0 the entropy is still computed (the actor reports it) but left out of the loss,
            # as the actor does: the chunked backward then skips the entropy's gradient.
            loss.backward()
        return float(log_probs.detach().mean())

    one_pass(*make_inputs(16))  # warm-up; parameter gradients stay allocated, as during accumulation
    kwargs, responses = make_inputs(args.length)
    baseline_kib = _status_kib("VmRSS")
    exact = _reset_peak()
    start = time.perf_counter()
    mean_log_prob = one_pass(kwargs, responses)
    seconds = time.perf_counter() - start
    peak_kib = _status_kib("VmHWM") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "vocab": vocab,
        "baseline_mib": baseline_kib / 1024,
        "above_baseline_mib": (peak_kib - baseline_kib) / 1024,
        "peak_reset": exact,
        "seconds": seconds,
        "mean_log_prob": mean_log_prob,
    }


# ------------------------------------------------------------------------------------------
# The driver.


def spawn(args: argparse.Namespace, path: str, mode: str, length: int) -> dict:
    command = [
        sys.executable,
        __file__,
        "--case",
        "--world",
        str(args.world),
        "--model",
        args.model,
        "--path",
        path,
        "--mode",
        mode,
        "--length",
        str(length),
        "--batch",
        str(args.batch),
        "--prompt-length",
        str(args.prompt_length),
        "--chunk-size",
        str(args.chunk_size),
        "--temperature",
        str(args.temperature),
        "--entropy-coeff",
        str(args.entropy_coeff),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"case {path}/{mode}/{length} failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    from verl.models.logprobs import DEFAULT_CHUNK_SIZE

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--world", type=Path, default=DEFAULT_WORLD, help=f"real-vocab tiny world (default: {DEFAULT_WORLD})"
    )
    parser.add_argument("--model", default="qwen2_5_vl", help="model folder under models/ (default: qwen2_5_vl)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 512, 1024], help="response lengths")
    parser.add_argument("--batch", type=int, default=4, help="responses per micro-batch (default: 4)")
    parser.add_argument("--prompt-length", type=int, default=64, help="prompt tokens per row (default: 64)")
    parser.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE, help="tokens per chunk")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument(
        "--entropy-coeff", type=float, default=0.01, help="entropy weight in the backward loss; 0 leaves it out"
    )
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--paths", nargs="+", choices=PATHS, default=list(PATHS))
    # Internal: run one case and print its JSON.
    parser.add_argument("--case", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--path", choices=PATHS, help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--length", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.case:
        print(json.dumps(run_case(args)))
        return

    ensure_world(args.world)
    results: dict[tuple[str, int, str], dict] = {}
    for mode in args.modes:
        for length in args.lengths:
            for path in args.paths:
                results[(mode, length, path)] = case = spawn(args, path, mode, length)
                print(
                    f"  {mode:9s} {args.batch}x{length:<5d} {path:8s} +{case['above_baseline_mib']:8.0f} MiB "
                    f"({case['seconds']:.1f} s)",
                    file=sys.stderr,
                    flush=True,
                )
    any_case = next(iter(results.values()))
    logits_mib = {length: args.batch * length * any_case["vocab"] * 4 / 2**20 for length in args.lengths}
    print(
        f"\nmodel {args.model}, vocab {any_case['vocab']}, prompt {args.prompt_length}, chunk {args.chunk_size}, "
        f"temperature {args.temperature}, entropy coeff {args.entropy_coeff}, 1 torch thread; peak RSS above baseline in MiB "
        f"(baseline ~{any_case['baseline_mib']:.0f} MiB{'' if any_case['peak_reset'] else '; ru_maxrss, peak not reset'})"
    )
    header = f"{'mode':9s} {'micro-batch':>11s} {'fp32 logits':>11s}"
    for path in args.paths:
        header += f" {path + ' MiB':>13s} {path + ' s':>10s}"
    print(header)
    for mode in args.modes:
        for length in args.lengths:
            row = f"{mode:9s} {f'{args.batch}x{length}':>11s} {logits_mib[length]:11.0f}"
            for path in args.paths:
                case = results[(mode, length, path)]
                row += f" {case['above_baseline_mib']:13.0f} {case['seconds']:10.1f}"
            print(row)
    if {"full", "chunked"} <= set(args.paths):
        # Both paths see the same inputs and weights: their log-probs must agree.
        for (mode, length, path), case in results.items():
            if path == "chunked":
                other = results[(mode, length, "full")]["mean_log_prob"]
                assert abs(case["mean_log_prob"] - other) < 1e-4 * max(1.0, abs(other)), (mode, length)


if __name__ == "__main__":
    main()
