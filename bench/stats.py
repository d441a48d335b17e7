"""The arithmetic of the benchmark, free of I/O: medians, spreads, paired ratios, and the token
equality gate. Tested by tests/test_bench.py."""

from __future__ import annotations

import statistics
from typing import Dict, Iterable, List, Mapping, Optional, Sequence


def median(values: Iterable[float]) -> Optional[float]:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def spread(values: Iterable[float]) -> Optional[Dict[str, float]]:
    """{"median", "min", "max", "n"} of the values that are not None, or None if there are none."""
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def paired_ratios(peer: Mapping[int, float], base: Mapping[int, float]) -> List[float]:
    """peer/base for every repetition (key) where both have a value: pair by pair, so the
    machine's drift between repetitions cancels out."""
    return [peer[k] / base[k] for k in sorted(set(peer) & set(base))
            if peer[k] is not None and base[k] not in (None, 0)]


def ratio_summary(peer: Mapping[int, float], base: Mapping[int, float]) -> Optional[Dict[str, float]]:
    """Median and min-max of the per-repetition ratios peer/base."""
    return spread(paired_ratios(peer, base))


def text_tokens(tokens: Sequence[int], eot: int) -> List[int]:
    """Text token ids only: those below the end-of-text id (special and timestamp tokens are above)."""
    return [int(t) for t in tokens if int(t) < eot]


def tokens_by_window(segments: Sequence[Mapping], eot: int) -> List[List[int]]:
    """Text tokens grouped by decoding window: segments of one window share their `seek`."""
    windows: List[List[int]] = []
    last_seek = object()
    for seg in segments:
        if seg["seek"] != last_seek:
            windows.append([])
            last_seek = seg["seek"]
        windows[-1].extend(text_tokens(seg["tokens"], eot))
    return windows


def temperatures_by_window(segments: Sequence[Mapping]) -> List[float]:
    """The temperature each decoding window was decoded at (segments of one window share their `seek`;
    0.0 where a segment has none)."""
    temps: List[float] = []
    last_seek = object()
    for seg in segments:
        if seg["seek"] != last_seek:
            temps.append(float(seg.get("temperature") or 0.0))
            last_seek = seg["seek"]
    return temps


def first_sampled_window(*temperatures: Sequence[float]) -> Optional[int]:
    """The first window that any side decoded by sampling (temperature above 0), or None. From there on
    token equality is not expected: openai-whisper samples with torch's generator."""
    hits = [next((i for i, t in enumerate(ts) if t and t > 0), None) for ts in temperatures]
    hits = [h for h in hits if h is not None]
    return min(hits) if hits else None


def find_divergence(reference: Sequence[Sequence[int]], other: Sequence[Sequence[int]]) -> Optional[dict]:
    """The first place where two transcriptions' tokens differ, or None if identical.

    Both are lists of windows, each a list of text token ids. Returns {"window", "index",
    "reference", "other"}: the window number, the token index within it, and both ids there
    (None where one side has no token: it is shorter, or has fewer windows).
    """
    for w in range(max(len(reference), len(other))):
        a = list(reference[w]) if w < len(reference) else []
        b = list(other[w]) if w < len(other) else []
        if w >= len(reference) or w >= len(other):
            i = 0
            return {"window": w, "index": i, "reference": a[i] if a else None, "other": b[i] if b else None}
        for i in range(max(len(a), len(b))):
            x = a[i] if i < len(a) else None
            y = b[i] if i < len(b) else None
            if x != y:
                return {"window": w, "index": i, "reference": x, "other": y}
    return None


def describe_divergence(d: Optional[dict]) -> str:
    if d is None:
        return "identical"
    return f"window {d['window']}, token {d['index']}: reference {d['reference']}, got {d['other']}"


def per_token_ms(decode_s: Optional[float], n_tokens: Optional[int]) -> Optional[float]:
    if decode_s is None or not n_tokens:
        return None
    return 1000.0 * decode_s / n_tokens


def fmt(s: Optional[dict], digits: int = 2, spread_too: bool = True) -> str:
    """A spread() summary as a table cell: the median, and (min-max) when there was more than one run."""
    if not s:
        return "-"
    m = f"{s['median']:.{digits}f}"
    if spread_too and s["n"] > 1:
        m += f" ({s['min']:.{digits}f}–{s['max']:.{digits}f})"
    return m
