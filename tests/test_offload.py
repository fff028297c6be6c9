"""One GPU, big model: `offload_params` on a single process (FSDP2 at world size 1 with CPU offload), the process
group it needs, and gradient accumulation with and without a reduce-scatter per micro-batch (float64, exact)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from longtune.config import load_config
from longtune.errors import ConfigError
from longtune.parallel.fsdp import plan_from_config
from longtune.parallel.mesh import process_group_spec
from longtune.trainer import train
from tests.conftest import base_overrides
from tests.launch import max_rel_diff


def _run(data: Path, out: Path, **kw):
    return train(load_config(None, base_overrides(data, out, **kw)), log=lambda _: None)


def _losses(result) -> list[float]:
    return [r["loss"] for r in result.metrics if "loss" in r]


def _weights(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        state.update(load_file(str(f)))
    return state


def _assert_same_training(a, b) -> None:
    assert len(_losses(a)) == len(_losses(b)) > 0
    for x, y in zip(_losses(a), _losses(b)):
        assert abs(x - y) <= 1e-10 * abs(y), (_losses(a), _losses(b))
    assert max_rel_diff(_weights(a.final_dir), _weights(b.final_dir)) <= 1e-10


def test_process_group_has_a_cpu_backend_next_to_nccl():
    """Offloaded parameters and gradients are CPU DTensors: clipping reduces them, so a CUDA run's group needs
    gloo for CPU tensors besides NCCL; a CPU-only run uses gloo alone."""
    cuda = process_group_spec(torch.device("cuda", 3))
    assert cuda.backend == "cuda:nccl,cpu:gloo"
    assert cuda.device_id == torch.device("cuda", 3)
    cpu = process_group_spec(torch.device("cpu"))
    assert cpu.backend == "gloo" and cpu.device_id is None


def test_offload_params_on_one_process_plans_fsdp():
    plan = plan_from_config(None, True, None, world_size=1)
    assert plan.enabled and plan.offload
    assert not plan_from_config(None, False, None, world_size=1).enabled
    with pytest.raises(ConfigError, match="offload_params"):
        plan_from_config(False, True, None, world_size=1)


def test_one_process_offload_equals_plain_run(alpaca_file, tmp_path):
    """offload_params on one process (with checkpointing, activation offload and the tiled MLP) trains exactly as
    the plain run: same losses, same final weights (float64)."""
    kw = dict(per_device_train_batch_size=2, gradient_accumulation_steps=2, gradient_checkpointing=True)
    plain = _run(alpaca_file, tmp_path / "plain", **kw)
    offloaded = _run(alpaca_file, tmp_path / "offload", offload_params=True, offload_activations=True,
                     tiled_mlp_tokens=7, **kw)
    _assert_same_training(offloaded, plain)


def test_one_process_offload_dpo_with_live_reference(tmp_path):
    """DPO with a frozen full reference copy, both offloaded on one process: step-0 loss ln 2, and the same
    training as the plain run."""
    import math

    kw = dict(stage="dpo", dataset="builtin:dpo_demo", max_samples=8, cutoff_len=64, per_device_train_batch_size=2)
    plain = _run(Path("unused"), tmp_path / "plain", **kw)
    offloaded = _run(Path("unused"), tmp_path / "offload", offload_params=True, **kw)
    assert abs(_losses(offloaded)[0] - math.log(2)) <= 1e-12
    _assert_same_training(offloaded, plain)


def test_one_process_offload_resumes_exactly(alpaca_file, tmp_path):
    """A one-process offload run resumed from its step-2 checkpoint (sharded optimizer state) ends like the
    uninterrupted run."""
    kw = dict(per_device_train_batch_size=2, max_steps=4, offload_params=True)
    whole = _run(alpaca_file, tmp_path / "whole", save_steps=2, **kw)
    resumed = _run(alpaca_file, tmp_path / "resumed", resume_from_checkpoint=str(tmp_path / "whole" / "checkpoint-2"),
                   **kw)
    assert [r["step"] for r in resumed.metrics if "loss" in r] == [3, 4]
    for x, y in zip(_losses(resumed), _losses(whole)[2:]):
        assert abs(x - y) <= 1e-10 * abs(y)
    assert max_rel_diff(_weights(resumed.final_dir), _weights(whole.final_dir)) <= 1e-10


@pytest.mark.parametrize("sync_every_micro_batch", [True, False])
def test_fsdp_gradient_accumulation_equals_one_batch(alpaca_file, tmp_path, sync_every_micro_batch):
    """GA=4 x batch 1 equals batch 4 under FSDP whether gradients are reduce-scattered after every micro-batch
    (the default: only sharded gradients persist) or once per step (unsharded gradients accumulate)."""
    one_batch = _run(alpaca_file, tmp_path / "batch4", fsdp=True, per_device_train_batch_size=4)
    accumulated = _run(alpaca_file, tmp_path / "ga4", fsdp=True, per_device_train_batch_size=1,
                       gradient_accumulation_steps=4, gradient_sync_every_micro_batch=sync_every_micro_batch)
    _assert_same_training(accumulated, one_batch)


@pytest.mark.cuda
def test_cuda_offload_clips_cpu_gradients():
    """On a GPU with CPU offload, gradient clipping and the norm's full_tensor() reduce CPU DTensors: they run on
    the group's gloo backend (an NCCL-only group fails here). The clipped norm equals the unsharded one."""
    import torch.distributed as dist
    from torch import nn
    from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard

    from longtune.parallel.mesh import ParallelDims, ensure_process_group, shutdown_parallel

    dims = ParallelDims(dp=1, sp=1, device=torch.device("cuda", 0))
    started_here = not dist.is_initialized()
    ensure_process_group(dims)
    try:
        torch.manual_seed(0)
        reference = nn.Sequential(nn.Linear(16, 32), nn.Linear(32, 4)).double()
        model = nn.Sequential(nn.Linear(16, 32), nn.Linear(32, 4)).double()
        model.load_state_dict(reference.state_dict())
        for layer in model:
            fully_shard(layer, offload_policy=CPUOffloadPolicy(pin_memory=True))
        fully_shard(model, offload_policy=CPUOffloadPolicy(pin_memory=True))
        x = torch.randn(8, 16, dtype=torch.float64)
        model(x.cuda()).square().sum().backward()
        reference(x).square().sum().backward()
        assert all(p.grad.device.type == "cpu" for p in model.parameters())
        norm = torch.nn.utils.clip_grad_norm_(list(model.parameters()), 0.5)
        full = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        expected = torch.nn.utils.clip_grad_norm_(list(reference.parameters()), 0.5)
        assert abs(float(full) - float(expected)) <= 1e-10 * float(expected)
    finally:
        if started_here:
            shutdown_parallel(dims)


@pytest.mark.parametrize("sync_every_micro_batch", [True, False])
def test_fsdp_dp2_gradient_accumulation_equals_one_process_batch(alpaca_file, tmp_path, sync_every_micro_batch):
    """Two FSDP ranks x GA 2 x batch 1 equal one process with batch 4, with the reduce-scatter after every
    micro-batch (default) or once per step: the sharded sums are exact either way (float64)."""
    from tests.launch import final_params, launch, metric_rows

    one = _run(alpaca_file, tmp_path / "one", per_device_train_batch_size=4)
    out = tmp_path / "dp2"
    launch(2, base_overrides(alpaca_file, out, per_device_train_batch_size=1, gradient_accumulation_steps=2,
                             gradient_sync_every_micro_batch=sync_every_micro_batch))
    losses = [r["loss"] for r in metric_rows(out) if "loss" in r]
    assert len(losses) == len(_losses(one)) == 3
    for x, y in zip(losses, _losses(one)):
        assert abs(x - y) <= 1e-10 * abs(y)
    assert max_rel_diff(final_params(out), _weights(one.final_dir)) <= 1e-10


@pytest.mark.cuda
def test_cuda_one_process_offload_equals_plain_run(alpaca_file, tmp_path):
    """On a GPU: offload_params on one process (nccl + gloo one-rank group, parameters, gradients and AdamW on
    the CPU, clipping over CPU DTensors) trains as the plain GPU run (float64, so only summation order differs)."""
    kw = dict(per_device_train_batch_size=2, gradient_accumulation_steps=2, gradient_checkpointing=True,
              max_grad_norm=0.5)
    plain = _run(alpaca_file, tmp_path / "plain", **kw)
    offloaded = _run(alpaca_file, tmp_path / "offload", offload_params=True, offload_activations=True, **kw)
    assert len(_losses(offloaded)) == len(_losses(plain)) == 3
    for x, y in zip(_losses(offloaded), _losses(plain)):
        assert abs(x - y) <= 1e-9 * abs(y)
    assert max_rel_diff(_weights(offloaded.final_dir), _weights(plain.final_dir)) <= 1e-9
