"""The results store: one content-hashed record per trial, in SQLite by default or any SQLAlchemy URL.

Records are keyed by :func:`steepest.bench.trial.trial_key`, so a re-run skips finished trials and a killed
run loses only the trials in flight. A store refuses to open a file that is not one of its own (corrupt or
foreign), and never writes to it.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from .trial import TrialResult

SCHEMA = "steepest-bench"
SCHEMA_VERSION = 1
# Prefix of the error text of a trial whose training raised (as opposed to one that diverged numerically).
RAISED = "raised "
_meta = sa.MetaData()
_META = sa.Table("steepest_meta", _meta, sa.Column("key", sa.String(64), primary_key=True),
                 sa.Column("value", sa.Text, nullable=False))
_TRIALS = sa.Table(
    "steepest_trials", _meta,
    sa.Column("key", sa.String(64), primary_key=True),
    sa.Column("workload", sa.String(200), nullable=False, index=True),
    sa.Column("workload_version", sa.Integer, nullable=False),
    sa.Column("optimizer", sa.String(200), nullable=False, index=True),
    sa.Column("hparams", sa.Text, nullable=False),
    sa.Column("seed", sa.Integer, nullable=False),
    sa.Column("budget", sa.Integer, nullable=False),
    sa.Column("target", sa.Float, nullable=True),
    sa.Column("reached", sa.Boolean, nullable=False),
    sa.Column("steps_to_target", sa.Integer, nullable=True),
    sa.Column("seconds_to_target", sa.Float, nullable=True),
    sa.Column("best_metric", sa.Float, nullable=True),
    sa.Column("final_metric", sa.Float, nullable=True),
    sa.Column("diverged", sa.Boolean, nullable=False),
    sa.Column("ms_per_step", sa.Float, nullable=False),
    sa.Column("wall_s", sa.Float, nullable=False),
    sa.Column("state_bytes_per_param", sa.Float, nullable=False),
    sa.Column("log", sa.Text, nullable=False),
    sa.Column("package_version", sa.String(64), nullable=False),
    sa.Column("error", sa.Text, nullable=False),
)
_SUITES = sa.Table("steepest_suites", _meta, sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
                   sa.Column("config", sa.Text, nullable=False))


class StoreError(RuntimeError):
    """A results store that cannot be opened (corrupt file, foreign database, newer schema)."""


def _url(store: str | Path) -> str:
    s = str(store)
    return s if "://" in s else f"sqlite:///{Path(s).expanduser()}"


def _nan_to_none(x: float | None) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else x


class Store:
    """A results store at ``store``: a file path (SQLite) or an SQLAlchemy URL (``postgresql://...``)."""

    def __init__(self, store: str | Path):
        self.url = _url(store)
        if self.url.startswith("sqlite:///"):
            path = Path(self.url[len("sqlite:///"):])
            if path.exists() and path.stat().st_size > 0:
                with open(path, "rb") as fh:
                    head = fh.read(16)
                if head != b"SQLite format 3\x00":
                    raise StoreError(f"results store {str(path)!r} is not an SQLite database (corrupt or a foreign "
                                     "file); it was left untouched -- point --store at a new path")
            path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.engine = sa.create_engine(self.url, future=True)
            with self.engine.connect() as conn:
                tables = set(sa.inspect(conn).get_table_names())
        except sa.exc.SQLAlchemyError as err:
            raise StoreError(f"results store {self.url!r} cannot be opened ({type(err).__name__}: {err}); it was "
                             "left untouched -- check the path/URL or point --store at a new one") from err
        # Several processes may open the same new store at once (workers of a shared suite): creating it races,
        # so a failed creation step is retried after looking again at what the other process made.
        for attempt in range(12):
            if attempt:
                time.sleep(0.05 * attempt)
                with self.engine.connect() as conn:
                    tables = set(sa.inspect(conn).get_table_names())
            try:
                if self._check_or_create(tables):
                    return
            except (sa.exc.OperationalError, sa.exc.IntegrityError):
                continue
        raise StoreError(f"results store {self.url!r} is not a steepest-bench store (schema None); it was left "
                         "untouched")

    def _check_or_create(self, tables: set[str]) -> bool:
        """Check an existing store's schema or create a new one; False while another process is creating it."""
        if tables and "steepest_meta" not in tables:
            raise StoreError(f"results store {self.url!r} holds tables {sorted(tables)} of another program; it was "
                             "left untouched -- point --store at a new path")
        if "steepest_meta" in tables:
            with self.engine.connect() as conn:
                meta = dict(conn.execute(sa.select(_META.c.key, _META.c.value)).all())
            if not meta:
                return False  # tables made, schema rows not yet written (by another process) or lost: look again
            if meta.get("schema") != SCHEMA:
                raise StoreError(f"results store {self.url!r} is not a steepest-bench store (schema "
                                 f"{meta.get('schema')!r}); it was left untouched")
            if int(meta.get("schema_version", 0)) > SCHEMA_VERSION:
                raise StoreError(f"results store {self.url!r} has schema version {meta['schema_version']}, newer "
                                 f"than this steepest ({SCHEMA_VERSION}); upgrade steepest")
        _meta.create_all(self.engine)
        if "steepest_meta" not in tables:
            with self.engine.begin() as conn:
                conn.execute(_META.insert(), [{"key": "schema", "value": SCHEMA},
                                              {"key": "schema_version", "value": str(SCHEMA_VERSION)}])
        return True

    def keys(self, settled: bool = False) -> set[str]:
        """The keys of every stored trial; with ``settled``, only of those that did not raise (a trial that
        raised, e.g. on an operation a later version supports, is run again on resume)."""
        q = sa.select(_TRIALS.c.key)
        if settled:
            q = q.where(sa.not_(_TRIALS.c.error.startswith(RAISED, autoescape=True)))
        with self.engine.connect() as conn:
            return set(conn.execute(q).scalars())

    def put(self, r: TrialResult) -> None:
        """Store one finished trial. A second put of the same key is ignored (records are content-addressed),
        except that it replaces a record of the same trial that raised."""
        row = r.to_dict()
        row["hparams"] = json.dumps(row["hparams"], sort_keys=True)
        row["log"] = json.dumps(row["log"])
        for k in ("best_metric", "final_metric", "target"):
            row[k] = _nan_to_none(row[k])
        try:
            with self.engine.begin() as conn:
                exists = conn.execute(sa.select(_TRIALS.c.error).where(_TRIALS.c.key == r.key)).first()
                if exists and exists[0].startswith(RAISED) and not r.error.startswith(RAISED):
                    conn.execute(_TRIALS.delete().where(_TRIALS.c.key == r.key))
                    exists = None
                if not exists:
                    conn.execute(_TRIALS.insert(), [row])
        except sa.exc.IntegrityError:  # another process stored the same trial first: same content, nothing lost
            pass

    def get(self, keys: set[str] | None = None) -> dict[str, TrialResult]:
        """Stored trials (all, or those in ``keys``) as key -> TrialResult."""
        if keys is None:
            queries = [sa.select(_TRIALS)]
        else:
            ks = sorted(keys)
            queries = [sa.select(_TRIALS).where(_TRIALS.c.key.in_(ks[i:i + 500])) for i in range(0, len(ks), 500)]
        out = {}
        with self.engine.connect() as conn:
            rows = [row for q in queries for row in conn.execute(q).mappings()]
            for row in rows:
                d: dict[str, Any] = dict(row)
                d["hparams"] = json.loads(d["hparams"])
                d["log"] = json.loads(d["log"])
                for k in ("best_metric", "final_metric"):
                    d[k] = math.nan if d[k] is None else d[k]
                out[d["key"]] = TrialResult(**d)
        return out

    def save_suite(self, config: dict) -> None:
        """Remember a suite's configuration, so that ``steepest bench report`` can re-render it."""
        with self.engine.begin() as conn:
            conn.execute(_SUITES.insert(), [{"config": json.dumps(config, sort_keys=True)}])

    def last_suite(self) -> dict | None:
        """The configuration of the last suite run against this store, or None."""
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(_SUITES.c.config).order_by(_SUITES.c.id.desc()).limit(1)).first()
        return json.loads(row[0]) if row else None

    def close(self) -> None:
        """Release the database connections."""
        self.engine.dispose()
