"""Plot training curves from one or more ``main.py`` logs (``<output_dir>/log.txt``).

Writes one PNG with two panels: the training losses over epochs, log scale (``train_loss`` and
its final-layer components ``train_loss_ce``, ``train_loss_bbox``, ``train_loss_giou``, as far as
logged), and COCO box AP and AP50 in percent over epochs (the first two numbers of
``test_coco_eval_bbox``; epochs without evaluation are skipped). A run that also evaluated an
exponential moving average of its weights logs those numbers as ``test_ema_coco_eval_bbox``: its
EMA AP and AP50 are drawn beside the raw weights' (dash-dotted and dotted). Other keys are
ignored. Each log has its own colour and is named in the legends by its directory, as given.

Usage::

    python tools/plot_logs.py exps/run_a [exps/run_b/log.txt ...] [--out curves.png]

A path may be an output directory (its ``log.txt`` is read) or a log file. ``--out`` defaults
to ``curves.png`` in the first log's directory.
"""
import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import LogFormatter, MaxNLocator  # noqa: E402

LOSS_KEYS = ("train_loss", "train_loss_ce", "train_loss_bbox", "train_loss_giou")
COCO_KEY = "test_coco_eval_bbox"
EMA_COCO_KEY = "test_ema_coco_eval_bbox"
# The AP panel's curves: log key, legend prefix, and (line style, marker) of AP and of AP50.
AP_CURVES = ((COCO_KEY, "", ("-", "o"), ("--", ".")),
             (EMA_COCO_KEY, "EMA ", ("-.", "s"), (":", "x")))
LOG_NAME = "log.txt"
PathLike = str | Path


def log_file(path: PathLike) -> Path:
    """``path`` itself if it is a file, else ``path/log.txt``."""
    path = Path(path)
    return path / LOG_NAME if path.is_dir() else path


def load_log(path: PathLike) -> list[dict[str, Any]]:
    """The epochs of one log, one dict per non-blank line, checked for what the plots need.

    Raises:
        FileNotFoundError: no such log.
        ValueError: the log is empty, a line is not a JSON object, no epoch has ``train_loss``,
            or a ``test_coco_eval_bbox`` or ``test_ema_coco_eval_bbox`` entry is not a list of at
            least two numbers. The message names the file (and the line).
    """
    file = log_file(path)
    if not file.is_file():
        raise FileNotFoundError(f"no log at {file}")
    epochs = []
    with open(file) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{file}, line {number}: not valid JSON ({e.msg}): {line.strip()[:80]!r}") from None
            if not isinstance(entry, dict):
                raise ValueError(f"{file}, line {number}: expected a JSON object per epoch, "
                                 f"got {type(entry).__name__}")
            for key in (COCO_KEY, EMA_COCO_KEY):
                coco = entry.get(key)
                if coco is not None and not (isinstance(coco, list) and len(coco) >= 2
                                             and all(isinstance(v, (int, float)) for v in coco)):
                    raise ValueError(f"{file}, line {number}: '{key}' must be a list of COCO numbers "
                                     f"(AP, AP50, ...), got {coco!r}")
            epochs.append(entry)
    if not epochs:
        raise ValueError(f"{file} is empty: no epochs logged")
    if not any("train_loss" in e for e in epochs):
        raise ValueError(f"{file}: no epoch has 'train_loss'; is this a main.py log? "
                         f"keys found: {sorted(epochs[0])}")
    return epochs


def _epoch(entry: dict[str, Any], index: int) -> int:
    return entry.get("epoch", index)


def make_figure(paths: Sequence[PathLike]) -> Figure:
    """The two panels for the logs at ``paths`` (directories or files)."""
    if not paths:
        raise ValueError("no logs given")
    logs = [(log_file(p), load_log(p)) for p in paths]
    fig, (loss_ax, ap_ax) = plt.subplots(1, 2, figsize=(13, 4.8))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = ("-", "--", ":", "-.")
    any_ap = False
    for k, (file, epochs) in enumerate(logs):
        name = str(file.parent)
        colour = colours[k % len(colours)]
        for key, style in zip(LOSS_KEYS, styles):
            points = [(_epoch(e, i), e[key]) for i, e in enumerate(epochs) if key in e]
            if points:
                x, y = zip(*points)
                loss_ax.plot(x, y, style, color=colour, marker=".", label=f"{name}: {key[len('train_'):]}")
        for key, prefix, (ap_style, ap_marker), (ap50_style, ap50_marker) in AP_CURVES:
            evaluated = [(_epoch(e, i), e[key]) for i, e in enumerate(epochs) if e.get(key) is not None]
            if evaluated:
                any_ap = True
                x = [epoch for epoch, _ in evaluated]
                ap_ax.plot(x, [100 * c[0] for _, c in evaluated], ap_style, color=colour, marker=ap_marker,
                           label=f"{name}: {prefix}AP")
                ap_ax.plot(x, [100 * c[1] for _, c in evaluated], ap50_style, color=colour, marker=ap50_marker,
                           label=f"{name}: {prefix}AP50")

    # log scale: the weighted sum (with the auxiliary losses) is many times its components
    loss_ax.set(title="training losses", xlabel="epoch", ylabel="loss", yscale="log")
    loss_ax.yaxis.set_major_formatter(LogFormatter())
    loss_ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))
    loss_ax.legend(fontsize="small")
    ap_ax.set(title="COCO box AP (val)", xlabel="epoch", ylabel="AP (%)")
    if any_ap:
        ap_ax.legend(fontsize="small")
    else:
        ap_ax.text(0.5, 0.5, f"no '{COCO_KEY}' or '{EMA_COCO_KEY}' in the logs", ha="center", va="center",
                   transform=ap_ax.transAxes)
    ap_ax.set_ylim(bottom=0)
    for ax in (loss_ax, ap_ax):
        ax.grid(alpha=0.3, which="both")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    return fig


def plot_logs(paths: Sequence[PathLike], out: PathLike | None = None) -> Path:
    """Plot the logs at ``paths`` (directories or files) into the PNG ``out`` and return its path.

    ``out`` defaults to ``curves.png`` next to the first log.
    """
    fig = make_figure(paths)
    out = Path(out) if out is not None else log_file(paths[0]).parent / "curves.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png", dpi=100)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser("Plot Deformable DETR training logs")
    parser.add_argument("logs", nargs="+", help="output directories (holding log.txt) or log files")
    parser.add_argument("--out", default=None, help="PNG to write (default: curves.png next to the first log)")
    args = parser.parse_args(argv)
    print(f"wrote {plot_logs(args.logs, args.out)}")


if __name__ == "__main__":
    main()
