"""The stage registry and what the stages own: the registry matches config's stage names, no module outside
stages/ branches on a stage name, the masked metric sums the stages log equal direct float64 sums, and the
lockstep batches every rank runs in evaluation and the reference precompute."""

from __future__ import annotations

import math
import re
import typing
from pathlib import Path

import pytest
import torch

from longtune.config import Config, DataConfig, ModelConfig, ParallelConfig, PreferenceConfig, TrainConfig
from longtune.forward import blank_like
from longtune.losses.preference import SequenceLogps, dpo_loss, kto_kl_from_sums, kto_kl_sums, kto_loss
from longtune.parallel.mesh import ParallelDims
from longtune.stages import STAGES, build_stage

SRC = Path(__file__).resolve().parents[1] / "src" / "longtune"
BRANCH = re.compile(r"""\bstage\b\s*(==|!=|not in|in)\s*[("']""")
# bench's baseline is the *other* implementation it compares against (HF's loss for sft, a TRL-style DPO for
# dpo), chosen per benchmark case.
ALLOWED = {("bench.py", 'if case.stage == "sft":')}


def _cfg(stage: str, **pref) -> Config:
    return Config(ModelConfig(), DataConfig(), TrainConfig(stage=stage), ParallelConfig(), PreferenceConfig(**pref))


def test_registry_has_every_stage_config_allows():
    hints = typing.get_type_hints(TrainConfig)
    assert set(typing.get_args(hints["stage"])) == set(STAGES)
    for name in STAGES:
        assert build_stage(_cfg(name)).name == name


def test_no_stage_name_branches_outside_stages():
    found = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).as_posix()
        if rel.startswith("stages/"):
            continue
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if BRANCH.search(line) and (rel, line.strip()) not in ALLOWED:
                found.append(f"{rel}:{number}: {line.strip()}")
    assert not found, "\n".join(found)


def test_stage_facts():
    assert [n for n in STAGES if STAGES[n].docs_per_row == 2] == ["dpo", "kto", "rm"]
    assert [n for n in STAGES if STAGES[n].packs_by_default] == ["pt"]
    assert build_stage(_cfg("rm")).model_task == "reward"
    assert build_stage(_cfg("dpo", pref_loss="simpo")).uses_reference is False
    assert build_stage(_cfg("dpo")).uses_reference and build_stage(_cfg("kto")).uses_reference


def test_kto_row_flags_from_examples_and_blank_rows():
    from longtune.data import Example

    rows = [Example(input_ids=[1, 2, 3, 4], labels=[-100, 2, -100, 4], doc_lengths=[2, 2], desirable=d)
            for d in (True, False)]
    flags = build_stage(_cfg("kto")).row_flags(rows + [blank_like(rows[0])])
    assert flags.tolist() == [True, False, False]
    assert build_stage(_cfg("dpo")).row_flags(rows) is None


def test_masked_metric_sums_equal_direct_sums():
    """The stages log `metric_sums(mask)`; a masked (blank) row must contribute nothing to any metric."""
    g = torch.Generator().manual_seed(0)
    n, beta = 5, 0.3
    pol, ref = -torch.rand(2, n, generator=g, dtype=torch.float64) * 20, -torch.rand(2, n, generator=g,
                                                                                      dtype=torch.float64) * 20
    counts = torch.tensor([3, 4, 5, 6, 7])
    mask = torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0], dtype=torch.float64)
    out = dpo_loss(*(SequenceLogps(x, counts) for x in (pol[0], pol[1], ref[0], ref[1])), loss_type="sigmoid",
                   beta=beta)
    sums = out.metric_sums(mask)
    keep = [i for i in range(n) if mask[i]]
    rc = [beta * float(pol[0, i] - ref[0, i]) for i in keep]
    rr = [beta * float(pol[1, i] - ref[1, i]) for i in keep]
    assert float(sums["rewards/chosen"][0]) == pytest.approx(sum(rc), rel=1e-12)
    assert float(sums["rewards/margins"][0]) == pytest.approx(sum(rc) - sum(rr), rel=1e-12)
    assert float(sums["rewards/accuracies"][0]) == sum(a > b for a, b in zip(rc, rr))
    assert float(sums["logps/rejected"][0]) == pytest.approx(sum(float(pol[1, i]) for i in keep), rel=1e-12)
    assert all(float(c) == len(keep) for _, c in sums.values())

    desirable = torch.tensor([True, False, True, True, False])
    z0 = kto_kl_from_sums(kto_kl_sums(pol[1], ref[1], mask))
    want_z0 = max(0.0, sum(float(pol[1, i] - ref[1, i]) for i in keep) / len(keep))
    assert float(z0) == pytest.approx(want_z0, rel=1e-12, abs=1e-15)
    kto = kto_loss(SequenceLogps(pol[0], counts), SequenceLogps(ref[0], counts), desirable, z0, beta=beta,
                   chosen_weight=1.0, undesirable_weight=1.0)
    ks = kto.metric_sums(mask)
    good = [i for i in keep if desirable[i]]
    bad = [i for i in keep if not desirable[i]]
    assert float(ks["rewards/chosen"][0]) == pytest.approx(sum(beta * float(pol[0, i] - ref[0, i]) for i in good),
                                                           rel=1e-12)
    assert float(ks["rewards/chosen"][1]) == len(good) and float(ks["rewards/rejected"][1]) == len(bad)
    assert float(ks["logps/rejected"][0]) == pytest.approx(sum(float(pol[0, i]) for i in bad), rel=1e-12)
    assert ks["kl"][1] == 1 and float(ks["kl"][0]) == float(z0)


@pytest.mark.parametrize("num_items,dp,batch", [(10, 3, 2), (7, 2, 4), (2, 4, 1), (9, 1, 3)])
def test_lockstep_batches_cover_every_item_once_in_equal_rounds(num_items, dp, batch):
    per_rank = [ParallelDims(dp=dp, sp=2, rank=d * 2 + 1).lockstep_batches(num_items, batch) for d in range(dp)]
    rounds = math.ceil(math.ceil(num_items / dp) / batch)
    assert all(len(batches) == rounds for batches in per_rank)
    assert all(len(b) <= batch for batches in per_rank for b in batches)
    assert sorted(i for batches in per_rank for b in batches for i in b) == list(range(num_items))


def test_data_rows_come_from_the_stage_registry(monkeypatch):
    """A new stage is one class and one registry line: the data package reads what its rows are from it."""
    from longtune.data.example import stage_rows, stages_of
    from longtune.stages import STAGES
    from longtune.stages.lm import LMStage

    class PairwiseSFT(LMStage):
        name = "pairwise_sft"
        rows = "pairs"

    assert stage_rows() == {name: (cls.rows, cls.pretraining) for name, cls in STAGES.items()}
    assert stage_rows()["pt"] == ("lm", True) and stage_rows()["kto"] == ("kto", False)
    monkeypatch.setitem(STAGES, "pairwise_sft", PairwiseSFT)
    assert stage_rows()["pairwise_sft"] == ("pairs", False)
    assert stages_of("pairs") == ["dpo", "rm", "pairwise_sft"]
