"""Word error rate of a transcript against the text that was spoken.

Both sides are normalized the same light way (lower case, punctuation dropped, apostrophes kept), then
aligned word by word: (substitutions + deletions + insertions) / reference words. Spelled-out numbers
against digits count as errors; the figure is for comparing implementations on the same audio.
"""

from __future__ import annotations

import re
import sys


def words(text: str) -> list[str]:
    return re.sub(r"[^a-z0-9' ]+", " ", text.lower().replace("-", " ")).split()


def word_error_rate(reference: str, hypothesis: str) -> float:
    ref, hyp = words(reference), words(hypothesis)
    if not ref:
        return float(bool(hyp))
    previous = list(range(len(hyp) + 1))
    for i, ref_word in enumerate(ref, 1):
        current = [i] + [0] * len(hyp)
        for j, hyp_word in enumerate(hyp, 1):
            current[j] = min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ref_word != hyp_word))
        previous = current
    return previous[-1] / len(ref)


def main(argv: list[str]) -> int:
    """python -m bench.wer REFERENCE.txt HYPOTHESIS.txt: prints the WER in percent."""
    if len(argv) != 2:
        print("usage: python -m bench.wer REFERENCE.txt HYPOTHESIS.txt", file=sys.stderr)
        return 2
    try:
        reference, hypothesis = (open(path, encoding="utf-8").read() for path in argv)
    except OSError as exc:
        print(f"error: {exc.filename}: {exc.strerror}", file=sys.stderr)
        return 1
    print(f"word error rate: {100 * word_error_rate(reference, hypothesis):.1f}% "
          f"({len(words(reference))} reference words)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
