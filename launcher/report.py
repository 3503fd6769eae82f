"""`launcher report RUN_DIR [RUN_DIR...]`: report.png (training loss, eval metrics, learning rate, throughput and
memory over the steps, the runs overlaid) and report.html (self-contained: the plot inlined, each run's final
summary, the settings the runs differ in, and each run's resolved configuration), from what runs leave behind:
metrics.jsonl, summary.json and the plan's config.json. Pure but for reading those files; matplotlib draws.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
from dataclasses import dataclass

from launcher.errors import ConfigError
from launcher.tracking import flat

PANELS = (
    ("training loss", "train", ("loss",)),
    ("eval metrics", "eval", None),
    ("learning rate", "train", ("lr",)),
    ("throughput (samples/s)", "train", ("samples_per_s",)),
    ("memory (rank 0 RSS, MiB)", "train", ("rss_mib", "gpu_mib")),
)
SIZE_INCHES, DPI = (15.0, 9.0), 100
"""report.png: 1500 x 900 pixels."""


@dataclass
class Run:
    name: str
    path: str
    records: list[dict]
    summary: dict
    config: dict

    def series(self, split: str, key: str) -> tuple[list[int], list[float]]:
        rows = [r for r in self.records if r.get("split") == split and isinstance(r.get(key), (int, float))]
        return [r["step"] for r in rows], [float(r[key]) for r in rows]

    def eval_keys(self) -> list[str]:
        keys = {k for r in self.records if r.get("split") == "eval" for k in r}
        return sorted(keys - {"step", "split", "time", "epoch"})


def read_run(path: str) -> Run:
    metrics = os.path.join(path, "metrics.jsonl")
    if not os.path.isfile(metrics):
        raise ConfigError(f"{path}: no metrics.jsonl, so not a run directory; give the output_dir of a run")
    with open(metrics) as f:
        records = [json.loads(line) for line in f if line.strip()]
    summary, config = {}, {}
    if os.path.isfile(os.path.join(path, "summary.json")):
        with open(os.path.join(path, "summary.json")) as f:
            summary = json.load(f)
    if os.path.isfile(os.path.join(path, "config.json")):
        with open(os.path.join(path, "config.json")) as f:
            config = flat(json.load(f).get("config", {}))
    return Run(os.path.basename(os.path.normpath(path)), path, records, summary, config)


def _named(runs: list[Run]) -> list[Run]:
    """Each run named by as many of its path's last folders as tell it from the others (run, a/run and b/run)."""
    for depth in range(1, 8):
        names = [os.path.join(*os.path.normpath(os.path.abspath(r.path)).split(os.sep)[-depth:]) for r in runs]
        if len(set(names)) == len(names):
            break
    for r, name in zip(runs, names):
        r.name = name
    return runs


def differing(runs: list[Run]) -> dict[str, list[object]]:
    """The settings whose values are not the same in every run (output_dir aside), each run's value."""
    keys = sorted({k for r in runs for k in r.config} - {"output_dir", "overwrite"})
    return {k: [r.config.get(k) for r in runs] for k in keys if len({json.dumps(r.config.get(k)) for r in runs}) > 1}


def plot(runs: list[Run]):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=SIZE_INCHES, dpi=DPI)
    for ax, (title, split, keys) in zip(axes.flat, PANELS):
        for run in runs:
            for key in keys or run.eval_keys():
                steps, values = run.series(split, key)
                if steps:
                    label = run.name if keys and len(keys) == 1 else f"{run.name} {key}"
                    ax.plot(steps, values, marker="o" if len(steps) < 20 else None, label=label)
        ax.set_title(title)
        ax.set_xlabel("step")
        if ax.lines:
            ax.legend(fontsize=8)
    table = axes.flat[-1]
    table.axis("off")
    rows = [[k, *(_short(v) for v in values)] for k, values in list(differing(runs).items())[:14]]
    if rows:
        widths = [0.5] + [0.5 / len(runs)] * len(runs)
        labels = ["setting", *(_short(r.name, 18) for r in runs)]
        t = table.table(cellText=rows, colLabels=labels, colWidths=widths, loc="upper center")
        t.auto_set_font_size(False)
        t.set_fontsize(8)
    table.set_title("settings that differ" if rows else "the runs' settings are the same")
    fig.tight_layout()
    return fig


def _short(value: object, width: int = 28) -> str:
    text = str(value)
    return text if len(text) <= width else "..." + text[-(width - 3) :]


def write_report(paths: list[str], out_dir: str) -> tuple[str, str]:
    """Write report.png and report.html for these runs into out_dir; returns their paths."""
    from launcher.errors import ConfigError
    from launcher.files import output_dir_problems, write_atomic

    problems = [p.replace("output_dir=", "--out ", 1) for p in output_dir_problems(out_dir)]
    if problems:
        raise ConfigError([p.replace("for the run, e.g. output_dir=runs/x", "for the report") for p in problems])
    runs = _named([read_run(p) for p in paths])
    os.makedirs(out_dir, exist_ok=True)
    buffer = io.BytesIO()
    fig = plot(runs)
    fig.savefig(buffer, format="png", dpi=DPI)
    png = buffer.getvalue()
    png_path, html_path = os.path.join(out_dir, "report.png"), os.path.join(out_dir, "report.html")
    tmp = png_path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(png)
    os.replace(tmp, png_path)
    write_atomic(html_path, _html(runs, base64.b64encode(png).decode()))
    return png_path, html_path


def _html(runs: list[Run], png_b64: str) -> str:
    e = html.escape

    def table(header: list[str], rows: list[list[object]]) -> str:
        head = "".join(f"<th>{e(str(h))}</th>" for h in header)
        body = "".join("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in row) + "</tr>" for row in rows)
        return f"<table><tr>{head}</tr>{body}</table>"

    names = [r.name for r in runs]
    summary_keys = [
        "steps",
        "seconds",
        "train_samples_per_s",
        "steady_samples_per_s",
        "metrics",
        "peak_rss_mib_per_rank",
    ]
    summary_rows = [[k, *(json.dumps(r.summary.get(k)) for r in runs)] for k in summary_keys]
    diff = differing(runs)
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>launcher report</title>",
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin:1em 0}"
        "td,th{border:1px solid #ccc;padding:2px 8px;font-size:13px;text-align:left}img{max-width:100%}</style>",
        "</head><body>",
        f"<h1>launcher report: {e(', '.join(names))}</h1>",
        f"<p>Runs: {e('; '.join(r.path for r in runs))}</p>",
        f"<img id='plot' alt='loss, eval metrics, learning rate, throughput and memory over steps' "
        f"src='data:image/png;base64,{png_b64}'>",
        "<h2>Final summary</h2>",
        table(["", *names], summary_rows),
        "<h2>Settings that differ</h2>",
        table(["setting", *names], [[k, *v] for k, v in diff.items()]) if diff else "<p>None.</p>",
    ]
    for r in runs:
        parts += [f"<h2>Configuration of {e(r.name)}</h2>", table(["setting", "value"], sorted(r.config.items()))]
    parts.append("</body></html>\n")
    return "\n".join(parts)
