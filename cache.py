"""An on-disk cache of arrays per training example: what the frozen models compute once per run, not per step.

Distillation on a CPU spends most of a naive step re-running frozen networks (the teacher, a frozen
encoder) on the same utterances epoch after epoch. Their outputs go here instead, once:

    FOLDER/key.json                 what every entry depends on (teacher weights, front end, settings)
    FOLDER/items/ID.NAME.npy        one example's arrays (float16 features, top-k logits, ...)
    FOLDER/items/ID.json            written last: the arrays' names and checksums, and small fields

Properties the training job relies on:
- **Keyed.** key.json records the teacher's weight fingerprint, the front-end settings and whatever else
  the entries depend on; a folder made under another key is detected and emptied, never silently used.
  Each item's name is a hash of its audio content, so changed audio is a new item.
- **Atomic and resumable.** Each file is written to a temporary name and renamed; the .json goes last,
  so an item without one (a kill mid-write) does not exist, and a rerun computes it again.
- **Verified.** Reading an item checks its checksum; a truncated or corrupt item is deleted and reported
  as missing, so the caller recomputes it.
- **Memory-mapped.** Arrays are plain .npy files; `load` maps them instead of reading, so a cache larger
  than memory still trains.
"""
import hashlib
import json
import shutil
from pathlib import Path
from typing import Dict, Optional, Sequence

import numpy as np
import torch

from load import atomic_write


def fingerprint_model(model: torch.nn.Module) -> str:
    """A short hash of every weight of a model (and their names): equal weights, equal fingerprint."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def fingerprint_files(paths) -> str:
    """A short hash of the bytes of files, in order: the identity of an example's audio."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:20]


def _checksum(path: Path) -> str:
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class ArrayCache:
    """Arrays and small JSON fields per item id, under a key (see the module docstring)."""

    def __init__(self, folder, key: dict, log=print):
        self.folder = Path(folder)
        self.items = self.folder / "items"
        self.key = json.loads(json.dumps(key))  # as it reads back from disk
        key_file = self.folder / "key.json"
        if key_file.exists():
            try:
                found = json.loads(key_file.read_text())
            except (OSError, ValueError):
                found = None
            if found != self.key:
                log(f"cache {self.folder} was made under another key ({_difference(found, self.key)}): rebuilding it")
                shutil.rmtree(self.items, ignore_errors=True)
                key_file.unlink()
        self.items.mkdir(parents=True, exist_ok=True)
        if not key_file.exists():
            atomic_write(key_file, lambda f: f.write(json.dumps(self.key, indent=1).encode()))
        for stale in self.items.glob(".*.tmp"):  # left by a process killed mid-write
            stale.unlink(missing_ok=True)

    def _meta(self, item: str) -> Path:
        return self.items / f"{item}.json"

    def _array(self, item: str, name: str) -> Path:
        return self.items / f"{item}.{name}.npy"

    def has(self, item: str) -> bool:
        return self._meta(item).exists()

    def put(self, item: str, arrays: Dict[str, np.ndarray], fields: Optional[dict] = None) -> None:
        """Store an item's arrays (float16 stays float16) and small JSON-able fields, atomically."""
        checksums = {}
        for name, array in arrays.items():
            path = self._array(item, name)
            atomic_write(path, lambda f: np.save(f, np.ascontiguousarray(array)))
            checksums[name] = _checksum(path)
        record = dict(fields=fields or {}, checksums=checksums)
        atomic_write(self._meta(item), lambda f: f.write(json.dumps(record).encode()))

    def _record(self, item: str) -> Optional[dict]:
        try:
            return json.loads(self._meta(item).read_text())
        except (OSError, ValueError):
            return None

    def fields(self, item: str) -> Optional[dict]:
        """The item's small fields, or None if the item is missing or unreadable."""
        record = self._record(item)
        return None if record is None else record.get("fields")

    def verify(self, item: str) -> bool:
        """Whether the item is complete and intact; a damaged one is deleted (so it will be recomputed)."""
        record = self._record(item)
        try:
            if record is not None and all(_checksum(self._array(item, name)) == checksum
                                          for name, checksum in record["checksums"].items()):
                return True
        except (OSError, KeyError, TypeError, AttributeError):
            pass
        self.delete(item)
        return False

    def delete(self, item: str) -> None:
        self._meta(item).unlink(missing_ok=True)
        for path in self.items.glob(f"{item}.*.npy"):
            path.unlink(missing_ok=True)

    def load(self, item: str, names: Optional[Sequence[str]] = None) -> Dict[str, np.ndarray]:
        """The item's arrays (all, or the named ones), memory-mapped (read-only). Naming them spares
        reading the item's record: a training loop loads the same few arrays every step."""
        if names is None:
            names = self._record(item)["checksums"]
        return {name: np.load(self._array(item, name), mmap_mode="r") for name in names}


def _difference(found: Optional[dict], wanted: dict) -> str:
    if not isinstance(found, dict):
        return "its key.json is unreadable"
    changed = sorted(k for k in set(found) | set(wanted) if found.get(k) != wanted.get(k))
    return ", ".join(f"{k}: {found.get(k)!r} -> {wanted.get(k)!r}" for k in changed[:3])
