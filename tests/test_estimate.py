"""Per-device memory of model states, checked against the ZeRO papers' arithmetic.

ZeRO (Rajbhandari et al. 2020, section 3 and figure 1): mixed-precision Adam keeps
2 bytes of fp16 parameters + 2 of fp16 gradients + K = 12 of optimizer state (fp32 master
weights, momentum, variance) = 16 bytes per parameter. Stage 1 partitions the K bytes over
N devices, stage 2 also the gradients, stage 3 also the parameters.
"""

from __future__ import annotations

import pytest

from nbtrain.config.estimate import describe, estimate
from nbtrain.config.render import render
from nbtrain.config.tree import TrainConfig


def ds_for(**flags: object) -> dict:
    return render(TrainConfig(**flags)).deepspeed  # type: ignore[arg-type]


@pytest.mark.parametrize(("stage", "per_param"), [
    # The paper's formulas, for N = 64: (2 + 2 + K), 2 + 2 + K/N, 2 + (2 + K)/N, (2 + 2 + K)/N.
    (0, 2 + 2 + 12),
    (1, 2 + 2 + 12 / 64),
    (2, 2 + (2 + 12) / 64),
    (3, (2 + 2 + 12) / 64),
])
def test_mixed_precision_adam_follows_the_zero_paper(stage: int, per_param: float) -> None:
    est = estimate(ds_for(zero=stage, precision="bf16"), world_size=64)
    assert est.device == pytest.approx(per_param)
    assert est.host == 0


def test_the_papers_7_5b_model_on_64_gpus() -> None:
    # Figure 1 of the ZeRO paper: 120 GB, 31.4 GB, 16.6 GB and 1.9 GB per device.
    paper_gb = {0: 120, 1: 31.4, 2: 16.6, 3: 1.9}
    for stage, gb in paper_gb.items():
        device_bytes = estimate(ds_for(zero=stage, precision="fp16"), world_size=64).device * 7.5e9
        assert round(device_bytes / 1e9, 1) == gb, f"stage {stage}: {device_bytes / 1e9:.1f} GB"


def test_fp32_adam_has_no_master_copy() -> None:
    # fp32 weights (4) + fp32 gradients (4) + momentum and variance (8).
    est = estimate(ds_for(), world_size=2)
    assert (est.params, est.grads, est.optimizer) == (4, 4, 8)


def test_sgd_keeps_one_state_per_parameter() -> None:
    assert estimate(ds_for(optimizer="sgd"), world_size=2).optimizer == 4


def test_optimizer_offload_moves_gradients_and_optimizer_state_to_the_host() -> None:
    # ZeRO-Offload (Ren et al. 2021): fp16 parameters stay on the device; gradients and the
    # optimizer step (fp32 master weights, momentum, variance) live in host memory.
    on_device = estimate(ds_for(zero=2, precision="bf16"), world_size=4)
    offloaded = estimate(ds_for(zero=2, precision="bf16", offload_optimizer="cpu"), world_size=4)
    assert offloaded.device == pytest.approx(2)
    assert offloaded.host == pytest.approx((2 + 12) / 4)
    assert offloaded.device + offloaded.host == pytest.approx(on_device.device), "offload moves bytes, it adds none"


def test_param_offload_at_stage_3_empties_the_device() -> None:
    est = estimate(ds_for(zero=3, precision="bf16", offload_optimizer="nvme", offload_param="cpu",
                          nvme_path="/tmp"), world_size=8)
    assert est.device == 0
    assert est.host == pytest.approx(16 / 8)


def test_for_params_gives_gib_per_process() -> None:
    device_gib, host_gib = estimate(ds_for(zero=3), world_size=4).for_params(1024**3)
    assert (device_gib, host_gib) == (pytest.approx(4.0), 0.0)


def test_describe_says_what_is_left_out_and_scales_to_model_sizes() -> None:
    text = describe(ds_for(zero=3, precision="bf16"), world_size=2)
    assert "activations not included" in text
    assert "8.00 bytes/parameter on the device" in text
    assert "7,000M parameters: 52.15 GiB device" in text  # 7e9 * 8 bytes / 2**30
    assert "350M parameters" in describe(ds_for(), world_size=2, param_count=350_000_000)
