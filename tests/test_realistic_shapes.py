"""Parity in the shapes users have (tests/shapes.py): long prompts with short answers, so that whole SP ranks and
lockstep blank micro-batches hold no loss token, uneven data-parallel shares, mixed lengths. Every run goes through
the real CLI (torchrun, gloo, CPU) and is compared with an sp=1 run: float64 to 1e-9 on the loss of every step
and 1e-8 (relative) on the final weights; bf16 under FSDP against the closed forms (DPO step 1 = ln 2, KTO step 1
= 0.5) and against sp=1 within bf16 tolerance.

A rank with nothing to add must still take part in every collective (FSDP reduce-scatters only the parameters that
got a gradient) and add an exact zero. The CI set covers each case once; the full matrix is `-m slow`.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from tests.conftest import base_overrides
from tests.launch import final_params, launch, max_rel_diff, metric_rows
from tests.shapes import (
    LONG_PROMPT_PAIRS,
    Shape,
    kto_rows,
    label_ranks,
    preference_rows,
    pt_rows,
    sft_rows,
    write_rows,
)

SEED = 5
# 10 rows, batch 4: steps of 4, 4 and 2 rows (the last micro-batch of an epoch is short).
SFT_ROWS = 10
# Short enough for 2 cores, long enough that a 1-3 word answer sits in the last 1/8 of the row (sp=4 too).
SFT_CUTOFF = 192
PAIR_CUTOFF = 256


@pytest.fixture(scope="module")
def shape_files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("shapes")
    mixed = Shape(short_every=5)  # one ordinary row in five: mixed lengths inside a micro-batch
    pairs = LONG_PROMPT_PAIRS
    return {
        "sft": write_rows(root / "sft.json", sft_rows(SEED, SFT_ROWS)),
        "sft_mixed": write_rows(root / "sft_mixed.json", sft_rows(SEED, SFT_ROWS, mixed, fmt="sharegpt")),
        "pairs": write_rows(root / "pairs.json", preference_rows(SEED, 8, pairs)),
        "kto": write_rows(root / "kto.json", kto_rows(SEED, 8, pairs)),
        # Longer answers: sums of ~30 log-probs, whose bf16 rounding is well above the test's 1e-3.
        "pairs_bf16": write_rows(root / "pairs_bf16.json",
                                 preference_rows(SEED, 7, Shape(prompt_words=(60, 70), answer_words=(20, 40)))),
        "pt": write_rows(root / "pt.json", pt_rows(SEED, 8)),
    }


def _losses(out: Path) -> list[float]:
    return [r["loss"] for r in metric_rows(out) if "loss" in r]


def _assert_same_run(ref: Path, got: Path, label: str, steps: int, keys: tuple[str, ...] = ("loss",)) -> None:
    a = [r for r in metric_rows(ref) if "loss" in r]
    b = [r for r in metric_rows(got) if "loss" in r]
    assert len(a) == len(b) == steps, (label, len(a), len(b))
    for ra, rb in zip(a, b):
        for key in keys:
            if key in ra:
                assert abs(ra[key] - rb[key]) <= 1e-9, (label, key, ra[key], rb[key])
    worst = max_rel_diff(final_params(got), final_params(ref))
    assert worst <= 1e-8, (label, worst)


class ReferenceRuns:
    """sp=1 single-process runs, one per distinct config, shared by the tests of this module."""

    def __init__(self, root: Path):
        self.root = root
        self.done: dict[tuple, Path] = {}

    def get(self, data: Path, **values) -> Path:
        key = (str(data), tuple(sorted((k, str(v)) for k, v in values.items())))
        if key not in self.done:
            out = self.root / f"ref{len(self.done)}"
            launch(1, base_overrides(data, out, **values))
            self.done[key] = out
        return self.done[key]


@pytest.fixture(scope="module")
def references(tmp_path_factory) -> ReferenceRuns:
    return ReferenceRuns(tmp_path_factory.mktemp("references"))


def test_generated_answers_sit_on_one_sp_rank(shape_files):
    """The generator does what the parity tests rely on: through the real data pipeline, every long-prompt row's
    trained tokens are all on SP rank 0 (its last zigzag chunk) at sp=2 and sp=4, so the other ranks have none."""
    from longtune.config import build_config
    from longtune.data import examples_from_config
    from longtune.data.collate import shifted_document_labels
    from longtune.models.loader import load_tokenizer

    cfg = build_config(dict(model_name_or_path="builtin:tiny", dataset=str(shape_files["sft"]), template="chatml",
                            cutoff_len=SFT_CUTOFF, output_dir="unused"))
    examples, stats = examples_from_config(cfg, load_tokenizer(cfg.model), "train")
    assert len(examples) == SFT_ROWS and stats.truncated == 0
    for example in examples:
        labels = shifted_document_labels(example)
        assert 0 < sum(y != -100 for y in labels) <= 5
        assert label_ranks(labels, 2) == {0} and label_ranks(labels, 4) == {0}


def test_generated_pairs_leave_two_of_four_sp_ranks_empty(shape_files):
    """Pairs and KTO rows (two documents per row): at sp=4 only SP ranks 0 and 3 hold trained tokens."""
    from longtune.config import build_config
    from longtune.data.collate import shifted_document_labels
    from longtune.data.preference import load_kto_examples, load_pair_examples
    from longtune.models.loader import load_tokenizer

    for stage, name, load in (("dpo", "pairs", load_pair_examples), ("kto", "kto", load_kto_examples)):
        cfg = build_config(dict(model_name_or_path="builtin:tiny", dataset=str(shape_files[name]), stage=stage,
                                template="chatml", cutoff_len=PAIR_CUTOFF, output_dir="unused"))
        examples, stats = load(cfg, load_tokenizer(cfg.model), "train")
        assert len(examples) == 8 and stats.truncated == 0, (name, stats)
        for example in examples:
            assert label_ranks(shifted_document_labels(example), 4) == {0, 3}, name


@pytest.mark.parametrize("kind", ["lm_fused", "lm_checkpointed", "sequence_fused", "sequence_checkpointed"])
def test_no_label_gives_every_parameter_an_exact_zero_gradient(kind):
    """A rank with no loss token: loss 0 exactly and a gradient, exactly 0, for the head's weight and bias as well
    as for the hidden states (a head with no gradient on one rank desynchronises FSDP's reduce-scatter)."""
    from longtune.losses.causal_lm import chunked_lm_loss, chunked_sequence_logps

    torch.manual_seed(0)
    hidden = torch.randn(2, 12, 8, dtype=torch.float64, requires_grad=True)
    head = torch.nn.Linear(8, 16, dtype=torch.float64)
    labels = torch.full((2, 12), -100)
    fused = kind.endswith("fused")
    if kind.startswith("lm"):
        loss, count = chunked_lm_loss(hidden, labels, head, 4, fused=fused)
        assert int(count) == 0
    else:
        ids = torch.arange(2).repeat_interleave(12).reshape(2, 12)
        sums, counts = chunked_sequence_logps(hidden, labels, ids, 2, head, 4, fused=fused)
        assert torch.equal(counts, torch.zeros(2, dtype=torch.float64))
        loss = (sums * torch.tensor([0.3, -2.0], dtype=torch.float64)).sum()
    assert float(loss.detach()) == 0.0
    loss.backward()
    for grad in (hidden.grad, head.weight.grad, head.bias.grad):
        assert grad is not None and torch.count_nonzero(grad) == 0


# ---------------------------------------------------------------------------------------------------------------
# SFT, long prompts and short answers: every SP mode, full FT under FSDP and LoRA, packing on and off, batch 4.

SFT_COMMON = dict(cutoff_len=SFT_CUTOFF, per_device_train_batch_size=4, max_steps=3)
MODES = {2: ("zigzag_ring", "ulysses", "llama3", "auto"), 4: ("zigzag_ring", "ulysses", "llama3", "hybrid", "auto")}
SFT_MATRIX = [
    (nproc, mode, ftype, packing, data)
    for nproc, modes in MODES.items()
    for mode in modes
    for ftype in ("full", "lora")
    for packing in (False, True)
    for data in ("sft", "kv_retrieval")
    if packing or data == "sft"  # kv_retrieval as users run it: packed
]
# The CI share: each SP mode family at sp=2, both finetuning types, packing both ways, both datasets.
SFT_CI = {
    (2, "zigzag_ring", "full", False, "sft"),
    (2, "ulysses", "lora", True, "sft"),
    (2, "llama3", "full", True, "kv_retrieval"),
}


def _sft_values(shape_files, ftype: str, packing: bool, data: str) -> tuple[Path, dict]:
    values = dict(SFT_COMMON, finetuning_type=ftype, packing=packing)
    if ftype == "lora":
        values["learning_rate"] = 5e-3
    if data == "kv_retrieval":
        values.update(dataset="builtin:kv_retrieval", max_samples=SFT_ROWS, cutoff_len=256)
        return Path("unused"), values
    return shape_files[data], values


def _sft_params():
    for case in SFT_MATRIX:
        nproc, mode, ftype, packing, data = case
        marks = () if case in SFT_CI else (pytest.mark.slow,)
        yield pytest.param(*case, marks=marks, id=f"sp{nproc}-{mode}-{ftype}-{'packed' if packing else 'rows'}-{data}")


@pytest.mark.parametrize("nproc,mode,ftype,packing,data", list(_sft_params()))
def test_sft_long_prompts_match_sp1(shape_files, references, tmp_path, nproc, mode, ftype, packing, data):
    path, values = _sft_values(shape_files, ftype, packing, data)
    ref = references.get(path, **values)
    out = tmp_path / "sp"
    launch(nproc, base_overrides(path, out, sequence_parallel_size=nproc, sequence_parallel_mode=mode, **values))
    _assert_same_run(ref, out, f"sp{nproc} {mode} {ftype} packing={packing} {data}", steps=3)


# ---------------------------------------------------------------------------------------------------------------
# Every stage with ranks that hold no label: dp=2 x sp=2 with an uneven dp share (a lockstep blank micro-batch on
# dp rank 1: both of its SP ranks have nothing), and sp=4 (long prompts: SP ranks 1 and 2 hold no trained token of
# an sft row, a pair or a KTO row, whose answers sit in zigzag chunks 3, 4 and 7).

# 5 examples, 4 per step (batch 1 x GA 2 x dp 2): the second step has 1, so at dp=2 every micro-batch of dp
# rank 1 in that step is blank (a rank whose first micro-batch has labels would have had head gradients anyway).
STAGES = {
    "pt": ("pt", dict(stage="pt", cutoff_len=128, packing=False)),
    "sft": ("sft_mixed", dict(stage="sft", cutoff_len=SFT_CUTOFF)),
    "dpo": ("pairs", dict(stage="dpo", pref_loss="sigmoid", pref_ftx=0.5, cutoff_len=PAIR_CUTOFF)),
    "kto": ("kto", dict(stage="kto", cutoff_len=PAIR_CUTOFF, kto_undesirable_weight=1.5)),
    "rm": ("pairs", dict(stage="rm", cutoff_len=PAIR_CUTOFF)),
}
STAGE_KEYS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "kl")
STAGE_CI = {("dpo", "dp2_sp2", "full"), ("kto", "sp4", "full")}


def _stage_params():
    for stage in STAGES:
        for layout in ("dp2_sp2", "sp4"):
            for ftype in ("full", "lora"):
                marks = () if (stage, layout, ftype) in STAGE_CI else (pytest.mark.slow,)
                yield pytest.param(stage, layout, ftype, marks=marks, id=f"{stage}-{layout}-{ftype}")


@pytest.mark.parametrize("stage,layout,ftype", list(_stage_params()))
def test_stage_with_empty_ranks_matches_sp1(shape_files, references, tmp_path, stage, layout, ftype):
    data, extra = STAGES[stage]
    values = dict(extra, finetuning_type=ftype, max_samples=5, max_steps=2, gradient_accumulation_steps=2,
                  lr_scheduler_type="constant", learning_rate=5e-3 if ftype == "lora" else 1e-3)
    if stage == "kto" and layout == "dp2_sp2":
        # KTO's reference point z0 is a mean over the micro-batch of every dp rank, so dp=2 groups the examples
        # differently from one process: compare with dp=2 x sp=1 instead (the blank micro-batch is in both).
        ref = tmp_path / "dp2"
        launch(2, base_overrides(shape_files[data], ref, per_device_train_batch_size=1, **values))
    else:
        ref = references.get(shape_files[data], per_device_train_batch_size=2, **values)
    out = tmp_path / layout
    if layout == "dp2_sp2":
        launch(4, base_overrides(shape_files[data], out, per_device_train_batch_size=1, sequence_parallel_size=2,
                                 sequence_parallel_mode="zigzag_ring", **values))
    else:
        launch(4, base_overrides(shape_files[data], out, per_device_train_batch_size=2, sequence_parallel_size=4,
                                 sequence_parallel_mode="zigzag_ring", **values))
    _assert_same_run(ref, out, f"{stage} {layout} {ftype}", steps=2, keys=STAGE_KEYS)


# ---------------------------------------------------------------------------------------------------------------
# bf16 under FSDP (fp32 master weights, bf16 compute) at sp=2: the reference log-probs must stay fp32.

BF16 = dict(dtype="bfloat16", max_steps=1, cutoff_len=PAIR_CUTOFF, per_device_train_batch_size=2,
            finetuning_type="full", sequence_parallel_size=2)


def test_bf16_fsdp_dpo_first_step_is_ln2(shape_files, tmp_path):
    out = tmp_path / "dpo"
    launch(2, base_overrides(shape_files["pairs_bf16"], out, stage="dpo", pref_loss="sigmoid", **BF16))
    first = [r for r in metric_rows(out) if "loss" in r][0]
    assert abs(first["loss"] - math.log(2)) <= 1e-3, (first["loss"] - math.log(2), first)


def test_bf16_fsdp_kto_first_step_is_half(shape_files, tmp_path):
    """KTO at step 1 (policy == reference, so z0 = 0 and every reward is 0): each example's loss is
    weight * (1 - sigmoid(0)) = weight / 2; with both weights 1 the mean is 0.5."""
    out = tmp_path / "kto"
    launch(2, base_overrides(shape_files["kto"], out, stage="kto", **BF16))
    first = [r for r in metric_rows(out) if "loss" in r][0]
    assert abs(first["loss"] - 0.5) <= 1e-3, (first["loss"] - 0.5, first)


def test_bf16_fsdp_sft_long_prompts_track_sp1(shape_files, references, tmp_path):
    values = dict(BF16, max_steps=3, cutoff_len=SFT_CUTOFF)
    values.pop("sequence_parallel_size")
    ref = references.get(shape_files["sft"], **values)
    out = tmp_path / "sp2"
    launch(2, base_overrides(shape_files["sft"], out, sequence_parallel_size=2, **values))
    got, want = _losses(out), _losses(ref)
    assert len(got) == len(want) == 3
    assert all(abs(a - b) <= 2e-2 * abs(b) for a, b in zip(got, want)), (got, want)
    assert all(torch.isfinite(p).all() for p in final_params(out).values())


def _bf16_root_dtypes(rank: int, world_size: int) -> dict:
    """Under FSDP2 bf16 (2 gloo ranks): the dtypes a stage sees inside the root's forward."""
    from longtune.config import ModelConfig
    from longtune.models.loader import decoder_layer_list, load_model
    from longtune.parallel.fsdp import RootForward, ShardingPlan, apply_fsdp
    from longtune.parallel.mesh import ParallelDims
    from longtune.parallel.sequence import ModelInputs
    from longtune.stages.base import final_hidden_states

    torch.manual_seed(0)
    model = load_model(ModelConfig(model_name_or_path="builtin:tiny"), torch.float32)
    layers = decoder_layer_list(model)[1]
    root = RootForward(model)
    apply_fsdp(root, ParallelDims(dp=world_size, sp=1, rank=rank), layers, torch.bfloat16, ShardingPlan(enabled=True))
    seen: dict = {}

    def record_layer_input(_module, args, kwargs) -> None:
        seen["layer_input"] = (args[0] if args else kwargs["hidden_states"]).dtype

    layers[0].register_forward_pre_hook(record_layer_input, with_kwargs=True)

    def stage_fn(m, inputs, _chunk):
        seen["reference"] = inputs.reference.clone()
        hidden = final_hidden_states(m, inputs)
        seen["hidden"] = hidden.dtype
        return hidden.float().sum()

    ids = torch.arange(3, 19).reshape(1, 16)
    reference = torch.tensor([-123.456789, -7.0001], dtype=torch.float32)
    inputs = ModelInputs(input_ids=ids, labels=ids, position_ids=torch.arange(16).reshape(1, 16), sp_context=None,
                         reference=reference)
    root(stage_fn, inputs, 32).backward()
    return {"reference": seen["reference"], "hidden": seen["hidden"], "layer_input": seen["layer_input"],
            "sent": reference}


def test_bf16_fsdp_keeps_reference_fp32_and_activations_bf16():
    """FSDP2's MixedPrecisionPolicy must not cast the root's non-activation inputs (reference log-prob sums), while
    the decoder still computes in bf16 (the embedding weight is gathered in bf16, so activations start there)."""
    from tests.distributed_utils import run_distributed

    for result in run_distributed(_bf16_root_dtypes, 2):
        assert result["reference"].dtype == torch.float32
        assert torch.equal(result["reference"], result["sent"])
        assert result["hidden"] == torch.bfloat16 and result["layer_input"] == torch.bfloat16


@pytest.mark.slow
@pytest.mark.parametrize("stage,nproc,sp", [("sft", 2, 2), ("dpo", 4, 2), ("kto", 4, 4), ("rm", 4, 4)],
                         ids=["sft-sp2", "dpo-dp2_sp2", "kto-sp4", "rm-sp4"])
def test_empty_ranks_without_fsdp_match_sp1(shape_files, references, tmp_path, stage, nproc, sp):
    """The same shapes with `fsdp: false` (gradients summed by one all-reduce, missing ones as zeros)."""
    data, extra = STAGES[stage]
    values = dict(extra, finetuning_type="full", max_samples=5, max_steps=2, gradient_accumulation_steps=2,
                  lr_scheduler_type="constant", learning_rate=1e-3)
    dp = nproc // sp
    ref = references.get(shape_files[data], per_device_train_batch_size=2, **values)
    out = tmp_path / "nofsdp"
    launch(nproc, base_overrides(shape_files[data], out, per_device_train_batch_size=2 // dp, sequence_parallel_size=sp,
                                 fsdp=False, **values))
    _assert_same_run(ref, out, f"{stage} nproc{nproc} sp{sp} without fsdp", steps=2, keys=STAGE_KEYS)
