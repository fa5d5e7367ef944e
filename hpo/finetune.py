"""Fine-tune a model with a study's searched RoPE factors: ``python -m hpo.finetune --study NAME``.

LongRoPE searches rescale factors, then fine-tunes the model *with those factors on*, so the weights adapt to
the rescaled positions; this is that stage. It reads the study's best factors (or ``--factors FILE``), loads
the preset's model, patches its RoPE in place (:mod:`models.patch`) and trains on Accelerate (one CPU process
in tests, ``accelerate launch`` for several GPUs) with the preset's ``[finetune]`` settings.

Data (:mod:`objectives.packing`). The documents of ``finetune.source`` (default: the study's text) from
``first_document`` on are tokenized and packed back to back, each followed by EOS, into rows of exactly
``sequence_length`` tokens (a tail shorter than a row is dropped). Position ids restart at 0 at each document
start, and the label of a document's first token is -100, so no loss crosses a boundary. Where the study's
windows start with BOS (``documents`` mode), so do the documents and every row, short rows included: BOS is
the first token of a row, in place of the text token that would otherwise be there unscored, so the model
trains on what the search measures, BOS + L-1 tokens. In transformers 5.23, a forward with ``position_ids``
that restart, no ``attention_mask`` and no cache (``use_cache=False``) is detected as packed
(``masking_utils.find_packed_sequence_indices``) and SDPA and eager attention get a block-diagonal causal
mask: documents in one row do not see each other. flash_attention_2 detects packing only for one row per
forward. The text is split as the study reads it (``data.window_mode``): real corpora by document; the
embedded essays, short texts that the search reads as one stream, as a single document, so that positions
reach the full sequence length. The last ``max(1, data.heldout_samples)`` rows are held out; training rows are
read in a seeded order, a new permutation per pass.

Mixed context window (LongRoPE2, ``mixed_short_fraction`` > 0). That share of the micro-batches, chosen from the
seed, is cut into rows of the original window and run with the RoPE that the exported model uses for inputs
within that window: every factor 1 (the original frequencies) with the export's attention factor, since stock
transformers' ``longrope`` applies one ``attention_factor`` to both sets. The others run at ``sequence_length``
with the searched factors.

Outputs, in the study directory (``runs/NAME`` or ``--out``):

- ``finetune/checkpoint-STEP/``: the latest resumable checkpoint (Accelerate state: weights, optimizer,
  scheduler, RNG; plus ``finetune_state.json`` and the ``rope_factors.json`` trained with), written under a
  temporary name and renamed, so a run killed while saving keeps the previous one;
- ``finetune/summary.json``: steps, tokens, seconds, held-out loss before and after;
- ``finetuned/``: the model with its ``longrope`` config (LoRA merged), which stock
  ``AutoModelForCausalLM.from_pretrained`` loads, and ``rope_factors.json``.

Running the same command again continues from the latest checkpoint, with the same results as a run that
was never stopped, as long as the settings are the same (otherwise: ``--restart``).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import nn
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from hpo.cli import add_dtype_argument, checked_dtype, command, configure_logging
from hpo.records import (
    FINETUNE_DIR,
    FINETUNE_SUMMARY_FILE,
    FINETUNED_DIR,
    FINETUNED_FACTORS_FILE,
    stage_for,
    study_dir,
    study_factors,
)
from hpo.stages import ShortStage
from models.atomic import SCRATCH_SUFFIX, move_into_place, remove, written_atomically
from models.export import save_extended_model
from models.loading import load_model, pick_attention, pick_device, pick_dtype
from models.patch import apply_factors
from models.rope import RopeFactors, RopeGeometry, warn_if_other_window
from objectives.data import default_window_mode
from objectives.packing import load_packed_rows, model_inputs, split_rows, training_rows
from objectives.perplexity import packed_rows_loss
from studies import FinetuneSpec, StudyPreset, load_preset

logger = logging.getLogger("hpo.finetune")

CHECKPOINT_PREFIX = "checkpoint-"
STATE_FILE = "finetune_state.json"
MAX_GRAD_NORM = 1.0
IGNORE_INDEX = -100  # transformers' cross-entropy skips these labels
ResumeMode = Literal["auto", "must", "restart"]
MIXED_PRECISION = {torch.float32: "no", torch.bfloat16: "bf16", torch.float16: "fp16"}


class FinetuneError(ValueError):
    """Settings or a checkpoint that fine-tuning cannot use; the message says what to pass instead."""


# ----------------------------------------------------------------------------------------------------------------
# Data: packed rows, as (tokens, starts) pairs of [rows, length] tensors; starts marks each document's first token.


def in_original_window(micro_step: int, fraction: float, seed: int) -> bool:
    """Whether micro-batch ``micro_step`` runs at the original window (mixed context window training)."""
    return fraction > 0 and np.random.default_rng([seed, micro_step, 1]).random() < fraction


def original_window_factors(factors: RopeFactors) -> RopeFactors:
    """The RoPE an exported ``longrope`` model uses within the original window: factors 1, same attention factor."""
    return RopeFactors(rescale_factors=(1.0,) * factors.num_factors, original_length=factors.original_length,
                       target_length=factors.original_length, attention_scaling=factors.attention_scaling,
                       method="original-window")


def training_text(preset: StudyPreset) -> tuple[str, str]:
    """``(source, window mode)`` of the fine-tuning text: by default the study's, split as the study splits it."""
    source = preset.finetune.source or preset.data.source
    return source, preset.data.window_mode or default_window_mode(source)


def row_bos(preset: StudyPreset, tokenizer) -> int | None:
    """BOS where the study's windows start with it (``documents`` mode, as ``load_windows`` cuts them), else None."""
    return tokenizer.bos_token_id if training_text(preset)[1] == "documents" else None


def load_rows(preset: StudyPreset, tokenizer, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The packed rows of the preset's fine-tuning text (see the module docstring): one to train on at least,
    and the held-out ones."""
    source, mode = training_text(preset)
    return load_packed_rows(source, mode, tokenizer, length, first_document=preset.finetune.first_document,
                            bos_token_id=row_bos(preset, tokenizer), min_rows=heldout_rows(preset) + 1)


def heldout_rows(preset: StudyPreset) -> int:
    """How many packed rows, the last of the text, are held out: ``data.heldout_samples``, at least one."""
    return max(1, preset.data.heldout_samples)


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints.


@dataclass
class TrainState:
    """What a checkpoint holds besides the Accelerate state: where training is and what it measured."""

    settings: dict
    step: int = 0
    position: int = 0  # training rows consumed by all processes: the cursor in the data order
    tokens: int = 0
    seconds: float = 0.0
    short_batches: int = 0
    losses: list[float] = field(default_factory=list)  # mean training loss of each step
    evals: list[list[float]] = field(default_factory=list)  # [step, held-out loss]


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The complete checkpoint with the highest step; leftovers of an interrupted save are ignored."""
    done = [path for path in run_dir.glob(f"{CHECKPOINT_PREFIX}*")
            if path.name.removeprefix(CHECKPOINT_PREFIX).isdigit() and (path / STATE_FILE).is_file()]
    return max(done, key=lambda path: int(path.name.removeprefix(CHECKPOINT_PREFIX)), default=None)


def save_checkpoint(accelerator: Accelerator, run_dir: Path, state: TrainState, factors: RopeFactors) -> Path:
    """Write ``checkpoint-STEP`` under a temporary name, rename it, then drop the older checkpoints."""
    final = run_dir / f"{CHECKPOINT_PREFIX}{state.step}"
    scratch = final.with_name(final.name + SCRATCH_SUFFIX)  # one name for every process: they all write into it
    if accelerator.is_main_process:
        for leftover in run_dir.glob(f"*{SCRATCH_SUFFIX}"):
            remove(leftover)
    accelerator.wait_for_everyone()
    accelerator.save_state(scratch)
    if accelerator.is_main_process:
        factors.save(scratch / FINETUNED_FACTORS_FILE)
        (scratch / STATE_FILE).write_text(json.dumps(asdict(state), indent=1) + "\n")
        move_into_place(scratch, final)  # over an incomplete leftover of this step (no state file)
        for old in run_dir.glob(f"{CHECKPOINT_PREFIX}*"):
            if old != final:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    logger.info("step %d: checkpoint %s", state.step, final)
    return final


def run_settings(preset: StudyPreset, model_name: str, length: int) -> dict:
    """What a resumed run must share with the checkpoint for its results to be those of one run (JSON types)."""
    source, mode = training_text(preset)
    settings = {"model": model_name, **asdict(preset.finetune), "sequence_length": length,
                "source": source, "window_mode": mode}
    for key in ("save_every", "eval_every", "gradient_checkpointing"):  # they change when and how, not what
        del settings[key]
    return json.loads(json.dumps(settings))


def resume_from(run_dir: Path, resume: ResumeMode, settings: dict) -> Path | None:
    """The checkpoint to continue from, or None to start at step 0 (``restart`` removes the old ones)."""
    checkpoint = latest_checkpoint(run_dir)
    if resume == "restart":
        for old in run_dir.glob(f"{CHECKPOINT_PREFIX}*"):
            shutil.rmtree(old)
        return None
    if checkpoint is None:
        if resume == "must":
            raise FinetuneError(f"--resume: no checkpoint in {run_dir}")
        return None
    saved = json.loads((checkpoint / STATE_FILE).read_text())["settings"]
    changed = sorted(key for key in settings.keys() | saved.keys() if settings.get(key) != saved.get(key))
    if changed:
        raise FinetuneError(f"{checkpoint} was trained with other settings ("
                            + ", ".join(f"{k}: {saved.get(k)!r} there, {settings.get(k)!r} now" for k in changed)
                            + "); pass --restart to start over with the new ones")
    return checkpoint


# ----------------------------------------------------------------------------------------------------------------
# Training.


def add_lora(model: nn.Module, rank: int, alpha: int) -> nn.Module:
    """``model`` with LoRA adapters on every linear layer but the LM head; only the adapters train."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise FinetuneError("LoRA needs peft: pip install 'longrope-hpo[lora]'") from None
    with warnings.catch_warnings():  # peft reads transformers' deprecated name; nothing for a user to change
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        return get_peft_model(model, LoraConfig(r=rank, lora_alpha=alpha, target_modules="all-linear",
                                                task_type="CAUSAL_LM"))


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only, as usual (not on norms and biases)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in trainable if p.ndim >= 2], "weight_decay": weight_decay},
            {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0}]


@dataclass
class Rows:
    """The packed rows a run reads: the training ones and the held-out ones (the last of the text)."""

    train_tokens: torch.Tensor
    train_starts: torch.Tensor
    heldout_tokens: torch.Tensor
    heldout_starts: torch.Tensor

    @classmethod
    def split(cls, tokens: torch.Tensor, starts: torch.Tensor, heldout: int) -> Rows:
        return cls(tokens[:-heldout], starts[:-heldout], tokens[-heldout:], starts[-heldout:])


def load_for_training(preset: StudyPreset, factors: RopeFactors, device: torch.device) -> tuple[nn.Module, object, str]:
    """``(model, tokenizer, model name)``: fp32 master weights on the CPU (Accelerate places them), the model
    the stage trains (a longer stage's is the earlier stage's), checked against ``factors``."""
    stage = stage_for(preset)
    if isinstance(stage, ShortStage):
        raise FinetuneError(f"study {preset.name!r} searched short factors for the model of "
                            f"{stage.from_study!r}; fine-tune that study (its long factors) instead")
    model_name = stage.model if stage else preset.model.name
    model, tokenizer = load_model(model_name, dtype="float32", device="cpu",
                                  attn_implementation=pick_attention(preset.model.attn, device))
    geometry = RopeGeometry.from_config(model.config)
    factors.validate(geometry)
    warn_if_other_window(factors, preset.model.original_length or geometry.original_length)
    return model, tokenizer, model_name


def prepare_training(model: nn.Module, preset: StudyPreset, device: torch.device
                     ) -> tuple[Accelerator, nn.Module, torch.optim.Optimizer, object]:
    """The accelerator (a lower precision, auto: the type measured fastest for the model's shapes, comes from
    its autocast), and the model (with LoRA adapters if asked), its optimizer and schedule, prepared by it."""
    tune = preset.finetune
    precision = pick_dtype(tune.dtype, device, model.config)
    accelerator = Accelerator(cpu=device.type == "cpu", mixed_precision=MIXED_PRECISION[precision],
                              gradient_accumulation_steps=tune.gradient_accumulation,
                              step_scheduler_with_optimizer=False)  # the schedule counts optimizer steps
    set_seed(tune.seed)
    if tune.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if tune.lora:
        model = add_lora(model, tune.lora_rank, tune.lora_alpha)
    optimizer = torch.optim.AdamW(parameter_groups(model, tune.weight_decay), lr=tune.learning_rate)
    scheduler = get_cosine_schedule_with_warmup(optimizer, tune.warmup_steps, tune.steps)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    return accelerator, model, optimizer, scheduler


def resume_state(accelerator: Accelerator, run_dir: Path, resume: ResumeMode, settings: dict,
                 factors: RopeFactors) -> tuple[TrainState, RopeFactors]:
    """Where training starts, and the factors it trains with: a checkpoint's (loaded into ``accelerator``'s
    objects) when :func:`resume_from` picks one, else step 0 and ``factors``."""
    run_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = resume_from(run_dir, resume, settings)
    if checkpoint is None:
        return TrainState(settings=settings), factors
    accelerator.load_state(checkpoint)
    state = TrainState(**json.loads((checkpoint / STATE_FILE).read_text()))
    saved = RopeFactors.load(checkpoint / FINETUNED_FACTORS_FILE)
    if saved != factors:
        logger.warning("resuming with the factors %s was started with, not the ones given now "
                       "(--restart to train with those)", checkpoint)
    logger.info("resumed from %s at step %d", checkpoint, state.step)
    return state, saved


def measure_heldout(state: TrainState, accelerator: Accelerator, model: nn.Module, factors: RopeFactors,
                    rows: Rows) -> None:
    """Append the held-out loss with ``factors`` at ``state.step`` to ``state.evals``; ``model`` (unwrapped)
    is left in training mode."""
    apply_factors(model, factors)
    with accelerator.autocast():  # the unwrapped model's decoder runs outside the prepared forward's autocast
        state.evals.append([state.step, packed_rows_loss(model, rows.heldout_tokens, rows.heldout_starts)])
    model.train()
    logger.info("step %d: held-out loss %.4f (perplexity %.2f)", state.step, state.evals[-1][1],
                math.exp(state.evals[-1][1]))


def train_step(state: TrainState, accelerator: Accelerator, model: nn.Module, optimizer: torch.optim.Optimizer,
               scheduler, rows: Rows, factors: RopeFactors, tune: FinetuneSpec, short_row_bos: int | None) -> None:
    """One optimizer step over ``tune.gradient_accumulation`` micro-batches read from ``state.position`` on
    (a seeded share at the original window with :func:`original_window_factors`); ``state`` advances."""
    started, step_tokens, step_loss = time.perf_counter(), 0, 0.0
    raw_model = accelerator.unwrap_model(model)
    for micro in range(tune.gradient_accumulation):
        first = state.position + accelerator.process_index * tune.batch_size
        chosen = training_rows(first, tune.batch_size, len(rows.train_tokens), tune.seed)
        tokens, starts = rows.train_tokens[chosen], rows.train_starts[chosen]
        if in_original_window(state.step * tune.gradient_accumulation + micro, tune.mixed_short_fraction, tune.seed):
            tokens, starts = split_rows(tokens, starts, factors.original_length, short_row_bos)
            apply_factors(raw_model, original_window_factors(factors))
            state.short_batches += 1
        else:
            apply_factors(raw_model, factors)
        inputs = {k: v.to(accelerator.device) for k, v in model_inputs(tokens, starts).items()}
        with accelerator.accumulate(model):  # gradients sync on the last micro-batch only
            loss = model(**inputs, use_cache=False).loss
            accelerator.backward(loss)
        state.position += tune.batch_size * accelerator.num_processes
        step_tokens += tokens.numel() * accelerator.num_processes
        step_loss += loss.item() / tune.gradient_accumulation
    accelerator.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    state.step += 1
    state.tokens += step_tokens
    state.losses.append(step_loss)
    state.seconds += time.perf_counter() - started


def finetune(preset: StudyPreset, factors: RopeFactors, out_dir: str | Path, *, resume: ResumeMode = "auto",
             progress: bool = True, stop_after: int | None = None) -> Path | None:
    """Fine-tune ``preset``'s model with ``factors`` on, per ``preset.finetune``; outputs in ``out_dir``.

    ``resume``: ``auto`` continues from the latest checkpoint in ``out_dir/finetune`` if there is one,
    ``must`` requires one, ``restart`` removes them and starts at step 0. A resumed run uses the factors it
    was started with. ``stop_after`` ends this call after that many steps in all, with a checkpoint, as if
    interrupted. Returns the exported model directory ``out_dir/finetuned``, or None when stopped early.
    Raises :class:`FinetuneError`, :class:`~objectives.data.DataError`, :class:`~models.rope.FactorError` or
    :class:`~models.loading.ModelLoadError` on input it cannot use, before any checkpoint is touched.
    """
    tune = preset.finetune
    out_dir, started = Path(out_dir), time.perf_counter()
    run_dir = out_dir / FINETUNE_DIR
    device = pick_device(preset.model.device)
    model, tokenizer, model_name = load_for_training(preset, factors, device)
    length = tune.sequence_length or preset.target_length
    if length <= factors.original_length:
        raise FinetuneError(f"sequence_length {length} must be longer than the original window "
                            f"{factors.original_length}: fine-tuning is for the extended positions")
    rows = Rows.split(*load_rows(preset, tokenizer, length), heldout_rows(preset))
    settings = run_settings(preset, model_name, length)
    if (model.config._attn_implementation == "flash_attention_2" and settings["window_mode"] == "documents"
            and (tune.batch_size > 1 or tune.mixed_short_fraction)):
        logger.warning("flash_attention_2 keeps packed documents apart only with one row per forward: "
                       "with batch_size > 1 or short rows, documents in a row attend to each other")
    accelerator, model, optimizer, scheduler = prepare_training(model, preset, device)
    raw_model = accelerator.unwrap_model(model)
    state, factors = resume_state(accelerator, run_dir, resume, settings, factors)

    stop = min(tune.steps, stop_after or tune.steps)
    logger.info("fine-tuning %s%s at %d tokens with %s factors: %d training and %d held-out sequences, "
                "steps %d..%d of %d", model_name, " (LoRA)" if tune.lora else "", length, factors.method,
                len(rows.train_tokens), len(rows.heldout_tokens), state.step, stop, tune.steps)
    rows_per_step = tune.batch_size * tune.gradient_accumulation * accelerator.num_processes
    if tune.steps * rows_per_step > len(rows.train_tokens):
        logger.warning("%d steps read %d sequences, the text has %d: each is read about %.1f times",
                       tune.steps, tune.steps * rows_per_step, len(rows.train_tokens),
                       tune.steps * rows_per_step / len(rows.train_tokens))
    if not state.evals:
        measure_heldout(state, accelerator, raw_model, factors, rows)  # the searched factors, original weights
    model.train()
    bar = tqdm(total=tune.steps, initial=state.step, desc="fine-tuning", unit="step", disable=not progress)
    while state.step < stop:
        train_step(state, accelerator, model, optimizer, scheduler, rows, factors, tune, row_bos(preset, tokenizer))
        bar.update(1)
        bar.set_postfix(loss=f"{state.losses[-1]:.4f}", tok_s=f"{state.tokens / state.seconds:,.0f}")
        if state.step % tune.eval_every == 0 or state.step == tune.steps:
            measure_heldout(state, accelerator, raw_model, factors, rows)
        if state.step % tune.save_every == 0 or state.step == stop:
            save_checkpoint(accelerator, run_dir, state, factors)
    bar.close()
    if state.step < tune.steps:
        logger.info("stopped at step %d of %d: run again to continue from %s", state.step, tune.steps, run_dir)
        return None
    export_dir = out_dir / FINETUNED_DIR
    if accelerator.is_main_process:
        export_model(raw_model.merge_and_unload() if tune.lora else raw_model, tokenizer, factors, export_dir)
        write_summary(run_dir / FINETUNE_SUMMARY_FILE, preset, state, export_dir, time.perf_counter() - started)
    accelerator.wait_for_everyone()
    return export_dir


def export_model(model: nn.Module, tokenizer, factors: RopeFactors, export_dir: Path) -> None:
    """Save ``model`` with a ``longrope`` config for ``factors`` and their factor file, replacing ``export_dir``
    only once complete."""
    with written_atomically(export_dir) as scratch:
        save_extended_model(model, tokenizer, scratch, long_factors=factors)
        factors.save(scratch / FINETUNED_FACTORS_FILE)
    logger.info("wrote %s", export_dir)


def write_summary(path: Path, preset: StudyPreset, state: TrainState, export_dir: Path, seconds: float) -> None:
    """``summary.json``: what was trained, how long, and the held-out loss before and after."""
    before, after = state.evals[0][1], state.evals[-1][1]
    summary = {"study": preset.name, "model": state.settings["model"], "steps": state.step, "tokens": state.tokens,
               "train_seconds": state.seconds, "seconds_this_run": seconds, "short_batches": state.short_batches,
               "heldout_sequences": heldout_rows(preset), "heldout_loss_before": before,
               "heldout_loss_after": after, "heldout_perplexity_before": math.exp(before),
               "heldout_perplexity_after": math.exp(after), "evals": state.evals, "finetuned": str(export_dir),
               "settings": state.settings}
    path.write_text(json.dumps(summary, indent=2) + "\n")


# ----------------------------------------------------------------------------------------------------------------
# The command line.


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m hpo.finetune",
        description="Fine-tune a study's model with its best RoPE factors on (LongRoPE's fine-tuning stage). "
                    "Writes resumable checkpoints to DIR/finetune/ and the model, with a longrope config that "
                    "stock transformers loads, to DIR/finetuned/. Running the same command again continues "
                    "from the latest checkpoint. Options left out take the preset's [finetune] values.",
    )
    parser.add_argument("--study", required=True, metavar="NAME", help="preset name or path to a preset .toml file")
    parser.add_argument("--out", type=Path, default=None, metavar="DIR",
                        help="the study's output directory (default: runs/NAME)")
    parser.add_argument("--storage", default=None, metavar="URL", help="the study's storage URL")
    parser.add_argument("--factors", type=Path, default=None, metavar="FILE",
                        help="train with this factor file instead of the study's best factors")
    parser.add_argument("--steps", type=int, default=None, metavar="N", help="optimizer steps")
    parser.add_argument("--lora", action="store_true", help="train LoRA adapters (peft) instead of every weight")
    parser.add_argument("--lr", type=float, default=None, metavar="X", help="peak learning rate (warmup, then cosine)")
    parser.add_argument("--sequence-length", type=int, default=None, metavar="N",
                        help="tokens per packed training sequence (default: the study's target length)")
    parser.add_argument("--mixed-short-fraction", type=float, default=None, metavar="F",
                        help="LongRoPE2 mixed context window: this share of the micro-batches runs at the "
                             "original window with the original frequencies")
    parser.add_argument("--seed", type=int, default=None, metavar="N", help="seed of the data order and initialisation")
    parser.add_argument("--device", default=None, help="auto, cpu, cuda")
    add_dtype_argument(parser, None, "mixed precision over the fp32 weights, overriding the preset's [finetune] dtype")
    parser.add_argument("--stop-after", type=int, default=None, metavar="STEP",
                        help="stop at this step with a checkpoint (split a long run into sessions)")
    again = parser.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_const", const="must", dest="resume", default="auto",
                       help="require a checkpoint to continue from (by default the latest one is continued "
                            "if there is one; its settings must be the same)")
    again.add_argument("--restart", action="store_const", const="restart", dest="resume",
                       help="remove the checkpoints and start from step 0")
    parser.add_argument("--quiet", action="store_true", help="only warnings and the final summary")
    return parser


def format_summary(summary: dict) -> str:
    """The run's ``summary.json`` in three lines for the terminal."""
    before, after = summary["heldout_loss_before"], summary["heldout_loss_after"]
    settings = summary["settings"]
    return "\n".join([
        f"fine-tuned {summary['model']}{' (LoRA)' if settings['lora'] else ''} for {summary['steps']} steps at "
        f"{settings['sequence_length']:,} tokens: {summary['tokens']:,} tokens, {summary['train_seconds']:.0f}s",
        f"held-out loss {before:.4f} -> {after:.4f}, perplexity {math.exp(before):.2f} -> {math.exp(after):.2f} "
        f"({summary['heldout_sequences']} sequence(s))",
        f"model: {summary['finetuned']}",
    ])


@command(interrupted="the latest checkpoint is kept; run the same command to continue")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.quiet)
    preset = load_preset(args.study).replace(
        finetune__steps=args.steps, finetune__lora=args.lora or None, finetune__learning_rate=args.lr,
        finetune__sequence_length=args.sequence_length, finetune__mixed_short_fraction=args.mixed_short_fraction,
        finetune__seed=args.seed, finetune__dtype=checked_dtype(args.dtype), model__device=args.device)
    if args.factors:
        factors = RopeFactors.load(args.factors)
    else:
        factors, _ = study_factors(preset.name, args.storage, args.out)
    out_dir = study_dir(preset.name, args.out)
    finished = finetune(preset, factors, out_dir, resume=args.resume, progress=not args.quiet,
                        stop_after=args.stop_after)
    if finished is None:
        print(f"stopped by --stop-after {args.stop_after}; run the same command without it to continue")
        return 0
    print(format_summary(json.loads((out_dir / FINETUNE_DIR / FINETUNE_SUMMARY_FILE).read_text())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
