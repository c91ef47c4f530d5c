"""The prediction log: every prediction the server makes, and every feedback (true label) users attach to one.

One small store interface; the backend is chosen by URL, as MLflow does it:

* ``sqlite:///relative.db``, ``sqlite:////abs/path.db`` (SQLAlchemy's rule: what follows ``sqlite:///`` is
  the path) or a plain filesystem path -> an embedded SQLite file in WAL mode. The default (``url=None``) is
  ``$LMLOOP_HOME/predictions.db``. For one server process, or a few on one host.
* ``postgresql://user:pass@host:5432/db`` (or ``postgres://``) -> PostgreSQL through psycopg 3, shared by
  several server replicas. libpq options ride in the query string (``?sslmode=require``, ``?options=...``);
  ``connect_timeout`` defaults to 3 s so an unreachable server fails fast.

Both backends run the same SQL and the same code. Queries are written with ``?`` placeholders (PostgreSQL
gets ``%s``); a backend supplies only how to connect, how to open a write transaction and two schema words.

Threads: the server writes from a batching thread and reads from request-handler threads at once. Each
operation borrows a connection from a small pool for its duration, so no connection is ever used by two
threads at the same time (SQLite connections are made with ``check_same_thread=False`` only so that a
connection may be reused by another thread *later*). A pool rather than ``threading.local``: a
thread-per-request server (``ThreadingHTTPServer``) would open, and leak, one connection per request; a
paused iterator would share its thread's connection with the writes made between two of its pages; and
``close()`` can release every connection.

Entities are plain dataclasses: :class:`PredictionRecord` and :class:`FeedbackRecord`.

Generations (``lmloop serve`` on a causal LM, the OpenAI-compatible API) go to the same table, so feedback
works on them the same way: ``kind`` is ``"completion"`` or ``"chat"`` (``"classify"`` for classifier
rows), ``text`` holds the prompt (for chat, the messages as JSON), ``completion`` the generated text, with
``prompt_tokens`` / ``completion_tokens`` / ``finish_reason``; ``label`` is ``""`` and ``scores`` empty.
Readers see classifier rows only unless they ask for another ``kind`` (schema version 2 added these
columns; a version-1 log is migrated in place when opened).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, overload

from lmloop.errors import ConfigError

SCHEMA_VERSION = 2  # bump with a migration in PredictionStore._create_schema (2: generation columns)
_COMPONENT = "predlog"  # our row in schema_version (other lmloop stores may share the table)
SCHEMES = ("sqlite:///", "postgresql://", "postgres://")
_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


# ---------------------------------------------------------------------------------------------- entities
@dataclass
class PredictionRecord:
    """One prediction as served. ``text`` is None when the privacy setting keeps only ``text_hash``."""

    id: str  # new_prediction_id(): unique across replicas, sorts by creation time
    created_at: float  # unix seconds
    model: str
    version: str
    text: str | None
    text_hash: str  # sha256 hex of the UTF-8 text, always stored (joins, dedup, drift without the text)
    label: str
    score: float
    scores: dict[str, float]
    latency_ms: float
    request_id: str | None = None
    kind: str = "classify"  # "classify" | "completion" | "chat" (see the module docstring)
    completion: str | None = None  # generations: the generated text
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    finish_reason: str | None = None  # generations: "stop" | "length"

    @classmethod
    def new(
        cls,
        *,
        model: str,
        version: str,
        text: str,
        label: str,
        score: float,
        scores: dict[str, float],
        latency_ms: float,
        request_id: str | None = None,
        store_text: bool = True,
    ) -> PredictionRecord:
        """A record with a fresh id, ``created_at`` now and the text's hash; ``store_text=False`` drops the text."""
        return cls(
            id=new_prediction_id(),
            created_at=time.time(),
            model=model,
            version=version,
            text=text if store_text else None,
            text_hash=hash_text(text),
            label=label,
            score=float(score),
            scores={k: float(v) for k, v in scores.items()},
            latency_ms=float(latency_ms),
            request_id=request_id,
        )

    @classmethod
    def generation(
        cls,
        *,
        id: str,
        kind: str,
        model: str,
        version: str,
        prompt: str,
        completion: str,
        prompt_tokens: int,
        completion_tokens: int,
        finish_reason: str,
        latency_ms: float,
        request_id: str | None = None,
        store_text: bool = True,
    ) -> PredictionRecord:
        """A generation record (``kind`` "completion" or "chat"); ``store_text=False`` keeps neither the
        prompt nor the completion, only the prompt's hash and the token counts."""
        return cls(
            id=id,
            created_at=time.time(),
            model=model,
            version=version,
            text=prompt if store_text else None,
            text_hash=hash_text(prompt),
            label="",
            score=0.0,
            scores={},
            latency_ms=float(latency_ms),
            request_id=request_id,
            kind=kind,
            completion=completion if store_text else None,
            prompt_tokens=int(prompt_tokens),
            completion_tokens=int(completion_tokens),
            finish_reason=finish_reason,
        )


@dataclass
class FeedbackRecord:
    """A true label for a prediction. Several may exist for one prediction; readers take the latest."""

    prediction_id: str
    label: str
    comment: str | None = None
    created_at: float = field(default_factory=time.time)
    id: int | None = None  # assigned by the store; larger = stored later


def hash_text(text: str) -> str:
    """sha256 hex digest of the UTF-8 text (what ``PredictionRecord.text_hash`` holds)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def new_prediction_id(now: float | None = None) -> str:
    """A ULID: 26 Crockford base32 chars = 48-bit millisecond timestamp + 80 random bits.

    Sorts by creation time (to the millisecond) as a plain string, and needs no coordination between
    replicas: two ids collide only if 80 random bits do within the same millisecond.
    """
    ms = int((time.time() if now is None else now) * 1000) & ((1 << 48) - 1)
    n = (ms << 80) | int.from_bytes(os.urandom(10), "big")  # 128 bits, written as 130 (top 2 are 0)
    return "".join(_CROCKFORD[(n >> shift) & 31] for shift in range(125, -1, -5))


# ---------------------------------------------------------------------------------------------- URLs
def ulid_time(id: str) -> float | None:
    """The creation time (unix seconds) encoded in a :func:`new_prediction_id`, or None if not one."""
    if len(id) != 26:
        return None
    ms = 0
    for ch in id[:10].upper():
        k = _CROCKFORD.find(ch)
        if k < 0:
            return None
        ms = ms * 32 + k
    return ms / 1000


def redact_url(url: str) -> str:
    """``url`` with any password replaced by ``***`` (in the user info and in a ``password=`` query
    parameter), safe to print or log: ``postgresql://u:***@h/db``."""
    url = str(url)
    if "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    rest, q, query = rest.partition("?")
    at = rest.rfind("@")  # the last '@': a password may hold an unescaped '@' or '/'
    if at >= 0 and ":" in rest[:at]:
        rest = rest[: rest.index(":")] + ":***" + rest[at:]
    query = re.sub(r"(^|&)(password=)[^&]*", r"\1\2***", query, flags=re.IGNORECASE)
    return f"{scheme}://{rest}{q}{query}"


def default_url() -> str:
    """``sqlite:///$LMLOOP_HOME/predictions.db``."""
    from lmloop.assets import home

    return f"sqlite:///{home() / 'predictions.db'}"


def open_store(url: str | os.PathLike | None = None) -> PredictionStore:
    """Open (creating the schema if needed) the prediction store at ``url``; see the module docstring for
    the accepted URLs. ``None`` or ``""`` -> :func:`default_url`. Raises :class:`ConfigError` for an
    unknown scheme, an unwritable SQLite path or an unreachable PostgreSQL server."""
    url = default_url() if url is None or not str(url).strip() else str(url).strip()
    if url.startswith(("postgresql://", "postgres://")):
        return PostgresStore(url)
    if url.startswith("sqlite:"):
        if not url.startswith("sqlite:///") or url[len("sqlite:///") :] in ("", ":memory:"):
            raise ConfigError(
                f"prediction store URL {url!r}: SQLite needs a file path (sqlite:///relative.db or "
                "sqlite:////abs/path.db); an in-memory database would not be shared between connections"
            )
        return SqliteStore(url[len("sqlite:///") :])
    if "://" in url or url.startswith("file:"):
        raise ConfigError(
            f"prediction store URL {redact_url(url)!r}: unsupported scheme; expected one of "
            "sqlite:///path.db, postgresql://user@host:port/db (or postgres://), or a plain file path"
        )
    return SqliteStore(url)


# ---------------------------------------------------------------------------------------------- store
_PRED_COLS = (
    "id, created_at, model, version, text, text_hash, label, score, scores, latency_ms, request_id, "
    "kind, completion, prompt_tokens, completion_tokens, finish_reason"
)
_N_PRED = 16
# schema version 1 -> 2: the generation columns (nullable, or with a default: old writers still work)
_V2_COLUMNS = [
    "kind TEXT NOT NULL DEFAULT 'classify'",
    "completion TEXT",
    "prompt_tokens INTEGER",
    "completion_tokens INTEGER",
    "finish_reason TEXT",
]
_FB_COLS = "id, prediction_id, label, comment, created_at"

# Same tables on both backends; {autoid} and the placeholders are the only differences.
_SCHEMA = [
    """CREATE TABLE IF NOT EXISTS schema_version (
        component TEXT PRIMARY KEY,
        version INTEGER NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS predictions (
        id TEXT PRIMARY KEY,
        created_at DOUBLE PRECISION NOT NULL,
        model TEXT NOT NULL,
        version TEXT NOT NULL,
        text TEXT,
        text_hash TEXT NOT NULL,
        label TEXT NOT NULL,
        score DOUBLE PRECISION NOT NULL,
        scores TEXT NOT NULL,
        latency_ms DOUBLE PRECISION NOT NULL,
        request_id TEXT,
        {v2_columns}
    )""",
    # (created_at, id) is the iteration order and the keyset; ties on created_at are broken by id
    "CREATE INDEX IF NOT EXISTS predictions_created_at ON predictions (created_at, id)",
    "CREATE INDEX IF NOT EXISTS predictions_model_created_at ON predictions (model, created_at, id)",
    """CREATE TABLE IF NOT EXISTS feedback (
        id {autoid},
        prediction_id TEXT NOT NULL REFERENCES predictions (id) ON DELETE CASCADE,
        label TEXT NOT NULL,
        comment TEXT,
        created_at DOUBLE PRECISION NOT NULL
    )""",
    # the latest feedback of a prediction is max(id) over this index
    "CREATE INDEX IF NOT EXISTS feedback_prediction_id ON feedback (prediction_id, id)",
]


def _prediction(row: Sequence[Any]) -> PredictionRecord:
    return PredictionRecord(
        id=row[0],
        created_at=row[1],
        model=row[2],
        version=row[3],
        text=row[4],
        text_hash=row[5],
        label=row[6],
        score=row[7],
        scores=json.loads(row[8]),
        latency_ms=row[9],
        request_id=row[10],
        kind=row[11],
        completion=row[12],
        prompt_tokens=row[13],
        completion_tokens=row[14],
        finish_reason=row[15],
    )


def _feedback(row: Sequence[Any]) -> FeedbackRecord:
    return FeedbackRecord(id=row[0], prediction_id=row[1], label=row[2], comment=row[3], created_at=row[4])


class PredictionStore:
    """The store interface and its shared implementation; :func:`open_store` picks the backend.

    ``url`` is the store's URL with any password redacted. Use as a context manager, or call ``close()``.
    """

    url: str
    max_idle = 16  # connections kept open between operations; more are opened under load, then closed
    _AUTOID = ""  # column type of feedback.id

    def __init__(self, url: str):
        self.url = redact_url(url)
        self._idle: list[Any] = []
        self._lock = threading.Lock()
        self._closed = False
        self._create_schema()

    # -- what a backend provides
    def _connect(self) -> Any:
        raise NotImplementedError

    def _transaction(self, conn: Any) -> contextlib.AbstractContextManager:
        """A write transaction on ``conn``: committed when the block exits, rolled back on an error."""
        raise NotImplementedError

    def _reusable(self, conn: Any) -> bool:
        """Whether ``conn`` may go back to the pool (after an error it may be broken or mid-transaction)."""
        raise NotImplementedError

    def _sql(self, query: str) -> str:
        return query

    def _schema_lock(self, conn: Any) -> None:
        """Serialise schema creation between processes opening the store at once (inside the transaction)."""

    # -- connections
    @contextlib.contextmanager
    def _connection(self) -> Iterator[Any]:
        with self._lock:
            if self._closed:
                raise RuntimeError(f"prediction store {self.url} is closed")
            conn = self._idle.pop() if self._idle else None
        if conn is None:
            conn = self._connect()
        ok = False
        try:
            yield conn
            ok = True
        finally:
            keep = ok or self._reusable(conn)
            with self._lock:
                if keep and not self._closed and len(self._idle) < self.max_idle:
                    self._idle.append(conn)
                    conn = None
            if conn is not None:
                with contextlib.suppress(Exception):
                    conn.close()

    def _rows(self, conn: Any, query: str, params: Sequence[Any] = ()) -> list[Any]:
        cur = conn.cursor()
        try:
            cur.execute(self._sql(query), tuple(params))
            return cur.fetchall() if cur.description is not None else []
        finally:
            cur.close()

    def _create_schema(self) -> None:
        with self._connection() as conn, self._transaction(conn):
            self._schema_lock(conn)
            for stmt in _SCHEMA:
                self._rows(conn, stmt.format(autoid=self._AUTOID, v2_columns=", ".join(_V2_COLUMNS)))
            rows = self._rows(conn, "SELECT version FROM schema_version WHERE component = ?", (_COMPONENT,))
            if not rows:
                self._rows(
                    conn,
                    "INSERT INTO schema_version (component, version) VALUES (?, ?) ON CONFLICT DO NOTHING",
                    (_COMPONENT, SCHEMA_VERSION),
                )
            elif rows[0][0] == 1:  # a log written before generations were logged: add their columns
                for col in _V2_COLUMNS:
                    self._rows(conn, f"ALTER TABLE predictions ADD COLUMN {col}")
                self._rows(conn, "UPDATE schema_version SET version = ? WHERE component = ?", (2, _COMPONENT))
            elif rows[0][0] > SCHEMA_VERSION:
                raise ConfigError(
                    f"prediction store {self.url} has schema version {rows[0][0]}, written by a newer lmloop "
                    f"(this one knows version {SCHEMA_VERSION}); upgrade lmloop"
                )

    # -- writes
    def add_predictions(self, records: Sequence[PredictionRecord]) -> None:
        """Store ``records`` in one transaction, committed when this returns. Idempotent: a record whose id
        is already stored is skipped, so a batch may be retried after an error whose outcome is unknown."""
        if not records:
            return
        rows = [
            (
                r.id,
                float(r.created_at),
                r.model,
                r.version,
                r.text,
                r.text_hash,
                r.label,
                float(r.score),
                json.dumps(r.scores),
                float(r.latency_ms),
                r.request_id,
                r.kind,
                r.completion,
                r.prompt_tokens,
                r.completion_tokens,
                r.finish_reason,
            )
            for r in records
        ]
        query = self._sql(
            f"INSERT INTO predictions ({_PRED_COLS}) VALUES ({', '.join('?' * _N_PRED)}) ON CONFLICT (id) DO NOTHING"
        )
        with self._connection() as conn, self._transaction(conn):
            cur = conn.cursor()
            try:
                cur.executemany(query, rows)
            finally:
                cur.close()

    def add_feedback(self, fb: FeedbackRecord) -> FeedbackRecord:
        """Store ``fb``; durable when this returns. Returns a copy with ``id`` set.
        Raises ``KeyError`` if no prediction has id ``fb.prediction_id``."""
        with self._connection() as conn, self._transaction(conn):
            if not self._rows(conn, "SELECT 1 FROM predictions WHERE id = ?", (fb.prediction_id,)):
                raise KeyError(fb.prediction_id)
            rows = self._rows(
                conn,
                "INSERT INTO feedback (prediction_id, label, comment, created_at) VALUES (?, ?, ?, ?) RETURNING id",
                (fb.prediction_id, fb.label, fb.comment, float(fb.created_at)),
            )
        return replace(fb, id=int(rows[0][0]))

    # -- reads
    def get_prediction(self, id: str) -> PredictionRecord | None:
        with self._connection() as conn:
            rows = self._rows(conn, f"SELECT {_PRED_COLS} FROM predictions WHERE id = ?", (id,))
        return _prediction(rows[0]) if rows else None

    def get_feedback(self, prediction_id: str) -> list[FeedbackRecord]:
        """All feedback for one prediction, oldest first (the last one is the one readers use)."""
        with self._connection() as conn:
            rows = self._rows(
                conn, f"SELECT {_FB_COLS} FROM feedback WHERE prediction_id = ? ORDER BY id", (prediction_id,)
            )
        return [_feedback(r) for r in rows]

    @overload
    def iter_predictions(
        self,
        *,
        since: float | None = ...,
        until: float | None = ...,
        model: str | None = ...,
        kind: str | Sequence[str] | None = ...,
        with_feedback: Literal[False] = ...,
        batch: int = ...,
    ) -> Iterator[PredictionRecord]: ...

    @overload
    def iter_predictions(
        self,
        *,
        since: float | None = ...,
        until: float | None = ...,
        model: str | None = ...,
        kind: str | Sequence[str] | None = ...,
        with_feedback: Literal[True],
        batch: int = ...,
    ) -> Iterator[tuple[PredictionRecord, FeedbackRecord | None]]: ...

    def iter_predictions(
        self,
        *,
        since: float | None = None,
        until: float | None = None,
        model: str | None = None,
        kind: str | Sequence[str] | None = "classify",
        with_feedback: bool = False,
        batch: int = 1000,
    ) -> Iterator[Any]:
        """Predictions with ``since <= created_at < until`` (either bound optional), of ``model`` if given,
        in (created_at, id) order. ``with_feedback=True`` yields ``(prediction, latest feedback or None)``.
        ``kind``: classifier rows by default; ``"chat"``, ``("completion", "chat")``, or None for all.

        Streams in constant memory: each page of ``batch`` rows is one short query (keyset pagination on
        (created_at, id)); no transaction or connection is held while the caller consumes a page, so a
        slow consumer blocks no writer. Rows committed during the iteration may or may not be seen.
        """
        yield from self._iter("left" if with_feedback else None, since, until, model, batch, kind)

    def iter_labeled(
        self,
        *,
        since: float | None = None,
        until: float | None = None,
        model: str | None = None,
        kind: str | Sequence[str] | None = "classify",
        batch: int = 1000,
    ) -> Iterator[tuple[PredictionRecord, FeedbackRecord]]:
        """Only the predictions that have feedback, as ``(prediction, latest feedback)``: retraining data.
        Same filters (on the prediction's ``created_at``), order and streaming as :meth:`iter_predictions`."""
        yield from self._iter("inner", since, until, model, batch, kind)

    def _iter(
        self,
        join: str | None,
        since: float | None,
        until: float | None,
        model: str | None,
        batch: int,
        kind: str | Sequence[str] | None = "classify",
    ) -> Iterator[Any]:
        if batch < 1:
            raise ValueError(f"batch must be >= 1, got {batch}")
        cols = ", ".join(f"p.{c.strip()}" for c in _PRED_COLS.split(","))
        query = f"SELECT {cols}"
        if join:
            query += ", " + ", ".join(f"f.{c.strip()}" for c in _FB_COLS.split(","))
            query += " FROM predictions p " + ("LEFT JOIN" if join == "left" else "JOIN") + " feedback f"
            query += " ON f.id = (SELECT max(f2.id) FROM feedback f2 WHERE f2.prediction_id = p.id)"
        else:
            query += " FROM predictions p"
        conds: list[str] = []
        params: list[Any] = []
        if since is not None:
            conds.append("p.created_at >= ?")
            params.append(float(since))
        if until is not None:
            conds.append("p.created_at < ?")
            params.append(float(until))
        if model is not None:
            conds.append("p.model = ?")
            params.append(model)
        if kind is not None:
            kinds = [kind] if isinstance(kind, str) else list(kind)
            conds.append(f"p.kind IN ({', '.join('?' * len(kinds))})")
            params.extend(kinds)
        after: tuple[float, str] | None = None
        while True:
            page_conds, page_params = list(conds), list(params)
            if after is not None:
                page_conds.append("(p.created_at, p.id) > (?, ?)")
                page_params.extend(after)
            page = query + (" WHERE " + " AND ".join(page_conds) if page_conds else "")
            page += " ORDER BY p.created_at, p.id LIMIT ?"
            with self._connection() as conn:
                rows = self._rows(conn, page, [*page_params, batch])
            for row in rows:
                pred = _prediction(row[:_N_PRED])
                if join is None:
                    yield pred
                else:
                    yield pred, (_feedback(row[_N_PRED:]) if row[_N_PRED] is not None else None)
            if len(rows) < batch:
                return
            after = (rows[-1][1], rows[-1][0])

    def counts(self) -> dict[str, int]:
        """``{"predictions": n, "feedback": m}``."""
        with self._connection() as conn:
            n = self._rows(conn, "SELECT count(*) FROM predictions")[0][0]
            m = self._rows(conn, "SELECT count(*) FROM feedback")[0][0]
        return {"predictions": int(n), "feedback": int(m)}

    def recent_feedback(
        self, limit: int, model: str | None = None
    ) -> list[tuple[FeedbackRecord, PredictionRecord]]:
        """The latest ``limit`` feedback records, newest first, each with its prediction (one indexed
        join on either backend; the dashboard's "recent feedback" table)."""
        fcols = ", ".join(f"f.{c.strip()}" for c in _FB_COLS.split(","))
        pcols = ", ".join(f"p.{c.strip()}" for c in _PRED_COLS.split(","))
        nf = len(_FB_COLS.split(","))
        query = f"SELECT {fcols}, {pcols} FROM feedback f JOIN predictions p ON p.id = f.prediction_id"
        params: list[Any] = []
        if model is not None:
            query += " WHERE p.model = ?"
            params.append(model)
        query += " ORDER BY f.id DESC LIMIT ?"
        params.append(int(limit))
        with self._connection() as conn:
            rows = self._rows(conn, query, params)
        return [(_feedback(r[:nf]), _prediction(r[nf:])) for r in rows]

    # -- lifetime
    def close(self) -> None:
        """Close the pooled connections; a connection in use is closed when its operation ends."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            with contextlib.suppress(Exception):
                conn.close()

    def __enter__(self) -> PredictionStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"


class SqliteStore(PredictionStore):
    """An embedded SQLite file: WAL (readers never block the writer), ``synchronous=FULL`` (a commit is
    fsynced before it returns), ``busy_timeout`` 10 s (writers queue instead of failing "database is
    locked"), and every write transaction opened with ``BEGIN IMMEDIATE`` so it takes the write lock up
    front, where the busy timeout applies, instead of failing on a read-to-write upgrade."""

    _AUTOID = "INTEGER PRIMARY KEY AUTOINCREMENT"  # AUTOINCREMENT: ids are never reused, max(id) is latest

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path).expanduser()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            super().__init__(f"sqlite:///{self.path}")
        except ConfigError:
            raise
        except (OSError, sqlite3.Error) as e:
            raise ConfigError(f"cannot open the prediction store sqlite:///{self.path}: {e}") from e

    def _connect(self) -> Any:
        # isolation_level=None: no implicit BEGIN; we write BEGIN IMMEDIATE / COMMIT ourselves.
        # check_same_thread=False: a pooled connection is used by one thread at a time, not always the same.
        conn = sqlite3.connect(self.path, timeout=10.0, isolation_level=None, check_same_thread=False)
        try:
            conn.execute("PRAGMA busy_timeout = 10000")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute("PRAGMA foreign_keys = ON")
        except BaseException:
            conn.close()
            raise
        return conn

    @contextlib.contextmanager
    def _transaction(self, conn: Any) -> Iterator[None]:
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            if conn.in_transaction:  # SQLite rolls back by itself on some errors (disk full, I/O)
                conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def _reusable(self, conn: Any) -> bool:
        try:
            return not conn.in_transaction
        except Exception:
            return False


class PostgresStore(PredictionStore):
    """PostgreSQL through psycopg 3, in autocommit mode with explicit transactions for writes (a read never
    leaves a transaction open). Several replicas may share it: ids are ULIDs, feedback ids come from an
    identity column, and schema creation is serialised with an advisory lock."""

    _AUTOID = "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY"
    connect_timeout = 3  # seconds; a URL's own ?connect_timeout= wins

    def __init__(self, url: str):
        try:
            import psycopg
        except ImportError as e:
            raise ConfigError(
                f"prediction store {redact_url(url)}: PostgreSQL needs psycopg 3: pip install 'psycopg[binary]'"
            ) from e
        self._psycopg = psycopg
        # libpq accepts both schemes, and options in the query string (sslmode, options, connect_timeout)
        params = psycopg.conninfo.conninfo_to_dict(url)
        params.setdefault("connect_timeout", self.connect_timeout)
        self._conninfo = params  # holds the password: never printed
        super().__init__(url)

    def _connect(self) -> Any:
        try:
            return self._psycopg.connect(**self._conninfo, autocommit=True)
        except self._psycopg.OperationalError as e:
            cause = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
            raise ConfigError(f"could not connect to {self.url}: {cause}") from e

    def _transaction(self, conn: Any) -> contextlib.AbstractContextManager:
        return conn.transaction()

    def _reusable(self, conn: Any) -> bool:
        pq = self._psycopg.pq
        return (
            not conn.closed and not conn.broken and conn.info.transaction_status == pq.TransactionStatus.IDLE
        )

    def _sql(self, query: str) -> str:
        return query.replace("?", "%s")  # our SQL holds no literal '?' or '%'

    def _schema_lock(self, conn: Any) -> None:
        # concurrent CREATE TABLE IF NOT EXISTS can still collide in the catalog: one replica at a time
        self._rows(conn, "SELECT pg_advisory_xact_lock(?)", (0x6C6D6C6F6F70,))  # "lmloop"
