"""Study presets: one readable TOML file per study in this folder.

A preset says which model to extend, from which window to which length, on
which text, with which fitness and search budget. ``load_preset("smollm2_16k")``
reads ``studies/smollm2_16k.toml``; a path to any ``.toml`` file works too.
Every key is checked: a typo is an error, not a silently ignored setting.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PRESET_DIR = Path(__file__).parent
STUDY_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*")
FITNESS_KINDS = ("perplexity", "needle-perplexity")
EXTEND_MODES = ("longer", "short")
START_TOKEN_SEARCHES = ("gene", "sweep")  # n_hat as a gene, or the reference's sweep rule (hpo.sampler)
SEED_METHODS = ("pi", "ntk", "yarn", "yarn-linear")  # baseline_seeds' methods (tests/test_sampler.py)
# "longrope": the evolutionary sampler (hpo.sampler); "hybrid": the same with a TPE-proposed generation 0
# (hpo.hybrid_sampler); the others are Optuna's (hpo.study.CURVE_SAMPLERS)
SAMPLERS = ("longrope", "tpe", "cmaes", "gp", "hybrid")
GENETIC_SAMPLERS = ("longrope", "hybrid")  # the samplers with generations (early stopping, the n_hat sweep)


class PresetError(ValueError):
    """A study name that does not exist, or a preset file that cannot be used."""


@dataclass(frozen=True)
class ModelSpec:
    """``[model]``: which model a study loads (a short name, hub id, directory or .gguf) and how it runs."""

    name: str = "smollm2-135m"
    dtype: str = "auto"
    device: str = "auto"
    attn: str = "auto"
    original_length: int | None = None  # default: the model config's window


@dataclass(frozen=True)
class DataSpec:
    """``[data]``: the text a study searches on (``samples`` windows of ``target_length`` tokens from
    ``first_window`` on) and the held-out windows and text it is checked on, never searched."""

    source: str = "essays"
    samples: int = 1
    first_window: int = 0
    window_mode: str | None = None  # default: stream for the essays, documents otherwise
    heldout_samples: int = 1
    heldout_first_window: int | None = None  # default: right after the searched windows
    min_tokens: int | None = None  # documents mode: only documents this long (the reference's --dataset-min-tokens)
    # A second held-out set, of another kind of text, for the comparison only ("holmes": embedded stories).
    heldout_text: str | None = None
    heldout_text_samples: int = 1

    @property
    def heldout_start(self) -> int:
        """The first held-out window of ``source``."""
        return self.first_window + self.samples if self.heldout_first_window is None else self.heldout_first_window


@dataclass(frozen=True)
class FitnessSpec:
    """``[fitness]``: what a trial's value is (perplexity of the searched windows, or LongRoPE2's needle-driven one)."""

    kind: str = "perplexity"
    needles: int = 4  # needle-perplexity: needles per window, at evenly spread depths


@dataclass(frozen=True)
class SearchSpec:
    """``[search]``: the sampler and its budget, the space (n_hat candidates, attention scaling, factor bounds,
    LongRoPE2's critical dimension), the seeds, pruning and early stopping."""

    n_trials: int = 64
    # "longrope": LongRoPE's evolutionary search over every pair's factor (the settings population .. mutants_of
    # below are its own). "tpe", "cmaes", "gp": Optuna's samplers over a family of monotone factor curves with
    # `curve_knots` knots (hpo/curve_space.py), up to max_factor. "hybrid": the evolutionary search whose
    # generation 0 is the seeds and then `population` trials proposed by TPE over those curves.
    sampler: str = "longrope"
    curve_knots: int = 4
    population: int = 64
    parents: int = 32
    mutants: int = 16
    crossovers: int = 16
    mutation_prob: float = 0.3
    crossover_prob: float = 0.3
    start_tokens: tuple[int, ...] = (0,)
    attention_scaling: tuple[float, float] | None = None  # searched range; None = LongRoPE's default
    max_factor: float | None = None  # default: scale + 1 (LongRoPE); in LongRoPE2 mode use length_scale
    critical_dim: int | str | tuple[int, ...] = 0  # LongRoPE2: "auto", a dim index or a list to sweep; 0: every dim
    length_scale: float | None = None  # LongRoPE2: upper bound of the searched factors (reference: 64 at s=32); 2 s
    yarn_beta_fast: float = 32.0  # the YaRN seeds' ramp (and the YaRN row of the comparison); Mistral: 128
    yarn_beta_slow: float = 1.0  # Mistral in the reference: 2
    start_token_search: str = "gene"  # n_hat mutates like the factors; "sweep": the reference's try-and-keep rule
    mutants_of: tuple[str, ...] = ("pi", "ntk", "yarn")  # generation 0's mutants (paper); reference: ["yarn-linear"]
    # Also open the search with the curves a user makes by hand (models.baselines.hand_made_curves: NTK built for
    # larger scales and YaRN with other betas, with LongRoPE's attention scaling); the paper presets do not.
    hand_made_seeds: bool = True
    seed: int = 0
    # Multi-fidelity pruning (hpo/pruning.py): a trial is measured window by window and stopped once its
    # running perplexity is behind the `pruning_rank` (default `parents`) best complete trials at the same step
    # by more than the margin.
    pruning: bool = False
    pruning_margin: float = 0.01  # relative: prune when value > (1 + margin) * the rank-th best complete value
    pruning_rank: int | None = None  # default `parents` (keeps the search); fewer prunes more, maybe a would-be parent
    pruning_prefixes: tuple[float, ...] = ()  # extra rungs: window 0 cut to these fractions of its length first
    # Early stopping (hpo/early_stopping.py), the reference's rule: stop once the best value changed by less than
    # `early_stop_delta` (absolute) over the last `early_stop_generations` generations; None = off.
    early_stop_delta: float = 0.001
    early_stop_generations: int | None = None
    # A budget in full-length evaluations (searched windows read at the target length; prefix rungs not counted):
    # no new trial once the finished ones spent this many, whatever n_trials allows; None = off. With pruning,
    # trials are not a fixed cost: this is the budget that compares with a search that measures every trial.
    max_full_evaluations: int | None = None


@dataclass(frozen=True)
class ExtendSpec:
    """Build on an earlier study's outputs instead of the bare model (a chained stage).

    ``mode = "longer"`` (LongRoPE's progressive extension): search further factors for
    ``target_length`` on top of the earlier study's, treating its target length as the window;
    the study's factors are the product of both. ``mode = "short"`` (short-context readjustment):
    search short factors at ``target_length`` (the original window) for a model that carries the
    earlier study's long factors; the export holds both, switched by input length.
    """

    from_study: str | None = None
    from_dir: str | None = None  # the earlier study's output directory; default runs/<from_study>
    mode: str = "longer"
    finetuned: bool = True  # start from its fine-tuned model (python -m hpo.finetune), else the bare model


@dataclass(frozen=True)
class FinetuneSpec:
    """The fine-tuning stage (``python -m hpo.finetune``) that follows a search."""

    steps: int = 400
    learning_rate: float = 2e-5
    warmup_steps: int = 20
    weight_decay: float = 0.0
    batch_size: int = 1  # packed sequences per optimizer step (before gradient accumulation)
    gradient_accumulation: int = 1
    sequence_length: int | None = None  # default: the study's target_length
    source: str | None = None  # training text; default: the study's data.source
    first_document: int = 0  # skip this many documents (keep the searched and held-out text out of training)
    lora: bool = False  # LoRA adapters (peft) instead of full fine-tuning
    lora_rank: int = 16
    lora_alpha: int = 32
    gradient_checkpointing: bool = True
    dtype: str = "auto"  # auto: bf16 on GPUs that compute it natively; on a CPU the type measured fastest
    mixed_short_fraction: float = 0.0  # LongRoPE2: share of sequences at the original window, original RoPE
    save_every: int = 100  # steps between resumable checkpoints
    eval_every: int = 50  # steps between held-out loss measurements
    seed: int = 0


@dataclass(frozen=True)
class StudyPreset:
    """One study, as ``studies/NAME.toml`` describes it: the model, the text, the fitness, the search, the
    fine-tuning that follows and the earlier stage it builds on. Frozen, and checked whole when made
    (:func:`load_preset`, :meth:`replace`): a :class:`PresetError` lists every problem at once."""

    name: str
    target_length: int
    description: str = ""
    model: ModelSpec = field(default_factory=ModelSpec)
    data: DataSpec = field(default_factory=DataSpec)
    fitness: FitnessSpec = field(default_factory=FitnessSpec)
    search: SearchSpec = field(default_factory=SearchSpec)
    finetune: FinetuneSpec = field(default_factory=FinetuneSpec)
    extend: ExtendSpec = field(default_factory=ExtendSpec)
    storage: str | None = None  # default: sqlite file in the output directory

    def replace(self, **changes: Any) -> StudyPreset:
        """A copy with top-level fields or ``section__field`` keys changed (CLI overrides)."""
        sections: dict[str, dict[str, Any]] = {}
        top = {}
        for key, value in changes.items():
            if value is None:
                continue
            section, _, name = key.partition("__")
            if name:
                sections.setdefault(section, {})[name] = value
            else:
                top[key] = value
        for section, values in sections.items():
            top[section] = dataclasses.replace(getattr(self, section), **values)
        return _checked(dataclasses.replace(self, **top))


def _build(cls: type, table: dict[str, Any], where: str) -> Any:
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(table) - set(known))
    if unknown:
        raise PresetError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(known)}")
    values = {}
    for key, value in table.items():
        if isinstance(value, list):
            value = tuple(value)
        values[key] = value
    try:
        return cls(**values)
    except TypeError as error:
        raise PresetError(f"{where}: {error}") from None


def _study_problems(preset: StudyPreset) -> list[str]:
    """What is wrong with the preset's name, lengths, ``[extend]`` and ``[fitness]``."""
    problems = []
    if not (isinstance(preset.name, str) and STUDY_NAME.fullmatch(preset.name)):
        # the name is the default output directory runs/<name>: it must not lead anywhere else
        problems.append(f"name must be letters, digits, '_', '-' and '.' (not first), got {preset.name!r}")
    if not isinstance(preset.target_length, int) or preset.target_length <= 0:
        problems.append(f"target_length must be a positive integer, got {preset.target_length!r}")
    original = preset.model.original_length
    extend = preset.extend
    if extend.mode not in EXTEND_MODES:
        problems.append(f"extend.mode must be one of {', '.join(EXTEND_MODES)}, got {extend.mode!r}")
    if extend.from_study is None and (extend.mode != "longer" or extend.from_dir is not None):
        problems.append("extend.mode and extend.from_dir need extend.from_study")
    short = extend.mode == "short"
    if short and preset.search.attention_scaling is not None:
        problems.append("a short stage keeps the long factors' attention scaling (a longrope config has one "
                        "attention factor for both sets): remove search.attention_scaling")
    if (original is not None and isinstance(preset.target_length, int) and not short
            and preset.target_length <= original):
        problems.append(f"target_length {preset.target_length} must be longer than original_length {original}")
    if preset.fitness.kind not in FITNESS_KINDS:
        problems.append(f"fitness.kind must be one of {', '.join(FITNESS_KINDS)}, got {preset.fitness.kind!r}")
    return problems


def _search_problems(search: SearchSpec) -> list[str]:
    """What is wrong with ``[search]``."""
    problems = []
    for name in ("n_trials", "population", "parents", "mutants", "crossovers"):
        value = getattr(search, name)
        if not isinstance(value, int) or value < 1:
            problems.append(f"search.{name} must be a positive integer, got {value!r}")
    if isinstance(search.parents, int) and isinstance(search.population, int) and search.parents > search.population:
        problems.append("search.parents cannot exceed search.population")
    # Everything the search space (hpo.search_space) would refuse that the preset alone decides is refused
    # here, when the preset loads, rather than after the model and the text have.
    tokens = search.start_tokens
    if not tokens or any(not isinstance(n, int) or n < 0 for n in tokens) or len(set(tokens)) < len(tokens):
        problems.append(f"search.start_tokens must be a list of distinct integers >= 0, got {tokens!r}")
    if search.attention_scaling is not None and (
        len(search.attention_scaling) != 2 or not 0 < search.attention_scaling[0] < search.attention_scaling[1]
    ):
        problems.append(f"search.attention_scaling must be [low, high] with 0 < low < high (to fix it, leave it "
                        f"out: LongRoPE's default), got {search.attention_scaling!r}")
    if search.max_factor is not None and not (isinstance(search.max_factor, int | float) and search.max_factor > 1):
        problems.append(f"search.max_factor must be a number > 1 (factors only interpolate), "
                        f"got {search.max_factor!r}")
    swept = search.critical_dim if isinstance(search.critical_dim, tuple) else None
    if swept is not None:
        if not swept or not all(isinstance(c, int) and not isinstance(c, bool) and c >= 1 for c in swept):
            problems.append(f"search.critical_dim as a list sweeps LongRoPE2 critical dims: integers >= 1, "
                            f"got {swept!r}")
    elif not (search.critical_dim == "auto" or (isinstance(search.critical_dim, int) and search.critical_dim >= 0)):
        problems.append(f"search.critical_dim must be 'auto', an integer >= 0 or a list of integers, "
                        f"got {search.critical_dim!r}")
    if search.length_scale is not None and (search.critical_dim == 0 or search.max_factor is not None):
        problems.append("search.length_scale bounds LongRoPE2's searched factors: it needs search.critical_dim and "
                        "replaces search.max_factor there")
    length_scale = search.length_scale
    if length_scale is not None and not (isinstance(length_scale, int | float) and length_scale > 1):
        problems.append(f"search.length_scale must be a number > 1, got {search.length_scale!r}")
    if search.sampler not in SAMPLERS:
        problems.append(f"search.sampler must be one of {', '.join(SAMPLERS)}, got {search.sampler!r}")
    elif search.sampler != "longrope" and search.critical_dim != 0:  # hybrid: its curves span every pair too
        # LongRoPE2's space is per pair (the curves span every pair): an error, not a silently ignored setting
        problems.append(f"search.critical_dim (LongRoPE2) needs sampler = 'longrope'; {search.sampler!r} "
                        f"searches monotone curves over every pair")
    knots = search.curve_knots
    if not isinstance(knots, int) or isinstance(knots, bool) or knots < 2:
        problems.append(f"search.curve_knots must be an integer >= 2, got {knots!r}")
    if search.start_token_search not in START_TOKEN_SEARCHES:
        problems.append(f"search.start_token_search must be one of {', '.join(START_TOKEN_SEARCHES)}, "
                        f"got {search.start_token_search!r}")
    elif search.start_token_search == "sweep" and len(search.start_tokens) < 2:
        problems.append("search.start_token_search = 'sweep' needs several search.start_tokens to try")
    if not search.mutants_of or not set(search.mutants_of) <= set(SEED_METHODS):
        problems.append(f"search.mutants_of must name seeds among {', '.join(SEED_METHODS)}, got {search.mutants_of!r}")
    if not all(isinstance(b, int | float) and b > 0 for b in (search.yarn_beta_fast, search.yarn_beta_slow)):
        problems.append("search.yarn_beta_fast and search.yarn_beta_slow must be positive numbers")
    if not isinstance(search.pruning, bool):
        problems.append(f"search.pruning must be true or false, got {search.pruning!r}")
    if not isinstance(search.pruning_margin, int | float) or search.pruning_margin < 0:
        problems.append(f"search.pruning_margin must be a number >= 0, got {search.pruning_margin!r}")
    rank = search.pruning_rank
    if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool) or rank < 1
                             or (isinstance(search.parents, int) and rank > search.parents)):
        problems.append(f"search.pruning_rank must be an integer from 1 to search.parents, got {rank!r}")
    prefixes = search.pruning_prefixes
    if (not all(isinstance(f, int | float) and 0 < f < 1 for f in prefixes)
            or any(a >= b for a, b in itertools.pairwise(prefixes))):
        problems.append(f"search.pruning_prefixes must be increasing fractions in (0, 1), got {prefixes!r}")
    delta = search.early_stop_delta
    if not isinstance(delta, int | float) or isinstance(delta, bool) or not delta >= 0:  # `not >=` rejects NaN
        problems.append(f"search.early_stop_delta must be a number >= 0, got {delta!r}")
    patience = search.early_stop_generations
    if patience is not None and (not isinstance(patience, int) or isinstance(patience, bool) or patience < 1):
        problems.append(f"search.early_stop_generations must be a positive integer (or absent: off), "
                        f"got {patience!r}")
    budget = search.max_full_evaluations
    if budget is not None and (not isinstance(budget, int) or isinstance(budget, bool) or budget < 1):
        problems.append(f"search.max_full_evaluations must be a positive integer (or absent: off), got {budget!r}")
    return problems


def _data_problems(data: DataSpec) -> list[str]:
    """What is wrong with ``[data]``."""
    problems = []
    for name in ("samples", "heldout_samples", "heldout_text_samples"):
        value = getattr(data, name)
        if not isinstance(value, int) or value < 0 or (name == "samples" and value == 0):
            problems.append(f"data.{name} must be a positive integer, got {value!r}")
    min_tokens = data.min_tokens
    if min_tokens is not None and (not isinstance(min_tokens, int) or isinstance(min_tokens, bool) or min_tokens < 1):
        problems.append(f"data.min_tokens must be a positive integer, got {min_tokens!r}")
    if min_tokens is not None and data.window_mode == "stream":
        problems.append("data.min_tokens selects long documents; window_mode 'stream' joins them: remove one")
    return problems


def _finetune_problems(tune: FinetuneSpec) -> list[str]:
    """What is wrong with ``[finetune]``."""
    problems = []
    for name in ("steps", "batch_size", "gradient_accumulation", "lora_rank", "save_every", "eval_every"):
        value = getattr(tune, name)
        if not isinstance(value, int) or value < 1:
            problems.append(f"finetune.{name} must be a positive integer, got {value!r}")
    if not isinstance(tune.learning_rate, int | float) or tune.learning_rate <= 0:
        problems.append(f"finetune.learning_rate must be a positive number, got {tune.learning_rate!r}")
    if not isinstance(tune.mixed_short_fraction, int | float) or not 0 <= tune.mixed_short_fraction < 1:
        problems.append(f"finetune.mixed_short_fraction must be in [0, 1), got {tune.mixed_short_fraction!r}")
    return problems


def _checked(preset: StudyPreset) -> StudyPreset:
    """Reject settings that would fail later, every problem at once, with the preset's name in the message."""
    problems = [*_study_problems(preset), *_search_problems(preset.search), *_data_problems(preset.data),
                *_finetune_problems(preset.finetune)]
    if problems:
        raise PresetError(f"study {preset.name!r}: " + "; ".join(problems))
    return preset


def list_presets() -> list[str]:
    """Names of the presets shipped in this folder."""
    return sorted(path.stem for path in PRESET_DIR.glob("*.toml"))


def load_preset(name_or_path: str) -> StudyPreset:
    """Read a shipped preset by name, or any preset file by path."""
    path = Path(name_or_path)
    if path.suffix != ".toml":
        path = PRESET_DIR / f"{name_or_path}.toml"
    if not path.is_file():
        raise PresetError(f"unknown study {name_or_path!r}; presets: {', '.join(list_presets())} "
                          f"(or pass a path to a .toml file)")
    try:
        table = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as error:
        raise PresetError(f"{path}: not valid TOML: {error}") from None
    except UnicodeDecodeError as error:
        raise PresetError(f"cannot read {path}: not UTF-8 text (byte 0x{error.object[error.start]:02x} at offset "
                          f"{error.start})") from None
    sections = {"model": ModelSpec, "data": DataSpec, "fitness": FitnessSpec, "search": SearchSpec,
                "finetune": FinetuneSpec, "extend": ExtendSpec}
    values: dict[str, Any] = {"name": table.pop("name", path.stem)}
    for section, cls in sections.items():
        sub = table.pop(section, {})
        if not isinstance(sub, dict):
            raise PresetError(f"{path}: [{section}] must be a table")
        values[section] = _build(cls, sub, f"{path} [{section}]")
    if "target_length" not in table:
        raise PresetError(f"{path}: target_length is missing")
    preset = _build(StudyPreset, {**table, **values}, str(path))
    return _checked(preset)
