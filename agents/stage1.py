"""Stage I (ViMo section 3.3, Eq. 5): train the recognizer on random per-segment samples.

Each locator views a random 25% of the frames of its segment ``[s_i, s_{i+1})`` (initial frame
included, temporal order); F_T, F_M and the classifier learn with cross-entropy, batched over
videos with padding and masks.

One recipe for any ``vimo-features`` file, nothing tuned per dataset (docs/experiments.md has
the measurements that chose it):

* **Inputs normalized** by the train split's per-dimension mean and standard deviation, stored
  in the recognizer (:meth:`Recognizer.set_input_normalization`) so the env, the live source
  and every evaluation apply exactly the statistics it was trained with.
* **AdamW** at a peak learning rate of 3e-4 with linear warm-up and cosine decay, gradient
  clipping at 1, and a pre-norm transformer (``RecognizerConfig.norm_first``).
* **A budget in gradient steps** that scales with the train split:
  ``clip(epochs_target x steps per epoch, min_steps, max_steps)``, so 840 videos get as many
  updates as 3,000 (more passes over fewer videos) and 50,000 videos do not take hours.
* **Two candidates, chosen on val**: the configured recognizer (the paper's LSTM + transformer,
  with a pooled linear path trained by its own loss at ``pooled_lr_scale`` x the rate) and the
  light mean-pool recognizer of the paper's ablations (``alternatives``); the one with the
  higher val mAP is handed on. Small train splits over-fit the deep one (docs/experiments.md).
* The LSTM's unit embedding is the mean of its outputs (``RecognizerConfig.lstm_readout``), so
  the recognizer does not dilute when it later sees more frames (all frames, uniform-50) than
  it was trained on. ``rate_mix`` (off by default: the mean readout was enough) trains a share
  of the batches at a random 5-100% sampling rate instead.

Validation mAP ``evaluations`` times during training; the best checkpoint (by validation mAP) is
kept. Training resumes after an interruption from ``stage1_last.pt``, and a resumed run equals an
uninterrupted one (same seed, CPU).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F
from tqdm import tqdm

from agents.selection import evaluate_selection, gather_padded, select_frames
from features.atomic import torch_save_atomic
from features.device import resolve_device
from features.source import CachedFrameSource, FrameSource
from vimo_env.recognizer import Recognizer, RecognizerConfig

LAST = "stage1_last.pt"
BEST = "stage1_best.pt"
SELECTED = "stage1_selected.pt"  # the recognizer Stage I hands on (best of the candidates)
# the light recognizer of the paper's own ablations (F_T and F_M mean pools, with the pooled
# linear path: a linear model of the pooled frames), tried beside the paper's LSTM +
# transformer and kept when it is better on val: on small train splits the deep model
# over-fits (docs/experiments.md)
LIGHT_RECOGNIZER = {"temporal": "meanpool", "integration": "meanpool"}
# config fields that may differ between an interrupted run and its resumption
_RESUMABLE_CHANGES = {"device", "out_dir"}


@dataclass
class Stage1Config:
    """Stage I hyper-parameters (defaults: one recipe for every dataset; see the module doc).

    ``recognizer`` holds :class:`RecognizerConfig` options other than ``feature_dim`` and
    ``num_classes`` (taken from the data) and ``num_locators`` (from this config), e.g.
    ``{"temporal": "lstm", "integration": "transformer", "hidden_dim": 256}``.
    ``steps`` fixes the number of gradient steps; ``None`` derives it from the train split
    (:meth:`budget`).
    """

    steps: int | None = None
    epochs_target: float = 10.0
    min_steps: int = 600
    max_steps: int = 3000
    batch_size: int = 32
    lr: float = 3e-4  # peak; paper: 1e-5 at batch 8 (Adam, no schedule)
    warmup_fraction: float = 0.05
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    normalize_inputs: bool = True
    # weight of a second cross-entropy on the recognizer's pooled linear path alone, so that
    # path learns what a linear probe learns even when the deep path fits the train split
    pooled_loss_weight: float = 1.0
    pooled_lr_scale: float = 10.0  # the linear path's learning rate, relative to ``lr``
    rate_mix: float = 0.0  # share of batches at a random 5-100% sampling rate (0: the paper)
    evaluations: int = 10
    seed: int = 0
    num_locators: int = 3
    policy: str = "random-25"  # training frame selection (the paper's Stage I sampling)
    recognizer: dict = field(default_factory=dict)
    # other recognizer options trained with the same budget; the best on val (mAP of the
    # training selection) is handed on. () trains ``recognizer`` only.
    alternatives: tuple[dict, ...] = (LIGHT_RECOGNIZER,)
    device: str = "auto"
    out_dir: str | None = "runs/stage1"
    eval_batch_size: int = 256
    final_split: str = "test"  # split of the final random-25 / all-frames evaluation

    def __post_init__(self) -> None:
        for name in ("batch_size", "num_locators", "eval_batch_size", "evaluations",
                     "min_steps", "max_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Stage1Config.{name} must be an integer >= 1, got {value!r}")
        if self.steps is not None and (isinstance(self.steps, bool)
                                       or not isinstance(self.steps, int) or self.steps < 1):
            raise ValueError(f"Stage1Config.steps must be None or an integer >= 1, "
                             f"got {self.steps!r}")
        if self.min_steps > self.max_steps:
            raise ValueError("Stage1Config.min_steps must be <= max_steps")
        if not self.lr >= 0 or not self.epochs_target > 0:
            raise ValueError(f"Stage1Config.lr must be >= 0 and epochs_target > 0, got "
                             f"{self.lr}, {self.epochs_target}")
        if not 0 <= self.rate_mix <= 1 or not 0 <= self.warmup_fraction < 1:
            raise ValueError("Stage1Config.rate_mix must be in [0, 1] and warmup_fraction in "
                             "[0, 1)")
        known = {f.name for f in fields(RecognizerConfig)} - {"feature_dim", "num_classes",
                                                               "num_locators"}
        self.alternatives = tuple(dict(a) for a in self.alternatives)
        for name, options in [("recognizer", self.recognizer)] + [
                (f"alternatives[{k}]", a) for k, a in enumerate(self.alternatives)]:
            unknown = set(options) - known
            if unknown:
                raise ValueError(f"Stage1Config.{name}: unknown options {sorted(unknown)}; "
                                 f"expected some of {sorted(known)}")

    def budget(self, num_train_videos: int) -> int:
        """Gradient steps for a train split of this many videos."""
        if self.steps is not None:
            return self.steps
        per_epoch = math.ceil(num_train_videos / self.batch_size)
        return int(min(max(self.epochs_target * per_epoch, self.min_steps), self.max_steps))


def frame_statistics(source: FrameSource) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension mean and (population) standard deviation of every frame of a cached
    source (:meth:`features.source.CachedFrameSource.column_moments`)."""
    moments = getattr(source, "column_moments", None)
    if moments is None:
        raise TypeError("frame_statistics needs a cached source (with column_moments)")
    return moments()


def learning_rate_factor(step: int, total: int, warmup_fraction: float) -> float:
    """Linear warm-up to 1, then cosine decay to 0 over the remaining steps."""
    warmup = max(1, int(warmup_fraction * total))
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def _training_selection(lengths: np.ndarray, config: Stage1Config, rng: np.random.Generator
                        ) -> tuple[np.ndarray, np.ndarray]:
    """The frames of one training batch: the paper's policy, or (``rate_mix`` of the batches)
    a random rate drawn log-uniformly in 5-100%, so every length of sequence is trained on."""
    if config.rate_mix > 0 and rng.random() < config.rate_mix:
        percent = int(round(math.exp(rng.uniform(math.log(5), math.log(100)))))
        return select_frames(lengths, config.num_locators, f"random-{percent}", rng)
    return select_frames(lengths, config.num_locators, config.policy, rng)


def _json_safe(result: dict) -> dict:
    return {k: v for k, v in result.items() if k != "scores"}


def train_stage1(
    features_path: str | os.PathLike,
    config: Stage1Config | None = None,
    resume: bool = False,
    progress: bool = True,
) -> tuple[Recognizer, dict]:
    """Stage I for ``config.recognizer`` and each of ``config.alternatives``; the best by
    validation mAP is returned (and saved as ``stage1_selected.pt`` with ``out_dir``).

    The first candidate trains in ``out_dir`` itself, alternative ``k`` in
    ``out_dir/alternative<k>``; each resumes on its own. The history is the chosen
    candidate's (:func:`train_one_recognizer`) plus ``"candidates"``: ``[{"recognizer",
    "best_val_mAP", "wall_s"}]`` and ``"chosen"``: its index. Ties go to the earlier candidate.
    """
    config = config or Stage1Config()
    out_dir = Path(config.out_dir) if config.out_dir is not None else None
    candidates = [config.recognizer, *config.alternatives]
    best: tuple[Recognizer, dict] | None = None
    summary = []
    for k, options in enumerate(candidates):
        sub = str(out_dir / f"alternative{k}") if out_dir is not None and k else config.out_dir
        one = replace(config, recognizer=dict(options), alternatives=(), out_dir=sub)
        t0 = time.perf_counter()
        model, history = train_one_recognizer(features_path, one, resume=resume,
                                              progress=progress)
        summary.append({"recognizer": dict(options), "best_val_mAP": history["best_val_mAP"],
                        "wall_s": time.perf_counter() - t0})
        if best is None or history["best_val_mAP"] > best[1]["best_val_mAP"]:
            best = (model, {**history, "chosen": k})
    model, history = best
    history["candidates"] = summary
    if out_dir is not None:
        model.save(out_dir / SELECTED)
    return model, history


def train_one_recognizer(
    features_path: str | os.PathLike,
    config: Stage1Config,
    resume: bool = False,
    progress: bool = True,
) -> tuple[Recognizer, dict]:
    """Train one recognizer (``config.recognizer``) with Stage I on the ``train`` split.

    Returns the best recognizer (by validation mAP) and the history::

        {"steps": int, "evaluations": [{"step", "loss", "train_top1", "val_mAP", "val_top1",
                                        "time_s"}, ...],
         "best_step": int, "best_val_mAP": float,
         "final": {"split": str, "random-25": {...}, "all": {...}}}   # metrics, no scores

    ``loss`` and ``train_top1`` are means over the steps since the previous evaluation. With
    ``out_dir`` set, ``stage1_last.pt`` (model, optimizer, RNG states, batch order, history) is
    written atomically at every evaluation and ``stage1_best.pt`` (``Recognizer.save``) whenever
    validation mAP improves. ``resume=True`` continues from ``stage1_last.pt``.
    """
    device = resolve_device(config.device)
    train = CachedFrameSource(features_path, split="train", device=device)
    val = CachedFrameSource(features_path, split="val", device=device)
    if train.lengths.min() < config.num_locators:
        raise ValueError(f"{features_path}: a train video is shorter than num_locators")

    torch.manual_seed(config.seed)
    rec_config = RecognizerConfig(feature_dim=train.feature_dim, num_classes=train.num_classes,
                                  num_locators=config.num_locators, **config.recognizer)
    model = Recognizer(rec_config).to(device)
    model.dataset = {"source": str(features_path), "class_names": list(train.class_names),
                     "backbone": getattr(train.store, "backbone", None)}
    if config.normalize_inputs:
        model.set_input_normalization(*frame_statistics(train))
    groups: dict[tuple[float, float], list] = {}
    for name, param in model.named_parameters():
        # no weight decay on biases and norms; the pooled linear path at its own rate (a
        # linear model converges at a higher rate than the 8-layer transformer tolerates)
        decay = 0.0 if param.ndim < 2 or "norm" in name else config.weight_decay
        scale = config.pooled_lr_scale if name.startswith("pooled.") else 1.0
        groups.setdefault((decay, scale), []).append(param)
    optimizer = torch.optim.AdamW(
        [{"params": params, "weight_decay": decay, "lr_scale": scale}
         for (decay, scale), params in groups.items()],
        lr=config.lr, fused=device.type in ("cpu", "cuda"))
    V = train.num_videos
    total_steps = config.budget(V)
    rng = np.random.default_rng(config.seed)
    history: dict = {"steps": total_steps, "evaluations": [], "best_step": -1,
                     "best_val_mAP": -1.0}
    order, cursor, start_step = rng.permutation(V), 0, 0

    out_dir = Path(config.out_dir) if config.out_dir is not None else None
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
    if resume:
        if out_dir is None:
            raise ValueError("resume=True needs Stage1Config.out_dir")
        last = out_dir / LAST
        if last.exists():
            ckpt = torch.load(last, map_location=device, weights_only=False)
            saved = ckpt["config"]
            changed = {k for k, v in asdict(config).items()
                       if saved.get(k) != v and k not in _RESUMABLE_CHANGES}
            if changed:
                raise ValueError(
                    f"{last}: field 'config': resuming with different settings {sorted(changed)}"
                    f" (only {sorted(_RESUMABLE_CHANGES)} may change)"
                )
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            rng.bit_generator.state = ckpt["numpy_rng"]
            torch.set_rng_state(ckpt["torch_rng"])
            history, order, cursor = ckpt["history"], ckpt["order"], int(ckpt["cursor"])
            start_step = int(ckpt["step"])

    labels = torch.as_tensor(train.labels, device=device)
    every = max(1, math.ceil(total_steps / config.evaluations))
    name = "+".join(f"{config.recognizer.get(k, 'lstm' if k == 'temporal' else 'transformer')}"
                    for k in ("temporal", "integration"))
    bar = tqdm(total=total_steps, initial=start_step, desc=f"stage I ({name})", unit="step",
               disable=not progress, mininterval=1.0)
    sum_loss, correct, seen, t0 = 0.0, 0, 0, time.perf_counter()
    model.train()
    for step in range(start_step, total_steps):
        if cursor >= V:  # a new pass over the train split
            order, cursor = rng.permutation(V), 0
        batch = order[cursor: cursor + config.batch_size]
        cursor += len(batch)
        frame_index, mask = _training_selection(train.lengths[batch], config, rng)
        frames = gather_padded(train, batch, frame_index)
        state = model.fold(frames, torch.as_tensor(mask, device=device))
        logits = model.logits(state)
        target = labels[torch.as_tensor(batch, device=device)]
        loss = F.cross_entropy(logits, target)
        if rec_config.pooled_linear and config.pooled_loss_weight > 0:
            loss = loss + config.pooled_loss_weight * F.cross_entropy(
                model.pooled_logits(state), target)
        for group in optimizer.param_groups:
            group["lr"] = group["lr_scale"] * config.lr * learning_rate_factor(
                step, total_steps, config.warmup_fraction)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        sum_loss += loss.item() * len(batch)
        correct += int((logits.argmax(-1) == target).sum())
        seen += len(batch)
        bar.update(1)
        if (step + 1) % every and step + 1 != total_steps:
            continue
        # validation draws from its own generator: it never shifts the training stream
        result = evaluate_selection(model, val, config.policy, config.eval_batch_size,
                                    seed=config.seed)
        model.train()
        record = {"step": step + 1, "loss": sum_loss / max(seen, 1),
                  "train_top1": 100.0 * correct / max(seen, 1), "val_mAP": result["mAP"],
                  "val_top1": result["top1"], "time_s": time.perf_counter() - t0}
        sum_loss, correct, seen, t0 = 0.0, 0, 0, time.perf_counter()
        history["evaluations"].append(record)
        if record["val_mAP"] > history["best_val_mAP"]:
            history["best_val_mAP"], history["best_step"] = record["val_mAP"], step + 1
            if out_dir is not None:
                model.save(out_dir / BEST)
            else:
                history["_best_state"] = {k: v.clone() for k, v in model.state_dict().items()}
        if out_dir is not None:
            torch_save_atomic({"config": asdict(config), "step": step + 1,
                               "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                               "numpy_rng": rng.bit_generator.state,
                               "torch_rng": torch.get_rng_state(), "order": order,
                               "cursor": cursor, "history": history},
                              out_dir / LAST)
        bar.set_postfix(loss=f"{record['loss']:.3f}", val_mAP=f"{record['val_mAP']:.1f}")
    bar.close()

    # the best recognizer, evaluated with the training sampling and with all frames
    if out_dir is not None and (out_dir / BEST).exists():
        best = Recognizer.load(out_dir / BEST, map_location=device)
    else:
        best = model
        if "_best_state" in history:
            best.load_state_dict(history.pop("_best_state"))
    best.eval()
    split = config.final_split
    final_source = val if split == "val" else CachedFrameSource(features_path, split=split,
                                                                device=device)
    history["final"] = {"split": split}
    for policy in (config.policy, "all"):
        result = evaluate_selection(best, final_source, policy, config.eval_batch_size,
                                    seed=config.seed)
        history["final"][policy] = _json_safe(result)
    return best, history
