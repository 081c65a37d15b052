"""torchrun DDP with 2 CPU processes (gloo): loss goes down, rank 0 checkpoints, ranks stay identical."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.integration


def _manifest_with_more_train_studies(repo_root, tmp_path):
    """The bundled examples relabelled so that 4 are train (2 per rank) and 1 is val."""
    rows = [json.loads(x) for x in (repo_root / "examples" / "manifest.jsonl").read_text().splitlines()]
    for i, r in enumerate(rows):
        r["split"] = "val" if i == 2 else "test" if i == 3 else "train"
        for k in ("study", "history", "audio"):
            if r.get(k):
                r[k] = str(repo_root / "examples" / r[k])
    path = tmp_path / "manifest.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def test_torchrun_two_cpu_processes(repo_root, tmp_path):
    manifest = _manifest_with_more_train_studies(repo_root, tmp_path)
    run = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(repo_root))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "app.cli", "train", "--manifest", str(manifest), "--out", str(run),
           "--config", str(repo_root / "configs" / "tiny.json"), "--no-progress",
           "stages.0.steps=4", "optim.lr=3e-3", "data.batch_size=1", "optim.accum_steps=2", "data.audio=false",
           "data.history_curriculum=[[0,48]]", "data.max_report_tokens=96", "model.image.output_stride=32",
           "model.image.max_slabs=4", "model.decoder.n_layers=1", "eval.every=0", "eval.bleu_studies=0", "eval.max_studies=1", "save_every=2",
           "threads=1"]
    proc = subprocess.run(cmd, cwd=repo_root, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    assert (run / "checkpoints" / "step_2" / "trainer_state.pt").is_file()
    assert (run / "checkpoints" / "step_4" / "model.safetensors").is_file()
    state = torch.load(run / "checkpoints" / "step_4" / "trainer_state.pt", weights_only=True)
    assert state["world_size"] == 2
    fm = json.loads((run / "final_metrics.json").read_text())
    assert fm["world_size"] == 2 and fm["ddp_ranks_identical"] is True
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]  # rank 0 alone logs
    # the loss (mean over both ranks) goes down: last two steps below the first two
    assert np.mean([r["loss"] for r in steps[2:]]) < np.mean([r["loss"] for r in steps[:2]])
