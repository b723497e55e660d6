"""NSNet (Xia et al., "NSNet: Non-saliency Suppression Sampler for Efficient Video Recognition",
ECCV 2022) on a glance/focus feature pair.

NSNet is a sampler: it glances at ``num_frames`` observation frames with a cheap backbone,
scores their saliency and hands the ``k`` most salient to an off-the-shelf recognizer (the
expensive backbone), whose per-frame predictions are averaged (section 3.1). Per the paper:

* recognizer: a frame-level classifier on the focus feature; at test its class scores on the
  ``k`` selected frames are averaged (TSN consensus: mean of the frame scores, then softmax);
* prototypes (appendix A.1): the recognizer scores every train frame; per video, the frames it
  classifies correctly, of those the top ``top_percent`` (epsilon = 30%) by ground-truth
  confidence, mean-pooled into a guiding video feature; class prototype ``p_c`` = mean of the
  guiding features of the class's videos;
* NS pseudo labels (Eq. 1): guiding saliency ``g_i = softmax_j(phi(x_i, p_j))`` at the video's
  class ``c``, ``phi`` = minus the Euclidean distance of the frame's (recognizer) feature to
  each prototype; frame target ``y_i = [g_i onehot(c), 1 - g_i]`` over ``C + 1`` classes (the
  last is *non-salient*);
* feature embedding module (FEM, section 3.3): the glance features of the ``num_frames``
  observation frames through a 2-layer transformer encoder (8 heads, FFN width = model width,
  learnable positional embedding, dropout 0.2 after it; appendix A.1);
* frame scrutinize module (FSM, section 3.4): a per-frame linear head to ``C + 1`` classes
  trained by soft cross-entropy on the NS pseudo labels (Eq. 2); saliency ``s^f_i`` = the
  highest of the ``C`` semantic probabilities, softmax-normalized over time;
* video glimpse module (VGM, section 3.5): attention ``alpha_i`` = a linear layer (sigmoid),
  then L1 normalization over time; the salient representation ``sum_i alpha_i x_i`` is
  classified as the video's class, the non-salient one ``sum_i (1 - alpha_i) / T x_i`` as
  *non-salient*, by the same ``C + 1``-way linear layer (dropout before it; 0.2 after the
  attention): ``L_v = L_cls + gamma L_ns``, ``gamma = 0.2`` (Eq. 3); saliency
  ``s^v_i = alpha_i``; total loss ``L_v + L_f`` (Eq. 4);
* fusion by index union (appendix A.2, the paper's choice): the top ``ceil(alpha K)`` frames
  by ``s^f`` united with the top frames by ``s^v``, then filled from the ``s^f`` ranking until
  exactly ``K`` frames (``alpha = union_alpha = 0.6``). ``k`` (K) is the budget knob.

Adapted, because the inputs are pooled per-frame features of frozen backbones (no pixels):

* the backbones are the two files' (no fine-tuning). The recognizer (the paper: a CNN trained
  on the target data, used off the shelf) is one linear layer on the standardized focus
  feature, trained here first, TSN-style (cross-entropy of the mean of its scores on
  ``rec_frames`` random segment frames), the weights of best val mAP kept (early stopping: a
  linear map on 1280 dimensions overfits a few hundred videos within tens of steps, while a
  small set needs all of them). "Correct frames", prototypes and distances come from it and
  the standardized focus features;
* Eq. 1's scale: ``phi = -d / (proto_temperature x s)`` with ``s`` the mean over train frames
  of the standard deviation over classes of their prototype distances. The paper gives no
  scale; raw distances in 1280 standardized dimensions differ by several units between
  classes (``g`` one-hot), distances divided by ``sqrt(D)`` by about a tenth (``g ~ 1/C``
  everywhere); ``s`` makes ``g`` equally soft on any feature scale and dimension;
* inputs are standardized with train-split statistics (buffers, in the checkpoint); the
  glance feature is embedded by one linear layer to ``d_model = 64`` before the transformer
  (the paper runs it at the backbone's 1280 channels; 128 gave the same val mAP at twice the
  CPU time); no dropout inside the encoder layers (the paper names only the one after the
  positional embedding);
* the observation frames are ``num_frames = 16`` TSN segments (a random frame per segment in
  training, the paper's "temporal random shift"; the centre at test), as in the paper's FLOPs
  example (MobileNetV2 on 16 frames); the ``k`` focused frames are chosen among them;
* the index union takes ``K - ceil(alpha K)`` frames from the VGM list (the paper:
  ``ceil((1 - alpha) K)``, which can make the union exceed ``K``, e.g. 2 + 2 for K = 3), so
  every video gets exactly ``min(K, observed frames)`` focused frames (K = 5: 3 + 2, as in the
  paper);
* ``L_f`` is the mean over frames (Eq. 2 sums them, which would outweigh ``L_v`` 16-fold),
  weighted by ``frame_weight`` (1);
* the VGM classifier's dropout is 0.5 (paper 0.9, for a 1280-wide input); AdamW with warm-up
  and cosine decay, gradient clipping, sampler selection on val mAP in the second half of
  training (the paper: SGD at 0.01, decayed at epochs 50 and 75 of 120);
* costs: the glance backbone on the observed frames, the focus backbone on the selected ones,
  plus the heads counted with ``FlopCounterMode``: embedding and the two saliency heads per
  glanced frame, the transformer once per video at ``num_frames`` tokens, the recognizer per
  focused frame (the VGM classifier serves training only).

    python -m agents.peers.nsnet --glance G.h5 --focus F.h5 [--k 5] [--out DIR]
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from agents.metrics import mean_average_precision
from agents.peers.harness import (
    FrameCosts,
    PeerResult,
    Standardize,
    count_head_gflops,
    evaluate_peer,
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

NAME = "nsnet"


# -- arguments -------------------------------------------------------------------------------


@dataclass
class NSNetArgs:
    k: int = 5  # frames focused per video, chosen among the observed ones (the budget knob)
    num_frames: int = 16  # observation frames glanced per video (TSN segments; paper: 16)
    d_model: int = 64  # transformer width (the glance feature is embedded to it)
    heads: int = 8  # paper: 8
    layers: int = 2  # paper: 2
    dropout: float = 0.2  # after the positional embedding and after the attention (paper)
    cls_dropout: float = 0.5  # before the VGM classifier (paper: 0.9)
    gamma: float = 0.2  # weight of the non-saliency suppression loss L_ns (paper: 0.2)
    frame_weight: float = 1.0  # weight of the FSM loss L_f
    union_alpha: float = 0.6  # index union: ceil(alpha K) frames from the FSM list (paper)
    top_percent: float = 0.3  # epsilon of the prototypes (paper: 30%)
    proto_temperature: float = 1.0  # Eq. 1 logits: -distance / (this x distance_scale)
    lr: float = 1e-3
    weight_decay: float = 1e-2
    batch_size: int = 64
    epochs: float = 30.0  # gradient steps = epochs x train videos / batch, clipped below
    min_steps: int = 300
    max_steps: int = 1500
    warmup_frac: float = 0.05
    grad_clip: float = 1.0
    eval_every: int = 50  # val mAP every this many steps, in the second half of training
    rec_lr: float = 5e-3  # the recognizer (frame-level focus classifier)
    rec_weight_decay: float = 1e-3
    rec_frames: int = 8  # TSN segments per video in the recognizer's training consensus
    rec_epochs: float = 30.0  # recognizer steps = rec_epochs x train videos / batch, clipped
    rec_eval_every: int = 10  # recognizer: val mAP every this many steps, the best kept
    seed: int = 0


# -- the pieces of the method, each testable on its own ----------------------------------------


def class_prototypes(features: torch.Tensor, frame_logits: torch.Tensor, offsets: np.ndarray,
                     lengths: np.ndarray, labels: np.ndarray, num_classes: int,
                     top_percent: float, transform=None) -> torch.Tensor:
    """Class prototypes ``[C, D]`` (appendix A.1) from every train frame.

    ``features [sum T, D]`` (the recognizer's feature of each frame, through ``transform`` when
    given), ``frame_logits [sum T, C]`` (its scores). Per video: the frames predicted as the
    video's class, of those the top ``ceil(top_percent x count)`` by the class's probability,
    mean-pooled (a video with no correct frame uses the top ``top_percent`` of all its frames);
    per class: the mean over its videos. A class without train videos gets the mean of all
    guiding features.
    """
    transform = transform or (lambda x: x)
    probs = torch.softmax(frame_logits.double(), dim=1)
    guides = torch.zeros(len(lengths), features.shape[1], dtype=torch.float64)
    for v, (lo, n, c) in enumerate(zip(offsets, lengths, labels, strict=True)):
        p = probs[lo: lo + n]
        conf = p[:, c]
        candidates = torch.nonzero(p.argmax(1) == c).reshape(-1)
        if len(candidates) == 0:
            candidates = torch.arange(int(n))
        top = max(1, math.ceil(top_percent * len(candidates)))
        chosen = candidates[torch.argsort(conf[candidates], descending=True, stable=True)[:top]]
        guides[v] = transform(features[lo + chosen].float()).double().mean(0)
    labels_t = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    protos = guides.mean(0, keepdim=True).repeat(num_classes, 1)
    for c in range(num_classes):
        members = labels_t == c
        if members.any():
            protos[c] = guides[members].mean(0)
    return protos.float()


def prototype_distances(features: torch.Tensor, prototypes: torch.Tensor, chunk: int = 8192,
                        transform=None) -> torch.Tensor:
    """Euclidean distance of every frame to every prototype, ``[N, C]``; ``features [N, D]``
    go through ``transform`` when given (``|x|^2 - 2 x.p + |p|^2`` by one matrix product per
    chunk)."""
    transform = transform or (lambda x: x)
    p = prototypes.float()
    p_sq = (p * p).sum(1)
    out = []
    for lo in range(0, len(features), chunk):
        x = transform(features[lo: lo + chunk].float())
        sq = (x * x).sum(1, keepdim=True) - 2 * x @ p.T + p_sq
        out.append(sq.clamp_min(0).sqrt())
    return torch.cat(out)


def guiding_saliency(distances: torch.Tensor, labels: torch.Tensor, temperature: float
                     ) -> torch.Tensor:
    """Eq. 1: ``g_i = softmax_j(-d_ij / tau)[label_i]`` per frame, ``[N]`` (float32), from the
    distances ``[N, C]`` of each frame to the prototypes and each frame's video class."""
    logits = -distances.double() / temperature
    return torch.softmax(logits, dim=1).gather(1, labels[:, None]).reshape(-1).float()


def distance_scale(distances: torch.Tensor) -> float:
    """The typical spread of a frame's distances to the prototypes: the mean over frames of
    their standard deviation over classes (Eq. 1's unit: scale-free in the feature scale and
    dimension)."""
    return float(distances.std(1).mean().clamp_min(1e-12)) if distances.shape[1] > 1 else 1.0


def ns_targets(g: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """NS pseudo labels ``[..., C + 1]``: ``g`` on the video's class, ``1 - g`` on the
    non-salient class (the last), 0 elsewhere."""
    target = torch.zeros(*g.shape, num_classes + 1, dtype=g.dtype)
    target.scatter_(-1, labels.expand_as(g)[..., None], g[..., None])
    target[..., num_classes] = 1 - g
    return target


def index_union(s_f: torch.Tensor, s_v: torch.Tensor, mask: torch.Tensor, k: int,
                alpha: float) -> torch.Tensor:
    """Index-union fusion (appendix A.2): bool ``[B, n]``, exactly ``min(k, valid)`` frames.

    The top ``ceil(alpha k)`` frames by ``s_f`` and the top ``k - ceil(alpha k)`` by ``s_v``,
    united, then filled with the next frames of the ``s_f`` ranking until ``k`` are chosen
    (``mask`` marks the valid frames; ties go to the earlier frame)."""
    batch, n = mask.shape
    neg = torch.finfo(s_f.dtype).min
    order_f = torch.sort(s_f.masked_fill(~mask, neg), dim=1, descending=True, stable=True)[1]
    order_v = torch.sort(s_v.masked_fill(~mask, neg), dim=1, descending=True, stable=True)[1]
    budget = mask.sum(1).clamp(max=k)  # [B]
    k_f = torch.minimum(torch.full_like(budget, math.ceil(alpha * k)), budget)
    k_v = budget - k_f
    rank = torch.arange(n)[None, :]
    chosen = torch.zeros(batch, n, dtype=torch.bool)
    chosen.scatter_(1, order_f, rank < k_f[:, None])
    chosen |= torch.zeros_like(chosen).scatter_(1, order_v, rank < k_v[:, None])
    for r in range(n):  # fill from the FSM ranking
        need = chosen.sum(1) < budget
        frame = order_f[:, r]
        chosen[torch.arange(batch), frame] |= need
    return chosen & mask


# -- model -----------------------------------------------------------------------------------


class EncoderLayer(nn.Module):
    """A post-norm transformer encoder layer (Vaswani et al.) with explicit attention matmuls
    (so ``FlopCounterMode`` counts every multiply); padded frames are masked as keys. No
    dropout inside (the paper places it after the positional embedding only)."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        if d % heads:
            raise ValueError(f"NSNet: d_model {d} is not divisible by heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ffn = nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, d))
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        batch, n, d = x.shape
        q, k, v = self.qkv(x).reshape(batch, n, 3, self.heads, d // self.heads).permute(
            2, 0, 3, 1, 4)
        att = (q @ k.transpose(-1, -2)) / math.sqrt(d // self.heads)
        att = torch.softmax(att.masked_fill(~mask[:, None, None, :], float("-inf")), dim=-1)
        y = (att @ v).transpose(1, 2).reshape(batch, n, d)
        x = self.norm1(x + self.proj(y))
        return self.norm2(x + self.ffn(x))


class NSNet(nn.Module):
    """Recognizer + FEM (transformer) + FSM + VGM + index union (see the module docstring)."""

    def __init__(self, glance_dim: int, focus_dim: int, num_classes: int,
                 args: NSNetArgs) -> None:
        super().__init__()
        if not 1 <= args.k <= args.num_frames:
            raise ValueError(f"NSNet: k={args.k} must be in [1, num_frames={args.num_frames}]")
        d, C = args.d_model, num_classes
        self.k, self.alpha, self.num_frames, self.num_classes = (
            args.k, args.union_alpha, args.num_frames, num_classes)
        self.norm_glance, self.norm_focus = Standardize(glance_dim), Standardize(focus_dim)
        # the recognizer: a frame-level classifier on the focus feature
        self.recognizer = nn.Linear(focus_dim, C)
        # FEM
        self.embed = nn.Linear(glance_dim, d)
        self.position = nn.Parameter(torch.zeros(args.num_frames, d))
        nn.init.normal_(self.position, std=0.02)
        self.embed_drop = nn.Dropout(args.dropout)
        self.encoder = nn.ModuleList(EncoderLayer(d, args.heads) for _ in range(args.layers))
        # FSM
        self.frame_head = nn.Linear(d, C + 1)
        # VGM
        self.attention = nn.Linear(d, 1)
        self.att_drop = nn.Dropout(args.dropout)
        self.cls_drop = nn.Dropout(args.cls_dropout)
        self.video_head = nn.Linear(d, C + 1)

    # the recognizer ------------------------------------------------------------------------

    def frame_logits(self, focus: torch.Tensor) -> torch.Tensor:
        """The recognizer's class scores of each frame ``[..., C]`` (raw focus features in)."""
        return self.recognizer(self.norm_focus(focus))

    # the sampler ---------------------------------------------------------------------------

    def sampler(self, glance: torch.Tensor, mask: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """FEM + heads: per-frame FSM logits ``[B, n, C+1]``, attention ``alpha [B, n]`` (L1
        normalized over the valid frames) and the encoded frames ``[B, n, d]``."""
        n = glance.shape[1]
        x = self.embed_drop(self.embed(self.norm_glance(glance)) + self.position[:n])
        for layer in self.encoder:
            x = layer(x, mask)
        raw = torch.sigmoid(self.attention(x))[..., 0] * mask.to(x.dtype)
        alpha = raw / raw.sum(1, keepdim=True).clamp_min(1e-12)
        return self.frame_head(x), alpha, x

    def saliency(self, frame_logits: torch.Tensor, alpha: torch.Tensor, mask: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """``s^f``: the highest semantic probability of each frame, softmax over time; ``s^v``:
        the attention."""
        conf = torch.softmax(frame_logits, dim=-1)[..., : self.num_classes].amax(-1)
        s_f = torch.softmax(conf.masked_fill(~mask, float("-inf")), dim=1)
        return s_f, alpha

    def select(self, glance: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The ``k`` frames to focus on, bool ``[B, n]``."""
        frame_logits, alpha, _ = self.sampler(glance, mask)
        s_f, s_v = self.saliency(frame_logits, alpha, mask)
        return index_union(s_f, s_v, mask, self.k, self.alpha)

    def forward(self, glance: torch.Tensor, focus: torch.Tensor, mask: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Class logits ``[B, C]`` (the mean of the recognizer's scores on the selected
        frames) and the selection ``[B, n]`` (float, 0 on padding).

        ``glance [B, n, Dg]``, ``focus [B, n, Df]``, ``mask [B, n]``. For batching the focus
        features of every frame are passed in; only the selected ones reach the prediction."""
        chosen = self.select(glance, mask)
        w = chosen.to(focus.dtype)[..., None]
        logits = (self.frame_logits(focus) * w).sum(1) / w.sum(1).clamp_min(1.0)
        return logits, chosen.to(focus.dtype)

    def losses(self, glance: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor,
               g: torch.Tensor, frame_weight: float, gamma: float
               ) -> dict[str, torch.Tensor]:
        """``L_f`` (Eq. 2, mean over valid frames), ``L_cls`` and ``L_ns`` (Eq. 3)."""
        C = self.num_classes
        frame_logits, alpha, x = self.sampler(glance, mask)
        valid = mask.to(x.dtype)
        target = ns_targets(g, labels[:, None], C)
        per_frame = -(target * torch.log_softmax(frame_logits, dim=-1)).sum(-1)
        l_f = ((per_frame * valid).sum(1) / valid.sum(1)).mean()
        a = self.att_drop(alpha)
        salient = (a[..., None] * x).sum(1)
        non_salient = (((1 - alpha) * valid / valid.sum(1, keepdim=True))[..., None] * x).sum(1)
        l_cls = F.cross_entropy(self.video_head(self.cls_drop(salient)), labels)
        l_ns = F.cross_entropy(self.video_head(self.cls_drop(non_salient)),
                               torch.full_like(labels, C))
        return {"loss": l_cls + gamma * l_ns + frame_weight * l_f, "l_f": l_f, "l_cls": l_cls,
                "l_ns": l_ns}

    def cost_per_frame(self, unit: str) -> dict[str, float]:
        """Head cost in G``unit``: per glanced frame (embedding, FSM head, attention), per
        focused frame (the recognizer), per video (the transformer on ``num_frames`` tokens)."""
        g = torch.zeros(1, self.norm_glance.mean.numel())
        f = torch.zeros(1, self.norm_focus.mean.numel())
        d = self.embed.out_features
        was_training = self.training
        self.eval()
        try:
            def glanced() -> None:
                x = self.embed(self.norm_glance(g))
                self.frame_head(x)
                self.attention(x)

            def video() -> None:
                x = torch.zeros(1, self.num_frames, d)
                mask = torch.ones(1, self.num_frames, dtype=torch.bool)
                for layer in self.encoder:
                    x = layer(x, mask)

            costs = {"glanced": count_head_gflops(glanced, unit),
                     "focused": count_head_gflops(lambda: self.frame_logits(f), unit),
                     "video": count_head_gflops(video, unit)}
        finally:
            self.train(was_training)
        return costs


# -- train and evaluate ----------------------------------------------------------------------


@torch.no_grad()
def evaluate(model: NSNet, split: PairSplit, costs: FrameCosts, args: NSNetArgs,
             batch_size: int = 256, name: str = NAME) -> PeerResult:
    """Every video of ``split`` once: centre frames of the segments, index-union selection."""
    return evaluate_peer(name, model, split, costs, args.num_frames, batch_size)


def train(pair: FeaturePair, args: NSNetArgs, train_split: PairSplit | None = None,
          val_split: PairSplit | None = None, log: bool = False) -> tuple[NSNet, dict]:
    """Train the recognizer, build the pseudo labels, train the sampler on ``train``; keep the
    sampler checkpoint of best val mAP (second half of training).

    Deterministic for ``args.seed`` on the CPU: initialization, batches and frame sampling draw
    from the seed, dropout from the global stream seeded inside a fork (the caller's random
    state is left as it was).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        return _fit(pair, args, train_split, val_split, log)


def _batches(num_train: int, batch_size: int, generator: torch.Generator):
    """Video indices, epoch after epoch (a fresh permutation each)."""
    while True:
        order = torch.randperm(num_train, generator=generator)
        for lo in range(0, num_train - batch_size + 1 if num_train >= batch_size else 1,
                        batch_size):
            yield order[lo: lo + batch_size]


def _fit_recognizer(model: NSNet, split: PairSplit, val: PairSplit, args: NSNetArgs,
                    generator: torch.Generator) -> dict:
    """The frame-level classifier, TSN-style: cross-entropy of the mean of its scores on
    ``rec_frames`` random segment frames with the video's label. Kept: the weights of best val
    mAP of that consensus on the ``num_frames`` segment centres, scored every
    ``rec_eval_every`` steps (a linear map on 1280 dimensions overfits a few hundred videos
    well before a small set has converged; early stopping serves both)."""
    optimizer = torch.optim.AdamW(model.recognizer.parameters(), lr=args.rec_lr,
                                  weight_decay=args.rec_weight_decay)
    labels = torch.as_tensor(split.labels)
    steps = train_steps(split.num_videos, args.batch_size, args.rec_epochs, args.min_steps,
                        args.max_steps)
    batches = _batches(split.num_videos, args.batch_size, generator)
    val_frames, val_mask = sample_frames(val.lengths, args.num_frames)
    val_focus = val.focus.gather(torch.arange(val.num_videos)[:, None].expand_as(val_frames),
                                 val_frames)
    val_w = val_mask.to(val_focus.dtype)[..., None]
    best = {"mAP": -1.0, "step": 0, "state": None}
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, args.rec_lr, args.warmup_frac)
        videos = next(batches)
        frames, mask = sample_frames(split.lengths[videos.numpy()], args.rec_frames, generator)
        focus = split.focus.gather(videos[:, None].expand_as(frames), frames)
        w = mask.to(focus.dtype)[..., None]
        consensus = (model.frame_logits(focus) * w).sum(1) / w.sum(1)
        ce = F.cross_entropy(consensus, labels[videos])
        optimizer.zero_grad(set_to_none=True)
        ce.backward()
        optimizer.step()
        if (step + 1) % args.rec_eval_every == 0 or step == steps - 1:
            with torch.no_grad():
                logits = (model.frame_logits(val_focus) * val_w).sum(1) / val_w.sum(1)
                value = mean_average_precision(torch.softmax(logits, 1).numpy(), val.labels)
            if value >= best["mAP"]:
                best = {"mAP": value, "step": step + 1,
                        "state": copy.deepcopy(model.recognizer.state_dict())}
    model.recognizer.load_state_dict(best["state"])
    return {"rec_steps": steps, "rec_best_step": best["step"], "rec_val_mAP": best["mAP"]}


@torch.no_grad()
def pseudo_labels(model: NSNet, split: PairSplit, args: NSNetArgs, chunk: int = 8192
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The guiding saliency ``g`` of every frame of ``split`` (``[sum T]``, in the flat layout)
    and the class prototypes ``[C, Df]`` (standardized focus space)."""
    flat = split.focus.flat
    logits = torch.cat([model.frame_logits(flat[lo: lo + chunk].float())
                        for lo in range(0, len(flat), chunk)])
    offsets = split.focus.offsets.numpy()
    protos = class_prototypes(flat, logits, offsets, split.lengths, split.labels,
                              model.num_classes, args.top_percent, model.norm_focus)
    frame_labels = torch.as_tensor(np.repeat(split.labels, split.lengths), dtype=torch.long)
    distances = prototype_distances(flat, protos, chunk, model.norm_focus)
    tau = args.proto_temperature * distance_scale(distances)
    return guiding_saliency(distances, frame_labels, tau), protos


def _fit(pair: FeaturePair, args: NSNetArgs, train_split: PairSplit | None,
         val_split: PairSplit | None, log: bool) -> tuple[NSNet, dict]:
    train_split = train_split or pair.load("train")
    val_split = val_split or pair.load("val")
    costs = FrameCosts.from_pair(pair)
    model = seeded_init(args.seed, lambda: NSNet(pair.glance_dim, pair.focus_dim,
                                                 len(pair.class_names), args))
    model.norm_glance.fit(train_split.glance)
    model.norm_focus.fit(train_split.focus)
    generator = torch.Generator().manual_seed(args.seed)
    t0, cpu0 = time.perf_counter(), time.process_time()
    model.train()
    rec_info = _fit_recognizer(model, train_split, val_split, args, generator)
    model.recognizer.requires_grad_(False)
    g, _ = pseudo_labels(model, train_split, args)
    rec_info.update(rec_s=time.perf_counter() - t0, g_mean=float(g.mean()),
                    g_std=float(g.std()))
    if log:
        print(json.dumps(rec_info))
    sampler_params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(sampler_params, lr=args.lr, weight_decay=args.weight_decay)
    labels = torch.as_tensor(train_split.labels)
    offsets = train_split.focus.offsets
    steps = train_steps(train_split.num_videos, args.batch_size, args.epochs, args.min_steps,
                        args.max_steps)
    batches = _batches(train_split.num_videos, args.batch_size, generator)
    best = {"mAP": -1.0, "step": -1, "state": None}
    history: list[dict] = []
    for step in range(steps):
        model.train()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, args.lr, args.warmup_frac)
        videos = next(batches)
        frames, mask = sample_frames(train_split.lengths[videos.numpy()], args.num_frames,
                                     generator)
        glance = train_split.glance.gather(videos[:, None].expand_as(frames), frames)
        terms = model.losses(glance, mask, labels[videos], g[offsets[videos][:, None] + frames],
                             args.frame_weight, args.gamma)
        optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
        nn.utils.clip_grad_norm_(sampler_params, args.grad_clip)
        optimizer.step()
        last = step == steps - 1
        if last or (step + 1 >= steps // 2 and (step + 1) % args.eval_every == 0):
            val = evaluate(model, val_split, costs, args)
            history.append({"step": step + 1, **{k: float(v.detach()) for k, v in terms.items()},
                            "val_mAP": val.mAP, "val_focused": val.frames_focused,
                            "val_gflops": val.gflops_per_video,
                            "time_s": time.perf_counter() - t0})
            if log:
                print(json.dumps(history[-1]))
            if val.mAP >= best["mAP"]:  # ties: the later (more trained) checkpoint
                best = {"mAP": val.mAP, "step": step + 1,
                        "state": copy.deepcopy(model.state_dict())}
    model.load_state_dict(best["state"])
    model.recognizer.requires_grad_(True)
    model.eval()
    return model, {"steps": steps, **rec_info, "best_step": best["step"],
                   "best_val_mAP": best["mAP"], "train_s": time.perf_counter() - t0,
                   "train_cpu_s": time.process_time() - cpu0, "history": history}


def save(model: NSNet, args: NSNetArgs, pair: FeaturePair, path: str | Path) -> None:
    """Checkpoint: weights (recognizer and normalization statistics included), arguments."""
    save_peer(NAME, model, args, pair, path)


def load(path: str | Path) -> tuple[NSNet, NSNetArgs]:
    return load_peer(path, NSNet, NSNetArgs)


def run(pair: FeaturePair, args: NSNetArgs | None = None, out: str | Path | None = None,
        log: bool = False) -> dict:
    """Train, select on val, score on test, compare with uniform sampling at the same GFLOPs
    (:func:`agents.peers.harness.run_peer`)."""
    return run_peer(NAME, args or NSNetArgs(), pair, train, evaluate, out, log)


def main(argv: list[str] | None = None) -> None:
    peer_cli(NAME, NSNetArgs, run, __doc__, argv)


if __name__ == "__main__":
    main()
