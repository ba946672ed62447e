"""Labels that know where they apply; categories; report languages; prior studies by keyed patient pseudonym."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pytest
from PIL import Image

from cxrmodel.constants import PATHOLOGIES
from cxrmodel.labels.applicability import ApplicabilityConfig, decide_from_metadata, decide_from_model
from cxrmodel.labels.prompts import CATEGORIES, LabelConfig
from cxrmodel.labels.zeroshot import LabelScore
from cxrmodel.reporting.charts import category_heatmap, category_matrix, summary_card
from cxrmodel.reporting.report import compose_report, templates, to_markdown
from indexer.store import default_db_url
from tests.databases import dump_database, fetch
from tests.imagegen import gray_image, shape_image, write_dicom
from tests.tinymodel import write_forced_calibration

WORDS = ["a chest x-ray", "lateral lumbar spine radiograph", "axial ct of the chest", "mri of the brain with a tumour",
         "a photo of an image", "red circle", "blue square", "green triangle", "yellow cross", "stripes", "dots",
         "a bright shape on the left", "a dark shape on the right", "normal", "abnormal", "present", "absent",
         "effusion", "edema", "nodule", "mass", "hernia", "fibrosis", "the top", "the bottom"]


def arranged_config(encoder, image, chest: bool) -> ApplicabilityConfig:
    """Prompts chosen so the random test model must decide `chest` for `image`: the words nearest the
    image go to the class that should win, the farthest to the others."""
    vec = encoder.encode_images([image])[0]
    order = np.argsort(-(encoder.encode_texts(WORDS) @ vec))
    near, far = [WORDS[i] for i in order[:2]], [WORDS[i] for i in order[-6:]]
    if chest:
        classes = {"chest_pa": tuple(near), "ct": tuple(far[:3]), "mri": tuple(far[3:])}
    else:
        classes = {"chest_pa": tuple(far[:3]), "chest_lateral": tuple(far[3:]), "ct": tuple(near)}
    return ApplicabilityConfig(classes=classes, chest_views={"chest_pa": "PA", "chest_lateral": "lateral"})


@pytest.mark.parametrize("meta,applicable,view", [
    ({"modality": "CT", "body_part": "CHEST"}, False, None),
    ({"modality": "MR", "body_part": "BRAIN"}, False, None),
    ({"modality": "MRI"}, False, None),
    ({"modality": "DX", "body_part": "KNEE"}, False, None),
    ({"modality": "CR", "body_part": "CHEST", "view": "PA"}, True, "PA"),
    ({"modality": "X-ray", "body_part": "chest", "view": "AP supine"}, True, "AP"),
    ({"modality": "DX", "body_part": "CHEST", "view": "LL"}, True, "lateral"),
    ({"modality": "DX", "body_part": "CHEST_LAT", "view": "LATERAL"}, True, "lateral"),  # DICOM's spelling
    ({"modality": "CR", "body_part": "chest-lat"}, True, None),
    ({"modality": "CR", "body_part": "  Chest  PA "}, True, None),
])
def test_metadata_decides_when_it_can(meta, applicable, view):
    decision = decide_from_metadata(meta)
    assert decision.applicable is applicable and decision.source == "metadata" and decision.view == view
    assert decision.reason


def test_metadata_silence_leaves_it_to_the_model():
    assert decide_from_metadata({}) is None
    assert decide_from_metadata({"modality": "DX"}) is None


@pytest.mark.parametrize("image,chest", [(shape_image("circle", "blue", seed=4), False),
                                         (gray_image(11, (64, 64)), False),
                                         (Image.fromarray(np.full((48, 48), 128, np.uint8)), True)])
def test_model_path_decides_with_arranged_prompts(tiny_encoder, image, chest):
    config = arranged_config(tiny_encoder, image, chest)
    decision = decide_from_model(tiny_encoder, tiny_encoder.encode_images([image]), config)[0]
    assert decision.applicable is chest and decision.source == "model" and 0.5 <= decision.confidence <= 1.0
    assert decision.view is None  # an uncalibrated view guess is not shown
    assert ("view not assessed" in decision.reason) if chest else ("closest class" in decision.reason)
    assert "looks like" not in decision.reason and "not calibrated" in decision.reason  # a guess, said as one


def test_indexing_stores_not_applicable_without_scores_and_filters_skip_them(tmp_path, tiny_encoder):
    from indexer.pipeline import IndexJob, run_index
    from search.engine import Engine, EngineConfig

    src = tmp_path / "src"
    src.mkdir()
    ramp = (np.arange(64 * 64).reshape(64, 64) % 4096).astype(np.uint16)
    write_dicom(src / "ct.dcm", ramp, Modality="CT", BodyPartExamined="CHEST")
    write_dicom(src / "mri.dcm", ramp[::-1].copy(), Modality="MR", BodyPartExamined="BRAIN")
    write_dicom(src / "cxr.dcm", ramp.T.copy(), Modality="DX", BodyPartExamined="CHEST", ViewPosition="PA")
    shape_image("cross", "red").save(src / "photo.png")
    (tmp_path / "m.csv").write_text("path,modality,body_part\nsrc/photo.png,photograph,none\n")
    data = tmp_path / "data"
    run_index(IndexJob(sources=[str(src), str(tmp_path / "m.csv")], data_dir=data, workers=0, progress=False),
              tiny_encoder)
    url = default_db_url(data)
    rows = dict(fetch(url, "select i.path, a.applicable from images i join applicability a on a.image_id = i.id"))
    scored = {r[0] for r in fetch(url, "select distinct i.path from images i join scores s on s.image_id = i.id")}
    by_name = {k.rsplit("/", 1)[-1]: v for k, v in rows.items()}
    assert by_name["ct.dcm"] == 0 and by_name["mri.dcm"] == 0 and by_name["cxr.dcm"] == 1
    assert {s.rsplit("/", 1)[-1] for s in scored} <= {n for n, v in by_name.items() if v}
    calibration = write_forced_calibration(tiny_encoder, tmp_path / "calibration.json")
    engine = Engine.open(EngineConfig(data_dir=data, calibration=str(calibration)), encoder=tiny_encoder)
    for pathology in PATHOLOGIES:
        hits = engine.text("x", k=10, filters=engine.parse_filters([f"{pathology}>=0"]))
        assert all(h.applicability["applicable"] for h in hits)
        assert "ct.dcm" not in {h.image["file_name"] for h in hits}
    ct_id = next(h.id for h in engine.text("x", k=10) if h.image["file_name"] == "ct.dcm")
    report, scores, decision, _ = engine.report_for_id(ct_id)
    assert not decision.applicable and scores == [] and "do not apply" in report.impression[0]
    assert engine.get(ct_id)["applicability"]["source"] == "metadata"
    engine.close()


def test_the_index_and_an_upload_read_the_check_through_the_models_own_calibration(tmp_path, tiny_model_dir):
    """A model directory's calibration.json that measured the chest-radiograph check decides at index time and
    for uploads alike; metadata still decide where they can."""
    import dataclasses
    import shutil

    from cxrmodel.labels.calibration import ApplicabilityCalibration, load, save
    from cxrmodel.model.encoder import EncoderConfig, load_encoder
    from indexer.pipeline import IndexJob, run_index
    from search.engine import Engine, EngineConfig

    model = shutil.copytree(tiny_model_dir, tmp_path / "model")
    encoder = load_encoder(EncoderConfig(model=str(model), precision="fp32", batch_size=16))
    forced = load(write_forced_calibration(encoder, tmp_path / "forced.json"))
    always = ApplicabilityCalibration(200, 100, 0.9, 0.85, 0.95, True, "measured by a test", 0.9, 0.8,
                                      [0.0, 1.0], [0.6, 1.0])
    save(dataclasses.replace(forced, applicability=always), model / "calibration.json")
    src = tmp_path / "src"
    src.mkdir()
    gray_image(3, (64, 64)).save(src / "film.png")
    write_dicom(src / "ct.dcm", (np.arange(64 * 64).reshape(64, 64) % 4096).astype(np.uint16), Modality="CT",
                BodyPartExamined="CHEST")
    data = tmp_path / "data"
    run_index(IndexJob(sources=[str(src)], data_dir=data, workers=0, progress=False), encoder)
    stored = {path.rsplit("/", 1)[-1]: (source, applicable, confidence) for path, source, applicable, confidence in
              fetch(default_db_url(data), "select i.path, a.source, a.applicable, a.confidence from images i "
                                          "join applicability a on a.image_id = i.id")}
    assert stored["ct.dcm"][:2] == ("metadata", 0)
    assert stored["film.png"][:2] == ("calibrated", 1) and stored["film.png"][2] >= 0.6
    engine = Engine.open(EngineConfig(data_dir=data), encoder=encoder)
    upload = engine.applicability(Image.open(src / "film.png"))
    assert upload.source == "calibrated" and upload.confidence == pytest.approx(stored["film.png"][2], abs=1e-4)
    engine.close()


def _scores(probs: dict) -> list[LabelScore]:
    return [LabelScore(p, probs.get(p, 0.1), 0.05, 0.5, {"original/names": probs.get(p, 0.1),
                                                            "clahe/pairs": probs.get(p, 0.1) / 2}, assessed=True)
            for p in PATHOLOGIES]


def test_categories_cover_every_pathology_once():
    members = [p for names in CATEGORIES.values() for p in names]
    assert sorted(members) == sorted(PATHOLOGIES)


def test_heatmap_and_summary_render():
    scores = _scores({"Effusion": 0.9, "Cardiomegaly": 0.7})
    cats, members, matrix = category_matrix(scores)
    assert cats == list(CATEGORIES) and members == ["clahe/pairs", "original/names"]
    assert matrix[cats.index("pleura"), members.index("original/names")] == pytest.approx((0.9 + 0.1 + 0.1) / 3)
    assert category_heatmap(scores, "png").startswith(b"\x89PNG") and b"<svg" in category_heatmap(scores, "svg")
    assert b"<svg" in summary_card(scores, None, "svg")


def test_every_template_key_exists_in_every_language():
    langs = templates()

    def keys(d, prefix=""):
        out = set()
        for k, v in d.items():
            out.add(prefix + k)
            if isinstance(v, dict) and k not in ("terms", "views"):  # vocabularies: as many words as a language needs
                out |= keys(v, prefix + k + ".")
        return out

    reference = keys(langs["en"])
    assert len(langs) >= 2
    for lang, block in langs.items():
        assert keys(block) == reference, lang
        assert len(block["limitations"]) == len(langs["en"]["limitations"])
        assert set(block["recommendations"]) == set(PATHOLOGIES) == set(block["pathologies"])


def test_same_findings_in_both_languages():
    scores = _scores({"Effusion": 0.9, "Cardiomegaly": 0.7})
    meta = {"modality": "X-ray", "body_part": "chest", "view": "PA", "age": "67", "sex": "F"}
    en = compose_report(scores, meta, LabelConfig(), lang="en")
    de = compose_report(scores, meta, LabelConfig(), lang="de")
    assert len(en.impression) == len(de.impression) == 2
    assert en.impression[0].startswith("Effusion") and de.impression[0].startswith("Pleuraerguss")
    assert "Age band: 60-69" in en.clinical_information and "Altersgruppe: 60-69" in de.clinical_information
    assert "## Beurteilung" in to_markdown(de) and "## Impression" in to_markdown(en)
    assert len(en.recommendations) == len(de.recommendations) == 2
    assert "67" not in " ".join(en.clinical_information)  # an age band, never the exact age


def test_priors_in_date_order_with_changes_and_no_raw_key_or_date(tmp_path, tiny_encoder, monkeypatch):
    from indexer.pipeline import IndexJob, run_index
    from search.engine import Engine, EngineConfig
    from web import ServeConfig, create_app

    src = tmp_path / "src"
    src.mkdir()
    lines = ["path,modality,body_part,view,patient_id,study_date"]
    for i, date in enumerate(["2024-03-01", "2021-06-15", "2023-01-20"]):
        gray_image(300 + i).save(src / f"s{i}.png")
        lines.append(f"src/s{i}.png,X-ray,chest,PA,MRN-0042-SECRET,{date}")
    gray_image(400).save(src / "other.png")
    lines.append("src/other.png,X-ray,chest,PA,MRN-9999-OTHER,2022-01-01")
    (tmp_path / "m.csv").write_text("\n".join(lines) + "\n")
    data = tmp_path / "data"
    key_file = tmp_path / "secrets" / "patient-key"
    monkeypatch.setenv("RADLENS_PATIENT_KEY_FILE", str(key_file))
    run_index(IndexJob(sources=[str(tmp_path / "m.csv")], data_dir=data, workers=0, progress=False), tiny_encoder)
    engine = Engine.open(EngineConfig(data_dir=data), encoder=tiny_encoder)
    s0 = next(h.id for h in engine.text("x", k=10) if h.image["file_name"] == "s0.png")
    priors = engine.priors(s0)
    # intervals from this study (2024-03-01) to 2021-06-15 and 2023-01-20; no date, shifted or not, is shown
    assert [s["days_from_this"] for s in priors["studies"]] == [-990, -406, 0]
    assert [s["file_name"] for s in priors["studies"]] == ["s1.png", "s2.png", "s0.png"]
    first, second = priors["studies"][:2]
    delta = priors["changes"][0]["delta"]
    assert len(delta) == 14
    for p, d in delta.items():
        assert d == pytest.approx(second["scores"][p] - first["scores"][p], abs=1e-3)
    client = create_app(ServeConfig(), engine=engine).test_client()
    api = client.get(f"/api/images/{s0}/priors")
    page = client.get(f"/image/{s0}")
    assert api.status_code == 200 and len(api.json["studies"]) == 3
    assert page.status_code == 200 and b"Studies of this patient" in page.data
    dump = dump_database(default_db_url(data))
    real_days = [str(dt.date.fromisoformat(d).toordinal()) for d in ("2024-03-01", "2021-06-15", "2023-01-20")]
    for text in (dump, api.get_data(as_text=True), page.get_data(as_text=True)):
        assert "MRN-0042" not in text and "SECRET" not in text
        for date in ("2024-03-01", "2021-06-15", "2023-01-20", "20240301", "20210615", "20230120", *real_days):
            assert date not in text
    assert "+990" in page.get_data(as_text=True) or "-990" in page.get_data(as_text=True)
    assert key_file.stat().st_mode & 0o077 == 0 and not list(data.rglob("*key*"))
    engine.close()


def test_the_german_technique_line_uses_german_words():
    from cxrmodel.reporting.report import describe_technique, text_for

    meta = {"modality": "X-ray", "body_part": "chest", "view": "AP supine"}
    assert describe_technique(meta, text_for("en")) == "X-ray of the chest (AP supine view)."
    german = describe_technique(meta, text_for("de"))
    assert german == "Röntgen, Region Thorax (a.p.-Projektion im Liegen)." and "chest" not in german


def test_a_report_says_what_the_file_shows_was_not_looked_at_or_was_lost(tmp_path, tiny_encoder):
    """Uploaded or indexed, a 3-frame DICOM's report says the other 2 frames were not looked at, and a film flagged
    as lossy compressed says detail may be lost, in every language, with the facts in its JSON; a single-frame,
    never-compressed film's report says neither."""
    from indexer.pipeline import IndexJob, run_index
    from search.engine import Engine, EngineConfig

    src = tmp_path / "src"
    src.mkdir()
    frames = np.stack([np.asarray(gray_image(500 + i, (64, 64)), np.uint16) * 16 for i in range(3)])
    write_dicom(src / "tomo.dcm", frames, LossyImageCompression="01", LossyImageCompressionRatio=8,
                LossyImageCompressionMethod="ISO_10918_1")
    write_dicom(src / "film.dcm", frames[0])
    data = tmp_path / "data"
    run_index(IndexJob(sources=[str(src)], data_dir=data, workers=0, progress=False), tiny_encoder)
    engine = Engine.open(EngineConfig(data_dir=data), encoder=tiny_encoder)
    ids = {h.image["file_name"]: h.id for h in engine.text("x", k=10)}
    for name, frames_said in (("tomo.dcm", True), ("film.dcm", False)):
        upload = engine.decode_upload((src / name).read_bytes(), name)
        for report in (engine.report(upload, {}), engine.report_for_id(ids[name])[0]):
            said = [line for line in report.limitations if "frames" in line]
            expected = ("This file holds 3 frames (a series such as tomosynthesis or cine); only the first was shown, "
                        "embedded and assessed, and the other 2 were not looked at.")
            assert said == ([expected] if frames_said else [])
            assert report.metadata.get("frames") == (3 if frames_said else None)
            lossy = [line for line in report.limitations if "with loss" in line]
            assert lossy == (["The image was compressed with loss (JPEG, ratio 8:1): fine detail may be missing or "
                              "altered."] if frames_said else [])
            assert report.metadata.get("lossy_ratio") == ("8:1" if frames_said else None)
    german = engine.report(engine.decode_upload((src / "tomo.dcm").read_bytes(), "tomo.dcm"), {}, lang="de")
    assert any("3 Bilder" in line and "übrigen 2" in line for line in german.limitations)
    assert any("verlustbehaftet" in line and "Verhältnis 8:1" in line for line in german.limitations)
    engine.close()
