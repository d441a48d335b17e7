"""The host-side fast paths of runtime.decoding against straightforward reference implementations.

The beam search update, the timestamp rules and greedy's chosen log-probabilities avoid the full
float64 log-softmax of the batch and Python loops over rows; they must give exactly what the plain
computation gives: the same tokens, float32 bits, cache reorders, finished sequences (keys, values,
order) and logit masks. The references below are that plain computation (the runtime's code before
the fast paths). Random logits, with the cases that could tell them apart: exact ties at the k-th
value, logits whose float32 log-probabilities collide, rows that are all -inf or hold a nan, fewer
finite logits than beams, tiny vocabularies. No model is needed.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from runtime import decoding as rd

ERRSTATE = dict(invalid="ignore", divide="ignore", over="ignore")


# ---------------------------------------------------------------------------- references


def reference_log_softmax(logits):
    x = np.asarray(logits, dtype=np.float64)
    with np.errstate(**ERRSTATE):
        m = np.max(x, axis=-1, keepdims=True)
        shifted = x - m
        return shifted - np.log(np.sum(np.exp(shifted), axis=-1, keepdims=True))


def reference_top_k(row, k):
    return np.argsort(-row, kind="stable")[:k]


def reference_chosen_logprobs(logits, chosen):
    rows = np.arange(logits.shape[0])
    with np.errstate(**ERRSTATE):
        peak = logits.max(axis=-1, keepdims=True)
        total = np.exp(logits - peak).sum(axis=-1, dtype=np.float64)
        logsumexp = peak[:, 0].astype(np.float64) + np.log(total)
        return (logits[rows, chosen].astype(np.float64) - logsumexp).astype(np.float32)


def reference_timestamp_rules(logits, tokens, tokenizer, sample_begin, max_initial_timestamp_index):
    begin, eot = tokenizer.timestamp_begin, tokenizer.eot
    logits[:, tokenizer.no_timestamps] = -np.inf
    for k in range(tokens.shape[0]):
        sampled = tokens[k, sample_begin:]
        last_was_timestamp = len(sampled) >= 1 and sampled[-1] >= begin
        penultimate_was_timestamp = len(sampled) < 2 or sampled[-2] >= begin
        if last_was_timestamp:
            if penultimate_was_timestamp:
                logits[k, begin:] = -np.inf
            else:
                logits[k, :eot] = -np.inf
        timestamps = sampled[sampled >= begin]
        if timestamps.size > 0:
            if last_was_timestamp and not penultimate_was_timestamp:
                first_allowed = int(timestamps[-1])
            else:
                first_allowed = int(timestamps[-1]) + 1
            logits[k, begin:first_allowed] = -np.inf
    if tokens.shape[1] == sample_begin:
        logits[:, :begin] = -np.inf
        if max_initial_timestamp_index is not None:
            logits[:, begin + max_initial_timestamp_index + 1:] = -np.inf
    logprobs = reference_log_softmax(logits)
    for k in range(tokens.shape[0]):
        timestamp_logprob = rd.logsumexp(logprobs[k, begin:])
        max_text_logprob = np.max(logprobs[k, :begin])
        if timestamp_logprob > max_text_logprob:
            logits[k, :begin] = -np.inf


class ReferenceBeamSearch:
    """openai-whisper's BeamSearchDecoder.update in plain numpy: sequences as tuples, full log-softmax."""

    def __init__(self, beam_size, eot, patience=None):
        self.beam_size, self.eot = beam_size, eot
        self.max_candidates = round(beam_size * (patience or 1.0))
        self.finished_sequences = None
        self.reorders = []

    def update(self, tokens, logits, sum_logprobs):
        n_audio = tokens.shape[0] // self.beam_size
        if self.finished_sequences is None:
            self.finished_sequences = [{} for _ in range(n_audio)]
        logprobs = reference_log_softmax(logits).astype(np.float32)
        next_tokens, source_indices, finished_sequences = [], [], []
        new_sum = sum_logprobs.copy()
        for i in range(n_audio):
            scores, sources, finished = {}, {}, {}
            for j in range(self.beam_size):
                idx = i * self.beam_size + j
                prefix = [int(t) for t in tokens[idx]]
                for token in reference_top_k(logprobs[idx], self.beam_size + 1):
                    sequence = tuple(prefix + [int(token)])
                    scores[sequence] = float(np.float32(sum_logprobs[idx]) + logprobs[idx, token])
                    sources[sequence] = idx
            saved = 0
            for sequence in sorted(scores, key=scores.get, reverse=True):
                if sequence[-1] == self.eot:
                    finished[sequence] = scores[sequence]
                else:
                    new_sum[len(next_tokens)] = scores[sequence]
                    next_tokens.append(sequence)
                    source_indices.append(sources[sequence])
                    saved += 1
                    if saved == self.beam_size:
                        break
            finished_sequences.append(finished)
        sum_logprobs[:] = new_sum
        tokens = np.asarray(next_tokens, dtype=np.int64)
        if source_indices != list(range(len(source_indices))):
            self.reorders.append(source_indices)
        for previously, newly in zip(self.finished_sequences, finished_sequences):
            for sequence in sorted(newly, key=newly.get, reverse=True):
                if len(previously) >= self.max_candidates:
                    break
                previously[sequence] = newly[sequence]
        return tokens, all(len(s) >= self.max_candidates for s in self.finished_sequences)


# ---------------------------------------------------------------------------- helpers


def bits(a):
    a = np.asarray(a)
    return a.view({4: np.uint32, 8: np.uint64}[a.dtype.itemsize])


def assert_same_bits(ours, reference):
    assert ours.dtype == reference.dtype and ours.shape == reference.shape
    np.testing.assert_array_equal(bits(ours), bits(reference))


def assert_same_finished(ours, reference):
    """Same dicts: keys in the same order, values with the same bits."""
    assert [list(d) for d in ours] == [list(d) for d in reference]
    assert [[np.float64(v).view(np.uint64) for v in d.values()] for d in ours] == \
           [[np.float64(v).view(np.uint64) for v in d.values()] for d in reference]


def colliding_logits(rng, n_vocab, n_peaks=2, n_cluster=30):
    """Logits whose float32 log-probabilities collide in pairs: a cluster of consecutive float32
    values just above -32 whose log-probabilities (about -32.7) fall in the next binade, where the
    float32 spacing is twice as wide; at random ids, so that id order is not logit order."""
    n_peaks = min(n_peaks, n_vocab)
    n_cluster = min(n_cluster, n_vocab - n_peaks)
    row = rng.normal(-60.0, 1.0, n_vocab).astype(np.float32)
    ids = rng.choice(n_vocab, n_peaks + n_cluster, replace=False)
    row[ids[:n_peaks]] = 0.0  # log_total about log(n_peaks)
    cluster = np.float32(-31.99) + np.arange(n_cluster, dtype=np.float32) * np.spacing(np.float32(-31.99))
    row[ids[n_peaks:]] = cluster
    return row


def adversarial_rows(rng, n_vocab, k):
    """Rows for a top-k: plain, exact ties at the k-th value, float32 collisions, -inf, nan, +inf."""
    rows = [rng.normal(0.0, 3.0, n_vocab).astype(np.float32),
            rng.integers(-3, 3, n_vocab).astype(np.float32)]  # thousands of exact ties
    tied_top = rng.normal(-10.0, 1.0, n_vocab).astype(np.float32)
    tied_top[rng.choice(n_vocab, min(n_vocab, 3 * k), replace=False)] = 5.0  # ties across the k-th
    rows.append(tied_top)
    rows.append(colliding_logits(rng, n_vocab))
    rows.append(colliding_logits(rng, n_vocab, n_peaks=3, n_cluster=4 * k))
    few_finite = np.full(n_vocab, -np.inf, dtype=np.float32)  # fewer finite logits than k, then exactly k
    few_finite[rng.choice(n_vocab, min(n_vocab, max(k - 2, 1)), replace=False)] = 1.0
    rows.append(few_finite)
    exactly_k = np.full(n_vocab, -np.inf, dtype=np.float32)
    exactly_k[rng.choice(n_vocab, min(n_vocab, k), replace=False)] = rng.normal(size=min(n_vocab, k))
    rows.append(exactly_k)
    rows.append(np.full(n_vocab, -np.inf, dtype=np.float32))
    with_nan = rng.normal(size=n_vocab).astype(np.float32)
    with_nan[rng.integers(n_vocab)] = np.nan
    rows.append(with_nan)
    with_inf = rng.normal(size=n_vocab).astype(np.float32)
    with_inf[rng.integers(n_vocab)] = np.inf
    rows.append(with_inf)
    far_apart = rng.normal(0.0, 3.0, n_vocab).astype(np.float32)  # the k best spread far beyond 48
    far_apart[rng.choice(n_vocab, min(n_vocab, k), replace=False)] = np.arange(min(n_vocab, k)) * -100.0 + 500.0
    rows.append(far_apart)
    return np.stack(rows)


# ---------------------------------------------------------------------------- numerics


def test_log_softmax_and_logsumexp_rows_equal_the_references():
    rng = np.random.default_rng(0)
    logits = adversarial_rows(rng, 700, 6)
    assert_same_bits(rd.log_softmax(logits), reference_log_softmax(logits))
    assert_same_bits(rd.log_softmax(logits[0]), reference_log_softmax(logits[0]))
    x = reference_log_softmax(logits)
    rows = rd._logsumexp_rows(x)
    assert rows.shape == (len(x), 1)
    for row, value in zip(x, rows[:, 0]):
        assert bits(np.float64(rd.logsumexp(row))) == bits(value)


@pytest.mark.parametrize("block_bytes", [None, 3 * 8 * 700], ids=["default-blocks", "3-row-blocks"])
def test_log_softmax_terms_by_blocks_and_threads_equal_each_row_alone(block_bytes, monkeypatch):
    """The terms are computed a few rows at a time and half of the rows on the helper thread: every row
    gets the bits it gets computed alone (nan and -inf rows included), whatever the row count."""
    if block_bytes is not None:
        monkeypatch.setattr(rd, "_CACHED_WORK_BYTES", block_bytes)
    rng = np.random.default_rng(3)
    rows = adversarial_rows(rng, 700, 6)
    for n_rows in (1, 2, 4, 5, 9, 40):
        logits = np.ascontiguousarray(rows[rng.integers(0, len(rows), n_rows)])
        work = rd._WorkArray()(logits.shape)
        work[:] = 7.0  # what a previous step left there
        peak, log_total = rd._log_softmax_terms(logits, work)
        assert peak.shape == log_total.shape == (n_rows, 1)
        for r, row in enumerate(logits):
            alone = rd._log_softmax_terms_of(row[None], np.empty((1, row.size)))
            assert bits(peak[r, 0]) == bits(alone[0][0, 0]) and bits(log_total[r, 0]) == bits(alone[1][0, 0]), (n_rows, r)
        assert_same_bits(rd.log_softmax(logits), reference_log_softmax(logits))


def test_work_array_gives_fewer_rows_its_own_first_rows():
    """Rows that leave a batch (finished audios) keep the work array; more rows or another width get a new one."""
    work = rd._WorkArray()
    five = work((5, 700))
    three = work((3, 700))
    assert three.shape == (3, 700) and three.flags["C_CONTIGUOUS"] and np.shares_memory(three, five)
    assert not np.shares_memory(work((6, 700)), five)
    assert work((6, 701)).shape == (6, 701)
    assert work((6, 701), np.float32).dtype == np.float32


def test_in_halves_covers_every_item_once_and_raises_the_helpers_error():
    import threading

    from runtime import host_threads

    calls = []
    host_threads.in_halves(9, lambda start, stop: calls.append((start, stop, threading.get_ident())))
    assert sorted(c[:2] for c in calls) == [(0, 5), (5, 9)]
    if host_threads._other_thread() is not None:  # two usable CPUs: the second half ran on the helper
        assert {c[2] for c in calls if c[0] == 0} == {threading.get_ident()} != {c[2] for c in calls if c[0] == 5}
    calls.clear()
    host_threads.in_halves(3, lambda start, stop: calls.append((start, stop)))  # too few to split
    assert calls == [(0, 3)]

    def fails_on_the_second_half(start, stop):
        if start:
            raise ValueError("second half")

    with pytest.raises(ValueError, match="second half"):
        host_threads.in_halves(8, fails_on_the_second_half)


@pytest.mark.parametrize("beam_size", range(1, 9))
def test_best_tokens_equal_the_top_k_of_the_full_log_softmax(beam_size):
    k = beam_size + 1
    rng = np.random.default_rng(beam_size)
    work = rd._WorkArray()
    for n_vocab in (1, 2, k, 2 * k, 2 * k + 1, 97, 3000):
        logits = adversarial_rows(rng, n_vocab, k)
        ids, logprobs = rd._best_tokens(logits, k, work(logits.shape))
        full = reference_log_softmax(logits).astype(np.float32)
        for r, row in enumerate(full):
            expected = reference_top_k(row, k)
            assert ids[r] == expected.tolist(), (n_vocab, r)
            assert_same_bits(logprobs[r], row[expected])


def test_the_fast_top_k_is_taken_where_it_can_be_shown_right_and_only_there():
    """The full-row path must stay the exception (whisper rows take the fast one), and be taken
    wherever the 2k largest logits do not settle the top k."""
    rng = np.random.default_rng(1)
    k = 6

    def fast(row):
        peak, log_total = rd._log_softmax_terms(row[None])
        return rd._top_k_of_largest_logits(row, k, peak[0, 0], log_total[0, 0]) is not None

    assert all(fast(rng.normal(0.0, 3.0, 51864).astype(np.float32)) for _ in range(20))
    assert fast(colliding_logits(rng, 3000))  # collisions inside the candidates: still settled
    tied = np.zeros(3000, dtype=np.float32)
    tied[:2] = 1.0  # 2998 ties for third place: only the whole row says which ids come first
    assert not fast(tied)
    few = np.full(3000, -np.inf, dtype=np.float32)
    few[[5, 9]] = 1.0
    assert not fast(few)
    assert not fast(np.full(3000, -np.inf, dtype=np.float32))


@pytest.mark.parametrize("n_rows", [1, 3, 6])
def test_chosen_logprobs_in_a_reused_work_array_equal_the_reference(n_rows):
    rng = np.random.default_rng(n_rows)
    work = rd._WorkArray()
    for _ in range(5):  # the work array keeps the previous step's values
        logits = rng.normal(0.0, 3.0, (n_rows, 1000)).astype(np.float32)
        logits[0, rng.integers(0, 1000, 50)] = -np.inf
        if n_rows > 2:
            logits[1] = -np.inf
            logits[2, 7] = np.nan
        for chosen in (logits.argmax(axis=-1), rng.integers(0, 1000, n_rows)):
            ours = rd._chosen_logprobs(logits, chosen, work(logits.shape, logits.dtype))
            assert_same_bits(ours, reference_chosen_logprobs(logits, chosen))


# ---------------------------------------------------------------------------- beam search


EOT = 50


def run_both(beam_size, patience, logits_steps, start):
    """Step our decoder and the reference on the same logits; every output must be identical."""
    reorders = []
    ours = rd.BeamSearchDecoder(beam_size, EOT, reorders.append, patience)
    reference = ReferenceBeamSearch(beam_size, EOT, patience)
    ours.reset()
    our_tokens, reference_tokens = start.copy(), start.copy()
    our_sums = np.zeros(len(start), dtype=np.float32)
    reference_sums = our_sums.copy()
    for step, logits in enumerate(logits_steps):
        our_tokens, our_done = ours.update(our_tokens, logits.copy(), our_sums)
        reference_tokens, reference_done = reference.update(reference_tokens, logits.copy(), reference_sums)
        assert our_tokens.dtype == reference_tokens.dtype and our_tokens.shape == reference_tokens.shape, step
        np.testing.assert_array_equal(our_tokens, reference_tokens, err_msg=f"step {step}")
        assert_same_bits(our_sums, reference_sums)
        assert reorders == reference.reorders, step
        assert_same_finished(ours.finished_sequences, reference.finished_sequences)
        assert our_done == reference_done, step
        if our_done:
            break
    return sum(len(s) for s in ours.finished_sequences)


def random_steps(rng, n_rows, n_vocab, n_steps, quantized):
    for _ in range(n_steps):
        if quantized:  # few distinct values: exact ties everywhere, in logits and in scores
            logits = rng.integers(-4, 2, size=(n_rows, n_vocab)).astype(np.float32)
        else:
            logits = rng.normal(0.0, 2.0, size=(n_rows, n_vocab)).astype(np.float32)
        logits[:, EOT] += rng.uniform(0.0, 6.0, size=n_rows).astype(np.float32)
        yield logits


@pytest.mark.parametrize("beam_size", range(1, 9))
@pytest.mark.parametrize("patience", [None, 0.5, 2.0])
def test_beam_search_equals_the_reference(beam_size, patience):
    if round(beam_size * (patience or 1.0)) <= 0:
        with pytest.raises(rd.DecodingError):
            rd.BeamSearchDecoder(beam_size, EOT, lambda idx: None, patience)
        return
    rng = np.random.default_rng(beam_size * 10 + int(2 * (patience or 0)))
    for n_audio, n_vocab, quantized in ((1, 300, False), (2, 300, True), (3, 64, False)):
        start = np.tile(np.array([[7, 8, 9]], dtype=np.int64), (n_audio * beam_size, 1))  # all rows share it
        steps = random_steps(rng, n_audio * beam_size, n_vocab, 20, quantized)
        assert run_both(beam_size, patience, steps, start) > 0, "nothing finished: the test compares too little"


def test_beam_search_equals_the_reference_on_adversarial_logits():
    """Each row of each step one of the adversarial rows: collisions, ties, -inf and nan rows."""
    rng = np.random.default_rng(7)
    beam_size, n_audio, n_vocab = 5, 2, 600
    rows = n_audio * beam_size

    def steps():
        for _ in range(10):
            pool = adversarial_rows(rng, n_vocab, beam_size + 1)
            logits = pool[rng.integers(0, len(pool), rows)]
            logits[:, EOT] = np.where(np.isfinite(logits[:, EOT]), logits[:, EOT] + np.float32(2.0), logits[:, EOT])
            yield logits

    start = np.tile(np.array([[1, 2]], dtype=np.int64), (rows, 1))
    assert run_both(beam_size, 2.0, steps(), start) > 0


def test_beam_search_rows_sharing_a_prefix_midway():
    """Rows with the same tokens but different sums: a shared sequence keeps the first one's place
    and the last one's score and source, as openai-whisper's dict keyed by sequences does."""
    rng = np.random.default_rng(3)
    beam_size = 4
    tokens = np.array([[1, 5], [1, 6], [1, 5], [1, 5]], dtype=np.int64)
    for quantized in (False, True):
        (logits,) = random_steps(rng, beam_size, 64, 1, quantized)
        ours = rd.BeamSearchDecoder(beam_size, EOT, lambda idx: None)
        reference = ReferenceBeamSearch(beam_size, EOT)
        sums = np.array([-1.0, -1.5, -0.5, -2.0], dtype=np.float32)
        our_sums, reference_sums = sums.copy(), sums.copy()
        our_tokens, _ = ours.update(tokens, logits.copy(), our_sums)
        reference_tokens, _ = reference.update(tokens, logits.copy(), reference_sums)
        np.testing.assert_array_equal(our_tokens, reference_tokens)
        assert_same_bits(our_sums, reference_sums)
        assert_same_finished(ours.finished_sequences, reference.finished_sequences)


# ---------------------------------------------------------------------------- timestamp rules


TOKENIZER = SimpleNamespace(eot=400, no_timestamps=403, timestamp_begin=410)
N_VOCAB = 600
SAMPLE_BEGIN = 3


def histories(rng, n_rows, n_sampled):
    """Random sampled tokens: text, EOT and timestamps mixed, so that rows end in text, a lone
    timestamp or a pair, with timestamps anywhere (the last at the end of the range, too)."""
    sampled = rng.integers(0, TOKENIZER.eot, size=(n_rows, n_sampled))
    stamps = rng.random((n_rows, n_sampled)) < 0.45
    sampled[stamps] = rng.integers(TOKENIZER.timestamp_begin, N_VOCAB, size=int(stamps.sum()))
    sampled[rng.random((n_rows, n_sampled)) < 0.05] = TOKENIZER.eot
    if n_sampled:
        sampled[0, -1] = N_VOCAB - 1
    return np.concatenate([np.tile([[401, 402, 403]], (n_rows, 1)), sampled], axis=1).astype(np.int64)


def timestamp_logits(rng, n_rows):
    """Timestamps boosted by a per-row amount, so that the probability rule goes both ways; plus
    rows all -inf, with a nan, and with a timestamp and a text token exactly tied."""
    logits = rng.normal(0.0, 2.0, (n_rows, N_VOCAB)).astype(np.float32)
    logits[:, TOKENIZER.timestamp_begin:] += rng.uniform(-4.0, 8.0, (n_rows, 1)).astype(np.float32)
    logits[1] = -np.inf
    logits[2, rng.integers(N_VOCAB)] = np.nan
    logits[3] = -np.inf
    logits[3, [5, N_VOCAB - 1]] = 2.0  # logsumexp of the one timestamp == the best text: no mask
    return logits


@pytest.mark.parametrize("max_initial", [None, 5])
@pytest.mark.parametrize("n_sampled", range(0, 7))
def test_timestamp_rules_equal_the_reference(max_initial, n_sampled):
    rng = np.random.default_rng(n_sampled)
    ours = rd.ApplyTimestampRules(TOKENIZER, SAMPLE_BEGIN, max_initial)
    for n_rows in (1, 6, 12):
        tokens = histories(rng, max(n_rows, 4), n_sampled)[:n_rows]
        logits = timestamp_logits(rng, 4)[:1] if n_rows == 1 else np.concatenate(
            [timestamp_logits(rng, 4), rng.normal(0.0, 2.0, (n_rows - 4, N_VOCAB)).astype(np.float32)])
        mine, expected = logits.copy(), logits.copy()
        ours.apply(mine, tokens)
        reference_timestamp_rules(expected, tokens, TOKENIZER, SAMPLE_BEGIN, max_initial)
        assert_same_bits(mine, expected)


@pytest.mark.parametrize("n_sampled", range(0, 7))
def test_beam_search_takes_the_timestamp_rules_normalizers_bit_for_bit(n_sampled):
    """The timestamp rule hands its float64 log-softmax terms to beam search's step on the same logits
    (rows whose text it then masked computed again): the best tokens and their log-probabilities are
    those computed afresh, bit for bit."""
    rng = np.random.default_rng(100 + n_sampled)
    k = 6
    normalizers = rd._StepNormalizers()
    handing = rd.ApplyTimestampRules(TOKENIZER, SAMPLE_BEGIN, None, normalizers)
    plain = rd.ApplyTimestampRules(TOKENIZER, SAMPLE_BEGIN, None)
    work = rd._WorkArray()
    changed = kept = 0
    for n_rows in (1, 6, 12):
        tokens = histories(rng, max(n_rows, 4), n_sampled)[:n_rows]
        logits = timestamp_logits(rng, 4)[:1] if n_rows == 1 else np.concatenate(
            [timestamp_logits(rng, 4), rng.normal(0.0, 2.0, (n_rows - 4, N_VOCAB)).astype(np.float32)])
        logits[-1, TOKENIZER.timestamp_begin:] += 12.0  # timestamps far more probable: its text is masked
        mine, expected = logits.copy(), logits.copy()
        handing.apply(mine, tokens)
        plain.apply(expected, tokens)
        assert_same_bits(mine, expected)
        changed += int(normalizers._changed.sum())
        kept += int((~normalizers._changed).sum())
        ids, logprobs = rd._best_tokens(mine, k, work(mine.shape), normalizers)
        expected_ids, expected_logprobs = rd._best_tokens(expected, k, work(expected.shape))
        assert ids == expected_ids
        for ours, reference in zip(logprobs, expected_logprobs):
            assert_same_bits(ours, reference)
        assert normalizers._logits is None  # used once
    assert changed > 0 and kept > 0  # both kinds of rows were taken


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_greedy_takes_the_timestamp_rules_normalizers_bit_for_bit(temperature):
    """Greedy decoding reads its chosen tokens' log-probabilities from the timestamp rule's float64 terms
    (rows whose text the rule masked computed again): float32 of the whole float64 log-softmax there, bit
    for bit, summed into the running rows only. Logits the rule did not see take the float32-exp path."""
    rng = np.random.default_rng(7)
    normalizers = rd._StepNormalizers()
    rule = rd.ApplyTimestampRules(TOKENIZER, SAMPLE_BEGIN, None, normalizers)
    changed = 0
    for n_sampled, n_rows in ((0, 1), (2, 6), (5, 12)):
        decoder = rd.GreedyDecoder(temperature, TOKENIZER.eot, np.random.default_rng(n_sampled), normalizers)
        twin = rd.GreedyDecoder(temperature, TOKENIZER.eot, np.random.default_rng(n_sampled))
        tokens = histories(rng, max(n_rows, 4), n_sampled)[:n_rows]
        tokens[0, -1] = TOKENIZER.eot  # a finished row: its sum stays
        logits = timestamp_logits(rng, 4)[:1] if n_rows == 1 else np.concatenate(
            [timestamp_logits(rng, 4), rng.normal(0.0, 2.0, (n_rows - 4, N_VOCAB)).astype(np.float32)])
        logits[-1, TOKENIZER.timestamp_begin:] += 12.0  # timestamps far more probable: its text is masked
        rule.apply(logits, tokens)
        changed += int(normalizers._changed.sum())
        sums = rng.normal(-5.0, 1.0, n_rows).astype(np.float32)
        expected_sums, twin_sums, twin_expected = sums.copy(), sums.copy(), sums.copy()
        new_tokens, _ = decoder.update(tokens, logits, sums)
        assert normalizers._logits is None  # used once
        chosen = new_tokens[:, -1]
        running = tokens[:, -1] != TOKENIZER.eot
        full = rd.log_softmax(logits)[np.arange(n_rows), chosen].astype(np.float32)
        expected_sums[running] += full[running]
        assert_same_bits(sums, expected_sums)
        # the same logits again, not handed by the rule: the float32-exp path, the same tokens
        twin_tokens, _ = twin.update(tokens, logits, twin_sums)
        np.testing.assert_array_equal(twin_tokens, new_tokens)
        twin_expected[running] += reference_chosen_logprobs(logits, chosen)[running]
        assert_same_bits(twin_sums, twin_expected)
    assert changed > 0


def test_timestamp_rules_cases_by_name():
    """At sample_begin, after a lone timestamp, after a pair, after text: each rule's mask."""
    begin, eot = TOKENIZER.timestamp_begin, TOKENIZER.eot
    tokens = np.array([[401, 402, 403, begin + 2, 10, 11, begin + 9],  # lone: a timestamp >= 9 or EOT
                       [401, 402, 403, begin + 2, 10, begin + 9, begin + 9],  # pair: text next
                       [401, 402, 403, begin + 2, begin + 5, 10, 11],  # text: no timestamp <= 5
                       [401, 402, 403, 10, 11, 12, 13]], dtype=np.int64)  # no timestamp yet
    logits = np.zeros((4, N_VOCAB), dtype=np.float32)
    logits[:, begin:] = -8.0  # the text (EOT too) stays more probable than the timestamps together
    mine, expected = logits.copy(), logits.copy()
    rd.ApplyTimestampRules(TOKENIZER, SAMPLE_BEGIN, None).apply(mine, tokens)
    reference_timestamp_rules(expected, tokens, TOKENIZER, SAMPLE_BEGIN, None)
    assert_same_bits(mine, expected)
    finite = [set(np.flatnonzero(np.isfinite(row)).tolist()) for row in mine]
    specials = set(range(eot, begin)) - {TOKENIZER.no_timestamps}  # EOT and the other non-text tokens
    assert finite[0] == specials | set(range(begin + 9, N_VOCAB))
    assert finite[1] == set(range(begin)) - {TOKENIZER.no_timestamps}
    assert finite[2] == set(range(begin)) - {TOKENIZER.no_timestamps} | set(range(begin + 6, N_VOCAB))
    assert finite[3] == set(range(N_VOCAB)) - {TOKENIZER.no_timestamps}

    at_start = tokens[:, :SAMPLE_BEGIN]
    mine = logits.copy()
    rd.ApplyTimestampRules(TOKENIZER, SAMPLE_BEGIN, 5).apply(mine, at_start)
    assert all(set(np.flatnonzero(np.isfinite(row)).tolist()) == set(range(begin, begin + 6)) for row in mine)
