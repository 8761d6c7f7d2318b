import json
import math

import pytest
import torch

from san_fast.metrics import UnsupervisedMetrics, cluster_usage


def pairs_from_confusion(confusion):
    """pred / target tensors whose (cluster x class) confusion matrix is ``confusion``."""
    pred, target = [], []
    for cluster, row in enumerate(confusion):
        for cls, count in enumerate(row):
            pred += [cluster] * count
            target += [cls] * count
    return torch.tensor(pred), torch.tensor(target)


def test_permuted_perfect_prediction():
    target = torch.randint(0, 4, (2, 16, 16), generator=torch.Generator().manual_seed(0))
    perm = torch.tensor([2, 0, 3, 1])
    m = UnsupervisedMetrics(4, 4)
    m.update(perm[target], target)
    out = m.compute()
    assert out["acc"] == 1.0 and out["miou"] == 1.0
    assert out["iou"] == [1.0] * 4
    # cluster perm[c] must be mapped back to class c
    assert [out["assignment"][int(perm[c])] for c in range(4)] == [0, 1, 2, 3]
    assert out["num_pixels"] == 512 and out["clusters_used"] == 4
    json.dumps(out)


def test_hand_worked_3x3():
    # rows clusters, columns classes. The best matching is c0->1, c1->0, c2->2 (15 of 20 pixels).
    confusion = [[0, 5, 1], [4, 0, 2], [1, 1, 6]]
    m = UnsupervisedMetrics(3, 3)
    m.update(*pairs_from_confusion(confusion))
    out = m.compute()
    assert out["assignment"] == [1, 0, 2]
    assert out["acc"] == pytest.approx(15 / 20)
    # matched rows (predicted class): class0 <- cluster1, class1 <- cluster0, class2 <- cluster2
    assert out["confusion"] == [[4, 0, 2], [0, 5, 1], [1, 1, 6]]
    # class 0: tp 4, predicted 6, true 5 -> 4/7; class 1: 5/(6+6-5); class 2: 6/(8+9-6)
    assert out["iou"] == pytest.approx([4 / 7, 5 / 7, 6 / 11])
    assert out["miou"] == pytest.approx((4 / 7 + 5 / 7 + 6 / 11) / 3)


def test_class_missing_everywhere_is_none_and_left_out_of_miou():
    # class 2 never appears in the target and no cluster ends up mapped to it
    m = UnsupervisedMetrics(2, 3)
    m.update(*pairs_from_confusion([[3, 1, 0], [0, 4, 0]]))
    out = m.compute()
    assert out["assignment"] == [0, 1]
    assert out["iou"][2] is None
    assert out["iou"][:2] == pytest.approx([3 / 4, 4 / 5])
    assert out["miou"] == pytest.approx((3 / 4 + 4 / 5) / 2)
    json.dumps(out)


def test_class_predicted_but_absent_from_target_counts_with_zero_iou():
    # cluster 2 is matched to class 2, which has no ground-truth pixel: IoU 0, in the mean
    m = UnsupervisedMetrics(3, 3)
    m.update(*pairs_from_confusion([[5, 0, 0], [0, 5, 0], [1, 1, 0]]))
    out = m.compute()
    assert out["assignment"] == [0, 1, 2]
    assert out["iou"] == pytest.approx([5 / 6, 5 / 6, 0.0])
    assert out["miou"] == pytest.approx((5 / 6 + 5 / 6) / 3)


def test_ignored_pixels_are_skipped():
    target = torch.tensor([[0, 1, 255], [255, 1, 0]])
    pred = torch.tensor([[1, 0, 0], [1, 0, 1]])
    m = UnsupervisedMetrics(2, 2)
    m.update(pred, target)
    out = m.compute()
    assert out["num_pixels"] == 4
    assert out["acc"] == 1.0
    assert out["assignment"] == [1, 0]


def test_custom_ignore_index():
    m = UnsupervisedMetrics(2, 2, ignore_index=-1)
    m.update(torch.tensor([0, 1, 1]), torch.tensor([0, 1, -1]))
    assert m.compute()["num_pixels"] == 2


def test_more_clusters_than_classes_maps_extras_to_majority():
    # 4 clusters, 2 classes: Hungarian matches c0->0 and c1->1; c2, c3 go to their majority class
    confusion = [[6, 1], [0, 5], [2, 3], [4, 0]]
    m = UnsupervisedMetrics(4, 2)
    m.update(*pairs_from_confusion(confusion))
    out = m.compute()
    assert out["assignment"] == [0, 1, 1, 0]
    assert out["confusion"] == [[10, 1], [2, 8]]
    assert out["acc"] == pytest.approx(18 / 21)
    assert out["iou"] == pytest.approx([10 / 13, 8 / 11])
    assert out["clusters_used"] == 4


def test_fewer_clusters_than_classes():
    m = UnsupervisedMetrics(2, 3)
    m.update(*pairs_from_confusion([[4, 1, 3], [0, 5, 2]]))
    out = m.compute()
    assert out["assignment"] == [0, 1]
    assert out["acc"] == pytest.approx(9 / 15)
    assert out["iou"][2] == 0.0  # present in the target, never predicted


def test_clusters_used_reports_collapse():
    m = UnsupervisedMetrics(5, 3)
    m.update(torch.full((4, 4), 3), torch.randint(0, 3, (4, 4)))
    assert m.compute()["clusters_used"] == 1
    assert cluster_usage(torch.tensor([[0, 4], [4, 2]]), 5) == 3


def test_accumulation_equals_one_big_update():
    g = torch.Generator().manual_seed(1)
    pred = torch.randint(0, 5, (6, 8, 8), generator=g)
    target = torch.randint(0, 4, (6, 8, 8), generator=g)
    target[target == 3] = 255
    whole = UnsupervisedMetrics(5, 4)
    whole.update(pred, target)
    parts = UnsupervisedMetrics(5, 4)
    for i in range(0, 6, 2):
        parts.update(pred[i:i + 2], target[i:i + 2])
    assert torch.equal(whole.confusion, parts.confusion)
    assert whole.compute() == parts.compute()


def test_reset():
    m = UnsupervisedMetrics(2, 2)
    m.update(torch.tensor([0, 1]), torch.tensor([1, 1]))
    m.reset()
    m.update(torch.tensor([0, 1]), torch.tensor([0, 1]))
    assert m.compute()["num_pixels"] == 2 and m.compute()["acc"] == 1.0


def test_confusion_is_int64_on_input_device():
    m = UnsupervisedMetrics(3, 3)
    m.update(torch.tensor([0, 1, 2], dtype=torch.int32), torch.tensor([0, 1, 2], dtype=torch.uint8))
    assert m.confusion.dtype == torch.int64 and m.confusion.shape == (3, 3)
    assert m.confusion.device == torch.device("cpu")


@pytest.mark.parametrize(
    "pred, target, message",
    [
        (torch.zeros(2, 3, dtype=torch.long), torch.zeros(3, 2, dtype=torch.long), "same shape"),
        (torch.tensor([0, 3]), torch.tensor([0, 1]), r"pred .*\[0, 3\).*\[3\]"),
        (torch.tensor([0, -1]), torch.tensor([0, 1]), r"pred .*\[-1\]"),
        (torch.tensor([0, 1]), torch.tensor([0, 4]), r"target .*\[4\]"),
        (torch.tensor([0, 1]), torch.tensor([0, -2]), r"target .*\[-2\]"),
        (torch.tensor([0.0, 1.0]), torch.tensor([0, 1]), "integer"),
    ],
)
def test_errors(pred, target, message):
    m = UnsupervisedMetrics(3, 3)
    with pytest.raises(ValueError, match=message):
        m.update(pred, target)


def test_compute_without_pixels_raises():
    m = UnsupervisedMetrics(2, 2)
    with pytest.raises(ValueError, match="no labelled pixel"):
        m.compute()
    m.update(torch.tensor([0, 1]), torch.tensor([255, 255]))
    with pytest.raises(ValueError, match="no labelled pixel"):
        m.compute()


def test_constructor_errors():
    with pytest.raises(ValueError, match="collides"):
        UnsupervisedMetrics(3, 3, ignore_index=1)
    with pytest.raises(ValueError, match="num_clusters"):
        UnsupervisedMetrics(0, 3)


def test_cluster_usage_range_error():
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        cluster_usage(torch.tensor([0, 2]), 2)


def test_values_are_finite_floats():
    m = UnsupervisedMetrics(3, 3)
    m.update(torch.tensor([0, 1, 2, 2]), torch.tensor([0, 1, 2, 1]))
    out = m.compute()
    assert all(math.isfinite(v) for v in [out["acc"], out["miou"]])
