"""A label's uncertainty is said in the units of its value, and the report claims nothing it did not measure.

The spread is taken over the preprocessing ensemble of the prompt-ensemble value: the prompt sets each sit at
their own level for every image, so their disagreement is a property of the templates, not of the image.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from cxrmodel.labels import calibration as cal
from cxrmodel.labels.prompts import LabelConfig
from cxrmodel.labels.zeroshot import LabelScore, apply_calibration, combine, label_image
from cxrmodel.reporting.report import compose_report, sections
from tests.imagegen import gray_image

VARIANTS = {"original": 0.60, "equalized": 0.90, "clahe": 0.20, "contrast": 0.62}
WEIGHTS = dict.fromkeys(VARIANTS, 1.0)
COMPRESSING = [0.0, 1.0], [0.10, 0.20]  # raw scores 0..1 are probabilities 0.10..0.20


def _calibration(assessed: bool = True, knots=COMPRESSING) -> cal.Calibration:
    effusion = cal.PathologyCalibration("Effusion", 50, 200, 0.8, 0.7, 0.9, assessed, "measured", threshold=0.15,
                                        sensitivity=0.7, specificity=0.8, knots_x=knots[0], knots_y=knots[1])
    return cal.Calibration("m", "m", {}, cal.SkillRule(), {"Effusion": effusion})


def _raw_score() -> LabelScore:
    values = np.array(list(VARIANTS.values()))
    _, spread = combine(values, np.ones(len(values)))
    return LabelScore("Effusion", 0.60, float(spread), 0.5, raw=0.60, variants=dict(VARIANTS),
                      variant_weights=dict(WEIGHTS))


def test_an_assessed_label_states_its_spread_in_probability_units():
    """Every variant's raw value goes through the calibration before the spread is taken: a map that
    squeezes raw 0..1 into probabilities 0.10..0.20 squeezes the spread with it. Before, the raw spread
    (0.5 here) was printed beside the probability as "0.16 +/- 0.50"."""
    raw = _raw_score()
    assert raw.uncertainty > 0.4
    (score,) = apply_calibration([raw], _calibration())
    mapped = 0.10 + 0.10 * np.array(list(VARIANTS.values()))
    assert score.assessed and score.probability == pytest.approx(0.16)
    assert score.uncertainty == pytest.approx(float(combine(mapped, np.ones(4))[1]))
    assert score.uncertainty < 0.1
    assert score.spread_range == pytest.approx((0.12, 0.19))
    assert score.to_dict()["range"] == [0.12, 0.19]
    assert score.raw == 0.60 and score.variants == VARIANTS  # raw values stay raw: reading again gives the same
    assert apply_calibration([score], _calibration())[0].uncertainty == pytest.approx(score.uncertainty)


def test_an_unassessed_label_keeps_its_spread_in_raw_units():
    (score,) = apply_calibration([_raw_score()], _calibration(assessed=False))
    assert not score.assessed and score.probability == 0.60
    assert score.uncertainty == pytest.approx(_raw_score().uncertainty)
    assert score.spread_range == pytest.approx((0.20, 0.90))


def test_a_label_without_variants_maps_its_band():
    bare = LabelScore("Effusion", 0.60, 0.40, 0.5, raw=0.60)
    (score,) = apply_calibration([bare], _calibration())
    assert score.spread_range == pytest.approx((0.14, 0.18))  # raw 0.40..0.80 through the map
    assert score.uncertainty == pytest.approx(0.04)


def test_prompt_set_levels_are_not_counted_as_uncertainty(tiny_encoder):
    """With the original view only, there is nothing to spread over, however much the prompt sets disagree;
    with the four views, the spread is that of the prompt-ensemble value over them."""
    image = gray_image(3, (64, 64))
    only_original = replace(LabelConfig(), variants={"original": 1.0, "equalized": 0.0, "clahe": 0.0,
                                                     "contrast": 0.0})
    scores = label_image(tiny_encoder, image, only_original)
    assert any(np.ptp(list(s.members.values())) > 0.01 for s in scores)  # the prompt sets do disagree
    assert all(s.uncertainty == 0.0 and s.spread_range == (s.probability, s.probability) for s in scores)
    config = LabelConfig()
    for s in label_image(tiny_encoder, image, config):
        names = list(s.variants)
        expected = combine(np.array([s.variants[v] for v in names]), np.array([config.variants[v] for v in names]))[1]
        assert s.uncertainty == pytest.approx(float(expected), abs=1e-6)
        assert s.variants["original"] == s.probability == s.raw
        assert s.spread_range == (min(s.variants.values()), max(s.variants.values()))


def _assessed(probability: float, low: float, high: float) -> LabelScore:
    return LabelScore("Effusion", probability, high - low, 0.48, assessed=True, raw=probability,
                      skill={"auroc": 0.8, "sensitivity": 0.7, "specificity": 0.8, "threshold": 0.48},
                      low_high=(low, high))


@pytest.mark.parametrize("lang", ["en", "de"])
def test_the_report_says_what_the_spread_is_and_which_decisions_it_changes(lang):
    """No "overall confidence high/low" from cut-offs nobody measured. A finding is borderline when its
    decision changes between preprocessings (the threshold inside their range), not whenever it lies
    within a fixed 0.05 of the threshold."""
    meta = {"modality": "CR", "body_part": "chest", "view": "PA"}
    steady = compose_report([_assessed(0.50, 0.49, 0.52)], meta, LabelConfig(), lang=lang)
    flips = compose_report([_assessed(0.50, 0.40, 0.52)], meta, LabelConfig(), lang=lang)
    borderline = "Borderline" if lang == "en" else "Grenzwertig"
    assert borderline not in steady.confidence and borderline in flips.confidence
    for report in (steady, flips):
        assert "Overall confidence" not in report.confidence and "Gesamtsicherheit" not in report.confidence
        assert ("not a measured error bar" if lang == "en" else "keine gemessene Fehlergrenze") in report.confidence
    lines = [line for _, part in sections(flips) for line in part]
    assert any("0.40-0.52" in line for line in lines) and not any("+/-" in line for line in lines)
    (finding,) = [f for items in flips.findings.values() for f in items]
    assert (finding.low, finding.high) == (0.40, 0.52)
    # follow-up advice for a finding flagged at a measured, imperfect operating point is conditional on review
    (advice,) = flips.recommendations
    assert ("if a radiologist confirms it:" if lang == "en" else "falls radiologisch bestätigt:") in advice
