"""AdaFocus, temporal (Wang et al., "Adaptive Focus for Efficient Video Recognition", ICCV 2021,
section 3.3 "AdaFocus+"; the temporal use of AdaFocus V2 / Uni-AdaFocus) on a glance/focus
feature pair.

AdaFocus glances at every sampled frame with a light global CNN ``f_G``; a recurrent policy
reads the glance features and decides where the expensive local CNN ``f_L`` looks; a
classifier ``f_C`` reads both. On pooled, precomputed features there is **no patch to
choose**: a frame's focus feature is the focus backbone on the FULL frame, pooled, so the
spatial policy ``pi`` (a categorical choice among patch candidates) has nothing to act on and
is left out. What remains is AdaFocus+'s temporal policy ``pi'`` (Eq. 8): per frame, focus on
it or not. Per video:

* glance: the glance feature ``e_t^G`` of every sampled frame (TSN segments);
* policy ``pi'`` (Fig. 3 / Eq. 8): a linear+ReLU compression of ``e_t^G`` (the paper's 1x1
  convolution) into a GRU over the frames in temporal order, whose state gives
  ``p_t^B = Pr(b_t = 1)``; it reads the glance features only, as in the paper;
* classifier ``f_C`` over ``[e_t^G, b_t e_t^L]`` (Eq. 9, an all-zero focus part when
  ``b_t = 0``): the paper's "average of frame-wise predictions" variant (section 3.1, used in
  section 4.2): per-frame linear+ReLU embeddings of both features, the mean glance embedding
  of the video's frames and the mean focus embedding of its focused frames, an MLP head;
* training, the paper's three stages (section 3.2):

  I.   warm-up: ``f_C`` (and the embeddings) with random focus decisions, cross-entropy;
  II.  the policy, ``f_C`` fixed: ``b_t ~ Bernoulli(p_t^B)``, reward (Eq. 10)
       ``r_t = b_t (p_y(b_t = 1) - p_y(b_t = 0) - lambda)``: the gain in the true class's
       confidence from focusing this frame against not focusing it, the other frames as
       sampled, minus a cost per focused frame; discounted returns, ``gamma = 0.7`` (paper);
  III. fine-tuning of ``f_C`` with the learned policy fixed;

* test (section 3.3): frame ``t`` is focused when ``p_t^B >= rho``, ``rho`` solved on the
  TRAIN split (the paper's choice, "almost the same as a validation set") so that the top
  ``ratio`` (the paper's ``eta``) of the sampled frames' ``p_t^B`` are focused.

Budget knob: ``ratio`` (``eta``), the fraction of glanced frames focused. It acts twice, as the
paper's ``eta`` and ``lambda`` do: ``rho`` is solved for it, and the focusing cost ``lambda``
follows it during stage II by dual ascent (``lambda += cost_lr x (mean p^B - ratio)``, clipped
at 0), so a smaller ratio means a higher cost and a policy that focuses fewer frames. With
``cost_lr = 0`` the cost stays at ``cost`` (the paper's fixed ``lambda``), and with
``calibrate = 0`` the policy's own decision ``p_t^B >= 0.5`` is kept.

Differences from the paper, forced by or natural to pooled, precomputed features:

* no spatial policy (above); the backbones are the two files' (frozen); inputs standardized
  with train-split statistics;
* offline (section 3.4: one prediction per video): the loss is the video prediction's
  cross-entropy and the reward's confidence is that of the video's prediction, not of the
  online prediction ``p_t`` after frame ``t`` (Eq. 5 / 10). With pooled features the online
  gain pays early frames for being early (the focus pool is still empty), and the solved
  threshold then focused the first frames of every video (tiny synthetic set: val mAP 55 at
  8 frames, against 82 for 8 random frames per video);
* ``f_C`` pools (above) instead of a GRU (paper, section 4.1: GRU 1024): no loop over the
  frames, and stage II's counterfactual confidences (every frame with and without focus) are
  two batched evaluations of the head; the policy GRU has 64 units (paper: 1024);
* REINFORCE with a per-frame baseline (the batch's mean return at that frame index), the
  advantages scaled to unit std, and a small entropy bonus, instead of PPO;
* ``lambda`` is in units of true-class probability per focused frame (the paper's
  ``lambda P^2``, 1e-6 per pixel^2 of patch, has no meaning here) and is set from the data: it
  starts at the ``1 - ratio`` quantile of the confidence gains under the stage-I random policy
  (``cost < 0``, the default) and then tracks ``ratio`` (above). The paper fixes ``lambda``
  and varies ``eta`` at test only; with one fixed ``lambda`` the ratio a policy settles at
  depends on how confident the glance already is, which differs from dataset to dataset;
* stage I focuses each frame of a video with a probability drawn per video from
  ``[ratio, 1]`` (the temporal analogue of RandomCrop, between AdaFocus+'s warm-up on every
  frame and the target ratio; every frame alone would leave ``f_C`` never having seen a
  skipped frame before stage II asks it what skipping costs);
* stage III trains on the test-time decisions ``p_t^B >= rho`` (the paper samples from the
  policy), so fine-tuning sees what test sees;
* AdamW with warm-up and cosine decay per stage, gradient clipping; a budget in gradient
  steps that follows the train split (``epochs``), split 50 / 30 / 20 % between the stages
  (paper: 50 / 10 / 10 epochs); model selection on val mAP during stage III.

    python -m agents.peers.adafocus --glance G.h5 --focus F.h5 [--ratio 0.25] [--out DIR]
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

from agents.peers.harness import (
    FrameCosts,
    PeerResult,
    Standardize,
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

NAME = "adafocus"


# -- arguments -------------------------------------------------------------------------------


@dataclass
class AdaFocusArgs:
    ratio: float = 0.25  # eta: fraction of glanced frames focused (the budget knob)
    cost: float = -1.0  # lambda at the start of stage II; < 0: the (1 - ratio) gain quantile
    cost_lr: float = 0.05  # dual-ascent step of lambda toward `ratio`; 0: lambda fixed (paper)
    calibrate: bool = True  # rho solved on train for the top `ratio` (paper); False: rho = 0.5
    gamma: float = 0.7  # discount of the rewards (paper: 0.7)
    entropy: float = 0.01  # entropy bonus of the policy
    num_frames: int = 32  # frames glanced per video (TSN segments)
    embed_dim: int = 128  # per-frame embedding of each feature (f_C)
    hidden: int = 128  # width of f_C's head
    policy_dim: int = 64  # compression of the glance feature before the policy GRU
    policy_hidden: int = 64  # policy GRU (paper: 1024)
    dropout: float = 0.2  # in f_C's head
    lr: float = 2e-3  # stage I (f_C)
    policy_lr: float = 1e-3  # stage II (the policy; Adam as in the paper)
    finetune_lr: float = 5e-4  # stage III (f_C)
    weight_decay: float = 1e-3
    batch_size: int = 64
    epochs: float = 30.0  # gradient steps = epochs x train videos / batch, clipped below
    min_steps: int = 300
    max_steps: int = 1500
    policy_frac: float = 0.3  # share of the steps for stage II
    finetune_frac: float = 0.2  # share of the steps for stage III (stage I: the rest)
    warmup_frac: float = 0.05
    grad_clip: float = 1.0
    eval_every: int = 50  # val mAP every this many steps of stage III (and at its start)
    seed: int = 0


# -- model -----------------------------------------------------------------------------------


class AdaFocus(nn.Module):
    """Temporal policy ``pi'`` + pooled classifier ``f_C`` (see the module docstring)."""

    def __init__(self, glance_dim: int, focus_dim: int, num_classes: int,
                 args: AdaFocusArgs) -> None:
        super().__init__()
        if not 0 < args.ratio < 1:
            raise ValueError(f"AdaFocus ratio must be in (0, 1), got {args.ratio}")
        E, H, P, Hp = args.embed_dim, args.hidden, args.policy_dim, args.policy_hidden
        self.norm_glance, self.norm_focus = Standardize(glance_dim), Standardize(focus_dim)
        # f_C: per-frame embeddings of the pooled features, running means, MLP head
        self.embed_glance = nn.Sequential(nn.Linear(glance_dim, E), nn.ReLU())
        self.embed_focus = nn.Sequential(nn.Linear(focus_dim, E), nn.ReLU())
        self.head = nn.Sequential(nn.Linear(2 * E, H), nn.ReLU(), nn.Dropout(args.dropout))
        self.classifier = nn.Linear(H, num_classes)
        # policy pi': compression of e^G, GRU, Bernoulli logit
        self.policy_in = nn.Sequential(nn.Linear(glance_dim, P), nn.ReLU())
        self.policy_rnn = nn.GRU(P, Hp, batch_first=True)
        self.policy_out = nn.Linear(Hp, 1)
        with torch.no_grad():  # start at the target ratio
            self.policy_out.weight.mul_(0.1)
            self.policy_out.bias.fill_(math.log(args.ratio / (1 - args.ratio)))
        self.register_buffer("rho", torch.tensor(0.5))  # test threshold on p^B
        self.register_buffer("cost", torch.tensor(0.0))  # lambda at the end of stage II

    def classifier_parameters(self) -> list[nn.Parameter]:
        """``f_C`` and the input embeddings (stages I and III)."""
        return [p for name, p in self.named_parameters() if not name.startswith("policy_")]

    def policy_parameters(self) -> list[nn.Parameter]:
        """The policy ``pi'`` (stage II)."""
        return [p for name, p in self.named_parameters() if name.startswith("policy_")]

    def policy_logits(self, glance: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Bernoulli logits of ``p_t^B`` ``[B, n]`` from the glance features ``[B, n, Dg]``.

        The GRU is causal and padding comes last (:func:`sample_frames`), so a valid frame's
        logit never sees padding; the padded frames' logits are meaningless (masked by every
        caller)."""
        del mask  # see above
        h, _ = self.policy_rnn(self.policy_in(self.norm_glance(glance)))
        return self.policy_out(h)[..., 0]

    def embed(self, glance: torch.Tensor, focus: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-frame embeddings ``[B, n, E]`` of the glance and focus features."""
        return (self.embed_glance(self.norm_glance(glance)),
                self.embed_focus(self.norm_focus(focus)))

    def predict(self, glance_pool: torch.Tensor, focus_pool: torch.Tensor) -> torch.Tensor:
        """Class logits from the pooled glance and focus embeddings (``[..., E]`` each)."""
        return self.classifier(self.head(torch.cat([glance_pool, focus_pool], dim=-1)))

    def classify(self, g: torch.Tensor, f: torch.Tensor, b: torch.Tensor, mask: torch.Tensor
                 ) -> torch.Tensor:
        """``f_C`` on ``[g_t, b_t f_t]`` (embedded features ``[B, n, E]``, decisions
        ``[B, n]``): the mean glance embedding of the video's frames and the mean focus
        embedding of its FOCUSED frames (zero if none) -> class logits ``[B, C]``."""
        valid = mask.to(g.dtype)[..., None]
        focused = b[..., None] * valid
        return self.predict((g * valid).sum(1) / valid.sum(1).clamp_min(1.0),
                            (f * focused).sum(1) / focused.sum(1).clamp_min(1.0))

    def forward(self, glance: torch.Tensor, focus: torch.Tensor, mask: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Test time: class logits ``[B, C]`` and focus decisions ``p_t^B >= rho`` ``[B, n]``
        (0 on padding). Every frame's focus feature is embedded for batching; only the
        focused ones reach the prediction."""
        p = torch.sigmoid(self.policy_logits(glance, mask))
        b = ((p >= self.rho) & mask).to(glance.dtype)
        g, f = self.embed(glance, focus)
        return self.classify(g, f, b, mask), b

    def cost_per_frame(self, unit: str) -> dict[str, float]:
        """Head cost in G``unit``: per glanced frame (policy step, glance embedding), per
        focused frame (focus embedding), per video (the classifier on the two means; the
        running sums are additions, not counted)."""
        g = torch.zeros(1, self.norm_glance.mean.numel())
        f = torch.zeros(1, self.norm_focus.mean.numel())
        E = self.embed_glance[0].out_features
        was_training = self.training
        self.eval()
        try:
            def glanced() -> None:
                x = self.policy_in(self.norm_glance(g))
                self.policy_out(self.policy_rnn(x[:, None])[0])
                self.embed_glance(self.norm_glance(g))

            per = {"glanced": count_head_gflops(glanced, unit),
                   "focused": count_head_gflops(lambda: self.embed_focus(self.norm_focus(f)),
                                                unit),
                   "video": count_head_gflops(
                       lambda: self.predict(torch.zeros(1, E), torch.zeros(1, E)), unit)}
        finally:
            self.train(was_training)
        return per


# -- the reward (stage II) -------------------------------------------------------------------


@torch.no_grad()
def confidence_gains(model: AdaFocus, g: torch.Tensor, f: torch.Tensor, b: torch.Tensor,
                     mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``p_y(b_t = 1) - p_y(b_t = 0)`` per frame ``[B, n]`` (0 on padding): the true class's
    confidence in the video's prediction when frame ``t`` is focused minus when it is not,
    every other frame as decided in ``b`` (Eq. 10, offline). ``model`` should be in eval mode
    (``f_C`` is fixed)."""
    valid = mask.to(g.dtype)[..., None]
    glance_pool = ((g * valid).sum(1, keepdim=True) / valid.sum(1, keepdim=True)).expand_as(g)
    focused = b[..., None] * valid
    others_sum = (f * focused).sum(1, keepdim=True) - f * focused  # frames other than t
    others_count = focused.sum(1, keepdim=True) - focused
    with_t = (others_sum + f) / (others_count + 1)
    without_t = others_sum / others_count.clamp_min(1.0)
    index = labels[:, None, None].expand(*mask.shape, 1)
    p1 = torch.softmax(model.predict(glance_pool, with_t), dim=-1).gather(2, index)
    p0 = torch.softmax(model.predict(glance_pool, without_t), dim=-1).gather(2, index)
    return ((p1 - p0) * valid)[..., 0]


def reinforce_terms(gains: torch.Tensor, b: torch.Tensor, mask: torch.Tensor, cost: float,
                    gamma: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rewards, discounted returns and advantages of one batch of decisions (all ``[B, n]``,
    0 on padding).

    ``r_t = b_t (gain_t - cost)`` (Eq. 10: 0 for a skipped frame); ``R_t = sum_{k >= t}
    gamma^(k - t) r_k`` (Eq. 6); ``A_t = R_t - mean of R_t over the batch's videos valid at
    frame t`` (the baseline).
    """
    valid = mask.to(gains.dtype)
    rewards = b * (gains - cost) * valid
    returns = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in range(rewards.shape[1] - 1, -1, -1):
        running = rewards[:, t] + gamma * running
        returns[:, t] = running
    baseline = (returns * valid).sum(0) / valid.sum(0).clamp_min(1.0)
    return rewards, returns, (returns - baseline) * valid


# -- train and evaluate ----------------------------------------------------------------------


@torch.no_grad()
def evaluate(model: AdaFocus, split: PairSplit, costs: FrameCosts, args: AdaFocusArgs,
             batch_size: int = 256, name: str = NAME) -> PeerResult:
    """Every video of ``split`` once: centre frames of the segments, ``p_t^B >= rho``."""
    return evaluate_peer(name, model, split, costs, args.num_frames, batch_size)


@torch.no_grad()
def solve_threshold(model: AdaFocus, split: PairSplit, ratio: float, num_frames: int | None,
                    batch_size: int = 512) -> float:
    """``rho``: the ``1 - ratio`` quantile of ``p_t^B`` over every sampled frame (segment
    centres) of ``split``, so the top ``ratio`` of them are focused (section 3.3)."""
    model.eval()
    frames, mask = sample_frames(split.lengths, num_frames)
    probs = []
    for lo in range(0, split.num_videos, batch_size):
        videos = torch.arange(lo, min(lo + batch_size, split.num_videos))
        glance, _ = gather_batch(split, videos, frames[videos])
        p = torch.sigmoid(model.policy_logits(glance, mask[videos]))
        probs.append(p[mask[videos]].numpy())
    return float(np.quantile(np.concatenate(probs).astype(np.float64), 1 - ratio))


def train(pair: FeaturePair, args: AdaFocusArgs, train_split: PairSplit | None = None,
          val_split: PairSplit | None = None, log: bool = False) -> tuple[AdaFocus, dict]:
    """Stages I-III on ``train``; the checkpoint of best val mAP in stage III is kept.

    Deterministic for ``args.seed`` on the CPU: initialization, batches, frame sampling and
    focus decisions draw from the seed, dropout from the global stream seeded inside a fork
    (the caller's random state is left as it was).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        return _fit(pair, args, train_split, val_split, log)


class _Batches:
    """Random mini-batches of videos (epochs without replacement) and TSN-sampled frames."""

    def __init__(self, split: PairSplit, args: AdaFocusArgs, generator: torch.Generator
                 ) -> None:
        self.split, self.args, self.generator = split, args, generator
        self.labels = torch.as_tensor(split.labels)
        self.order, self.cursor = torch.randperm(split.num_videos, generator=generator), 0

    def next(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        n, size = self.split.num_videos, min(self.args.batch_size, self.split.num_videos)
        if self.cursor + size > n:  # a new epoch
            self.order, self.cursor = torch.randperm(n, generator=self.generator), 0
        videos = self.order[self.cursor: self.cursor + size]
        self.cursor += size
        frames, mask = sample_frames(self.split.lengths[videos.numpy()], self.args.num_frames,
                                     self.generator)
        glance, focus = gather_batch(self.split, videos, frames)
        return glance, focus, mask, self.labels[videos]


def _classifier_step(model: AdaFocus, optimizer: torch.optim.Optimizer, args: AdaFocusArgs,
                     glance: torch.Tensor, focus: torch.Tensor, b: torch.Tensor,
                     mask: torch.Tensor, labels: torch.Tensor) -> float:
    model.train()
    g, f = model.embed(glance, focus)
    loss = F.cross_entropy(model.classify(g, f, b, mask), labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    nn.utils.clip_grad_norm_(model.classifier_parameters(), args.grad_clip)
    optimizer.step()
    return float(loss.detach())


def _fit(pair: FeaturePair, args: AdaFocusArgs, train_split: PairSplit | None,
         val_split: PairSplit | None, log: bool) -> tuple[AdaFocus, dict]:
    train_split = train_split or pair.load("train")
    val_split = val_split or pair.load("val")
    costs = FrameCosts.from_pair(pair)
    model = seeded_init(args.seed, lambda: AdaFocus(pair.glance_dim, pair.focus_dim,
                                                    len(pair.class_names), args))
    model.norm_glance.fit(train_split.glance)
    model.norm_focus.fit(train_split.focus)
    generator = torch.Generator().manual_seed(args.seed)
    batches = _Batches(train_split, args, generator)
    steps = train_steps(train_split.num_videos, args.batch_size, args.epochs, args.min_steps,
                        args.max_steps)
    steps2 = max(1, round(args.policy_frac * steps))
    steps3 = max(1, round(args.finetune_frac * steps))
    steps1 = max(1, steps - steps2 - steps3)
    history: list[dict] = []
    t0, cpu0 = time.perf_counter(), time.process_time()

    def note(entry: dict) -> None:
        history.append({**entry, "time_s": time.perf_counter() - t0})
        if log:
            print(json.dumps(history[-1]))

    # stage I: warm-up of f_C with random focus decisions (Eq. 5, on the video prediction)
    optimizer = torch.optim.AdamW(model.classifier_parameters(), lr=args.lr,
                                  weight_decay=args.weight_decay)
    for step in range(steps1):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps1, args.lr, args.warmup_frac)
        glance, focus, mask, labels = batches.next()
        rate = args.ratio + (1 - args.ratio) * torch.rand(len(mask), 1, generator=generator)
        b = (torch.rand(mask.shape, generator=generator) < rate).float() * mask
        ce = _classifier_step(model, optimizer, args, glance, focus, b, mask, labels)
        if step == steps1 - 1 or (step + 1) % args.eval_every == 0:
            note({"stage": "I", "step": step + 1, "ce": ce})

    # stage II: the policy by REINFORCE, f_C fixed (Eqs. 6, 8, 10)
    optimizer = torch.optim.Adam(model.policy_parameters(), lr=args.policy_lr)
    cost = args.cost
    for step in range(steps2):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps2, args.policy_lr, args.warmup_frac)
        glance, focus, mask, labels = batches.next()
        model.eval()
        with torch.no_grad():
            g, f = model.embed(glance, focus)
        if cost < 0:  # lambda from the gains under the stage-I random policy
            random_b = (torch.rand(mask.shape, generator=generator) < args.ratio).float() * mask
            gains = confidence_gains(model, g, f, random_b, mask, labels)
            cost = max(0.0, float(torch.quantile(gains[mask].double(), 1 - args.ratio)))
        logits = model.policy_logits(glance, mask)
        p = torch.sigmoid(logits)
        b = torch.bernoulli(p.detach(), generator=generator) * mask
        gains = confidence_gains(model, g, f, b, mask, labels)
        rewards, _, advantages = reinforce_terms(gains, b, mask, cost, args.gamma)
        valid = mask.to(p.dtype)
        count = valid.sum()
        advantages = advantages / (advantages[mask].std() + 1e-8)
        log_prob = -F.binary_cross_entropy_with_logits(logits, b, reduction="none")
        entropy = F.binary_cross_entropy_with_logits(logits, p.detach(), reduction="none")
        loss = -((log_prob * advantages + args.entropy * entropy) * valid).sum() / count
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.policy_parameters(), args.grad_clip)
        optimizer.step()
        usage = float((p.detach() * valid).sum() / count)
        cost = max(0.0, cost + args.cost_lr * (usage - args.ratio))
        if step == steps2 - 1 or (step + 1) % args.eval_every == 0:
            note({"stage": "II", "step": steps1 + step + 1, "usage": usage, "cost": cost,
                  "focused": float(b.sum() / count),
                  "reward": float(rewards.sum() / b.sum().clamp_min(1.0)),
                  "gain": float((gains * valid).sum() / count)})
    model.cost.fill_(cost)
    model.rho.fill_(solve_threshold(model, train_split, args.ratio, args.num_frames)
                if args.calibrate else 0.5)

    # stage III: f_C fine-tuned with the policy fixed; val selection
    optimizer = torch.optim.AdamW(model.classifier_parameters(), lr=args.finetune_lr,
                                  weight_decay=args.weight_decay)
    best = {"mAP": -1.0, "step": -1, "state": None}

    def select(step: int, ce: float | None) -> None:
        val = evaluate(model, val_split, costs, args)
        note({"stage": "III", "step": step, "ce": ce, "val_mAP": val.mAP,
              "val_focused": val.frames_focused, "val_gflops": val.gflops_per_video})
        if val.mAP >= best["mAP"]:  # ties: the later (more trained) checkpoint
            best.update(mAP=val.mAP, step=step, state=copy.deepcopy(model.state_dict()))

    select(steps1 + steps2, None)
    for step in range(steps3):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps3, args.finetune_lr, args.warmup_frac)
        glance, focus, mask, labels = batches.next()
        model.eval()
        with torch.no_grad():
            p = torch.sigmoid(model.policy_logits(glance, mask))
        b = ((p >= model.rho) & mask).float()
        ce = _classifier_step(model, optimizer, args, glance, focus, b, mask, labels)
        if step == steps3 - 1 or (step + 1) % args.eval_every == 0:
            select(steps1 + steps2 + step + 1, ce)
    model.load_state_dict(best["state"])
    model.eval()
    return model, {"steps": steps, "stage_steps": [steps1, steps2, steps3],
                   "best_step": best["step"], "best_val_mAP": best["mAP"],
                   "cost": cost, "rho": float(model.rho),
                   "train_s": time.perf_counter() - t0,
                   "train_cpu_s": time.process_time() - cpu0, "history": history}


def save(model: AdaFocus, args: AdaFocusArgs, pair: FeaturePair, path: str | Path) -> None:
    """Checkpoint: weights (normalization statistics, ``rho`` and ``lambda`` included) and the
    arguments."""
    save_peer(NAME, model, args, pair, path)


def load(path: str | Path) -> tuple[AdaFocus, AdaFocusArgs]:
    return load_peer(path, AdaFocus, AdaFocusArgs)


def run(pair: FeaturePair, args: AdaFocusArgs | None = None, out: str | Path | None = None,
        log: bool = False) -> dict:
    """Train, select on val, score on test, compare with uniform sampling at the same GFLOPs
    (:func:`agents.peers.harness.run_peer`)."""
    return run_peer(NAME, args or AdaFocusArgs(), pair, train, evaluate, out, log)


def main(argv: list[str] | None = None) -> None:
    peer_cli(NAME, AdaFocusArgs, run, __doc__, argv)


if __name__ == "__main__":
    main()
