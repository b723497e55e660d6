"""The TorchRL front-end: specs, masked rollouts, partial resets, seeding, parity with Gymnasium."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("torchrl")

from env_helpers import tiny_recognizer, write_tiny_h5  # noqa: E402
from torchrl.envs import EnvBase  # noqa: E402
from torchrl.envs.utils import check_env_specs  # noqa: E402

import vimo_env  # noqa: E402
from vimo_env.gym_env import VideoLocatorsVectorEnv  # noqa: E402
from vimo_env.torchrl_front import VideoLocatorsTorchRLEnv  # noqa: E402

LENGTHS = [10, 7, 2, 1, 13, 4, 30, 25]  # 1 and 2 frames: locators start at the last frame
G = "locators"


@pytest.fixture(scope="module")
def h5(tmp_path_factory):
    return write_tiny_h5(tmp_path_factory.mktemp("features") / "tiny.h5", LENGTHS)


def kwargs(h5, **kw):
    base = dict(features=h5, recognizer=tiny_recognizer(seed=1), device="cpu", seed=0)
    base.update(kw)
    return base


def masked_random_policy(seed: int):
    """A policy sampling uniformly among each locator's legal actions (its own generator)."""
    gen = torch.Generator().manual_seed(seed)

    def policy(td):
        mask = td.get((G, "action_mask"))
        probs = mask.float().flatten(0, -2)
        action = torch.multinomial(probs, 1, generator=gen).view(mask.shape[:-1])
        td.set((G, "action"), action)
        return td

    return policy


def preferred_legal(mask: torch.Tensor, step_counter: torch.Tensor) -> torch.Tensor:
    """A deterministic policy of the mask and the step counter: locator i prefers action
    ``(k + i) % 4`` at step k, or stops when that is illegal. ``mask`` ``[B, N, 4]``."""
    B, N, _ = mask.shape
    k = torch.round(step_counter * 4).long().view(B, 1)  # t/m with m = 4
    want = (k + torch.arange(N).view(1, N)) % 4
    legal = mask.gather(2, want.unsqueeze(-1)).squeeze(-1)
    return torch.where(legal, want, torch.zeros_like(want))


def test_check_env_specs_on_the_synthetic_tiny_dataset(tiny_dataset):
    env = vimo_env.torchrl_env(features=tiny_dataset, num_envs=3, seed=0, device="cpu")
    assert isinstance(env, EnvBase) and env.batch_size == torch.Size([3])
    check_env_specs(env, break_when_any_done="both")
    N, D = 3, env.core.obs_dim
    assert env.full_observation_spec[G, "observation"].shape == (3, N, D)
    assert env.full_observation_spec[G, "action_mask"].shape == (3, N, 4)
    assert env.full_observation_spec["state"].shape == (3, N * D + N)
    assert env.full_action_spec[G, "action"].shape == (3, N)
    assert env.full_reward_spec[G, "reward"].shape == (3, N, 1)
    for key in ("done", "terminated", "truncated"):
        assert env.full_done_spec[key].shape == (3, 1)
        assert env.full_done_spec[G, key].shape == (3, N, 1)


@pytest.mark.parametrize("options", [
    dict(),
    dict(locator_credit=True),
    dict(compute_rewards=False),
    dict(recognizer=tiny_recognizer(seed=2, temporal="meanpool")),  # unbounded embeddings
    dict(num_locators=2, recognizer=tiny_recognizer(seed=3, locators=2), max_moves=2),
])
def test_check_env_specs_variants(h5, options):
    env = vimo_env.torchrl_env(**kwargs(h5, num_envs=5, **options))
    check_env_specs(env, break_when_any_done="both")
    td = env.rollout(12, masked_random_policy(0), break_when_any_done=False)
    assert env.observation_spec.is_in(td["next"].select(*env.observation_spec.keys(True, True))
                                       [:, -1])
    assert ((G, "locator_credit") in td["next"].keys(True)) == bool(
        options.get("locator_credit"))


def test_import_vimo_env_does_not_import_torchrl():
    code = ("import sys, vimo_env; assert 'torchrl' not in sys.modules; "
            "f = vimo_env.torchrl_env; assert callable(f) and 'torchrl' in sys.modules; "
            "import vimo_env.torchrl_front; assert callable(vimo_env.torchrl_env)")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_masked_random_rollout_ends_episodes_and_masks_mean_what_they_say(h5):
    B = 6
    env = vimo_env.torchrl_env(**kwargs(h5, num_envs=B, strict_masks=True))
    core = env.core
    sample = masked_random_policy(1)
    seen = []

    def policy(td):  # also records the core's own view of each locator when it acts
        last = core.positions >= (core.lengths - 1).unsqueeze(1)
        seen.append((td[G, "action_mask"].clone(), last.clone(), core.alive.clone()))
        return sample(td)

    td = env.rollout(40, policy, break_when_any_done=False)
    assert td.batch_size == (B, 40)
    done = td["next", "done"].squeeze(-1)
    assert done.sum(1).min() >= 2  # every row finished several episodes
    for mask, at_last, alive in seen:
        assert mask[..., 0].all()  # stop is always legal
        moves = mask[..., 1:]
        assert (moves == moves[..., :1]).all()  # all three moves legal together, or none
        assert torch.equal(moves[..., 0], alive & ~at_last)  # stopped / last frame: stop only
    assert any(m[..., 1].any() for m, _, _ in seen) and any((~m[..., 1]).any() for m, _, _ in seen)
    for data in (td, td["next"]):
        stopped = ~data[G, "alive"].squeeze(-1)
        assert not data[G, "action_mask"][..., 1:][stopped].any()
        # the group's done flags are the row's, broadcast (the team ends together)
        for key in ("done", "terminated", "truncated"):
            assert torch.equal(data[G, key].squeeze(-1), data[key].expand_as(stopped))
        # state = all observations + alive flags
        torch.testing.assert_close(data["state"][..., :-3], data[G, "observation"].flatten(-2))
        torch.testing.assert_close(data["state"][..., -3:], (~stopped).float())
    # the team reward is broadcast to every locator
    rew = td["next", G, "reward"]
    assert (rew == rew[..., :1, :]).all()
    # a row ends exactly when all its locators stopped
    assert torch.equal(done, (~td["next", G, "alive"]).squeeze(-1).all(-1))
    assert not td["next", "truncated"].any()
    # after an end, the next root step starts a fresh episode (step counter 0, all alive)
    ended = done[:, :-1]
    fresh = td[:, 1:]
    assert (fresh[G, "observation"][..., -1][ended] == 0).all()
    assert fresh[G, "alive"][ended].all() and not fresh["done"][ended].any()


def test_rollout_without_policy_samples_legal_actions(h5):
    """The action spec carries the current mask: rand_action honours it (strict_masks would
    raise on any illegal action)."""
    env = vimo_env.torchrl_env(**kwargs(h5, num_envs=8, strict_masks=True))
    torch.manual_seed(0)
    td = env.rollout(30, break_when_any_done=False)
    assert td["next", "done"].any()
    legal = td[G, "action_mask"].gather(-1, td[G, "action"].unsqueeze(-1))
    assert legal.all()


def test_strict_masks_and_invalid_actions_raise(h5):
    B = 4
    env = vimo_env.torchrl_env(**kwargs(h5, num_envs=B, sampler="sweep"))  # videos 0..3
    td = env.reset()

    def step(action):
        return env.step(td.clone().set((G, "action"), action))

    with pytest.raises(ValueError, match="0..3"):
        step(torch.full((B, 3), 4))
    with pytest.raises(ValueError, match="0..3"):
        step(torch.full((B, 3), -1))
    with pytest.raises(ValueError, match="NaN"):
        step(torch.full((B, 3), float("nan")))
    with pytest.raises(ValueError, match="whole numbers"):
        step(torch.full((B, 3), 1.5))
    with pytest.raises(ValueError, match="one-hot"):
        step(torch.zeros(B, 3, 4, dtype=torch.long))
    # video 3 has one frame: its locators may only stop; the lenient env ignores a move there
    assert not td[G, "action_mask"][3, :, 1:].any()
    step(torch.ones(B, 3, dtype=torch.long))
    strict = vimo_env.torchrl_env(**kwargs(h5, num_envs=B, sampler="sweep", strict_masks=True))
    td = strict.reset()
    with pytest.raises(ValueError, match=r"strict_masks.*\[3, 0\]"):
        strict.step(td.set((G, "action"), torch.ones(B, 3, dtype=torch.long)))


def test_partial_reset_restarts_only_masked_rows(h5):
    B = 4
    env = vimo_env.torchrl_env(**kwargs(h5, num_envs=B))
    td = env.reset()
    td = env.step(td.set((G, "action"), torch.zeros(B, 3, dtype=torch.long)))["next"]
    assert td["done"].all()  # every locator stopped: every row ended
    before = env.core.videos.clone(), td[G, "observation"].clone()
    reset = torch.tensor([[True], [False], [True], [False]])
    out = env.reset(td.clone().set("_reset", reset))
    rows, others = reset.squeeze(-1), ~reset.squeeze(-1)
    assert not out["done"][rows].any() and out["done"][others].all()
    assert (out[G, "observation"][rows][..., -1] == 0).all()
    torch.testing.assert_close(out[G, "observation"][others], before[1][others])
    assert torch.equal(env.core.videos[others], before[0][others])
    assert env.core.active.all() and torch.equal(env.core.done, others)
    # the rows left ended cannot step; a partial step ("_step") steps only the live rows
    act = torch.ones(B, 3, dtype=torch.long)
    with pytest.raises(RuntimeError, match="reset them first"):
        env.step(out.clone().set((G, "action"), act))
    stepped = env.step(out.clone().set((G, "action"), act).set("_step", rows))["next"]
    assert (stepped[G, "observation"][rows][..., -1] == 0.25).all()  # t/m = 1/4
    assert (stepped[G, "reward"][others] == 0).all()
    torch.testing.assert_close(stepped[G, "observation"][others], before[1][others])


def test_rollout_break_when_all_done(h5):
    env = vimo_env.torchrl_env(**kwargs(h5, num_envs=5))
    td = env.rollout(50, masked_random_policy(2), break_when_all_done=True)
    assert td.shape[1] <= env.core.max_moves  # every episode ends within m steps
    assert td["next", "done"][:, -1].all()


def test_seeding_replays_the_same_episodes(h5):
    def run(seed):
        env = vimo_env.torchrl_env(**kwargs(h5, num_envs=4, seed=None))
        env.set_seed(seed)
        td = env.rollout(15, masked_random_policy(7), break_when_any_done=False)
        return td.exclude(("next", "p_gt"), "p_gt")

    a, b, c = run(5), run(5), run(6)
    assert (a == b).all()
    assert not (a[G, "observation"] == c[G, "observation"]).all()
    # the constructor's seed seeds the sampler too
    x = vimo_env.torchrl_env(**kwargs(h5, num_envs=4, seed=9)).reset()
    y = vimo_env.torchrl_env(**kwargs(h5, num_envs=4, seed=9)).reset()
    assert (x == y).all()


@pytest.mark.parametrize("locator_credit", [False, True])
def test_matches_the_gymnasium_vector_env(h5, locator_credit):
    """Same recognizer, seed and (swept) videos, same deterministic policy of the observation:
    the episode of each video has the same observations, rewards, dones (and credits) in both
    front-ends. Episodes are matched by video: Gymnasium spends one extra step per autoreset,
    so its rows draw their next videos at other times than TorchRL's."""
    B = 5
    rec = tiny_recognizer(seed=4)
    common = kwargs(h5, num_envs=B, recognizer=rec, sampler="sweep", seed=3,
                    locator_credit=locator_credit)
    trl = VideoLocatorsTorchRLEnv(**common)
    gym = VideoLocatorsVectorEnv(**common)

    def collect(running, episodes, b, core, first_obs):
        """Close row b's running episode (if complete) and open one on its new video."""
        if running[b] is not None and running[b][1][-1][2]:
            episodes.setdefault(running[b][0], running[b][1])
        running[b] = (int(core.videos[b]), [first_obs])

    # TorchRL: a row that ends restarts at once (step_and_maybe_reset)
    eps_t: dict[int, list] = {}
    run_t: list = [None] * B
    td = trl.reset()
    for b in range(B):
        collect(run_t, eps_t, b, trl.core, td[G, "observation"][b])
    for _ in range(24):
        act = preferred_legal(td[G, "action_mask"], td[G, "observation"][:, 0, -1])
        out, td = trl.step_and_maybe_reset(td.set((G, "action"), act))
        nxt = out["next"]
        for b in range(B):
            assert (nxt[G, "reward"][b] == nxt[G, "reward"][b, 0, 0]).all()
            credit = nxt[G, "locator_credit"][b, :, 0] if locator_credit else None
            run_t[b][1].append((nxt[G, "observation"][b], float(nxt[G, "reward"][b, 0, 0]),
                                bool(nxt["done"][b, 0]), credit))
            if nxt["done"][b, 0]:
                collect(run_t, eps_t, b, trl.core, td[G, "observation"][b])

    # Gymnasium (autoreset NEXT_STEP): the step after an end only restarts the row
    eps_g: dict[int, list] = {}
    run_g: list = [None] * B
    obs, _ = gym.reset()
    for b in range(B):
        collect(run_g, eps_g, b, gym.core, torch.as_tensor(obs["observation"][b]))
    prev_term = np.zeros(B, dtype=bool)
    for _ in range(30):
        mask = torch.as_tensor(obs["action_mask"]).bool()
        act = preferred_legal(mask, torch.as_tensor(obs["observation"][:, 0, -1]))
        obs, rew, term, trunc, info = gym.step(act.numpy())
        assert not trunc.any()
        for b in range(B):
            o = torch.as_tensor(obs["observation"][b])
            if prev_term[b]:
                collect(run_g, eps_g, b, gym.core, o)
                continue
            credit = torch.as_tensor(info["locator_credit"][b]) if locator_credit else None
            run_g[b][1].append((o, float(rew[b]), bool(term[b]), credit))
        prev_term = term

    common_videos = sorted(set(eps_t) & set(eps_g))
    assert len(common_videos) == len(LENGTHS), (sorted(eps_t), sorted(eps_g))
    for v in common_videos:
        ep_t, ep_g = eps_t[v], eps_g[v]
        assert len(ep_t) == len(ep_g), f"video {v}: episode lengths differ"
        torch.testing.assert_close(ep_t[0], ep_g[0], atol=1e-5, rtol=1e-5)
        for (o_t, r_t, d_t, c_t), (o_g, r_g, d_g, c_g) in zip(ep_t[1:], ep_g[1:], strict=True):
            torch.testing.assert_close(o_t, o_g, atol=1e-5, rtol=1e-5)
            assert r_t == pytest.approx(r_g, abs=1e-5)
            assert d_t == d_g
            if locator_credit:
                torch.testing.assert_close(c_t, c_g.float(), atol=1e-5, rtol=1e-5)
    # the policy made episodes of several lengths
    assert len({len(e) for e in eps_t.values()}) >= 2


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torchrl's own weight updaters
def test_collector_and_reward_sum_transform(h5):
    """TorchRL's own machinery runs on it: the collector (partial resets by root "_reset") and
    a transform on the group's reward."""
    from torchrl.collectors import Collector
    from torchrl.envs import RewardSum, TransformedEnv

    base = vimo_env.torchrl_env(**kwargs(h5, num_envs=4))
    env = TransformedEnv(base, RewardSum(in_keys=[(G, "reward")],
                                         out_keys=[(G, "episode_reward")]))
    collector = Collector(env, masked_random_policy(4), frames_per_batch=40, total_frames=80)
    episodes = 0
    for batch in collector:
        assert batch.shape == (4, 10)
        done = batch["next", "done"].squeeze(-1)
        traj = batch["collector", "traj_ids"]
        # a trajectory id changes exactly after an episode's end (not when a locator stops)
        assert torch.equal(traj[:, 1:] != traj[:, :-1], done[:, :-1])
        for b in range(4):
            for t in done[b].nonzero().flatten().tolist():
                same = traj[b] == traj[b, t]
                first = int(same.nonzero()[0])
                if batch[G, "observation"][b, first, 0, -1] != 0:
                    continue  # the episode began in an earlier batch
                rewards = batch["next", G, "reward"][b, :, 0, 0][same]
                total = batch["next", G, "episode_reward"][b, t, 0, 0]
                assert total == pytest.approx(float(rewards.sum()), abs=1e-5)
                episodes += 1
    collector.shutdown()
    assert episodes >= 4


def test_runs_on_the_core_device(h5):
    env = vimo_env.torchrl_env(**kwargs(h5, num_envs=3))
    assert env.device == env.core.device == torch.device("cpu")
    td = env.rollout(6, masked_random_policy(3), break_when_any_done=False)
    assert td.device == env.device
    assert all(v.device == env.device for v in td.values(True, True))
    assert all(s.device == env.device for s in env.output_spec.values(True, True))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_runs_on_cuda(h5):
    env = vimo_env.torchrl_env(**kwargs(h5, num_envs=3, device="cuda"))
    assert env.device.type == "cuda" and env.core.device.type == "cuda"
    check_env_specs(env)
    td = env.rollout(6, masked_random_policy(3), break_when_any_done=False)
    assert all(v.device.type == "cuda" for v in td.values(True, True))
