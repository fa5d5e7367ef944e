"""Run a LongRoPE search study: ``python -m hpo.run --study smollm2_16k``.

Running the same command again continues the same study from its storage.
``--list`` shows the presets. The output directory (default ``runs/<study>``)
holds ``study.db`` (unless ``--storage`` names another), ``best_factors.json``,
``rope_parameters.json`` and ``results.json``.

Several processes given the same ``--storage`` and study share its trials and
together finish exactly ``--n-trials``. ``--backend ray`` runs the trials on Ray
Tune (a local instance, or the cluster at ``--ray-address``). ``--sampler`` picks
the preset's ``[search] sampler``: LongRoPE's evolutionary search, or Optuna's
TPE, CMA-ES or GP over a family of monotone factor curves.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import time
from pathlib import Path
from typing import Any

from hpo.cli import add_dtype_argument, checked_dtype, command, configure_logging, positive
from hpo.outputs import write_outputs
from hpo.records import (
    STOPPED_ATTR,
    check_outputs_are_its_own,
    default_storage_url,
    open_storage,
    study_dir,
    writable_dir,
)
from hpo.study import (
    BackendError,
    compare_with_baselines,
    format_comparison,
    load_workload,
    open_study,
    run_search,
    search_space_for,
)
from hpo.trials import StopSignals
from studies import SAMPLERS, StudyPreset, list_presets, load_preset

logger = logging.getLogger("hpo.run")
RAY_OPTIONS = ("address", "cpus_per_trial", "gpus_per_trial", "max_concurrent")  # hpo.ray_backend.RayOptions fields
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m hpo.run",
        description="Search LongRoPE RoPE rescale factors as a resumable Optuna study.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--study", help="preset name (see --list) or path to a preset .toml file")
    parser.add_argument("--list", action="store_true", help="list the study presets and exit")
    parser.add_argument("--n-trials", type=positive(int),
                        help="complete or pruned trials the study should hold (preset's default)")
    parser.add_argument("--max-full-evaluations", type=positive(int),
                        help="also stop once the finished trials read this many searched windows at the target "
                             "length (prefix rungs not counted): a budget that counts what pruning saves")
    parser.add_argument("--storage", help="Optuna RDB URL, e.g. postgresql+psycopg://user@host/db "
                                          "(default: sqlite file in --out)")
    parser.add_argument("--out", type=Path, help="output directory (default: runs/<study>)")
    parser.add_argument("--target-length", type=int, help="override the preset's target length in tokens")
    parser.add_argument("--samples", type=positive(int), help="override the number of searched windows")
    parser.add_argument("--device", help="override the device: auto, cpu, cuda, cuda:N")
    add_dtype_argument(parser, None, "override the preset's [model] dtype")
    parser.add_argument("--seed", type=positive(int, allow_zero=True), help="override the search seed")
    parser.add_argument("--sampler", choices=SAMPLERS,
                        help="override the preset's [search] sampler: longrope (evolutionary, every pair's factor) "
                             "or Optuna's tpe, cmaes, gp over monotone factor curves")
    parser.add_argument("--quiet", action="store_true", help="only warnings and the final table")
    parser.add_argument("--no-pruning", action="store_true",
                        help="measure every trial on every window (the preset's [search] pruning is ignored)")
    parser.add_argument("--backend", choices=("local", "ray"), default="local",
                        help="run trials in this process, or on Ray Tune")
    # Left out of the namespace unless given (SUPPRESS), so that giving one without --backend ray is an error.
    ray = parser.add_argument_group("Ray Tune (--backend ray)", argument_default=argparse.SUPPRESS)
    ray.add_argument("--ray-address", dest="address",
                     help="join this Ray cluster (host:port of its head, ray://..., auto) instead of starting one")
    ray.add_argument("--cpus-per-trial", type=positive(float), help="CPUs per trial (default 1)")
    ray.add_argument("--gpus-per-trial", type=positive(float, allow_zero=True), help="GPUs per trial (default 0)")
    ray.add_argument("--max-concurrent", type=positive(int),
                     help="trials at once (default: as many as the cluster's CPUs and GPUs hold)")
    return parser


def ray_arguments(args: argparse.Namespace) -> dict[str, Any]:
    """The Ray options given on the command line, as ``RayOptions`` fields; an error without ``--backend ray``."""
    given = {name: getattr(args, name) for name in RAY_OPTIONS if hasattr(args, name)}
    if given and args.backend != "ray":
        raise BackendError("--ray-address, --cpus-per-trial, --gpus-per-trial and --max-concurrent need --backend ray")
    return given


def load_ray_backend():
    """:mod:`hpo.ray_backend`, or a clear error when Ray Tune is not installed."""
    try:
        ray_backend = importlib.import_module("hpo.ray_backend")
    except ImportError as error:
        raise BackendError(f"--backend ray needs Ray Tune: pip install 'ray[tune]' (the `ray` extra); "
                           f"{error}") from None
    return ray_backend


def print_presets() -> None:
    """One line per shipped preset: model, target length, trials and description (``--list``)."""
    for name in list_presets():
        preset = load_preset(name)
        print(f"{name:<24} {preset.model.name:<26} -> {preset.target_length:>7,} tokens, "
              f"{preset.search.n_trials:>5} trials  {preset.description}")


def apply_overrides(preset: StudyPreset, args: argparse.Namespace) -> StudyPreset:
    """``preset`` with the command line's overrides; options left out keep the preset's values."""
    return preset.replace(target_length=args.target_length, storage=args.storage, search__n_trials=args.n_trials,
                          search__max_full_evaluations=args.max_full_evaluations,
                          search__seed=args.seed, search__sampler=args.sampler, data__samples=args.samples,
                          model__device=args.device, model__dtype=checked_dtype(args.dtype),
                          search__pruning=False if args.no_pruning else None)


@command(interrupted="every finished trial and comparison figure is in the storage, and a trial cut short is "
                     "queued to run first; run the same command to continue", more_errors=(BackendError,))
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with StopSignals() as stop_signals:  # SIGTERM (a scheduler, `kill`) ends the run as Ctrl-C does
        return run_command(args, stop_signals)


def run_command(args: argparse.Namespace, stop_signals: StopSignals | None = None) -> int:
    """The command for parsed ``args``: its exit status. ``stop_signals``: checked between trials."""
    configure_logging(args.quiet)
    if args.list:
        print_presets()
        return 0
    if not args.study:
        build_parser().error("--study is required (or --list)")
    started = time.perf_counter()
    ray_settings = ray_arguments(args)
    preset = apply_overrides(load_preset(args.study), args)
    out_dir = writable_dir(study_dir(preset.name, args.out), "--out")
    storage = open_storage(preset.storage or default_storage_url(out_dir))
    check_outputs_are_its_own(out_dir, preset.name, storage)
    if args.backend == "ray":  # before loading the model: a bad address fails in seconds
        ray_backend = load_ray_backend()
        options = ray_backend.RayOptions(**ray_settings)
        ray_backend.connect(options)
    workload = load_workload(preset)
    space = search_space_for(preset, workload)
    study = open_study(preset, storage, space, workload)
    logger.info("study %r in %s: %d trials so far, target %d, %s backend, pruning %s", preset.name,
                preset.storage or default_storage_url(out_dir), len(study.trials), preset.search.n_trials,
                args.backend, "on" if preset.search.pruning else "off")
    if args.backend == "ray":
        ray_backend.run_search_ray(study, storage, workload, space, preset, options, out_dir,
                                   progress=not args.quiet, stop_signals=stop_signals)
    else:
        run_search(study, storage, workload, space, preset, progress=not args.quiet, stop_signals=stop_signals)
    rows = compare_with_baselines(study, workload, space)
    paths = write_outputs(out_dir, study, preset, workload.model_geometry, rows)
    print(format_comparison(rows, preset))
    print(f"\n{len(study.trials)} trials in the study; this run took {time.perf_counter() - started:.0f}s")
    if reason := study.user_attrs.get(STOPPED_ATTR):
        print(f"stopped early: {reason}")
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
