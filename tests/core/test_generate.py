import math

import pytest
import torch
from torch import nn

from core.decoder import Decoder, DecoderConfig
from core.generate import GenerationConfig, Guidance, generate


@pytest.fixture(scope="module")
def dec():
    torch.manual_seed(0)
    return Decoder(DecoderConfig.preset("tiny", vocab_size=40)).eval()


PREFIXES = [[1, 5, 6, 7] * 9, [1, 9], [1] + list(range(3, 30))]


def _naive_greedy(dec, prefix, ctx, n, eos):
    seq, out = list(prefix), []
    with torch.no_grad():
        for _ in range(n):
            t = int(dec(torch.tensor([seq]), ctx).logits[0, -1].argmax())
            out.append(t)
            seq.append(t)
            if t == eos:
                break
    return out


def _logprob(dec, prefix, new, ctx):
    with torch.no_grad():
        lp = dec(torch.tensor([prefix + new]), ctx).logits[0].log_softmax(-1)
    return sum(lp[len(prefix) - 1 + i, t].item() for i, t in enumerate(new))


def test_batched_greedy_with_cache_equals_naive_recompute(dec):
    ctx = torch.randn(3, 4, 64)
    got = generate(dec, PREFIXES, ctx, None, GenerationConfig(max_new_tokens=15, eos_id=2))
    for n, p in enumerate(PREFIXES):
        assert got[n] == _naive_greedy(dec, p, ctx[n:n + 1], 15, 2)


def test_beam_one_equals_greedy_and_wider_beam_scores_at_least_as_well(dec):
    g = generate(dec, PREFIXES, None, None, GenerationConfig(max_new_tokens=8))
    b1 = generate(dec, PREFIXES, None, None, GenerationConfig(max_new_tokens=8, strategy="beam", num_beams=1))
    assert g == b1
    b4 = generate(dec, PREFIXES, None, None, GenerationConfig(max_new_tokens=8, strategy="beam", num_beams=4))
    for p, gs, bs in zip(PREFIXES, g, b4):
        assert len(bs) == 8
        assert _logprob(dec, p, bs, None) >= _logprob(dec, p, gs, None) - 1e-4


def test_no_repeat_ngram_blocking(dec):
    for strategy in ("greedy", "beam"):
        out = generate(dec, PREFIXES, None, None, GenerationConfig(max_new_tokens=30, strategy=strategy, no_repeat_ngram_size=2))
        for seq in out:
            grams = list(zip(seq, seq[1:]))
            assert len(grams) == len(set(grams)), (strategy, seq)


def test_sampling_is_seeded_and_tiny_top_p_is_greedy(dec):
    cfg = GenerationConfig(max_new_tokens=10, strategy="sample", top_p=0.95, temperature=1.5, seed=7)
    assert generate(dec, PREFIXES, None, None, cfg) == generate(dec, PREFIXES, None, None, cfg)
    tiny = GenerationConfig(max_new_tokens=10, strategy="sample", top_p=1e-6, seed=1)
    assert generate(dec, PREFIXES, None, None, tiny) == generate(dec, PREFIXES, None, None, GenerationConfig(max_new_tokens=10))


class _Scripted(nn.Module):
    """Fake decoder whose next-token preferences are fixed: 12 > 11 > 10 > 3 > EOS(2) > rest."""

    def __init__(self, V=20):
        super().__init__()
        self.tok_embeddings = nn.Embedding(V, 4)
        self.V = V

    def _logits(self, B):
        lg = torch.zeros(B, self.V)
        lg[:, 12], lg[:, 11], lg[:, 10], lg[:, 3], lg[:, 2] = 5.0, 4.0, 3.0, 2.0, 1.0
        return lg

    def prefill(self, ids, lengths, ctx, mask, capacity, copy_mask_BT=None):
        class C:
            def reorder(self, idx, shared_prefix=0):
                pass
        return self._logits(ids.shape[0]), C()

    def step(self, ids, cache):
        return self._logits(ids.shape[0])


@pytest.mark.parametrize("strategy", ["greedy", "beam", "sample"])
def test_section_markers_in_order_once_then_eos(strategy):
    out = generate(_Scripted(), [[1], [1, 4]], None, None,
                   GenerationConfig(max_new_tokens=10, eos_id=2, strategy=strategy, num_beams=2, top_p=0.5,
                                    section_ids=[10, 11, 12], no_repeat_ngram_size=2, seed=0))
    for seq in out:
        markers = [t for t in seq if t in (10, 11, 12)]
        assert markers == sorted(set(markers)), seq  # increasing, no repeats
        assert markers  # the scripted model prefers markers
        if strategy != "beam":  # step-wise choice: 12 first, after which 10 and 11 are banned
            assert markers == [12]
        assert len(seq) <= 10


def test_eos_stops_and_max_length(dec):
    out = generate(_Scripted(), [[1]], None, None, GenerationConfig(max_new_tokens=10, eos_id=3, section_ids=[10, 11, 12]))
    assert out == [[12, 3]]
    assert len(generate(dec, [[1]], None, None, GenerationConfig(max_new_tokens=5))[0]) == 5
    with pytest.raises(ValueError, match="BOS"):
        generate(dec, [[]], None, None, GenerationConfig())


class _EndsAfterEnumerator(_Scripted):
    """Prefers, in turn: the enumerator "7 8" (digit, dot), then the end (EOS 2), then newline 9,
    then a word 15; so unconstrained it writes an empty item "7 8" and stops."""

    def _logits(self, B):
        return self._logits_for(self._last)

    def _logits_for(self, last):
        lg = torch.zeros(len(last), self.V)
        for r, t in enumerate(last):
            if t == 8:  # after the dot: end > newline > word
                lg[r, 2], lg[r, 9], lg[r, 15] = 5.0, 4.0, 3.0
            elif t == 7:
                lg[r, 8] = 5.0
            elif t == 15:
                lg[r, 2] = 5.0
            else:
                lg[r, 7] = 5.0
        return lg

    def prefill(self, ids, lengths, ctx, mask, capacity, copy_mask_BT=None):
        self._last = [int(ids[r, int(lengths[r]) - 1]) for r in range(ids.shape[0])]
        lg, cache = super().prefill(ids, lengths, ctx, mask, capacity, copy_mask_BT)
        return self._logits_for(self._last), cache

    def step(self, ids, cache):
        self._last = ids.tolist()
        return self._logits_for(self._last)


def test_no_empty_numbered_item():
    """After an enumerator at an item start the row may not end, open a section or break the line:
    the scripted model's empty item "1." becomes "1. word"; without the constraint it stays empty."""
    dec = _EndsAfterEnumerator()
    base = dict(max_new_tokens=6, eos_id=2, section_ids=[10, 11])
    plain = generate(dec, [[11]], None, None, GenerationConfig(**base))[0]
    assert plain == [7, 8, 2]
    guarded = generate(dec, [[11]], None, None, GenerationConfig(**base, no_end_after=((7, 8), (9, 7, 8)),
                                                                  line_end_ids=(9,)))[0]
    assert guarded == [7, 8, 15, 2]
    # the whole suffix must match the generated tokens: "7 8" not after a newline is no item start
    other = generate(dec, [[11]], None, None, GenerationConfig(**base, no_end_after=((9, 7, 8),), line_end_ids=(9,)))[0]
    assert other == [7, 8, 2]


class _Prefs(_EndsAfterEnumerator):
    """Next-token preferences by the last token (best first): findings marker 10, impression
    marker 11, newline 9, enumerator digit 7, word 15, EOS 2."""

    PREFS = {1: [10], 10: [15], 15: [2, 9, 11], 9: [7, 11, 15], 7: [15], 11: [2, 9, 15]}

    def _logits_for(self, last):
        lg = torch.zeros(len(last), self.V)
        for r, t in enumerate(last):
            for rank, tok in enumerate(self.PREFS.get(t, [2])):
                lg[r, tok] = 10.0 - rank
        return lg


def test_complete_report_grammar():
    """``complete_sections``: no EOS before the last section marker is followed by content
    (whitespace is not content); ``line_start_banned``: in the findings no line starts with an
    enumerator, so the scripted model's numbered item goes to the impression, after its marker."""
    dec = _Prefs()
    base = dict(max_new_tokens=12, eos_id=2, section_ids=[10, 11])
    assert generate(dec, [[1]], None, None, GenerationConfig(**base))[0] == [10, 15, 2]  # stops in the findings
    whole = GenerationConfig(**base, complete_sections=True, line_end_ids=(9,), line_start_banned=(7,), line_start_section=0)
    assert generate(dec, [[1]], None, None, whole)[0] == [10, 15, 9, 11, 9, 7, 15, 2]
    # without the line-start rule the item is written inside the findings (and the report, never
    # allowed to end there, runs to max_new_tokens): what the grammar is for
    loose = generate(dec, [[1]], None, None, GenerationConfig(**base, complete_sections=True, line_end_ids=(9,)))[0]
    assert loose[:4] == [10, 15, 9, 7] and 2 not in loose and len(loose) == 12
    # an impression marker followed by EOS: the EOS waits for content
    dec.PREFS = {**_Prefs.PREFS, 1: [11], 11: [2, 9, 15]}
    whole_one = GenerationConfig(**{**base, "section_ids": [11]}, complete_sections=True, line_end_ids=(9,))
    assert generate(dec, [[1]], None, None, GenerationConfig(**base))[0] == [11, 2]
    assert generate(dec, [[1]], None, None, whole_one)[0] == [11, 9, 7, 15, 2]
    for strategy in ("beam", "sample"):  # every strategy goes through the same row constraints
        out = generate(_Prefs(), [[1]], None, None, GenerationConfig(**{**whole.__dict__, "strategy": strategy, "num_beams": 2, "seed": 0}))[0]
        assert 11 in out and out[-1] == 2 and 7 not in out[:out.index(11)] and out.index(11) < len(out) - 2, out


def test_complete_report_has_every_section_in_order_none_empty():
    """``complete_sections`` also keeps every section: a marker that would skip one is refused (the
    decoder's next choice, the skipped section's marker, is taken), and the next marker waits until
    the current section has content. Seen on an unseen geometry (session 17): a report whose
    comparison ran on into findings lines and jumped to the impression, leaving Findings empty."""
    dec = _Prefs()
    base = dict(max_new_tokens=12, eos_id=2, section_ids=[10, 11])
    whole = GenerationConfig(**base, complete_sections=True, line_end_ids=(9,), line_start_banned=(7,), line_start_section=0)
    dec.PREFS = {**_Prefs.PREFS, 1: [11, 10]}  # the model would skip the findings
    assert generate(dec, [[1]], None, None, GenerationConfig(**base))[0] == [11, 2]
    assert generate(dec, [[1]], None, None, whole)[0] == [10, 15, 9, 11, 9, 7, 15, 2]
    dec.PREFS = {**_Prefs.PREFS, 10: [11, 15]}  # ... or leave them empty
    assert generate(dec, [[1]], None, None, GenerationConfig(**base))[0][:2] == [10, 11]
    assert generate(dec, [[1]], None, None, whole)[0] == [10, 15, 9, 11, 9, 7, 15, 2]


def test_veto_refuses_continuations_under_every_strategy(dec):
    """A veto (a function of the row's tokens, candidate last) refuses a continuation: greedy and
    sampling take the next most likely token it lets through, beam search drops the refused
    candidates; rows without a veto decode as before, and a veto that refuses everything never
    blocks a row (the unconstrained choice is kept)."""
    base = dict(max_new_tokens=6, eos_id=3, section_ids=[10, 11, 12])
    # the scripted model prefers 12 > 11 > 10 > 3(EOS): refusing 12 makes greedy write 11, after
    # which 10 is out of section order and 12 still refused, so EOS
    no12 = lambda toks: toks[-1] == 12  # noqa: E731
    assert generate(_Scripted(), [[1], [1]], None, None, GenerationConfig(**base), vetoes=[no12, None]) == [[11, 3], [12, 3]]
    for strategy in ("beam", "sample"):
        out = generate(_Scripted(), [[1]], None, None, GenerationConfig(**base, strategy=strategy, num_beams=2, seed=0),
                       vetoes=[no12])[0]
        assert 12 not in out and out[-1] == 3, (strategy, out)
    everything = lambda toks: True  # noqa: E731
    assert generate(_Scripted(), [[1]], None, None, GenerationConfig(**base), vetoes=[everything]) == [[12, 3]]
    assert generate(_Scripted(), [[1]], None, None, GenerationConfig(**base, strategy="beam", num_beams=2),
                    vetoes=[everything])[0][-1] == 3
    # on a real decoder: a veto that refuses one token id keeps it out of every row it applies to
    plain = generate(dec, PREFIXES, None, None, GenerationConfig(max_new_tokens=10))
    banned = plain[0][0]
    out = generate(dec, PREFIXES, None, None, GenerationConfig(max_new_tokens=10),
                   vetoes=[lambda t: t[-1] == banned, None, None])
    assert banned not in out[0] and out[1:] == plain[1:]
    with pytest.raises(ValueError, match="one veto"):
        generate(dec, PREFIXES, None, None, GenerationConfig(max_new_tokens=2), vetoes=[None])
    with pytest.raises(ValueError, match="veto_topk"):
        generate(dec, PREFIXES, None, None, GenerationConfig(max_new_tokens=2, veto_topk=0))


def test_section_budget_opens_the_remaining_sections_of_a_report_that_runs_long():
    """``section_budget``: a decoder that repeats itself in the findings would run to
    ``max_new_tokens`` and never write the later sections (4 of 310 test reports in session 17);
    with the budget the next marker is forced once the tokens left are just enough for the
    sections to come, each then gets content, under every strategy."""
    dec = _Prefs()
    dec.PREFS = {1: [10], 10: [15], 15: [15, 2, 9], 9: [15], 11: [15], 12: [15]}  # loves word 15
    base = dict(max_new_tokens=16, eos_id=2, section_ids=[10, 11, 12], complete_sections=True, line_end_ids=(9,))
    plain = generate(dec, [[1]], None, None, GenerationConfig(**base))[0]
    assert plain == [10] + [15] * 15  # the later sections never come
    for strategy in ("greedy", "beam", "sample"):
        out = generate(dec, [[1]], None, None, GenerationConfig(**base, section_budget=3, strategy=strategy,
                                                                num_beams=2, seed=0))[0]
        assert len(out) == 16 and [t for t in out if t in (10, 11, 12)] == [10, 11, 12], (strategy, out)
        i11, i12 = out.index(11), out.index(12)
        assert i11 >= 2 and out[i11 - 1] == 15 and out[i11 + 1] == 15 and out[i12 + 1] == 15, (strategy, out)
        assert 16 - i12 - 1 >= 1  # the last section has content
    # the budget never fires early: a report that ends in time is as without it
    whole = dict(max_new_tokens=12, eos_id=2, section_ids=[10, 11], complete_sections=True, line_end_ids=(9,),
                 line_start_banned=(7,), line_start_section=0)
    for budget in (0, 2):
        assert generate(_Prefs(), [[1]], None, None, GenerationConfig(**whole, section_budget=budget))[0] == \
            [10, 15, 9, 11, 9, 7, 15, 2]


def _naive_guided(dec, prefix, twin, ctx, ctx_u, mask_u, n, w, plaus, start=()):
    """Guided greedy by full recompute: among the row's plausible tokens, argmax of
    lp + w * (lp - lp_twin); the twin is fed the row's tokens; inactive before a start id."""
    out = []
    with torch.no_grad():
        for _ in range(n):
            lp = dec(torch.tensor([prefix + out]), ctx).logits[0, -1].log_softmax(-1)
            if start and not any(t in start for t in out):
                out.append(int(lp.argmax()))
                continue
            lu = dec(torch.tensor([twin + out]), ctx_u, mask_u).logits[0, -1].log_softmax(-1)
            ok = lp >= lp.max() + math.log(plaus)
            out.append(int(torch.where(ok, lp + w * (lp - lu), torch.tensor(float("-inf"))).argmax()))
    return out


def test_guidance_against_a_twin_equals_its_recomputed_definition(dec):
    """Contrastive guidance (core.generate.Guidance): each row is decoded beside a twin with its
    own prefix and context (here shorter, with fewer context tokens, so both are padded in the
    shared batch); the cached batched decoding equals the definition recomputed from scratch,
    a twin identical to its row changes nothing, and guidance waits for a start id."""
    torch.manual_seed(1)
    ctx = torch.randn(3, 4, 64)
    ctx_u = torch.randn(3, 2, 64)
    mask_u = torch.tensor([[True, True], [True, False], [True, True]])
    twins = [[1, 5, 6], [1, 9, 9, 9, 9, 9], [1, 7]]
    cfg = GenerationConfig(max_new_tokens=8)
    for w, plaus in ((1.0, 0.1), (3.0, 0.01)):
        g = Guidance(twins, ctx_u, mask_u, None, weight=w, plausibility=plaus)
        got = generate(dec, PREFIXES, ctx, None, cfg, guidance=g)
        for n, p in enumerate(PREFIXES):
            assert got[n] == _naive_guided(dec, p, twins[n], ctx[n:n + 1], ctx_u[n:n + 1], mask_u[n:n + 1], 8, w, plaus)
    plain = generate(dec, PREFIXES, ctx, None, cfg)
    assert got != plain  # the twins do steer this decoder
    assert generate(dec, PREFIXES, ctx, None, cfg, guidance=Guidance(PREFIXES, ctx, None, weight=2.0)) == plain
    # a start id: unguided until the row writes it, then guided
    start = (plain[0][2],)
    g = Guidance(twins, ctx_u, mask_u, None, weight=3.0, plausibility=0.01, start_ids=start)
    got = generate(dec, PREFIXES[:1], ctx[:1], None, cfg, guidance=Guidance(twins[:1], ctx_u[:1], mask_u[:1], None,
                                                                           weight=3.0, plausibility=0.01, start_ids=start))
    assert got[0][:3] == plain[0][:3]
    assert got[0] == _naive_guided(dec, PREFIXES[0], twins[0], ctx[:1], ctx_u[:1], mask_u[:1], 8, 3.0, 0.01, start)
    # a token below the plausibility bar never wins by guidance: at plausibility 1 only the row's
    # own best token is plausible, so guidance changes nothing
    assert generate(dec, PREFIXES, ctx, None, cfg, guidance=Guidance(twins, ctx_u, mask_u, None, weight=50.0,
                                                                      plausibility=1.0)) == plain
    with pytest.raises(ValueError, match="beam"):
        generate(dec, PREFIXES, ctx, None, GenerationConfig(max_new_tokens=2, strategy="beam"), guidance=g)
    with pytest.raises(ValueError, match="twin prefix"):
        generate(dec, PREFIXES, ctx, None, cfg, guidance=Guidance(twins[:2], ctx_u, mask_u))
    with pytest.raises(ValueError, match="context"):
        generate(dec, PREFIXES, ctx, None, cfg, guidance=Guidance(twins, None, None))


def test_finished_rows_leave_the_batch_and_the_others_decode_as_alone(dec):
    """Rows that end early leave the batch (the cache keeps the live ones); the rows still running
    write exactly what they write alone."""
    ctx = torch.randn(3, 4, 64)
    alone = [_naive_greedy(dec, p, ctx[n:n + 1], 12, None) for n, p in enumerate(PREFIXES)]
    eos = alone[1][0]  # row 1 ends at its first token; the others go on (unless they write it too)
    got = generate(dec, PREFIXES, ctx, None, GenerationConfig(max_new_tokens=12, eos_id=eos))
    assert got[1] == [eos]
    for n, p in enumerate(PREFIXES):
        assert got[n] == _naive_greedy(dec, p, ctx[n:n + 1], 12, eos)
    assert any(len(g) > 1 for g in got)


def test_sentence_bleu_ids_and_mbr_agreement():
    from core.generate import mbr_agreement, sentence_bleu_ids

    a = [5, 6, 7, 8, 9, 10]
    assert sentence_bleu_ids(a, a) == pytest.approx(1.0)
    assert sentence_bleu_ids([], a) == 0.0
    assert sentence_bleu_ids(a[:3], a) < sentence_bleu_ids(a, a)  # brevity penalty
    assert sentence_bleu_ids([20, 21, 22, 23], a) < 0.2
    # two near-copies and an outlier: the near-copies agree most; the outlier least
    cands = [a + [2], a[:-1] + [11, 2], [20, 21, 22, 23, 24, 2]]
    u = mbr_agreement(cands, eos_id=2)
    assert u[2] < min(u[0], u[1])
    # tokens before ``from_id`` are not compared: two candidates differing only there agree fully
    v = mbr_agreement([[30, 31, 4, 5, 6, 7, 8], [40, 4, 5, 6, 7, 8]], from_id=4)
    assert v[0] == pytest.approx(1.0) and v[1] == pytest.approx(1.0)
    assert mbr_agreement([a]) == [0.0]


def test_mbr_keeps_the_consensus_sample_and_the_rerank_moves_the_choice(dec):
    """MBR samples num_samples continuations per prefix from one prefill and returns, per prefix,
    the one with the best agreement with its siblings (its definition recomputed here on the same
    samples); a rerank score adds to that agreement; it is seeded (same inputs, same report)."""
    import importlib

    cg = importlib.import_module("core.generate")  # the module (core.generate is also the function)
    N, base = 5, dict(max_new_tokens=10, eos_id=3, temperature=1.5, top_p=0.95, seed=4)
    seen = {}
    real = cg.mbr_agreement

    def spy(cands, *a, **kw):
        seen.setdefault("cands", []).append([list(c) for c in cands])
        return real(cands, *a, **kw)

    cfg = GenerationConfig(strategy="mbr", num_samples=N, **base)
    try:
        cg.mbr_agreement = spy
        got = generate(dec, PREFIXES, None, None, cfg)
    finally:
        cg.mbr_agreement = real
    assert len(seen["cands"]) == len(PREFIXES)
    for b, cands in enumerate(seen["cands"]):
        assert len(cands) == N and len({tuple(c) for c in cands}) > 1  # the samples differ
        u = real(cands, None, 3)
        ended = [i for i in range(N) if 3 in cands[i]]  # a sample that ran to the cap only when none ended
        assert got[b] == cands[max(ended or range(N), key=lambda i: (u[i], -i))]
    assert generate(dec, PREFIXES, None, None, cfg) == got  # seeded
    # a rerank that pays for the first token being the least agreeing sample's picks that sample
    cands0 = seen["cands"][0]
    u0 = real(cands0, None, 3)
    worst = min(range(N), key=lambda i: u0[i])
    target = cands0[worst]
    pick = generate(dec, PREFIXES, None, None, cfg, rerank=[lambda c: 10.0 * (c == target), None, None])
    assert pick[0] == target and pick[1:] == got[1:]
    # one sample: MBR is plain sampling from the same generator
    one = GenerationConfig(strategy="mbr", num_samples=1, **base)
    assert generate(dec, PREFIXES, None, None, one) == generate(dec, PREFIXES, None, None,
                                                               GenerationConfig(strategy="sample", **base))
    with pytest.raises(ValueError, match="rerank needs"):
        generate(dec, PREFIXES, None, None, GenerationConfig(max_new_tokens=2), rerank=[None] * 3)
    with pytest.raises(ValueError, match="num_samples"):
        GenerationConfig(strategy="mbr", num_samples=0)
    with pytest.raises(ValueError, match="not beam search or mbr"):
        generate(dec, PREFIXES, None, None, cfg, guidance=Guidance(PREFIXES))


def test_mbr_never_chooses_a_sample_that_ran_to_the_cap_when_one_ended(dec, monkeypatch):
    """A sample without the end token (cut off at max_new_tokens) loses to any that ended, however
    much it agrees with its siblings or its rerank pays; when none ended, the best of them is kept."""
    import importlib

    cg = importlib.import_module("core.generate")
    N, eos = 3, 3
    runaway, short = [5, 6, 7, 5, 6, 7, 5, 6], [5, 6, eos]
    designed = {0: [runaway, runaway, short], 1: [runaway, [5, 6, 7, 5, 6, 7, 5, 7], [9, 9, 9, 9, 9, 9, 9, 9]],
                2: [short, [5, eos], runaway]}
    monkeypatch.setattr(cg, "_decode", lambda *a, **k: [c for b in range(3) for c in designed[b]])
    cfg = GenerationConfig(strategy="mbr", num_samples=N, max_new_tokens=8, eos_id=eos, seed=0)
    got = generate(dec, PREFIXES, None, None, cfg, rerank=[lambda c: 10.0 * (c == runaway)] * 3)
    assert got[0] == short  # the two runaways agree perfectly and are paid 10, and still lose
    assert got[1] == runaway  # none ended: the consensus (and the rerank) decide as before
    assert got[2] in (short, [5, eos])


def test_mbr_samples_keep_the_vetoes(dec):
    """Each sample of a prefix keeps that prefix's veto."""
    plain = generate(dec, PREFIXES, None, None, GenerationConfig(max_new_tokens=8))
    banned = plain[0][0]
    cfg = GenerationConfig(strategy="mbr", num_samples=4, max_new_tokens=8, top_p=1e-6, seed=0)  # tiny top_p: greedy
    out = generate(dec, PREFIXES, None, None, cfg, vetoes=[lambda t: t[-1] == banned, None, None])
    assert banned not in out[0] and out[1:] == plain[1:]


class _Countdown(nn.Module):
    """Fake decoder with a real per-row cache: row r (prefix ``[1] * n``) writes token 5 + r, n times,
    then EOS (2); the cache's rows follow ``reorder`` like the decoder's."""

    def __init__(self, V=20):
        super().__init__()
        self.tok_embeddings = nn.Embedding(V, 4)
        self.V = V

    def _logits(self, cache):
        lg = torch.zeros(len(cache.left), self.V)
        for i, (row, left) in enumerate(zip(cache.row.tolist(), cache.left.tolist())):
            lg[i, 5 + row if left > 0 else 2] = 1.0
        return lg

    def prefill(self, ids, lengths, ctx, mask, capacity, copy_mask_BT=None):
        class Cache:
            def reorder(self, idx, shared_prefix=0):
                self.row, self.left = self.row.index_select(0, idx), self.left.index_select(0, idx)
        c = Cache()
        c.row, c.left = torch.arange(ids.shape[0]), lengths.clone()
        return self._logits(c), c

    def step(self, ids, cache):
        cache.left = cache.left - 1
        return self._logits(cache)


def test_rows_leaving_the_batch_one_after_another_keep_their_own_cache():
    prefixes = [[1] * n for n in (3, 1, 5, 2, 4)]
    got = generate(_Countdown(), prefixes, None, None, GenerationConfig(max_new_tokens=10, eos_id=2))
    assert got == [[5 + r] * len(p) + [2] for r, p in enumerate(prefixes)]

