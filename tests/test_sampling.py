"""Class-balanced sampling (repeat factor sampling) for `radlens train --balance`."""

import math

import pytest
import torch

from cxrmodel.training.sampling import repeat_factors


def test_rare_labels_are_drawn_more_often_by_the_square_root_rule():
    labels = [("Effusion",)] * 8 + [("Hernia",), ("hernia", "Effusion"), (), ("No Finding",)]
    factors = repeat_factors(labels, threshold=0.5)
    # 10 labelled-with-findings rows + 1 "No Finding": Effusion on 9/11, Hernia on 2/11, No Finding on 1/11
    assert factors[:8] == [1.0] * 8
    assert factors[8] == pytest.approx(math.sqrt(0.5 / (2 / 11)))
    assert factors[9] == factors[8]  # a row takes its rarest label's factor, case-insensitively
    assert factors[10] == 1.0  # no labels: never up-weighted
    assert factors[11] == pytest.approx(math.sqrt(0.5 / (1 / 11)))


def test_threshold_zero_or_no_labels_leave_sampling_uniform():
    assert repeat_factors([("Mass",), ("Nodule",), ("Nodule",)], 0.0) == [1.0, 1.0, 1.0]
    assert repeat_factors([(), ()], 0.5) == [1.0, 1.0]


def test_a_balanced_loader_draws_the_rare_class_more_often(tmp_path):
    """What `radlens train --balance` hands the DataLoader: the rare class's share rises towards the
    square-root rule's, from 10% to about 25%."""
    labels = [("Mass",)] * 90 + [("Hernia",)] * 10
    sampler = torch.utils.data.WeightedRandomSampler(repeat_factors(labels, 0.9), 20000,
                                                     generator=torch.Generator().manual_seed(0))
    share = sum(labels[i] == ("Hernia",) for i in sampler) / 20000
    expected = 10 * 3 / (90 + 10 * 3)  # Hernia's factor sqrt(0.9 / 0.1) = 3
    assert share == pytest.approx(expected, abs=0.02) and share > 0.2
