"""GLDv2 landmark retrieval: the challenge's ground truth, submission files and metrics.

Ground truth (`retrieval_solution_v2.1.csv`, cvdfoundation/google-landmark): a header, then rows
`id,images,Usage`: a test image id, the space-separated ids of the index images that show its
landmark, and Usage "Public" or "Private" (the challenge's two leaderboards). Rows with Usage
"Ignored" are not scored: no prediction for them counts. As in the challenge's reader
(`dataset_file_io.py`), a scored row's images field is split on single spaces: a Public or Private
row whose field is "None" or empty keeps that one token as its ground truth, so it scores AP 0 and
stays in the denominator, and a repeated id counts twice in |G_q|.

Metrics, as the challenge's scoring code computes them (tensorflow/models, DELF's
`google_landmarks_dataset/metrics.py`), for each subset separately:

    mAP@100   for every scored test image q with ground truth G_q and ranked predictions p_1..p_n:
              AP(q) = sum_{i <= min(n, 100)} [p_i in G_q and p_i not predicted before] * P(i)
                      / min(|G_q|, 100),  P(i) = (correct distinct predictions up to i) / i;
              mAP@100 = sum_q AP(q) / (number of scored test images in the subset):
              a test image without predictions counts as AP 0.
    mP@k      the mean over scored test images of P(k) (repeated predictions do not count twice).
    position  the mean and median rank of the first correct prediction (101 when none in the top 100).

Predictions are written in the challenge's submission format: `id,images` with the top 100 index
ids space-separated; read back as the challenge reads them (split on single spaces, one trailing
empty token dropped, an empty field = no prediction).

Where raysearch is stricter than the challenge's code it says so: a test image listed twice in the
solution is refused (the challenge's reader keeps the last row), and predictions for test images
the solution does not list are reported and left out (the challenge's scorer refuses the file).
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass

import numpy as np

from raysearch import storage

MAX_PREDICTIONS = 100
USAGES = ("Public", "Private")
PRECISION_RANKS = (1, 5, 10, 50, 100)


# ---------------------------------------------------------------------------------------------
# Ground truth
# ---------------------------------------------------------------------------------------------


@dataclass
class RetrievalSolution:
    """The scored test images of each subset (id -> ground-truth index ids) and the ignored ones."""

    public: dict[str, list[str]]
    private: dict[str, list[str]]
    ignored: list[str]

    def subset(self, usage: str) -> dict[str, list[str]]:
        """Test id -> ground-truth index ids of "Public", "Private" or "All" (both); ValueError otherwise."""
        if usage == "Public":
            return self.public
        if usage == "Private":
            return self.private
        if usage == "All":
            return {**self.public, **self.private}
        raise ValueError(f"usage must be Public, Private or All, got {usage!r}")

    def scored_ids(self) -> set[str]:
        """The ids of every scored test image, Public and Private."""
        return set(self.public) | set(self.private)


def read_retrieval_solution(uri: str) -> RetrievalSolution:
    """Read retrieval_solution_v2.1.csv (see the module docstring). Raises ValueError for a row
    with an unknown Usage or a missing column, FileNotFoundError for a missing file."""
    try:
        text = storage.read_bytes(uri).decode("utf-8-sig")
    except FileNotFoundError as e:
        raise FileNotFoundError(f"GLDv2 retrieval ground truth not found: {uri}") from e
    rows = csv.reader(io.StringIO(text))
    header = next(rows, None)
    if header is None or [h.strip() for h in header[:3]] != ["id", "images", "Usage"]:
        raise ValueError(f"{uri} is not a GLDv2 retrieval solution: the header must be id,images,Usage, got {header}")
    public: dict[str, list[str]] = {}
    private: dict[str, list[str]] = {}
    ignored: list[str] = []
    for line_no, row in enumerate(rows, start=2):
        if not row or all(not f.strip() for f in row):
            continue
        if len(row) < 3:
            raise ValueError(f"{uri}, line {line_no}: expected id,images,Usage, got {row}")
        test_id, images, usage = row[0].strip(), row[1], row[2].strip()
        if usage == "Ignored":
            ignored.append(test_id)
            continue
        if usage not in USAGES:
            raise ValueError(f"{uri}, line {line_no}: test image {test_id} has unknown Usage {usage!r}")
        target = public if usage == "Public" else private
        if test_id in public or test_id in private:
            raise ValueError(f"{uri}, line {line_no}: test image {test_id} is listed twice "
                             "(the challenge's reader would keep the last row; raysearch refuses the file)")
        target[test_id] = images.split(" ")
    if not public and not private:
        raise ValueError(f"{uri} scores no test image (every row is ignored)")
    return RetrievalSolution(public, private, ignored)


def write_retrieval_predictions(uri: str, predictions: dict[str, list[str]]) -> None:
    """Write `id,images` (the challenge's submission format), top 100 per test image."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["id", "images"])
    for test_id, ranked in predictions.items():
        writer.writerow([test_id, " ".join(ranked[:MAX_PREDICTIONS])])
    storage.atomic_write(uri, buf.getvalue().encode("utf-8"))


def read_retrieval_predictions(uri: str) -> dict[str, list[str]]:
    """Read an `id,images` predictions CSV (header first). Raises ValueError for a repeated id."""
    rows = csv.reader(io.StringIO(storage.read_bytes(uri).decode("utf-8-sig")))
    next(rows, None)
    out: dict[str, list[str]] = {}
    for row in rows:
        if not row:
            continue
        if row[0] in out:
            raise ValueError(f"{uri}: test image {row[0]} is repeated")
        out[row[0]] = split_prediction(row[1] if len(row) > 1 else "")
    return out


def split_prediction(images: str) -> list[str]:
    """A submission's images field as the challenge splits it: on single spaces, one trailing
    empty token dropped; an empty field is no prediction."""
    if not images:
        return []
    tokens = images.split(" ")
    return tokens[:-1] if not tokens[-1] else tokens


# ---------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------


def average_precision(ranked: list[str], relevant: set[str] | list[str], max_predictions: int = MAX_PREDICTIONS) -> float:
    """AP@max_predictions of one ranking (see the module docstring). `relevant` must be non-empty;
    its length, repeats included, is |G_q|."""
    size = len(relevant)
    relevant = set(relevant)
    if not relevant:
        raise ValueError("a scored test image needs at least one ground-truth index image")
    seen: set[str] = set()
    correct = 0
    total = 0.0
    for i, image_id in enumerate(ranked[:max_predictions]):
        if image_id in seen:
            continue
        seen.add(image_id)
        if image_id in relevant:
            correct += 1
            total += correct / (i + 1)
    return total / min(size, max_predictions)


def precisions_at(ranked: list[str], relevant: set[str] | list[str], max_predictions: int = MAX_PREDICTIONS) -> np.ndarray:
    """P(1..max_predictions): distinct correct predictions up to rank k, over k. (max_predictions,)"""
    relevant = set(relevant)
    seen: set[str] = set()
    hits = np.zeros(max_predictions, np.float64)
    for i, image_id in enumerate(ranked[:max_predictions]):
        if image_id not in seen:
            seen.add(image_id)
            hits[i] = image_id in relevant
    return np.cumsum(hits) / np.arange(1, max_predictions + 1)


def first_correct_position(ranked: list[str], relevant: set[str] | list[str], max_predictions: int = MAX_PREDICTIONS) -> int:
    """1-based rank of the first correct prediction; max_predictions + 1 when there is none."""
    relevant = set(relevant)
    for i, image_id in enumerate(ranked[:max_predictions]):
        if image_id in relevant:
            return i + 1
    return max_predictions + 1


@dataclass
class RetrievalMetrics:
    """The challenge's metrics over one subset: mAP@100, mP@k by k, and the mean and median
    1-based position of the first correct prediction (101 when none is in the top 100)."""

    n_queries: int                   # scored test images of the subset
    n_predicted: int                 # of which some prediction was made
    map_at_100: float
    precision_at: dict[int, float]
    mean_position: float
    median_position: float

    def summary(self) -> dict:
        """The metrics as a JSON-ready dict ("map@100", "mP@<k>", positions and counts)."""
        return {"n_queries": self.n_queries, "n_predicted": self.n_predicted, "map@100": self.map_at_100,
                **{f"mP@{k}": v for k, v in self.precision_at.items()},
                "mean_position": self.mean_position, "median_position": self.median_position}


def unscored_predictions(predictions: dict[str, list[str]], solution: RetrievalSolution) -> list[str]:
    """Predicted test ids the solution does not list at all (neither scored nor ignored), sorted:
    the challenge's scorer refuses a file holding them; raysearch leaves them out and reports them."""
    known = solution.scored_ids() | set(solution.ignored)
    return sorted(q for q in predictions if q not in known)


def retrieval_metrics(predictions: dict[str, list[str]], solution: dict[str, list[str]],
                      max_predictions: int = MAX_PREDICTIONS, ranks: tuple[int, ...] = PRECISION_RANKS) -> RetrievalMetrics:
    """The challenge's metrics over every test image of `solution` (one subset). Predictions for
    images outside it are ignored; scored images without predictions count as misses."""
    if not solution:
        raise ValueError("the ground truth subset is empty")
    aps, precisions, positions = [], [], []
    for test_id, relevant in solution.items():
        ranked = predictions.get(test_id, [])
        aps.append(average_precision(ranked, relevant, max_predictions))
        precisions.append(precisions_at(ranked, relevant, max_predictions))
        positions.append(first_correct_position(ranked, relevant, max_predictions))
    mean_p = np.mean(precisions, axis=0)
    return RetrievalMetrics(
        n_queries=len(solution), n_predicted=sum(1 for q in solution if predictions.get(q)),
        map_at_100=float(np.mean(aps)),
        precision_at={k: float(mean_p[k - 1]) for k in ranks if k <= max_predictions},
        mean_position=float(np.mean(positions)), median_position=float(np.median(positions)),
    )
