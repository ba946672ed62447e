"""The JSON API's response bodies as typed models: the OpenAPI document's schemas are generated from them.

Pydantic, because its JSON Schema output is the 2020-12 dialect OpenAPI 3.1 uses as is (no translation
layer, no route framework to adopt: the handlers stay plain Flask). Every model forbids unknown fields,
so a response that grows a field the contract does not name fails the API fuzzer (schemathesis, in the
test suite) instead of drifting silently. The handlers build their bodies with the domain objects'
`to_dict()`; these models only describe them.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Error(Strict):
    """Every 4xx/5xx answer of the API."""

    error: str = Field(description="what went wrong, in one line")
    status: int = Field(description="the HTTP status, repeated")


class Health(Strict):
    """Liveness; the index's size and model only for callers the server trusts."""

    status: Literal["ok"]
    version: str
    generation: int | None = None
    vectors: int | None = None
    skipped: int | None = None
    index_type: str | None = None
    model: str | None = None
    dim: int | None = None
    adapter: bool | None = None
    format: str | None = Field(default=None, description="the checkpoint format the model was loaded from")


class Match(Strict):
    """How strong a hit is, against what unrelated content scores in this index (README: relevance)."""

    verdict: Literal["strong", "weak", "none", "not measured"]
    percentile: float | None = Field(description="share of the null below this score")
    basis: str


class StoredApplicability(Strict):
    """The index-time decision whether the 14 chest labels apply to an image."""

    applicable: bool
    source: str = Field(description="metadata, image statistics, model (uncalibrated share) or calibrated")
    confidence: float
    reason: str
    view: str | None
    kind: str | None


class Applicability(StoredApplicability):
    """The decision with what it rests on, in words."""

    basis: str


class ImageInfo(Strict):
    """Public metadata of an indexed image (never its server-side path)."""

    id: int
    content_hash: str
    width: int | None
    height: int | None
    format: str | None
    size_bytes: int | None
    file_name: str
    modality: str | None
    body_part: str | None
    view: str | None
    caption: str | None
    labels: str | None
    source: str | None
    study_description: str | None
    indication: str | None
    age_band: str | None
    sex: str | None
    has_priors_key: bool
    added_at: str | None
    updated_at: str | None


class TopPathology(Strict):
    pathology: str
    probability: float = Field(description="calibrated probability (assessed pathologies only)")


class Hit(Strict):
    """One search result."""

    id: int
    score: float = Field(description="cosine similarity to the query (not a probability)")
    generation: int
    image: ImageInfo
    match: Match | None
    applicability: StoredApplicability | None
    pathologies: dict[str, float] = Field(description="calibrated probabilities of the assessed pathologies")
    top_pathologies: list[TopPathology]


class SearchResults(Strict):
    query: str
    k: int
    filters: list[str]
    results: list[Hit]


class UploadResults(Strict):
    k: int
    filters: list[str]
    results: list[Hit]


class SimilarToResults(Strict):
    image_id: int
    k: int
    filters: list[str]
    results: list[Hit]


class StoredScore(Strict):
    score: float = Field(description="the raw zero-shot score stored at index time (not a probability)")
    uncertainty: float = Field(description="2 SD of the raw score across the prompt sets, stored at index time: "
                               "raw units, not an error bar (the report's range is across preprocessings)")
    assessed: bool
    probability: float | None = Field(default=None, description="present only where the model is assessed")


class ImageRecord(ImageInfo):
    """An indexed image's metadata, stored scores and index-time applicability."""

    scores: dict[str, StoredScore]
    applicability: StoredApplicability | None


class Label(Strict):
    """One pathology: a calibrated probability where assessed, else a raw score (never a finding)."""

    pathology: str
    kind: Literal["probability", "score"]
    assessed: bool
    probability: float | None = None
    score: float | None = None
    raw_score: float
    uncertainty: float = Field(description="2 SD of the value across the preprocessing ensemble, in the value's "
                               "units (probability where assessed, else raw score); not a measured error bar")
    range: list[float] = Field(description="[lowest, highest] value across the preprocessing ensemble, in the "
                               "value's units")
    threshold: float | None
    positive: bool
    skill: dict[str, Any] = Field(description="the measured basis: AUROC and interval, or why not assessed")
    members: dict[str, float] = Field(description="raw score of each prompt x preprocessing ensemble member")
    variants: dict[str, float] = Field(description="raw prompt-ensemble score of each preprocessing variant")


class Finding(Strict):
    pathology: str
    probability: float
    uncertainty: float = Field(description="2 SD of the probability across the preprocessing ensemble")
    threshold: float
    present: bool
    low: float | None = Field(None, description="lowest probability across the preprocessing ensemble")
    high: float | None = Field(None, description="highest probability across the preprocessing ensemble")
    sensitivity: float | None = Field(None, description="share of films with the finding that this threshold "
                                      "flagged on the calibration set (null: threshold set by hand)")
    specificity: float | None = Field(None, description="share of films without it that it left unflagged")


class Report(Strict):
    """The structured report (technique, findings by region, impression, confidence, limitations)."""

    technique: str
    findings: dict[str, list[Finding]]
    impression: list[str]
    confidence: str
    limitations: list[str]
    disclaimer: str
    clinical_information: list[str]
    recommendations: list[str]
    applicability: Applicability | None
    lang: str
    metadata: dict[str, Any]
    not_assessed: list[dict[str, Any]]
    calibrated: bool


class LabelResult(Strict):
    applicability: Applicability
    labels: list[Label]
    report: Report


class PriorStudy(Strict):
    id: int
    days_from_this: int | None
    file_name: str
    modality: str | None
    view: str | None
    current: bool
    scores: dict[str, float]


class PriorChange(Strict):
    from_: int = Field(alias="from")
    to: int
    delta: dict[str, float]


class Priors(Strict):
    studies: list[PriorStudy]
    changes: list[PriorChange]
    reason: str | None = None


class OpenAPIDocument(BaseModel):
    """This document (not described further)."""

    model_config = ConfigDict(extra="allow")
    openapi: str


RESPONSE_MODELS = (Error, Health, SearchResults, UploadResults, SimilarToResults, ImageRecord, LabelResult,
                   Report, Label, Priors, OpenAPIDocument)
