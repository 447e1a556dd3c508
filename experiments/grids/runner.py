"""``tlit grid run / status / plan``: a grid's runs, what state each is in, and running the rest.

The run folders are the only state, read by ``experiments.runs.folder.classify`` (complete, running,
failed, interrupted, pending, conflict, corrupt, ...), the same answer ``tlit table`` gives. So ``status``
works from any shell, during a run or after a crash. ``run`` skips a complete run only if it holds the
config asked for, and refuses, in one line, a folder that holds another run (before anything is written).

Planning and status import no torch; only the training children do.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TextIO

from experiments.grids import grid as G
from experiments.launchers import base as B
from experiments.launchers.calibration import Calibration
from experiments.launchers.local import Slots, check_packing
from experiments.runs import folder as RF
from experiments.runs import locks
from experiments.runs import run as R
from experiments.runs.folder import RunInfo
from experiments.runs.prepare import prepare_for
from transformer_lit import config as C
from transformer_lit.memory import checkpoint_disk, fmt_bytes, training_memory
from transformer_lit.params import count_parameters


def make_launcher(
    name: str,
    *,
    devices: str = "all",
    jobs_per_device: int = 1,
    retries: int = 1,
    lock_timeout: float = locks.DEFAULT_STALE_AFTER,
    slurm: Any = None,
    job_name: str = "tlit",
) -> B.Launcher:
    """``local`` (this node's ``devices``, ``jobs_per_device`` one-GPU jobs on each) or ``slurm``
    (``slurm``: a ``SlurmOptions``)."""
    if retries < 0:
        raise ValueError(f"--retries must be >= 0, got {retries}")
    if name == "local":
        from experiments.launchers.local import LocalLauncher, parse_devices

        slots = parse_devices(devices, jobs_per_device)
        return LocalLauncher(slots, retries=retries, lock_timeout=lock_timeout)
    if name == "slurm":
        from experiments.launchers.slurm import SlurmLauncher, SlurmOptions

        slurm = replace(slurm or SlurmOptions(), jobs_per_device=jobs_per_device)
        return SlurmLauncher(slurm, retries=retries, lock_timeout=lock_timeout, name=job_name)
    raise ValueError(f"--launcher must be local or slurm, got {name!r}")


# ----------------------------------------------------------------------------------------------------------
# Selecting runs


def select_rows(grid: G.Grid, rows: str | None) -> list[str] | None:
    """``"A1,B"`` -> ``["A1", "B1", "B2"]``: a name is a row, or a group letter standing for its rows
    (``B`` -> B1, B2, as Table 3 groups them). None: every row."""
    if not rows:
        return None
    out: list[str] = []
    for token in (t.strip() for t in rows.split(",")):
        if not token:
            continue
        if token in grid.rows:
            names = [token]
        else:
            names = [r for r in grid.rows if r.startswith(token) and r[len(token) :].isdigit()]
        if not names:
            raise G.GridError(
                f"{grid.path}: --rows: unknown row or group {token!r}; rows are: {', '.join(grid.rows)}"
            )
        out += [n for n in names if n not in out]
    return out


def parse_seeds(seeds: str | int) -> int | list[int]:
    """``3`` -> seeds 0, 1, 2; ``"1,4"`` -> seeds 1 and 4."""
    text = str(seeds).strip()
    try:
        if "," in text:
            return [int(s) for s in text.split(",") if s.strip()]
        n = int(text)
    except ValueError:
        raise ValueError(f"--seeds must be a count (3) or a list (0,2), got {seeds!r}") from None
    if n < 1:
        raise ValueError(f"--seeds must be at least 1, got {n}")
    return n


def specs_for(
    grid: G.Grid,
    scale: str | None,
    *,
    rows: str | None = None,
    seeds: str | int = 1,
    overrides: Sequence[str] = (),
    runs: str | Path = "results/runs",
) -> list[G.RunSpec]:
    """The grid's runs (rows x seeds) with the user's ``key=value`` overrides applied."""
    values = dict(C.parse_override(o) for o in overrides)
    return G.expand(
        grid,
        scale or grid.default_scale,
        rows=select_rows(grid, rows),
        seeds=parse_seeds(seeds),
        overrides=values,
        runs_root=runs,
    )


# ----------------------------------------------------------------------------------------------------------
# State of a run folder


@dataclass(frozen=True)
class SpecStatus:
    """A grid run and its folder's state."""

    spec: G.RunSpec
    status: RF.Status

    @property
    def state(self) -> RF.RunState:
        return self.status.state

    @property
    def elapsed(self) -> float | None:
        if self.state is RF.RunState.COMPLETE:
            return (self.status.summary or {}).get("wall_seconds")
        if self.state is RF.RunState.RUNNING and self.status.lock is not None:
            return time.time() - self.status.lock.started
        return None


def identity(spec: G.RunSpec) -> dict[str, Any]:
    """The names a run's summary carries (a summary with other names belongs to another run)."""
    return {"grid": spec.grid, "scale": spec.scale, "row": spec.row, "seed": spec.seed}


def run_state(spec: G.RunSpec, lock_timeout: float = locks.DEFAULT_STALE_AFTER) -> SpecStatus:
    status = RF.classify(
        spec.run_dir, expected=spec.config, identity=identity(spec), stale_after=lock_timeout
    )
    return SpecStatus(spec, status)


def fmt_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _num(summary: dict[str, Any] | None, key: str, fmt: str) -> str:
    value = (summary or {}).get(key)
    return format(value, fmt) if isinstance(value, int | float) else "-"


def slurm_states(states: Sequence[SpecStatus]) -> dict[str, str]:
    """``{run name: "123_4 RUNNING"}`` for the unfinished runs submitted to SLURM (their run folder names the
    task): one squeue call for all of them. ``?`` where squeue does not answer (no SLURM client here)."""
    from experiments.launchers import slurm_jobs

    tasks = {}
    for s in states:
        if (
            s.state is not RF.RunState.COMPLETE
            and (recorded := RF.read_slurm_job(s.spec.run_dir)) is not None
        ):
            tasks[s.spec.name] = recorded[0]
    known = slurm_jobs.job_states(tasks.values())
    return {name: f"{task} {known.get(task, '?')}" for name, task in tasks.items()}


def format_status(states: Sequence[SpecStatus], slurm: dict[str, str] | None = None) -> str:
    """One line per run, then totals (what ``tlit grid status`` prints); with ``slurm`` (``slurm_states``),
    a column with each run's SLURM task and SLURM's state next to ours."""
    width = max([len(s.spec.name) for s in states] + [3])
    swidth = max([len(v) for v in (slurm or {}).values()] + [5])
    column = (lambda name: f"{(slurm or {}).get(name, '-'):<{swidth}}  ") if slurm else (lambda name: "")
    head = f"{'slurm':<{swidth}}  " if slurm else ""
    lines = [f"{'run':<{width}}  {'state':<11}  {head}{'ppl_dev':>8}  {'bleu_dev':>8}  {'elapsed':>8}  note"]
    for s in states:
        summary = s.status.summary if s.state is RF.RunState.COMPLETE else None
        lines.append(
            f"{s.spec.name:<{width}}  {s.state.value:<11}  {column(s.spec.name)}"
            f"{_num(summary, 'ppl_dev', '.2f'):>8}  {_num(summary, 'bleu_dev', '.2f'):>8}  "
            f"{fmt_seconds(s.elapsed):>8}  {s.status.detail}".rstrip()
        )
    counts = {k: sum(s.state is k for s in states) for k in RF.RunState}
    lines.append(f"total {len(states)}: " + ", ".join(f"{n} {k.value}" for k, n in counts.items() if n))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# Plan


def lpt_makespan(costs: Sequence[float], slots: int) -> float:
    """Makespan of longest-first list scheduling of 1-slot jobs on ``slots`` identical slots."""
    ends = [0.0] * max(1, slots)
    for cost in sorted(costs, reverse=True):
        heapq.heapreplace(ends, ends[0] + cost)
    return max(ends)


def format_plan(
    specs: Sequence[G.RunSpec],
    slots: Slots,
    lock_timeout: float,
    calibration: Calibration | None = None,
) -> str:
    """What ``tlit grid run`` would do: every run, its size, rough time, GPU memory per process, checkpoint
    disk, and whether it is done; then the totals, the packing of jobs per GPU, and whether it fits."""
    width = max([len(s.name) for s in specs] + [3])
    lines = [
        f"{'run':<{width}}  {'label':<20}  {'params':>11}  {'steps':>8}  {'est.':>8}  {'memory':>8}  "
        f"{'ckpt disk':>9}  state"
    ]
    todo: list[float] = []
    disk_todo = disk_all = 0
    packed: list[tuple[str, int]] = []
    for spec in specs:
        cfg = spec.config
        params = count_parameters(cfg.model, cfg.data.vocab_size)
        est = B.estimate_seconds(cfg, slots.kind, calibration=calibration, per_device=slots.per_device)
        memory, disk = training_memory(cfg).total, checkpoint_disk(cfg)
        state = run_state(spec, lock_timeout).state
        disk_all += disk
        if state is not RF.RunState.COMPLETE:
            todo.append(est * cfg.train.devices)
            disk_todo += disk
            if cfg.train.devices == 1:
                packed.append((spec.name, memory))
        lines.append(
            f"{spec.name:<{width}}  {spec.label[:20]:<20}  {params:>11,}  {cfg.train.max_steps:>8,}  "
            f"{fmt_seconds(est):>8}  {fmt_bytes(memory):>8}  {fmt_bytes(disk):>9}  "
            f"{'complete (skipped)' if state is RF.RunState.COMPLETE else state.value}"
        )
    if slots.kind == "cpu":
        speed = "calibrated on 2 CPU cores"
    elif calibration is None:
        speed = "calibrated on 2 CPU cores, GPUs a fixed factor faster; --calibration FILE measures it"
    else:
        speed = f"measured on {calibration.device} ({calibration.path})"
    lines.append(
        f"{len(todo)} of {len(specs)} runs to do, ~{fmt_seconds(sum(todo))} of work, "
        f"~{fmt_seconds(lpt_makespan(todo, len(slots)))} on {slots} ({len(slots)} slot(s)). Estimates are "
        f"rough (params x tokens x steps, {speed}, plus a fixed overhead per run); the live ETA follows the "
        "observed speed."
    )
    lines.append(
        f"checkpoints: {fmt_bytes(disk_todo)} for the runs to do, {fmt_bytes(disk_all)} for all "
        "(keep_checkpoints periodic + last.ckpt per run, fp32 weights and Adam moments)"
    )
    if slots.kind != "cpu":
        lines.append(packing_line(slots, packed))
    return "\n".join(lines)


def packing_line(slots: Slots, packed: Sequence[tuple[str, int]]) -> str:
    """How the one-GPU runs share each GPU, their memory against the card's, or why grid run refuses."""
    card = f"a {fmt_bytes(slots.memory)} GPU" if slots.memory is not None else "a GPU of unknown size"
    largest = sorted((m for _, m in packed), reverse=True)[: slots.per_device]
    line = (
        f"packing: {slots.per_device} one-GPU job(s) per GPU; the {len(largest)} largest need "
        f"~{fmt_bytes(sum(largest))} of {card}"
    )
    try:
        check_packing(slots, packed)
    except ValueError as err:
        return f"{line}; grid run refuses: {err}"
    return line


# ----------------------------------------------------------------------------------------------------------
# Run


def grid_jobs(specs: Sequence[G.RunSpec], launcher: B.Launcher) -> tuple[list[B.Job], list[B.JobResult]]:
    """Jobs for the runs still to do, planned into their run folders, and SKIPPED results for the complete
    ones with the config asked for (``runs_to_do``, then ``plan_jobs``)."""
    todo, skipped = runs_to_do(specs)
    return plan_jobs(todo, launcher), skipped


def runs_to_do(specs: Sequence[G.RunSpec]) -> tuple[list[G.RunSpec], list[B.JobResult]]:
    """The runs not complete yet, and SKIPPED results for the complete ones. Writes nothing, but checks every
    folder: one that holds another run (another config, complete or not, or another run's summary) or cannot
    be used stops the grid before anything runs (``RunFolderConflict``, one line)."""
    todo, skipped, refused = [], [], []
    for spec in specs:
        status = run_state(spec).status
        if status.state is RF.RunState.COMPLETE:
            locks.clear_stale(spec.run_dir)
            skipped.append(
                B.JobResult(spec.name, spec.run_dir, B.JobState.SKIPPED, message="already complete")
            )
        elif status.state in (RF.RunState.CONFLICT, RF.RunState.CORRUPT):
            refused.append(status.refusal(spec.run_dir, elsewhere="--runs"))
        else:
            todo.append(spec)
    if refused:
        more = f" (and {len(refused) - 1} more runs)" if len(refused) > 1 else ""
        raise RF.RunFolderConflict(refused[0] + more)
    return todo, skipped


def plan_jobs(todo: Sequence[G.RunSpec], launcher: B.Launcher) -> list[B.Job]:
    """Write each run's resolved config and names into its folder (config.yaml, run.json: here, once) and
    make its job; the training child reads them."""
    for spec in todo:
        R.plan(spec.run_dir, spec.config, RunInfo(grid=spec.grid, scale=spec.scale, row=spec.row))
    return [job_for_spec(spec, launcher) for spec in todo]


def job_for_spec(spec: G.RunSpec, launcher: B.Launcher) -> B.Job:
    """A train job for ``spec`` (already planned into its run folder) with the launcher's device overrides."""
    runtime = launcher.device_overrides()
    cfg = C.apply_overrides(spec.config, runtime)
    return B.Job(
        name=spec.name,
        argv=B.train_argv(spec.run_dir, runtime),
        run_dir=spec.run_dir,
        slots=cfg.train.devices,
        cost=B.estimate_seconds(cfg, launcher.kind),
        expected=C.flat_dict(cfg),
        memory=training_memory(cfg).total,
    )


def final_lines(specs: Sequence[G.RunSpec], results: dict[str, B.JobResult]) -> list[str]:
    """One line per run after the grid: its result, metrics where done, time, and why it failed."""
    width = max([len(s.name) for s in specs] + [3])
    lines = []
    for spec in specs:
        r = results.get(spec.name)
        state = r.state.value if r else "pending"
        summary = RF.read_summary(spec.run_dir)
        metrics = ""
        if summary:
            metrics = (
                f"ppl_dev={_num(summary, 'ppl_dev', '.2f')} bleu_dev={_num(summary, 'bleu_dev', '.2f')} "
            )
        seconds = r.seconds if r and r.seconds else (summary or {}).get("wall_seconds")
        note = f" ({r.message})" if r and r.message and r.state != B.JobState.SKIPPED else ""
        attempts = f" attempts={r.attempts}" if r and r.attempts > 1 else ""
        lines.append(
            f"{spec.name:<{width}}  {state:<11}  {metrics}time={fmt_seconds(seconds)}{attempts}{note}"
        )
    return lines


def exit_code(results: Sequence[B.JobResult], stopped_by: int | None = None, detached: bool = False) -> int:
    """0 when every run is complete (or, ``detached``, at least submitted), 1 if any failed, 128+signal
    when interrupted."""
    if stopped_by is not None:
        return 128 + stopped_by
    ok = (B.JobState.PENDING,) if detached else ()
    return 0 if all(r.state.ok or r.state in ok for r in results) else 1


def run_grid(
    specs: Sequence[G.RunSpec], launcher: B.Launcher, out: TextIO, *, live: bool | None = None
) -> int:
    """Run what is left of ``specs`` with ``launcher``, showing progress on ``out``; returns the exit code.

    The runs' data is prepared first, here (on SLURM: on the submitting node, before the array is
    submitted); missing data stops the grid before any job starts (``experiments.runs.prepare``)."""
    todo, skipped = runs_to_do(specs)
    if skipped:
        print(f"{len(skipped)} of {len(specs)} runs already complete; skipping them", file=out)
    for where in sorted({spec.run_dir.parents[1] for spec in todo}):  # <runs>/<grid>/<scale>
        RF.check_writable(where)  # an unwritable --runs: one line, before the data is prepared
    prepare_for((spec.config for spec in todo), out)  # before any run folder is written or job starts
    jobs = plan_jobs(todo, launcher)
    results = {r.name: r for r in skipped}
    if jobs:
        with GridDisplay(jobs, out, live=live) as display:
            for r in launcher.run(jobs, on_update=display.update):
                results[r.name] = r
    for line in final_lines(specs, results):
        print(line, file=out)
    stopped = getattr(launcher, "stopped_by", None)
    detached = not getattr(launcher, "wait", True)
    if stopped is not None and launcher.kind == "slurm":
        print("stopped waiting; the SLURM jobs keep running (tlit grid status follows them)", file=out)
    elif stopped is not None:
        print("interrupted: rerun the same command to resume (finished runs are kept)", file=out)
    elif detached and jobs:
        print("submitted; follow them with: tlit grid status (same file, --scale and --runs)", file=out)
    return exit_code(list(results.values()), stopped, detached)


# ----------------------------------------------------------------------------------------------------------
# Live progress


def eta_seconds(jobs: dict[str, B.Job], p: B.Progress) -> float:
    """Time left: the remaining estimated work (scaled by the observed speed) spread over the seats (a k-GPU
    job holds all seats of its k GPUs), but no less than the longest job still to finish."""
    left = [p.speed * jobs[n].cost for n, s in p.states.items() if s == B.JobState.PENDING]
    left += [max(0.0, p.speed * jobs[n].cost - el) for n, el in p.running.items()]
    slot_work = sum(
        p.speed * jobs[n].cost * p.seats(jobs[n]) for n, s in p.states.items() if s == B.JobState.PENDING
    )
    slot_work += sum(max(0.0, p.speed * jobs[n].cost - el) * p.seats(jobs[n]) for n, el in p.running.items())
    return max([slot_work / max(1, p.slots_total), *left, 0.0])


class GridDisplay:
    """Shows the grid's progress: a rich live panel on a terminal, one line per finished run otherwise."""

    def __init__(self, jobs: Sequence[B.Job], out: TextIO, *, live: bool | None = None) -> None:
        from rich.console import Console

        self.jobs = {j.name: j for j in jobs}
        self.console = Console(file=out, highlight=False)
        self.live_mode = self.console.is_terminal if live is None else live
        self.t0 = time.time()
        self._seen: dict[str, B.JobState] = {}
        self._live: Any = None

    def __enter__(self) -> GridDisplay:
        if self.live_mode:
            from rich.live import Live

            self._live = Live(console=self.console, refresh_per_second=4, transient=False)
            self._live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.__exit__(*exc)

    def update(self, p: B.Progress) -> None:
        if self._live is not None:
            self._live.update(self.render(p))
            return
        for name, state in p.states.items():  # plain mode: a line per state change
            if self._seen.get(name) != state and state != B.JobState.PENDING:
                self._seen[name] = state
                done = sum(s.ok or s == B.JobState.FAILED for s in p.states.values())
                r = p.results.get(name)
                note = f" {fmt_seconds(r.seconds)}" if r and r.seconds else ""
                note += f" ({r.message})" if r and r.message else ""
                print(
                    f"[{done:>3}/{len(p.states)}] {state.value:<11} {name}{note}",
                    file=self.console.file,
                    flush=True,
                )

    def counts(self, p: B.Progress) -> dict[str, int]:
        c = {"done": 0, "running": 0, "failed": 0, "pending": 0}
        for s in p.states.values():
            key = "done" if s.ok else s.value if s.value in c else "pending"
            c[key] += 1
        return c

    def render(self, p: B.Progress) -> Any:
        from rich.console import Group
        from rich.progress_bar import ProgressBar
        from rich.table import Table

        total = sum(j.cost * j.slots for j in self.jobs.values()) or 1.0
        finished = sum(
            self.jobs[n].cost * self.jobs[n].slots
            for n, s in p.states.items()
            if s.ok or s == B.JobState.FAILED
        )
        partial = sum(
            min(0.99, el / max(1e-9, p.speed * self.jobs[n].cost)) * self.jobs[n].cost * self.jobs[n].slots
            for n, el in p.running.items()
        )
        c = self.counts(p)
        head = Table.grid(padding=(0, 1))
        head.add_row(
            ProgressBar(total=total, completed=finished + partial, width=30),
            f"{100 * (finished + partial) / total:3.0f}%   elapsed {fmt_seconds(time.time() - self.t0)}   "
            f"ETA ~{fmt_seconds(eta_seconds(self.jobs, p))}",
        )
        counts = (
            f"[green]{c['done']} done[/] · [cyan]{c['running']} running[/] · [red]{c['failed']} failed[/] · "
            f"{c['pending']} pending · slots {p.slots_total - p.slots_free}/{p.slots_total} busy"
        )
        rows = Table.grid(padding=(0, 2))
        for name, el in sorted(p.running.items()):
            rows.add_row(
                "  [cyan]running[/]",
                name,
                f"{fmt_seconds(el)} / ~{fmt_seconds(p.speed * self.jobs[name].cost)}",
            )
        failed = [n for n, s in p.states.items() if s == B.JobState.FAILED]
        for name in failed[-5:]:
            rows.add_row("  [red]failed[/]", name, p.results[name].message if name in p.results else "")
        return Group(head, counts, rows)
