"""How in-process decoding shares the cores with a CPU model: chosen by measuring, not by a fixed rule.

Two ways to run the decode stage (`prepare.prepare_scheduled` carries them out):

- **in turns**: a batch is decoded on every core, then the model runs on every core;
- **ahead**: the next batch is decoded on D threads while the model computes this one on M threads
  (D + M may exceed the cores: decoders then fill the moments the model's threads wait).

Which is faster depends on the CPU. Where the model's matrix units do not scale with its threads (AMX),
running ahead can win; where bf16 GEMMs scale with cores (AVX-512 BF16 on AMD), the two measured within
noise of each other (bench/README). So a run with enough files tries each plan for a few batches,
interleaved so that a change in the machine's load falls on all of them, and keeps the fastest for the
rest of the run (`PlanTrial`). The thread split of the "ahead" candidate comes from the per-stage costs
measured in the first batches (`balanced_split`). Everything here is pure bookkeeping: no threads, no
clocks, no torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cxrmodel.errors import DataError


@dataclass(frozen=True)
class DecodePlan:
    """How one batch is decoded relative to the model."""

    decode_threads: int
    model_threads: int
    ahead: bool  # decode the next batch while the model computes this one

    def __str__(self) -> str:
        if not self.ahead:
            return f"in turns with the model: decode on {_threads(self.decode_threads)}, model on {self.model_threads}"
        return f"ahead of the model: decode on {_threads(self.decode_threads)}, model on {self.model_threads}"

    @property
    def spelling(self) -> str:
        """How `--decode` spells this plan."""
        return "turns" if not self.ahead else f"ahead:{self.decode_threads}:{self.model_threads}"


AUTO = "auto"


def _threads(n: int) -> str:
    return f"{n} thread" + ("s" if n != 1 else "")


def parse_plan(text: str, cores: int, model_threads: int | None = None) -> DecodePlan | None:
    """`--decode` value -> a fixed plan, or None for "auto" (measure). Raises DataError on a bad value.

    "turns": decoding on `cores` threads, then the model on `model_threads` (default `cores`: what the
    model is given, e.g. by OMP_NUM_THREADS, is kept); "ahead": the same thread counts, the stages
    overlapping; "ahead:D:M": ahead with D decode threads and the model on M threads.
    """
    value = text.strip().lower()
    model_threads = model_threads or cores
    if value == AUTO:
        return None
    if value == "turns":
        return DecodePlan(cores, model_threads, ahead=False)
    if value == "ahead":
        return DecodePlan(cores, model_threads, ahead=True)
    parts = value.split(":")
    if len(parts) == 3 and parts[0] == "ahead" and all(p.isdigit() and int(p) > 0 for p in parts[1:]):
        return DecodePlan(int(parts[1]), int(parts[2]), ahead=True)
    raise DataError(f"--decode {text!r} is not a decode plan: use auto, turns, ahead, or ahead:D:M "
                    "(D decode threads, the model on M threads, e.g. ahead:1:1)")


def balanced_split(cores: int, decode_core_s: float, model_core_s: float) -> int:
    """Decode threads for running ahead on `cores`: decoding's share of the core time per image (both
    measured), rounded, leaving at least one core to each stage."""
    total = decode_core_s + model_core_s
    share = decode_core_s / total if total > 0 else 0.5
    return min(max(round(cores * share), 1), cores - 1)


def candidate_plans(cores: int, decode_core_s: float, model_core_s: float, can_set_threads: bool,
                    model_threads: int | None = None) -> list[DecodePlan]:
    """The plans a run tries: in turns; ahead with the same threads; and, where the model's threads can be
    set and it has two or more, ahead with its threads split between the stages by their measured costs."""
    m = model_threads or cores
    plans = [DecodePlan(cores, m, ahead=False), DecodePlan(cores, m, ahead=True)]
    if can_set_threads and m >= 2:
        k = balanced_split(m, decode_core_s, model_core_s)
        plans.append(DecodePlan(k, m - k, ahead=True))
    return list(dict.fromkeys(plans))


def fastest(seconds_per_file: dict[DecodePlan, float], default: DecodePlan, margin: float = 0.03) -> DecodePlan:
    """The plan with the fewest measured seconds per file; `default` unless another beats it by `margin`
    (a share of the default's time), so noise alone does not move a run off the default."""
    best = min(seconds_per_file, key=seconds_per_file.get)
    if default in seconds_per_file and seconds_per_file[best] > seconds_per_file[default] * (1 - margin):
        return default
    return best


@dataclass(frozen=True)
class ScheduleConfig:
    """`--decode` and when a run measures its way to a plan."""

    plan: str = AUTO  # auto, turns, ahead, ahead:D:M
    trial_from: int = 4096  # files to decode from which "auto" tries the plans (fewer: in turns)
    window: int = 2  # batches measured per plan and round
    rounds: int = 2
    margin: float = 0.03  # how much faster than in turns another plan must measure to be kept
    drop_slower: float = 0.15  # after a round, plans this much slower than the best are not tried again


@dataclass
class _Totals:
    seconds: float = 0.0
    files: int = 0

    def add(self, seconds: float, files: int) -> None:
        self.seconds += seconds
        self.files += files

    @property
    def per_file(self) -> float:
        return self.seconds / self.files if self.files else float("inf")


@dataclass
class PlanTrial:
    """Which plan each batch of a run uses, from what the batches before it measured.

    A fixed plan (or a run of fewer than `trial_from` files) uses one plan throughout. Otherwise: batch 0
    warms the model up in turns; the next `window` batches, in turns, measure both stages' costs, from
    which the candidates are made; then, round by round, each candidate runs one batch to settle (the
    first batch after a switch has nothing decoded ahead) and `window` measured batches -- after the
    first round only those within `drop_slower` of the best, so a clearly slower plan costs one round.
    The fastest by seconds per file is kept for the rest of the run.
    """

    cores: int  # decode threads in turns (the cores this process may use)
    files: int
    config: ScheduleConfig = field(default_factory=ScheduleConfig)
    can_set_threads: bool = True
    model_threads: int | None = None  # the model's threads in turns (default: cores)
    chosen: DecodePlan | None = None
    measured: dict[DecodePlan, _Totals] = field(default_factory=dict)
    _queue: list[tuple[DecodePlan, bool]] = field(default_factory=list)  # (plan, measured?) of the batches to come
    _costs: _Totals = field(default_factory=_Totals)  # model core-seconds of the costs window
    _decode_core_s: float = 0.0  # decode CPU seconds of the costs window
    _round: int = -1  # -1: warm-up and the costs window
    _candidates: list[DecodePlan] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.model_threads = self.model_threads or self.cores
        self.turns = DecodePlan(self.cores, self.model_threads, ahead=False)
        fixed = parse_plan(self.config.plan, self.cores, self.model_threads)
        if fixed is not None or self.files < self.config.trial_from:
            self.chosen = fixed or self.turns
            return
        self._queue = [(self.turns, False)] + [(self.turns, True)] * self.config.window

    @property
    def trying(self) -> bool:
        """Whether the run is still measuring plans."""
        return self.chosen is None

    def next_plan(self) -> DecodePlan:
        """The plan of the next batch."""
        if self.chosen is not None:
            return self.chosen
        return self._queue[0][0]

    def record(self, plan: DecodePlan, seconds: float, files: int, decode_wait_s: float = 0.0,
               decode_cpu_s: float = 0.0) -> None:
        """One batch done: its wall seconds (decode wait + what the caller did with it: the model), its
        files, the part of it spent waiting for decoding, and the CPU seconds its decoding took."""
        if self.chosen is not None or not self._queue:
            return
        queued, measured = self._queue.pop(0)
        if queued != plan:
            raise ValueError(f"batch ran {plan}, but the trial had queued {queued}")
        if measured:
            self.measured.setdefault(plan, _Totals()).add(seconds, files)
            if self._round < 0:  # the costs window: in turns, so the model had all its threads
                self._costs.add((seconds - decode_wait_s) * self.model_threads, files)
                self._decode_core_s += decode_cpu_s
        if not self._queue:
            self._next_round()

    def _next_round(self) -> None:
        """Queue the next round's batches, or choose once no round is left or one plan is."""
        self._round += 1
        if self._round == 0:
            files = max(self._costs.files, 1)
            self._candidates = candidate_plans(self.cores, self._decode_core_s / files, self._costs.per_file,
                                               self.can_set_threads, self.model_threads)
            contenders = [p for p in self._candidates if p != self.turns]  # in turns was just measured
        else:
            best = min(t.per_file for t in self.measured.values())
            contenders = [p for p in self._candidates
                          if self.measured[p].per_file <= best * (1 + self.config.drop_slower)]
        if self._round < self.config.rounds and (len(contenders) > 1 or self._round == 0):
            for p in contenders:
                self._queue += [(p, False)] + [(p, True)] * self.config.window
        if not self._queue:
            self.chosen = fastest({p: t.per_file for p, t in self.measured.items()}, self.turns, self.config.margin)

    def describe(self) -> str:
        """The plan in use and, when it was measured, what each candidate measured (ms per file)."""
        if self.chosen is None:
            return f"decode: trying plans ({self.next_plan()} now)"
        if not self.measured:
            return f"decode: {self.chosen}"
        others = "; ".join(f"{p.spelling} {t.per_file * 1e3:.1f}" for p, t in self.measured.items())
        return f"decode: {self.chosen}, the fastest measured in this run (ms per file: {others})"
