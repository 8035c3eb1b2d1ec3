"""What the stages hand each other on disk: checkpoints and bundles.

`open_artifact(path)` is the one place that decides what a path is. Everything here is
torch-free: the bundle runtime and the board-side tools read these formats without torch.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from edge_vla.artifacts.bundle import MANIFEST
from edge_vla.artifacts.checkpoint import CONFIG_FILE, PROVENANCE_FILES, WEIGHTS_FILE, check_checkpoint_dir
from edge_vla.errors import EdgeVLAError
from edge_vla.io import sha256_file

CHECKPOINT, BUNDLE = "checkpoint", "bundle"


@dataclass(frozen=True)
class Artifact:
    kind: str  # CHECKPOINT or BUNDLE
    path: Path

    @property
    def is_bundle(self) -> bool:
        return self.kind == BUNDLE

    def config(self):
        """The VLAConfig it was made from (read from config.json or the manifest; no weights loaded)."""
        if self.is_bundle:
            from edge_vla.artifacts.bundle import load_bundle

            return load_bundle(self.path, verify=False).config
        from edge_vla.artifacts.checkpoint import load_config

        return load_config(self.path)

    def size_bytes(self) -> int:
        """Bytes of what it holds: a bundle's manifest-listed files, a checkpoint's every file."""
        if self.is_bundle:
            from edge_vla.artifacts.bundle import load_bundle

            return load_bundle(self.path, verify=False).size_bytes
        return sum(f.stat().st_size for f in self.path.rglob("*") if f.is_file())


def artifact_kind(path: str | os.PathLike) -> str | None:
    """CHECKPOINT, BUNDLE, or None: a cheap look at the directory's marker file, no validation."""
    p = Path(path)
    if (p / MANIFEST).is_file():
        return BUNDLE
    if (p / CONFIG_FILE).is_file() and (p / WEIGHTS_FILE).is_file():
        return CHECKPOINT
    return None


def open_artifact(path: str | os.PathLike) -> Artifact:
    """Say what `path` is (a checkpoint or a bundle directory), or one clear line saying it is neither."""
    p = Path(path)
    if not p.exists():
        raise EdgeVLAError(f"no checkpoint or bundle at {p}",
                           "pass a directory written by `edge-vla train` or `edge-vla export`")
    if not p.is_dir():
        raise EdgeVLAError(f"{p} is a file; a checkpoint or bundle is a directory", "pass the directory")
    kind = artifact_kind(p)
    if kind is None and (p / CONFIG_FILE).is_file():
        check_checkpoint_dir(p)  # a checkpoint missing a part: say which
    if kind is None:
        raise EdgeVLAError(f"{p} is neither an edge-vla checkpoint ({CONFIG_FILE} + {WEIGHTS_FILE}) nor a bundle "
                           f"({MANIFEST})", "pass a directory written by `edge-vla train` or `edge-vla export`")
    return Artifact(kind, p)


def content_digest(path: str | os.PathLike) -> str:
    """sha256 of what a checkpoint or bundle holds, so a stage recorded for the old contents of a
    path is not reused for new ones (re-shipped checkpoints, a re-export). A bundle hashes its
    manifest only: the manifest carries every file's sha256, and loading a bundle checks them.
    A checkpoint's training summaries are provenance, not what it computes: not hashed."""
    p = Path(path)
    if p.is_file():
        return sha256_file(p)
    if artifact_kind(p) == BUNDLE:
        return sha256_file(p / MANIFEST)
    h = hashlib.sha256()
    for f in sorted(q for q in p.rglob("*") if q.is_file() and q.name not in PROVENANCE_FILES):
        h.update(f"{f.relative_to(p)}\0{sha256_file(f)}\n".encode())
    return h.hexdigest()


__all__ = ["Artifact", "BUNDLE", "CHECKPOINT", "artifact_kind", "content_digest", "open_artifact"]
