"""RunLog's optional Weights & Biases side, through a recording stand-in for the `wandb` module (the locked
environment leaves wandb out: it would move httpx under the openai client); the metrics.jsonl side of a
rewind is proven by the train.py runs in test_train.py."""

import sys
import types

import pytest

import train
from longcat_jax.training.run_log import RunLog, read_metrics


class _Run:
    def __init__(self, **kwargs):
        self.init, self.logged, self.finished = kwargs, [], False

    def log(self, values, step):
        self.logged.append((step, values))

    def finish(self):
        self.finished = True


@pytest.fixture
def fake_wandb(monkeypatch):
    runs = []

    def init(**kwargs):
        runs.append(_Run(**kwargs))
        return runs[-1]

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(
        init=init, util=types.SimpleNamespace(generate_id=lambda: f"id{len(runs)}")))
    return runs


def test_wandb_gets_each_step_once_and_the_same_run_on_resume(tmp_path, fake_wandb, capsys):
    log = RunLog(str(tmp_path), resume=False, wandb_project="proj", settings={"steps": 4})
    for step in (1, 2, 3):
        log.metrics(step, {"loss": 5.0 - step, "skipped": False})
    log.rewind(1)  # steps 2-3 abandoned: done again below
    for step in (2, 3, 4):
        log.metrics(step, {"loss": 1.0 * step})
    log.close()
    run = fake_wandb[0]
    assert run.init["project"] == "proj" and run.init["config"] == {"steps": 4} and run.finished
    assert [s for s, _ in run.logged] == [1, 2, 3, 4] and run.logged[0][1] == {"loss": 4.0}
    assert [r["step"] for r in read_metrics(str(tmp_path))] == [1, 2, 3, 4]  # the replayed values
    assert read_metrics(str(tmp_path))[1]["loss"] == 2.0
    assert "Weights & Biases keeps the values it got for steps 2-3" in (tmp_path / "events.log").read_text()
    RunLog(str(tmp_path), resume=True, wandb_project="proj").close()
    assert fake_wandb[1].init["id"] == run.init["id"] == "id0" and fake_wandb[1].init["resume"] == "allow"


def test_wandb_flag_without_the_package_is_one_line(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    with pytest.raises(SystemExit):
        train.parse_args(["--wandb", "proj"])
    assert "--wandb: the wandb package is not installed" in capsys.readouterr().err.strip().splitlines()[-1]
