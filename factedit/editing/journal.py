"""The persistent edit journal: one sqlite file through sqlitedict, with no pickle anywhere.

Keys and values are bytes: `meta` and `record/<id>` hold UTF-8 JSON, `delta/<id>` holds safetensors
bytes, `state/<id>` (lifelong methods only) the method's state after the edit as safetensors bytes,
`keys/<id>` (preserving methods only) the keys the preserver holds for the edit as safetensors bytes,
`order` the JSON list of edit ids, `guard` the drift guard's rotation after its last check (JSON).
Decoding is the identity, so opening a journal cannot run code. Each edit (record, delta, order and
the base hashes of newly touched parameters) is committed in one sqlite transaction, so a crash leaves
the journal at the last whole edit. An exclusive file lock beside the journal keeps a second process
out while one has it open.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock, Timeout
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from sqlitedict import SqliteDict

from ..core.delta import Delta
from ..core.errors import EditNotFoundError, JournalError, ModelMismatchError
from ..core.record import EditRecord

FORMAT = "factedit.journal/1"
TABLE = "factedit_journal"
# How long a write waits for a lock another SQLite connection holds before it fails (SQLite's default
# through Python, said here). Other factedit processes never get that far: the lock file keeps them out.
BUSY_TIMEOUT_S = 5.0
_SQLITE_MAGIC = b"SQLite format 3\x00"


def _encode(value: bytes) -> sqlite3.Binary:
    return sqlite3.Binary(value)


def _decode(value: bytes) -> bytes:
    return bytes(value)


def _json_bytes(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True).encode()


class Journal:
    """An open journal file. Use as a context manager, or call `close()`.

    lock_timeout: seconds to wait for another process to close the journal before giving up.
    create: make a new journal when `path` does not exist (False: refuse, for readers such as the
        CLI's `history` and `revert`, which must not create a misspelled file).
    Anything that is not a usable journal (a directory, a missing folder, another file, unreadable
    metadata) is refused with a JournalError, and no file is created.
    """

    def __init__(self, path: str | os.PathLike, *, lock_timeout: float = 10.0, create: bool = True) -> None:
        self.path = Path(path)
        _check_is_journal_or_new(self.path, create)
        self._lock_file = _acquire_lock(self.path.with_name(self.path.name + ".lock"), lock_timeout)
        try:
            self._db = self._open_db()
            self.meta: dict[str, Any] = _read_meta(self.path, self._db["meta"]) if "meta" in self._db else {}
        except Exception:
            self.close()
            raise

    # --- reading -----------------------------------------------------------------------------------
    @property
    def is_new(self) -> bool:
        return not self.meta

    def order(self) -> list[str]:
        return json.loads(self._db["order"]) if "order" in self._db else []

    def records(self, *, deltas: bool = True) -> list[EditRecord]:
        """Every record, oldest first. With `deltas`, the active edits carry theirs and their held keys;
        a reverted edit's delta is read only when asked for, through `record` (to diff or export it)."""
        records = [self.record(edit_id, delta=False) for edit_id in self.order()]
        if not deltas:
            return records
        return [replace(r, delta=self._delta(r.id), held_keys=self._tensors("keys", r.id)) if r.status == "active"
                else r for r in records]

    def record(self, edit_id: str, *, delta: bool = True) -> EditRecord:
        """One record, with its delta unless `delta` is False."""
        try:
            data = json.loads(self._db[f"record/{edit_id}"])
        except KeyError:
            raise EditNotFoundError(f"edit {edit_id} is not in journal {self.path}") from None
        return EditRecord.from_dict(data, delta=self._delta(edit_id) if delta else None)

    def _delta(self, edit_id: str) -> Delta:
        try:
            return Delta.from_bytes(self._db[f"delta/{edit_id}"])
        except KeyError:
            pass
        record = self.record(edit_id, delta=False)
        if record.compacted_at is not None:
            when = time.strftime("%Y-%m-%d %H:%M", time.localtime(record.compacted_at))
            raise EditNotFoundError(f"edit {edit_id} was reverted and its delta dropped when the journal was "
                                    f"compacted ({when}); its record remains") from None
        raise EditNotFoundError(f"edit {edit_id} has no delta in journal {self.path}")

    def state(self, edit_id: str) -> dict[str, torch.Tensor] | None:
        """The lifelong state an edit left (`StreamState.after`), or None when its method keeps none."""
        return self._tensors("state", edit_id)

    def _tensors(self, kind: str, edit_id: str) -> dict[str, torch.Tensor] | None:
        """An edit's tensors stored under `kind` ("state", "keys"), or None when it has none."""
        key = f"{kind}/{edit_id}"
        if key not in self._db:
            return None
        try:
            return load_safetensors(self._db[key])
        except (SafetensorError, ValueError) as exc:
            raise JournalError(f"{self.path}: the {kind} of edit {edit_id} is unreadable ({exc})") from None

    def latest_states(self, records: list[EditRecord] | None = None) -> dict[str, dict[str, torch.Tensor]]:
        """method -> the state its latest edit (active or reverted) left, for the methods that keep one;
        `records` (oldest first) when the caller has read them already."""
        states: dict[str, dict[str, torch.Tensor]] = {}
        for record in reversed(records if records is not None else self.records(deltas=False)):
            if record.method not in states and (state := self.state(record.id)) is not None:
                states[record.method] = state
        return states

    def check_model(self, model_id: str, fingerprint: str, sha256: str | None = None) -> None:
        """Refuse a model other than the one the journal was made with: by the sha256 of all its
        parameters (`model_sha256`) when the journal has it, else by the sampled fingerprint."""
        if not self.meta:
            return
        recorded = self.meta.get("model_sha256")
        if recorded is not None and sha256 is not None:
            if recorded != sha256:
                raise ModelMismatchError(
                    f"journal {self.path} was made on model {self.meta['model_id']!r} with other weights "
                    f"(sha256 of all parameters {recorded[:16]}…, the given model {model_id!r} has "
                    f"{sha256[:16]}…): another model, or one already edited. Give a freshly loaded copy "
                    "of the journal's base model, or start a new journal."
                )
            return
        if self.meta["model_fingerprint"] != fingerprint:
            raise ModelMismatchError(
                f"journal {self.path} was made with model {self.meta['model_id']!r} (fingerprint "
                f"{self.meta['model_fingerprint']}); the given model {model_id!r} has fingerprint "
                f"{fingerprint}. Load the journal's model, or start a new journal."
            )

    # --- writing (each call is one transaction) ----------------------------------------------------
    def append(
        self, record: EditRecord, base_hashes: Mapping[str, str], model_sha256: str | None = None,
        weights_hashes: Mapping[str, str] | None = None,
    ) -> None:
        """Store `record` and its delta; `base_hashes` are hashes of parameters it touches first;
        `model_sha256` (the base model's, all parameters) is recorded with the first edit;
        `weights_hashes`: the touched parameters' hashes after it (`weights_hashes()`, checked on replay)."""
        if record.delta is None:
            raise JournalError("a record must carry its delta to be journaled")
        meta = self.meta or {
            "format": FORMAT,
            "model_id": record.model_id,
            "model_fingerprint": record.model_fingerprint,
            "model_sha256": model_sha256,
            "factedit_version": record.factedit_version,
            "created_at": time.time(),
            "base_hashes": {},
        }
        meta = {**meta, "base_hashes": {**meta["base_hashes"], **base_hashes},
                "weights_sha256": {**meta.get("weights_sha256", {}), **(weights_hashes or {})}}
        delta_meta = {"edit_id": record.id, "method": record.method, "model_id": record.model_id}
        try:
            order = self.order()
        except sqlite3.Error as exc:
            raise JournalError(f"could not write journal {self.path}: {exc}") from exc
        items = {
            f"record/{record.id}": _json_bytes(record.to_dict()),
            f"delta/{record.id}": record.delta.to_bytes(delta_meta),
            "order": _json_bytes([*order, record.id]),
            "meta": _json_bytes(meta),
        }
        for kind, tensors in (("state", record.state), ("keys", record.held_keys)):
            if tensors is not None:
                stored = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
                items[f"{kind}/{record.id}"] = save_safetensors(stored, metadata=delta_meta)
        self._commit(items)
        self.meta = meta

    def guard_rotation(self) -> dict[str, Any] | None:
        """The drift guard's rotation after its last check (`DriftGuard.rotation`, with the model's
        fingerprint), or None when no check was made."""
        if "guard" not in self._db:
            return None
        try:
            rotation = json.loads(self._db["guard"])
        except ValueError:
            raise JournalError(f"{self.path}: its guard rotation is not JSON; the file is corrupt") from None
        return rotation if isinstance(rotation, dict) else None

    def set_guard_rotation(self, rotation: Mapping[str, Any]) -> None:
        """Keep the guard's rotation after a check, accepted or refused (its own transaction): the
        writer's guard moved on either way."""
        self._commit({"guard": _json_bytes(dict(rotation))})

    def set_status(self, record: EditRecord, weights_hashes: Mapping[str, str] | None = None) -> None:
        """Rewrite the record's status fields (revert); `weights_hashes` as for `append`, after it."""
        self.set_statuses([record], weights_hashes)

    def set_statuses(self, records: Sequence[EditRecord], weights_hashes: Mapping[str, str] | None = None) -> None:
        """Rewrite several records' status fields in one transaction (`Editor.revert_all`);
        `weights_hashes` as for `append`, after all of them."""
        keys = [f"record/{record.id}" for record in records]
        try:
            unknown = [key.partition("/")[2] for key in keys if key not in self._db]
        except sqlite3.Error as exc:
            raise JournalError(f"could not write journal {self.path}: {exc}") from exc
        if unknown:
            raise EditNotFoundError(f"edit(s) {', '.join(unknown)} not in journal {self.path}")
        items = {key: _json_bytes(record.to_dict()) for key, record in zip(keys, records, strict=True)}
        if weights_hashes and self.meta:
            meta = {**self.meta, "weights_sha256": {**self.meta.get("weights_sha256", {}), **weights_hashes}}
            items["meta"] = _json_bytes(meta)
        self._commit(items)
        if "meta" in items:
            self.meta = meta

    def weights_hashes(self) -> dict[str, str]:
        """sha256 of each parameter an edit has touched, as the last change (edit or revert) left it: a
        replay must give exactly these (`Editor.attach` checks)."""
        return dict(self.meta.get("weights_sha256", {}))

    def compact(self, older_than_s: float = 0.0, now: float | None = None) -> dict[str, Any]:
        """Drop the deltas of edits reverted at least `older_than_s` seconds ago, and the keys held for
        them (one transaction, then VACUUM gives the space back). Their records stay, marked
        `compacted_at`; the state each lifelong method's latest edit left stays too (the stream goes on
        from it). Replay reads only active edits' deltas and keys and those states, so the journal
        replays bit for bit as before; a dropped delta can no longer be diffed, exported or re-applied.

        Returns {"dropped": edits compacted now, "bytes_before", "bytes_after"}."""
        if older_than_s < 0:
            raise ValueError("older_than_s must be >= 0")
        now = time.time() if now is None else now
        records = self.records(deltas=False)
        latest_states = {record.method: record.id for record in records if f"state/{record.id}" in self._db}
        dropped = [r for r in records if r.status == "reverted" and r.compacted_at is None
                   and r.reverted_at is not None and now - r.reverted_at >= older_than_s]
        bytes_before = self.path.stat().st_size
        # In chunks (SQLite bounds a statement's parameters); a chunk whose deletion failed after its
        # records were marked leaves deltas that are still readable: nothing is lost.
        for first in range(0, len(dropped), 256):
            chunk = dropped[first:first + 256]
            items = {f"record/{r.id}": _json_bytes(replace(r, compacted_at=now).to_dict()) for r in chunk}
            removed = [f"delta/{r.id}" for r in chunk]
            removed += [f"keys/{r.id}" for r in chunk if f"keys/{r.id}" in self._db]
            removed += [f"state/{r.id}" for r in chunk
                        if f"state/{r.id}" in self._db and latest_states.get(r.method) != r.id]
            self._commit(items, removed)
        if dropped:
            self._vacuum()
        return {"dropped": len(dropped), "bytes_before": bytes_before, "bytes_after": self.path.stat().st_size}

    def _vacuum(self) -> None:
        """Rebuild the file without the space deleted rows left (sqlite keeps it otherwise)."""
        self._db.close()
        try:
            with contextlib.closing(sqlite3.connect(self.path)) as connection:
                connection.execute("VACUUM")
        finally:
            self._db = self._open_db()

    def _commit(self, items: Mapping[str, bytes], removed: Sequence[str] = ()) -> None:
        """Write `items` in ONE statement, then delete `removed` (a second statement), and commit.

        sqlitedict runs statements on a worker thread that goes on after a failed one and then commits:
        an edit written as several statements could commit its record without its delta. One multi-row
        REPLACE is atomic in SQLite: it writes every item or none."""
        try:
            if items:
                rows = ", ".join(["(?, ?)"] * len(items))
                values = [part for key, value in items.items() for part in (self._db.encode_key(key), _encode(value))]
                self._db.conn.execute(f'REPLACE INTO "{TABLE}" (key, value) VALUES {rows}', values)
            if removed:
                marks = ", ".join(["?"] * len(removed))
                self._db.conn.execute(f'DELETE FROM "{TABLE}" WHERE key IN ({marks})',
                                      [self._db.encode_key(key) for key in removed])
            self._db.commit(blocking=True)
        except Exception as exc:
            # Drop the uncommitted writes: the file stays at the last whole transaction.
            self._reopen()
            raise JournalError(f"could not write journal {self.path}: {exc}") from exc

    def _open_db(self) -> SqliteDict:
        db = SqliteDict(
            str(self.path), tablename=TABLE, flag="c", autocommit=False,
            encode=_encode, decode=_decode, outer_stack=False,
        )
        db.conn.execute(f"PRAGMA busy_timeout = {round(BUSY_TIMEOUT_S * 1000)}")
        return db

    def _reopen(self) -> None:
        self._db.close(do_log=False)  # without autocommit, closing rolls back what was not committed
        self._db = self._open_db()

    def close(self) -> None:
        db = getattr(self, "_db", None)
        if db is not None:
            db.close()
            self._db = None
        if getattr(self, "_lock_file", None) is not None:
            self._lock_file.release()
            self._lock_file = None

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_META_KEYS = ("format", "model_id", "model_fingerprint", "base_hashes")


def _read_meta(path: Path, raw: bytes) -> dict[str, Any]:
    """The journal's metadata, checked: JSON, this format, the keys every journal has."""
    try:
        meta = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise JournalError(f"{path}: its metadata is not JSON; the file is corrupt") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise JournalError(f"{path} has journal format {found!r}, not {FORMAT}")
    missing = [k for k in _META_KEYS if k not in meta]
    if missing or not isinstance(meta["base_hashes"], dict):
        raise JournalError(f"{path}: its metadata lacks {missing or ['base_hashes']}; the file is corrupt")
    return meta


def _check_is_journal_or_new(path: Path, create: bool) -> None:
    """A missing or empty file becomes a new journal (when `create`); anything else must be one."""
    if path.is_dir():
        raise JournalError(f"{path} is a directory; give a journal file path such as {path / 'edits.sqlite'}")
    if not path.parent.is_dir():
        raise JournalError(f"cannot create journal {path}: folder {path.parent} does not exist")
    if not path.exists() and not create:
        raise JournalError(f"no journal at {path} (check the path; `factedit edit --journal` creates one)")
    if not path.exists() or path.stat().st_size == 0:
        return
    with open(path, "rb") as handle:
        if handle.read(16) != _SQLITE_MAGIC:
            raise JournalError(f"{path} is not a factedit journal (not an sqlite file)")
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
            found = conn.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name=?", (TABLE,)).fetchone()
    except sqlite3.DatabaseError as exc:
        raise JournalError(f"{path} is not a readable factedit journal: {exc}") from exc
    if not found:
        raise JournalError(f"{path} is an sqlite file but not a factedit journal (no {TABLE} table)")


def _acquire_lock(lock_path: Path, timeout: float) -> FileLock:
    """An exclusive lock on `lock_path` (held by this process until released, whichever thread releases)."""
    lock = FileLock(lock_path, thread_local=False, preserve_lock_file=True)
    try:
        lock.acquire(timeout=timeout)
    except Timeout:
        raise JournalError(
            f"journal {lock_path.with_suffix('')} is in use by another process; waited {timeout:.0f} s. "
            "Close the other factedit process (CLI, app) or use another journal file."
        ) from None
    return lock
