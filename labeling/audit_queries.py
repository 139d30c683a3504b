"""The standard audit queries (SQL over the ``lab`` copy of ``labels``, ``manifest`` and ``shards``) and
the findings drawn from their results. Every query's text is saved beside its result, so a user can rerun
or adapt it with ``clasp audit --sql`` (replace ``lab`` by ``labels`` and ``a<i>`` by ``attr_prob[i]``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pyarrow as pa

from labeling.audit_views import AuditContext, Finding


@dataclass(frozen=True)
class Query:
    sql: str
    setup: str | None = None  # a statement (e.g. CREATE TEMP TABLE) run once before ``sql``


def _q(name: str) -> str:
    return "'" + name.replace("'", "''") + "'"


def _order_pairs(ctx: AuditContext) -> list[tuple[str, str]]:
    order = [p for p in ctx.cfg.vertical_order if p in ctx.parts[1:]]
    return [(a, b) for i, a in enumerate(order) for b in order[i + 1 :]]


def implausible_sql(ctx: AuditContext) -> str:
    """SQL predicate: some part sits more than ``order_margin`` below a part that belongs under it."""
    m = round(ctx.cfg.order_margin * 255)
    terms = [f"coalesce(row_{a}::INT - row_{b}::INT > {m}, false)" for a, b in _order_pairs(ctx)]
    return "(" + " OR ".join(terms) + ")" if terms else "false"


def standard_queries(ctx: AuditContext) -> dict[str, Query]:
    """Name -> query of every standard audit, in report order."""
    return {
        **_attribute_queries(ctx),
        **_part_queries(ctx),
        **FOREGROUND_QUERIES,
        **_shard_queries(ctx),
        **_key_queries(ctx),
    }


def _shard_name(ctx: AuditContext) -> str:
    """SQL for the shard name ('<corpus>-NNNNNN') of a ``shard_no`` column."""
    corpus = ctx.cfg.corpus.replace("'", "''")
    return f"printf('{corpus}-%06d', shard_no)"


def _attribute_queries(ctx: AuditContext) -> dict[str, Query]:
    cfg = ctx.cfg
    n_attr = len(ctx.attributes)
    margin = round(cfg.uncertain_margin * 255)
    counts = " UNION ALL ".join(
        f"SELECT {i} AS idx, a{i} AS value, count(*) AS n FROM lab GROUP BY ALL" for i in range(1, n_attr + 1)
    )
    cert = "(" + " + ".join(f"abs(2 * a{i}::INT - 255)" for i in range(1, n_attr + 1)) + f")::DOUBLE / {n_attr * 255}"
    q: dict[str, Query] = {}
    q["attribute_rates"] = Query(
        setup=f"CREATE OR REPLACE TEMP TABLE attr_counts AS {counts}",
        sql=f"""
SELECT a.idx, a.name AS attribute, sum(n)::BIGINT AS images,
       coalesce(sum(n) FILTER (WHERE value >= 128), 0) / sum(n) AS positive_rate,
       sum(n * value) / sum(n) / 255 AS mean_prob,
       coalesce(sum(n) FILTER (WHERE abs(2 * value::INT - 255) < {margin}), 0) / sum(n) AS uncertain_share
FROM attr_counts JOIN attributes a USING (idx) GROUP BY a.idx, a.name ORDER BY a.idx""",
    )
    q["attribute_confidence_hist"] = Query("""
SELECT a.idx, a.name AS attribute, least(value::INT * 10 // 255, 9) AS bin, bin / 10 AS prob_lo,
       (bin + 1) / 10 AS prob_hi, sum(n)::BIGINT AS images
FROM attr_counts JOIN attributes a USING (idx) GROUP BY ALL ORDER BY a.idx, bin""")
    q["image_confidence_hist"] = Query(
        setup=f"CREATE OR REPLACE TEMP TABLE img_cert AS SELECT {cert} AS certainty FROM lab",
        sql="""
SELECT least(floor(certainty * 20), 19)::INT AS bin, bin / 20 AS certainty_lo, count(*) AS images
FROM img_cert GROUP BY ALL ORDER BY bin""",
    )
    q["image_confidence"] = Query(f"""
SELECT count(*) AS images, avg(certainty) AS mean_certainty, {cfg.low_confidence} AS threshold,
       count(*) FILTER (WHERE certainty < {cfg.low_confidence}) AS low_confidence_images,
       low_confidence_images / count(*) AS low_confidence_share
FROM img_cert""")
    return q


def _part_queries(ctx: AuditContext) -> dict[str, Query]:
    cfg, name, bad = ctx.cfg, _shard_name(ctx), implausible_sql(ctx)
    q: dict[str, Query] = {}
    q["part_coverage"] = Query(
        " UNION ALL ".join(
            f"SELECT {c} AS id, {_q(p)} AS part, avg((area_{p} > 0)::INT) AS present_share, "
            f"avg(area_{p}) / 255 AS mean_area, avg(row_{p}) / 255 AS mean_row, count(row_{p}) AS images_present "
            "FROM lab"
            for c, p in enumerate(ctx.parts[1:], start=1)
        )
        + " ORDER BY id"
    )
    pairs = _order_pairs(ctx)
    m = round(cfg.order_margin * 255)
    if pairs:
        q["part_order_pairs"] = Query(
            " UNION ALL ".join(
                f"SELECT {_q(a)} AS upper_part, {_q(b)} AS lower_part, "
                f"count(*) FILTER (WHERE row_{a} IS NOT NULL AND row_{b} IS NOT NULL) AS images_with_both, "
                f"count(*) FILTER (WHERE row_{a}::INT - row_{b}::INT > {m}) AS implausible, "
                f"implausible / greatest(images_with_both, 1) AS implausible_share FROM lab"
                for a, b in pairs
            )
        )
        q["part_order_by_shard"] = Query(f"""
SELECT {name} AS shard, images, implausible, implausible / images AS implausible_share
FROM (SELECT shard_no, count(*) AS images, count(*) FILTER (WHERE {bad}) AS implausible FROM lab GROUP BY shard_no)
ORDER BY implausible_share DESC, shard""")
        rows = ", ".join(f"row_{p}" for p in dict.fromkeys(p for pair in pairs for p in pair))
        q["part_order_examples"] = Query(
            f"SELECT {name} AS shard, row_idx, {rows} FROM (SELECT shard_no, row_idx, {rows} FROM lab WHERE {bad} "
            "ORDER BY shard_no, row_idx LIMIT 200)"
        )
    return q


FOREGROUND_QUERIES = {
    "fg_ratio_hist": Query("""
SELECT least(floor(fg_ratio * 20), 19)::INT AS bin, bin / 20 AS fg_lo, count(*) AS images
FROM lab WHERE fg_ratio BETWEEN 0 AND 1 GROUP BY ALL ORDER BY bin"""),
    "fg_ratio_stats": Query("""
SELECT count(*) AS images, avg(fg_ratio) AS mean, quantile_cont(fg_ratio, [0.05, 0.5, 0.95]) AS q,
       q[1] AS p05, q[2] AS p50, q[3] AS p95,
       avg((fg_ratio < 0.02)::INT) AS empty_share, avg((fg_ratio > 0.98)::INT) AS full_share,
       count(*) FILTER (WHERE NOT (fg_ratio BETWEEN 0 AND 1)) AS invalid
FROM lab"""),
}


def _shard_queries(ctx: AuditContext) -> dict[str, Query]:
    has_sizes = "true" if ctx.sizes else "false"
    shard_counts = Query(f"""
SELECT shard, images, recorded, label_rows, label_file,
       CASE WHEN NOT label_file THEN 'missing label shard'
            WHEN images IS NULL AND {has_sizes} THEN 'no image shard'
            WHEN label_rows <> images THEN 'rows differ from sizes.json'
            WHEN recorded IS NOT NULL AND recorded <> label_rows THEN 'rows differ from labelset.json'
            ELSE 'ok' END AS status
FROM shards ORDER BY shard""")
    return {"shard_counts": shard_counts}


def _key_queries(ctx: AuditContext) -> dict[str, Query]:
    name = _shard_name(ctx)
    corpus = ctx.cfg.corpus.replace("'", "''")
    q: dict[str, Query] = {}
    if not ctx.has_manifest:
        q["duplicate_keys"] = Query("""
SELECT key, count(*) AS copies, string_agg(DISTINCT shard, ' ') AS shards
FROM labels WHERE key IN (SELECT key FROM labels GROUP BY key HAVING count(*) > 1)
GROUP BY key ORDER BY copies DESC, key LIMIT 1000""")
        return q
    # One hash join of label keys with manifest keys finds keys missing or extra and rows whose position
    # differs from the image's; only those problem rows are kept. Manifest keys are unique (ingest refuses
    # collisions), so a label key is duplicated when it occurs twice among the problem rows, or once there
    # while its image's own position holds a correct row.
    q["duplicate_keys"] = Query(
        setup=f"""
CREATE OR REPLACE TEMP TABLE key_problems AS
SELECT CASE WHEN l.key IS NULL THEN 'missing' WHEN m.key IS NULL THEN 'extra' ELSE 'misordered' END AS kind,
       coalesce(l.key, m.key) AS key, l.shard_no AS label_shard, l.row_idx, m.shard_no AS image_shard,
       m.image_index
FROM (SELECT key, shard_no, row_idx FROM labels_pos) l
FULL OUTER JOIN manifest_pos m ON l.key = m.key
WHERE l.key IS NULL OR m.key IS NULL OR l.shard_no <> m.shard_no OR l.row_idx <> m.image_index;
CREATE OR REPLACE TEMP TABLE dup_keys AS
SELECT key, count(*) + max(occupied::INT) AS copies, string_agg(DISTINCT {name}, ' ') AS shards
FROM (SELECT p.key, coalesce(p.label_shard, p.image_shard) AS shard_no,
             p.kind = 'misordered' AND q.key IS NULL AND p.image_index < coalesce(s.label_rows, 0) AS occupied
      FROM key_problems p
      LEFT JOIN key_problems q ON q.label_shard = p.image_shard AND q.row_idx = p.image_index
      LEFT JOIN shards s ON s.shard_no = p.image_shard
      WHERE p.label_shard IS NOT NULL)
GROUP BY key HAVING copies > 1;
UPDATE key_problems SET kind = 'duplicate' WHERE kind = 'misordered' AND key IN (SELECT key FROM dup_keys)
""",
        sql="SELECT * FROM dup_keys ORDER BY copies DESC, key LIMIT 1000",
    )
    q["key_problems_by_shard"] = Query(f"""
SELECT {name} AS shard, p.kind, p.images, p.first_row, coalesce(s.label_file, false) AS label_file
FROM (SELECT coalesce(label_shard, image_shard) AS shard_no, kind, count(*) AS images,
             min(coalesce(row_idx, image_index)) AS first_row
      FROM key_problems GROUP BY ALL) p
LEFT JOIN shards s USING (shard_no) ORDER BY shard, kind""")
    q["key_problem_examples"] = Query(f"""
SELECT kind, key, printf('{corpus}-%06d', label_shard) AS label_shard, row_idx,
       printf('{corpus}-%06d', image_shard) AS image_shard, image_index
FROM key_problems ORDER BY kind, coalesce(key_problems.label_shard, key_problems.image_shard), row_idx LIMIT 200""")
    return q


# --- findings -----------------------------------------------------------------------------------
_Add = Callable[[str, str, str | list[str], int], None]  # severity, what, where (one or a list), count


def _where(names: list[str], limit: int = 6) -> str:
    names = [str(n) for n in names]
    more = f" (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _rows(table: pa.Table | None) -> list[dict]:
    return table.to_pylist() if table is not None else []


def derive_findings(ctx: AuditContext, t: dict[str, pa.Table]) -> list[Finding]:
    """Findings (severity, what, where, how many) from the standard audit results."""
    out: list[Finding] = []

    def add(severity: str, what: str, where: str | list[str], count: int) -> None:
        out.append(Finding(severity, what, where if isinstance(where, str) else _where(where), int(count)))

    for check in (_shard_findings, _key_findings, _part_findings, _attribute_findings, _consistency_findings):
        check(ctx, t, add)
    return out


def _shard_findings(ctx: AuditContext, t: dict[str, pa.Table], add: _Add) -> None:
    cfg = ctx.cfg
    by_status: dict[str, list[dict]] = {}
    for r in _rows(t.get("shard_counts")):
        by_status.setdefault(r["status"], []).append(r)
    for status, sev, other in [
        ("missing label shard", "error", None),
        ("rows differ from sizes.json", "error", "images"),
        ("rows differ from labelset.json", "error", "recorded"),
        ("no image shard", "warning", None),
    ]:
        rs = by_status.get(status, [])
        if rs:
            where = [r["shard"] if other is None else f"{r['shard']} ({r['label_rows']} vs {r[other]})" for r in rs]
            add(sev, f"{status}: {len(rs)} shard(s)", where, len(rs))
    if not ctx.sizes:
        add("warning", "sizes.json not found: per-shard image counts not checked", cfg.corpus, 0)
    if not ctx.has_manifest:
        add("warning", "manifest.parquet not found: keys and row order not checked", cfg.corpus, 0)


def _key_findings(ctx: AuditContext, t: dict[str, pa.Table], add: _Add) -> None:
    kinds: dict[str, list[dict]] = {}
    for r in _rows(t.get("key_problems_by_shard")):
        if r["kind"] == "missing" and not r["label_file"]:
            continue  # already reported as a missing label shard
        kinds.setdefault(r["kind"], []).append(r)
    for kind, what in [
        ("missing", "image keys with no label row (in label shards that exist)"),
        ("extra", "label keys that are not in the image manifest"),
        ("misordered", "label rows not at their image's shard/index (order differs from the image shard)"),
    ]:
        rs = kinds.get(kind, [])
        if rs:
            where = [f"{r['shard']} ({r['images']}, first row {r['first_row']})" for r in rs]
            add("error", what, where, sum(r["images"] for r in rs))
    dups = _rows(t.get("duplicate_keys"))
    if dups:
        add("error", "duplicate keys in the label set", [d["key"] for d in dups], len(dups))


def _part_findings(ctx: AuditContext, t: dict[str, pa.Table], add: _Add) -> None:
    cfg = ctx.cfg
    cov = {r["part"]: r for r in _rows(t.get("part_coverage"))}
    order = [p for p in cfg.vertical_order if p in cov and cov[p]["mean_row"] is not None]
    wrong = [(a, b) for i, a in enumerate(order) for b in order[i + 1 :] if cov[a]["mean_row"] > cov[b]["mean_row"]]
    if wrong:
        where = [f"{a} ({cov[a]['mean_row']:.2f}) below {b} ({cov[b]['mean_row']:.2f})" for a, b in wrong]
        add("error", "mean vertical position of parts out of anatomical order (whole label set)", where, len(wrong))
    never = [p for p, r in cov.items() if r["present_share"] < 0.001]
    if never:
        add("warning", "part classes (almost) never predicted (< 0.1% of images)", never, len(never))
    shards = _rows(t.get("part_order_by_shard"))
    bad = [r for r in shards if r["implausible_share"] > cfg.implausible_shard_share]
    if bad:
        what = (
            f"shards where most part maps are anatomically implausible (> {cfg.implausible_shard_share:.0%} of "
            "images; e.g. head below shoes: a flipped or misaligned part map)"
        )
        add("error", what, [f"{r['shard']} ({r['implausible_share']:.0%})" for r in bad], len(bad))
    n_bad = sum(r["implausible"] for r in shards)
    if n_bad:
        share = n_bad / max(sum(r["images"] for r in shards), 1)
        what = (
            f"images with an anatomically implausible part order ({share:.1%}; margin {cfg.order_margin:.0%} of height)"
        )
        add("warning" if share > 0.1 else "info", what, "part_order_examples", n_bad)


def _attribute_findings(ctx: AuditContext, t: dict[str, pa.Table], add: _Add) -> None:
    """Attribute rates and certainty, foreground share, part confidences."""
    cfg = ctx.cfg
    rates = _rows(t.get("attribute_rates"))
    const = [r["attribute"] for r in rates if r["positive_rate"] < 0.001 or r["positive_rate"] > 0.999]
    if const:
        add("warning", "attributes predicted (almost) never or always (< 0.1% or > 99.9% positive)", const, len(const))
    unsure = [r["attribute"] for r in rates if r["uncertain_share"] > 0.5]
    if unsure:
        add("warning", f"attributes uncertain (|2p-1| < {cfg.uncertain_margin}) for most images", unsure, len(unsure))
    for c in _rows(t.get("image_confidence")):
        share = c["low_confidence_share"]
        what = f"low-confidence images ({share:.1%}: mean |2p-1| over attributes < {cfg.low_confidence})"
        add("warning" if share > 0.25 else "info", what, "image_confidence", c["low_confidence_images"])
    for f in _rows(t.get("fg_ratio_stats")):
        if f["invalid"]:
            add("error", "fg_ratio outside 0..1 or NaN", "fg_ratio_stats", f["invalid"])
        if f["empty_share"] > 0.05:
            what = f"images with (almost) no foreground ({f['empty_share']:.1%} with fg_ratio < 0.02)"
            add("warning", what, "fg_ratio_hist", round(f["empty_share"] * f["images"]))
        if f["full_share"] > 0.2:
            what = (
                f"images labelled (almost) entirely person ({f['full_share']:.1%} with fg_ratio > 0.98): no background"
            )
            add("warning", what, "fg_ratio_hist", round(f["full_share"] * f["images"]))

    conf_rows = [r for r in _rows(t.get("part_confidence")) if r["id"] > 0 and r["cells"] > 0]
    weak = [r["part"] for r in conf_rows if r["share_above_threshold"] < 0.05]
    if weak:
        what = (
            f"part classes whose cells almost never reach confidence {cfg.part_conf_threshold} (< 5%): the part "
            "loss ignores them" + (" - every part class, so loss/part will be 0" if len(weak) == len(conf_rows) else "")
        )
        add("warning", what, weak, len(weak))


def _consistency_findings(ctx: AuditContext, t: dict[str, pa.Table], add: _Add) -> None:
    for r in _rows(t.get("summary_consistency")):
        for col, what in [
            ("bad_length", "part_map length differs from the grid in labelset.json"),
            ("bad_class", "part_map holds class ids outside the part vocabulary"),
            ("area_mismatch", "area_<part> columns disagree with the part map (sampled rows)"),
            ("row_mismatch", "row_<part> columns disagree with the part map (sampled rows)"),
        ]:
            if r[col]:
                add("error", what, f"{r['shard']} (first {r['rows']} rows checked)", r[col])
