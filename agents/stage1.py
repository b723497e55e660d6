"""Stage I (ViMo section 3.3, Eq. 5): train the recognizer on random per-segment samples.

Each locator views a random 25% of the frames of its segment ``[s_i, s_{i+1})`` (initial frame
included, temporal order); F_T, F_M and the classifier learn with cross-entropy and Adam,
batched over videos with padding and masks. Validation mAP and top-1 every epoch; the best
checkpoint (by validation mAP) is kept. Training resumes after an interruption from
``stage1_last.pt`` and a resumed run equals an uninterrupted one (same seed, CPU).

Learning rate: the paper uses 1e-5 with batch 8 on real, pretrained features; the synthetic
datasets train from scratch in a few minutes with the default 1e-3 (batch 32) instead.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F
from tqdm import tqdm

from agents.selection import evaluate_selection, gather_padded, select_frames
from features.atomic import torch_save_atomic
from features.device import resolve_device
from features.source import CachedFrameSource
from vimo_env.recognizer import Recognizer, RecognizerConfig

LAST = "stage1_last.pt"
BEST = "stage1_best.pt"
# config fields that may differ between an interrupted run and its resumption
_RESUMABLE_CHANGES = {"epochs", "device", "out_dir"}


@dataclass
class Stage1Config:
    """Stage I hyper-parameters.

    ``recognizer`` holds :class:`RecognizerConfig` options other than ``feature_dim`` and
    ``num_classes`` (taken from the data) and ``num_locators`` (from this config), e.g.
    ``{"temporal": "lstm", "integration": "transformer", "hidden_dim": 256}``.
    """

    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-3  # paper: 1e-5 at batch 8 on real features; see the module docstring
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0
    num_locators: int = 3
    policy: str = "random-25"  # training frame selection (the paper's Stage I sampling)
    recognizer: dict = field(default_factory=dict)
    device: str = "auto"
    out_dir: str | None = "runs/stage1"
    eval_batch_size: int = 256
    final_split: str = "test"  # split of the final random-25 / all-frames evaluation

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "num_locators", "eval_batch_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"Stage1Config.{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"Stage1Config.lr must be > 0, got {self.lr}")
        known = {f.name for f in fields(RecognizerConfig)} - {"feature_dim", "num_classes",
                                                               "num_locators"}
        unknown = set(self.recognizer) - known
        if unknown:
            raise ValueError(f"Stage1Config.recognizer: unknown options {sorted(unknown)}; "
                             f"expected some of {sorted(known)}")


def _json_safe(result: dict) -> dict:
    return {k: v for k, v in result.items() if k != "scores"}


def train_stage1(
    features_path: str | os.PathLike,
    config: Stage1Config | None = None,
    resume: bool = False,
    progress: bool = True,
) -> tuple[Recognizer, dict]:
    """Train a recognizer with Stage I on the ``train`` split of a ``vimo-features`` file.

    Returns the best recognizer (by validation mAP) and the history::

        {"epochs": [{"epoch", "loss", "train_top1", "val_mAP", "val_top1", "time_s"}, ...],
         "best_epoch": int, "best_val_mAP": float,
         "final": {"split": str, "random-25": {...}, "all": {...}}}   # metrics, no scores

    With ``out_dir`` set, ``stage1_last.pt`` (model, optimizer, RNG states, epoch, history) is
    written atomically after every epoch and ``stage1_best.pt`` (``Recognizer.save``) whenever
    validation mAP improves. ``resume=True`` continues from ``stage1_last.pt``.
    """
    config = config or Stage1Config()
    device = resolve_device(config.device)
    train = CachedFrameSource(features_path, split="train", device=device)
    val = CachedFrameSource(features_path, split="val", device=device)
    if train.lengths.min() < config.num_locators:
        raise ValueError(f"{features_path}: a train video is shorter than num_locators")

    torch.manual_seed(config.seed)
    rec_config = RecognizerConfig(feature_dim=train.feature_dim, num_classes=train.num_classes,
                                  num_locators=config.num_locators, **config.recognizer)
    model = Recognizer(rec_config).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr,
                                 weight_decay=config.weight_decay)
    rng = np.random.default_rng(config.seed)
    history: dict = {"epochs": [], "best_epoch": -1, "best_val_mAP": -1.0}
    start_epoch = 0

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
            history = ckpt["history"]
            start_epoch = int(ckpt["epoch"]) + 1

    labels = torch.as_tensor(train.labels, device=device)
    V = train.num_videos
    bar = tqdm(range(start_epoch, config.epochs), desc="stage I", unit="epoch",
               disable=not progress, initial=start_epoch, total=config.epochs)
    for epoch in bar:
        t0 = time.perf_counter()
        model.train()
        order = rng.permutation(V)
        total_loss, correct = 0.0, 0
        for lo in range(0, V, config.batch_size):
            batch = order[lo : lo + config.batch_size]
            frame_index, mask = select_frames(train.lengths[batch], config.num_locators,
                                              config.policy, rng)
            frames = gather_padded(train, batch, frame_index)
            logits = model(frames, torch.as_tensor(mask, device=device))
            target = labels[torch.as_tensor(batch, device=device)]
            loss = F.cross_entropy(logits, target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            total_loss += loss.item() * len(batch)
            correct += int((logits.argmax(-1) == target).sum())
        # validation draws from its own generator: it never shifts the training stream
        result = evaluate_selection(model, val, config.policy, config.eval_batch_size,
                                    seed=config.seed)
        record = {"epoch": epoch, "loss": total_loss / V, "train_top1": 100.0 * correct / V,
                  "val_mAP": result["mAP"], "val_top1": result["top1"],
                  "time_s": time.perf_counter() - t0}
        history["epochs"].append(record)
        if record["val_mAP"] > history["best_val_mAP"]:
            history["best_val_mAP"], history["best_epoch"] = record["val_mAP"], epoch
            if out_dir is not None:
                model.save(out_dir / BEST)
            else:
                history["_best_state"] = {k: v.clone() for k, v in model.state_dict().items()}
        if out_dir is not None:
            torch_save_atomic({"config": asdict(config), "epoch": epoch,
                               "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                               "numpy_rng": rng.bit_generator.state,
                               "torch_rng": torch.get_rng_state(), "history": history},
                              out_dir / LAST)
        bar.set_postfix(loss=f"{record['loss']:.3f}", val_mAP=f"{record['val_mAP']:.1f}")

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
