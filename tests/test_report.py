"""`launch report` over a real (short) run directory, a sweep of them, and a run still in progress."""
from __future__ import annotations

import shutil

import pytest

from launcher.cli import main as launch
from launcher.compose import compose_config, to_config

SHORT = ["trainer.max_steps=10", "trainer.log_every=2", "trainer.eval_every=5", "data.max_eval_examples=8",
         "data.eval_exact_match=false", "trainer.export_hf=false",
         "trainer.global_batch_size=16", "trainer.micro_batch_size=8"]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """A sweep directory: job 0 is a real 10-step run of the default job, job 1 a copy still 'running'."""
    from launcher.loop import train

    sweep_dir = tmp_path_factory.mktemp("sweep")
    train(to_config(compose_config(SHORT)), sweep_dir / "0")
    shutil.copytree(sweep_dir / "0", sweep_dir / "1", ignore=shutil.ignore_patterns("checkpoints"))
    (sweep_dir / "1" / "summary.json").unlink()
    with open(sweep_dir / "1" / "metrics.jsonl", "a") as f:
        f.write('{"step": 12, "lo')  # a row being written right now
    return sweep_dir


def test_report_of_one_run_writes_table_and_plot_into_the_run_dir(sweep, capsys):
    launch(["report", str(sweep / "0")])
    out = capsys.readouterr().out
    header, _, row = out.splitlines()[:3]
    assert header.split("|")[1].strip() == "run" and "best eval" in header
    assert row.split("|")[1].strip() == "0" and row.split("|")[2].strip() == "10"  # steps
    png = sweep / "0" / "report.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert (sweep / "0" / "report.md").read_text().splitlines()[2] == row


def test_report_of_a_sweep_has_one_row_per_job(sweep, tmp_path, capsys):
    launch(["report", str(sweep), "--out", str(tmp_path)])
    rows = capsys.readouterr().out.splitlines()[2:4]
    assert [r.split("|")[1].strip() for r in rows] == ["0", "1 (running)"]
    assert rows[1].split("|")[2].strip() == "10"  # the half-written row is skipped
    assert (tmp_path / "report.png").is_file()


def test_report_errors_are_one_line(sweep, tmp_path):
    with pytest.raises(SystemExit, match="no metrics.jsonl under"):
        launch(["report", str(tmp_path)])
    with pytest.raises(SystemExit, match="pass --out DIR"):
        launch(["report", str(sweep / "0"), str(sweep / "1")])
