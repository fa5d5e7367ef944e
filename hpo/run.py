"""Run a LongRoPE search study: ``python -m hpo.run --study smollm2_16k``.

Running the same command again continues the same study from its storage.
``--list`` shows the presets. The output directory (default ``runs/<study>``)
holds ``study.db`` (unless ``--storage`` names another), ``best_factors.json``,
``rope_parameters.json`` and ``results.json``.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import optuna

from hpo.study import (
    StorageError,
    compare_with_baselines,
    default_storage_url,
    format_comparison,
    load_workload,
    open_storage,
    open_study,
    run_search,
    search_space_for,
    write_outputs,
)
from models.assets import AssetError
from models.loading import ModelLoadError
from models.rope import FactorError
from objectives.data import DataError
from studies import PresetError, StudyPreset, list_presets, load_preset

logger = logging.getLogger("hpo.run")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m hpo.run",
        description="Search LongRoPE RoPE rescale factors as a resumable Optuna study.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--study", help="preset name (see --list) or path to a preset .toml file")
    parser.add_argument("--list", action="store_true", help="list the study presets and exit")
    parser.add_argument("--n-trials", type=int, help="finished trials the study should hold (preset's default)")
    parser.add_argument("--storage", help="Optuna RDB URL, e.g. postgresql+psycopg://user@host/db "
                                          "(default: sqlite file in --out)")
    parser.add_argument("--out", type=Path, help="output directory (default: runs/<study>)")
    parser.add_argument("--target-length", type=int, help="override the preset's target length in tokens")
    parser.add_argument("--samples", type=int, help="override the number of searched windows")
    parser.add_argument("--device", help="override the device: auto, cpu, cuda, cuda:N")
    parser.add_argument("--seed", type=int, help="override the search seed")
    parser.add_argument("--quiet", action="store_true", help="only warnings and the final table")
    return parser


def print_presets() -> None:
    for name in list_presets():
        preset = load_preset(name)
        print(f"{name:<14} {preset.model.name:<28} -> {preset.target_length:>7,} tokens, "
              f"{preset.search.n_trials:>5} trials  {preset.description}")


def apply_overrides(preset: StudyPreset, args: argparse.Namespace) -> StudyPreset:
    return preset.replace(target_length=args.target_length, storage=args.storage, search__n_trials=args.n_trials,
                          search__seed=args.seed, data__samples=args.samples, model__device=args.device)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if args.list:
        print_presets()
        return 0
    if not args.study:
        build_parser().error("--study is required (or --list)")
    started = time.perf_counter()
    try:
        preset = apply_overrides(load_preset(args.study), args)
        out_dir = args.out or Path("runs") / preset.name
        out_dir.mkdir(parents=True, exist_ok=True)
        storage = open_storage(preset.storage or default_storage_url(out_dir))
        workload = load_workload(preset)
        space = search_space_for(preset, workload.geometry)
        study = open_study(preset, storage, space)
        logger.info("study %r in %s: %d trials so far, target %d", preset.name,
                    preset.storage or default_storage_url(out_dir), len(study.trials), preset.search.n_trials)
        run_search(study, workload, space, preset.search.n_trials, progress=not args.quiet)
        rows = compare_with_baselines(study, workload, space)
        paths = write_outputs(out_dir, study, workload, space, preset, rows)
    except (PresetError, StorageError, AssetError, ModelLoadError, FactorError, DataError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: every finished trial is in the storage; run the same command to continue",
              file=sys.stderr)
        return 130
    print(format_comparison(rows, preset))
    print(f"\n{len(study.trials)} trials in the study; this run took {time.perf_counter() - started:.0f}s")
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
