import csv
import json
import warnings

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support, top_k_accuracy_score

from resforge.evaluation.metrics import classification_report, most_confident_mistakes, topk_correct

CLASSES = ["cat", "dog", "bird", "fish", "frog", "never_predicted", "never_seen"]


@pytest.fixture
def data():
    """Random scores and labels where class 5 is never predicted and class 6 never occurs."""
    rng = np.random.default_rng(0)
    n, c = 300, len(CLASSES)
    targets = rng.integers(0, c - 1, n)
    probs = rng.random((n, c))
    probs[np.arange(n), targets] += 0.3  # better than chance
    best_other = np.delete(probs, 5, axis=1).max(1)
    probs[:, 5] = best_other * np.where(np.arange(n) % 3 == 0, 0.99, 0.2)  # often second, never first
    probs /= probs.sum(1, keepdims=True)
    pred = probs.argmax(1)
    assert 5 not in pred and 6 not in targets and 6 in pred and 5 in targets
    return probs, targets


def test_report_matches_sklearn(data):
    probs, targets = data
    labels = list(range(len(CLASSES)))
    pred = probs.argmax(1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no division warnings for the undefined classes
        r = classification_report(probs, targets, CLASSES)
    np.testing.assert_array_equal(r.confusion, confusion_matrix(targets, pred, labels=labels))
    assert r.confusion.dtype == np.int64
    p, rec, f, s = precision_recall_fscore_support(targets, pred, labels=labels, zero_division=0)
    np.testing.assert_allclose(r.precision, p)
    np.testing.assert_allclose(r.recall, rec)
    np.testing.assert_allclose(r.f1, f)
    np.testing.assert_array_equal(r.support, s)
    assert r.precision[5] == r.recall[6] == r.f1[5] == r.f1[6] == 0
    for average, got in (("macro", r.macro), ("weighted", r.weighted)):
        ref = precision_recall_fscore_support(targets, pred, labels=labels, average=average, zero_division=0)
        assert got == pytest.approx(dict(zip(("precision", "recall", "f1"), ref[:3])))
    assert r.top1 == pytest.approx(accuracy_score(targets, pred))
    assert r.top5 == pytest.approx(top_k_accuracy_score(targets, probs, k=5, labels=labels))
    assert r.top1 < r.top5 < 1
    assert r.num_samples == len(targets)


def test_topk_clipped_to_class_count_and_order_only():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(50, 3))
    targets = rng.integers(0, 3, 50)
    r = classification_report(logits, targets, ["a", "b", "c"])
    assert r.top5 == 1.0  # k = min(5, 3)
    shifted = classification_report(logits * 2 + 7, targets, ["a", "b", "c"])  # logits or probabilities alike
    assert shifted.top1 == r.top1 == pytest.approx(accuracy_score(targets, logits.argmax(1)))
    assert "top-3: 100.00%" in r.to_markdown()


def test_topk_correct_by_hand():
    logits = torch.tensor([[0.1, 0.5, 0.2, 0.9, 0.0, 0.3],
                           [0.9, 0.1, 0.2, 0.3, 0.4, 0.5],
                           [0.0, 0.1, 0.2, 0.3, 0.4, 0.5],
                           [0.6, 0.5, 0.4, 0.3, 0.2, 0.1]])
    targets = torch.tensor([3, 4, 1, 5])  # ranks 0, 2, 4, 5
    assert topk_correct(logits, targets, (1, 2, 3, 5, 6)) == {1: 1, 2: 1, 3: 2, 5: 3, 6: 4}
    assert topk_correct(logits, targets, (1, 10)) == {1: 1, 10: 4}  # k clipped to the 6 classes
    soft = torch.nn.functional.one_hot(targets, 6).float() * 0.7 + 0.05  # mixup-style soft labels
    assert topk_correct(logits, soft) == topk_correct(logits, targets) == {1: 1, 5: 3}


def test_ties_do_not_count_as_right():
    """A collapsed model scoring every class the same is right only where argmax is (class 0)."""
    logits = torch.zeros(4, 5)
    targets = torch.tensor([0, 1, 2, 4])
    assert topk_correct(logits, targets, (1, 2)) == {1: 1, 2: 2}
    r = classification_report(logits.numpy(), targets.numpy(), list("abcde"))
    assert r.top1 == 0.25 and r.top5 == 1.0


def test_most_confident_mistakes():
    probs = np.array([[0.9, 0.1],    # right
                      [0.3, 0.7],    # wrong, 0.7
                      [0.95, 0.05],  # wrong, 0.95
                      [0.4, 0.6],    # wrong, 0.6
                      [0.2, 0.8]])   # right
    targets = np.array([0, 0, 1, 0, 1])
    np.testing.assert_array_equal(most_confident_mistakes(probs, targets, 2), [2, 1])
    np.testing.assert_array_equal(most_confident_mistakes(probs, targets, 10), [2, 1, 3])
    assert len(most_confident_mistakes(probs, probs.argmax(1), 5)) == 0


def test_confusion_csv_round_trip(data, tmp_path):
    r = classification_report(*data, CLASSES)
    path = tmp_path / "out" / "confusion.csv"
    r.write_confusion_csv(path)
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["true\\pred", *CLASSES]
    assert [row[0] for row in rows[1:]] == CLASSES
    np.testing.assert_array_equal(np.array([row[1:] for row in rows[1:]], dtype=int), r.confusion)
    assert [p.name for p in path.parent.iterdir()] == ["confusion.csv"]


def test_to_dict_and_markdown(data):
    r = classification_report(*data, CLASSES)
    d = json.loads(json.dumps(r.to_dict()))
    assert d["num_samples"] == 300 and d["top1"] == r.top1
    assert list(d["per_class"]) == CLASSES
    assert d["per_class"]["dog"] == {"precision": r.precision[1], "recall": r.recall[1], "f1": r.f1[1],
                                     "support": int(r.support[1])}
    assert d["macro"] == r.macro and d["confusion"] == r.confusion.tolist()
    md = r.to_markdown().splitlines()
    assert md[0].startswith("| class | precision | recall | F1 | support |")
    assert md[2] == f"| cat | {r.precision[0]:.3f} | {r.recall[0]:.3f} | {r.f1[0]:.3f} | {r.support[0]} |"
    assert md[2 + len(CLASSES)].startswith("| **macro avg** |") and md[3 + len(CLASSES)].startswith("| **weighted")
    assert f"top-1: {r.top1:.2%}" in md[-2] and md[-1] == f"top-5: {r.top5:.2%}"


@pytest.mark.parametrize("probs, targets, match", [
    (np.zeros((4, 3)), np.zeros(4, int), r"\[N, 2\]"),
    (np.zeros(4), np.zeros(4, int), "shape"),
    (np.zeros((4, 2)), np.zeros(3, int), r"targets must have shape \[4\]"),
    (np.zeros((4, 2)), np.array([0, 1, 2, 0]), r"\[0, 1\]"),
    (np.zeros((4, 2)), np.array([0, -1, 1, 0]), r"\[0, 1\]"),
    (np.zeros((4, 2)), np.zeros(4), "integer"),
    (np.zeros((0, 2)), np.zeros(0, int), "no samples"),
    (np.full((2, 2), np.nan), np.zeros(2, int), "NaN"),
])
def test_bad_input_raises(probs, targets, match):
    with pytest.raises(ValueError, match=match):
        classification_report(probs, targets, ["a", "b"])


def test_bad_input_raises_elsewhere():
    with pytest.raises(ValueError, match="unique"):
        classification_report(np.zeros((2, 2)), np.zeros(2, int), ["a", "a"])
    with pytest.raises(ValueError, match="targets"):
        most_confident_mistakes(np.zeros((3, 2)), np.zeros(2, int), 1)
    with pytest.raises(ValueError, match="expected logits"):
        topk_correct(torch.zeros(3, 2), torch.zeros(4, dtype=torch.long))
