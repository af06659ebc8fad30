"""Thumbnails of indexed images for GET /images/{image_id}.

Only images the index holds are served: an image_id is looked up in the shards' id maps, and the
file read is the uri recorded there at build time, never a path or URL from the request. So the
endpoint cannot be made to read anything but the collection itself. (It reads server-side files
by design: the service's storage credentials reach what the index was built from.)

The id maps are read on the first request (only the `shards/*.ids.parquet` files, not the FAISS
shards) and searched with a vectorised scan (`pyarrow.compute.index`: a few milliseconds per
million ids); ids seen in search answers are remembered, so the thumbnails of results just
returned are found at once.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Iterable

import pyarrow as pa
import pyarrow.compute as pc

from raysearch import storage
from raysearch.pages.render import thumbnail_jpeg

REMEMBERED = 4096   # image_id -> uri pairs kept from recent answers, per replica


class IndexedImages:
    """image_id -> uri for the images of one index, and their thumbnails."""

    def __init__(self, index_dir: str, max_pixels: int | None = None):
        self.index_dir = index_dir
        self.max_pixels = max_pixels
        self._maps: list[tuple[pa.Array, pa.Array]] | None = None
        self._lock = threading.Lock()
        self._known: collections.OrderedDict[str, str] = collections.OrderedDict()

    def _id_maps(self) -> list[tuple[pa.Array, pa.Array]]:
        with self._lock:
            if self._maps is None:
                from raysearch.index.store import IndexStore

                # Sizes are checked; the checksums were checked where the shards were opened.
                store = IndexStore(self.index_dir, verify=False)
                maps = [store.load_ids(i) for i in range(len(store.shards))]
                self._maps = [(m.image_ids, m.uris) for m in maps]
            return self._maps

    def remember(self, hits: Iterable[dict]) -> None:
        """Keep the (id, uri) of search hits (dicts with "id" and "uri") that the index just returned."""
        with self._lock:
            for h in hits:
                if h.get("id") is not None and h.get("uri") is not None:
                    self._known[h["id"]] = h["uri"]
                    self._known.move_to_end(h["id"])
            while len(self._known) > REMEMBERED:
                self._known.popitem(last=False)

    def uri_of(self, image_id: str) -> str | None:
        """The uri the index records for `image_id`, or None when the index does not hold it."""
        with self._lock:
            if image_id in self._known:
                return self._known[image_id]
        for image_ids, uris in self._id_maps():
            pos = pc.index(image_ids, pa.scalar(image_id, image_ids.type)).as_py()
            if pos is not None and pos >= 0:
                uri = uris[pos].as_py()
                self.remember([{"id": image_id, "uri": uri}])
                return uri
        return None

    def thumbnail(self, image_id: str, size: int) -> bytes | None:
        """A JPEG thumbnail (longest side `size`) of the indexed image `image_id`; None when the
        index does not hold it. Raises FileNotFoundError/OSError when its file cannot be read and
        DecodeError when it is no longer a usable image."""
        uri = self.uri_of(image_id)
        if uri is None:
            return None
        return thumbnail_jpeg(storage.read_bytes(uri), size, self.max_pixels)
