"""Metadata of the indexed images, and filters over it.

    INDEX_DIR/fields-<key>.parquet   id (int64 vector id, sorted) and one column per metadata field

The extra columns of a .csv / .parquet list SOURCE (`ListFileSource.fields`) are joined to the
vector ids of their images when the index is built or grown, and written as one table (under a new
name each time, checksummed in the manifest, the manifest rewritten last). Searches return them
with hits, and `where` expressions select the ids a search may return:

    label == "boots"
    price < 20 and not (label in ["boots", "shoes"])
    year >= 2020 or source != "web"

The language is small and checked: comparisons (==, !=, <, <=, >, >=, in, not in) between a column
name and a literal (string, number, True/False/None, or a list of them), combined with and, or,
not and parentheses. It is parsed with Python's `ast` into a tree of those nodes only (anything
else is refused with the offending part named) and evaluated by pyarrow.compute over the fields
table; nothing is ever passed to eval(). Rows whose value is null (an image without the field)
never match a comparison.
"""

from __future__ import annotations

import ast
import io
import uuid
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from raysearch import storage
from raysearch.index.store import describe_files

FIELDS_PREFIX = "fields-"
MAX_WHERE_CHARS = 4096

_COMPARE = {ast.Eq: "equal", ast.NotEq: "not_equal", ast.Lt: "less", ast.LtE: "less_equal",
            ast.Gt: "greater", ast.GtE: "greater_equal"}
# a < col reads as col > a
_MIRROR = {"less": "greater", "less_equal": "greater_equal", "greater": "less", "greater_equal": "less_equal",
           "equal": "equal", "not_equal": "not_equal"}


def _literal(node: ast.AST, expr: str) -> Any:
    if isinstance(node, ast.Constant) and (node.value is None or isinstance(node.value, (str, int, float, bool))):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub) and isinstance(node.operand, ast.Constant) \
            and isinstance(node.operand.value, (int, float)) and not isinstance(node.operand.value, bool):
        return -node.operand.value
    raise ValueError(f"--where {expr!r}: expected a literal (string, number, True, False, None), "
                     f"got {ast.get_source_segment(expr, node) or type(node).__name__}")


class Where:
    """A parsed, checked `where` expression; `mask(table)` evaluates it over a fields table."""

    def __init__(self, expr: str):
        if not isinstance(expr, str) or not expr.strip():
            raise ValueError(f"--where must be a non-empty expression, got {expr!r}")
        if len(expr) > MAX_WHERE_CHARS:
            raise ValueError(f"--where is {len(expr)} characters long; at most {MAX_WHERE_CHARS}")
        self.expr = expr.strip()
        try:
            tree = ast.parse(self.expr, mode="eval")
        except SyntaxError as e:
            raise ValueError(f"--where {self.expr!r} is not a valid expression: {e.msg}") from None
        self.tree = tree.body
        self.columns: set[str] = set()
        self._check(self.tree)

    def _check(self, node: ast.AST) -> None:
        if isinstance(node, ast.BoolOp) and isinstance(node.op, (ast.And, ast.Or)):
            for value in node.values:
                self._check(value)
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            self._check(node.operand)
        elif isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            for op, left, right in zip(node.ops, operands, operands[1:]):
                self._comparison(op, left, right)
        else:
            part = ast.get_source_segment(self.expr, node) or type(node).__name__
            raise ValueError(f"--where {self.expr!r}: {part!r} is not allowed; use comparisons of a column "
                             "with a literal (== != < <= > >= in, not in) joined by and, or, not")

    def _comparison(self, op: ast.cmpop, left: ast.AST, right: ast.AST) -> tuple[str, str, Any]:
        """(column, pyarrow function, literal) of one comparison, after checking it."""
        if isinstance(op, (ast.In, ast.NotIn)):
            if not isinstance(left, ast.Name):
                raise ValueError(f"--where {self.expr!r}: 'in' needs a column name on its left")
            if not isinstance(right, (ast.List, ast.Tuple, ast.Set)):
                raise ValueError(f"--where {self.expr!r}: 'in' needs a list of literals on its right, e.g. [\"a\", \"b\"]")
            values = [_literal(v, self.expr) for v in right.elts]
            self.columns.add(left.id)
            return left.id, "in" if isinstance(op, ast.In) else "not_in", values
        if type(op) not in _COMPARE:
            raise ValueError(f"--where {self.expr!r}: the operator {type(op).__name__} is not allowed")
        name = _COMPARE[type(op)]
        if isinstance(left, ast.Name) and not isinstance(right, ast.Name):
            column, value = left.id, _literal(right, self.expr)
        elif isinstance(right, ast.Name) and not isinstance(left, ast.Name):
            column, value, name = right.id, _literal(left, self.expr), _MIRROR[name]
        else:
            raise ValueError(f"--where {self.expr!r}: compare a column with a literal, e.g. label == \"boots\"")
        self.columns.add(column)
        return column, name, value

    def mask(self, table: pa.Table) -> np.ndarray:
        """(rows,) bool: the rows of `table` the expression selects. Raises ValueError naming a
        column the table does not have, or a literal its column cannot be compared with."""
        missing = sorted(self.columns - set(table.column_names))
        if missing:
            have = [c for c in table.column_names if c != "id"]
            raise ValueError(f"--where {self.expr!r}: no metadata column {', '.join(map(repr, missing))} "
                             f"(the index has {have or 'none'})")
        try:
            out = self._eval(self.tree, table)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as e:
            raise ValueError(f"--where {self.expr!r}: {str(e).splitlines()[0]}") from None
        return np.asarray(pc.fill_null(out, False).to_numpy(zero_copy_only=False), dtype=bool)

    def _eval(self, node: ast.AST, table: pa.Table):
        if isinstance(node, ast.BoolOp):
            parts = [self._eval(v, table) for v in node.values]
            combine = pc.and_kleene if isinstance(node.op, ast.And) else pc.or_kleene
            out = parts[0]
            for p in parts[1:]:
                out = combine(out, p)
            return out
        if isinstance(node, ast.UnaryOp):
            # Kleene logic: not(null) stays null, so a row without the field matches neither a
            # comparison nor its negation.
            return pc.invert(self._eval(node.operand, table))
        operands = [node.left, *node.comparators]
        out = None
        for op, left, right in zip(node.ops, operands, operands[1:]):
            column, name, value = self._comparison(op, left, right)
            col = table.column(column)
            if name in ("in", "not_in"):
                present = [v for v in value if v is not None]
                values = pa.array(present, type=col.type) if present else pa.array([], type=col.type)
                hit = pc.is_in(col, value_set=values)
                hit = pc.if_else(pc.is_null(col), pa.scalar(None, pa.bool_()), hit)
                part = hit if name == "in" else pc.invert(hit)
            elif value is None:
                part = pc.is_null(col) if name == "equal" else pc.is_valid(col) if name == "not_equal" else None
                if part is None:
                    raise ValueError(f"--where {self.expr!r}: None can only be compared with == or !=")
            else:
                part = getattr(pc, name)(col, pa.scalar(value))
            out = part if out is None else pc.and_kleene(out, part)
        return out


class Fields:
    """The metadata table of an index: `id` (sorted int64 vector ids) and its columns."""

    def __init__(self, table: pa.Table):
        if "id" not in table.column_names:
            raise ValueError("a fields table needs an 'id' column")
        table = table.sort_by("id")
        self.table = table
        self.ids = table.column("id").to_numpy()
        self.columns = [c for c in table.column_names if c != "id"]
        self._cache: dict[str, np.ndarray] = {}

    def select(self, where: str | Where) -> np.ndarray:
        """Sorted int64 vector ids whose fields satisfy `where` (cached per expression)."""
        key = where.expr if isinstance(where, Where) else str(where).strip()
        if key not in self._cache:
            parsed = where if isinstance(where, Where) else Where(where)
            ids = self.ids[parsed.mask(self.table)]
            if len(self._cache) >= 64:   # a few recent filters; a service sees the same ones again
                self._cache.pop(next(iter(self._cache)))
            self._cache[key] = ids
        return self._cache[key]

    def values(self, ids: np.ndarray, columns: list[str] | None = None) -> list[dict[str, Any]]:
        """The fields of vector ids (n,) as one dict per id ({} for an id without fields);
        `columns` None: every column. Raises ValueError naming an unknown column."""
        columns = self.columns if columns is None else list(columns)
        unknown = [c for c in columns if c not in self.columns]
        if unknown:
            raise ValueError(f"--fields: no metadata column {', '.join(map(repr, unknown))} (the index has {self.columns or 'none'})")
        ids = np.asarray(ids, np.int64)
        pos = np.clip(np.searchsorted(self.ids, ids), 0, max(0, self.ids.size - 1))
        found = (self.ids.size > 0) & (self.ids[pos] == ids) if self.ids.size else np.zeros(ids.shape, bool)
        out: list[dict[str, Any]] = [{} for _ in range(ids.size)]
        if found.any() and columns:
            rows = self.table.select(columns).take(pa.array(pos[found])).to_pylist()
            for i, row in zip(np.flatnonzero(found), rows):
                out[i] = row
        return out


def empty_fields() -> Fields:
    return Fields(pa.table({"id": pa.array([], pa.int64())}))


def fields_table(source: str, id_maps: list[pa.Table]) -> pa.Table | None:
    """The metadata of `source` (a .csv / .parquet list with extra columns) joined to the vector
    ids of its images in `id_maps` (tables with id, image_id): id + the columns; None when the
    source carries no metadata."""
    from raysearch.sources import open_source

    src = open_source(source)
    fields_of = getattr(src, "fields", None)
    if fields_of is None:
        return None
    parts = list(fields_of())
    if not parts:
        return None
    meta = pa.concat_tables(parts)
    # One row per image_id: the first, as the listing keeps the first of duplicate ids.
    import pandas as pd

    repeated = pd.Series(meta.column("image_id").to_numpy(zero_copy_only=False)).duplicated(keep="first").to_numpy()
    if repeated.any():
        meta = meta.filter(pa.array(~repeated))
    keys = pa.concat_tables([t.select(["id", "image_id"]) for t in id_maps]) if id_maps else None
    if keys is None or keys.num_rows == 0:
        return None
    joined = keys.join(meta, keys="image_id", join_type="inner", use_threads=False)
    return joined.drop_columns(["image_id"]).sort_by("id")


def read_fields(path: str) -> Fields:
    return Fields(pq.read_table(path))


def fields_update(index_dir: str, manifest: dict[str, Any], added: pa.Table | None,
                  previous: pa.Table | None = None) -> dict[str, Any]:
    """Write `previous` (the index's fields table, or None) plus the rows `added` (newer rows of
    the same vector id win) under a new name; return the manifest recording it (its "fields"
    entry and files). The caller writes the manifest and then deletes the old file."""
    if added is None or added.num_rows == 0:
        return manifest
    tables = [t for t in (previous, added) if t is not None and t.num_rows]
    table = pa.concat_tables(tables, promote_options="permissive") if len(tables) > 1 else tables[0]
    if previous is not None and previous.num_rows:
        # The rows of `added` replace earlier rows of the same id.
        newest = ~np.isin(table.column("id").to_numpy()[: previous.num_rows], added.column("id").to_numpy())
        keep = np.concatenate([newest, np.ones(table.num_rows - previous.num_rows, bool)])
        table = table.filter(pa.array(keep))
    table = table.sort_by("id")
    name = f"{FIELDS_PREFIX}{uuid.uuid4().hex[:12]}.parquet"
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    storage.atomic_write(storage.join(index_dir, name), buf.getvalue())
    manifest = dict(manifest)
    files = dict(manifest["files"])
    old = (manifest.get("fields") or {}).get("name")
    if old:
        files.pop(old, None)
    files.update(describe_files(index_dir, [name]))
    manifest["files"] = files
    manifest["fields"] = {"name": name, "columns": [c for c in table.column_names if c != "id"], "n": table.num_rows}
    return manifest


def attach_fields(index_dir: str, source: str) -> dict[str, Any] | None:
    """Record the metadata columns of `source` (the list file an index was built from) for the
    images the index holds: the fields file is written, then the manifest (last, atomically).
    Returns the manifest's "fields" entry, or None when the source carries no metadata."""
    from raysearch.index.store import IndexStore, write_manifest
    from raysearch.sources import open_source

    names = getattr(open_source(source), "field_names", None)
    if names is None or not names():
        return None   # a folder, a glob, a .txt list: nothing to record, no id map read
    store = IndexStore(index_dir, verify=False)
    maps = [pq.read_table(store.local_path(s.ids_name), columns=["id", "image_id"]) for s in store.shards]
    table = fields_table(source, maps)
    if table is None:
        return None
    old = (store.manifest.get("fields") or {}).get("name")
    manifest = fields_update(store.index_dir, store.manifest, table, store.load_fields())
    write_manifest(store.index_dir, {k: v for k, v in manifest.items() if k not in ("format", "raysearch_version")})
    if old and old != manifest["fields"]["name"]:
        storage.remove(storage.join(store.index_dir, old))
    return manifest["fields"]
