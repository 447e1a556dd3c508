"""Copy the few real-data files ``bench/gpu_check.py`` needs into the repository, before a GPU run.

    python bench/gpu_data.py                      # ../shared/data -> bench/gpu_data/ (git-ignored)

Only the repository travels to the GPU machine (which has no network), so the smoke run's text must be
inside it: Europarl's first 20k pairs and the WMT news test sets of other years (training text, ~45k pairs)
and newstest2013 (the paper's dev set, also the decoding benchmark's 500 sentences). ~13 MB; the folder keeps
``../shared/data``'s layout, so ``gpu_check --data ../shared/data`` reads the originals just as well. Name
the folder in the device tool's ``carry`` list: git ignores it.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = ROOT / "bench" / "gpu_data"
"""Where the copy goes (listed in .gitignore)."""
SHARED = ROOT.parent / "shared" / "data"
EUROPARL = "europarl_v7_deen_first20k/train"
NEWS = "wmt_news_deen_other_years"
DEV = "wmt_newstest_deen/newstest2013"
LANGS = ("en", "de")


def train_prefixes(data: Path) -> list[Path]:
    """Europarl and every other-years news test set (prefixes: PREFIX.en / PREFIX.de)."""
    news = sorted({p.with_suffix("") for p in (data / NEWS).glob("*.en")})
    return [data / EUROPARL, *news]


def dev_prefix(data: Path) -> Path:
    return data / DEV


def copy(source: Path = SHARED, dest: Path = DATA_DIR) -> list[Path]:
    """Copy the training and dev files from ``source`` to ``dest``; returns the files written."""
    prefixes = [*train_prefixes(source), dev_prefix(source)]
    written = []
    for prefix in prefixes:
        for lang in LANGS:
            src = prefix.with_name(f"{prefix.name}.{lang}")
            if not src.is_file():
                raise SystemExit(f"gpu_data: {src} is missing; is {source} the shared data folder?")
            out = dest / src.relative_to(source)
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, out)
            written.append(out)
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=SHARED, help=f"default: {SHARED}")
    parser.add_argument("--dest", type=Path, default=DATA_DIR, help=f"default: {DATA_DIR}")
    args = parser.parse_args(argv)
    files = copy(args.source, args.dest)
    size = sum(f.stat().st_size for f in files)
    print(f"copied {len(files)} files ({size / 1e6:.1f} MB) to {args.dest}")


if __name__ == "__main__":
    main()
