"""Evaluate your own locator policies with the same harness as benchmarks/run_marl.py.

    python examples/plug_in_policies.py [--dataset FILE.h5] [--recognizer CHECKPOINT.pt]

Three kinds of policy, all scored by ``agents.evaluate.evaluate_policy`` on the test split:

1. a plain callable ``obs -> actions`` (numpy ``{"observation": [B,N,D], "alive": [B,N],
   "action_mask": [B,N,4]}`` in, integer ``[B, N]`` in {0: stop, 1..3: move that many strides}
   out);
2. a Tianshou policy (here the CTDE SAC learner's ``policy``; any Tianshou 2.x ``Policy`` over
   the ``VideoLocators-v0`` Dict observation works);
3. a Stable-Baselines3 model trained on ``gymnasium.make("VideoLocators-v0", ...)``.

Without ``--dataset`` the tiny synthetic preset is generated in a temporary folder; without
``--recognizer`` a fresh (untrained) recognizer is used, so the numbers only show the API.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agents.ctde_sac import SACConfig, build_ctde_sac  # noqa: E402
from agents.evaluate import evaluate_policy  # noqa: E402
from features.source import CachedFrameSource  # noqa: E402
from features.synthetic import generate  # noqa: E402
from vimo_env.core import load_recognizer  # noqa: E402


def move_while_uncertain(obs: dict[str, np.ndarray]) -> np.ndarray:
    """1. A plain callable: every locator moves one stride for its first two steps, then stops.

    ``obs["observation"][..., -1]`` is ``t / m`` (the step), ``[..., -3]`` is ``n_i / (m+1)``.
    """
    frames_seen = obs["observation"][..., -3] * 5  # n_i with m = 4
    return np.where(frames_seen < 2.5, 1, 0).astype(np.int64)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default=None)
    p.add_argument("--recognizer", default=None, help="a Recognizer checkpoint (.pt)")
    args = p.parse_args()
    torch.set_num_threads(1)
    path = Path(args.dataset) if args.dataset else generate(
        "tiny", Path(tempfile.mkdtemp()) / "tiny.h5", progress=False)
    test = CachedFrameSource(path, split="test", device="cpu")
    recognizer = load_recognizer(args.recognizer, test, num_locators=3, seed=0)

    # 1. plain callable
    rows = [evaluate_policy(move_while_uncertain, test, recognizer)]

    # 2. a Tianshou policy (an untrained CTDE actor here; load yours with load_checkpoint)
    algorithm = build_ctde_sac(recognizer.embedding_dim + 3, 3, SACConfig())
    rows.append(evaluate_policy(algorithm.policy, test, recognizer, name="tianshou-ctde"))

    # 3. a Stable-Baselines3 model (a few PPO steps on the joint-control env)
    import gymnasium
    from stable_baselines3 import PPO

    import vimo_env  # noqa: F401 - registers VideoLocators-v0

    env = gymnasium.make("VideoLocators-v0", features=str(path), recognizer=recognizer,
                         split="train", device="cpu", seed=0)
    model = PPO("MultiInputPolicy", env, n_steps=64, batch_size=32, n_epochs=1, seed=0,
                device="cpu").learn(128)
    rows.append(evaluate_policy(model, test, recognizer, name="sb3-ppo"))

    print(f"{'policy':<16} {'frames/video':>12} {'mAP %':>7} {'GFLOPs':>8}")
    for r in rows:
        print(f"{r.name:<16} {r.frames_per_video:>12.1f} {r.mAP:>7.1f} {r.gflops_per_video:>8.1f}")
    print("trajectories of video 0 (policy 1):", rows[0].trajectories[0])


if __name__ == "__main__":
    main()
