import math

import pytest
import torch
import torch.nn.functional as F

from longtune.config import load_config
from longtune.data import Example
from longtune.data.collate import IGNORE_INDEX, collate, shift_labels
from longtune.losses.causal_lm import chunked_lm_loss
from longtune.optim import lr_lambda


def _case(seed=0, B=2, T=37, H=16, V=50):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, dtype=torch.float64, generator=g, requires_grad=True)
    head = torch.nn.Linear(H, V, bias=False, dtype=torch.float64)
    with torch.no_grad():
        head.weight.copy_(torch.randn(V, H, dtype=torch.float64, generator=g))
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[torch.rand(B, T, generator=g) < 0.4] = IGNORE_INDEX
    return hidden, head, labels


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "checkpointed"])
@pytest.mark.parametrize("chunk", [1, 5, 16, 1000])
def test_chunked_loss_equals_full_logits(chunk, fused):
    hidden, head, labels = _case()
    loss_sum, count = chunked_lm_loss(hidden, labels, head, chunk, fused=fused)
    loss_sum.backward()
    got_h, got_w = hidden.grad.clone(), head.weight.grad.clone()
    hidden.grad = None
    head.weight.grad = None
    logits = head(hidden)
    ref = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="sum",
                          ignore_index=IGNORE_INDEX)
    ref.backward()
    assert int(count) == int((labels != IGNORE_INDEX).sum())
    assert abs(float(loss_sum) - float(ref)) <= 1e-10 * abs(float(ref))
    torch.testing.assert_close(got_h, hidden.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got_w, head.weight.grad, rtol=1e-10, atol=1e-12)


def _grads(loss, *tensors):
    return torch.autograd.grad(loss, tensors, retain_graph=True)


def test_fused_loss_with_bias_frozen_weight_and_scaled_backward():
    """The fused path's gradients are fixed in forward and scaled in backward: check a non-unit upstream
    gradient, a bias, and a frozen head (no weight gradient wanted) against full float64 logits."""
    hidden, _, labels = _case(seed=3, T=29)
    g = torch.Generator().manual_seed(7)
    head = torch.nn.Linear(16, 50, bias=True, dtype=torch.float64)
    with torch.no_grad():
        head.weight.copy_(torch.randn(50, 16, dtype=torch.float64, generator=g))
        head.bias.copy_(torch.randn(50, dtype=torch.float64, generator=g))
    loss_sum, _ = chunked_lm_loss(hidden, labels, head, 7)
    got = _grads(loss_sum * -2.5, hidden, head.weight, head.bias)
    with pytest.raises(RuntimeError, match="one backward pass"):
        _grads(loss_sum, hidden)
    logits = head(hidden).reshape(-1, 50)
    ref = F.cross_entropy(logits, labels.reshape(-1), reduction="sum", ignore_index=IGNORE_INDEX)
    want = _grads(ref * -2.5, hidden, head.weight, head.bias)
    assert abs(float(loss_sum) - float(ref)) <= 1e-12 * abs(float(ref))
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    head.requires_grad_(False)
    loss_sum, _ = chunked_lm_loss(hidden, labels, head, 7)
    (grad_h,) = _grads(loss_sum, hidden)
    torch.testing.assert_close(grad_h, _grads(ref, hidden)[0], rtol=1e-10, atol=1e-12)


def test_fused_loss_under_bf16_autocast_matches_checkpointed():
    """Under autocast both paths run the head matmuls in bf16 and the softmax in fp32: same loss, gradients in
    the parameters' own dtypes, and errors against float64 at bf16 level (the fused one no worse)."""
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(300, 64, generator=g, requires_grad=True)
    head = torch.nn.Linear(64, 500, bias=False)
    labels = torch.randint(0, 500, (300,), generator=g)
    h64, w64 = hidden.detach().double().requires_grad_(), head.weight.detach().double().requires_grad_()
    ref = F.cross_entropy(h64 @ w64.T, labels, reduction="sum")
    ref_h, ref_w = _grads(ref, h64, w64)
    errors, losses = {}, {}
    for fused in (True, False):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss_sum, _ = chunked_lm_loss(hidden, labels, head, 128, fused=fused)
        grad_h, grad_w = _grads(loss_sum, hidden, head.weight)
        assert loss_sum.dtype == grad_h.dtype == grad_w.dtype == torch.float32
        losses[fused] = float(loss_sum)
        errors[fused] = [float((grad_h - ref_h).abs().max() / ref_h.abs().max()),
                         float((grad_w - ref_w).abs().max() / ref_w.abs().max())]
    assert losses[True] == pytest.approx(losses[False], rel=1e-6)
    assert losses[True] == pytest.approx(float(ref), rel=1e-3)
    for fused_err, ckpt_err in zip(errors[True], errors[False], strict=True):
        assert fused_err <= 0.02 and fused_err <= 1.25 * ckpt_err + 1e-4


def test_lora_wrapped_head_uses_checkpointed_path():
    from longtune.losses.causal_lm import fused_head_supported

    class Wrapped(torch.nn.Linear):
        pass

    assert fused_head_supported(torch.nn.Linear(4, 4))
    assert not fused_head_supported(Wrapped(4, 4))
    assert not fused_head_supported(torch.nn.Sequential(torch.nn.Linear(4, 4)))


def test_no_label_tokens_gives_zero_and_keeps_graph():
    hidden, head, labels = _case()
    labels[:] = IGNORE_INDEX
    loss_sum, count = chunked_lm_loss(hidden, labels, head, 8)
    assert float(loss_sum) == 0.0 and int(count) == 0
    loss_sum.backward()
    assert torch.count_nonzero(hidden.grad) == 0


def test_collate_shifts_labels_and_pads_right():
    a = Example([5, 6, 7, 8], [IGNORE_INDEX, IGNORE_INDEX, 7, 8])
    b = Example([9, 10], [9, 10])
    batch = collate([a, b], pad_token_id=0)
    assert batch.input_ids.tolist() == [[5, 6, 7, 8], [9, 10, 0, 0]]
    # position t predicts token t+1
    assert batch.labels.tolist() == [[IGNORE_INDEX, 7, 8, IGNORE_INDEX], [10, IGNORE_INDEX] + [IGNORE_INDEX] * 2]
    assert batch.num_loss_tokens == 3
    assert shift_labels([1, 2, 3]) == [2, 3, IGNORE_INDEX]


@pytest.mark.parametrize("kind", ["linear", "cosine", "constant_with_warmup", "constant", "cosine_with_min_lr"])
def test_schedules_match_transformers(kind):
    from transformers import get_scheduler

    total, warm = 20, 4
    cfg = load_config(None, ["model_name_or_path=builtin:tiny", "dataset=x", "output_dir=o",
                             f"lr_scheduler_type={kind}", f"warmup_steps={warm}", "min_lr_rate=0.1"])
    ours = lr_lambda(cfg.train, total)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    extra = {"scheduler_specific_kwargs": {"min_lr_rate": 0.1}} if kind == "cosine_with_min_lr" else {}
    ref = get_scheduler(kind, opt, num_warmup_steps=warm, num_training_steps=total, **extra)
    for s in range(total):
        assert math.isclose(ours(s), ref.get_last_lr()[0], rel_tol=1e-12, abs_tol=1e-15), (kind, s)
        opt.step()
        ref.step()


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("chunk", [1, 6, 1000])
def test_sequence_logps_match_full_log_softmax(chunk, bias):
    """Per-sequence log-prob sums (dpo/kto/rm) and their gradients, fused and checkpointed, against full
    float64 log-softmax, with a non-uniform upstream gradient per sequence."""
    from longtune.losses.causal_lm import chunked_sequence_logps

    hidden, _, labels = _case(seed=11, T=23)
    g = torch.Generator().manual_seed(2)
    head = torch.nn.Linear(16, 50, bias=bias, dtype=torch.float64)
    with torch.no_grad():
        head.weight.copy_(torch.randn(50, 16, dtype=torch.float64, generator=g))
        if bias:
            head.bias.copy_(torch.randn(50, dtype=torch.float64, generator=g))
    seq_ids = torch.randint(0, 3, labels.shape, generator=g)
    weights = torch.tensor([0.7, -1.3, 2.1], dtype=torch.float64)
    params = [hidden, *head.parameters()]
    logp = torch.log_softmax(head(hidden), -1)
    keep = labels != IGNORE_INDEX
    token = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * keep
    want_sums = torch.zeros(3, dtype=torch.float64).index_add(0, seq_ids.reshape(-1), token.reshape(-1))
    want_counts = torch.zeros(3, dtype=torch.float64).index_add(0, seq_ids[keep], torch.ones(int(keep.sum()),
                                                                                             dtype=torch.float64))
    want_grads = _grads((want_sums * weights).sum(), *params)
    for fused in (True, False):
        sums, counts = chunked_sequence_logps(hidden, labels, seq_ids, 3, head, chunk, fused=fused)
        torch.testing.assert_close(sums, want_sums, rtol=1e-12, atol=1e-12)
        assert torch.equal(counts, want_counts)
        for got, want in zip(_grads((sums * weights).sum(), *params), want_grads, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
