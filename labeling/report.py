"""The audit report: one self-contained HTML file (plots as embedded PNG, image mosaics as embedded JPEG).

Sections, top to bottom: findings, ground truth (when given), label-set comparison (when given),
attributes, confidence, parts, foreground, integrity, mosaics. Images come straight from the image
shards (tar members ``<key>.jpg``/``.png``); part maps are drawn over them in the legend's colours.
"""

from __future__ import annotations

import base64
import html
import io
import tarfile
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from labeling.audit_views import AuditContext, AuditResult
from pipeline.formats import atomic_path, images_dir

# Part colours (class id order, background transparent): distinct under common colour-vision deficiencies.
PALETTE = np.array(
    [[0, 0, 0], [230, 159, 0], [255, 221, 170], [0, 114, 178], [86, 180, 233], [0, 158, 115], [240, 228, 66],
     [213, 94, 0], [204, 121, 167], [120, 120, 120], [160, 60, 60], [60, 160, 160]], np.uint8)  # fmt: skip
CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#1d232a;background:#f4f6f8}
main{max-width:1180px;margin:0 auto;padding:18px 28px 40px}
header{background:#1d2b3a;color:#fff;padding:18px 28px}header h1{margin:0 0 4px;font-size:22px}
header .meta{opacity:.85;font-size:13px}
h2{font-size:18px;margin:28px 0 10px;border-bottom:2px solid #d8dee4;padding-bottom:4px}
h3{font-size:14px;margin:16px 0 6px;color:#44505c}
table{border-collapse:collapse;font-size:12.5px;background:#fff;margin:6px 0 10px}
th,td{border:1px solid #dde3e9;padding:3px 8px;text-align:left;vertical-align:top}th{background:#eef2f6}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.sev{display:inline-block;border-radius:3px;padding:1px 7px;color:#fff;font-weight:600;font-size:11px}
.error{background:#c0392b}.warning{background:#d68910}.info{background:#2874a6}
.cards{display:flex;flex-wrap:wrap;gap:10px;margin:8px 0}
.card{background:#fff;border:1px solid #dde3e9;border-radius:6px;padding:8px 14px;min-width:120px}
.card b{display:block;font-size:20px}.card span{font-size:12px;color:#5b6670}
img.plot{max-width:100%;background:#fff;border:1px solid #dde3e9;margin:4px 0}
.grid{display:flex;flex-wrap:wrap;gap:6px}.tile{background:#fff;border:1px solid #dde3e9;padding:3px;text-align:center}
.tile .imgs{display:flex;gap:2px}.tile img{display:block;height:var(--h)}
.tile div.cap{font-size:10.5px;color:#44505c;width:0;min-width:100%;overflow:hidden;text-overflow:ellipsis;
white-space:nowrap}
.legend span{display:inline-block;margin:0 12px 4px 0;font-size:12.5px}
.legend i{display:inline-block;width:14px;height:14px;vertical-align:-2px;margin-right:4px;border:1px solid #888}
.row{display:flex;gap:14px;align-items:flex-start;flex-wrap:wrap}.row>div{flex:1 1 0;min-width:300px;overflow-x:auto}
.attr{display:flex;gap:6px;align-items:center;margin:4px 0}.attr .name{width:150px;font-size:12.5px}
.note{font-size:12px;color:#5b6670}code{background:#eef2f6;padding:1px 4px}
"""


def _png(fig) -> str:  # noqa: ANN001 - matplotlib Figure
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=96, bbox_inches="tight")
    plt.close(fig)
    return f'<img class="plot" src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'


def _fmt(v: object) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return "nan" if np.isnan(v) else f"{v:.4g}" if abs(v) < 1e4 else f"{v:,.0f}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return html.escape(str(v))


def table_html(t: pa.Table | None, limit: int = 30, columns: list[str] | None = None) -> str:
    if t is None or t.num_rows == 0:
        return '<p class="note">(none)</p>'
    cols = [
        c for c in (columns or t.column_names) if c in t.column_names and not pa.types.is_nested(t.schema.field(c).type)
    ]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = []
    for r in t.slice(0, limit).to_pylist():
        cells = "".join(
            f'<td class="num">{_fmt(r[c])}</td>' if isinstance(r[c], int | float) else f"<td>{_fmt(r[c])}</td>"
            for c in cols
        )
        body.append(f"<tr>{cells}</tr>")
    more = f'<p class="note">{t.num_rows - limit:,} more rows in the Parquet/CSV file</p>' if t.num_rows > limit else ""
    return f"<table><tr>{head}</tr>{''.join(body)}</table>{more}"


# --- plots --------------------------------------------------------------------------------------
def _plots(result: AuditResult) -> dict[str, str]:
    """Every figure of the report as an <img> tag, by name (only those whose table exists)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t, ctx, out = result.tables, result.ctx, {}
    _attribute_plots(plt, t, out)
    _histogram_plots(plt, t, ctx, out)
    _part_plot(plt, t, out)
    _confusion_plot(plt, t, ctx, out)
    return out


def _attribute_plots(plt: Any, t: dict[str, pa.Table], out: dict[str, str]) -> None:
    rates = t.get("attribute_rates")
    if rates is not None and rates.num_rows:
        names = rates["attribute"].to_pylist()
        fig, ax = plt.subplots(figsize=(5.2, 0.22 * len(names) + 0.8))
        y = np.arange(len(names))
        ax.barh(y, rates["positive_rate"].to_numpy(), color="#3b7dd8", label="positive rate (p ≥ 0.5)")
        ax.plot(rates["mean_prob"].to_numpy(), y, "k|", ms=9, label="mean probability")
        ax.set_yticks(y, names, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlim(0, 1)
        ax.legend(fontsize=7, loc="lower right")
        ax.set_title("Attributes: positive rate", fontsize=10)
        out["attr_rates"] = _png(fig)
        hist = t["attribute_confidence_hist"]
        grid = np.zeros((len(names), 10))
        for r in hist.to_pylist():
            grid[r["idx"] - 1, r["bin"]] = r["images"]
        grid /= np.maximum(grid.sum(1, keepdims=True), 1)
        fig, ax = plt.subplots(figsize=(5.2, 0.22 * len(names) + 0.8))
        im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=max(grid.max(), 1e-9))
        ax.set_yticks(np.arange(len(names)), names, fontsize=8)
        ax.set_xticks(np.arange(10), [f"{b / 10:.1f}" for b in range(10)], fontsize=7)
        ax.set_xlabel("P(attribute) bin (lower edge)", fontsize=8)
        ax.set_title("Confidence histogram (share of images per bin)", fontsize=10)
        fig.colorbar(im, ax=ax, fraction=0.04)
        out["attr_hist"] = _png(fig)


def _histogram_plots(plt: Any, t: dict[str, pa.Table], ctx: AuditContext, out: dict[str, str]) -> None:
    histograms = [
        ("image_confidence_hist", "certainty_lo", "mean |2p − 1| over attributes", "Image attribute certainty"),
        ("fg_ratio_hist", "fg_lo", "fg_ratio (share of cells labelled person)", "Foreground ratio"),
        ("compare_part_agreement_hist", "agreement_lo", "share of part cells that agree", "Per-image part agreement"),
    ]
    for name, col, xlabel, title in histograms:
        line = ctx.cfg.low_confidence if name == "image_confidence_hist" else None
        h = t.get(name)
        if h is not None and h.num_rows:
            fig, ax = plt.subplots(figsize=(5.0, 2.4))
            ax.bar(h[col].to_numpy(), h["images"].to_numpy(), width=0.048, align="edge", color="#3b7dd8")
            if line is not None:
                ax.axvline(line, color="#c0392b", ls="--", lw=1, label=f"low-confidence threshold {line}")
                ax.legend(fontsize=7)
            ax.set_xlim(0, 1)
            ax.set_xlabel(xlabel, fontsize=8)
            ax.set_ylabel("images", fontsize=8)
            ax.set_title(title, fontsize=10)
            out[name] = _png(fig)


def _part_plot(plt: Any, t: dict[str, pa.Table], out: dict[str, str]) -> None:
    cov = t.get("part_coverage")
    if cov is not None and cov.num_rows:
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(8.5, 2.9), gridspec_kw={"width_ratios": [1.3, 1]})
        parts = cov["part"].to_pylist()
        ids = cov["id"].to_numpy()
        rows = np.array([np.nan if v is None else v for v in cov["mean_row"].to_pylist()], float)
        a1.bar(parts, cov["present_share"].to_numpy(), color=[PALETTE[i % len(PALETTE)] / 255 for i in ids])
        a1.set_ylim(0, 1)
        a1.set_title("Share of images where the part appears", fontsize=10)
        a1.set_xticks(range(len(parts)), parts, rotation=40, ha="right", fontsize=8)
        for x, r in enumerate(rows):
            if not np.isnan(r):
                a2.scatter([x], [r], s=90, color=PALETTE[ids[x] % len(PALETTE)] / 255, edgecolor="k", zorder=3)
        a2.set_xticks(range(len(parts)), parts, rotation=40, ha="right", fontsize=8)
        a2.set_ylim(1.02, -0.02)
        a2.set_ylabel("mean row (0 = top)", fontsize=8)
        a2.set_title("Mean vertical position per class", fontsize=10)
        a2.grid(axis="y", alpha=0.3)
        out["parts"] = _png(fig)


def _confusion_plot(plt: Any, t: dict[str, pa.Table], ctx: AuditContext, out: dict[str, str]) -> None:
    conf = t.get("gt_confusion")
    if conf is not None and conf.num_rows:
        k = len(ctx.parts)
        m = conf["cells"].to_numpy().reshape(k, k).astype(float)
        m /= np.maximum(m.sum(1, keepdims=True), 1)
        fig, ax = plt.subplots(figsize=(5.2, 4.4))
        ax.imshow(m, cmap="Blues", vmin=0, vmax=1)
        for i in range(k):
            for j in range(k):
                if m[i, j] >= 0.01:
                    ax.text(
                        j,
                        i,
                        f"{m[i, j]:.2f}",
                        ha="center",
                        va="center",
                        fontsize=6.5,
                        color="w" if m[i, j] > 0.5 else "k",
                    )
        ax.set_xticks(range(k), ctx.parts, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(k), ctx.parts, fontsize=8)
        ax.set_xlabel("predicted (pseudo-label)", fontsize=8)
        ax.set_ylabel("ground truth", fontsize=8)
        ax.set_title("Part confusion (rows normalised)", fontsize=10)
        out["confusion"] = _png(fig)


# --- images -------------------------------------------------------------------------------------
def read_images(ctx: AuditContext, where: dict[str, tuple[str, int]]) -> dict[str, bytes]:
    """Encoded bytes of ``key -> (shard stem, index)`` read from the image tars (one pass per shard)."""
    by_shard: dict[str, set[str]] = defaultdict(set)
    for key, (shard, _) in where.items():
        by_shard[shard].add(key)
    found: dict[str, bytes] = {}
    for shard, keys in by_shard.items():
        path = images_dir(ctx.cfg.root, ctx.cfg.corpus) / f"{shard}.tar"
        if not path.is_file():
            continue
        with tarfile.open(path) as tar:
            for member in tar:
                key, _, ext = member.name.rpartition("/")[2].partition(".")
                if key in keys and ext.lower() in ("jpg", "jpeg", "png"):
                    found[key] = tar.extractfile(member).read()
                    keys.discard(key)
                    if not keys:
                        break
    return found


def _thumb(data: bytes | None, part_map: bytes | None, ctx: AuditContext) -> str:
    """A JPEG data URI of the image at the report's thumbnail height, with the part map drawn over it if given."""
    from PIL import Image

    h = ctx.cfg.thumb_height_px
    if data is None:
        img = Image.new("RGB", (h // 2, h), (200, 200, 200))
    else:
        img = Image.open(io.BytesIO(data)).convert("RGB")
        img = img.resize((max(1, round(img.width * h / img.height)), h), Image.BILINEAR)
    if part_map is not None and ctx.grid and len(part_map) == ctx.grid[0] * ctx.grid[1]:
        c = np.asarray(
            Image.fromarray(np.frombuffer(part_map, np.uint8).reshape(ctx.grid)).resize(img.size, Image.NEAREST)
        )
        rgb = np.asarray(img).astype(np.float32)
        alpha = np.where(c > 0, 0.55, 0.0)[..., None]
        img = Image.fromarray((rgb * (1 - alpha) + PALETTE[c % len(PALETTE)] * alpha).astype(np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def _tile(uris: list[str], caption: str) -> str:
    cap = html.escape(caption)
    imgs = "".join(f'<img src="{u}">' for u in uris)
    return f'<div class="tile" title="{cap}"><div class="imgs">{imgs}</div><div class="cap">{cap}</div></div>'


def _mosaics(ctx: AuditContext, sel: dict) -> str:
    labels = sel.get("labels", {})
    if not labels:
        return '<p class="note">No mosaics (no manifest, no image shards, or mosaics turned off).</p>'
    images = read_images(ctx, {k: (v["shard"], v["index"]) for k, v in labels.items()})
    legend = "".join(
        f'<span><i style="background:rgb{tuple(int(x) for x in PALETTE[i % len(PALETTE)])}"></i>{html.escape(p)}</span>'
        for i, p in enumerate(ctx.parts)
        if i > 0
    )
    parts_html = [f'<div class="legend">{legend}</div>']

    def pair(key: str, caption: str) -> str:
        data, part_map = images.get(key), labels.get(key, {}).get("part_map")
        return _tile([_thumb(data, None, ctx), _thumb(data, part_map, ctx)], caption)

    out = [
        '<h3>Random images: image | part map (colours as in the legend)</h3><div class="grid">'
        + "".join(pair(k, k) for k in sel["parts"] if k in labels)
        + "</div>"
    ]
    if sel.get("worst"):
        out.append(f'<h3>Worst: {html.escape(sel["worst_title"])}</h3><div class="grid">')
        out.append("".join(pair(k, f"{cap} · {k}") for k, cap in sel["worst"] if k in labels) + "</div>")
    if sel.get("attributes"):
        out.append("<h3>Highest (left) and lowest (right) attribute probability p, one image per video or track</h3>")
        for a in sel["attributes"]:

            def tiles(keys: list[str], a: dict = a) -> str:
                return "".join(
                    _tile([_thumb(images.get(k), None, ctx)], f"p={labels[k]['attr_prob'][a['idx']] / 255:.2f}")
                    for k in keys
                    if k in labels
                )

            out.append(
                f'<div class="attr"><div class="name">{html.escape(a["attribute"])}</div>'
                f'<div class="grid">{tiles(a["most"])}</div><div style="width:18px"></div>'
                f'<div class="grid">{tiles(a["least"])}</div></div>'
            )
    return "".join(parts_html + out)


# --- page ---------------------------------------------------------------------------------------
def _row(*cells: str) -> str:
    return '<div class="row">' + "".join(f"<div>{c}</div>" for c in cells) + "</div>"


def write_report(path: Path, result: AuditResult, mosaics: dict) -> Path:
    """Render ``report.html`` (atomically) and return its path."""
    ctx = result.ctx
    s = _sections(result, _plots(result), mosaics)
    corpus, root = html.escape(ctx.cfg.corpus), html.escape(str(ctx.cfg.root))
    audit_s = sum(v for k, v in result.timings_s.items() if k not in ("compare", "ground_truth"))
    meta = (
        f"root {root} · grid {ctx.grid} · {len(ctx.attributes)} attributes · {len(ctx.parts) - 1} part classes · "
        f"standard audit {audit_s:.1f} s"
    )
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>CLASP audit: {corpus}</title>"
        f"<style>{CSS}</style></head><body style='--h:{ctx.cfg.thumb_height_px}px'><header>"
        f"<h1>Label audit — {corpus} / {html.escape(ctx.labelset)}</h1><div class='meta'>{meta}</div></header>"
        "<main><div class='cards'>"
        + "".join(f"<div class='card'><b>{v}</b><span>{html.escape(str(k))}</span></div>" for k, v in _cards(result))
        + "</div>"
        + "".join(s)
        + "</main></body></html>"
    )
    with atomic_path(path) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return path


def _cards(result: AuditResult) -> list[tuple[str, object]]:
    """The figures at the top of the page: rows, shards, errors, warnings and the headline metrics."""
    ctx, m = result.ctx, result.metrics
    sev_count = {s: sum(f.severity == s for f in result.findings) for s in ("error", "warning", "info")}
    cards = [
        ("label rows", f"{result.rows:,}"),
        ("label shards", f"{len(ctx.label_files):,}"),
        ("errors", sev_count["error"]),
        ("warnings", sev_count["warning"]),
    ]
    for key, label in [
        ("attribute_mA", "attribute mA (GT)"),
        ("part_mIoU", "part mIoU (GT)"),
        ("foreground_IoU", "foreground IoU (GT)"),
        ("compare_part_cell_agreement", "part agreement vs B"),
    ]:
        if key in m:
            cards.append((label, f"{m[key]:.3f}"))
    return cards


def _sections(result: AuditResult, plots: dict[str, str], mosaics: dict) -> list[str]:
    """The report's sections as HTML fragments, in page order."""
    ctx, t = result.ctx, result.tables
    findings = "".join(
        f'<tr><td><span class="sev {f.severity}">{f.severity}</span></td><td>{html.escape(f.what)}</td>'
        f'<td>{html.escape(f.where)}</td><td class="num">{f.count:,}</td></tr>'
        for f in result.findings
    )
    head = "<tr><th>severity</th><th>what</th><th>where</th><th>how many</th></tr>"
    s = [f"<h2>Findings</h2><table>{head}{findings}</table>"]
    if "gt_summary" in t:
        s.append("<h2>Against ground truth</h2>")
        s.append(_row(table_html(t["gt_summary"]) + table_html(t.get("gt_parts")), plots.get("confusion", "")))
        s.append(table_html(t.get("gt_attributes"), 60))
    if "compare_keys" in t:
        s.append(
            f"<h2>Comparison with label set {html.escape(str(ctx.cfg.compare))}</h2>" + table_html(t["compare_keys"])
        )
        right = plots.get("compare_part_agreement_hist", "") + table_html(t.get("compare_parts"))
        s.append(_row(table_html(t.get("compare_attributes"), 40), right))
    s.append("<h2>Attributes</h2>" + _row(plots.get("attr_rates", ""), plots.get("attr_hist", "")))
    s.append(table_html(t.get("attribute_rates"), 60))
    s.append(
        "<h2>Confidence</h2>" + _row(plots.get("image_confidence_hist", ""), table_html(t.get("image_confidence")))
    )
    s.append("<h2>Parts</h2>" + plots.get("parts", ""))
    s.append(_row(table_html(t.get("part_coverage")), table_html(t.get("part_order_pairs"))))
    s.append("<h3>Part confidence by class (sampled rows; cells under the threshold teach nothing)</h3>")
    s.append(table_html(t.get("part_confidence")))
    s.append("<h3>Shards with the most implausible part orders</h3>" + table_html(t.get("part_order_by_shard"), 8))
    stats = ["images", "mean", "p05", "p50", "p95", "empty_share", "full_share", "invalid"]
    s.append(
        "<h2>Foreground</h2>" + _row(plots.get("fg_ratio_hist", ""), table_html(t.get("fg_ratio_stats"), columns=stats))
    )
    counts = t.get("shard_counts")
    bad = counts.filter(pc.not_equal(counts["status"], "ok")) if counts is not None else None
    s.append("<h2>Integrity</h2><h3>Shards whose row counts or files are wrong</h3>" + table_html(bad))
    s.append("<h3>Keys missing, extra or out of order (by shard)</h3>" + table_html(t.get("key_problems_by_shard")))
    s.append("<h3>Duplicate keys</h3>" + table_html(t.get("duplicate_keys")))
    s.append("<h3>Summary columns vs decoded part maps (sampled rows)</h3>" + table_html(t.get("summary_consistency")))
    s.append("<h2>Mosaics</h2>" + _mosaics(ctx, mosaics))
    corpus, root = html.escape(ctx.cfg.corpus), html.escape(str(ctx.cfg.root))
    s.append(
        '<h2>Files</h2><p class="note">Every table above is in <code>queries/&lt;name&gt;.parquet</code> and '
        "<code>.csv</code>, with the SQL that made it in <code>.sql</code>; <code>summary.json</code> holds the "
        f'findings and metrics. Ask your own questions with <code>clasp audit --corpus {corpus} --root {root} --sql "'
        'SELECT ... FROM labels"</code> (views: labels, manifest, shards, attributes, parts, gt, labels_b).</p>'
    )
    return s
