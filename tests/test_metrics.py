"""NLU metrics, each checked against values worked out by hand (arithmetic in the comments)."""

from __future__ import annotations

import math

import pytest
import torch

from deltatune.train.metrics import (
    accuracy,
    is_bio,
    macro_f1,
    matthews_corrcoef,
    multilabel_scores,
    pearson,
    span_f1,
    spearman,
    task_metrics,
    token_accuracy,
)

# sklearn's f1_score docstring example
DOC_TRUE = [0, 1, 2, 0, 1, 2]
DOC_PRED = [0, 2, 1, 0, 0, 1]


def test_accuracy_counts_equal_pairs_and_takes_tensors():
    assert accuracy([1, 2, 3, 4], [1, 2, 0, 4]) == 3 / 4
    assert accuracy(torch.tensor([1, 2, 3, 4]), torch.tensor([1, 2, 0, 4])) == 3 / 4


def test_macro_f1_of_sklearn_example():
    # class 0: TP 2 (items 0, 3), FP 1 (item 4), FN 0 -> F1 = 2·2 / (2·2 + 1 + 0) = 4/5
    # classes 1 and 2: predicted only where the other is true -> TP 0 -> F1 0
    # macro = (4/5 + 0 + 0) / 3 = 4/15 = 0.2666...
    assert macro_f1(DOC_PRED, DOC_TRUE) == pytest.approx(4 / 15)


def test_macro_f1_counts_a_never_predicted_class_as_zero():
    true = [0, 0, 1, 1, 2, 2]
    pred = [0, 0, 1, 1, 1, 0]
    # class 0: TP 2, FP 1 (item 5), FN 0 -> 4/5; class 1: TP 2, FP 1 (item 4), FN 0 -> 4/5
    # class 2: never predicted, TP 0, FN 2 -> 0; macro = (4/5 + 4/5 + 0) / 3 = 8/15
    assert macro_f1(pred, true) == pytest.approx(8 / 15)
    # explicit labels: only 0 and 1 -> (4/5 + 4/5) / 2; adding an unseen class 3 adds an F1 of 0
    assert macro_f1(pred, true, labels=[0, 1]) == pytest.approx(4 / 5)
    assert macro_f1(pred, true, labels=[0, 1, 2, 3]) == pytest.approx(1.6 / 4)


def test_mcc_three_classes():
    true = [0, 0, 1, 1, 2, 2]
    pred = [0, 0, 1, 1, 1, 0]
    # c = 4 correct, s = 6; predicted counts p = (3, 3, 0), true counts t = (2, 2, 2)
    # numerator = 4·6 − (3·2 + 3·2 + 0·2) = 24 − 12 = 12
    # denominator = sqrt((36 − (9 + 9 + 0)) · (36 − (4 + 4 + 4))) = sqrt(18 · 24) = sqrt(432) = 12·sqrt(3)
    assert matthews_corrcoef(pred, true) == pytest.approx(1 / math.sqrt(3))


def test_mcc_of_sklearn_f1_example_is_zero():
    # c = 2 (items 0, 3), s = 6, p = (3, 2, 1), t = (2, 2, 2)
    # numerator = 2·6 − (3·2 + 2·2 + 1·2) = 12 − 12 = 0
    assert matthews_corrcoef(DOC_PRED, DOC_TRUE) == pytest.approx(0.0)


def test_binary_mcc_equals_phi_of_the_2x2_table():
    true = [1, 1, 1, 1, 1, 0, 0, 0]
    pred = [1, 1, 1, 0, 0, 1, 0, 0]
    tp, fn, fp, tn = 3, 2, 1, 2  # read off the pairs above
    phi = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    # = (6 − 2) / sqrt(4 · 5 · 3 · 4) = 4 / sqrt(240)
    assert phi == pytest.approx(4 / math.sqrt(240))
    assert matthews_corrcoef(pred, true) == pytest.approx(phi)
    # sklearn's matthews_corrcoef docstring example: TP 2, FN 1, FP 1, TN 0 -> (0 − 1) / sqrt(3·3·1·1) = −1/3
    assert matthews_corrcoef([1, -1, 1, 1], [1, 1, 1, -1]) == pytest.approx(-1 / 3)


def test_mcc_is_zero_when_one_side_is_a_single_class():
    # every prediction is 1: s² − Σ p_k² = 16 − 16 = 0
    assert matthews_corrcoef([1, 1, 1, 1], [0, 1, 0, 1]) == 0.0


def test_pearson_of_linear_pairs_and_a_hand_example():
    x = [1, 2, 3, 4]
    assert pearson(x, [2 * v + 1 for v in x]) == pytest.approx(1.0)
    assert pearson(x, [-3 * v + 7 for v in x]) == pytest.approx(-1.0)
    # x = (1, 2, 3), y = (1, 3, 2): deviations (−1, 0, 1) and (−1, 1, 0)
    # Σ dx·dy = 1, Σ dx² = 2, Σ dy² = 2 -> r = 1 / sqrt(2·2) = 1/2
    assert pearson([1, 2, 3], [1, 3, 2]) == pytest.approx(0.5)


def test_zero_variance_gives_zero_not_nan():
    assert pearson([1, 2, 3], [5, 5, 5]) == 0.0
    assert pearson([0.1, 0.1, 0.1], [1, 2, 3]) == 0.0  # a mean that rounds must not leak through
    assert spearman([4, 4, 4], [1, 2, 3]) == 0.0
    assert pearson([2.0], [3.0]) == 0.0


def test_spearman_with_ties_is_pearson_of_average_ranks():
    x = [10, 20, 20, 30, 40]
    y = [1, 3, 2, 2, 5]
    # x: 20 and 20 share positions 2 and 3 -> rank 2.5 each; y: 2 and 2 share positions 2 and 3
    x_ranks = [1, 2.5, 2.5, 4, 5]
    y_ranks = [1, 4, 2.5, 2.5, 5]
    assert spearman(x, y) == pytest.approx(pearson(x_ranks, y_ranks))
    # both rank means are 3: dx = (−2, −.5, −.5, 1, 2), dy = (−2, 1, −.5, −.5, 2)
    # Σ dx·dy = 4 − .5 + .25 − .5 + 4 = 7.25; Σ dx² = Σ dy² = 9.5 -> ρ = 7.25 / 9.5 = 29/38
    assert spearman(x, y) == pytest.approx(29 / 38)


ML_TRUE = [[1, 0, 1], [0, 1, 0], [1, 1, 0]]
ML_PRED = [[1, 0, 0], [0, 1, 0], [1, 0, 1]]


def test_multilabel_scores_on_a_3x3_example():
    # label 0: true (1,0,1), pred (1,0,1) -> TP 2, FP 0, FN 0 -> F1 1
    # label 1: true (0,1,1), pred (0,1,0) -> TP 1, FP 0, FN 1 -> 2/3
    # label 2: true (1,0,0), pred (0,0,1) -> TP 0, FP 1, FN 1 -> 0
    # micro: TP 3, FP 1, FN 2 -> 6 / (6 + 1 + 2) = 2/3; macro: (1 + 2/3 + 0) / 3 = 5/9
    # subset: only row 1 matches exactly -> 1/3
    expected = {"micro_f1": 2 / 3, "macro_f1": 5 / 9, "subset_accuracy": 1 / 3}
    assert multilabel_scores(ML_PRED, ML_TRUE) == pytest.approx(expected)
    assert multilabel_scores(torch.tensor(ML_PRED), torch.tensor(ML_TRUE)) == pytest.approx(expected)


def test_multilabel_label_never_seen_counts_as_zero_in_macro():
    pred = [row + [0] for row in ML_PRED]
    true = [row + [0] for row in ML_TRUE]
    # the extra empty label adds F1 0: macro = (1 + 2/3 + 0 + 0) / 4 = 5/12; micro counts are unchanged
    scores = multilabel_scores(pred, true)
    assert scores["macro_f1"] == pytest.approx(5 / 12)
    assert scores["micro_f1"] == pytest.approx(2 / 3)


def test_multilabel_rejects_bad_matrices():
    with pytest.raises(ValueError, match=r"\(3, 3\).*\(2, 3\)"):
        multilabel_scores(ML_PRED, ML_TRUE[:2])
    with pytest.raises(ValueError, match="only 0 and 1"):
        multilabel_scores([[2, 0]], [[1, 0]])
    with pytest.raises(ValueError, match="2-D"):
        multilabel_scores([1, 0], [1, 0])


# true spans: PER(0,2), LOC(3,4), ORG(5,8)
# pred spans: PER(0,2) correct, ORG(3,4) wrong type, ORG(5,7) ends early -> wrong
TAGS_TRUE = ["B-PER", "I-PER", "O", "B-LOC", "O", "B-ORG", "I-ORG", "I-ORG"]
TAGS_PRED = ["B-PER", "I-PER", "O", "B-ORG", "O", "B-ORG", "I-ORG", "O"]


def test_span_f1_counts_wrong_type_and_partial_spans_as_wrong():
    # 1 correct of 3 predicted and 3 true -> P = R = 1/3, F1 = 1/3
    scores = span_f1([TAGS_PRED], [TAGS_TRUE])
    assert scores == pytest.approx({"precision": 1 / 3, "recall": 1 / 3, "f1": 1 / 3})


def test_span_f1_i_tag_after_o_or_another_type_starts_a_span():
    # I-MISC after O starts MISC(1,3), the same span B-MISC I-MISC gives
    assert span_f1([["O", "B-MISC", "I-MISC", "O"]], [["O", "I-MISC", "I-MISC", "O"]])["f1"] == 1.0
    # I-LOC after B-PER closes PER(0,1) and starts LOC(1,2)
    assert span_f1([["B-PER", "I-LOC"]], [["B-PER", "B-LOC"]])["f1"] == 1.0
    # both sentences together: 1 + 1 correct of 3 + 1 predicted and 3 + 1 true -> 2/4 each
    scores = span_f1([TAGS_PRED, ["O", "B-MISC", "I-MISC", "O"]], [TAGS_TRUE, ["O", "I-MISC", "I-MISC", "O"]])
    assert scores == pytest.approx({"precision": 0.5, "recall": 0.5, "f1": 0.5})


def test_span_f1_with_precision_and_recall_apart():
    # pred: PER(0,1), LOC(2,3); true: PER(0,1) -> P = 1/2, R = 1/1, F1 = 2·(1/2)·1 / (3/2) = 2/3
    scores = span_f1([["B-PER", "O", "B-LOC"]], [["B-PER", "O", "O"]])
    assert scores == pytest.approx({"precision": 0.5, "recall": 1.0, "f1": 2 / 3})


def test_span_f1_rejects_non_bio_tags_and_ragged_sentences():
    with pytest.raises(ValueError, match="'PER'"):
        span_f1([["PER", "O"]], [["O", "O"]])
    with pytest.raises(ValueError, match="'B-'"):
        span_f1([["O"]], [["B-"]])
    with pytest.raises(ValueError, match="sentence 0: 2 predicted tags for 1 true tags"):
        span_f1([["O", "O"]], [["O"]])


def test_token_accuracy_over_all_sentences():
    # sentence 1: items 3 and 7 differ (6 of 8 right); sentence 2: item 1 differs (3 of 4) -> 9/12
    pred = [TAGS_PRED, ["O", "B-MISC", "I-MISC", "O"]]
    true = [TAGS_TRUE, ["O", "I-MISC", "I-MISC", "O"]]
    assert token_accuracy(pred, true) == pytest.approx(9 / 12)


def test_is_bio():
    assert is_bio(["O", "B-PER", "I-PER"])
    assert not is_bio(["O", "PER"])
    assert not is_bio(["NOUN", "VERB"])


def test_task_metrics_classify():
    # accuracy: items 0 and 3 right -> 2/6; macro F1 and MCC as in the tests above
    scores = task_metrics("classify", DOC_PRED, DOC_TRUE)
    assert scores == pytest.approx({"accuracy": 1 / 3, "macro_f1": 4 / 15, "mcc": 0.0})


def test_task_metrics_multilabel():
    assert task_metrics("multilabel", ML_PRED, ML_TRUE) == multilabel_scores(ML_PRED, ML_TRUE)


def test_task_metrics_regression():
    # r = 1/2 (hand example above); ranks equal the values, so ρ = 1/2; mse = (0 + 1 + 1) / 3
    scores = task_metrics("regression", [1.0, 2.0, 3.0], [1.0, 3.0, 2.0])
    assert scores == pytest.approx({"pearson": 0.5, "spearman": 0.5, "mse": 2 / 3})


def test_task_metrics_tag_bio_reports_spans():
    scores = task_metrics("tag", [TAGS_PRED], [TAGS_TRUE])
    # tokens: 6 of 8 right; spans as in test_span_f1_counts_wrong_type_and_partial_spans_as_wrong
    expected = {"token_accuracy": 6 / 8, "span_precision": 1 / 3, "span_recall": 1 / 3, "span_f1": 1 / 3}
    assert scores == pytest.approx(expected)


def test_task_metrics_tag_non_bio_reports_token_macro_f1():
    # DET: TP 1 -> F1 1; NOUN: TP 0, FP 1 -> 0; VERB: TP 1, FN 1 -> 2/(2 + 1) = 2/3
    # macro = (1 + 0 + 2/3) / 3 = 5/9; token accuracy 2/3
    scores = task_metrics("tag", [["DET", "NOUN", "VERB"]], [["DET", "VERB", "VERB"]])
    assert scores == pytest.approx({"token_accuracy": 2 / 3, "macro_f1": 5 / 9})


def test_task_metrics_unknown_task_names_the_allowed_ones():
    with pytest.raises(ValueError, match="unknown task 'ner'.*classify, multilabel, regression, tag"):
        task_metrics("ner", [1], [1])


def test_length_mismatch_and_empty_inputs_are_errors():
    with pytest.raises(ValueError, match="2 predictions for 1 references"):
        accuracy([1, 2], [1])
    with pytest.raises(ValueError, match="3 x values for 2 y values"):
        pearson([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="2 predicted sentences for 1 true sentences"):
        task_metrics("tag", [["O"], ["O"]], [["O"]])
    with pytest.raises(ValueError, match="empty"):
        macro_f1([], [])
    with pytest.raises(ValueError, match="empty"):
        task_metrics("regression", [], [])
    with pytest.raises(ValueError, match="1-D"):
        accuracy(torch.zeros(2, 2), [0, 0])
