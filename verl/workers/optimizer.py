"""Optimizers, lr schedules and the optimizer step, shared by the RL actor and the SFT worker.

Optimizers: torch's AdamW, or an AdamW that keeps its states in bf16 (`adamw_bf16`). Schedules:
constant, warmup (linear, then constant) or cosine (after the warm-up). `clip_and_step` is the one
place a step is taken: clip to the global norm, skip the step when the norm is not finite.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from verl.workers.config import OptimConfig


class AdamWBF16(torch.optim.Optimizer):
    """AdamW with both moment estimates stored in bf16: half the memory of fp32 moments.

    The update itself is computed in fp32. For bf16 parameters a bf16 compensation buffer keeps
    what rounding the new value to bf16 lost (Kahan summation), so updates far below a bf16 step
    still add up instead of vanishing. Works on plain and FSDP2-sharded (DTensor) parameters.
    """

    def __init__(
        self,
        params: Iterable[torch.nn.Parameter],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
    ) -> None:
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, eps, weight_decay = group["lr"], group["eps"], group["weight_decay"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(param, dtype=torch.bfloat16)
                    state["exp_avg_sq"] = torch.zeros_like(param, dtype=torch.bfloat16)
                    if param.dtype == torch.bfloat16:
                        state["compensation"] = torch.zeros_like(param)
                state["step"] += 1
                step = float(state["step"])
                grad = param.grad.float()
                exp_avg = state["exp_avg"].float().mul_(beta1).add_(grad, alpha=1 - beta1)
                exp_avg_sq = state["exp_avg_sq"].float().mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                state["exp_avg"].copy_(exp_avg)
                state["exp_avg_sq"].copy_(exp_avg_sq)
                denom = (exp_avg_sq / (1 - beta2**step)).sqrt_().add_(eps)
                update = (exp_avg / (1 - beta1**step)).div_(denom)
                value = param.float().mul_(1 - lr * weight_decay).add_(update, alpha=-lr)
                if "compensation" in state:
                    value.add_(state["compensation"].float())
                    param.copy_(value)
                    state["compensation"].copy_(value - param.float())
                else:
                    param.copy_(value)
        return loss


OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {"adamw": torch.optim.AdamW, "adamw_bf16": AdamWBF16}
"""`optim.strategy` -> optimizer class: adamw (torch's, states in the parameters' dtype) or adamw_bf16."""
LR_SCHEDULES = ("constant", "warmup", "cosine")


def build_optimizer(params: Iterable[torch.nn.Parameter], config: OptimConfig) -> torch.optim.Optimizer:
    """The optimizer `config.strategy` names, over `params`."""
    if config.strategy not in OPTIMIZERS:
        raise ValueError(f"optim.strategy={config.strategy!r}: expected one of {', '.join(OPTIMIZERS)}")
    return OPTIMIZERS[config.strategy](
        params, lr=config.lr, betas=tuple(config.betas), weight_decay=config.weight_decay
    )


def build_lr_scheduler(optimizer: torch.optim.Optimizer, config: OptimConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """constant, warmup (linear, then constant) or cosine (after the warm-up) over `config.training_steps`."""
    if config.lr_scheduler_type not in LR_SCHEDULES:
        raise ValueError(f"optim.lr_scheduler_type={config.lr_scheduler_type!r}: expected one of {LR_SCHEDULES}")
    total = max(config.training_steps, 1)
    warmup = config.lr_warmup_steps if config.lr_warmup_steps >= 0 else int(config.lr_warmup_ratio * total)

    def factor(step: int) -> float:
        if config.lr_scheduler_type != "constant" and step < warmup:
            return (step + 1) / (warmup + 1)
        if config.lr_scheduler_type == "cosine":
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def clip_and_step(
    params: Iterable[torch.nn.Parameter], optimizer: torch.optim.Optimizer, max_grad_norm: float
) -> tuple[float, bool]:
    """Clip the accumulated gradients to `max_grad_norm` (global norm, over every rank when sharded),
    step unless the norm is not finite, and clear the gradients. Returns (grad norm, stepped).

    A non-finite norm means a broken batch (an overflow, a NaN reward that slipped through): skipping
    it keeps the weights and optimizer moments intact.
    """
    grad_norm = torch.nn.utils.clip_grad_norm_(list(params), max_grad_norm)
    if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP2
        grad_norm = grad_norm.full_tensor()
    grad_norm = float(grad_norm)
    stepped = math.isfinite(grad_norm)
    if stepped:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, stepped
