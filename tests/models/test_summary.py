import pytest
import torch

import resforge
from resforge.models import summarize


def test_resnet50_at_224_matches_the_paper_count():
    with torch.device("meta"):
        m = resforge.create_model("resnet50")
    s = summarize(m, 224, "resnet50")
    assert s.params == 25_557_032
    assert s.macs == pytest.approx(4.09e9, rel=0.002)
    assert [r.name for r in s.stages] == ["stem", "layer1", "layer2", "layer3", "layer4", "head"]
    assert [r.output_shape for r in s.stages[1:5]] == [[256, 56, 56], [512, 28, 28], [1024, 14, 14], [2048, 7, 7]]
    assert sum(r.params for r in s.stages) == s.params
    assert "25,557,032" in s.table() and "4.09 GMACs" in s.table()


def test_counts_follow_the_model_not_a_table():
    full = summarize(resforge.create_model("resnet50", width=0.25), 64)
    assert summarize(resforge.create_model("resnet50", width=0.25), 128).macs == pytest.approx(4 * full.macs, rel=0.03)
    pruned = resforge.ResNet(**{**resforge.create_model("resnet50", width=0.25).spec(),
                                "inner_widths": [[[8, 8]] * n for n in (3, 4, 6, 3)]})
    assert summarize(pruned, 64).macs < full.macs


def test_meta_and_real_models_count_the_same_and_training_mode_is_kept():
    real = resforge.create_model("resnet18", width=0.5).train()
    with torch.device("meta"):
        meta = resforge.create_model("resnet18", width=0.5)
    a, b = summarize(real, 96), summarize(meta, 96)
    assert (a.params, a.macs) == (b.params, b.macs)
    assert real.training
    before = real.bn1.running_mean.clone()
    summarize(real, 96)
    assert torch.equal(before, real.bn1.running_mean)  # counting does not touch BN statistics
