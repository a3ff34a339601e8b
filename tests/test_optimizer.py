"""The bf16 AdamW (`worker.actor.optim.strategy=adamw_bf16`): AdamW's updates with half the state memory,
and bf16 parameters that still move under updates smaller than a bf16 step."""

import torch

from verl.workers.config import OptimConfig
from verl.workers.optimizer import AdamWBF16, build_optimizer


def quadratic_steps(optimizer_cls, param: torch.Tensor, steps: int, **kwargs) -> torch.Tensor:
    param = torch.nn.Parameter(param.clone())
    optimizer = optimizer_cls([param], **kwargs)
    target = torch.linspace(-1, 1, param.numel()).reshape(param.shape)
    for _ in range(steps):
        optimizer.zero_grad()
        ((param.float() - target) ** 2).sum().backward()
        optimizer.step()
    return param.detach()


def test_fp32_parameters_follow_torch_adamw():
    start = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
    kwargs = {"lr": 1e-2, "betas": (0.9, 0.999), "weight_decay": 0.1}
    ours = quadratic_steps(AdamWBF16, start, 50, **kwargs)
    reference = quadratic_steps(torch.optim.AdamW, start, 50, **kwargs)
    # Only the moments are rounded to bf16 (8 bits of mantissa): the paths stay within a few lr.
    torch.testing.assert_close(ours, reference, atol=1e-2, rtol=0)
    assert (ours - start).abs().mean() > 0.3  # the parameters really moved (by far more than the tolerance)


def test_moments_are_stored_in_bf16():
    param = torch.nn.Parameter(torch.ones(3))
    optimizer = AdamWBF16([param], lr=1e-3)
    param.grad = torch.ones(3)
    optimizer.step()
    state = optimizer.state[param]
    assert state["exp_avg"].dtype == torch.bfloat16 and state["exp_avg_sq"].dtype == torch.bfloat16
    assert "compensation" not in state  # fp32 parameters need none


def test_bf16_parameters_accumulate_updates_below_their_resolution():
    # Near 1.0 a bf16 step is 2**-7 = 0.0078. With a constant gradient Adam moves each step by
    # about lr = 1e-4, so 100 steps should bring 1.0 to 0.99; plain bf16 AdamW rounds every
    # single update away and stays at 1.0.
    start = torch.ones(16, dtype=torch.bfloat16)

    def constant_gradient_steps(optimizer_cls) -> torch.Tensor:
        param = torch.nn.Parameter(start.clone())
        optimizer = optimizer_cls([param], lr=1e-4, weight_decay=0.0)
        for _ in range(100):
            param.grad = torch.ones_like(param)
            optimizer.step()
        return param.detach().float()

    assert torch.all(constant_gradient_steps(torch.optim.AdamW) == 1.0)
    ours = constant_gradient_steps(AdamWBF16)
    assert torch.all((ours - 0.99).abs() <= 2**-8), ours


def test_build_optimizer_follows_the_strategy_key():
    params = [torch.nn.Parameter(torch.zeros(2))]
    assert isinstance(build_optimizer(params, OptimConfig(strategy="adamw")), torch.optim.AdamW)
    assert isinstance(build_optimizer(params, OptimConfig(strategy="adamw_bf16")), AdamWBF16)
