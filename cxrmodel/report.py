"""Structured reports: zero-shot scores + image metadata -> technique, findings, impression ...

`compose_report` is a pure function; `to_markdown`, `to_json` and `to_pdf` render its result.
The wording is template-based and says what it is: a machine-generated screening aid.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from .prompts import REGIONS, LabelConfig
from .zeroshot import LabelScore

DISCLAIMER = ("Generated automatically by RadLens from zero-shot image-text similarity. Not a medical "
              "device and not for clinical use: every finding must be confirmed by a qualified radiologist.")

LIMITATIONS = (
    "Zero-shot scores come from a general image-text model, not a classifier validated for diagnosis.",
    "Only the 14 ChestX-ray14 findings are assessed; anything else (lines, tubes, fractures, masses "
    "outside the chest) is not reported.",
    "Probabilities are uncalibrated similarity scores; thresholds are configurable defaults.",
)


@dataclass
class Finding:
    """One pathology as the report states it."""

    pathology: str
    probability: float
    uncertainty: float
    threshold: float
    present: bool


@dataclass
class Report:
    """A structured report for one image."""

    technique: str
    findings: dict[str, list[Finding]]
    impression: list[str]
    confidence: str
    limitations: list[str]
    disclaimer: str = DISCLAIMER
    metadata: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def describe_technique(metadata: dict) -> str:
    """One sentence from modality, body part and view (whatever the metadata has)."""
    modality = metadata.get("modality") or "Radiograph"
    parts = [modality]
    if metadata.get("body_part"):
        parts.append(f"of the {str(metadata['body_part']).lower()}")
    if metadata.get("view"):
        parts.append(f"({metadata['view']} view)")
    if metadata.get("width") and metadata.get("height"):
        parts.append(f", {metadata['width']}x{metadata['height']} px")
    return " ".join(parts).replace(" ,", ",") + "."


def confidence_statement(findings: list[Finding]) -> str:
    """Summarise ensemble disagreement as low / moderate / high confidence."""
    if not findings:
        return "No findings were scored."
    mean_u = sum(f.uncertainty for f in findings) / len(findings)
    borderline = [f.pathology for f in findings if abs(f.probability - f.threshold) < max(f.uncertainty, 0.05)]
    level = "high" if mean_u < 0.1 else "moderate" if mean_u < 0.25 else "low"
    text = f"Overall confidence {level} (mean ensemble spread {mean_u:.2f})."
    if borderline:
        text += " Borderline: " + ", ".join(sorted(borderline)) + "."
    return text


def compose_report(scores: list[LabelScore], metadata: dict, config: LabelConfig,
                   threshold: float | None = None) -> Report:
    """Build the report; `threshold`, when given, replaces every per-pathology threshold."""
    findings = [Finding(s.pathology, s.probability, s.uncertainty,
                        threshold if threshold is not None else s.threshold,
                        s.probability >= (threshold if threshold is not None else s.threshold))
                for s in scores]
    by_region: dict[str, list[Finding]] = {r: [] for r in REGIONS}
    for f in findings:
        region = config.pathologies[f.pathology].region if f.pathology in config.pathologies else "other"
        by_region.setdefault(region, []).append(f)
    present = sorted((f for f in findings if f.present), key=lambda f: -f.probability)
    impression = [f"{f.pathology.replace('_', ' ')} (probability {f.probability:.2f} +/- {f.uncertainty:.2f})"
                  for f in present] or ["No finding above threshold."]
    return Report(technique=describe_technique(metadata), findings=by_region, impression=impression,
                  confidence=confidence_statement(findings), limitations=list(LIMITATIONS),
                  metadata={k: v for k, v in metadata.items() if k in ("id", "modality", "body_part", "view",
                                                                       "width", "height", "file_name")})


def _region_sentence(region: str, items: list[Finding]) -> str:
    present = [f for f in items if f.present]
    if not items:
        return "Not assessed."
    if not present:
        names = ", ".join(f.pathology.replace("_", " ").lower() for f in items)
        return f"No evidence of {names} above threshold."
    return "; ".join(f"{f.pathology.replace('_', ' ')} suspected (p={f.probability:.2f}, "
                     f"uncertainty {f.uncertainty:.2f})" for f in sorted(present, key=lambda f: -f.probability)) + "."


def to_markdown(report: Report) -> str:
    """The report as Markdown."""
    lines = ["# RadLens report", "", "## Technique", report.technique, "", "## Findings"]
    for region, items in report.findings.items():
        lines.append(f"- **{region.capitalize()}**: {_region_sentence(region, items)}")
    lines += ["", "## Impression"] + [f"{i}. {text}" for i, text in enumerate(report.impression, 1)]
    lines += ["", "## Confidence", report.confidence, "", "## Limitations"]
    lines += [f"- {text}" for text in report.limitations]
    lines += ["", "## Disclaimer", report.disclaimer, ""]
    return "\n".join(lines)


def to_json(report: Report) -> str:
    """The report as JSON (stable keys: technique, findings, impression, confidence, limitations,
    disclaimer, metadata)."""
    return json.dumps(report.to_dict(), indent=2)


def to_pdf(report: Report) -> bytes:
    """The report as a PDF document (fpdf2, core fonts only, so it works offline)."""
    from fpdf import FPDF

    pdf = FPDF(format="A4")
    pdf.set_auto_page_break(auto=True, margin=15)
    pdf.add_page()
    pdf.set_font("Helvetica", "B", 16)
    pdf.cell(0, 10, "RadLens report", new_x="LMARGIN", new_y="NEXT")

    def section(title: str, paragraphs: list[str]) -> None:
        pdf.set_font("Helvetica", "B", 12)
        pdf.cell(0, 8, title, new_x="LMARGIN", new_y="NEXT")
        pdf.set_font("Helvetica", "", 10)
        for text in paragraphs:
            pdf.multi_cell(0, 5, _latin1(text), new_x="LMARGIN", new_y="NEXT")
        pdf.ln(2)

    section("Technique", [report.technique])
    section("Findings", [f"{r.capitalize()}: {_region_sentence(r, items)}" for r, items in report.findings.items()])
    section("Impression", [f"{i}. {t}" for i, t in enumerate(report.impression, 1)])
    section("Confidence", [report.confidence])
    section("Limitations", [f"- {t}" for t in report.limitations])
    section("Disclaimer", [report.disclaimer])
    return bytes(pdf.output())


def findings_csv(scores: list[LabelScore], threshold: float | None = None) -> str:
    """One row per pathology: pathology, probability, uncertainty, threshold, positive."""
    import csv
    import io

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["pathology", "probability", "uncertainty", "threshold", "positive"])
    for s in scores:
        limit = threshold if threshold is not None else s.threshold
        writer.writerow([s.pathology, f"{s.probability:.4f}", f"{s.uncertainty:.4f}", f"{limit:.4f}",
                         int(s.probability >= limit)])
    return buf.getvalue()


def _latin1(text: str) -> str:
    return text.encode("latin-1", "replace").decode("latin-1")
