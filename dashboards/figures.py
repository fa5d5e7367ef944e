"""Plotly figures of LongRoPE studies and evaluation results, as pure functions.

Each function takes studies (``optuna.Study``, one or several to compare) or an
evaluation table (the DataFrame of :func:`hpo.evaluate.read_results`) and
returns a ``plotly.graph_objects.Figure``; nothing is written or shown. The HTML
report (:mod:`dashboards.report`) and the Optuna Dashboard publisher
(:mod:`dashboards.serve`) both take their figures from :func:`report_figures`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import optuna
import pandas as pd
import plotly.graph_objects as go
from optuna.trial import FrozenTrial, TrialState
from plotly.colors import qualitative
from plotly.subplots import make_subplots

from hpo.records import RULER_PREFIX, recorded_search_space, seed_records, trial_generation
from hpo.search_space import START_TOKENS_PARAM

COLORS = qualitative.Plotly
BASELINE_DASH = {"pi": "dot", "ntk": "dash", "yarn": "dashdot", "longrope2-init": "longdash"}
TEMPLATE = "plotly_white"


def _complete(study: optuna.Study) -> list[FrozenTrial]:
    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))


def _unfinished_y(trial: FrozenTrial, ceiling: float) -> float:
    """Where a pruned or failed trial is drawn: its last reported value, else at the top of the plot."""
    if trial.intermediate_values:
        return trial.intermediate_values[max(trial.intermediate_values)]
    return ceiling


def factor_curves(studies: Sequence[optuna.Study], top: int = 5) -> go.Figure:
    """Rescale factor per RoPE dimension: each study's best trial (bold), its ``top`` best, and the baselines.

    Baselines (PI, NTK, YaRN, ...) are the seeds each study started from, drawn
    once per (method, target length). The factor axis is logarithmic.
    """
    figure = go.Figure()
    drawn_baselines = set()
    for index, study in enumerate(studies):
        space = recorded_search_space(study)
        color = COLORS[index % len(COLORS)]
        dims = list(range(space.num_factors))
        ranked = sorted(_complete(study), key=lambda t: t.value)[:top]
        for rank, trial in enumerate(ranked):
            best = rank == 0
            figure.add_scatter(
                x=dims, y=list(space.to_factors(trial.params).rescale_factors),
                mode="lines+markers" if best else "lines",
                name=f"{study.study_name}: best, trial {trial.number} ({trial.value:.3f})" if best
                else f"{study.study_name}: top {len(ranked)}",
                legendgroup=f"{study.study_name}:{'best' if best else 'top'}", showlegend=rank <= 1,
                line={"color": color, "width": 3 if best else 1}, opacity=1.0 if best else 0.45,
                hovertemplate=f"trial {trial.number}<br>dim %{{x}}: λ=%{{y:.3f}}<extra>{study.study_name}</extra>",
            )
        for record in seed_records(study):
            if (record["method"], space.target_length) in drawn_baselines:
                continue
            drawn_baselines.add((record["method"], space.target_length))
            name = record["method"] if len(studies) == 1 else f"{record['method']} → {space.target_length:,}"
            figure.add_scatter(
                x=dims, y=list(space.to_factors(record["params"]).rescale_factors), mode="lines", name=name,
                line={"color": "#555", "width": 1.5, "dash": BASELINE_DASH.get(record["method"], "dot")},
                hovertemplate=f"dim %{{x}}: λ=%{{y:.3f}}<extra>{name}</extra>",
            )
    figure.update_layout(
        title="Rescale factor per RoPE dimension", template=TEMPLATE, height=480,
        xaxis_title="RoPE dimension i (rotary pair; high i = low frequency)",
        yaxis={"title": "rescale factor λ_i", "type": "log"},
    )
    return figure


def convergence(studies: Sequence[optuna.Study]) -> go.Figure:
    """Search progress by trial and by generation: values, best so far, and the pruned and failed trials.

    Pruned and failed trials are drawn at their last reported value, or at the top
    of the plot when they have none, so they stay visible.
    """
    figure = make_subplots(rows=1, cols=2, subplot_titles=("by trial", "by generation"), horizontal_spacing=0.08)
    for index, study in enumerate(studies):
        color = COLORS[index % len(COLORS)]
        name = study.study_name
        trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
        complete = [t for t in trials if t.state == TrialState.COMPLETE]
        ceiling = max((t.value for t in complete), default=1.0)
        figure.add_scatter(
            x=[t.number for t in complete], y=[t.value for t in complete], mode="markers", name=f"{name}: trial",
            marker={"color": color, "size": 7, "opacity": 0.6}, legendgroup=name,
            customdata=[trial_generation(t) for t in complete],
            hovertemplate="trial %{x}, generation %{customdata}<br>perplexity %{y:.4f}<extra></extra>", row=1, col=1,
        )
        running = [min(t.value for t in complete[: i + 1]) for i in range(len(complete))]
        figure.add_scatter(
            x=[t.number for t in complete], y=running, mode="lines", line={"color": color, "shape": "hv", "width": 2},
            name=f"{name}: best so far", legendgroup=name, row=1, col=1,
        )
        generations = sorted({g for t in trials if (g := trial_generation(t)) is not None})
        best_of = [min((t.value for t in complete if trial_generation(t) == g), default=None) for g in generations]
        counts = [{state: sum(trial_generation(t) == g and t.state == state for t in trials)
                   for state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)} for g in generations]
        figure.add_scatter(
            x=generations, y=best_of, mode="lines+markers", line={"color": color}, name=f"{name}: best of generation",
            legendgroup=name,
            text=[f"{c[TrialState.COMPLETE]} complete, {c[TrialState.PRUNED]} pruned, {c[TrialState.FAIL]} failed"
                  for c in counts],
            hovertemplate="generation %{x}: best %{y:.4f}<br>%{text}<extra></extra>", row=1, col=2,
        )
        known = [(g, v) for g, v in zip(generations, best_of, strict=True) if v is not None]
        figure.add_scatter(
            x=[g for g, _ in known], y=[min(v for _, v in known[: i + 1]) for i in range(len(known))], mode="lines",
            line={"color": color, "dash": "dot", "shape": "hv"}, name=f"{name}: best so far (generations)",
            legendgroup=name, row=1, col=2,
        )
        for state, symbol in ((TrialState.PRUNED, "triangle-down-open"), (TrialState.FAIL, "x")):
            unfinished = [t for t in trials if t.state == state]
            if not unfinished:
                continue
            marker = {"color": "#d62728" if state == TrialState.FAIL else "#ff7f0e", "symbol": symbol, "size": 10}
            text = [t.user_attrs.get("error", state.name.lower()) for t in unfinished]
            for col, x in ((1, [t.number for t in unfinished]), (2, [trial_generation(t) for t in unfinished])):
                figure.add_scatter(
                    x=x, y=[_unfinished_y(t, ceiling) for t in unfinished], mode="markers", marker=marker, text=text,
                    name=f"{name}: {state.name.lower()} ({len(unfinished)})", legendgroup=f"{name}:{state.name}",
                    showlegend=col == 1, hovertemplate="%{text}<extra>" + state.name.lower() + "</extra>",
                    row=1, col=col,
                )
    figure.update_layout(title="Search convergence", template=TEMPLATE, height=480)
    figure.update_xaxes(title_text="trial", row=1, col=1)
    figure.update_xaxes(title_text="generation", dtick=1, row=1, col=2)
    figure.update_yaxes(title_text="perplexity (searched windows)", row=1, col=1)
    return figure


def start_tokens_effect(studies: Sequence[optuna.Study]) -> go.Figure:
    """Perplexity of the complete trials grouped by start tokens (n_hat), one box per study and value."""
    figure = go.Figure()
    categories: set[int] = set()
    fixed = []
    for index, study in enumerate(studies):
        space = recorded_search_space(study)
        if not space.searches_start_tokens:
            fixed.append(f"{study.study_name}: fixed to {space.start_token_candidates[0]}")
        complete = _complete(study)
        n_hat = [int(t.params.get(START_TOKENS_PARAM, space.start_token_candidates[0])) for t in complete]
        categories.update(n_hat)
        figure.add_box(
            x=[str(n) for n in n_hat], y=[t.value for t in complete], name=study.study_name,
            marker_color=COLORS[index % len(COLORS)], boxpoints="all", jitter=0.4, pointpos=0,
            customdata=[t.number for t in complete],
            hovertemplate="trial %{customdata}<br>n_hat %{x}: perplexity %{y:.4f}<extra></extra>",
        )
    title = "Effect of n_hat: perplexity of the complete trials by start tokens"
    figure.update_layout(
        title=title + (f" (not searched: {'; '.join(fixed)})" if fixed else ""), template=TEMPLATE, height=450,
        boxmode="group", yaxis_title="perplexity (searched windows)",
        xaxis={"title": "start tokens n_hat (positions kept on the original RoPE)", "type": "category",
               "categoryorder": "array", "categoryarray": [str(n) for n in sorted(categories)]},
    )
    return figure


def perplexity_vs_length(results: pd.DataFrame) -> go.Figure:
    """Perplexity against length, one line per method (and task: ``ppl`` solid, ``needle-ppl`` dashed).

    Rows measuring the same (task, method, length) are pooled, weighted by tokens; rows of one range of
    positions (a ``depth``) are left out, their window's row holds them. Raises ``ValueError`` when ``results``
    has no perplexity rows.
    """
    rows = results[results["perplexity"].notna() & results["depth"].isna()].copy()
    if rows.empty:
        raise ValueError("the results hold no perplexity rows")
    rows["nll"] = rows["tokens"] * rows["perplexity"].map(math.log)
    pooled = rows.groupby(["task", "method", "length"], sort=False)[["nll", "tokens"]].sum().reset_index()
    pooled["perplexity"] = (pooled["nll"] / pooled["tokens"]).map(math.exp)
    methods = list(dict.fromkeys(pooled["method"]))
    several_tasks = pooled["task"].nunique() > 1
    figure = go.Figure()
    for (task, method), line in pooled.groupby(["task", "method"], sort=False):
        line = line.sort_values("length")
        name = f"{method} ({task})" if several_tasks else method
        color = COLORS[methods.index(method) % len(COLORS)]
        figure.add_scatter(
            x=line["length"], y=line["perplexity"], mode="lines+markers", name=name,
            line={"color": color, "dash": "dash" if task == "needle-ppl" else None},
            hovertemplate=f"{name}<br>%{{x:,}} tokens: perplexity %{{y:.3f}}<extra></extra>",
        )
    lengths = sorted(pooled["length"].unique())
    figure.update_layout(
        title="Perplexity against length", template=TEMPLATE, height=480,
        xaxis={"title": "length (tokens)", "type": "log", "tickvals": lengths, "ticktext": [f"{n:,}" for n in lengths]},
        yaxis={"title": "perplexity", "type": "log"},
    )
    return figure


def _accuracy_panels(pooled: pd.DataFrame, row: str, row_labels: Callable[[list], list[str]], title: str,
                     row_title: str, per: str) -> go.Figure:
    """One heatmap per method of ``pooled`` (columns method, length, ``row``, accuracy, windows): lengths across,
    ``row`` down, each cell's accuracy in words and ``windows`` (``per``) on hover."""
    methods = list(dict.fromkeys(pooled["method"]))
    lengths = sorted(pooled["length"].unique())
    rows = sorted(pooled[row].unique())
    figure = make_subplots(rows=1, cols=len(methods), subplot_titles=methods, shared_yaxes=True,
                           horizontal_spacing=0.02)
    for col, method in enumerate(methods, start=1):
        cells = pooled[pooled["method"] == method]
        grid = cells.pivot(index=row, columns="length", values="accuracy").reindex(index=rows, columns=lengths)
        counts = cells.pivot(index=row, columns="length", values="windows").reindex(index=rows, columns=lengths)
        figure.add_heatmap(
            x=[f"{n:,}" for n in lengths], y=row_labels(rows), z=grid.to_numpy(),
            coloraxis="coloraxis", customdata=counts.to_numpy(),
            text=[[("" if math.isnan(a) else f"{100 * a:.0f}%") for a in line] for line in grid.to_numpy()],
            texttemplate="%{text}", hovertemplate=f"{method}<br>%{{x}} tokens, %{{y}}: "
                                                  f"accuracy %{{z:.2f}} of %{{customdata}} {per}<extra></extra>",
            row=1, col=col,
        )
        figure.update_xaxes(title_text="length (tokens)", type="category", row=1, col=col)
    figure.update_yaxes(title_text=row_title, type="category", autorange="reversed", row=1, col=1)
    figure.update_layout(
        title=title, template=TEMPLATE, height=420,
        coloraxis={"colorscale": "RdYlGn", "cmin": 0.0, "cmax": 1.0, "colorbar": {"title": {"text": "accuracy"}}},
    )
    return figure


def _pooled_accuracy(rows: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Rows of the same cell pooled, weighted by their number of prompts."""
    rows = rows.assign(correct=rows["accuracy"] * rows["windows"])
    pooled = rows.groupby(keys, sort=False)[["correct", "windows"]].sum().reset_index()
    pooled["accuracy"] = pooled["correct"] / pooled["windows"]
    return pooled


def passkey_heatmap(results: pd.DataFrame) -> go.Figure:
    """Passkey accuracy by length (across) and key depth (down, top of the context first), one panel per method.

    Rows of the same cell are pooled, weighted by their number of prompts.
    Raises ``ValueError`` when ``results`` has no passkey rows.
    """
    rows = results[results["task"] == "passkey"]
    if rows.empty:
        raise ValueError("the results hold no passkey rows")
    pooled = _pooled_accuracy(rows, ["method", "length", "depth"])
    return _accuracy_panels(pooled, "depth", lambda depths: [f"{100 * d:.0f}%" for d in depths],
                            "Passkey retrieval accuracy", "depth of the key", "prompts")


def ruler_heatmap(results: pd.DataFrame) -> go.Figure:
    """RULER scores by length (across) and task (down), one panel per method (tasks ``ruler:NAME``).

    Raises ``ValueError`` when ``results`` has no RULER rows.
    """
    rows = results[results["task"].str.startswith(RULER_PREFIX)]
    if rows.empty:
        raise ValueError("the results hold no RULER rows")
    pooled = _pooled_accuracy(rows, ["method", "length", "task"])
    return _accuracy_panels(pooled, "task", lambda tasks: [t.removeprefix(RULER_PREFIX) for t in tasks],
                            "RULER (lm-eval): share of the expected answers generated", "task", "samples")


def report_figures(studies: Sequence[optuna.Study], results: pd.DataFrame | None = None,
                   top: int = 5) -> dict[str, go.Figure]:
    """Every report figure, keyed by a short id (a valid HTML id), in reading order.

    The results figures are included only when ``results`` has rows for them.
    """
    figures = {"factor-curves": factor_curves(studies, top), "convergence": convergence(studies)}
    if results is not None and results["perplexity"].notna().any():
        figures["perplexity-length"] = perplexity_vs_length(results)
    if results is not None and (results["task"] == "passkey").any():
        figures["passkey-accuracy"] = passkey_heatmap(results)
    if results is not None and results["task"].str.startswith(RULER_PREFIX).any():
        figures["ruler"] = ruler_heatmap(results)
    figures["start-tokens"] = start_tokens_effect(studies)
    return figures
