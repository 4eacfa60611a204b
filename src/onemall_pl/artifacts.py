"""Stage artifacts: ``artifacts/<dataset>/<stage>/`` with a ``manifest.json``.

A stage writes its artifact folder through :func:`write_artifact` (rank 0 only, whole or
not at all) and reads its upstream only through :func:`load_manifest`, which checks that
the folder is complete (every listed file present with the listed sha256) before any work
starts, so a wrong or stale path fails in the first second.

``manifest.json``::

    {"stage": "quantize", "schema_version": 1, "dataset": "synth", "id": "<sha256>",
     "created": "...", "config": {...}, "upstream": {"tokenizer": "<id>"},
     "files": {"sid_table/part-00000.parquet": {"sha256": "...", "bytes": 123}},
     "sizes": {"codebook_sizes": [256, 256, 4096]}, "metrics": {...}}
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from onemall_pl.io import atomic_dir, sha256_file, write_json

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"


class ArtifactError(ValueError):
    """An artifact folder is missing, incomplete, or does not fit what reads it."""


@dataclass
class Manifest:
    stage: str
    dataset: str
    config: dict = field(default_factory=dict)
    upstream: dict[str, str] = field(default_factory=dict)  # stage -> manifest id
    files: dict[str, dict] = field(default_factory=dict)  # relpath -> {sha256, bytes}
    sizes: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION
    id: str = ""
    created: str = ""
    path: str = field(default="", compare=False)  # where it was loaded from (not saved)

    def file(self, relpath: str) -> Path:
        """Absolute path of a listed file (or folder prefix of listed files)."""
        if relpath not in self.files and not any(k.startswith(relpath.rstrip("/") + "/") for k in self.files):
            raise ArtifactError(f"{self.path}: the {self.stage} manifest lists no file {relpath!r} "
                                f"(it lists {sorted(self.files)[:10]})")
        return Path(self.path) / relpath

    def size(self, key: str):
        if key not in self.sizes:
            raise ArtifactError(f"{self.path}: the {self.stage} manifest has no size {key!r} "
                                f"(it has {sorted(self.sizes)})")
        return self.sizes[key]


def stage_dir(root: str | os.PathLike, dataset: str, stage: str) -> Path:
    return Path(root) / dataset / stage


def _hash_files(folder: Path) -> dict[str, dict]:
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            out[p.relative_to(folder).as_posix()] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
    return out


def write_artifact(dest: str | os.PathLike, build: Callable[[Path], None], *, stage: str, dataset: str,
                   config: dict | None = None, upstream: list[Manifest] | None = None,
                   sizes: dict | None = None, metrics: dict | None = None) -> Manifest:
    """Build an artifact folder with ``build(tmp_dir)`` and publish it with its manifest, atomically.

    ``build`` writes the files (checkpoints, Parquet, JSON); this hashes them, writes
    ``manifest.json`` and renames the folder into place. ``sizes`` / ``metrics`` may also be
    filled by ``build`` through the returned dicts: pass dicts and mutate them.
    Call it on rank 0 only.
    """
    with atomic_dir(dest) as tmp:
        build(tmp)
        files = _hash_files(tmp)
        m = Manifest(stage=stage, dataset=dataset, config=config or {},
                     upstream={u.stage: u.id for u in (upstream or [])}, files=files,
                     sizes=sizes or {}, metrics=metrics or {},
                     created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
        m.id = hashlib.sha256(json.dumps({"stage": stage, "files": files, "upstream": m.upstream},
                                         sort_keys=True).encode()).hexdigest()[:16]
        d = asdict(m)
        d.pop("path")
        write_json(tmp / MANIFEST, d)
    m.path = str(dest)
    return m


def load_manifest(folder: str | os.PathLike, *, stage: str | None = None, verify: bool = True) -> Manifest:
    """Read and check an artifact folder; raise :class:`ArtifactError` saying what is wrong."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.exists():
        hint = f" (run the {stage} stage first, e.g. `make {stage}`)" if stage else ""
        raise ArtifactError(f"{path} not found: {folder} is not a finished artifact folder{hint}")
    try:
        d = json.loads(path.read_text())
        m = Manifest(**d)
    except (json.JSONDecodeError, TypeError) as e:
        raise ArtifactError(f"{path}: malformed manifest ({e})") from None
    m.path = str(folder)
    if stage is not None and m.stage != stage:
        raise ArtifactError(f"{path}: expected a {stage!r} artifact, found stage {m.stage!r}")
    if m.schema_version != SCHEMA_VERSION:
        raise ArtifactError(f"{path}: schema version {m.schema_version}, this code reads {SCHEMA_VERSION}")
    if verify:
        for rel, info in m.files.items():
            f = folder / rel
            if not f.exists():
                raise ArtifactError(f"{path}: listed file {rel} is missing")
            if f.stat().st_size != info["bytes"] or sha256_file(f) != info["sha256"]:
                raise ArtifactError(f"{path}: file {rel} does not match its sha256 in the manifest "
                                    "(changed or corrupted after the stage wrote it)")
    return m


def check_upstream(m: Manifest, upstream: Manifest) -> None:
    """Raise if ``m`` was built from another version of ``upstream`` than the one on disk."""
    want = m.upstream.get(upstream.stage)
    if want is not None and want != upstream.id:
        raise ArtifactError(f"{m.path}: built from {upstream.stage} {want}, but {upstream.path} holds "
                            f"{upstream.id}; rerun the {m.stage} stage")
