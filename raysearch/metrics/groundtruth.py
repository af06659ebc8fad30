"""Reading the field's ground-truth files and writing predictions.

- DISC21 / ISC2021 ground truth: CSV `query_id,reference_id` (header optional); a query without a
  match has an empty reference (`Q00012,`). Every listed query is evaluated; only rows with a
  reference are positives.
- ISC2021 predictions: CSV `query_id,reference_id,score` with a header.
- Revisited Oxford / Paris: `gnd_roxford5k.pkl` / `gnd_rparis6k.pkl`, a pickled dict with
  'imlist' (database image names), 'qimlist' (query image names) and 'gnd' (one dict per query
  with 'bbx' [x1, y1, x2, y2] and 'easy', 'hard', 'junk' lists of 0-based imlist indices). The
  pickle is read with an unpickler that only builds lists, dicts, strings, numbers and numpy
  arrays, so a foreign file cannot run code.
- Labels (CMC): CSV `query_id,reference_id`, one row per correct pair (a query may have several);
  an empty reference marks a query with no correct reference (it is left out).

Ids are compared after `id_key` when matching by name: directories and extension dropped, and
purely numeric names compared as numbers ("00042" == "42").
"""

from __future__ import annotations

import csv
import io
import pickle
import posixpath
from dataclasses import dataclass

import numpy as np

from raysearch import storage
from raysearch.metrics.retrieval import Predictions

GT_HEADER = ("query_id", "reference_id")
PREDICTIONS_HEADER = ("query_id", "reference_id", "score")


def id_key(image_id: str) -> str:
    """The name an id is matched by: basename without extension; digits-only names as numbers."""
    name = posixpath.basename(str(image_id).replace("\\", "/").strip())
    dot = name.rfind(".")
    if dot > 0 and name[dot + 1:].lower() in {"jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif"}:
        name = name[:dot]
    return str(int(name)) if name.isdigit() else name


def _read_text(uri: str, what: str) -> str:
    try:
        data = storage.read_bytes(uri)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{what} not found: {uri}") from e
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"{what} {uri} is not UTF-8 text: {e}") from e


def _rows(uri: str, what: str, header: tuple[str, ...], max_fields: int) -> list[tuple[int, list[str]]]:
    """(line number, stripped fields) of every non-empty CSV row, header row dropped."""
    out = []
    for line_no, fields in enumerate(csv.reader(io.StringIO(_read_text(uri, what))), start=1):
        fields = [f.strip() for f in fields]
        if not fields or all(not f for f in fields):
            continue
        if not out and tuple(f.lower() for f in fields[: len(header)]) == header:
            continue
        if len(fields) > max_fields:
            raise ValueError(f"{what} {uri}, line {line_no}: expected at most {max_fields} fields, got {len(fields)}")
        if not fields[0]:
            raise ValueError(f"{what} {uri}, line {line_no}: empty query id")
        out.append((line_no, fields))
    return out


@dataclass
class CopyGroundTruth:
    """query_ids: every query listed (file order, unique); pairs: (query_id, reference_id) matches."""

    query_ids: list[str]
    pairs: list[tuple[str, str]]

    @property
    def n_matching_queries(self) -> int:
        """How many listed queries have at least one matching reference."""
        return len({q for q, _ in self.pairs})

    def keyed(self) -> "CopyGroundTruth":
        """The same ground truth with every id replaced by its `id_key`."""
        return CopyGroundTruth(
            list(dict.fromkeys(id_key(q) for q in self.query_ids)),
            [(id_key(q), id_key(r)) for q, r in self.pairs],
        )


def read_copy_ground_truth(uri: str) -> CopyGroundTruth:
    """Read a DISC21-format ground truth CSV (see the module docstring)."""
    query_ids: dict[str, None] = {}
    pairs = []
    for _, fields in _rows(uri, "ground truth", GT_HEADER, 2):
        q = fields[0]
        r = fields[1] if len(fields) > 1 else ""
        query_ids.setdefault(q, None)
        if r:
            pairs.append((q, r))
    if not query_ids:
        raise ValueError(f"ground truth {uri} lists no query")
    return CopyGroundTruth(list(query_ids), pairs)


def write_predictions(uri: str, predictions: Predictions) -> None:
    """Write `query_id,reference_id,score` (header first; scores with 9 significant digits so that
    a float32 score reads back exactly)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(PREDICTIONS_HEADER)
    for q, r, s in zip(predictions.query_ids.tolist(), predictions.reference_ids.tolist(), predictions.scores.tolist()):
        writer.writerow([q, r, f"{s:.9g}"])
    storage.atomic_write(uri, buf.getvalue().encode("utf-8"))


def read_predictions(uri: str) -> Predictions:
    """Read an ISC2021 predictions CSV."""
    q, r, s = [], [], []
    for line_no, fields in _rows(uri, "predictions", PREDICTIONS_HEADER, 3):
        if len(fields) != 3 or not fields[1]:
            raise ValueError(f"predictions {uri}, line {line_no}: expected query_id,reference_id,score")
        try:
            score = float(fields[2])
        except ValueError:
            raise ValueError(f"predictions {uri}, line {line_no}: score {fields[2]!r} is not a number") from None
        q.append(fields[0])
        r.append(fields[1])
        s.append(score)
    return Predictions(np.asarray(q, dtype=object), np.asarray(r, dtype=object), np.asarray(s))


def read_labels(uri: str) -> dict[str, set[str]]:
    """query_id -> set of correct reference ids (queries whose rows all have an empty reference
    are kept with an empty set, so callers can report them)."""
    labels: dict[str, set[str]] = {}
    for _, fields in _rows(uri, "labels", GT_HEADER, 2):
        refs = labels.setdefault(fields[0], set())
        if len(fields) > 1 and fields[1]:
            refs.add(fields[1])
    if not labels:
        raise ValueError(f"labels {uri} list no query")
    return labels


# ---------------------------------------------------------------------------------------------
# Revisited Oxford / Paris
# ---------------------------------------------------------------------------------------------

# What pickles of lists, dicts and numpy arrays name, at every protocol revisitop's loader reads
# (2-5): numpy's array and scalar reconstructors and, at protocol 2, `_codecs.encode` and `bytes`,
# which turn the latin-1 text that protocol uses for bytes back into bytes. Nothing else is loaded.
_NUMPY_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("_codecs", "encode"), ("__builtin__", "bytes"), ("builtins", "bytes"),
}


class _DataOnlyUnpickler(pickle.Unpickler):
    """Loads plain data and numpy arrays only; any other global is refused by name."""

    def find_class(self, module: str, name: str):
        if (module, name) in _NUMPY_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


@dataclass
class RevisitedQuery:
    """One query of a Revisited Oxford / Paris ground truth: its qimlist name, bounding box (None
    when the file gives none) and its easy, hard and junk images as (n,) int64 imlist indices."""

    name: str
    bbx: tuple[float, float, float, float] | None   # (x1, y1, x2, y2) in the query image
    easy: np.ndarray
    hard: np.ndarray
    junk: np.ndarray

    def as_dict(self) -> dict:
        """{"easy", "hard", "junk"}: the per-query ground truth dict `revisited_metrics` reads."""
        return {"easy": self.easy, "hard": self.hard, "junk": self.junk}


@dataclass
class RevisitedGroundTruth:
    """A Revisited Oxford / Paris ground truth: imlist (database image names, in the order the
    queries' indices refer to) and the queries, in qimlist order."""

    imlist: list[str]
    queries: list[RevisitedQuery]


def _indices(value, what: str, n: int) -> np.ndarray:
    arr = np.asarray(value if value is not None else [], dtype=np.int64).ravel()
    if arr.size and (arr.min() < 0 or arr.max() >= n):
        raise ValueError(f"{what} holds indices outside 0..{n - 1}")
    return arr


def read_revisited_ground_truth(uri: str) -> RevisitedGroundTruth:
    """Read gnd_roxford5k.pkl / gnd_rparis6k.pkl (see the module docstring)."""
    try:
        data = storage.read_bytes(uri)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"ground truth not found: {uri}") from e
    try:
        cfg = _DataOnlyUnpickler(io.BytesIO(data), encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as e:
        raise ValueError(f"{uri} is not a revisitop ground-truth pickle: {e}") from e
    if not isinstance(cfg, dict) or not all(k in cfg for k in ("imlist", "qimlist", "gnd")):
        raise ValueError(f"{uri} is not a revisitop ground-truth pickle (needs 'imlist', 'qimlist' and 'gnd')")
    imlist = [str(x) for x in cfg["imlist"]]
    qimlist = [str(x) for x in cfg["qimlist"]]
    gnd = list(cfg["gnd"])
    if len(gnd) != len(qimlist):
        raise ValueError(f"{uri}: {len(gnd)} 'gnd' entries for {len(qimlist)} queries in 'qimlist'")
    n = len(imlist)
    queries = []
    for i, (name, g) in enumerate(zip(qimlist, gnd)):
        if not isinstance(g, dict):
            raise ValueError(f"{uri}: gnd[{i}] is not a dict")
        bbx = g.get("bbx")
        box = None
        if bbx is not None and len(np.asarray(bbx).ravel()) == 4:
            box = tuple(float(v) for v in np.asarray(bbx, dtype=np.float64).ravel())
        queries.append(RevisitedQuery(
            name=name, bbx=box,  # type: ignore[arg-type]
            easy=_indices(g.get("easy"), f"gnd[{i}]['easy']", n),
            hard=_indices(g.get("hard"), f"gnd[{i}]['hard']", n),
            junk=_indices(g.get("junk"), f"gnd[{i}]['junk']", n),
        ))
    return RevisitedGroundTruth(imlist, queries)
