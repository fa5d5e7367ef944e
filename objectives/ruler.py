"""RULER (Hsieh et al., 2024) through lm-eval's own tasks, offline, on a model whose RoPE we patched in memory.

lm-evaluation-harness ships RULER's tasks (``lm_eval/tasks/ruler``): each builds its samples for the asked
lengths with the model's tokenizer and scores greedy generations by string match. Three things in them
reach for the network or cost more than a CPU has, and are changed here before a run:

- the essay haystack (``prepare_niah.get_haystack("essay")``) loads a Paul Graham dataset from the hub:
  it reads our embedded essays instead, the same texts;
- ``prepare_niah`` looks up NLTK's ``punkt_tab`` sentence model, which no package on PyPI ships: it gets an
  empty one in the cache directory, which splits sentences on ``. ! ?`` (it only moves where needles go);
- every task builds 500 samples per length whatever ``limit`` says (minutes on a CPU): capped at ``limit``;
- variable tracking retries forever, deaf to Ctrl-C, when its smallest sample is longer than the length asked:
  that length is refused with a :class:`RulerError` first.

A task's score is the fraction of the expected strings found in the generations (RULER's string match).
"""

from __future__ import annotations

import functools
import inspect
import os
import re
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from models import assets

# The tasks that need nothing but a tokenizer, and those that read the essay haystack (ours).
SYNTHETIC_TASKS = ("niah_single_1", "niah_multikey_2", "niah_multikey_3", "ruler_vt", "ruler_cwe", "ruler_fwe")
ESSAY_TASKS = ("niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multivalue", "niah_multiquery")
RULER_TASKS = SYNTHETIC_TASKS + ESSAY_TASKS
PROMPT_MARGIN_TOKENS = 256  # a sample's answer prefix is added after it is sized, and fwe overshoots its length
PUNKT_FILES = ("collocations.tab", "sent_starters.txt", "abbrev_types.txt", "ortho_context.tab")
# the functions that build each task's samples, by module: each takes ``num_samples``
SAMPLE_BUILDERS = {"niah_utils": "generate_samples", "vt_utils": "sys_vartrack_w_noise_random",
                   "cwe_utils": "sys_word_pair_random", "fwe_utils": "sys_kwext"}


class RulerError(ValueError):
    """A RULER task that cannot run here."""


@dataclass(frozen=True)
class RulerScore:
    """One task at one length: the mean string-match score over ``samples`` generations."""

    task: str
    length: int
    score: float
    samples: int
    prompt_tokens: int
    seconds: float


def _offline_punkt() -> Path:
    """An NLTK data folder holding an empty (untrained) ``punkt_tab`` English model."""
    root = assets.cache_dir() / "nltk_data"
    english = root / "tokenizers" / "punkt_tab" / "english"
    english.mkdir(parents=True, exist_ok=True)
    for name in PUNKT_FILES:
        (english / name).touch()
    return root


def _capped(build: Callable[..., Any], samples: int) -> Callable[..., Any]:
    @functools.wraps(build)
    def build_fewer(*args: Any, **kwargs: Any) -> Any:
        kwargs["num_samples"] = min(kwargs.get("num_samples", samples), samples)
        return build(*args, **kwargs)

    return build_fewer


def _refusing_unfittable_lengths(build: Callable[..., Any]) -> Callable[..., Any]:
    """lm-eval's variable-tracking builder, refusing a length its smallest sample (``incremental`` noise
    sentences, the in-context example, the answer) does not fit: there its sample loop never ends, and a bare
    ``except`` in it swallows even KeyboardInterrupt."""
    signature = inspect.signature(build)

    @functools.wraps(build)
    def build_if_it_fits(*args: Any, **kwargs: Any) -> Any:
        arguments = signature.bind(*args, **kwargs)
        arguments.apply_defaults()
        given = arguments.arguments
        tokenizer, example = given["tokenizer"], given["icl_example"]
        with_example = given["add_fewshot"] and example is not None
        is_icl = given["add_fewshot"] and not with_example  # the call that builds the in-context example
        text, answer = build.__globals__["generate_input_output"](
            given["incremental"], given["num_chains"], given["num_hops"], is_icl=is_icl)
        needed_tokens = len(tokenizer(f"{text} {answer}").input_ids) + given["tokens_to_generate"]
        if with_example:
            needed_tokens += len(tokenizer(f"{example['input']} {' '.join(example['outputs'])}\n\n").input_ids)
        if needed_tokens > given["max_seq_length"]:
            raise RulerError(f"ruler_vt's smallest sample takes {needed_tokens:,} tokens with this tokenizer, "
                             f"more than the {given['max_seq_length']:,} asked: ask a longer length")
        return build(*args, **kwargs)

    return build_if_it_fits


def prepare_offline(essays: Sequence[str], samples: int) -> None:
    """Point lm-eval's RULER tasks at ``essays`` and build at most ``samples`` samples per task and length.

    The harness loads a task's Python file as a cached module object (``_load_module_with_cache``) and
    reuses it while the file is unchanged, so the patches go onto those objects.
    """
    os.environ.setdefault("NLTK_DATA", str(_offline_punkt()))  # read when prepare_niah is imported
    import lm_eval.tasks.ruler.prepare_niah as prepare_niah
    from lm_eval.tasks._yaml_loader import _load_module_with_cache

    folder = Path(prepare_niah.__file__).parent
    words = re.sub(r"\s+", " ", " ".join(essays)).split(" ")
    original = getattr(prepare_niah.get_haystack, "__wrapped__", prepare_niah.get_haystack)

    @functools.wraps(original)
    def get_haystack(type_haystack: str) -> Any:
        return words if type_haystack == "essay" else original(type_haystack=type_haystack)

    modules = {name: _load_module_with_cache(folder / f"{name}.py") for name in SAMPLE_BUILDERS}
    prepare_niah.get_haystack = modules["niah_utils"].get_haystack = get_haystack
    for name, function in SAMPLE_BUILDERS.items():
        build = getattr(modules[name], function)
        while hasattr(build, "__wrapped__"):  # a module prepared by an earlier call
            build = build.__wrapped__
        if name == "vt_utils":
            build = _refusing_unfittable_lengths(build)
        setattr(modules[name], function, _capped(build, samples))


def parse_results(output: dict[str, Any], length: int) -> list[tuple[str, float, int]]:
    """``(task, score, samples)`` for each task of an lm-eval ``simple_evaluate`` output at one length.

    RULER's tasks report one metric per length (``"8192,none"``), -1 where no sample had that length.
    """
    rows = []
    for task, metrics in output["results"].items():
        if task not in RULER_TASKS:  # a group's aggregate, if one was asked
            continue
        score = metrics.get(f"{length},none")
        if score is None or score == -1:
            raise RulerError(f"lm-eval scored no {length}-token sample of {task}")
        rows.append((task, float(score), int(output["n-samples"][task]["effective"])))
    return rows


def evaluate_ruler(model: Any, tokenizer: Any, tasks: Sequence[str], length: int, samples: int,
                   essays: Sequence[str]) -> list[RulerScore]:
    """Score ``model`` as it is (with whatever RoPE it has now) on ``tasks`` at ``length`` tokens.

    One lm-eval run per task, so each score has its own time; ``samples`` generations per task.
    """
    unknown = [task for task in tasks if task not in RULER_TASKS]
    if unknown:
        raise RulerError(f"unknown RULER task(s) {', '.join(unknown)}; choose from {', '.join(RULER_TASKS)} "
                         f"(the QA tasks download their data)")
    prepare_offline(essays, samples)
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    runtime = HFLM(pretrained=model, tokenizer=tokenizer, backend="causal", batch_size=1,
                   max_length=length + PROMPT_MARGIN_TOKENS)
    scores = []
    with tempfile.TemporaryDirectory() as tokenizer_dir:  # the tasks load the tokenizer by path
        tokenizer.save_pretrained(tokenizer_dir)
        for task in tasks:
            started = time.perf_counter()
            output = simple_evaluate(model=runtime, tasks=[task], limit=samples, bootstrap_iters=0,
                                     log_samples=True, verbosity="WARNING",
                                     metadata={"tokenizer": tokenizer_dir, "max_seq_lengths": [length]})
            seconds = time.perf_counter() - started
            prompt_tokens = sum(int(record["doc"].get("length", length)) for record in output["samples"][task])
            for name, score, count in parse_results(output, length):
                scores.append(RulerScore(name, length, score, count, prompt_tokens, seconds))
    return scores
