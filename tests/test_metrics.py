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


# --- over-clustering modes and matchings fitted elsewhere ---------------------------------------

# 3 clusters, 2 classes. Hungarian: c0->1, c1->0 (10 pixels), c2 unmatched; majority: c0->0,
# c1->0, c2->1.
OVER = [[5, 4], [6, 1], [0, 2]]


def scored(confusion, mode, assignment=None):
    m = UnsupervisedMetrics(len(confusion), len(confusion[0]), overcluster=mode)
    m.update(*pairs_from_confusion(confusion))
    return m.compute(assignment)


def test_hungarian_majority_gives_unmatched_clusters_their_majority_class():
    out = scored(OVER, "hungarian-majority")
    assert out["assignment"] == [1, 0, 1]
    assert out["confusion"] == [[6, 1], [5, 6]]
    assert out["acc"] == pytest.approx(12 / 18)
    assert out["iou"] == pytest.approx([6 / (11 + 7 - 6), 6 / (7 + 11 - 6)])
    assert out["overcluster"] == "hungarian-majority"


def test_majority_maps_every_cluster_to_its_majority_class_as_iic():
    out = scored(OVER, "majority")
    assert out["assignment"] == [0, 0, 1]  # many to one: two clusters on class 0
    assert out["confusion"] == [[11, 5], [0, 2]]
    assert out["acc"] == pytest.approx(13 / 18)
    assert out["iou"] == pytest.approx([11 / (11 + 16 - 11), 2 / (7 + 2 - 2)])


def test_majority_ties_go_to_the_lowest_class_and_empty_clusters_to_class_0():
    out = scored([[2, 2, 1], [0, 0, 0], [0, 3, 3]], "majority")
    assert out["assignment"] == [0, 0, 1]


def test_strict_leaves_out_cluster_ids_beyond_the_class_count_as_stego():
    out = scored(OVER, "strict")
    # cluster 2 (id >= 2 classes) is masked out before matching: 16 pixels remain
    assert out["left_out"] == 2 and out["num_pixels"] == 16
    assert out["assignment"] == [1, 0, -1]
    assert out["acc"] == pytest.approx(10 / 16)
    assert out["iou"] == pytest.approx([6 / 12, 4 / 10])
    assert out["miou"] == pytest.approx(0.45)
    assert out["unmatched"] == [0, 0]
    json.dumps(out)


def test_strict_counts_pixels_of_unmatched_clusters_as_errors_with_an_extra_zero_iou():
    # cluster 1 mapped to no class: its 3 pixels of class 0 are errors, and STEGO's extra
    # "unmatched" row adds an IoU of 0 to the mean (class 1 has an empty union: left out)
    out = scored([[5, 0], [3, 0], [0, 0]], "strict", assignment=[0, -1, 1])
    assert out["acc"] == pytest.approx(5 / 8)
    assert out["unmatched"] == [3, 0]
    assert out["iou"][0] == pytest.approx(5 / 8) and out["iou"][1] is None
    assert out["miou"] == pytest.approx((5 / 8 + 0.0) / 2)


def stego_reference(stats, n_classes):
    """STEGO's UnsupervisedMetrics.compute (src/utils.py), step by step: Hungarian on the
    (clusters x classes) stats, histogram rows from the transposed matching, unmatched clusters
    summed into an extra row, an extra zero column, nan-mean of the IoUs."""
    from scipy.optimize import linear_sum_assignment

    stats = torch.as_tensor(stats, dtype=torch.float64)
    stats[n_classes:] = 0  # STEGO's update mask: preds >= n_classes never reach the stats
    rows, _ = linear_sum_assignment(stats.numpy(), maximize=True)
    _, cols_t = linear_sum_assignment(stats.t().numpy(), maximize=True)
    hist = stats[torch.as_tensor(cols_t)]
    missing = sorted(set(range(stats.shape[0])) - set(rows.tolist()))
    hist = torch.cat([hist, stats[missing].sum(0, keepdim=True)])
    hist = torch.cat([hist, torch.zeros(n_classes + 1, 1, dtype=hist.dtype)], 1)
    tp = torch.diag(hist)
    iou = tp / (hist.sum(0) + hist.sum(1) - tp)
    return float(tp.sum() / hist.sum()), float(iou[~torch.isnan(iou)].mean())


@pytest.mark.parametrize("clusters", [3, 5, 8])
def test_strict_agrees_with_stegos_computation(clusters):
    g = torch.Generator().manual_seed(clusters)
    for _ in range(5):
        confusion = torch.randint(0, 50, (clusters, 3), generator=g).tolist()
        out = scored(confusion, "strict")
        acc, miou = stego_reference(confusion, 3)
        assert out["acc"] == pytest.approx(acc) and out["miou"] == pytest.approx(miou)


@pytest.mark.parametrize("mode", ["hungarian-majority", "majority", "strict"])
def test_all_modes_agree_with_as_many_clusters_as_classes(mode):
    confusion = [[0, 5, 1], [4, 0, 2], [1, 1, 6]]
    out = scored(confusion, mode)
    assert out["assignment"] == [1, 0, 2]
    assert out["acc"] == pytest.approx(15 / 20)


def test_matching_fitted_on_one_set_scores_another():
    fit = UnsupervisedMetrics(3, 2)
    fit.update(*pairs_from_confusion(OVER))
    assignment = fit.fit_assignment()
    assert assignment == [1, 0, 1]
    test = UnsupervisedMetrics(3, 2)
    test.update(*pairs_from_confusion([[3, 1], [0, 4], [2, 2]]))
    held_out = test.compute(assignment=assignment)
    assert held_out["assignment"] == [1, 0, 1]
    assert held_out["acc"] == pytest.approx((1 + 0 + 2) / 12)
    # fitted on the scored set itself, the matching would be c0->0, c1->1, c2->0
    own = test.compute()
    assert own["assignment"] == [0, 1, 0] and own["acc"] == pytest.approx(9 / 12)


def test_assignment_errors():
    m = UnsupervisedMetrics(3, 2)
    m.update(*pairs_from_confusion(OVER))
    with pytest.raises(ValueError, match="one class per cluster"):
        m.compute(assignment=[0, 1])
    with pytest.raises(ValueError, match=r"class ids in \[0, 2\) or -1"):
        m.compute(assignment=[0, 1, 2])
    with pytest.raises(ValueError, match="overcluster='best'"):
        UnsupervisedMetrics(3, 2, overcluster="best")


def test_strict_with_every_pixel_left_out_is_an_error():
    m = UnsupervisedMetrics(3, 2, overcluster="strict")
    m.update(torch.tensor([2, 2]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="cluster id >= the class count"):
        m.compute()


def test_assignment_given_to_the_constructor_is_applied_by_compute():
    test = UnsupervisedMetrics(3, 2, assignment=[1, 0, 1])
    test.update(*pairs_from_confusion([[3, 1], [0, 4], [2, 2]]))
    assert test.compute()["acc"] == pytest.approx(3 / 12)
    assert test.compute(assignment=[0, 1, 0])["acc"] == pytest.approx(9 / 12)
    with pytest.raises(ValueError, match="one class per cluster"):
        UnsupervisedMetrics(3, 2, assignment=[0])
