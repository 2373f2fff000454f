"""The ``report`` command: a self-contained HTML report of an experiment.

``gradspace report --metrics metrics.csv --card card.json --scores ... --out-dir report/``
writes, atomically (built in a temporary sibling directory, then renamed into place):

    report/index.html              one HTML file, inline CSS, figures embedded as base64 PNG
    report/figures/heatmap.png     AUROC and FPR95 per detector x OOD set (+ average)
    report/figures/roc.png         ROC curves, one panel per OOD set, one curve per detector
    report/figures/hist_<space>_<detector>.png   ID vs OOD score histograms, one panel per OOD set

Tables: the model card; the papers' table (FPR95 / AUROC per OOD set and average, in
percent, best per column in bold); the low-dimensional gradient paper's Table 3 layout
(feature vs gradient rows per method) when a method has several embeddings; all four
metrics per OOD set; a "Run time" table from Snakemake benchmark files; one table per
timing JSON; and extra sections supplied by later stages (``--sections``).

Extra sections (``--sections``, inline JSON or JSON files, several allowed, rendered in
order after the built-in content) are a JSON list of objects::

    [{"title": "Subspace diagnostics",            # required, section heading
      "caption": "Explained variance of ...",     # optional, shown under the heading
      "csv": "results/demo/subspace/pca.csv",     # a CSV file rendered as a table, or
      "markdown": "| a | b |\\n|---|---|\\n| 1 | 2 |",  # Markdown text (subset below), or
      "image": "results/demo/subspace/spectrum.png"}]   # a PNG embedded as base64

At least one of ``csv``, ``markdown``, ``image`` is required; when several are given they
are rendered in the order csv, markdown, image. Relative paths are resolved against the
working directory. The Markdown subset: ``#`` headings, pipe tables, ``-``/``*`` bullet
lists, paragraphs, ``**bold**``, ``*italic*`` and ```code```; everything is HTML-escaped.

Timing JSON files (``--timing``) are rendered generically: an object of scalars becomes a
key/value table, a list of objects or an object of objects becomes a table with one row
per item (union of keys as columns); the file name is the table title.

Snakemake benchmark files (``--benchmarks``) are TSV with the header
``s h:m:s max_rss max_vms max_uss max_pss io_in io_out mean_load cpu_time``
(max_* in MB). The job name is the file path relative to the common directory of all
benchmark files without ``.tsv``; the rule is the first component of that path (the
file stem when the files share one directory). Repeated measurements (several rows)
are averaged (s, cpu_time, mean_load) or maximised (max_rss). Empty files (no
measurement row) are skipped with a warning; a file without an ``s`` column is an error.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from .errors import ConfigError, DataError
from .files import atomic_path, read_benchmark, read_json
from .metrics import (
    CONVENTIONS,
    card_id_accuracy,
    card_summary,
    convention_text,
    display_name,
    full_table,
    group_averages,
    group_table,
    load_json_arg,
    load_scores,
    ood_sets,
    paper_table,
    parse_score_path,
    read_card,
    read_metrics,
    spread_lines,
    table_columns,
)
from .params import merge_params

log = logging.getLogger(__name__)

BENCHMARK_COLUMNS = ("s", "h:m:s", "max_rss", "max_vms", "max_uss", "max_pss", "io_in", "io_out",
                     "mean_load", "cpu_time")
SECTION_CONTENT_KEYS = ("csv", "markdown", "image")

CSS = """
body{font-family:-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;margin:2em auto;max-width:1200px;
padding:0 1em;color:#222;line-height:1.45}
h1{font-size:1.6em;border-bottom:2px solid #444;padding-bottom:.2em}
h2{font-size:1.25em;margin-top:2em;border-bottom:1px solid #ccc;padding-bottom:.15em}
h3{font-size:1.05em;margin-top:1.4em}
table{border-collapse:collapse;margin:.6em 0 1.2em;font-size:.88em}
th,td{border:1px solid #ccc;padding:.25em .6em;text-align:right;white-space:nowrap}
th{background:#f0f0f0}
td.l,th.l{text-align:left}
tr:nth-child(even) td{background:#fafafa}
.caption{color:#555;font-size:.9em;margin:.2em 0 .6em}
figure{margin:1em 0}
figure img{max-width:100%;border:1px solid #eee}
figcaption{color:#555;font-size:.9em}
code{background:#f4f4f4;padding:0 .2em}
.scroll{overflow-x:auto}
nav ul{columns:2;font-size:.9em}
"""


# --------------------------------------------------------------------------- helpers
def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "x"


def _esc(text) -> str:
    return html.escape(str(text), quote=True)


def _is_number_text(text: str) -> bool:
    return bool(re.fullmatch(r"[-+]?[\d.,]+(e[-+]?\d+)?%?( / [-+]?[\d.]+)?", str(text).strip()))


def html_table(header: Sequence[str], rows: Sequence[Sequence], bold=None,
               left_cols: int | None = None) -> str:
    """An HTML table; text columns are left-aligned. ``bold[i][j] = (a, b)`` bolds the
    halves of an "a / b" cell (or the whole cell)."""
    def cls(j, text):
        left = (j < left_cols) if left_cols is not None else not _is_number_text(text)
        return ' class="l"' if left else ""

    def cell(text, mark):
        text = str(text)
        if not mark or not any(mark):
            return _esc(text)
        parts = text.split(" / ")
        if len(parts) == 2:
            return " / ".join(f"<b>{_esc(p)}</b>" if m else _esc(p)
                              for p, m in zip(parts, mark, strict=True))
        return f"<b>{_esc(text)}</b>"

    out = ['<div class="scroll"><table>', "<thead><tr>"]
    for j, h in enumerate(header):
        left = ' class="l"' if left_cols is not None and j < left_cols else ""
        out.append(f"<th{left}>{_esc(h)}</th>")
    out.append("</tr></thead><tbody>")
    for i, row in enumerate(rows):
        marks = bold[i] if bold else [None] * len(row)
        out.append("<tr>" + "".join(f"<td{cls(j, c)}>{cell(c, m)}</td>"
                                    for j, (c, m) in enumerate(zip(row, marks, strict=True))) + "</tr>")
    out.append("</tbody></table></div>")
    return "".join(out)


def _fmt_value(value) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.6g}"
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value)


# --------------------------------------------------------------------------- markdown subset
def _md_inline(text: str) -> str:
    text = _esc(text)
    text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
    text = re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", text)
    text = re.sub(r"(?<![*\w])\*([^*]+)\*(?![*\w])", r"<i>\1</i>", text)
    return text


def _split_row(line: str) -> list[str]:
    line = line.strip()
    if line.startswith("|"):
        line = line[1:]
    if line.endswith("|") and not line.endswith("\\|"):
        line = line[:-1]
    cells = re.split(r"(?<!\\)\|", line)
    return [c.strip().replace("\\|", "|") for c in cells]


def markdown_to_html(text: str) -> str:
    """Render the documented Markdown subset (headings, pipe tables, bullets, paragraphs)."""
    lines = str(text).splitlines()
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        if not stripped:
            i += 1
            continue
        m = re.match(r"^(#{1,6})\s+(.*)$", stripped)
        if m:
            level = min(len(m.group(1)) + 2, 6)  # section titles are h2
            out.append(f"<h{level}>{_md_inline(m.group(2))}</h{level}>")
            i += 1
            continue
        if (stripped.startswith("|") and i + 1 < len(lines)
                and re.fullmatch(r"\|?\s*:?-{2,}:?\s*(\|\s*:?-{2,}:?\s*)*\|?", lines[i + 1].strip())):
            header = _split_row(stripped)
            i += 2
            body = []
            while i < len(lines) and lines[i].strip().startswith("|"):
                body.append(_split_row(lines[i]))
                i += 1
            out.append('<div class="scroll"><table><thead><tr>'
                       + "".join(f"<th>{_md_inline(h)}</th>" for h in header) + "</tr></thead><tbody>")
            for row in body:
                row = (row + [""] * len(header))[:len(header)]
                cells = []
                for c in row:
                    left = "" if _is_number_text(re.sub(r"[*`]", "", c)) else ' class="l"'
                    cells.append(f"<td{left}>{_md_inline(c)}</td>")
                out.append("<tr>" + "".join(cells) + "</tr>")
            out.append("</tbody></table></div>")
            continue
        if re.match(r"^[-*]\s+", stripped):
            items = []
            while i < len(lines) and re.match(r"^\s*[-*]\s+", lines[i]):
                items.append(re.sub(r"^\s*[-*]\s+", "", lines[i]))
                i += 1
            out.append("<ul>" + "".join(f"<li>{_md_inline(t)}</li>" for t in items) + "</ul>")
            continue
        para = []
        while i < len(lines) and lines[i].strip() and not re.match(r"^(#{1,6}\s|\||[-*]\s)",
                                                                   lines[i].strip()):
            para.append(lines[i].strip())
            i += 1
        if not para:  # a line that looked like a table/list start but is not one
            para.append(stripped)
            i += 1
        out.append(f"<p>{_md_inline(' '.join(para))}</p>")
    return "\n".join(out)


# --------------------------------------------------------------------------- inputs
def read_benchmarks(paths: Sequence[str | os.PathLike]):
    """Snakemake benchmark TSVs -> (per-job DataFrame, per-rule DataFrame)."""
    import pandas as pd

    paths = [Path(p) for p in paths]
    if not paths:
        return None, None
    root = Path(os.path.commonpath([str(p.parent.resolve()) for p in paths]))
    jobs = []
    for p in paths:
        rows = read_benchmark(p)
        if not rows:
            log.warning("benchmark file '%s' has no measurement rows: skipped", p)
            continue
        df = pd.DataFrame(rows)
        rel = p.resolve().relative_to(root).with_suffix("")
        job = rel.as_posix()
        rule = rel.parts[0] if len(rel.parts) > 1 else rel.name

        def num(col, how, frame=df):
            if col not in frame.columns:
                return float("nan")
            vals = pd.to_numeric(frame[col], errors="coerce").dropna()
            return float(getattr(vals, how)()) if len(vals) else float("nan")

        jobs.append({"job": job, "rule": rule, "runs": len(df), "s": num("s", "mean"),
                     "max_rss": num("max_rss", "max"), "cpu_time": num("cpu_time", "mean"),
                     "mean_load": num("mean_load", "mean")})
    if not jobs:
        return None, None
    jobs_df = pd.DataFrame(jobs).sort_values(["rule", "job"], kind="stable").reset_index(drop=True)
    rules_df = (jobs_df.groupby("rule", sort=True)
                .agg(jobs=("job", "count"), total_s=("s", "sum"), max_s=("s", "max"),
                     peak_max_rss=("max_rss", "max"))
                .reset_index())
    return jobs_df, rules_df


def _hms(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "–"
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _num(x, fmt="{:.2f}") -> str:
    return fmt.format(x) if isinstance(x, (int, float)) and math.isfinite(x) else "–"


def read_timing(path: str | os.PathLike) -> tuple[list[str], list[list[str]]]:
    """A timing JSON rendered generically as (header, rows); see the module docstring."""
    data = read_json(path, "timing file")
    if isinstance(data, dict) and data and all(isinstance(v, dict) for v in data.values()):
        items = [{"name": k, **v} for k, v in data.items()]
    elif isinstance(data, list) and all(isinstance(v, dict) for v in data):
        items = data
    elif isinstance(data, dict):
        return ["key", "value"], [[str(k), _fmt_value(v)] for k, v in data.items()]
    else:
        raise DataError(f"timing file '{path}': expected a JSON object or a list of objects")
    cols = list(dict.fromkeys(k for item in items for k in item))
    return cols, [[_fmt_value(item.get(c, "")) for c in cols] for item in items]


def load_sections(values: Sequence) -> list[dict]:
    """Parse and validate the --sections values (inline JSON or files) into one list."""
    sections: list[dict] = []
    for value in values or []:
        data = load_json_arg(value, "--sections")
        if data is None:
            continue
        if isinstance(data, dict):
            data = [data]
        if not isinstance(data, list):
            raise ConfigError(f"--sections {str(value)[:60]!r}: expected a JSON list of objects")
        for k, sec in enumerate(data):
            where = f"--sections {str(value)[:60]!r} item {k}"
            if not isinstance(sec, dict):
                raise ConfigError(f"{where}: expected an object, got {type(sec).__name__}")
            if not isinstance(sec.get("title"), str) or not sec["title"].strip():
                raise ConfigError(f"{where}: 'title' (non-empty string) is required")
            merge_params(sec, {}, where, optional={"title", "caption", *SECTION_CONTENT_KEYS})
            if not any(sec.get(key) for key in SECTION_CONTENT_KEYS):
                raise ConfigError(f"{where} ('{sec['title']}'): needs one of "
                                  f"{', '.join(SECTION_CONTENT_KEYS)}")
            for key in ("csv", "image"):
                if sec.get(key) and not Path(sec[key]).is_file():
                    raise DataError(f"{where} ('{sec['title']}'): {key} file '{sec[key]}' does not exist")
            sections.append(sec)
    return sections


def _render_section(sec: Mapping) -> str:
    import pandas as pd

    out = [f"<h2>{_esc(sec['title'])}</h2>"]
    if sec.get("caption"):
        out.append(f'<p class="caption">{_md_inline(sec["caption"])}</p>')
    if sec.get("csv"):
        try:
            df = pd.read_csv(sec["csv"], dtype=str, keep_default_na=False)
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
            raise DataError(f"section '{sec['title']}': csv '{sec['csv']}' is not readable: {exc}") from exc
        out.append(html_table(list(df.columns), df.values.tolist()))
    if sec.get("markdown"):
        out.append(markdown_to_html(sec["markdown"]))
    if sec.get("image"):
        data = Path(sec["image"]).read_bytes()
        if not data.startswith(b"\x89PNG"):
            raise DataError(f"section '{sec['title']}': image '{sec['image']}' is not a PNG file")
        out.append(_img_tag(data, sec["title"]))
    return "\n".join(out)


# --------------------------------------------------------------------------- figures
def _new_figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _png_bytes(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def _grid(n: int, max_cols: int = 4) -> tuple[int, int]:
    cols = min(n, max_cols)
    return math.ceil(n / cols), cols


def histogram_figure(title: str, id_scores: np.ndarray, oods: Mapping[str, np.ndarray],
                     id_name: str, bins: int | None = None) -> bytes:
    """ID vs OOD score densities, one panel per OOD set, shared bins per panel.

    ``bins`` defaults to sqrt(min(n_ID, n_OOD)) clipped to [10, 60]. The bin range is the
    0.5-99.5 percentile range of ID and OOD scores together, so a few extreme scores do
    not squash the plot (values outside are clipped into the edge bins).
    """
    rows, cols = _grid(len(oods))
    fig = _new_figure(3.2 * cols, 2.5 * rows)
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    for ax, (name, s_ood) in zip(axes, oods.items(), strict=False):
        both = np.concatenate([id_scores, s_ood])
        lo, hi = np.percentile(both, [0.5, 99.5])
        if not hi > lo:
            lo, hi = float(both.min()) - 0.5, float(both.max()) + 0.5
        n_bins = bins or int(np.clip(np.sqrt(min(id_scores.size, s_ood.size)), 10, 60))
        edges = np.linspace(lo, hi, n_bins + 1)
        ax.hist(np.clip(id_scores, lo, hi), bins=edges, density=True, alpha=0.55,
                color="tab:blue", label=f"{id_name} (ID)")
        ax.hist(np.clip(s_ood, lo, hi), bins=edges, density=True, alpha=0.55,
                color="tab:orange", label=f"{name} (OOD)")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("score (higher = more ID)", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7)
    for ax in axes[len(oods):]:
        ax.set_visible(False)
    fig.suptitle(title, fontsize=10)
    return _png_bytes(fig)


def roc_figure(curves: Mapping[str, Mapping[str, tuple[np.ndarray, np.ndarray]]],
               positive: str) -> bytes:
    """ROC curves: one panel per OOD set, one curve per detector (label with AUROC)."""
    from sklearn.metrics import auc, roc_curve

    names = list(curves)
    rows, cols = _grid(len(names), 3)
    fig = _new_figure(4.2 * cols, 3.6 * rows)
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    n_det = max(len(v) for v in curves.values())
    colors = _colors(n_det)
    for ax, ood in zip(axes, names, strict=False):
        for k, (det, (s_id, s_ood)) in enumerate(curves[ood].items()):
            scores = np.concatenate([s_id, s_ood])
            is_id = np.r_[np.ones(s_id.size), np.zeros(s_ood.size)]
            if positive == "id":
                fpr, tpr, _ = roc_curve(is_id, scores)
            else:
                fpr, tpr, _ = roc_curve(1 - is_id, -scores)
            ax.plot(fpr, tpr, lw=1.2, color=colors[k], label=f"{det} ({100 * auc(fpr, tpr):.1f})")
        ax.plot([0, 1], [0, 1], ls=":", color="grey", lw=0.8)
        ax.axhline(0.95, ls="--", color="grey", lw=0.6)
        ax.set_title(ood, fontsize=9)
        who = ("OOD accepted as ID", "ID accepted") if positive == "id" else \
            ("ID flagged as OOD", "OOD flagged")
        ax.set_xlabel(f"FPR ({who[0]})", fontsize=8)
        ax.set_ylabel(f"TPR ({who[1]})", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6, loc="lower right", title="detector (AUROC %)", title_fontsize=6)
    for ax in axes[len(names):]:
        ax.set_visible(False)
    return _png_bytes(fig)


def _colors(n: int):
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def heatmap_figure(df) -> bytes:
    """AUROC (left) and FPR95 (right) in percent: rows detectors, columns OOD sets, group
    averages (if any) and the average."""
    sets = table_columns(df)
    dets = list(dict.fromkeys(zip(df["space"], df["detector"], strict=True)))
    lookup = {(r.space, r.detector, r.ood_dataset): r for r in df.itertuples(index=False)}
    labels = [display_name(d, s) for s, d in dets]
    fig = _new_figure(max(7.0, 1.3 * len(sets) * 2 + 3), max(2.5, 0.32 * len(dets) + 1.5))
    axes = fig.subplots(1, 2)
    for ax, metric, cmap in ((axes[0], "auroc", "viridis"), (axes[1], "fpr95", "viridis_r")):
        mat = np.array([[100 * getattr(lookup[(s, d, o)], metric) if (s, d, o) in lookup else np.nan
                         for o in sets] for s, d in dets])
        im = ax.imshow(mat, cmap=cmap, vmin=0, vmax=100, aspect="auto")
        ax.set_xticks(range(len(sets)), sets, rotation=30, ha="right", fontsize=8)
        ax.set_yticks(range(len(dets)), labels, fontsize=8)
        ax.set_title("AUROC % (higher is better)" if metric == "auroc" else
                     "FPR95 % (lower is better)", fontsize=9)
        if mat.size <= 600:
            for (i, j), v in np.ndenumerate(mat):
                if np.isfinite(v):
                    ax.text(j, i, f"{v:.1f}", ha="center", va="center", fontsize=7,
                            color="white" if (v < 50) == (metric == "auroc") else "black")
        fig.colorbar(im, ax=ax, shrink=0.8)
    return _png_bytes(fig)


def _img_tag(png: bytes, alt: str) -> str:
    return (f'<img alt="{_esc(alt)}" src="data:image/png;base64,'
            f'{base64.b64encode(png).decode("ascii")}">')


# --------------------------------------------------------------------------- assembly
def _score_index(score_paths: Sequence) -> dict[tuple[str, str, str], str]:
    index = {}
    for p in score_paths or []:
        index[parse_score_path(p)] = str(p)
    return index


def build_report(metrics_path, card_path=None, score_paths=(), benchmark_paths=(), timing_paths=(),
                 sections=(), title="gradspace report") -> tuple[str, dict[str, bytes]]:
    """Return (index.html text, {figure file name: PNG bytes})."""
    if score_paths:
        # the ROC figure's scikit-learn (~65 MB of the job's ~210 MB): imported first, so the
        # job's memory is flat from its start. Snakemake's benchmark samples RSS every 0.5 s
        # only during a job's first 15 s, then every 30 s, and missed this late peak.
        import sklearn.metrics  # noqa: F401
    df = read_metrics(metrics_path)
    if len(df) == 0:
        raise DataError(f"metrics file '{metrics_path}' has no rows")
    card = read_card(card_path)
    positive = str(df["positive"].iloc[0])
    if positive not in CONVENTIONS:
        raise DataError(f"metrics file '{metrics_path}': unknown convention '{positive}' in 'positive'")
    id_ds = str(df["id_dataset"].iloc[0])
    sets = ood_sets(df)
    dets = list(dict.fromkeys(zip(df["space"], df["detector"], strict=True)))
    extra = load_sections(sections)
    figures: dict[str, bytes] = {}
    body: list[str] = []
    toc: list[tuple[str, str]] = []

    def section(anchor: str, heading: str, *parts: str) -> None:
        toc.append((anchor, heading))
        body.append(f'<h2 id="{anchor}">{_esc(heading)}</h2>')
        body.extend(parts)

    def figure(name: str, png: bytes, caption: str) -> str:
        figures[name] = png
        return f"<figure>{_img_tag(png, name)}<figcaption>{_esc(caption)}</figcaption></figure>"

    acc = card_id_accuracy(card)
    summary = [f"<li>ID dataset: <code>{_esc(id_ds)}</code>; OOD sets: "
               + ", ".join(f"<code>{_esc(s)}</code>" for s in sets) + "</li>",
               f"<li>Detectors: {len(dets)}</li>",
               f"<li>ID accuracy: {acc:.2f}%</li>" if acc is not None else "<li>ID accuracy: n/a</li>",
               f"<li>{_esc(convention_text(positive))}</li>",
               "<li>Tables show percent with two decimals; best value per column in bold; "
               "<code>metrics.csv</code> holds fractions in [0, 1].</li>"]
    body.append("<ul>" + "".join(summary) + "</ul>")

    if card:
        rows = [[str(k), _fmt_value(v)] for k, v in card.items()]
        section("card", "Model card", html_table(["key", "value"], rows, left_cols=2))

    gt = group_table(df)
    if gt is not None:
        names = ", ".join(g.split(":", 1)[1] for g in group_averages(df))
        section("group-table", "Averages per OOD group",
                f'<p class="caption">{_esc(card_summary(card))}. Unweighted mean over the OOD '
                f"sets of each group ({_esc(names)}), reported separately as OpenOOD does for "
                "near- and far-OOD; percent, best per column in bold.</p>",
                html_table(*gt, left_cols=3),
                markdown_to_html("\n".join(spread_lines(df))))

    header, rows, bold = paper_table(df, "detector")
    section("paper-table", "FPR95 / AUROC per OOD set",
            f'<p class="caption">{_esc(card_summary(card))}. Percent; FPR95↓ lower is better, '
            "AUROC↑ higher is better; best per column in bold.</p>",
            html_table(header, rows, bold, left_cols=3))
    t3 = paper_table(df, "method")
    if t3 is not None:
        section("table3", "Feature vs gradient embeddings per method",
                f'<p class="caption">{_esc(card_summary(card))}. Layout of Table 3 of the '
                "low-dimensional gradient paper: one row per embedding of each method.</p>",
                html_table(*t3, left_cols=2))

    section("heatmap", "Metrics heatmap",
            figure("heatmap.png", heatmap_figure(df),
                   "AUROC and FPR95 (percent) per detector and OOD set, with the average."))

    scores = _score_index(score_paths)
    if scores:
        # memory: one detector's ID + OOD score vectors at a time for histograms; the ROC
        # figure needs all of them (1-D float64 vectors, small next to embeddings)
        curves: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {o: {} for o in sets}
        hist_parts = []
        for space, det in dets:
            id_path = scores.get((space, det, id_ds))
            have = {o: scores[(space, det, o)] for o in sets if (space, det, o) in scores}
            if id_path is None or not have:
                log.info("no score files for %s/%s: skipping its figures", space, det)
                continue
            s_id = load_scores(id_path)
            oods = {o: load_scores(p) for o, p in have.items()}
            label = display_name(det, space)
            for o, s in oods.items():
                curves[o][label] = (s_id, s)
            name = f"hist_{_safe_name(space)}_{_safe_name(det)}.png"
            hist_parts.append(figure(name, histogram_figure(label, s_id, oods, id_ds),
                                     f"Score distributions of {label}: {id_ds} (ID) vs each OOD set."))
        curves = {o: c for o, c in curves.items() if c}
        if curves:
            section("roc", "ROC curves",
                    figure("roc.png", roc_figure(curves, positive),
                           "ROC curve per OOD set; legend shows AUROC in percent; dashed line at "
                           "TPR = 95% where FPR95 is read."))
        if hist_parts:
            section("histograms", "Score histograms", *hist_parts)

    header, rows = full_table(df)
    section("all-metrics", "All metrics per OOD set", html_table(header, rows, left_cols=3))

    jobs, rules = read_benchmarks(benchmark_paths)
    if jobs is not None:
        rule_rows = [[r.rule, str(r.jobs), _num(r.total_s), _hms(r.total_s), _num(r.max_s),
                      _num(r.peak_max_rss, "{:.1f}")] for r in rules.itertuples(index=False)]
        total = float(jobs["s"].sum())
        job_rows = [[r.job, str(r.runs), _num(r.s), _hms(r.s), _num(r.max_rss, "{:.1f}"),
                     _num(r.cpu_time), _num(r.mean_load)] for r in jobs.itertuples(index=False)]
        section("runtime", "Run time",
                f'<p class="caption">From Snakemake benchmark files: wall-clock seconds (s) and '
                f"peak resident memory (max_rss, MB). Sum over {len(jobs)} jobs: "
                f"{_num(total)} s ({_hms(total)}).</p>",
                "<h3>Per rule</h3>",
                html_table(["rule", "jobs", "total s", "h:m:s", "max s", "peak max_rss MB"],
                           rule_rows, left_cols=1),
                "<h3>Per job</h3>",
                html_table(["job", "runs", "s", "h:m:s", "max_rss MB", "cpu_time s", "mean_load"],
                           job_rows, left_cols=1))

    for path in timing_paths or []:
        header, rows = read_timing(path)
        anchor = f"timing-{_safe_name(Path(path).stem)}"
        section(anchor, f"Timing: {Path(path).stem}", html_table(header, rows))

    for k, sec in enumerate(extra):
        toc.append((f"extra-{k}", sec["title"]))
        body.append(f'<div id="extra-{k}">{_render_section(sec)}</div>')

    nav = "<nav><ul>" + "".join(f'<li><a href="#{a}">{_esc(h)}</a></li>' for a, h in toc) + "</ul></nav>"
    page = ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
            f"<title>{_esc(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
            f"<h1>{_esc(title)}</h1>\n{nav}\n" + "\n".join(body) + "\n</body>\n</html>\n")
    return page, figures


def write_report(out_dir: str | os.PathLike, page: str, figures: Mapping[str, bytes]) -> None:
    """Write index.html + figures/ into a temporary sibling, then swap it into place."""
    with atomic_path(out_dir, directory=True) as tmp:
        (tmp / "figures").mkdir()
        for name, png in figures.items():
            (tmp / "figures" / name).write_bytes(png)
        (tmp / "index.html").write_text(page, encoding="utf-8")


def cmd_report(args) -> None:
    page, figures = build_report(args.metrics, args.card, args.scores, args.benchmarks, args.timing,
                                 args.sections, args.title)
    write_report(args.out_dir, page, figures)
    log.info("wrote %s/index.html with %d figures", args.out_dir, len(figures))
