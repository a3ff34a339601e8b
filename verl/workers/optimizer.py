"""The actor's optimizers: torch's AdamW, or an AdamW that keeps its states in bf16 (`adamw_bf16`)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from verl.trainer.config import OptimConfig


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


def build_optimizer(params: Iterable[torch.nn.Parameter], config: OptimConfig) -> torch.optim.Optimizer:
    """`worker.actor.optim.strategy`: adamw (torch's, states in the parameters' dtype) or adamw_bf16."""
    kwargs = {"lr": config.lr, "betas": tuple(config.betas), "weight_decay": config.weight_decay}
    if config.strategy == "adamw":
        return torch.optim.AdamW(params, **kwargs)
    if config.strategy == "adamw_bf16":
        return AdamWBF16(params, **kwargs)
    raise ValueError(f"worker.actor.optim.strategy={config.strategy!r}: expected adamw or adamw_bf16")
