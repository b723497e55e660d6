"""AFNet-style peer (Zhang et al., "Look More but Care Less in Video Recognition", NeurIPS 2022)
on a glance/focus feature pair.

Named "AFNet-style": AFNet selects frames per convolution block INSIDE a CNN (its ample and
focal branches are two paths through the same network, and a different subset of frames is
computed at every block). On pooled, precomputed features there are no blocks to select
within, so the selection happens once per frame, between a cheap backbone (the glance file)
and an expensive one (the focus file). What is kept, per the paper's section 3:

* ample branch over ALL sampled frames: a per-frame MLP on the glance feature (the paper: all
  frames at reduced resolution and channels);
* navigation module (Eqs. 2-3): a per-frame map of the ample features to 2 channels,
  ``ReLU(BN(W1 a_t))``, then the ``T x 2`` channels of the video reshaped to ``2T`` and mixed
  by a second linear layer ``W2`` into one binary logit pair per frame (temporal relations
  through the channel dimension, so the number of sampled frames ``num_frames`` is fixed, as
  in AFNet's 8/12-frame TSN sampling);
* Gumbel-softmax selection, straight-through (hard in the forward pass, Eqs. 5-6), the
  temperature decayed exponentially from 1 to 0.01 during training;
* focal branch: a per-frame MLP on the focus feature of the selected frames only;
* fusion (Eq. 8): ``z = theta * ample + (1 - theta) * focal`` with a channel-wise
  ``theta = sigmoid(W [ample, focal])`` from the pooled branches, then a linear classifier
  (the paper averages per-frame predictions; with a linear classifier on pooled features this
  is the same up to the pooling weights);
* loss (Eq. 16): cross-entropy + ``lam x (r - RT)^2`` with ``r`` the ratio of selected frames
  in the mini-batch and the target ``RT`` annealed from 1 down to ``ratio`` (the budget knob)
  over the first ``ratio_anneal`` fraction of training, as AFNet decreases RT "from 1 to the
  number we set before training by steps".

Also different from the paper: inputs are standardized with train-split statistics, AdamW with
warm-up and cosine decay, gradient clipping, model selection on val mAP.

    python -m agents.peers.afnet --glance G.h5 --focus F.h5 [--ratio 0.25] [--out DIR]
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

NAME = "afnet"


# -- arguments -------------------------------------------------------------------------------


@dataclass
class AFNetArgs:
    ratio: float = 0.25  # target ratio RT of glanced frames that are focused (budget knob)
    lam: float = 10.0  # weight of the ratio penalty (2 left the ratio ~0.1 above RT)
    ratio_anneal: float = 0.5  # RT goes from 1 to `ratio` over this fraction of the steps
    num_frames: int = 32  # frames glanced per video (TSN segments); fixed: W2 mixes 2T channels
    hidden: int = 256  # width of both branches
    dropout: float = 0.2  # before the classifier
    tau_start: float = 1.0  # Gumbel temperature, 1 -> 0.01 exponentially (paper)
    tau_end: float = 0.01
    lr: float = 2e-3
    weight_decay: float = 1e-3
    batch_size: int = 64
    epochs: float = 30.0  # gradient steps = epochs x train videos / batch, clipped below
    min_steps: int = 300
    max_steps: int = 1500
    warmup_frac: float = 0.05
    grad_clip: float = 1.0
    eval_every: int = 50  # val mAP every this many steps, once the target ratio is reached
    seed: int = 0


# -- model -----------------------------------------------------------------------------------


def _mlp(dim_in: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden),
                         nn.ReLU())


class AFNet(nn.Module):
    """Ample branch + navigation module + focal branch + fusion (see the module docstring)."""

    def __init__(self, glance_dim: int, focus_dim: int, num_classes: int,
                 args: AFNetArgs) -> None:
        super().__init__()
        H, n = args.hidden, args.num_frames
        self.num_frames = n
        self.norm_glance, self.norm_focus = Standardize(glance_dim), Standardize(focus_dim)
        self.ample = _mlp(glance_dim, H)
        self.nav1 = nn.Sequential(nn.Linear(H, 2), nn.BatchNorm1d(2), nn.ReLU())  # Eq. 2
        self.nav2 = nn.Linear(2 * n, 2 * n)  # Eq. 3: the video's T x 2 channels, mixed
        self.focal = _mlp(focus_dim, H)
        self.theta = nn.Linear(2 * H, H)  # Eq. 8: channel-wise fusion weight
        self.dropout = nn.Dropout(args.dropout)
        self.classifier = nn.Linear(H, num_classes)

    def navigate(self, ample: torch.Tensor) -> torch.Tensor:
        """Per-frame select/skip logits ``[B, n, 2]`` from the ample features ``[B, n, H]``."""
        batch, n, H = ample.shape
        s = self.nav1(ample.reshape(batch * n, H)).reshape(batch, 2 * n)
        return self.nav2(s).reshape(batch, n, 2)

    def forward(self, glance: torch.Tensor, focus: torch.Tensor, mask: torch.Tensor,
                tau: float = 1.0, generator: torch.Generator | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Class logits ``[B, C]`` and frame selections ``[B, n]`` (0 on padding).

        ``glance [B, n, Dg]``, ``focus [B, n, Df]``, ``mask [B, n]``. Training embeds every
        frame's focus feature for batching; only the selected ones reach the prediction.
        """
        valid = mask.to(glance.dtype)[..., None]
        ample = self.ample(self.norm_glance(glance))  # [B, n, H]
        selected = binary_gumbel(self.navigate(ample), tau, generator)[..., None] * valid
        focal = self.focal(self.norm_focus(focus)) * selected
        ample_pool = (ample * valid).sum(1) / valid.sum(1)
        focal_pool = focal.sum(1) / selected.sum(1).clamp_min(1.0)
        theta = torch.sigmoid(self.theta(torch.cat([ample_pool, focal_pool], dim=1)))
        fused = theta * ample_pool + (1 - theta) * focal_pool
        return self.classifier(self.dropout(fused)), selected[..., 0]

    def cost_per_frame(self, unit: str) -> dict[str, float]:
        """Head cost in G``unit``: per glanced frame (ample MLP, W1), per focused frame (focal
        MLP), per video (W2, fusion, classifier)."""
        g = torch.zeros(1, self.norm_glance.mean.numel())
        f = torch.zeros(1, self.norm_focus.mean.numel())
        H = self.classifier.in_features
        was_training = self.training
        self.eval()
        try:
            glanced = count_head_gflops(lambda: self.nav1(self.ample(self.norm_glance(g))), unit)
            focused = count_head_gflops(lambda: self.focal(self.norm_focus(f)), unit)

            def video() -> None:
                self.nav2(torch.zeros(1, 2 * self.num_frames))
                self.theta(torch.zeros(1, 2 * H))
                self.classifier(torch.zeros(1, H))

            per_video = count_head_gflops(video, unit)
        finally:
            self.train(was_training)
        return {"glanced": glanced, "focused": focused, "video": per_video}


# -- train and evaluate ----------------------------------------------------------------------


@torch.no_grad()
def evaluate(model: AFNet, split: PairSplit, costs: FrameCosts, args: AFNetArgs,
             batch_size: int = 256, name: str = NAME) -> PeerResult:
    """Every video of ``split`` once: centre frames of the segments, hard selections."""
    return evaluate_peer(name, model, split, costs, args.num_frames, batch_size)


def train(pair: FeaturePair, args: AFNetArgs, train_split: PairSplit | None = None,
          val_split: PairSplit | None = None, log: bool = False) -> tuple[AFNet, dict]:
    """Train on ``train``, keep the checkpoint of best val mAP once RT has reached its target.

    Deterministic for ``args.seed`` on the CPU: initialization, batches, frame sampling and
    Gumbel noise draw from the seed, dropout from the global stream seeded inside a fork (the
    caller's random state is left as it was).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        return _fit(pair, args, train_split, val_split, log)


def _fit(pair: FeaturePair, args: AFNetArgs, train_split: PairSplit | None,
         val_split: PairSplit | None, log: bool) -> tuple[AFNet, dict]:
    train_split = train_split or pair.load("train")
    val_split = val_split or pair.load("val")
    costs = FrameCosts.from_pair(pair)
    model = seeded_init(args.seed, lambda: AFNet(pair.glance_dim, pair.focus_dim,
                                                 len(pair.class_names), args))
    model.norm_glance.fit(train_split.glance)
    model.norm_focus.fit(train_split.focus)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    generator = torch.Generator().manual_seed(args.seed)
    labels = torch.as_tensor(train_split.labels)
    num_train = train_split.num_videos
    steps = train_steps(num_train, args.batch_size, args.epochs, args.min_steps, args.max_steps)
    anneal_steps = max(1, int(args.ratio_anneal * steps))
    order, cursor = torch.randperm(num_train, generator=generator), 0
    best = {"mAP": -1.0, "step": -1, "state": None}
    history: list[dict] = []
    t0, cpu0 = time.perf_counter(), time.process_time()
    for step in range(steps):
        model.train()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, args.lr, args.warmup_frac)
        tau = anneal(step, steps, args.tau_start, args.tau_end)
        target = args.ratio + (1 - args.ratio) * max(0.0, 1 - step / anneal_steps)
        if cursor + args.batch_size > num_train:  # a new epoch
            order, cursor = torch.randperm(num_train, generator=generator), 0
        videos = order[cursor: cursor + args.batch_size]
        cursor += args.batch_size
        frames, mask = sample_frames(train_split.lengths[videos.numpy()], args.num_frames,
                                     generator)
        glance, focus = gather_batch(train_split, videos, frames)
        logits, selected = model(glance, focus, mask, tau, generator)
        ratio = selected.sum() / mask.sum()  # over the mini-batch (Eq. 16)
        ce = F.cross_entropy(logits, labels[videos])
        loss = ce + args.lam * (ratio - target) ** 2
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        last = step == steps - 1
        if last or (step + 1 >= anneal_steps and (step + 1) % args.eval_every == 0):
            val = evaluate(model, val_split, costs, args)
            history.append({"step": step + 1, "ce": float(ce.detach()),
                            "ratio": float(ratio.detach()), "target": target, "tau": tau,
                            "val_mAP": val.mAP, "val_focused": val.frames_focused,
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


def save(model: AFNet, args: AFNetArgs, pair: FeaturePair, path: str | Path) -> None:
    """Checkpoint: weights (normalization statistics included) and the arguments."""
    save_peer(NAME, model, args, pair, path)


def load(path: str | Path) -> tuple[AFNet, AFNetArgs]:
    return load_peer(path, AFNet, AFNetArgs)


def run(pair: FeaturePair, args: AFNetArgs | None = None, out: str | Path | None = None,
        log: bool = False) -> dict:
    """Train, select on val, score on test, compare with uniform sampling at the same GFLOPs
    (:func:`agents.peers.harness.run_peer`)."""
    return run_peer(NAME, args or AFNetArgs(), pair, train, evaluate, out, log)


def main(argv: list[str] | None = None) -> None:
    peer_cli(NAME, AFNetArgs, run, __doc__, argv)


if __name__ == "__main__":
    main()
