"""The decoder's pointer-generator copy head (core.decoder.CopyHead)."""
import torch
import torch.nn.functional as F

from core.decoder import Decoder, DecoderConfig, copy_loss, copy_targets
from core.generate import GenerationConfig, generate

V, SEP, REP, EOS = 60, 1, 2, 3


def _model(copy=True, seed=0):
    torch.manual_seed(seed)
    return Decoder(DecoderConfig.preset("tiny", vocab_size=V, copy=copy, copy_dim=32))


def _copy_batch(B, g, span=6, noise=20):
    """[noise] [SEP] [span of random tokens] [REPORT] [the same span] [EOS]: the span is the copy
    source, the tokens after [REPORT] must reproduce it. -> (ids, copy mask, lm labels)."""
    rows, masks, labels = [], [], []
    for _ in range(B):
        body = torch.randint(10, V, (noise,), generator=g).tolist()
        sp = torch.randint(10, V, (span,), generator=g).tolist()
        ids = body + [SEP] + sp + [REP] + sp + [EOS]
        m = [False] * len(ids)
        a = len(body) + 1
        m[a: a + span] = [True] * span
        lab = [-100] * (a + span + 1) + sp + [EOS]
        rows.append(ids), masks.append(m), labels.append(lab)
    return torch.tensor(rows), torch.tensor(masks), torch.tensor(labels)


def _fit(dec, make_batch, extra_loss, steps=60):
    """``steps`` AdamW steps (lr 3e-3, batches of 16 from ``make_batch(16, generator)``) on the
    next-token loss of the labelled positions plus ``extra_loss(out, ids, labels)``."""
    opt = torch.optim.AdamW(dec.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        ids, mask, lab = make_batch(16, g)
        out = dec(ids, copy_mask_BT=mask)
        loss = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), lab[:, 1:].flatten(), ignore_index=-100)
        opt.zero_grad()
        (loss + extra_loss(out, ids, lab)).backward()
        opt.step()


def test_copy_output_is_a_distribution_and_respects_the_mask():
    dec = _model().double()
    ids, mask, _ = _copy_batch(2, torch.Generator().manual_seed(0))
    out = dec(ids, copy_mask_BT=mask).logits
    torch.testing.assert_close(out.exp().sum(-1)[:, 28:], torch.ones(2, out.shape[1] - 28, dtype=torch.float64))
    plain = dec(ids).logits  # no sources: the vocabulary logits unchanged
    assert not torch.allclose(out[:, -1], plain[:, -1].log_softmax(-1))
    # positions before the first source see nothing to copy (causal): plain logits there
    torch.testing.assert_close(out[:, :20], plain[:, :20])
    # a source token changes the copy distribution only where it is visible
    ids2 = ids.clone()
    ids2[:, 22] = 9
    out2 = dec(ids2, copy_mask_BT=mask).logits
    torch.testing.assert_close(out2[:, :22], out[:, :22])
    assert not torch.allclose(out2[:, -1], out[:, -1])


def test_prefill_and_step_match_forward_with_copy():
    dec = _model().double()
    with torch.no_grad():
        dec.copy_head.gate.bias.fill_(0.0)  # give the copy path real weight
    ids, mask, _ = _copy_batch(2, torch.Generator().manual_seed(1))
    full = dec(ids, copy_mask_BT=mask).logits
    n_pre = 28  # noise 20 + SEP + span 6 + REPORT
    lens = torch.tensor([n_pre, n_pre])
    lg, cache = dec.prefill(ids[:, :n_pre], lens, None, None, capacity=ids.shape[1], copy_mask_BT=mask[:, :n_pre])
    torch.testing.assert_close(lg, full[:, n_pre - 1])
    for t in range(n_pre, ids.shape[1] - 1):
        lg = dec.step(ids[:, t], cache)
        torch.testing.assert_close(lg, full[:, t])


def test_copy_head_learns_to_copy_a_span_the_plain_decoder_cannot():
    """60 Adam steps: with the copy head greedy decoding reproduces unseen random spans; without
    it the same decoder, trained the same way, does not."""
    results = {}
    for copy in (True, False):
        dec = _model(copy=copy)
        _fit(dec, _copy_batch, lambda out, ids, lab: 0.01 * out.aux_loss)
        ids, mask, _ = _copy_batch(8, torch.Generator().manual_seed(99))
        n_pre = 28
        prefixes = [r[:n_pre].tolist() for r in ids]
        spans = [(21, 27)] * 8
        got = generate(dec, prefixes, cfg=GenerationConfig(max_new_tokens=8, eos_id=EOS), copy_spans=spans)
        want = [r[n_pre:].tolist() for r in ids]
        results[copy] = sum(g_ == w for g_, w in zip(got, want)) / 8
    assert results[True] >= 0.75, results
    assert results[False] <= 0.25, results


def test_beam_search_reorders_the_copy_sources():
    dec = _model().double()
    with torch.no_grad():
        dec.copy_head.gate.bias.fill_(3.0)  # copy almost always
    ids, mask, _ = _copy_batch(2, torch.Generator().manual_seed(3))
    ids[0, 21:27] = torch.arange(10, 16)  # disjoint spans: a row copying the other's is visible
    ids[1, 21:27] = torch.arange(40, 46)
    prefixes = [r[:28].tolist() for r in ids]
    spans = [(21, 27), (21, 27)]
    for cfg in (GenerationConfig(max_new_tokens=6, strategy="beam", num_beams=3), GenerationConfig(max_new_tokens=6)):
        out = generate(dec, prefixes, cfg=cfg, copy_spans=spans)
        # copying dominates (gate ~0.95), so every token comes from the row's own span
        for r, toks in enumerate(out):
            assert len(toks) == 6 and set(toks) <= set(ids[r, 21:27].tolist()), (cfg.strategy, r, toks)


def test_copy_targets_align_the_report_ngrams_found_among_the_sources():
    # positions: 0 BOS, 1 SEP, 2..7 sources [10..15], 8 REPORT, 9.. report
    ids = torch.tensor([[0, SEP, 10, 11, 12, 13, 14, 15, REP, 30, 11, 12, 13, 31, 12, 40, EOS]])
    labels = torch.full_like(ids, -100)
    labels[0, 9:] = ids[0, 9:]
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[0, 2:8] = True
    dec = _model().double()
    out = dec(ids, copy_mask_BT=mask)
    tr = out.copy
    assert tr is not None and tr.t0 == 2 and tr.attn_BTS.shape == (1, ids.shape[1] - 2, 6)
    tg = copy_targets(ids, labels, tr)
    src, gate, query = tg.src_BTS, tg.gate_BT, tg.query_BT
    assert float(tg.case_BT.sum()) == 0.0
    # query at u-1 predicts the token at u; queries are indexed from t0 = 2
    copied = {u for u in range(9, ids.shape[1]) if gate[0, u - 1 - 2] > 0}
    assert copied == {10, 11, 12}  # "11 12 13" also occurs among the sources; the lone later 12 does not
    for u, s in ((10, 1), (11, 2), (12, 3)):  # each points at the source offering its token there
        assert src[0, u - 3].nonzero()[:, 0].tolist() == [s]
    assert query[0].nonzero()[:, 0].tolist() == [u - 3 for u in range(9, ids.shape[1])]
    # bigrams (model.copy_ngram = 2): the same three here ("31 12" and "12 40" are no source bigrams)
    bi = {u for u in range(9, ids.shape[1]) if copy_targets(ids, labels, tr, n=2).gate_BT[0, u - 1 - 2] > 0}
    assert bi == {10, 11, 12}
    ids2 = ids.clone()
    ids2[0, 15] = 13  # "12 13" again, after the lone 12: a bigram copy, not a trigram one
    lab2 = torch.where(labels >= 0, ids2, labels)
    tri2 = {u for u in range(9, ids.shape[1]) if copy_targets(ids2, lab2, tr, n=3).gate_BT[0, u - 1 - 2] > 0}
    bi2 = {u for u in range(9, ids.shape[1]) if copy_targets(ids2, lab2, tr, n=2).gate_BT[0, u - 1 - 2] > 0}
    assert tri2 == {10, 11, 12} and bi2 == {10, 11, 12, 14, 15}
    loss = copy_loss(tr, ids, labels)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    for w in (dec.copy_head.wq.weight, dec.copy_head.wk.weight, dec.copy_head.gate.weight):
        assert w.grad is not None and bool(w.grad.abs().sum() > 0)


def test_copy_loss_teaches_where_the_copied_phrase_starts():
    """Sources hold two random spans after two different markers; the report copies the span after
    marker 5. Trained on the supervised copy loss alone, the pointer's first step lands on that
    span's first token in unseen sequences (the untrained head puts about half its mass there by
    the chance of its token-identity term, and none of it by position)."""
    def batch(B, g):
        rows, masks, labels = [], [], []
        for _ in range(B):
            a, b = torch.randint(10, V, (2, 5), generator=g).tolist()
            order = [(4, a), (5, b)] if torch.rand(1, generator=g) < 0.5 else [(5, b), (4, a)]
            src = [t for m, sp in order for t in [m] + sp]
            ids = [0, SEP] + src + [REP] + b + [EOS]
            m = [False, False] + [True] * len(src) + [False] * (len(b) + 2)
            lab = [-100] * (len(src) + 3) + b + [EOS]
            rows.append(ids), masks.append(m), labels.append(lab)
        return torch.tensor(rows), torch.tensor(masks), torch.tensor(labels)

    @torch.no_grad()
    def first_pointer_mass(dec, ids, mask, lab):
        tr = dec(ids, copy_mask_BT=mask).copy
        src = copy_targets(ids, lab, tr).src_BTS
        q = 14 - tr.t0  # the query at [REPORT] (position 14) predicts the span's first token
        return float((tr.attn_BTS[:, q] * src[:, q]).sum(-1).mean())

    test = batch(32, torch.Generator().manual_seed(7))
    dec = _model(seed=1)
    before = first_pointer_mass(dec, *test)
    opt = torch.optim.AdamW(dec.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(80):
        ids, mask, lab = batch(16, g)
        loss = copy_loss(dec(ids, copy_mask_BT=mask).copy, ids, lab)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = first_pointer_mass(dec, *test)
    assert before < 0.6 and after > 0.9, (before, after)


def _case_model(seed=0):
    """A case-aware copy decoder whose tokens 10..29 have line-start variants 40..49 / 30..39:
    variant[t] = t + 20 for t in 10..29, canon the inverse."""
    torch.manual_seed(seed)
    dec = Decoder(DecoderConfig.preset("tiny", vocab_size=V, copy=True, copy_dim=32, copy_case=True))
    variant, canon = list(range(V)), list(range(V))
    for t in range(10, 30):
        variant[t], canon[t + 20] = t + 20, t
    dec.set_copy_vocab(variant, canon)
    return dec


def test_case_aware_copy_aligns_variants_and_matches_prefill_and_step():
    dec = _case_model().double()
    with torch.no_grad():
        dec.copy_head.gate.bias.fill_(0.0)
        dec.copy_head.case.bias.fill_(0.0)
    # sources " 11 12 13 14"; the report writes the line-start form of 11 (31) then 12 13
    ids = torch.tensor([[0, SEP, 11, 12, 13, 14, REP, 31, 12, 13, EOS]])
    labels = torch.full_like(ids, -100)
    labels[0, 7:] = ids[0, 7:]
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[0, 2:6] = True
    out = dec(ids, copy_mask_BT=mask)
    assert out.copy.case_BT is not None
    plain = copy_targets(ids, labels, out.copy)  # raw tokens: 31 12 13 matches nothing
    assert float(plain.gate_BT.sum()) == 0.0
    tg = copy_targets(ids, labels, out.copy, canon_V=dec.copy_canon())
    q = {u: u - 1 - out.copy.t0 for u in (7, 8, 9)}
    assert [float(tg.gate_BT[0, q[u]]) for u in (7, 8, 9)] == [1.0, 1.0, 1.0]
    assert [float(tg.case_BT[0, q[u]]) for u in (7, 8, 9)] == [1.0, 0.0, 0.0]  # only the variant
    assert tg.src_BTS[0, q[7]].nonzero()[:, 0].tolist() == [0]  # source 11 offers 31
    # the variant gets copy mass: p(31) at the query before it exceeds the vocabulary's alone
    logp = out.logits[0, 6]
    assert float(logp[31].detach().exp()) > 0.05
    # prefill + step equal the full forward with case-aware copying
    lg, cache = dec.prefill(ids[:, :7], torch.tensor([7]), None, None, capacity=ids.shape[1], copy_mask_BT=mask[:, :7])
    torch.testing.assert_close(lg, out.logits[:, 6])
    for t in range(7, ids.shape[1] - 1):
        torch.testing.assert_close(dec.step(ids[:, t], cache), out.logits[:, t])


def test_case_aware_copy_learns_to_copy_a_phrase_in_its_line_start_form():
    """The report repeats a random source span with its first token in line-start form. Trained
    60 steps, the case-aware head reproduces unseen spans in that form; the plain copy head,
    which can only offer the source's own token, gets the first token wrong."""
    def batch(B, g, span=5, noise=12):
        rows, masks, labels = [], [], []
        for _ in range(B):
            body = torch.randint(10, 30, (noise,), generator=g).tolist()
            sp = torch.randint(10, 30, (span,), generator=g).tolist()
            rep = [sp[0] + 20] + sp[1:]
            ids = body + [SEP] + sp + [REP] + rep + [EOS]
            m = [False] * (noise + 1) + [True] * span + [False] * (span + 2)
            lab = [-100] * (noise + span + 2) + rep + [EOS]
            rows.append(ids), masks.append(m), labels.append(lab)
        return torch.tensor(rows), torch.tensor(masks), torch.tensor(labels)

    results = {}
    for case in (True, False):
        dec = _case_model() if case else _model()
        _fit(dec, batch, lambda out, ids, lab: copy_loss(out.copy, ids, lab, canon_V=dec.copy_canon()))
        ids, mask, _ = batch(8, torch.Generator().manual_seed(99))
        got = generate(dec, [r[:19].tolist() for r in ids], cfg=GenerationConfig(max_new_tokens=6, eos_id=EOS),
                       copy_spans=[(13, 18)] * 8)
        results[case] = sum(g_ == r[19:].tolist() for g_, r in zip(got, ids)) / 8
    assert results[True] >= 0.75, results
    assert results[False] <= 0.25, results
