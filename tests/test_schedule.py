"""How in-process decoding shares the cores with the model: the plans, the measured choice, and runs
that switch plans mid-way and still hand every file over once, in order."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

import indexer.prepare as prep
from cxrmodel.errors import DataError
from indexer.schedule import (
    DecodePlan,
    PlanTrial,
    ScheduleConfig,
    balanced_split,
    candidate_plans,
    fastest,
    parse_plan,
)

TURNS = DecodePlan(2, 2, ahead=False)
AHEAD = DecodePlan(2, 2, ahead=True)
SPLIT = DecodePlan(1, 1, ahead=True)
TRIAL = ScheduleConfig(trial_from=1, window=2, rounds=2)


@pytest.mark.parametrize("text, plan", [("auto", None), ("turns", TURNS), ("ahead", AHEAD), ("AHEAD:1:1", SPLIT),
                                        ("ahead:3:2", DecodePlan(3, 2, ahead=True))])
def test_decode_plans_are_spelt_as_the_flag_says(text, plan):
    assert parse_plan(text, cores=2) == plan
    if plan is not None:
        assert parse_plan(plan.spelling, cores=2) == plan


@pytest.mark.parametrize("text", ["sideways", "ahead:0:2", "ahead:1", "ahead:a:b", "turns:2", ""])
def test_a_bad_decode_plan_is_refused_in_words(text):
    with pytest.raises(DataError, match="not a decode plan: use auto, turns, ahead, or ahead:D:M"):
        parse_plan(text, cores=2)


def test_the_split_follows_the_measured_costs_and_leaves_each_stage_a_core():
    assert balanced_split(8, decode_core_s=1.0, model_core_s=3.0) == 2  # decoding is a quarter of the work
    assert balanced_split(8, decode_core_s=3.0, model_core_s=1.0) == 6
    assert balanced_split(2, decode_core_s=0.001, model_core_s=10.0) == 1  # never no decoder
    assert balanced_split(2, decode_core_s=10.0, model_core_s=0.001) == 1  # never no model thread
    assert balanced_split(4, 0.0, 0.0) == 2


def test_the_candidates_split_the_cores_only_where_the_model_threads_can_be_set():
    assert candidate_plans(2, 9e-3, 17.6e-3, can_set_threads=True) == [TURNS, AHEAD, SPLIT]
    assert candidate_plans(2, 9e-3, 17.6e-3, can_set_threads=False) == [TURNS, AHEAD]
    assert candidate_plans(1, 9e-3, 17.6e-3, can_set_threads=True) == [DecodePlan(1, 1, False), DecodePlan(1, 1, True)]
    assert candidate_plans(8, 1.0, 3.0, True)[-1] == DecodePlan(2, 6, ahead=True)


def test_another_plan_must_beat_in_turns_by_the_margin():
    assert fastest({TURNS: 1.0, AHEAD: 0.99}, TURNS, margin=0.03) == TURNS  # 1%: noise on a shared machine
    assert fastest({TURNS: 1.0, AHEAD: 0.95, SPLIT: 0.96}, TURNS, margin=0.03) == AHEAD
    assert fastest({TURNS: 1.0, AHEAD: 1.2}, TURNS) == TURNS


def simulate(trial: PlanTrial, ms_per_file, files_per_batch: int = 32) -> list[DecodePlan]:
    """Feed `trial` the batches a CPU with these per-file costs (ms) would measure; the plans run, in order."""
    ran = []
    while trial.trying:
        plan = trial.next_plan()
        seconds, wait, cpu = (x * 1e-3 * files_per_batch for x in ms_per_file(plan))
        trial.record(plan, seconds, files_per_batch, wait, cpu)
        ran.append(plan)
    return ran


def amx_like(plan: DecodePlan) -> tuple[float, float, float]:
    """AMX: decoding (9 ms of a core per file) costs as much as the model, whose matrix units gain little
    from a second thread (10 ms per file on one, 8.8 on two): (wall, decode wait, decode CPU) per file."""
    decode, model = 9.0, {1: 10.0, 2: 8.8}[plan.model_threads]
    if not plan.ahead:
        return decode / plan.decode_threads + model, decode / plan.decode_threads, decode
    shared = 1.3 if plan.decode_threads + plan.model_threads > 2 else 1.0  # oversubscribed cores
    return max(decode / plan.decode_threads, model) * shared, 0.0, decode


def bf16_scaling_like(plan: DecodePlan) -> tuple[float, float, float]:
    """AVX-512 BF16: the model scales with its threads (28 ms per file on one, 15 on two), decoding 8 ms."""
    decode, model = 8.0, {1: 28.0, 2: 15.0}[plan.model_threads]
    if not plan.ahead:
        return decode / plan.decode_threads + model, decode / plan.decode_threads, decode
    shared = 1.03 if plan.decode_threads + plan.model_threads > 2 else 1.0
    return max(decode / plan.decode_threads, model) * shared + decode / 2, 0.0, decode


def test_a_cpu_whose_model_does_not_scale_decodes_ahead_on_a_split():
    trial = PlanTrial(cores=2, files=10_000, config=TRIAL)
    ran = simulate(trial, amx_like)
    assert trial.chosen == SPLIT
    assert set(ran) == {TURNS, AHEAD, SPLIT}
    assert ran[0] == TURNS and ran.count(TURNS) == 1 + 2  # warm-up, costs window; 33% slower: not tried again
    assert ran.count(SPLIT) == ran.count(AHEAD) == 2 * (1 + 2)  # two rounds: a batch to settle, two measured
    assert "ahead of the model: decode on 1 thread, model on 1" in trial.describe()
    assert "turns 13.3" in trial.describe()  # 4.5 ms of decoding on two cores + 8.8 ms of model


def test_a_cpu_whose_model_scales_stays_in_turns():
    trial = PlanTrial(cores=2, files=10_000, config=TRIAL)
    ran = simulate(trial, bf16_scaling_like)
    assert trial.chosen == TURNS
    assert {TURNS, AHEAD, SPLIT} <= set(trial.measured)
    assert ran.count(SPLIT) == 1 + 2  # 68% slower after one round: dropped
    assert ran.count(AHEAD) == ran.count(TURNS) == 2 * (1 + 2)


def test_without_settable_model_threads_the_split_is_not_tried():
    trial = PlanTrial(cores=2, files=10_000, config=TRIAL, can_set_threads=False)
    assert SPLIT not in simulate(trial, amx_like)
    assert trial.chosen in (TURNS, AHEAD)


@pytest.mark.parametrize("files, plan, expected", [(100, "auto", TURNS), (10_000, "turns", TURNS),
                                                   (10_000, "ahead:1:1", SPLIT)])
def test_a_small_run_or_a_fixed_plan_measures_nothing(files, plan, expected):
    trial = PlanTrial(cores=2, files=files, config=ScheduleConfig(plan=plan, trial_from=2048))
    assert not trial.trying and trial.next_plan() == expected
    trial.record(expected, 1.0, 32)
    assert trial.measured == {} and trial.describe() == f"decode: {expected}"


def test_a_batch_run_on_another_plan_than_the_trial_queued_is_a_bug():
    trial = PlanTrial(cores=2, files=10_000, config=TRIAL)
    with pytest.raises(ValueError, match="queued"):
        trial.record(SPLIT, 1.0, 32)


class FakeClock:
    """A clock that moves only when told, so a trial's choice does not depend on this machine's load."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def fake_prepare(monkeypatch):
    started: list[str] = []
    lock = threading.Lock()

    def prepare(task, preprocess, limits):
        with lock:
            started.append(task.path)
        return prep.Prepared(path=task.path)

    monkeypatch.setattr(prep, "prepare", prepare)
    return started


@pytest.mark.parametrize("plan", ["turns", "ahead", "ahead:1:1", "auto"])
def test_every_plan_hands_every_file_over_once_in_order(plan, fake_prepare):
    tasks = [prep.PrepareTask(f"f{i}") for i in range(103)]
    clock, threads = FakeClock(), []
    trial = PlanTrial(2, len(tasks), ScheduleConfig(plan=plan, trial_from=1, window=1, rounds=1))
    out = []
    for item in prep.prepare_scheduled(tasks, None, None, 4, trial, threads.append, clock=clock):
        out.append(item.path)
        clock.now += 0.001 * (trial.next_plan() == AHEAD)  # "ahead" measures slowest
    assert out == [t.path for t in tasks]
    assert sorted(fake_prepare) == sorted(t.path for t in tasks)  # each decoded once, none ahead of the end
    assert not trial.trying  # 26 batches: enough for the whole trial
    if plan == "auto":
        assert trial.chosen == TURNS and set(trial.measured) == {TURNS, AHEAD, SPLIT}
        assert threads == [2, 1, 2]  # in turns and ahead on both cores, split between the stages, back
    else:
        assert set(threads) == {parse_plan(plan, 2).model_threads}


def wait_for(condition, seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    return condition()


@pytest.mark.parametrize("plan, decoded_while_held", [("turns", 4), ("ahead:1:1", 8), ("ahead", 8)])
def test_ahead_decodes_the_next_batch_while_the_caller_holds_this_one(plan, decoded_while_held, fake_prepare):
    tasks = [prep.PrepareTask(f"f{i}") for i in range(12)]
    trial = PlanTrial(2, len(tasks), ScheduleConfig(plan=plan))
    items = prep.prepare_scheduled(tasks, None, None, 4, trial)
    first = [next(items) for _ in range(4)]
    assert wait_for(lambda: len(fake_prepare) >= decoded_while_held)
    time.sleep(0.05)
    assert len(fake_prepare) == decoded_while_held  # the batch after next is not started
    assert [p.path for p in first + list(items)] == [t.path for t in tasks]


def test_a_caller_that_stops_early_leaves_no_decoding_behind(fake_prepare):
    tasks = [prep.PrepareTask(f"f{i}") for i in range(40)]
    items = prep.prepare_scheduled(tasks, None, None, 4, PlanTrial(2, 40, ScheduleConfig(plan="ahead")))
    next(items)
    items.close()  # e.g. the model raised
    decoded = len(fake_prepare)
    time.sleep(0.05)
    assert decoded == len(fake_prepare) <= 8
    assert not [t for t in threading.enumerate() if t.name.startswith("radlens-decode")]


def test_an_index_run_that_measures_its_plan_stores_what_a_run_in_turns_stores(tiny_model_dir, tmp_path):
    """Switching plans batch by batch changes no vector, and the model's threads are put back."""
    import torch

    from cxrmodel.model.encoder import EncoderConfig, load_encoder
    from indexer.pipeline import IndexJob, run_index
    from indexer.store import default_db_url
    from tests.databases import fetch
    from tests.imagegen import gray_image

    images = tmp_path / "images"
    images.mkdir()
    for i in range(60):
        gray_image(i, (40 + i % 7, 48)).save(images / f"g{i:02d}.png")
    threads_before = torch.get_num_threads()
    vectors, plans = {}, {}
    for plan in ("turns", "auto"):
        encoder = load_encoder(EncoderConfig(model=str(tiny_model_dir), precision="fp32", batch_size=4))
        summary = run_index(IndexJob(sources=[str(images)], data_dir=tmp_path / plan, workers=0, progress=False,
                                     query_tower=False, decode=ScheduleConfig(plan=plan, trial_from=1, window=1,
                                                                              rounds=1)), encoder)
        assert torch.get_num_threads() == threads_before
        plans[plan] = summary.decode_plan
        rows = fetch(default_db_url(tmp_path / plan), "select i.path, e.vector from embeddings e join images i "
                                                      "on i.id = e.image_id")
        vectors[plan] = {path: np.frombuffer(v, "<f4") for path, v in rows}
    assert plans["turns"] == f"decode: {DecodePlan(prep.available_cores(), threads_before, ahead=False)}"
    assert "the fastest measured in this run (ms per file: turns " in plans["auto"]
    assert len(vectors["auto"]) == 60 and vectors["auto"].keys() == vectors["turns"].keys()
    rerun = run_index(IndexJob(sources=[str(images)], data_dir=tmp_path / "turns", workers=0, progress=False,
                               query_tower=False), encoder)
    assert rerun.unchanged == 60 and rerun.decode_plan == ""  # nothing was decoded, so no plan is claimed
    for path, vector in vectors["turns"].items():
        np.testing.assert_allclose(vectors["auto"][path], vector, atol=1e-6)


def test_a_misspelt_decode_flag_fails_before_the_model_loads(tmp_path, capsys):
    from radlens.cli import main

    (tmp_path / "img").mkdir()
    code = main(["index", str(tmp_path / "img"), "--data-dir", str(tmp_path / "d"), "--decode", "sideways",
                 "--model", str(tmp_path / "no-model")])
    err = capsys.readouterr().err
    assert code == 1 and "--decode 'sideways' is not a decode plan" in err and "Traceback" not in err
    assert "no-model" not in err


def test_a_decode_plan_with_decode_processes_is_refused(tmp_path, capsys):
    from radlens.cli import main

    (tmp_path / "img").mkdir()
    code = main(["index", str(tmp_path / "img"), "--data-dir", str(tmp_path / "d"), "--decode", "ahead",
                 "--workers", "2", "--model", str(tmp_path / "no-model")])
    err = capsys.readouterr().err
    assert code == 1 and "with --workers 2 files are decoded in worker processes" in err and "no-model" not in err


def test_auto_in_any_spelling_goes_with_decode_processes(tmp_path, capsys):
    from radlens.cli import main

    (tmp_path / "img").mkdir()
    code = main(["index", str(tmp_path / "img"), "--data-dir", str(tmp_path / "d"), "--decode", "AUTO",
                 "--workers", "2", "--model", str(tmp_path / "no-model")])
    err = capsys.readouterr().err
    assert code == 1 and "no-model" in err and "--decode" not in err  # refused for the model only


def test_a_run_with_decode_processes_says_so(tiny_encoder, tmp_path):
    from indexer.pipeline import IndexJob, run_index
    from tests.imagegen import gray_image

    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        gray_image(i).save(images / f"g{i}.png")
    summary = run_index(IndexJob(sources=[str(images)], data_dir=tmp_path / "d", workers=1, progress=False,
                                 query_tower=False), tiny_encoder)
    assert summary.added == 3 and summary.decode_plan == "decode: in 1 worker process beside the model"


def test_the_threads_a_user_gave_the_model_are_kept(tiny_model_dir, tmp_path, monkeypatch):
    """OMP_NUM_THREADS=1 (or torch.set_num_threads(1)) on a shared machine: decoding in turns, and the
    trial's plans, never give the model more threads than that."""
    import torch

    from cxrmodel.model.encoder import EncoderConfig, load_encoder
    from indexer.pipeline import IndexJob, run_index
    from tests.imagegen import gray_image

    images = tmp_path / "images"
    images.mkdir()
    for i in range(24):
        gray_image(i).save(images / f"g{i:02d}.png")
    encoder = load_encoder(EncoderConfig(model=str(tiny_model_dir), precision="fp32", batch_size=4))
    before, given = torch.get_num_threads(), []
    torch.set_num_threads(1)
    try:
        monkeypatch.setattr(torch, "set_num_threads", lambda n: given.append(n))
        for plan in ("turns", "auto"):
            run_index(IndexJob(sources=[str(images)], data_dir=tmp_path / plan, workers=0, progress=False,
                               query_tower=False, decode=ScheduleConfig(plan=plan, trial_from=1, window=1,
                                                                        rounds=1)), encoder)
    finally:
        monkeypatch.undo()
        torch.set_num_threads(before)
    assert given and set(given) == {1}
