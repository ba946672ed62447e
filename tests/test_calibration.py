"""Calibration: measured skill decides what is reported; numbers say whether they are probabilities."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cxrmodel.errors import DataError
from cxrmodel.labels import calibration as cal
from cxrmodel.labels.prompts import LabelConfig
from radlens.cli import main
from tests.imagegen import gray_image, shape_image
from tests.tinymodel import write_forced_calibration

PATHOLOGIES = list(LabelConfig().pathologies)


def _informative(n: int = 400, positives: int = 80, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.zeros(n, dtype=bool)
    labels[:positives] = True
    scores = np.clip(0.55 + 0.1 * rng.standard_normal(n) + 0.15 * labels, 0, 1)  # skilled, and too high
    return scores, labels


def test_a_skilled_score_is_assessed_and_its_calibration_helps():
    scores, labels = _informative()
    c = cal.calibrate_pathology("Effusion", scores, labels, cal.SkillRule(resamples=1000), tested=14)
    assert c.assessed and c.auroc > 0.8 and 0.5 < c.decision_low < c.auroc_low < c.auroc < c.auroc_high
    assert c.ece_calibrated < c.ece_raw / 3  # raw scores sit near 0.6 for a 20% base rate
    assert 0 < c.sensitivity <= 1 and 0 < c.specificity <= 1
    probs = c.probability(np.array([0.2, 0.5, 0.9]))
    assert list(probs) == sorted(probs) and probs[0] >= 0 and probs[-1] <= 1
    again = cal.calibrate_pathology("Effusion", scores, labels, cal.SkillRule(resamples=1000), tested=14)
    assert again == c  # seeded: the same numbers every run


@pytest.mark.parametrize("case", ["chance", "few positives"])
def test_no_skill_or_too_few_positives_is_not_assessed_and_says_why(case):
    rng = np.random.default_rng(1)
    if case == "chance":
        scores, labels = rng.random(400), rng.random(400) < 0.2
    else:
        scores, labels = _informative(400, positives=12)
    c = cal.calibrate_pathology("Mass", scores, labels, cal.SkillRule(resamples=1000), tested=14)
    assert not c.assessed
    assert ("not shown better than chance" in c.reason) if case == "chance" else ("fewer than the 20" in c.reason)


def test_fourteen_chance_pathologies_rarely_pass_the_family_wise_rule():
    """With the Bonferroni-widened interval, 14 pathologies at chance yield (almost) no assessed one;
    the plain 95% interval lets about one in 40 through each."""
    rng = np.random.default_rng(7)
    scores, labels = rng.random((500, 14)), rng.random((500, 14)) < 0.15
    strict = cal.calibrate(scores, labels, PATHOLOGIES, cal.SkillRule(resamples=500), model_identity="m",
                           model_name="m", dataset={})
    assert strict.assessed == []


def test_filters_and_thresholds_follow_the_calibrated_map():
    c = cal.PathologyCalibration("Effusion", 50, 50, 0.8, 0.7, 0.9, True, "x", threshold=0.4,
                                 knots_x=[0.2, 0.4, 0.6], knots_y=[0.0, 0.5, 1.0])
    assert c.raw_at_least(0.5) == pytest.approx(0.4) and c.raw_at_least(0.25) == pytest.approx(0.3)
    assert c.raw_at_least(0.0) == float("-inf") and c.raw_at_least(1.01) == float("inf")
    assert float(c.probability(c.raw_at_least(0.75))) == pytest.approx(0.75)


def test_a_calibration_of_another_model_is_refused(tmp_path, tiny_encoder, tiny_model_dir):
    from tests.tinymodel import save_tiny_clip

    path = write_forced_calibration(tiny_encoder, tmp_path / "calibration.json")
    assert cal.load(path, cal.model_identity(tiny_encoder)).assessed == PATHOLOGIES
    other = save_tiny_clip(tmp_path / "other", seed=1)
    from cxrmodel.model.encoder import EncoderConfig, load_encoder

    other_encoder = load_encoder(EncoderConfig(model=str(other), precision="fp32"))
    with pytest.raises(DataError, match="calibrates another model"):
        cal.for_encoder(other_encoder, path)
    (other / "calibration.json").write_bytes(path.read_bytes())  # beside the wrong model: ignored, not used
    assert cal.for_encoder(other_encoder) is None


def test_an_uncalibrated_model_reports_no_finding_and_calls_its_numbers_scores(tmp_path, tiny_encoder, indexed_dir):
    from search.engine import Engine, EngineConfig
    from web import ServeConfig, create_app

    engine = Engine.open(EngineConfig(data_dir=indexed_dir), encoder=tiny_encoder)
    image = gray_image(3, (96, 96))
    decision, scores = engine.assess(image, {"modality": "X-ray", "body_part": "chest", "view": "PA"})
    report = engine.report(image, {"modality": "X-ray", "body_part": "chest"}, 0.0, scores, decision)
    assert decision.applicable and scores and not any(s.assessed or s.positive for s in scores)
    assert all(s.to_dict()["kind"] == "score" and "probability" not in s.to_dict() for s in scores)
    assert report.findings == {} and report.recommendations == [] and not report.calibrated
    assert "uncalibrated" in report.impression[0] and "no pathology is reported as a finding" in report.impression[0]
    with pytest.raises(DataError, match="cannot filter on Effusion: this model does not assess it"):
        engine.parse_filters(["effusion>=0.5"])
    assert all(h.pathologies == {} for h in engine.text("x", k=5))  # no chips without a calibration
    client = create_app(ServeConfig(), engine=engine).test_client()
    some_id = engine.text("x", k=1)[0].id
    page = client.get(f"/image/{some_id}").get_data(as_text=True)
    api = client.get(f"/api/images/{some_id}").json
    engine.close()
    assert "suspected" not in page.lower() and "probability" not in json.dumps(api["scores"])
    if api["scores"]:
        assert "This model has no calibration" in page


def test_only_assessed_pathologies_become_findings_everywhere(tmp_path, tiny_encoder, indexed_dir):
    from cxrmodel.reporting.report import findings_csv, to_markdown
    from search.engine import Engine, EngineConfig

    path = write_forced_calibration(tiny_encoder, tmp_path / "calibration.json", assessed=("Effusion",))
    engine = Engine.open(EngineConfig(data_dir=indexed_dir, calibration=str(path)), encoder=tiny_encoder)
    image = shape_image("circle", "red")
    decision, scores = engine.assess(image, {"modality": "X-ray", "body_part": "chest", "view": "PA"})
    report = engine.report(image, {}, 0.0, scores, decision)  # threshold 0: every assessed one is a finding
    engine.parse_filters(["effusion>=0.2"])
    with pytest.raises(DataError, match="Mass: this model does not assess it .*does not exclude"):
        engine.parse_filters(["mass>=0.2"])
    engine.close()
    assert [s.pathology for s in scores if s.positive] == ["Effusion"]
    assert report.impression[0].startswith("Effusion") and len(report.impression) == 1
    assert {n["pathology"] for n in report.not_assessed} == set(PATHOLOGIES) - {"Effusion"}
    text = to_markdown(report)
    assert "## Not assessed by this model" in text and "Mass: AUROC 0.50" in text
    rows = findings_csv(scores, 0.0).splitlines()[1:]
    assert [r.split(",")[0] for r in rows if r.split(",")[5] == "1"] == ["Effusion"]


def test_radlens_calibrate_writes_the_file_the_table_and_the_diagram(tmp_path, tiny_model_dir, capsys):
    src = tmp_path / "src"
    src.mkdir()
    lines = ["path,labels"]
    for i in range(40):
        gray_image(i, (48, 48)).save(src / f"{i}.png")
        lines.append(f"src/{i}.png,{'Effusion|Mass' if i % 4 == 0 else 'No Finding'}")
    lines.append("src/missing.png,Effusion")
    (tmp_path / "m.csv").write_text("\n".join(lines) + "\n")
    out = tmp_path / "cal.json"
    assert main(["calibrate", str(tmp_path / "m.csv"), "--model", str(tiny_model_dir), "--precision", "fp32",
                 "--out", str(out), "--resamples", "200"]) == 0
    printed = capsys.readouterr().out
    saved = json.loads(out.read_text())
    assert saved["dataset"]["images"] == 40 and saved["dataset"]["unreadable"] == 1
    assert saved["pathologies"]["Effusion"]["positives"] == 10 and saved["pathologies"]["Effusion"]["negatives"] == 30
    assert saved["pathologies"]["Pneumonia"]["reason"].startswith("not measurable")
    assert not any(p["assessed"] for p in saved["pathologies"].values())  # 10 positives < 20
    assert "Effusion" in printed and "AUROC [95% CI]" in printed and "0 of 14 pathologies assessed" in printed
    assert (tmp_path / "cal.png").read_bytes().startswith(b"\x89PNG")
    (tmp_path / "bad.csv").write_text("path,labels\nsrc/0.png,Dragon pox\n")
    assert main(["calibrate", str(tmp_path / "bad.csv"), "--model", str(tiny_model_dir), "--out",
                 str(tmp_path / "x.json")]) == 1
    assert "unknown label 'dragon pox'" in capsys.readouterr().err


def test_the_bundled_model_ships_its_calibration_and_the_demo_report_says_what_it_shows():
    from cxrmodel.model.bundled import bundled_model_dir

    shipped = json.loads((bundled_model_dir() / "calibration.json").read_text())
    assert shipped["dataset"]["images"] >= 250 and len(shipped["pathologies"]) == 14  # bench.calibration_set: 297
    for name, c in shipped["pathologies"].items():
        assert c["assessed"] == (c["positives"] >= 20 and c["decision_low"] > 0.5), name
    assert [p for p, c in shipped["pathologies"].items() if c["assessed"]] == ["Effusion"]  # MODEL_CARD.md


def test_grid_page_json_and_filters_show_one_number_per_image_and_pathology(engine, client):
    """Over the whole test corpus: the grid chip, the API record, the page's bar and the filter agree."""
    hits = engine.text("x", k=200)
    checked = 0
    for hit in hits:
        if not hit.applicability or not hit.applicability["applicable"]:
            continue
        record = client.get(f"/api/images/{hit.id}").json
        _, scores, _, _ = engine.report_for_id(hit.id)
        page = client.get(f"/image/{hit.id}").get_data(as_text=True)
        for s in scores:
            grid = hit.pathologies[s.pathology]
            assert record["scores"][s.pathology]["probability"] == pytest.approx(grid, abs=1e-12)
            assert s.probability == pytest.approx(grid, abs=1e-12)
            assert f'data-pathology="{s.pathology}" data-probability="{grid:.4f}"' in page
        found = {h.image["content_hash"] for h in engine.text("x", k=200, filters=engine.parse_filters(
            [f"Effusion>={hit.pathologies['Effusion']:.6f}"]))}  # exact duplicates collapse to one hit
        assert hit.image["content_hash"] in found or hit.pathologies["Effusion"] < round(hit.pathologies["Effusion"], 6)
        checked += 1
    assert checked >= 10


@pytest.mark.parametrize("lang", ["en", "de"])
def test_a_model_decision_never_reads_as_a_confident_word(lang):
    from cxrmodel.labels.applicability import Decision
    from cxrmodel.reporting.report import compose_report

    decision = Decision(False, "model", 0.99, "looks like CT, not a chest radiograph", kind="CT")
    report = compose_report([], {}, LabelConfig(), decision=decision, lang=lang)
    assert "0.99" in report.impression[0] and ("uncalibrated" in report.impression[0]
                                               or "unkalibriert" in report.impression[0])
    assert "confidence 0.99" not in report.impression[0] and "Sicherheit 0.99" not in report.impression[0]
    assert decision.to_dict()["basis"] == "the model's zero-shot share 0.99 (uncalibrated)"


def test_the_chest_radiograph_check_is_measured_and_a_skilled_one_is_calibrated():
    rng = np.random.default_rng(3)
    chest = np.arange(300) < 200
    shares = np.clip(0.45 + 0.25 * chest + 0.1 * rng.standard_normal(300), 0, 1)  # skilled, not a probability
    views = [("PA", "PA")] * 80 + [("PA", "AP")] * 20 + [("lateral", "lateral")] * 5
    check = cal.calibrate_applicability(shares, chest, cal.SkillRule(resamples=1000), views)
    assert check.assessed and check.positives == 200 and check.negatives == 100
    assert 0.5 < check.auroc_low < check.auroc < check.auroc_high and check.sensitivity > 0.8
    assert check.views == 105 and check.views_correct == 85 and check.view_low < 85 / 105 < check.view_high
    assert check.view_confusion == {"PA": {"PA": 80, "AP": 20}, "lateral": {"lateral": 5}}
    probs = check.probability(np.array([0.3, 0.5, 0.8]))
    assert list(probs) == sorted(probs) and probs[0] < 0.2 and probs[-1] > 0.9
    assert "view guess right on 85 of 105 (81%" in check.summary()
    chance = cal.calibrate_applicability(rng.random(300), chest, cal.SkillRule(resamples=1000))
    assert not chance.assessed and "not shown better than chance" in chance.reason
    one_class = cal.calibrate_applicability(shares[:200], chest[:200], cal.SkillRule(resamples=1000))
    assert not one_class.assessed and one_class.reason.startswith("not measurable")


def _applicability(knots_y: list[float], view_low: float = 0.6) -> cal.ApplicabilityCalibration:
    return cal.ApplicabilityCalibration(200, 100, 0.9, 0.85, 0.95, True, "measured by a test", 0.9, 0.8,
                                        [0.0, 1.0], knots_y, 10, 9, view_low, 0.98)


@pytest.mark.parametrize("lang", ["en", "de"])
def test_a_calibrated_check_decides_on_its_probability_and_says_what_was_measured(tiny_encoder, lang):
    from cxrmodel.labels.applicability import ApplicabilityConfig, chest_shares, decide_from_model
    from cxrmodel.reporting.report import compose_report

    image = gray_image(5, (48, 48))
    vec = tiny_encoder.encode_images([image])
    config = ApplicabilityConfig()
    share = float(chest_shares(tiny_encoder, vec, config).chest[0])
    uncalibrated = decide_from_model(tiny_encoder, vec, config)[0]
    assert uncalibrated.source == "model" and "uncalibrated" in uncalibrated.basis()
    never = decide_from_model(tiny_encoder, vec, config, _applicability([0.0, 0.0]))[0]  # measured: never chest
    assert not never.applicable and never.source == "calibrated" and never.confidence == pytest.approx(1.0)
    assert "AUROC 0.90 [0.85-0.95], sensitivity 0.90, specificity 0.80" in never.reason
    always = decide_from_model(tiny_encoder, vec, config, _applicability([0.6, 1.0]))[0]
    assert always.applicable and always.confidence == pytest.approx(0.6 + 0.4 * share)
    assert always.basis() == f"a calibrated probability {always.confidence:.2f} (measured by radlens calibrate)"
    assert always.view is None and "view not assessed: view guess right on 9 of 10" in always.reason
    trusted_view = decide_from_model(tiny_encoder, vec, config, _applicability([0.6, 1.0], view_low=0.85))[0]
    assert trusted_view.view in {"PA", "AP", "lateral"} and "view from the model's guess" in trusted_view.reason
    unassessed = cal.ApplicabilityCalibration(20, 5, 0.6, 0.3, 0.9, False, "too few", knots_x=[0.0, 1.0],
                                              knots_y=[0.0, 0.0])
    assert decide_from_model(tiny_encoder, vec, config, unassessed)[0] == uncalibrated  # no skill: no map
    impression = compose_report([], {}, LabelConfig(), decision=never, lang=lang).impression[0]
    assert "1.00" in impression and ("calibrated" in impression or "kalibriert" in impression)
    assert "uncalibrated" not in impression and "unkalibriert" not in impression


def test_radlens_calibrate_measures_the_chest_radiograph_check_from_modality_columns(
        tmp_path, tiny_model_dir, tiny_encoder, capsys):
    src = tmp_path / "src"
    src.mkdir()
    lines = ["path,modality,anatomy,view,labels"]
    for i in range(30):
        gray_image(i, (48, 48)).save(src / f"{i}.png")
        kind = ("X-ray,chest,PA" if i % 3 == 0 else "X-ray,chest,AP supine") if i < 20 else "MRI,brain,"
        lines.append(f"src/{i}.png,{kind},{'No Finding' if i < 10 else ''}")
    (tmp_path / "m.csv").write_text("\n".join(lines) + "\n")
    out = tmp_path / "cal.json"
    assert main(["calibrate", str(tmp_path / "m.csv"), "--model", str(tiny_model_dir), "--precision", "fp32",
                 "--out", str(out), "--resamples", "200", "--min-positives", "5"]) == 0
    printed = capsys.readouterr().out
    saved = json.loads(out.read_text())
    check = saved["applicability"]
    assert (check["positives"], check["negatives"], check["views"]) == (20, 10, 20)
    assert sum(sum(v.values()) for v in check["view_confusion"].values()) == 20
    assert set(check["view_confusion"]) == {"PA", "AP"}
    assert saved["dataset"]["labelled_images"] == 10 and saved["dataset"]["unlabelled_rows"] == 20
    assert "chest-radiograph check: " in printed and "on 20 chest radiographs and 10 other images" in printed
    loaded = cal.load(out, cal.model_identity(tiny_encoder))
    assert loaded.applicability == cal.ApplicabilityCalibration(**check)
    (tmp_path / "none.csv").write_text("path,caption\nsrc/0.png,a film\n")
    assert main(["calibrate", str(tmp_path / "none.csv"), "--model", str(tiny_model_dir), "--out",
                 str(tmp_path / "x.json")]) == 1
    assert "needs a `labels` column" in capsys.readouterr().err


@pytest.mark.parametrize("lang, expected", [
    ("en", "on the calibration set this threshold flagged 78% of films with effusion and 50% of films without"),
    ("de", "markierte diese Schwelle 78% der Aufnahmen mit und 50% der Aufnahmen ohne diesen Befund")])
def test_a_finding_says_what_its_threshold_flags_on_both_kinds_of_film(lang, expected):
    """A calibrated finding is stated with its measured operating point, not a bare 'suspected': with a
    specificity of 0.50, half the films without the finding cross the same threshold. A threshold set by
    hand has no measured operating point: the finding says so, and claims neither one nor a suspicion."""
    from cxrmodel.labels.prompts import LabelConfig
    from cxrmodel.labels.zeroshot import LabelScore
    from cxrmodel.reporting.report import compose_report, sections

    score = LabelScore("Effusion", 0.24, 0.57, 0.21, assessed=True,
                       skill={"auroc": 0.67, "sensitivity": 0.78, "specificity": 0.50, "threshold": 0.21})
    meta = {"modality": "X-ray", "body_part": "chest", "view": "PA"}
    report = compose_report([score], meta, LabelConfig(), lang=lang)
    (finding,) = [f for items in report.findings.values() for f in items]
    assert (finding.present, finding.sensitivity, finding.specificity) == (True, 0.78, 0.50)
    assert any(expected in line for _, lines in sections(report) for line in lines)
    by_hand = compose_report([score], meta, LabelConfig(), threshold=0.1, lang=lang)
    (finding,) = [f for items in by_hand.findings.values() for f in items]
    assert finding.present and finding.sensitivity is None
    lines = [line for _, part in sections(by_hand) for line in part]
    assert not any("50%" in line or "suspected" in line.lower() or "verdacht" in line.lower() for line in lines)
    assert any("0.24 >= 0.10" in line for line in lines)
