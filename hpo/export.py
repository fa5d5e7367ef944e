"""Export a study's result as a Hugging Face model directory or a GGUF.

    python -m hpo.export --study NAME --to DIR        # transformers, vLLM, SGLang
    python -m hpo.export --study NAME --gguf FILE     # llama.cpp, Ollama

The directory holds the study's model (for a chained study, the earlier stage's model it searched on, e.g.
the fine-tuned one) with a ``longrope`` config that stock transformers loads: the study's long factors, and
for a short-context readjustment study (``[extend] mode = "short"``) its short factors too, so that stock
transformers uses the short ones for inputs within the original window and the long ones beyond. A plain or
longer study exports short factors of 1 (the original RoPE) unless ``--short-from NAME`` names the short
study to take them from.

The GGUF (:mod:`models.gguf_export`) carries the long factors only, as llama.cpp's ``rope_freqs`` tensor: a
model that loads from a GGUF (the embedded SmolLM2) is copied with its quantization kept, a transformers
model is converted in ``--gguf-type``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import optuna

from hpo.cli import command
from hpo.records import (
    StudyError,
    best_factors,
    exported_factors,
    load_study,
    study_model,
    study_stage,
    writable_dir,
)
from hpo.stages import ShortStage
from models.export import save_extended_model
from models.gguf_export import WEIGHT_TYPES, extend_gguf, model_to_gguf
from models.loading import gguf_file, load_model
from models.rope import RopeFactors


def exported_pair(study: optuna.Study, short_study: optuna.Study | None = None
                  ) -> tuple[RopeFactors, RopeFactors | None]:
    """``(long factors, short factors or None)`` to export: ``study``'s own (:func:`hpo.records.exported_factors`),
    with the short factors of ``short_study`` when given."""
    long_factors, short_factors = exported_factors(study)
    if short_study is None:
        return long_factors, short_factors
    if short_factors is not None:
        raise StudyError(f"study {study.study_name!r} holds short factors itself: drop --short-from")
    short_stage = study_stage(short_study)
    if not isinstance(short_stage, ShortStage):
        raise StudyError(f"--short-from {short_study.study_name!r} is not a short-context readjustment study")
    if short_stage.factors.rescale_factors != long_factors.rescale_factors:
        raise StudyError(f"{short_study.study_name!r} searched short factors for other long factors than "
                         f"{study.study_name!r}'s best")
    return long_factors, best_factors(short_study)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m hpo.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", required=True, metavar="NAME", help="the study to export")
    parser.add_argument("--out", type=Path, metavar="DIR", help="the study's output directory (default: runs/NAME)")
    parser.add_argument("--storage", metavar="URL", help="the study's storage URL (default: DIR/study.db)")
    parser.add_argument("--short-from", metavar="NAME", help="take the short factors from this short study")
    parser.add_argument("--short-out", type=Path, metavar="DIR", help="that study's output directory")
    parser.add_argument("--to", type=Path, metavar="DIR", help="write a transformers model directory here")
    parser.add_argument("--gguf", type=Path, metavar="FILE", help="write a GGUF for llama.cpp and Ollama here")
    parser.add_argument("--gguf-type", choices=sorted(WEIGHT_TYPES), default="float32",
                        help="weight type when the GGUF is converted from a transformers model (default: float32; "
                             "a model that loads from a GGUF keeps its own types)")
    return parser


@command()
def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.to is None and args.gguf is None:
        parser.error("say where to write: --to DIR, --gguf FILE, or both")
    if args.to is not None:  # checked first: save_pretrained only logs an error for a file, writes nothing
        writable_dir(args.to, "--to")
    if args.gguf is not None:
        if args.gguf.is_dir():
            raise StudyError(f"--gguf {args.gguf} is a folder: give the file to write, e.g. {args.gguf}/model.gguf")
        writable_dir(args.gguf.parent, "--gguf's folder")
    study = load_study(args.study, args.storage, args.out)
    short_study = load_study(args.short_from, None, args.short_out) if args.short_from else None
    long_factors, short_factors = exported_pair(study, short_study)
    model_name = study_model(study)
    if model_name is None:
        raise StudyError(f"study {args.study!r} does not record which model it searched (made before studies "
                         f"recorded their settings): run `python -m hpo.run` on it once to record them")
    source_gguf = gguf_file(model_name)  # a GGUF is copied from it, not converted from the loaded model
    if args.to is not None or source_gguf is None:
        model, tokenizer = load_model(model_name, dtype="float32")
    if args.to is not None:
        save_extended_model(model, tokenizer, args.to, long_factors, short_factors)
        print(f"wrote {args.to}: {model_name} with long factors for {long_factors.target_length:,} tokens"
              + (" and short factors for the original window" if short_factors else ""))
    if args.gguf is not None:
        if source_gguf is not None:
            extend_gguf(source_gguf, args.gguf, long_factors)
            how = f"copied from {source_gguf.name}"
        else:
            model_to_gguf(model, tokenizer, args.gguf, long_factors, args.gguf_type)
            how = f"converted to {args.gguf_type}"
        print(f"wrote {args.gguf}: {model_name} ({how}) with its factors for {long_factors.target_length:,} "
              f"tokens as rope_freqs" + ("; its short factors are not in a GGUF" if short_factors else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
