"""Prepare the runs' data before any job starts: once per distinct data setting, in the launching process.

``tlit grid run`` calls ``prepare_for`` with the runs it is about to start, whatever the launcher: on SLURM
this happens on the submitting node, before the job array is submitted, so ``data.cache_dir`` must be on a
filesystem every node sees (the default ``results/cache`` is inside the project folder, where the jobs run).
``tlit sweep`` calls it with the sweep's base config (a trial whose sampled values change the data settings
prepares its own on first use). A lone ``tlit train`` prepares on first use inside its DataModule.

All of them go through ``transformer_lit.preparation.ensure_prepared``, which holds a lock per corpus: 20
rows never race to prepare the same corpus, and a run started later maps what is there. Missing data
(WMT14 not downloaded, a missing file) fails here, in one line that says how to get it, before any job is
started. The training batch plan for each setting's ``data.max_tokens`` is stored with the data here too
(``preparation.ensure_plan``): planning ~100k batches costs seconds that every run would pay again. No
torch is imported.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TextIO

from transformer_lit import config as C


def prepare_for(configs: Iterable[C.RunConfig], out: TextIO | None = None) -> list[Path]:
    """Prepare the data of ``configs`` (each distinct data setting once); returns the prepared folders."""
    from transformer_lit.preparation import ensure_plan, ensure_prepared

    done: dict[C.DataConfig, Path] = {}
    for cfg in configs:
        data = dataclasses.replace(cfg.data, num_workers=0)  # how it is loaded is not what it holds
        if data in done:
            continue
        started = time.perf_counter()
        done[data] = ensure_prepared(data)
        ensure_plan(done[data], data.max_tokens)  # every run of this setting reads it, none plans again
        if out is not None:
            seconds = time.perf_counter() - started
            print(f"data ready in {seconds:.1f} s: {done[data]}", file=out, flush=True)
    return list(done.values())
