"""Train a bundled example on a synthetic language, so that it has the weights of a trained model.

    python examples/train_synthetic.py examples/mixtral_tiny.moe      # writes examples/weights/mixtral_tiny.safetensors
    mocompile compile examples/mixtral_tiny.moe --weights examples/weights/mixtral_tiny.safetensors -o build/mt

Why: a model with random weights predicts nearly flat next-token distributions (the top-1 and
top-2 logits of the examples' random init differ by a quarter of a nat at the median) and
routes on near-ties, so any rounding of its weights flips a tenth of its choices. A trained
model is confident where its data is predictable, and that is what quantization is measured on
(`tests/test_quantize.py`, `benchmarks/bench_quant.py`). Nothing can be downloaded here, so the
examples learn a language generated on the spot:

- text: a sparse random Markov chain over the vocabulary, each token followed by one of four
  successors with probabilities 0.55 / 0.25 / 0.12 / 0.08 (so the best possible top-1 accuracy
  is 55%, and a trained model's top-1 logit stands clear of the rest);
- feature modalities (image, audio): half the segments are noisy copies of one of 16 random
  codebook vectors and predict that vector's label token at every position (the model names
  what it sees, which trains the modality experts); the other half are plain unit-normal noise
  and predict the modality's own marker token ("nothing recognised"), so random inputs, which
  the calibration uses, get a confident answer too.

Training is deterministic for a given seed (AdamW, a few hundred steps, seconds to a minute on
two cores); the weights are written as float16 safetensors (the reference computes in float32).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from mocompile.dsl import build_model, load_spec
from mocompile.dsl.spec import Spec

SUCCESSOR_PROBS = np.array([0.55, 0.25, 0.12, 0.08])
CODEBOOK = 16  # distinct vectors a feature segment is a noisy copy of


class SyntheticLanguage:
    """Batches of (segments, targets) for a spec's modalities, from a fixed random generator."""

    def __init__(self, spec: Spec, seed: int) -> None:
        self.spec = spec
        rng = np.random.default_rng(seed)
        self.rng = rng
        vocab = next(m.vocab for m in spec.modalities if m.is_tokens)
        self.vocab = vocab
        self.successors = np.stack([rng.choice(vocab, size=len(SUCCESSOR_PROBS), replace=False) for _ in range(vocab)])
        self.codebooks = {m.name: rng.standard_normal((CODEBOOK, m.features)).astype(np.float32)
                          for m in spec.modalities if not m.is_tokens}
        self.label_of_code = rng.choice(vocab, size=CODEBOOK)
        self.marker = {m.name: int(rng.integers(0, vocab)) for m in spec.modalities if not m.is_tokens}

    def text(self, batch: int, seq: int, first: np.ndarray) -> np.ndarray:
        ids = np.empty((batch, seq), np.int64)
        ids[:, 0] = first
        choice = self.rng.choice(len(SUCCESSOR_PROBS), size=(batch, seq), p=SUCCESSOR_PROBS)
        for t in range(1, seq):
            ids[:, t] = self.successors[ids[:, t - 1], choice[:, t]]
        return ids

    def batch(self, batch: int, seq: int) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Segments in spec order and next-token targets over the fused sequence (-100: none)."""
        code = self.rng.integers(0, CODEBOOK, size=batch)
        segments, targets = [], []
        for m in self.spec.modalities:
            if m.is_tokens:
                text = self.text(batch, seq, self.rng.integers(0, self.vocab, size=batch))
                segments.append(torch.from_numpy(text))
                targets.append(np.concatenate([text[:, 1:], np.full((batch, 1), -100)], axis=1))
            else:
                n = max(1, seq // 4)
                seen = self.rng.random(batch) < 0.5  # half the segments show a codebook vector
                noise = self.rng.standard_normal((batch, n, m.features))
                feats = np.where(seen[:, None, None], self.codebooks[m.name][code][:, None, :] + 0.3 * noise, noise)
                segments.append(torch.from_numpy(feats.astype(np.float32)))
                label = np.where(seen, self.label_of_code[code], self.marker[m.name])
                targets.append(np.repeat(label[:, None], n, axis=1))
        return segments, torch.from_numpy(np.concatenate(targets, axis=1).astype(np.int64))


def calibration_tokens(spec: Spec, sequences: int, seq: int, seed: int = 0) -> np.ndarray:
    """Token ids [sequences, seq] of the language the weights of `seed` were trained on, drawn
    apart from the training batches: calibration data for the data-driven passes (`--calib`)."""
    lang = SyntheticLanguage(spec, seed)
    lang.rng = np.random.default_rng(seed + 1_000_003)
    return lang.text(sequences, seq, lang.rng.integers(0, lang.vocab, size=sequences))


def train(spec: Spec, steps: int, batch: int, seq: int, seed: int, log=print) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_model(spec, seed=seed)
    model.train()
    data = SyntheticLanguage(spec, seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    t0 = time.perf_counter()
    for step in range(steps):
        segments, targets = data.batch(batch, seq)
        logits = model(*segments)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                                 ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0 or step == steps - 1:
            log(f"step {step:4d}  loss {loss.item():.3f}  ({time.perf_counter() - t0:.0f} s)")
    model.eval()
    return model


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("spec", help="a .moe file")
    ap.add_argument("-o", "--out", help="output .safetensors (default: examples/weights/<model>.safetensors)")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--calib-out", metavar="FILE.npy",
                    help="instead of training, write calibration token ids of the same language [--calib-n, --seq]")
    ap.add_argument("--calib-n", type=int, default=32, help="calibration sequences to write (default 32)")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    spec = load_spec(args.spec)
    if args.calib_out:
        np.save(args.calib_out, calibration_tokens(spec, args.calib_n, args.seq, args.seed))
        print(f"wrote {args.calib_out}")
        return 0
    model = train(spec, args.steps, args.batch, args.seq, args.seed)
    out = Path(args.out or Path(__file__).parent / "weights" / f"{spec.name}.safetensors")
    out.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out), metadata={"spec": spec.name, "trained_on": "examples/train_synthetic.py",
                                         "steps": str(args.steps), "seed": str(args.seed)})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
