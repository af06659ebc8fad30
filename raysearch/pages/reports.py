"""Report pages of the evaluations and of an activation: `--report DIR` writes DIR/index.html (one
self-contained file: plots and thumbnails embedded) and DIR/summary.json (the figures it shows).

    copy        metrics, precision-recall curve, score histograms with the P90 threshold,
                the worst misses and the strongest false positives (query beside its results)
    cmc         CMC values and curve, histograms, misses and false positives
    landmarks   mAP / mP@k per protocol, histograms, the queries with the lowest AP
    ann         recall@k and latency per nprobe, table and plots
    activation  per image: original, activated, amplified difference, PSNR and SSIM; recall@1 of
                edited copies, passive vs activated, once `raysearch eval activation` measured it

The pages read what the evaluations return (their report objects) and what `raysearch activate`
writes (activate.json and the report table); they compute no metric of their own beyond the P90
threshold of the histograms.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from raysearch import storage
from raysearch.activate.pipeline import DONE_FILE, read_report
from raysearch.evaluate.activation import ActivationEvalReport
from raysearch.evaluate.ann import AnnEvalReport
from raysearch.evaluate.cmc import CmcEvalReport
from raysearch.evaluate.copy import CopyEvalReport
from raysearch.evaluate.landmarks import LandmarkEvalReport
from raysearch.evaluate.queries import TopResults, key_function, list_source
from raysearch.formats.embeddings import list_parts, read_part, resolve_embeddings_folder
from raysearch.images import DecodeError, decode_image
from raysearch.metrics import retrieval as M
from raysearch.pages import plots
from raysearch.pages.render import Thumbnails, render, thumbnail_array_uri, write_page
from raysearch.search import Searcher
from raysearch.version import __version__

PAGE = "index.html"
SUMMARY = "summary.json"
GALLERY_SIZE = 12            # items per gallery (worst misses, false positives)
RESULTS_SHOWN = 4            # results beside each gallery query
MAX_ACTIVATION_IMAGES = 48   # images shown on an activation page (all are in its table of means)


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if isinstance(value, (float, np.floating)):
        return f"{value:.{digits}f}"
    return str(value)


def _json_default(value: Any) -> Any:
    if hasattr(value, "tolist"):      # numpy scalars and arrays
        return value.tolist()
    if isinstance(value, set):
        return sorted(value)
    return str(value)


def _write(report_dir: str, title: str, subtitle: str, summary: dict, **sections: Any) -> str:
    """Write report_dir/summary.json, then report_dir/index.html (last: a page that exists has its
    figures beside it). Returns the page's path."""
    html = render("report.html.j2", title=title, subtitle=subtitle, version=__version__,
                  tables=sections.get("tables", []), figures=sections.get("figures", []),
                  galleries=sections.get("galleries", []))
    text = json.dumps(summary, indent=2, default=_json_default, allow_nan=True) + "\n"
    storage.atomic_write(storage.join(report_dir, SUMMARY), text.encode("utf-8"))
    return write_page(storage.join(report_dir, PAGE), html)


# ---------------------------------------------------------------------------------------------
# Where the pictures are: query images by id, references by match key
# ---------------------------------------------------------------------------------------------


def query_uris(queries: str) -> dict[str, str]:
    """image_id -> uri of every image of a query SOURCE or embeddings folder (as the evaluation
    listed them)."""
    folder = resolve_embeddings_folder(queries)
    if folder is None:
        ids, uris = list_source(queries)
        return dict(zip(ids, uris))
    out: dict[str, str] = {}
    for part in list_parts(folder, "parts"):
        tbl = read_part(part, ["image_id", "uri"])
        out.update(zip(tbl.column("image_id").to_pylist(), tbl.column("uri").to_pylist()))
    return out


def reference_uris(searcher: Searcher, keys: set[str], match_ids: str) -> dict[str, tuple[str, str]]:
    """Match key -> (image_id, uri) of the indexed images whose key is in `keys` (one pass over the
    id maps; for the few expected references a gallery shows that no result list holds)."""
    if not keys:
        return {}
    keyf = key_function(match_ids)
    out: dict[str, tuple[str, str]] = {}
    for id_map in searcher.id_maps:
        for image_id, uri in zip(id_map.image_ids.to_pylist(), id_map.uris.to_pylist()):
            key = keyf(image_id)
            if key in keys:
                out.setdefault(key, (image_id, uri))
    return out


def _result_cards(top: TopResults, row: int, thumbs: Thumbnails, n: int = RESULTS_SHOWN,
                  junk: np.ndarray | None = None) -> list[dict]:
    cards = []
    for j in range(min(n, top.image_ids.shape[1])):
        if top.image_ids[row, j] is None:
            break
        kind = "correct" if top.correct[row, j] else ("junk" if junk is not None and junk[row, j] else "wrong")
        cards.append({"src": thumbs(top.uris[row, j]), "kind": kind, "alt": str(top.image_ids[row, j]),
                      "lines": [f"#{j + 1} {top.image_ids[row, j]}", f"score {top.scores[row, j]:.4f}",
                                {"correct": "true match", "junk": "junk"}.get(kind, "false match")]})
    return cards


def _query_card(top: TopResults, row: int, uris: dict[str, str], thumbs: Thumbnails) -> dict:
    qid = top.query_ids[row]
    return {"src": thumbs(uris.get(qid)), "kind": "query", "alt": f"query {qid}", "lines": [f"query {qid}"]}


def _expected_cards(keys: Sequence[str], refs: dict[str, tuple[str, str]], thumbs: Thumbnails, limit: int = 2) -> list[dict]:
    cards = []
    for key in list(keys)[:limit]:
        image_id, uri = refs.get(key, (key, None))
        cards.append({"src": thumbs(uri), "kind": "correct", "alt": f"expected {image_id}",
                      "lines": [f"expected {image_id}", "" if uri else "not in the index"]})
    return cards


def _false_positive_gallery(top: TopResults, uris: dict[str, str], thumbs: Thumbnails,
                            expected: Sequence[Sequence[str]], refs: dict[str, tuple[str, str]],
                            junk: np.ndarray | None = None) -> dict:
    """The highest-scoring results that are not true matches (nor junk), each beside its query and
    what the query should have found."""
    wrong = ~top.correct & np.isfinite(top.scores)
    if junk is not None:
        wrong &= ~junk
    rows, cols = np.nonzero(wrong)
    order = np.argsort(-top.scores[rows, cols], kind="stable")[:GALLERY_SIZE]
    items = []
    for i in order:
        q, j = int(rows[i]), int(cols[i])
        images = [_query_card(top, q, uris, thumbs),
                  {"src": thumbs(top.uris[q, j]), "kind": "wrong", "alt": str(top.image_ids[q, j]),
                   "lines": [f"#{j + 1} {top.image_ids[q, j]}", f"score {top.scores[q, j]:.4f}", "false match"]}]
        images += _expected_cards(expected[q], refs, thumbs)
        items.append({"title": top.query_ids[q], "lines": [f"score {top.scores[q, j]:.4f} at rank {j + 1}"],
                      "images": images})
    return {"name": "false-positives", "title": f"Strongest false positives ({len(items)})",
            "note": "Results that are not true matches, highest score first, beside their query and the "
                    "reference it should have found (green).", "items": items}


def _histogram_figure(top: TopResults, junk: np.ndarray | None, threshold: float | None) -> dict:
    valid = np.isfinite(top.scores) & ~(junk if junk is not None else np.zeros_like(top.correct))
    return {"title": "score histograms", "src": plots.score_histogram_plot(
        top.scores[valid & top.correct], top.scores[valid & ~top.correct], threshold,
        f"Scores of the first {top.scores.shape[1]} results: true and false matches")}


# ---------------------------------------------------------------------------------------------
# eval copy
# ---------------------------------------------------------------------------------------------


def write_copy_report(report_dir: str, report: CopyEvalReport, queries: str, searcher: Searcher,
                      match_ids: str = "name") -> str:
    """The copy-detection page of `report` in `report_dir`; `queries` is the query SOURCE (or
    embeddings folder) the evaluation embedded. Returns the page's path."""
    if report.top is None:
        raise ValueError("this CopyEvalReport keeps no per-query results (made by an older raysearch?)")
    m, top, preds = report.metrics, report.top, report.predictions
    gt = set(report.ground_truth)
    is_match = np.fromiter(((q, r) in gt for q, r in zip(preds.query_ids.tolist(), preds.reference_ids.tolist())),
                           dtype=bool, count=len(preds))
    figures = [
        {"title": "precision-recall", "src": plots.precision_recall_plot(m.precisions, m.recalls, m.recall_at_p90, m.threshold_at_p90)},
        {"title": "score histograms", "src": plots.score_histogram_plot(
            preds.scores[is_match], preds.scores[~is_match], m.threshold_at_p90, "Scores of pooled predictions")},
    ]
    expected: dict[str, list[str]] = {}
    for q, r in report.ground_truth:
        expected.setdefault(q, []).append(r)
    rows_expected = [expected.get(k, []) for k in top.query_keys]
    missed = _worst_misses(top, [i for i, refs in enumerate(rows_expected) if refs and not top.correct[i, 0]])
    wanted = {r for i in missed for r in rows_expected[i]} | {r for refs in rows_expected for r in refs[:1]}
    refs = reference_uris(searcher, wanted, match_ids)
    uris, thumbs = query_uris(queries), Thumbnails()
    galleries = [_misses_gallery(top, missed, rows_expected, refs, uris, thumbs),
                 _false_positive_gallery(top, uris, thumbs, rows_expected, refs)]
    tables = [{"title": "Copy detection (ISC2021 micro-AP)", "columns": [], "rows": [
        ["micro-AP", _fmt(m.average_precision)],
        ["recall at precision 0.9", _fmt(m.recall_at_p90)],
        ["threshold at precision 0.9", _fmt(m.threshold_at_p90, 6)],
        ["recall@1", _fmt(m.recall_at_rank1)], ["recall@10", _fmt(m.recall_at_rank10)],
        ["queries evaluated", report.n_queries], ["ground-truth pairs", m.n_ground_truth],
        ["predictions", m.n_predictions], ["listed queries unusable", len(report.missing_queries)],
    ], "note": f"settings: {report.config}"}]
    subtitle = f"{searcher.store.index_dir} · queries {queries}"
    return _write(report_dir, "raysearch eval copy", subtitle, report.summary(),
                  tables=tables, figures=figures, galleries=galleries)


def _worst_misses(top: TopResults, rows: Sequence[int]) -> list[int]:
    """The GALLERY_SIZE worst of `rows`: never found first, then found with the lowest score; among
    equals, the more confidently wrong first result first."""
    def badness(i: int) -> tuple[float, float]:
        found = top.correct[i] & np.isfinite(top.scores[i])
        first = top.scores[i, 0] if np.isfinite(top.scores[i, 0]) else -np.inf
        return (float(top.scores[i][found].max()) if found.any() else -np.inf, -float(first))
    return sorted(rows, key=badness)[:GALLERY_SIZE]


def _misses_gallery(top: TopResults, rows: Sequence[int], expected: Sequence[Sequence[str]],
                    refs: dict[str, tuple[str, str]], uris: dict[str, str], thumbs: Thumbnails) -> dict:
    items = []
    for i in rows:
        hit = np.nonzero(top.correct[i])[0]
        where = f"found at rank {hit[0] + 1}, score {top.scores[i, hit[0]]:.4f}" if hit.size else \
            f"not in the first {top.scores.shape[1]} results"
        items.append({"title": top.query_ids[i], "lines": [where],
                      "images": [_query_card(top, i, uris, thumbs)] + _expected_cards(expected[i], refs, thumbs)
                      + _result_cards(top, i, thumbs)})
    return {"name": "misses", "title": f"Worst misses ({len(items)})",
            "note": "Queries whose first result is not a true match: the query (blue), what it should have "
                    "found (green) and what it found (red: false, green: true).", "items": items}


# ---------------------------------------------------------------------------------------------
# eval cmc
# ---------------------------------------------------------------------------------------------


def write_cmc_report(report_dir: str, report: CmcEvalReport, queries: str, searcher: Searcher,
                     match_ids: str = "name") -> str:
    """The CMC page of `report` in `report_dir` (`queries`: the query SOURCE the evaluation
    embedded). Returns the page's path."""
    if report.top is None or report.first_ranks is None:
        raise ValueError("this CmcEvalReport keeps no per-query results")
    m, top = report.metrics, report.top
    threshold = plots.p90_threshold(top.correct[np.isfinite(top.scores)], top.scores[np.isfinite(top.scores)])
    figures = [{"title": "CMC", "src": plots.cmc_plot(report.first_ranks, m.depth, m.n_collection, m.fraction_ranks)},
               _histogram_figure(top, None, threshold)]
    searched = report.first_ranks[: len(top.query_ids)]
    order = sorted((i for i in range(len(searched)) if searched[i] > 1),
                   key=lambda i: (-int(min(searched[i], np.iinfo(np.int64).max)), -float(np.nan_to_num(top.scores[i, 0], nan=-np.inf))))
    missed = order[:GALLERY_SIZE]
    expected = [sorted(keys) for keys in report.correct_keys]
    refs = reference_uris(searcher, {k for i in missed for k in expected[i][:2]} | {k for e in expected for k in e[:1]}, match_ids)
    uris, thumbs = query_uris(queries), Thumbnails()
    misses = _misses_gallery(top, missed, expected, refs, uris, thumbs)
    for item, i in zip(misses["items"], missed):
        rank = int(searched[i])
        item["lines"] = [f"first correct at rank {rank}" if rank != M.NOT_FOUND else f"not in the first {m.depth} results"]
    tables = [{"title": "CMC", "columns": ["", "CMC"], "rows":
               [[f"rank {r}", _fmt(v)] for r, v in m.at_rank.items()]
               + [[f"top {100 * f:g}% (rank {m.fraction_ranks[f]})", _fmt(v)] for f, v in m.at_fraction.items()],
               "note": f"{m.n_queries} labelled queries, {m.n_collection} references, rankings {m.depth} deep; "
                       f"{len(report.missing_queries)} labelled queries unusable"}]
    return _write(report_dir, "raysearch eval cmc", f"{searcher.store.index_dir} · queries {queries}", report.summary(),
                  tables=tables, figures=figures,
                  galleries=[misses, _false_positive_gallery(top, uris, thumbs, expected, refs)])


# ---------------------------------------------------------------------------------------------
# eval landmarks
# ---------------------------------------------------------------------------------------------


def write_landmarks_report(report_dir: str, report: LandmarkEvalReport, searcher: Searcher) -> str:
    """The Revisited Oxford / Paris page of `report` in `report_dir`. Returns the page's path."""
    if report.top is None or report.query_uris is None:
        raise ValueError("this LandmarkEvalReport keeps no per-query results")
    m, top, junk = report.metrics, report.top, report.junk
    valid = np.isfinite(top.scores) & ~junk
    threshold = plots.p90_threshold(top.correct[valid], top.scores[valid])
    uris = dict(zip(top.query_ids, report.query_uris))
    thumbs = Thumbnails()
    aps = m.aps["medium"]
    order = [int(i) for i in np.argsort(np.where(np.isnan(aps), np.inf, aps), kind="stable") if not np.isnan(aps[i])]
    items = [{"title": top.query_ids[i], "lines": [f"AP (medium) {aps[i]:.4f}"],
              "images": [_query_card(top, i, uris, thumbs)] + _result_cards(top, i, thumbs, 6, junk)}
             for i in order[:GALLERY_SIZE]]
    worst = {"name": "misses", "title": f"Queries with the lowest AP ({len(items)})", "items": items,
             "note": "Medium protocol: green a positive (easy or hard), yellow junk, red neither."}
    kappas = list(next(iter(m.mean_precision_at.values())).keys())
    tables = [{"title": "Revisited Oxford / Paris (revisitop)", "columns": ["protocol", "mAP"] + [f"mP@{k}" for k in kappas] + ["queries"],
               "rows": [[p, _fmt(100 * m.map[p], 2)] + [_fmt(100 * m.mean_precision_at[p][k], 2) for k in kappas] + [m.n_queries[p]]
                        for p in m.map],
               "note": f"rankings {report.depth} deep; {report.not_in_imlist} indexed images outside imlist, "
                       f"{report.imlist_not_indexed} imlist images not indexed"}]
    empty: list[list[str]] = [[] for _ in top.query_ids]
    return _write(report_dir, "raysearch eval landmarks", searcher.store.index_dir, report.summary(),
                  tables=tables, figures=[_histogram_figure(top, junk, threshold)],
                  galleries=[worst, _false_positive_gallery(top, uris, thumbs, empty, {}, junk)])


# ---------------------------------------------------------------------------------------------
# eval ann
# ---------------------------------------------------------------------------------------------


def write_ann_report(report_dir: str, report: AnnEvalReport, ks: Sequence[int], tuned_nprobe: int | None = None,
                     index_dir: str = "") -> str:
    """The ANN page: recall@k and latency per nprobe, as a table and two plots."""
    recall_cols = [f"recall@{k}" for k in ks]
    rows = [[_fmt(r["nprobe"]) if r["nprobe"] is not None else "exact"] + [_fmt(r.get(c)) for c in recall_cols]
            + [_fmt(r["ms_per_query_batch"], 3), _fmt(r["ms_per_query_single_median"], 3)] for r in report.rows]
    tables = [{"title": f"{report.factory}: {report.n_vectors} vectors, {report.n_queries} queries",
               "columns": ["nprobe"] + recall_cols + ["ms/query batched", "ms/query single"], "rows": rows,
               "note": f"exact search of the true neighbours took {report.exact_seconds:.3f} s"
                       + (f"; the index's tuned nprobe is {tuned_nprobe}" if tuned_nprobe else "")}]
    figures = []
    if any(r["nprobe"] is not None for r in report.rows):
        figures = [{"title": "recall vs nprobe", "src": plots.ann_recall_plot(report.rows, ks, tuned_nprobe)},
                   {"title": "latency vs nprobe", "src": plots.ann_latency_plot(report.rows, tuned_nprobe)}]
    return _write(report_dir, "raysearch eval ann", index_dir, report.summary(), tables=tables, figures=figures)


# ---------------------------------------------------------------------------------------------
# activate / eval activation
# ---------------------------------------------------------------------------------------------


def amplified_difference(original: np.ndarray, activated: np.ndarray) -> tuple[np.ndarray, float]:
    """|activated - original| (H, W, 3) uint8 scaled so that its 99.5th percentile is white, and the
    gain used; a perturbation of a few levels is invisible unscaled."""
    if original.shape != activated.shape:
        raise ValueError(f"original {original.shape} and activated {activated.shape} differ in shape")
    diff = np.abs(activated.astype(np.int16) - original.astype(np.int16)).astype(np.float32)
    top = float(np.percentile(diff, 99.5)) if diff.size else 0.0
    gain = 255.0 / max(top, 1.0)
    return np.clip(diff * gain, 0, 255).astype(np.uint8), gain


def activation_record(activated_dir: str) -> dict:
    """activate.json of a finished activation (counts, averages, settings). Raises
    FileNotFoundError when the folder holds no finished activation."""
    path = storage.join(activated_dir, DONE_FILE)
    if not storage.exists(path):
        raise FileNotFoundError(f"{activated_dir} holds no finished activation ({DONE_FILE} is missing)")
    return storage.read_json(path)


def _folder(uri: str) -> str:
    return os.path.abspath(uri) if storage.is_local(uri) else uri.rstrip("/")


def activation_fingerprint(activated_dir: str) -> str:
    """A digest of an activation's results (every report row): it changes exactly when the
    activated images do (activate.json alone is rewritten by a rerun that changes nothing)."""
    rows = read_report(activated_dir).select(["image_id", "output", "psnr", "ssim", "linf", "cos_after"]).to_pylist()
    return hashlib.sha256(json.dumps(rows, sort_keys=True, default=str).encode()).hexdigest()


def evaluation_record(evaluation: ActivationEvalReport, activated_dir: str) -> dict:
    """What a report keeps of an `eval activation`: its figures, per-image hits, and which
    activation (folder and `activation_fingerprint`) it measured."""
    activation_record(activated_dir)   # a finished activation, or FileNotFoundError
    return {**evaluation.to_dict(), "per_image": evaluation.per_image, "activated_dir": activated_dir,
            "activation_fingerprint": activation_fingerprint(activated_dir)}


def earlier_evaluation(report_dir: str, activated_dir: str) -> dict | None:
    """The evaluation an earlier `eval activation --report report_dir` kept, when it measured this
    very activation (same folder, same results); else None."""
    path = storage.join(report_dir, SUMMARY)
    if not storage.exists(path):
        return None
    kept = (storage.read_json(path) or {}).get("evaluation")
    if not kept or _folder(kept.get("activated_dir") or "") != _folder(activated_dir):
        return None
    return kept if kept.get("activation_fingerprint") == activation_fingerprint(activated_dir) else None


def write_activation_report(report_dir: str, activated_dir: str, evaluation: ActivationEvalReport | dict | None = None) -> str:
    """The activation page in `report_dir`: the run's settings and averages, per image the
    original, the activated image and their amplified difference with PSNR and SSIM, and, with an
    `evaluation` (an ActivationEvalReport, or the record an earlier one left in report_dir),
    recall@1 of edited copies, passive vs activated. Returns the page's path."""
    record = activation_record(activated_dir)
    if isinstance(evaluation, ActivationEvalReport):
        evaluation = evaluation_record(evaluation, activated_dir)
    elif evaluation is None:
        evaluation = earlier_evaluation(report_dir, activated_dir)
    rows = read_report(activated_dir).to_pylist()
    settings = record.get("settings", {})
    tables = [{"title": "Activation", "columns": [], "rows": [
        ["images activated", f"{record.get('n_activated')} of {record.get('n_images')} ({record.get('n_errors')} errors)"],
        ["PSNR mean / min (dB)", f"{_fmt(record.get('mean_psnr'), 2)} / {_fmt(record.get('min_psnr'), 2)}"],
        ["SSIM mean", _fmt(record.get("mean_ssim"))],
        ["cosine to target before -> after", f"{_fmt(record.get('mean_cos_before'))} -> {_fmt(record.get('mean_cos_after'))}"],
        ["settings", ", ".join(f"{k}={v}" for k, v in settings.items())],
    ]}]
    figures = []
    hits: dict[str, tuple[int, int, int]] = {}
    if evaluation:
        recall = evaluation["recall_at_1"]
        tables.append({"title": f"Recall@1 of edited copies ({evaluation['n_images']} images, nprobe {evaluation.get('nprobe')})",
                       "columns": ["edit", "passive", "activated"],
                       "rows": [[e, _fmt(recall["passive"][e], 3), _fmt(recall["activated"].get(e), 3)] for e in recall["passive"]]
                       + [["mean (edits)", _fmt(evaluation["mean_passive"], 3), _fmt(evaluation["mean_activated"], 3)],
                          ["ratio", "", _fmt(evaluation["ratio"], 2)]]})
        figures.append({"title": "recall per edit", "src": plots.activation_recall_plot(recall["passive"], recall["activated"])})
        per = evaluation.get("per_image") or {}
        edits = [e for e in recall["passive"]]
        for i, image_id in enumerate(per.get("image_id", [])):
            hits[image_id] = (sum(bool(per[f"passive_{e}"][i]) for e in edits),
                              sum(bool(per[f"activated_{e}"][i]) for e in edits), len(edits))
    items = []
    for r in rows[:MAX_ACTIVATION_IMAGES]:
        try:
            original = decode_image(storage.read_bytes(r["uri"]))
            activated = decode_image(storage.read_bytes(r["output"]))
            difference, gain = amplified_difference(original, activated)
        except (OSError, DecodeError, ValueError) as e:
            items.append({"title": r["image_id"], "lines": [f"cannot be shown: {e}"], "images": []})
            continue
        lines = [f"PSNR {r['psnr']:.2f} dB", f"SSIM {r['ssim']:.4f}", f"largest change {r['linf']}",
                 f"cosine to target {r['cos_before']:.3f} -> {r['cos_after']:.3f}"]
        if r["image_id"] in hits:
            p, a, n = hits[r["image_id"]]
            lines.append(f"found at rank 1: passive {p}/{n}, activated {a}/{n} edits")
        items.append({"title": r["image_id"], "lines": lines, "images": [
            {"src": thumbnail_array_uri(original), "kind": "", "alt": f"original {r['image_id']}", "lines": ["original"]},
            {"src": thumbnail_array_uri(activated), "kind": "query", "alt": f"activated {r['image_id']}", "lines": ["activated"]},
            {"src": thumbnail_array_uri(difference), "kind": "", "alt": f"difference {r['image_id']}",
             "lines": [f"difference x{gain:.0f}"]},
        ]})
    gallery = {"name": "images", "title": f"Images ({min(len(rows), MAX_ACTIVATION_IMAGES)} of {len(rows)})", "items": items,
               "note": "The difference is |activated - original|, amplified so that its 99.5th percentile is white."}
    summary = {"activation": record, "evaluation": evaluation}
    return _write(report_dir, "raysearch activate", activated_dir, summary,
                  tables=tables, figures=figures, galleries=[gallery])

