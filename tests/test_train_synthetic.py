"""examples/train_synthetic.py: the script that made the examples' trained weights really trains
(a short run lowers the loss) and writes weights the compiler loads."""

from __future__ import annotations

import re
import subprocess
import sys

import torch

from mocompile.dsl import build_model, load_spec

from conftest import EXAMPLES, ROOT


def test_a_short_run_learns_and_writes_loadable_weights(tmp_path):
    out = tmp_path / "w.safetensors"
    spec = EXAMPLES / "unified_tiny.moe"  # text plus two feature modalities
    done = subprocess.run([sys.executable, str(EXAMPLES / "train_synthetic.py"), str(spec), "--steps", "60",
                           "--batch", "8", "-o", str(out)], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr
    losses = [float(x) for x in re.findall(r"loss (\d+\.\d+)", done.stdout)]
    assert len(losses) >= 2 and losses[-1] < 0.8 * losses[0]
    model = build_model(load_spec(spec), weights=out)
    random = build_model(load_spec(spec), seed=0)
    name = "layers.0.attn.q_proj.weight"
    trained_w = dict(model.named_parameters())[name]
    assert not torch.equal(trained_w, dict(random.named_parameters())[name])
    assert trained_w.dtype == torch.float32  # stored as float16, computed in float32
