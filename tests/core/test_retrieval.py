"""Long-range retrieval at CI size: a 1-layer decoder with block-sparse attention (blocks of 16)
trained on 48-192-token sequences retrieves facts planted at any depth of 2048-token inputs,
i.e. mostly far outside its local window and far beyond its training lengths."""
import torch

from bench.retrieval import evaluate, make_batch, quick_config, train


def test_make_batch_layout():
    ids, tgt = make_batch(3, 100, 16, torch.Generator().manual_seed(0), depth=0.5)
    assert ids.shape[1] % 16 == 1 and ids.shape[1] >= 100
    assert (ids[:, -1] == 4).all() and (ids[:, -2] == 3).all()
    for n in range(3):
        p = int((ids[n] == 2).nonzero()[0])
        assert ids[n, p + 1] == tgt[n]


def test_retrieval_at_16x_training_length():
    rc = quick_config()
    dec, hist = train(rc, log_every=0)
    rows = evaluate(dec, rc, lengths=(2048,), depths=(0.05, 0.5, 0.95), per_cell=16)
    acc = sum(r["accuracy"] for r in rows) / len(rows)
    assert acc >= 0.9, rows  # chance is 1/32


def test_saved_retrieval_model_round_trips(tmp_path):
    """A model trained elsewhere (--device cuda --save) is evaluated here with --weights."""
    from bench.retrieval import load_model, save_model

    rc = quick_config()
    rc.steps = 3
    dec, hist = train(rc, log_every=0)
    path = tmp_path / "retrieval.safetensors"
    save_model(path, dec, rc, 1.5, hist, {"cpu": "test"})
    back, meta = load_model(path)
    assert meta["config"] == rc and meta["train_seconds"] == 1.5 and meta["machine"] == {"cpu": "test"}
    ids, _ = make_batch(2, 100, rc.attention.block_size, torch.Generator().manual_seed(1))
    dec.eval()
    back.eval()
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, dec(ids).logits, rtol=0, atol=0)


def test_training_lengths_meet_every_alignment_with_the_summaries():
    """The training lengths are multiples of the compressed block; each step is shortened by
    0..c/b-1 query blocks so that the block before ANS is sometimes in an incomplete summary
    block (reachable only through the local window, as at 100,000 tokens)."""
    rc = quick_config()
    rc.steps = 24
    _, hist = train(rc, log_every=0)
    b, c = rc.attention.block_size, rc.attention.compress_block
    assert all(h["T"] % b == 0 for h in hist)
    ans_pos = {h["T"] % c for h in hist}  # ANS sits at position T (make_batch rounds to blocks + 1)
    assert ans_pos == set(range(0, c, b)), ans_pos
    assert {h["T"] for h in hist} - set(rc.train_lengths)  # shortened lengths occur
