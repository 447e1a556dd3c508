"""The SLURM launcher without SLURM: the sbatch text against recorded files, and the job array end to end
through submitit's ``local`` executor (fake jobs), including a timeout that requeues and resumes."""

from __future__ import annotations

import os
import pickle
import sys
from pathlib import Path

import pytest

pytest.importorskip("submitit")

from experiments.launchers import base as B  # noqa: E402
from experiments.launchers import slurm as S  # noqa: E402
from transformer_lit import config as C  # noqa: E402

GOLDEN = Path(__file__).resolve().parent / "golden" / "sbatch"
REFRESH = "TLIT_REFRESH_GOLDEN"
CASES = {
    "table3_paper_2gpus": dict(
        opts=S.SlurmOptions(
            folder=Path("/shared/tlit/results/slurm/table3/paper"),
            partition="gpu",
            time_min=720,
            mem_gb=64,
            extra={"account": "nlp", "constraint": "h100"},
        ),
        slots=2,
        name="tlit-table3-paper",
        tasks=20,
    ),
    "table3_tiny_cpu_only": dict(
        opts=S.SlurmOptions(
            folder=Path("/shared/tlit/results/slurm/table3/tiny"),
            partition="debug",
            time_min=10,
            mem_gb=1.5,
            gpus=False,
            max_requeues=1,
        ),
        slots=1,
        name="tlit-table3-tiny",
        tasks=4,
    ),
    "table3_small_defaults": dict(
        opts=S.SlurmOptions(folder=Path("/shared/tlit/results/slurm/table3/small")),
        slots=1,
        name="tlit-table3-small",
        tasks=7,
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_sbatch_script_matches_the_recorded_file(case):
    c = CASES[case]
    text = S.sbatch_script(c["opts"], c["slots"], c["name"], c["tasks"], python="python")
    path = GOLDEN / f"{case}.sh"
    if os.environ.get(REFRESH):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert path.is_file(), (
        f"{path} missing; create it on purpose with: {REFRESH}=1 pytest tests/test_slurm.py"
    )
    assert text == path.read_text(), (
        f"the sbatch script differs from {path}. If the change is intended (a new option, a submitit "
        f"upgrade), review the diff and refresh it on purpose with: {REFRESH}=1 pytest tests/test_slurm.py"
    )


def test_sbatch_asks_for_what_a_run_needs():
    c = CASES["table3_paper_2gpus"]
    text = S.sbatch_script(c["opts"], c["slots"], c["name"], c["tasks"], python="python")
    for line in (
        "#SBATCH --array=0-19%20",
        "#SBATCH --gpus-per-node=2",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --cpus-per-task=16",
        "#SBATCH --requeue",
        "#SBATCH --signal=USR2@120",
        "#SBATCH --partition=gpu",
        "#SBATCH --account=nlp",
    ):
        assert line in text.splitlines(), line


def test_parameters_are_ones_submitit_slurm_accepts():
    from submitit.slurm import slurm as submitit_slurm

    valid = set(submitit_slurm._get_default_parameters())
    params = S.sbatch_parameters(CASES["table3_paper_2gpus"]["opts"], 2, "x")
    assert set(params) <= valid, set(params) - valid


def test_cluster_is_explicit():
    with pytest.raises(ValueError, match="cluster must be one of slurm, local, debug"):
        S.SlurmLauncher(S.SlurmOptions(), cluster="auto")


def test_train_task_pickles_without_its_process_and_lock(tmp_path):
    task = S.TrainTask(retries=2)
    task._proc, task._lock = object(), object()
    clone = pickle.loads(pickle.dumps(task))
    assert clone.retries == 2 and clone._proc is None and clone._lock is None


def test_train_task_hides_the_slurm_world_from_lightning(tmp_path, monkeypatch):
    """In a SLURM task the child must not see SLURM_NTASKS (Lightning would wait for srun ranks)."""
    monkeypatch.setenv("SLURM_NTASKS", "1")
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    code = (
        "import os, sys, json; print('NTASKS=' + os.environ.get('SLURM_NTASKS', 'unset')); "
        "json.dump({'status': 'complete'}, open(sys.argv[1] + '/summary.json', 'w'))"
    )
    job = B.Job("j", [sys.executable, "-c", code, str(tmp_path)], tmp_path)
    out = S.TrainTask(poll=0.05)(job)
    assert out["state"] == "done"
    log = job.log_path.read_text()
    assert "NTASKS=unset" in log and "slurm job 42" in log
    assert not (tmp_path / "run.lock").exists()


def test_array_runs_end_to_end_on_the_local_executor(tmp_path):
    ledger = tmp_path / "ledger"
    runs = tmp_path / "runs"
    (runs / "old").mkdir(parents=True)
    (runs / "old" / "summary.json").write_text('{"status": "complete"}')
    jobs = [
        B.fake_job("a", runs / "a", 0.3, ledger=ledger),
        B.fake_job("flaky", runs / "flaky", 0.2, fail_times=1, ledger=ledger),
        B.fake_job("broken", runs / "broken", 0.1, fail_times=9, ledger=ledger),
        B.fake_job("old", runs / "old", 5, ledger=ledger),
    ]
    launcher = S.SlurmLauncher(
        S.SlurmOptions(folder=tmp_path / "slurm", gpus=False), cluster="local", poll=0.2
    )
    seen: list[B.Progress] = []
    results = {r.name: r for r in launcher.run(jobs, on_update=seen.append)}
    assert len(launcher.job_ids) == 4
    assert results["a"].state == B.JobState.DONE
    assert results["flaky"].state == B.JobState.DONE and results["flaky"].attempts == 2
    assert results["broken"].state == B.JobState.FAILED and "status 3" in results["broken"].message
    assert (runs / "broken" / "failed.json").is_file()
    assert results["old"].state == B.JobState.SKIPPED
    assert seen and set(seen[-1].states) == {"a", "flaky", "broken", "old"}
    lines = ledger.read_text().splitlines()
    assert sum(line.startswith("done") for line in lines) == 2 and not any("/old " in line for line in lines)
    assert not list(runs.glob("*/run.lock"))


def test_timeout_requeues_the_task_and_the_run_resumes(tmp_path):
    """submitit's local executor sends USR2 before its time limit: TrainTask.checkpoint stops the child,
    frees the run and resubmits itself; the requeued task resumes the fake job where it was."""
    import submitit

    ledger = tmp_path / "ledger"
    job = B.fake_job("long", tmp_path / "runs" / "long", 4.0, ledger=ledger)
    executor = submitit.LocalExecutor(folder=tmp_path / "slurm", max_num_timeout=5)
    executor.update_parameters(timeout_min=0.1, signal_delay_s=2)  # USR2 4 s after each start
    handle = executor.submit(S.TrainTask(poll=0.1), job)
    out = handle.result()
    assert out["state"] == "done" and out["attempts"] == 1  # a requeue is not a failed attempt
    starts = [line for line in ledger.read_text().splitlines() if line.startswith("start")]
    assert len(starts) >= 2  # interrupted at least once, then resumed
    log = job.log_path.read_text()
    assert S.STOPPED_LINE.format(signal="SIGUSR2", why="time limit or preemption") in log
    assert not (job.run_dir / "run.lock").exists()


def test_grid_run_with_the_slurm_launcher_submits_every_unfinished_run(tmp_path, monkeypatch, capsys):
    """The CLI path: options -> SlurmOptions, one job per unfinished run, --no-wait returns at once."""
    from experiments import cli

    submitted: dict = {}

    class Handle:
        def __init__(self, i: int):
            self.job_id = f"77_{i}"

    cache = tmp_path / "cache"

    def fake_submit(self, jobs):
        submitted.update(options=self.options, jobs=list(jobs), cluster=self.cluster, name=self.name)
        submitted["prepared"] = list((cache / "prepared").glob("*/index.json"))  # before the array
        return [Handle(i) for i in range(len(jobs))]

    monkeypatch.setattr(S.SlurmLauncher, "submit", fake_submit)
    monkeypatch.setattr(S.SlurmLauncher, "preflight", lambda self, slots: submitted.update(slots=set(slots)))
    # no GPU partition here: the one named gpu has GPUs
    monkeypatch.setattr(S.slurm_jobs, "partition_has_gpus", lambda partition: partition == "gpu")
    done = tmp_path / "runs" / "table3" / "tiny" / "A1" / "seed0"
    done.mkdir(parents=True)
    (done / "summary.json").write_text('{"status": "complete"}')
    argv = [
        "grid",
        "run",
        "table3",
        "--scale",
        "tiny",
        "--rows",
        "A",
        "--launcher",
        "slurm",
        "--runs",
        str(tmp_path / "runs"),
        "--partition",
        "gpu",
        "--time",
        "90",
        "--mem",
        "32",
        "--slurm-arg",
        "account=nlp",
        "--slurm-folder",
        str(tmp_path / "slurm"),
        "--no-wait",
        "train.max_steps=10",
        f"data.cache_dir={cache}",
    ]
    nodata = [*argv, "data.corpus=wmt14", f"data.train=[{tmp_path / 'no-wmt14'}]"]
    assert cli.main(nodata) == 2 and "jobs" not in submitted  # missing data: nothing submitted
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "tlit data wmt14 --out" in err, err
    assert cli.main(argv) == 0
    assert len(submitted["prepared"]) == 1  # prepared on this, the submitting, node before sbatch
    opts = submitted["options"]
    assert (opts.partition, opts.time_min, opts.mem_gb, opts.extra) == ("gpu", 90, 32.0, {"account": "nlp"})
    assert opts.gpus and submitted["slots"] == {1}  # --devices all: the partition's GPUs
    assert opts.folder == tmp_path / "slurm" / "table3" / "tiny"
    assert submitted["cluster"] == "slurm" and submitted["name"] == "tlit-table3-tiny"
    assert [j.name for j in submitted["jobs"]] == [f"table3/tiny/A{i}/seed0" for i in (2, 3, 4)]
    job = submitted["jobs"][0]  # the task trains the run planned in its folder, with the user's override
    assert job.argv[3:6] == ["train", "--run-dir", str(job.run_dir)]
    assert C.load_yaml(job.run_dir / "config.yaml").train.max_steps == 10
    out = capsys.readouterr().out
    assert "submitted; follow them with: tlit grid status" in out
    assert "table3/tiny/A2/seed0  pending" in out
