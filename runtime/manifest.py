"""The manifest of `runtime transcribe-many`: which audio files to transcribe, and each one's output name.

Two formats, told apart by the file's suffix:
- `*.jsonl`: one JSON object a line, `{"path": "talk.mp3"}`, optionally with `"id": "talk-2024"`, the
  name of its output file (`<id>.json`) when file stems collide or are not what you want;
- anything else: plain text, one path a line. Blank lines and lines starting with `#` are skipped,
  and surrounding whitespace is dropped (a path that begins or ends with spaces needs JSONL).

A relative path is taken from the manifest's folder, not from the current directory, so a manifest
means the same wherever the command runs; on a cluster, paths must name the same files on every
worker (shared storage). The output name is the id, else the file's stem; two entries with one name
are refused before any work, since one output would overwrite the other.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import List

# the command writes its summary next to the results under this name, so no entry may take it
SUMMARY_NAME = "_summary"


class ManifestError(Exception):
    """A one-line reason why a manifest cannot be used."""


@dataclass(frozen=True)
class Entry:
    path: str  # absolute, as the workers will open it
    name: str  # output file name without ".json"
    line: int  # 1-based line in the manifest, for messages


def read_manifest(manifest: str | os.PathLike) -> List[Entry]:
    """The entries of `manifest` in order; ManifestError when it is missing, unreadable, malformed,
    empty, or two entries would write the same output file."""
    manifest = Path(manifest)
    try:
        text = manifest.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ManifestError(f"manifest {manifest} not found") from None
    except IsADirectoryError:
        raise ManifestError(f"manifest {manifest} is a directory, not a file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ManifestError(f"cannot read manifest {manifest}: {exc}") from None

    base = manifest.resolve().parent
    jsonl = manifest.suffix.lower() == ".jsonl"
    entries: List[Entry] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or (not jsonl and line.startswith("#")):
            continue
        path, name = _parse_jsonl_line(manifest, number, line) if jsonl else (line, None)
        absolute = os.path.normpath(base / os.path.expanduser(path))
        entries.append(Entry(absolute, name if name is not None else Path(absolute).stem, number))
    if not entries:
        raise ManifestError(f"manifest {manifest} lists no audio files")

    seen: dict[str, Entry] = {}
    for entry in entries:
        if not entry.name or entry.name in (".", "..") or "/" in entry.name or os.sep in entry.name:
            raise ManifestError(f"{manifest}:{entry.line}: {entry.name!r} cannot name an output file")
        if entry.name == SUMMARY_NAME:
            raise ManifestError(f"{manifest}:{entry.line}: the name {SUMMARY_NAME!r} is the summary's; "
                                "give the entry another \"id\" (JSONL manifest)")
        first = seen.setdefault(entry.name, entry)
        if first is not entry:
            raise ManifestError(f"{manifest}:{entry.line}: output name {entry.name!r} is also line {first.line}'s "
                                f"({first.path}); give each an \"id\" (JSONL manifest)")
    return entries


def _parse_jsonl_line(manifest: Path, number: int, line: str) -> tuple[str, str | None]:
    try:
        record = json.loads(line)
    except ValueError as exc:
        raise ManifestError(f"{manifest}:{number}: not a JSON object ({exc})") from None
    if not isinstance(record, dict) or not isinstance(record.get("path"), str) or not record["path"]:
        raise ManifestError(f"{manifest}:{number}: each line needs {{\"path\": \"...\"}}")
    name = record.get("id")
    if name is not None and not isinstance(name, (str, int)):
        raise ManifestError(f"{manifest}:{number}: \"id\" must be a string or a number")
    return record["path"], None if name is None else str(name)
