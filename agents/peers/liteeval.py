"""LiteEval (Wu et al., "A Coarse-to-Fine Framework for Resource Efficient Video Recognition",
IJCV 2021 / NeurIPS 2019) on a glance/focus feature pair.

The model, per sampled frame ``t`` in temporal order (paper section 3.1):

* coarse RNN over EVERY sampled frame's glance feature ``v_t^c``:
  ``h_t^c = cLSTM(v_t^c, h_{t-1}^c)`` (Eq. 1);
* conditional gate: two logits ``b_t = W_g [v_t^c, h_t^c, h_{t-1}^f]`` (Eq. 2 uses
  ``[v_t^c, h_{t-1}^f]``; we add the coarse state, which already holds ``v_t^c`` and the
  frames so far), ``B_t`` drawn by straight-through Gumbel-softmax in training and the hard
  argmax at test (Algorithm 1);
* fine RNN over the focus feature, read only when ``B_t = 1``:
  ``h~_t^f = fLSTM([v_t^c, v_t^f], h_{t-1}^f)`` (Eq. 3);
* when ``B_t = 0``, the coarse-to-fine sync: the first ``D^c`` units of the fine state (hidden
  and cell) are overwritten by the coarse state, the rest kept (Eq. 5);
* prediction from the fine state at the last frame (Eq. 6);
* loss: cross-entropy + ``lam x (fraction of frames focused - gamma)^2`` per video (Eq. 7).
  ``gamma`` is the budget knob.

Differences from the paper, all forced by or natural to pooled, precomputed features:

* the backbones are the two files' (no fine-tuning); inputs are standardized with train-split
  statistics and embedded by one linear+ReLU layer each before the RNNs;
* the paper reads every frame at 1 fps; we glance at ``num_frames`` TSN-sampled frames (a
  random frame per segment in training, the centre at test; ``num_frames=None``: every frame);
* the Gumbel sample is straight-through (hard forward, relaxed gradient) rather than the
  relaxed value itself, so training sees the same hard routing as test; the temperature
  decays exponentially from ``tau_start`` to ``tau_end`` (the paper decays it from a high
  value, unstated);
* AdamW with warm-up and cosine decay, gradient clipping, model selection on val mAP
  (the paper: Adam at a fixed 1e-4).

    python -m agents.peers.liteeval --glance G.h5 --focus F.h5 [--gamma 0.1] [--out DIR]
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from agents.peers.harness import (
    FrameCosts,
    PeerResult,
    Standardize,
    anneal,
    binary_gumbel,
    count_head_gflops,
    evaluate_peer,
    gather_batch,
    load_peer,
    lr_at,
    peer_cli,
    run_peer,
    sample_frames,
    save_peer,
    seeded_init,
    train_steps,
)
from features.pairs import FeaturePair, PairSplit

NAME = "liteeval"


# -- arguments -------------------------------------------------------------------------------


@dataclass
class LiteEvalArgs:
    gamma: float = 0.1  # target fraction of glanced frames that are focused (the budget knob)
    lam: float = 2.0  # weight of the usage penalty (paper: 2)
    num_frames: int | None = 32  # frames glanced per video (TSN segments); None: every frame
    embed_dim: int = 128  # input embedding of each feature
    coarse_hidden: int = 64  # D^c (paper, ActivityNet: 64)
    fine_hidden: int = 128  # D^f > D^c (paper, ActivityNet: 512)
    dropout: float = 0.2  # before the classifier
    tau_start: float = 2.0  # Gumbel temperature, decayed exponentially
    tau_end: float = 0.2
    lr: float = 2e-3
    weight_decay: float = 1e-3
    batch_size: int = 64
    epochs: float = 30.0  # gradient steps = epochs x train videos / batch, clipped below
    min_steps: int = 300
    max_steps: int = 1500
    warmup_frac: float = 0.05
    grad_clip: float = 1.0
    eval_every: int = 50  # val mAP every this many steps, in the second half of training
    seed: int = 0


# -- model -----------------------------------------------------------------------------------


class LiteEval(nn.Module):
    """Coarse LSTM + fine LSTM + conditional gate (see the module docstring)."""

    def __init__(self, glance_dim: int, focus_dim: int, num_classes: int,
                 args: LiteEvalArgs) -> None:
        super().__init__()
        if not args.fine_hidden > args.coarse_hidden:
            raise ValueError("LiteEval needs fine_hidden > coarse_hidden (the sync copies the "
                             "coarse state into the first units of the fine state)")
        E, Hc, Hf = args.embed_dim, args.coarse_hidden, args.fine_hidden
        self.norm_glance, self.norm_focus = Standardize(glance_dim), Standardize(focus_dim)
        self.embed_glance = nn.Sequential(nn.Linear(glance_dim, E), nn.ReLU())
        self.embed_focus = nn.Sequential(nn.Linear(focus_dim, E), nn.ReLU())
        self.coarse = nn.LSTMCell(E, Hc)
        self.fine = nn.LSTMCell(2 * E, Hf)
        self.gate = nn.Linear(E + Hc + Hf, 2)
        self.dropout = nn.Dropout(args.dropout)
        self.classifier = nn.Linear(Hf, num_classes)
        self.Hc, self.Hf = Hc, Hf

    def forward(self, glance: torch.Tensor, focus: torch.Tensor, mask: torch.Tensor,
                tau: float = 1.0, generator: torch.Generator | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Class logits ``[B, C]`` and focus decisions ``B_t`` ``[B, n]`` (0 on padding).

        ``glance [B, n, Dg]``, ``focus [B, n, Df]``, ``mask [B, n]`` (valid frames first).
        Training (``generator`` given) embeds every frame's focus feature for batching; the
        routing, and so the prediction, uses it only where ``B_t = 1``.
        """
        batch, n = mask.shape
        vc = self.embed_glance(self.norm_glance(glance))
        vf = self.embed_focus(self.norm_focus(focus))
        # one unbind, not vc[:, t] per step: each index's backward zero-fills a full-size
        # gradient (n^2 work; it was a quarter of a training step)
        coarse_in = vc.unbind(1)
        fine_in = torch.cat([vc, vf], dim=2).unbind(1)
        hc = cc = glance.new_zeros(batch, self.Hc)
        hf = cf = glance.new_zeros(batch, self.Hf)
        decisions, fine_states = [], []
        for t in range(n):
            hc, cc = self.coarse(coarse_in[t], (hc, cc))
            logits = self.gate(torch.cat([coarse_in[t], hc, hf], dim=1))
            b = binary_gumbel(logits, tau, generator)[:, None]
            hf_read, cf_read = self.fine(fine_in[t], (hf, cf))
            hf_sync = torch.cat([hc, hf[:, self.Hc:]], dim=1)  # Eq. 5
            cf_sync = torch.cat([cc, cf[:, self.Hc:]], dim=1)
            hf = b * hf_read + (1 - b) * hf_sync
            cf = b * cf_read + (1 - b) * cf_sync
            decisions.append(b[:, 0])
            fine_states.append(hf)
        # valid frames come first: the state after each video's last one is its prediction's
        # (the steps after it run on padding and are dropped, as are their decisions)
        last = mask.sum(1).clamp_min(1) - 1
        final = torch.stack(fine_states, dim=1)[torch.arange(batch), last]
        return (self.classifier(self.dropout(final)),
                torch.stack(decisions, dim=1) * mask.to(glance.dtype))

    def cost_per_frame(self, unit: str) -> dict[str, float]:
        """Head cost in G``unit``: per glanced frame (embedding, coarse LSTM, gate), per focused
        frame (embedding, fine LSTM), per video (classifier). A skipped frame's sync is a
        copy."""
        E = self.embed_glance[0].out_features
        g = torch.zeros(1, self.norm_glance.mean.numel())
        f = torch.zeros(1, self.norm_focus.mean.numel())
        hc, hf = torch.zeros(1, self.Hc), torch.zeros(1, self.Hf)

        def glanced() -> None:
            v = self.embed_glance(self.norm_glance(g))
            h, _ = self.coarse(v, (hc, hc))
            self.gate(torch.cat([v, h, hf], dim=1))

        def focused() -> None:
            v = self.embed_focus(self.norm_focus(f))
            self.fine(torch.cat([torch.zeros(1, E), v], dim=1), (hf, hf))

        return {"glanced": count_head_gflops(glanced, unit),
                "focused": count_head_gflops(focused, unit),
                "video": count_head_gflops(lambda: self.classifier(hf), unit)}


# -- train and evaluate ----------------------------------------------------------------------


@torch.no_grad()
def evaluate(model: LiteEval, split: PairSplit, costs: FrameCosts, args: LiteEvalArgs,
             batch_size: int = 256, name: str = NAME) -> PeerResult:
    """Every video of ``split`` once: centre frames of the segments, hard gates."""
    return evaluate_peer(name, model, split, costs, args.num_frames, batch_size)


def train(pair: FeaturePair, args: LiteEvalArgs, train_split: PairSplit | None = None,
          val_split: PairSplit | None = None, log: bool = False) -> tuple[LiteEval, dict]:
    """Train on ``train``, keep the checkpoint of best val mAP (second half of training).

    Deterministic for ``args.seed`` on the CPU: initialization, batches, frame sampling and
    Gumbel noise draw from the seed, dropout from the global stream seeded inside a fork (the
    caller's random state is left as it was).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        return _fit(pair, args, train_split, val_split, log)


def _fit(pair: FeaturePair, args: LiteEvalArgs, train_split: PairSplit | None,
         val_split: PairSplit | None, log: bool) -> tuple[LiteEval, dict]:
    train_split = train_split or pair.load("train")
    val_split = val_split or pair.load("val")
    costs = FrameCosts.from_pair(pair)
    model = seeded_init(args.seed, lambda: LiteEval(pair.glance_dim, pair.focus_dim,
                                                    len(pair.class_names), args))
    model.norm_glance.fit(train_split.glance)
    model.norm_focus.fit(train_split.focus)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    generator = torch.Generator().manual_seed(args.seed)
    labels = torch.as_tensor(train_split.labels)
    num_train = train_split.num_videos
    steps = train_steps(num_train, args.batch_size, args.epochs, args.min_steps, args.max_steps)
    order, cursor = torch.randperm(num_train, generator=generator), 0
    best = {"mAP": -1.0, "step": -1, "state": None}
    history: list[dict] = []
    t0, cpu0 = time.perf_counter(), time.process_time()
    for step in range(steps):
        model.train()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, args.lr, args.warmup_frac)
        tau = anneal(step, steps, args.tau_start, args.tau_end)
        if cursor + args.batch_size > num_train:  # a new epoch
            order, cursor = torch.randperm(num_train, generator=generator), 0
        videos = order[cursor: cursor + args.batch_size]
        cursor += args.batch_size
        frames, mask = sample_frames(train_split.lengths[videos.numpy()], args.num_frames,
                                     generator)
        glance, focus = gather_batch(train_split, videos, frames)
        logits, b = model(glance, focus, mask, tau, generator)
        usage = b.sum(1) / mask.sum(1)
        ce = F.cross_entropy(logits, labels[videos])
        loss = ce + args.lam * ((usage - args.gamma) ** 2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        last = step == steps - 1
        if last or (step + 1 >= steps // 2 and (step + 1) % args.eval_every == 0):
            val = evaluate(model, val_split, costs, args)
            history.append({"step": step + 1, "ce": float(ce.detach()),
                            "usage": float(usage.detach().mean()),
                            "tau": tau, "val_mAP": val.mAP, "val_focused": val.frames_focused,
                            "val_gflops": val.gflops_per_video,
                            "time_s": time.perf_counter() - t0})
            if log:
                print(json.dumps(history[-1]))
            if val.mAP >= best["mAP"]:  # ties: the later (more trained) checkpoint
                best = {"mAP": val.mAP, "step": step + 1,
                        "state": copy.deepcopy(model.state_dict())}
    model.load_state_dict(best["state"])
    model.eval()
    return model, {"steps": steps, "best_step": best["step"], "best_val_mAP": best["mAP"],
                   "train_s": time.perf_counter() - t0,
                   "train_cpu_s": time.process_time() - cpu0, "history": history}


def save(model: LiteEval, args: LiteEvalArgs, pair: FeaturePair, path: str | Path) -> None:
    """Checkpoint: weights (normalization statistics included) and the arguments."""
    save_peer(NAME, model, args, pair, path)


def load(path: str | Path) -> tuple[LiteEval, LiteEvalArgs]:
    return load_peer(path, LiteEval, LiteEvalArgs)


def run(pair: FeaturePair, args: LiteEvalArgs | None = None, out: str | Path | None = None,
        log: bool = False) -> dict:
    """Train, select on val, score on test, compare with uniform sampling at the same GFLOPs
    (:func:`agents.peers.harness.run_peer`)."""
    return run_peer(NAME, args or LiteEvalArgs(), pair, train, evaluate, out, log)


def main(argv: list[str] | None = None) -> None:
    peer_cli(NAME, LiteEvalArgs, run, __doc__, argv)


if __name__ == "__main__":
    main()
