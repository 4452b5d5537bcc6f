"""A small least-recently-used cache of crop embeddings, shared by the torch and onnxruntime
predictors (torch-free, so the onnxruntime backend needs no torch)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any


class EmbeddingCache:
    """Keeps the ``size`` most recently used embeddings, keyed by crop (e.g. its grid)."""

    def __init__(self, size: int):
        self.size = size
        self._items: OrderedDict[Hashable, Any] = OrderedDict()

    def __contains__(self, key: Hashable) -> bool:
        return key in self._items

    def fetch(self, key: Hashable | None, image: Any, encode: Callable[[Any], Any]) -> Any:
        """The embedding of ``key`` if cached (marked as just used), else ``encode(image)``,
        stored under ``key`` unless it is None (the least recently used drop out beyond
        ``size``). KeyError if ``key`` is not cached and ``image`` is None."""
        if key is not None and key in self._items:
            self._items.move_to_end(key)
            return self._items[key]
        if image is None:
            raise KeyError(f"no cached embedding for {key!r} and no image given")
        embedding = encode(image)
        if key is not None:
            self._items[key] = embedding
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return embedding

    def clear(self) -> None:
        self._items.clear()
