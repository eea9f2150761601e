"""Results panel: the teacher, every run and every export with every metric and its interval
(``workbench.evaluation.table``), filterable and sortable, as CSV; a run's loss history as
CSV; and an Evaluate button that scores a run's student against the teacher with progress
(``python -m workbench evaluate`` underneath, the result kept in the run folder).

In Space mode nothing a visitor types is opened as a path or fetched: the CLIP score and a
reference folder (which name a model or a folder) are local-only; PSNR, SSIM and FID/KID
against the teacher's images remain; the table lists the visitor's own runs only, and every
action on a run checks it is theirs (``workbench.ui.visitors``).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd

from workbench.commands import evaluate as evaluate_cmd
from workbench.errors import WorkbenchError
from workbench.evaluation import format_result, table
from workbench.runs import RunDir, list_runs
from workbench.ui.shared import ProgressAdapter, Shared, inline_errors
from workbench.ui.visitors import page_runs, visible_runs

KINDS = ("teacher", "run", "export")
LOCAL_METRICS = ("psnr", "ssim", "fid", "kid", "clip", "pickscore", "lpips")
SPACE_METRICS = ("psnr", "ssim", "fid", "kid")


def load_table(root: Path, kinds: list[str], query: str) -> pd.DataFrame:
    """The results table, kept to ``kinds`` and rows whose name, base or state holds ``query``
    (a box not yet drawn, in a tab not yet opened, sends None: every kind, no filter)."""
    kinds, query = list(KINDS) if kinds is None else kinds, query or ""
    frame = table.results(root) if root.is_dir() else _empty()
    frame = frame[frame["kind"].isin(kinds)]
    if query.strip():
        cells = (
            frame[["name", "base", "state"]]
            .astype(object)
            .where(frame[["name", "base", "state"]].notna(), "")
        )
        text = cells.astype(str).agg(" ".join, axis=1).str.lower()
        frame = frame[text.str.contains(query.strip().lower(), regex=False)]
    return frame.reset_index(drop=True)


def _empty() -> pd.DataFrame:
    return pd.DataFrame(columns=[*table.HEAD, "path"])


def shown(frame: pd.DataFrame) -> pd.DataFrame:
    """The table as the panel shows it: numbers rounded, no local paths."""
    return frame.drop(columns=["path"]).round(4)


def csv_file(frame: pd.DataFrame, name: str) -> str:
    """``frame`` as a CSV file in a fresh temporary folder (Gradio serves it for download)."""
    return str(table.to_csv(frame, Path(tempfile.mkdtemp(prefix="wb-results-")) / name))


def run_choices(root: Path, with_student: bool = False) -> list[tuple[str, str]]:
    runs = list_runs(root)
    if with_student:
        runs = [r for r in runs if (RunDir(Path(r["run_dir"])).student / "config.json").is_file()]
    return [(f"{r['name']} ({r['state']})", r["run_dir"]) for r in runs]


def halves(progress: Any) -> Any:
    """One bar for both phases: the teacher's images fill its first half, the student's the rest
    (the evaluator reports each phase from 0 to 1)."""
    return lambda fraction, message: progress(
        fraction / 2 + (0 if message.startswith("teacher") else 0.5), message
    )


def evaluate_run(run_dir: str, base: str, metrics: list[str], prompts: int, seeds: int, clip_model: str,
                 space: bool, progress: Any = None) -> str:  # fmt: skip
    """Score a run's student against ``base``; the summary as Markdown (kept in the run folder)."""
    if not run_dir:
        raise WorkbenchError("choose a run with a trained student")
    allowed = SPACE_METRICS if space else LOCAL_METRICS
    chosen = [m for m in metrics if m in allowed] or ["psnr", "ssim"]
    args = evaluate_cmd.arguments(
        base=base, unet=str(RunDir(Path(run_dir)).student), metrics=",".join(chosen), prompts=int(prompts) or None,
        seeds=int(seeds) or None, clip_model=(clip_model.strip() or None) if not space else None, quiet=True,
    )  # fmt: skip
    result, written = evaluate_cmd.evaluate_and_keep(
        args, halves(ProgressAdapter(progress)) if progress else None
    )
    lines = "\n".join(format_result(result))
    return (
        f"```text\n{lines}\n```\nKept in the run folder: `{Path(written[0]).parent.name}/`"
        if written
        else lines
    )


def build(ctx: Shared) -> None:
    settings, space = ctx.settings, ctx.settings.space
    root = table.default_root()

    def folder(visitor: str | None) -> Path:
        """The runs this page lists: all of them for the owner, the visitor's own on a Space."""
        return visible_runs(settings, visitor).folder if space else root

    def own(run_dir: str | None, visitor: str | None) -> str:
        if not run_dir:
            raise WorkbenchError("choose a run first")
        return page_runs(settings, visitor).own(run_dir)

    gr.Markdown(
        "### Results\nThe teacher, every run and every export with every metric and its 95% interval "
        "(KID: +- 1 std over subsets); how each was computed is in each run's `evaluation/evaluation.json`. "
        "Click a column header to sort."
    )
    with gr.Row():
        kinds = gr.CheckboxGroup(list(KINDS), value=list(KINDS), label="Show", scale=1)
        query = gr.Textbox(
            label="Filter (name, base or state contains)", scale=2, elem_id="wb-results-filter"
        )
        refresh = gr.Button("Refresh", scale=0)
    grid = gr.Dataframe(shown(_empty()), interactive=False, show_search="filter", elem_id="wb-results-table",
                        wrap=False, pinned_columns=2, max_height=480)  # fmt: skip
    with gr.Row():
        csv_button = gr.DownloadButton("Download table (CSV)", elem_id="wb-results-csv")
        history_run = gr.Dropdown([] if space else run_choices(root), label="Run", scale=1, elem_id="wb-results-history-run")
        history_button = gr.DownloadButton("Download its metrics history (CSV)")
    with gr.Accordion("Evaluate a run's student", open=False):
        with gr.Row():
            eval_run = gr.Dropdown(
                [] if space else run_choices(root, with_student=True), label="Run", elem_id="wb-results-eval-run"
            )
            metrics = gr.CheckboxGroup(list(SPACE_METRICS if space else LOCAL_METRICS), value=["psnr", "ssim"],
                                       label="Metrics", elem_id="wb-results-metrics")  # fmt: skip
        with gr.Row():
            prompts = gr.Number(0, label="Prompts (0: the base's default set)", precision=0, minimum=0)
            seeds = gr.Number(0, label="Seeds per prompt (0: default)", precision=0, minimum=0)
            clip_model = gr.Textbox(label="CLIP model for clip (folder or hub id)", visible=not space)
        go = gr.Button("Evaluate", variant="primary", elem_id="wb-results-evaluate")
        status = gr.Markdown(elem_id="wb-results-status")

    def on_refresh(kinds_, query_, visitor):
        mine = folder(visitor)
        frame = load_table(mine, kinds_, query_)
        return shown(frame), gr.update(choices=run_choices(mine)), gr.update(choices=run_choices(mine, True))

    @inline_errors(n_outputs=1, status_at=0)
    def on_evaluate(view, run_dir, metrics_, prompts_, seeds_, clip_, visitor, progress=gr.Progress()):
        return evaluate_run(
            own(run_dir, visitor), view["base"], metrics_, prompts_ or 0, seeds_ or 0, clip_ or "", space, progress
        )

    def on_csv(kinds_, query_, visitor):
        return csv_file(load_table(folder(visitor), kinds_, query_), "results.csv")

    def on_history(run_dir, visitor):
        try:
            run_dir = own(run_dir, visitor)
            return csv_file(table.history(run_dir), f"{Path(run_dir).name}-metrics.csv")
        except WorkbenchError as err:
            raise gr.Error(str(err)) from None

    private = {"api_visibility": "private"}
    outputs = [grid, history_run, eval_run]
    listing = [kinds, query, ctx.visitor]
    for trigger in (refresh.click, kinds.change, query.submit, ctx.visitor_ready.then):
        trigger(on_refresh, listing, outputs, **private)
    csv_button.click(on_csv, listing, csv_button, **private)
    history_button.click(on_history, [history_run, ctx.visitor], history_button, **private)
    go.click(
        on_evaluate, [ctx.view, eval_run, metrics, prompts, seeds, clip_model, ctx.visitor], status, **private,
        **ctx.model_event(),
    ).then(on_refresh, listing, outputs, **private)  # fmt: skip
