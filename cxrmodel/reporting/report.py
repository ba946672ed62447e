"""Structured reports: zero-shot scores + applicability + metadata -> clinical information, technique,
findings by region, impression, recommendations, confidence, limitations, disclaimer.

`compose_report` is a pure function; every sentence comes from `report_templates.json` (one block per
language: English and German ship), so wording and recommendations are data, not code.
`to_markdown`, `to_json` and `to_pdf` render a `Report`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

from cxrmodel.errors import DataError
from cxrmodel.imaging.compression import UNRECORDED
from cxrmodel.labels.prompts import REGIONS, LabelConfig
from cxrmodel.labels.zeroshot import LabelScore

TEMPLATES_FILE = Path(__file__).with_name("report_templates.json")
SAFE_METADATA = ("id", "modality", "body_part", "view", "width", "height", "frames", "lossy", "lossy_ratio",
                 "file_name", "age_band", "sex")


@lru_cache(maxsize=1)
def templates() -> dict:
    """All report templates by language code."""
    return json.loads(TEMPLATES_FILE.read_text(encoding="utf-8"))


def languages() -> list[str]:
    """Language codes a report can be written in."""
    return list(templates())


def text_for(lang: str) -> dict:
    """The templates of one language; DataError for an unknown code."""
    if lang not in templates():
        raise DataError(f"no report templates for language {lang!r}; available: {', '.join(languages())}")
    return templates()[lang]


@dataclass
class Finding:
    """One pathology as the report states it."""

    pathology: str
    probability: float
    uncertainty: float
    threshold: float
    present: bool
    # measured by the calibration at this threshold (None when a threshold was set by hand or not measured)
    sensitivity: float | None = None
    specificity: float | None = None
    # the lowest and highest probability across the preprocessing ensemble (None: the value itself)
    low: float | None = None
    high: float | None = None

    @property
    def low_high(self) -> tuple[float, float]:
        """(low, high), the value itself standing in for a bound not given."""
        low = self.probability if self.low is None else self.low
        return low, self.probability if self.high is None else self.high

    @property
    def borderline(self) -> bool:
        """The decision differs between preprocessings: the threshold falls inside their range."""
        low, high = self.low_high
        return low < self.threshold <= high


@dataclass
class Report:
    """A structured report for one image."""

    technique: str
    findings: dict[str, list[Finding]]
    impression: list[str]
    confidence: str
    limitations: list[str]
    disclaimer: str
    clinical_information: list[str] = field(default_factory=list)
    recommendations: list[str] = field(default_factory=list)
    applicability: dict | None = None
    lang: str = "en"
    metadata: dict = field(default_factory=dict)
    not_assessed: list[dict] = field(default_factory=list)  # pathology, score, skill: never findings
    calibrated: bool = False  # False: no calibration for this model, every number a raw score

    def to_dict(self) -> dict:
        return asdict(self)


def age_band(age) -> str | None:
    """A decade band ('60-69') from an age in years (or DICOM '061Y'); never the exact age. 90+ is one band."""
    text = str(age or "").strip().upper().rstrip("Y")
    try:
        years = int(float(text))
    except ValueError:
        return None
    if years < 0 or years > 130:
        return None
    return "90+" if years >= 90 else f"{years // 10 * 10}-{years // 10 * 10 + 9}"


def describe_technique(metadata: dict, t: dict) -> str:
    """One sentence from modality, body part and view (whatever the metadata has)."""
    terms = t.get("terms", {})

    def term(value) -> str:  # a language's word for a modality or body part, else the value as given
        return terms.get(str(value).strip().lower(), str(value))

    text = term(metadata.get("modality") or t["technique_default"])
    if metadata.get("body_part"):
        text += t.get("technique_separator", " ") + t["technique_of"].format(
            body_part=term(str(metadata["body_part"]).lower()))
    if metadata.get("view"):
        view = str(metadata["view"])
        text += " " + t.get("views", {}).get(view, t["technique_view"].format(view=view))
    if metadata.get("width") and metadata.get("height"):
        text += f", {metadata['width']}x{metadata['height']} px"
    return text + "."


def limitations(metadata: dict, t: dict) -> list[str]:
    """The standing limitations, and what this image's file shows was not looked at or was lost: every frame of
    a multi-frame file but the first; detail lost to lossy compression."""
    out = list(t["limitations"])
    try:
        frames = int(metadata.get("frames") or 1)
    except (TypeError, ValueError):
        frames = 1
    if frames > 1:
        out.append(t["first_frame_only"].format(frames=frames, rest=frames - 1))
    if metadata.get("lossy"):
        method = t["lossy_unrecorded"] if metadata["lossy"] == UNRECORDED else metadata["lossy"]
        ratio = t["lossy_ratio"].format(ratio=metadata["lossy_ratio"]) if metadata.get("lossy_ratio") else ""
        out.append(t["lossy"].format(method=method, ratio=ratio))
    return out


def clinical_information(metadata: dict, t: dict) -> list[str]:
    """Study description, indication, age band and sex where the metadata has them -- never identity."""
    lines = []
    if metadata.get("study_description"):
        lines.append(t["clinical_description"].format(value=metadata["study_description"]))
    if metadata.get("indication"):
        lines.append(t["clinical_indication"].format(value=metadata["indication"]))
    band = metadata.get("age_band") or age_band(metadata.get("age"))
    if band:
        lines.append(t["clinical_age"].format(value=band))
    sex = str(metadata.get("sex") or "").strip().upper()[:1]
    if sex in t["sex"]:
        lines.append(t["clinical_sex"].format(value=t["sex"][sex]))
    return lines or [t["clinical_none"]]


def _name(pathology: str, t: dict) -> str:
    return t["pathologies"].get(pathology, pathology.replace("_", " "))


def confidence_statement(findings: list[Finding], t: dict) -> str:
    """What the assessed probabilities' spread across the preprocessing ensemble is -- a dependence on
    preprocessing, not a measured error bar -- and which findings' decisions it changes (borderline)."""
    if not findings:
        return t["confidence_none"]
    mean_u = sum(f.uncertainty for f in findings) / len(findings)
    text = t["confidence_text"].format(spread=mean_u)
    borderline = [_name(f.pathology, t) for f in findings if f.borderline]
    if borderline:
        text += " " + t["borderline"].format(names=", ".join(sorted(borderline)))
    return text


def compose_report(scores: list[LabelScore], metadata: dict, config: LabelConfig, threshold: float | None = None,
                   decision=None, lang: str = "en") -> Report:
    """Build the report; `threshold`, when given, replaces every per-pathology threshold. With a
    not-applicable `decision` the report says so and assesses no finding."""
    t = text_for(lang)
    common = dict(technique=describe_technique(metadata, t), limitations=limitations(metadata, t),
                  disclaimer=t["disclaimer"], clinical_information=clinical_information(metadata, t),
                  applicability=decision.to_dict() if decision is not None else None, lang=lang,
                  metadata={k: v for k, v in metadata.items() if k in SAFE_METADATA})
    if decision is not None and not decision.applicable:
        basis = t["basis"].get(decision.source, decision.source).format(confidence=decision.confidence)
        sentence = t["not_applicable"].format(reason=decision.reason, basis=basis)
        return Report(findings={}, impression=[sentence], confidence=sentence, recommendations=[], **common)
    assessed = [s for s in scores if s.assessed]
    calibrated = any(s.skill.get("auroc") is not None or s.assessed for s in scores)
    not_assessed = [{"pathology": s.pathology, "score": round(s.probability, 4), "skill": s.skill}
                    for s in scores if not s.assessed]
    findings = [_finding(s, threshold if threshold is not None else s.threshold) for s in assessed]
    by_region: dict[str, list[Finding]] = {r: [] for r in REGIONS}
    for f in findings:
        region = config.pathologies[f.pathology].region if f.pathology in config.pathologies else "other"
        by_region.setdefault(region, []).append(f)
    present = sorted((f for f in findings if f.present), key=lambda f: -f.probability)
    if not assessed:
        nothing = t["uncalibrated"] if not calibrated else t["none_assessed"]
        return Report(findings={}, impression=[nothing], confidence=nothing, recommendations=[],
                      not_assessed=not_assessed, calibrated=calibrated, **common)
    impression = [t["impression_item"].format(name=_name(f.pathology, t), p=f.probability, lo=f.low_high[0],
                                              hi=f.low_high[1]) for f in present] or [t["no_finding"]]
    advice = t["recommendations"]
    recommendations = [t["recommendation_item"].format(name=_name(f.pathology, t), text=advice[f.pathology])
                       for f in present if f.pathology in advice] or [t["recommendation_none"]]
    return Report(findings=by_region, impression=impression, confidence=confidence_statement(findings, t),
                  recommendations=recommendations, not_assessed=not_assessed, calibrated=calibrated, **common)


def _finding(score: LabelScore, threshold: float) -> Finding:
    """One assessed pathology at the threshold this report applies, with the sensitivity and specificity
    the calibration measured there (none when the threshold is another one, e.g. set by hand)."""
    skill = score.skill
    measured = skill.get("threshold") is not None and abs(skill["threshold"] - threshold) < 1e-9
    sens_spec = (skill.get("sensitivity"), skill.get("specificity")) if measured else (None, None)
    low, high = score.spread_range
    return Finding(score.pathology, score.probability, score.uncertainty, threshold, score.probability >= threshold,
                   *sens_spec, low=low, high=high)


def region_sentence(items: list[Finding], t: dict) -> str:
    """What a report says about one region."""
    present = [f for f in items if f.present]
    if not items:
        return t["not_assessed"]
    if not present:
        return t["no_evidence"].format(names=", ".join(_name(f.pathology, t).lower() for f in items))
    return "; ".join(finding_sentence(f, t) for f in sorted(present, key=lambda f: -f.probability)) + "."


def finding_sentence(f: Finding, t: dict) -> str:
    """A finding above its threshold, with what that threshold means where the calibration measured it:
    the share of films with the finding, and of films without it, that it flags."""
    name = _name(f.pathology, t)
    low, high = f.low_high
    if f.sensitivity is None or f.specificity is None:
        return t["above_set_threshold"].format(name=name, p=f.probability, lo=low, hi=high, thr=f.threshold)
    return t["above_threshold"].format(name=name, name_lower=name.lower(), p=f.probability, lo=low, hi=high,
                                       thr=f.threshold, sens=f.sensitivity, fpr=1.0 - f.specificity)


def sections(report: Report) -> list[tuple[str, list[str]]]:
    """(title, paragraphs) of every report section, in order, in the report's language."""
    t = text_for(report.lang)
    s = t["sections"]
    findings = [f"{t['regions'].get(r, r)}: {region_sentence(items, t)}" for r, items in report.findings.items()]
    unassessed = [t["not_assessed_item"].format(name=_name(n["pathology"], t), reason=n["skill"].get("reason", ""))
                  for n in report.not_assessed]
    return [(s["clinical"], report.clinical_information), (s["technique"], [report.technique]),
            (s["findings"], findings or report.impression), (s["impression"], report.impression),
            *([(s["not_assessed"], unassessed)] if unassessed and report.calibrated else []),
            (s["recommendations"], report.recommendations or [t["recommendation_none"]]),
            (s["confidence"], [report.confidence]), (s["limitations"], report.limitations),
            (s["disclaimer"], [report.disclaimer])]


def to_markdown(report: Report) -> str:
    """The report as Markdown."""
    lines = [f"# {text_for(report.lang)['title']}", ""]
    numbered = {text_for(report.lang)["sections"]["impression"]}
    for title, paragraphs in sections(report):
        lines.append(f"## {title}")
        if title in numbered:
            lines += [f"{i}. {p}" for i, p in enumerate(paragraphs, 1)]
        elif len(paragraphs) == 1:
            lines.append(paragraphs[0])
        else:
            lines += [f"- {p}" for p in paragraphs]
        lines.append("")
    return "\n".join(lines)


def to_json(report: Report) -> str:
    """The report as JSON (stable keys: technique, findings, impression, confidence, limitations,
    disclaimer, clinical_information, recommendations, applicability, lang, metadata)."""
    return json.dumps(report.to_dict(), indent=2, ensure_ascii=False)


@dataclass
class PdfContext:
    """What makes a PDF report stand alone: the image, where it came from, when, by which model and at
    which threshold, and the figures the page shows."""

    image_png: bytes | None = None
    file_name: str | None = None
    content_hash: str | None = None
    model: str | None = None
    model_fingerprint: str | None = None
    threshold: float | None = None  # None: each assessed pathology's own calibrated threshold
    generated: str = ""  # e.g. "2026-12-02 07:10 UTC"
    figures: list[tuple[str, bytes]] = field(default_factory=list)  # (caption, PNG)

    def lines(self, t: dict, lang: str) -> list[str]:
        """The provenance lines printed under the title."""
        out = []
        if self.file_name or self.content_hash:
            out.append(t["pdf_file"].format(name=self.file_name or "-", hash=(self.content_hash or "-")[:12]))
        if self.generated:
            out.append(t["pdf_generated"].format(when=self.generated))
        if self.model:
            out.append(t["pdf_model"].format(model=self.model, fingerprint=(self.model_fingerprint or "-")[:12]))
        out.append(t["pdf_threshold"].format(value=f"{self.threshold:.2f}") if self.threshold is not None
                   else t["pdf_threshold_per_label"])
        out.append(t["pdf_language"].format(lang=lang))
        return out


def to_pdf(report: Report, context: PdfContext | None = None) -> bytes:
    """The report as a PDF document (fpdf2 core fonts, so it works offline); with a `context`, the image
    thumbnail, its provenance (file, content hash, date, model, threshold, language) and the figures too."""
    import io

    from fpdf import FPDF

    t = text_for(report.lang)
    pdf = FPDF(format="A4")
    pdf.set_auto_page_break(auto=True, margin=15)
    pdf.add_page()
    pdf.set_font("Helvetica", "B", 16)
    pdf.cell(0, 10, _latin1(t["title"]), new_x="LMARGIN", new_y="NEXT")
    if context is not None:
        pdf.set_font("Helvetica", "", 9)
        top = pdf.get_y()
        for line in context.lines(t, report.lang):
            pdf.cell(110, 5, _latin1(line), new_x="LMARGIN", new_y="NEXT")
        if context.image_png:
            pdf.image(io.BytesIO(context.image_png), x=pdf.w - pdf.r_margin - 55, y=top, w=55)
            pdf.set_y(max(pdf.get_y(), top + 60))
        pdf.ln(3)
    for title, paragraphs in sections(report):
        pdf.set_font("Helvetica", "B", 12)
        pdf.cell(0, 8, _latin1(title), new_x="LMARGIN", new_y="NEXT")
        pdf.set_font("Helvetica", "", 10)
        for text in paragraphs:
            pdf.multi_cell(0, 5, _latin1(text), new_x="LMARGIN", new_y="NEXT")
        pdf.ln(2)
    for caption, png in (context.figures if context is not None else []):
        pdf.add_page()
        pdf.set_font("Helvetica", "B", 12)
        pdf.cell(0, 8, _latin1(caption), new_x="LMARGIN", new_y="NEXT")
        pdf.image(io.BytesIO(png), w=pdf.w - pdf.l_margin - pdf.r_margin)
    return bytes(pdf.output())


def findings_csv(scores: list[LabelScore], threshold: float | None = None) -> str:
    """One row per pathology: pathology, kind ('probability' where calibrated and assessed, else the raw
    'score'), value, uncertainty, threshold and positive (assessed pathologies only), the skill reason, and the
    lowest and highest value across the preprocessing ensemble."""
    import csv
    import io

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["pathology", "kind", "value", "uncertainty", "threshold", "positive", "skill", "low", "high"])
    for s in scores:
        limit = threshold if threshold is not None else s.threshold
        writer.writerow([s.pathology, s.kind, f"{s.probability:.4f}", f"{s.uncertainty:.4f}",
                         f"{limit:.4f}" if s.assessed else "", int(s.assessed and s.probability >= limit),
                         s.skill.get("reason", ""), *(f"{x:.4f}" for x in s.spread_range)])
    return buf.getvalue()


def _latin1(text: str) -> str:
    return text.encode("latin-1", "replace").decode("latin-1")
