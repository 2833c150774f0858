"""Resumed logs hold no duplicated or out-of-order rows (issue 10 items 9 and 10: metrics.jsonl, samples.md).

A run logs past its last checkpoint, crashes (possibly twice), and is resumed: every log must equal the
uninterrupted run's."""
from __future__ import annotations

import pytest

from proxrl.runs import MetricsLogger, StepLog, read_metrics


def _log(run, steps, resume_from_step=None):
    with MetricsLogger(run, tensorboard=False, resume_from_step=resume_from_step) as log:
        for s in steps:
            log.log(s, {"loss": 1.0 / s, **({"kl": s * 0.1} if s >= 3 else {})})


def test_metrics_after_two_crashes_and_resumes_equal_the_uninterrupted_run(tmp_path):
    ref, run = tmp_path / "ref", tmp_path / "run"
    _log(ref, range(1, 9))
    _log(run, range(1, 6))                       # checkpoint at 2, crash after logging 5
    _log(run, range(3, 8), resume_from_step=2)   # checkpoint at 6, crash after logging 7
    _log(run, range(7, 9), resume_from_step=6)
    steps = [r["step"] for r in read_metrics(run)]
    assert steps == list(range(1, 9))            # no duplicates, in order
    assert (run / "metrics.jsonl").read_text() == (ref / "metrics.jsonl").read_text()
    assert (run / "metrics.csv").read_text() == (ref / "metrics.csv").read_text()


def test_resume_from_step_zero_drops_every_row_of_a_run_without_checkpoint(tmp_path):
    _log(tmp_path, range(1, 4))
    _log(tmp_path, [1], resume_from_step=0)
    assert [r["step"] for r in read_metrics(tmp_path)] == [1]
    assert (tmp_path / "metrics.csv").read_text() == "step,loss\n1,1.0\n"


def _tables(log, updates):
    for u in updates:
        log.append(u, f"### update {u}\n\n| # | completion |\n|---|---|\n| 0 | text {u} |\n")


def test_step_log_resume_drops_sections_past_the_checkpoint(tmp_path):
    ref, path = tmp_path / "ref.md", tmp_path / "samples.md"
    _tables(StepLog(ref), range(1, 6))
    _tables(StepLog(path), range(1, 5))                     # checkpoint after update 2, crash after 4
    _tables(StepLog(path, resume_from_step=2), range(3, 6))
    text = path.read_text()
    assert text == ref.read_text()
    assert text.count("### update 3") == 1 and text.count("### update 4") == 1
    assert text.index("### update 2") < text.index("### update 3") < text.index("### update 5")


def test_step_log_keeps_unmarked_text_and_is_a_no_op_without_resume(tmp_path):
    path = tmp_path / "samples.md"
    path.write_text("old table without markers\n")
    log = StepLog(path)
    log.append(1, "one")
    log.append(2, "two\n")
    StepLog(path)  # plain reopen: nothing dropped
    assert path.read_text() == "old table without markers\n<!-- step 1 -->\none\n<!-- step 2 -->\ntwo\n"
    StepLog(path, resume_from_step=1)
    assert path.read_text() == "old table without markers\n<!-- step 1 -->\none\n"
    StepLog(tmp_path / "absent.md", resume_from_step=3)  # nothing to trim
    assert not (tmp_path / "absent.md").exists()
    with pytest.raises(ValueError):
        log.append(1.5, "x")
