"""Few-shot example selection from a labelled pool: random, stratified or nearest neighbours (knn).

Every method is seeded and never leaks the evaluated item into its own prompt: a pool row is skipped when
its id equals the item's id or its normalised text (:func:`lmloop.data.normalise_text`) equals the item's.

``random`` and ``stratified`` draw one fixed, seeded ordering of the pool and take the first k eligible
rows, so nearly every item gets the same shots (the usual protocol, Zhao et al. 2021) and the scorer can
share the prompt prefix; only an item that collides with a shot gets the next eligible row instead.
``knn`` picks the k pool rows most cosine-similar to the item under a sentence embedder (MiniLM, mean
pooled, L2-normalised; Liu et al. 2022), most similar last, i.e. next to the query. Pool embeddings are
cached on disk under ``$LMLOOP_HOME/cache/shot-embeddings``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from lmloop.errors import ConfigError

METHODS = ("random", "stratified", "knn")


def _norm(text: str) -> str:
    from lmloop.data import normalise_text

    return normalise_text(text)


class ShotSelector:
    """Pick k (text, label) shots for a query from a labelled pool.

    ``ids`` (optional, one per pool row) let a caller exclude an item by id as well as by text; ``embedder``
    is a model reference for ``knn`` (default the packaged ``minilm-l6``) or a callable texts -> (N, H)
    normalised embeddings."""

    def __init__(
        self,
        texts: Sequence[str],
        labels: Sequence[str],
        method: str = "random",
        *,
        seed: int = 0,
        ids: Sequence[str] | None = None,
        embedder="minilm-l6",
        cache: bool = True,
    ):
        if method not in METHODS:
            raise ConfigError(f"shot selection must be one of {', '.join(METHODS)}, got '{method}'")
        if len(texts) != len(labels) or (ids is not None and len(ids) != len(texts)):
            raise ConfigError("the shot pool's texts, labels (and ids) must have the same length")
        if not len(texts):
            raise ConfigError(
                "the shot pool is empty: few-shot prompts need labelled examples (a train split)"
            )
        self.texts = [str(t) for t in texts]
        self.labels = [str(x) for x in labels]
        self.ids = None if ids is None else [str(i) for i in ids]
        self.method, self.seed, self.cache = method, seed, cache
        self._keys = [_norm(t) for t in self.texts]
        rng = np.random.default_rng(seed)
        self._order = [int(i) for i in rng.permutation(len(self.texts))]
        if method == "stratified":
            by: dict[str, list[int]] = {}
            for i in self._order:
                by.setdefault(self.labels[i], []).append(i)
            self._by_label = by
            self._label_order = [sorted(by)[j] for j in rng.permutation(len(by))]
        self._embedder = embedder
        self._pool_emb: np.ndarray | None = None

    # ------------------------------------------------------------------------------------- exclusion
    def _ok(self, i: int, key: str, item_id: str | None) -> bool:
        if item_id is not None and self.ids is not None and self.ids[i] == item_id:
            return False
        return self._keys[i] != key

    # --------------------------------------------------------------------------------------- methods
    def _random(self, k: int, key: str, item_id: str | None) -> list[int]:
        out = []
        for i in self._order:
            if len(out) == k:
                break
            if self._ok(i, key, item_id):
                out.append(i)
        return out

    def _stratified(self, k: int, key: str, item_id: str | None) -> list[int]:
        # round robin over labels (their order seeded): counts per label differ by at most one
        queues = {lab: iter(self._by_label[lab]) for lab in self._label_order}
        out: list[int] = []
        live = list(self._label_order)
        while len(out) < k and live:
            for lab in list(live):
                if len(out) == k:
                    break
                nxt = next((i for i in queues[lab] if self._ok(i, key, item_id)), None)
                if nxt is None:
                    live.remove(lab)
                else:
                    out.append(nxt)
        # interleaved by label in a seeded order; shuffle so the last shot's label is not fixed by position
        rng = np.random.default_rng([self.seed, len(out)])
        return [out[j] for j in rng.permutation(len(out))]

    def _knn(self, k: int, query_emb: np.ndarray, key: str, item_id: str | None) -> list[int]:
        sims = self.pool_embeddings() @ query_emb  # (N,) cosine: both sides are unit vectors
        out: list[int] = []
        # stable sort on (-sim): ties broken by pool order; take a margin for exclusions
        for i in np.argsort(-sims, kind="stable"):
            if self._ok(int(i), key, item_id):
                out.append(int(i))
                if len(out) == k:
                    break
        return out[::-1]  # most similar last, next to the query

    # ------------------------------------------------------------------------------------ embeddings
    def _embed(self, texts: Sequence[str]) -> np.ndarray:
        if callable(self._embedder):
            return np.asarray(self._embedder(list(texts)), dtype=np.float32)
        from lmloop.mlops.drift import cached_embedder

        self._embedder_obj = cached_embedder(str(self._embedder))
        return self._embedder_obj(list(texts))

    def _cache_path(self) -> Path | None:
        # a model reference keys the cache by its resolved path; a callable only when it names itself (.ref)
        name = getattr(self._embedder, "ref", None) if callable(self._embedder) else str(self._embedder)
        if not self.cache or not name:
            return None
        from lmloop.assets import home, resolve_model

        h = hashlib.sha256((str(name) if callable(self._embedder) else resolve_model(name)).encode())
        for t in self.texts:
            h.update(t.encode("utf-8", "surrogatepass") + b"\x00")
        return home() / "cache" / "shot-embeddings" / f"{h.hexdigest()[:32]}.npy"

    def pool_embeddings(self) -> np.ndarray:
        """(N, H) float32 unit vectors of the pool texts (computed once, cached on disk)."""
        if self._pool_emb is None:
            path = self._cache_path()
            if path is not None and path.is_file():
                emb = np.load(path)
                if emb.shape[0] == len(self.texts):
                    self._pool_emb = emb
            if self._pool_emb is None:
                self._pool_emb = self._embed(self.texts)
                if path is not None:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    tmp = path.with_suffix(".tmp.npy")
                    np.save(tmp, self._pool_emb)
                    tmp.replace(path)
        return self._pool_emb

    # ---------------------------------------------------------------------------------------- public
    def select(self, text: str, k: int, item_id: str | None = None) -> list[tuple[str, str]]:
        """k (text, label) shots for one query."""
        return self.select_many([text], k, None if item_id is None else [item_id])[0]

    def select_many(
        self, texts: Sequence[str], k: int, ids: Sequence[str] | None = None
    ) -> list[list[tuple[str, str]]]:
        """k shots per query (fewer only when the pool has fewer eligible rows)."""
        if k < 0:
            raise ConfigError(f"the number of shots must be >= 0, got {k}")
        if ids is not None and len(ids) != len(texts):
            raise ConfigError("ids must match the queries one to one")
        if k == 0:
            return [[] for _ in texts]
        keys = [_norm(t) for t in texts]
        ids_ = [None] * len(texts) if ids is None else [str(i) for i in ids]
        if self.method == "knn":
            q = self._embed(texts) if len(texts) else np.zeros((0, 1), np.float32)
            picks = [self._knn(k, q[n], keys[n], ids_[n]) for n in range(len(texts))]
        elif self.method == "stratified":
            picks = [self._stratified(k, keys[n], ids_[n]) for n in range(len(texts))]
        else:
            picks = [self._random(k, keys[n], ids_[n]) for n in range(len(texts))]
        return [[(self.texts[i], self.labels[i]) for i in p] for p in picks]
