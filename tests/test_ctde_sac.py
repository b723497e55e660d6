"""CTDE discrete SAC: learning, twin critics, masking of stopped locators, checkpoints."""

from __future__ import annotations

import copy
import math
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch
from tianshou.data import Batch, ReplayBuffer, VectorReplayBuffer

from agents.ctde_nets import CentralCritic, LocatorActors
from agents.ctde_sac import (
    SACConfig,
    build_ctde_sac,
    clone_actor,
    load_checkpoint,
    policy_act,
    save_checkpoint,
    update_once,
)
from agents.sac_training import make_collector, seed_everything, train_sac
from agents.toy import UnitCoverageVectorEnv, random_policy_coverage

N, T = 3, 8
OBS_DIM = 2 * T + 3


def small_config(**overrides) -> SACConfig:
    values = dict(
        actor_hidden=(64, 64), critic_hidden=(128, 128), actor_lr=1e-3, critic_lr=1e-3,
        alpha_lr=1e-3, batch_size=128, tau=0.02, num_envs=16, collect_env_steps=64,
        updates_per_env_step=0.25, epoch_env_steps=2048, warmup_env_steps=512,
        target_entropy_ratio=0.3, init_alpha=0.05, seed=0,
    )
    values.update(overrides)
    return SACConfig(**values)


def toy_factory(num_envs: int, seed: int) -> UnitCoverageVectorEnv:
    return UnitCoverageVectorEnv(num_envs, num_locators=N, track_length=T, seed=seed)


def final_coverage(algorithm, episodes: int = 400, seed: int = 123) -> float:
    env = UnitCoverageVectorEnv(64, num_locators=N, track_length=T, seed=seed)
    obs, _ = env.reset(seed=seed)
    finals: list[float] = []
    while len(finals) < episodes:
        obs, _, terminated, _, info = env.step(policy_act(algorithm, obs))
        finals.extend(info["coverage"][terminated].tolist())
    return float(np.mean(finals[:episodes]))


def test_learns_coordination_well_above_random(tmp_path):
    """Distinct locators must end on distinct hidden units: random ~0.27, optimum 1.0."""
    random_score = random_policy_coverage(toy_factory(64, 0), episodes=1000)
    result = train_sac(toy_factory, small_config(), env_steps=4096, out_dir=tmp_path)
    score = final_coverage(result.algorithm)
    assert result.env_steps == 4096
    # one Tianshou update step per collection of 64; 0.25 * 64 minibatch updates in each
    assert result.update_steps == 4096 // 64 and result.gradient_steps == 64 * 16
    # measured 0.71-0.74 over seeds 0..3; random 0.27
    assert score > random_score + 0.2, (score, random_score)
    assert (tmp_path / "checkpoint.pt").is_file() and len(list(tmp_path.glob("buffer-*.h5"))) == 1
    assert any((tmp_path / "tb").iterdir())


def test_score_fn_keeps_the_best_learner(tmp_path):
    """With a held-out score, train_sac scores the learner before training and after every
    epoch, saves the best in best.pt and returns it; checkpoint.pt stays the last state."""
    scores: list[float] = []

    def score_fn(algorithm) -> float:
        scores.append(final_coverage(algorithm, episodes=200))
        return scores[-1]

    result = train_sac(toy_factory, small_config(epoch_env_steps=256), env_steps=1024,
                       out_dir=tmp_path, score_fn=score_fn)
    assert len(scores) == 1 + 1024 // 256  # before training + each epoch
    assert result.best_score == max(scores)
    assert result.best_checkpoint == tmp_path / "best.pt" and result.best_checkpoint.is_file()
    assert final_coverage(result.algorithm, episodes=200) == pytest.approx(max(scores))
    last = build_ctde_sac(OBS_DIM, N, small_config())
    extra = load_checkpoint(last, tmp_path / "checkpoint.pt")
    assert extra["best_score"] == max(scores)
    assert final_coverage(last, episodes=200) == pytest.approx(scores[-1])
    with pytest.raises(ValueError, match="score_fn needs out_dir"):
        train_sac(toy_factory, small_config(), env_steps=256, score_fn=score_fn)


def test_twin_critics_differ_after_init():
    seed_everything(0)
    algo = build_ctde_sac(OBS_DIM, N, small_config())
    p1 = torch.cat([p.flatten() for p in algo.critic.parameters()])
    p2 = torch.cat([p.flatten() for p in algo.critic2.parameters()])
    assert p1.shape == p2.shape and not torch.allclose(p1, p2)
    obs = torch.rand(5, N, OBS_DIM)
    alive = torch.ones(5, N, dtype=torch.bool)
    act = torch.randint(0, 4, (5, N))
    assert not torch.allclose(algo.critic(obs, alive, act), algo.critic2(obs, alive, act))
    # the target networks start as copies of their own critic
    assert torch.allclose(algo.critic_old(obs, alive, act), algo.critic(obs, alive, act))
    assert torch.allclose(algo.critic2_old(obs, alive, act), algo.critic2(obs, alive, act))


def _buffer_with_dead_locator(dead: int, size: int = 64) -> ReplayBuffer:
    """Transitions where locator ``dead`` is stopped in every obs and obs_next."""
    rng = np.random.default_rng(0)
    buf = ReplayBuffer(size)
    for _ in range(size):
        alive = np.ones(N, dtype=np.int8)
        alive[dead] = 0
        alive_next = alive.copy()
        alive_next[rng.integers(N)] = 0
        buf.add(Batch(
            obs=Batch(observation=rng.random((N, OBS_DIM), dtype=np.float32), alive=alive),
            act=rng.integers(0, 4, N), rew=float(rng.normal()), terminated=False,
            truncated=False, done=False,
            obs_next=Batch(observation=rng.random((N, OBS_DIM), dtype=np.float32),
                           alive=alive_next),
            info={},
        ))
    return buf


def test_stopped_locators_get_no_gradient():
    seed_everything(0)
    algo = build_ctde_sac(OBS_DIM, N, small_config())
    dead = 1
    before = [p.detach().clone() for p in algo.policy.actor.parameters()]
    grads: list[torch.Tensor] = []
    hooks = [p.register_hook(lambda g: grads.append(g.clone()))
             for p in algo.policy.actor.parameters()]
    update_once(algo, _buffer_with_dead_locator(dead), batch_size=32)
    for h in hooks:
        h.remove()
    assert grads, "the actor received no gradient at all"
    # ensemble weights are [N, in, out] / biases [N, out]: slice `dead` got exactly zero
    for g in grads:
        assert torch.count_nonzero(g[dead]) == 0
        assert torch.count_nonzero(g[(dead + 1) % N]) > 0
    after = list(algo.policy.actor.parameters())
    for b, a in zip(before, after, strict=True):
        assert torch.equal(b[dead], a[dead])
        assert not torch.equal(b[0], a[0])


def test_critic_warmup_holds_the_actor_and_alpha_for_its_steps():
    """The first ``critic_warmup_gradient_steps`` updates fit only the critics."""
    seed_everything(0)
    algo = build_ctde_sac(OBS_DIM, N, small_config())
    algo.critic_only_steps_left = 2
    buffer = _buffer_with_dead_locator(dead=1)

    def snapshot():
        return ([p.detach().clone() for p in algo.policy.actor.parameters()],
                [p.detach().clone() for p in algo.critic.parameters()], algo.alpha.value)

    for step in range(3):
        actor0, critic0, alpha0 = snapshot()
        update_once(algo, buffer, batch_size=32)
        actor1, critic1, alpha1 = snapshot()
        assert any(not torch.equal(a, b) for a, b in zip(critic0, critic1, strict=True))
        actor_moved = any(not torch.equal(a, b) for a, b in zip(actor0, actor1, strict=True))
        assert actor_moved == (step == 2) and (alpha0 != alpha1) == (step == 2), step
    assert algo.critic_only_steps_left == 0


def test_train_sac_counts_the_critic_warmup_and_hides_every_bar(tmp_path, capsys):
    """train_sac arms the warm-up from its config; with show_progress=False nothing is printed,
    even with >= 20 gradient steps per collection (Tianshou's own bar ignores the switch)."""
    config = small_config(critic_warmup_gradient_steps=40, collect_env_steps=64,
                          updates_per_env_step=0.5, epoch_env_steps=128, warmup_env_steps=64)
    seed_everything(0)
    algo = build_ctde_sac(OBS_DIM, N, config)
    actor0 = [p.detach().clone() for p in algo.policy.actor.parameters()]
    result = train_sac(toy_factory, config, env_steps=128, algorithm=algo)
    assert result.gradient_steps == 64  # 2 collections x 32: 40 critic-only, then 24 full
    assert algo.critic_only_steps_left == 0
    assert any(not torch.equal(a, b)
               for a, b in zip(actor0, algo.policy.actor.parameters(), strict=True))
    seed_everything(0)
    held = build_ctde_sac(OBS_DIM, N, config)
    actor0 = [p.detach().clone() for p in held.policy.actor.parameters()]
    train_sac(toy_factory, replace(config, critic_warmup_gradient_steps=64), env_steps=128,
              algorithm=held)
    assert all(torch.equal(a, b)
               for a, b in zip(actor0, held.policy.actor.parameters(), strict=True))
    captured = capsys.readouterr()
    assert "gradient update" not in captured.err + captured.out


def test_stopped_locator_has_no_future_value():
    seed_everything(0)
    algo = build_ctde_sac(OBS_DIM, N, small_config())
    obs = Batch(observation=np.random.rand(4, N, OBS_DIM).astype(np.float32),
                alive=np.array([[1, 0, 1]] * 4, dtype=np.int8))
    batch = Batch(obs=obs)
    with torch.no_grad():
        value = algo._target_q_compute_value(batch, algo.policy(batch))
    assert value.shape == (4, N)
    assert torch.all(value[:, 1] == 0) and torch.all(value[:, [0, 2]] != 0)


def test_critic_ignores_own_and_stopped_actions():
    torch.manual_seed(0)
    critic = CentralCritic(OBS_DIM, N, (32,))
    obs = torch.rand(2, N, OBS_DIM)
    alive = torch.tensor([[1, 1, 0], [1, 1, 0]], dtype=torch.bool)
    a = torch.tensor([[0, 1, 2], [3, 3, 3]])
    q = critic(obs, alive, a)
    b = a.clone()
    b[:, 2] = 0  # locator 2 is stopped: its action must not matter
    assert torch.allclose(q, critic(obs, alive, b))
    c = a.clone()
    c[:, 0] = (c[:, 0] + 1) % 4  # changes others' inputs but not locator 0's own row
    qc = critic(obs, alive, c)
    assert torch.allclose(qc[:, 0], q[:, 0]) and not torch.allclose(qc[:, 1], q[:, 1])


@pytest.mark.parametrize("shared", [False, True])
def test_actor_sees_only_its_own_observation(shared):
    torch.manual_seed(0)
    actor = LocatorActors(OBS_DIM, N, (32, 32), shared=shared)
    obs = torch.rand(3, N, OBS_DIM)
    out = actor(obs)
    changed = obs.clone()
    changed[:, 2] += 1.0
    out2 = actor(changed)
    assert out.shape == (3, N, 4)
    assert torch.allclose(out[:, :2], out2[:, :2]) and not torch.allclose(out[:, 2], out2[:, 2])
    # distinct locators act differently on the same observation (own weights or id input)
    same = obs[:, :1].expand(-1, N, -1)
    logits = actor(same)
    assert not torch.allclose(logits[:, 0], logits[:, 1])
    with pytest.raises(ValueError, match="observation"):
        actor(torch.rand(3, N, OBS_DIM + 1))


def test_policy_act_is_argmax_and_zero_for_stopped():
    seed_everything(0)
    algo = build_ctde_sac(OBS_DIM, N, small_config())
    obs = {"observation": np.random.rand(6, N, OBS_DIM).astype(np.float32),
           "alive": np.array([[1, 1, 0]] * 6)}
    act = policy_act(algo, obs)
    logits = algo.policy.actor(torch.as_tensor(obs["observation"]))
    assert act.shape == (6, N) and act.dtype == np.int64
    assert np.array_equal(act[:, :2], logits.argmax(-1)[:, :2].numpy())
    assert np.all(act[:, 2] == 0)
    obs["observation"][0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        policy_act(algo, obs)


def test_checkpoint_roundtrip_restores_networks_optimizers_and_alpha(tmp_path):
    seed_everything(0)
    config = small_config(num_envs=4, collect_env_steps=16, batch_size=16)
    algo = build_ctde_sac(OBS_DIM, N, config)
    collector = make_collector(algo, toy_factory(4, 0), 1000)
    collector.reset()
    collector.collect(n_step=64, random=True)
    for _ in range(3):
        update_once(algo, collector.buffer, 16)
    path = save_checkpoint(algo, tmp_path / "ckpt.pt")
    seed_everything(1)
    other = build_ctde_sac(OBS_DIM, N, config)
    load_checkpoint(other, path)
    for (name, a), b in zip(algo.state_dict().items(), other.state_dict().values(), strict=True):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b), name
    assert other.alpha.value == pytest.approx(algo.alpha.value)
    assert other.alpha.value != pytest.approx(config.init_alpha)
    assert other.alpha._optim.state_dict()["state"]
    obs = Batch(observation=np.random.rand(2, N, OBS_DIM).astype(np.float32),
                alive=np.ones((2, N), dtype=np.int8))
    o = torch.as_tensor(obs.observation)
    alive = torch.ones(2, N, dtype=torch.bool)
    act = torch.zeros(2, N, dtype=torch.long)
    assert torch.equal(algo.critic_old(o, alive, act), other.critic_old(o, alive, act))
    # same state -> the same next update (the buffer samples with its own generator)
    buffer_copy = copy.deepcopy(collector.buffer)
    seed_everything(5)
    s1 = update_once(algo, collector.buffer, 16)
    seed_everything(5)
    s2 = update_once(other, buffer_copy, 16)
    assert s1.critic1_loss == pytest.approx(s2.critic1_loss)
    assert s1.actor_loss == pytest.approx(s2.actor_loss)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_checkpoint(other, tmp_path / "missing.pt")
    bad = build_ctde_sac(OBS_DIM + 1, N, config)
    with pytest.raises(ValueError, match="ckpt.pt"):
        load_checkpoint(bad, path)


def test_training_is_deterministic_and_resumes(tmp_path):
    config = small_config(num_envs=4, collect_env_steps=16, batch_size=16, epoch_env_steps=64,
                          warmup_env_steps=32)
    a = train_sac(toy_factory, config, env_steps=128, out_dir=tmp_path / "a")
    b = train_sac(toy_factory, config, env_steps=128, out_dir=tmp_path / "b")
    for x, y in zip(a.algorithm.parameters(), b.algorithm.parameters(), strict=True):
        assert torch.equal(x, y)
    # resume: the trainer continues from the checkpoint's counters up to the new total
    for copy_name in ("noop", "again", "lagging_log"):
        shutil.copytree(tmp_path / "a", tmp_path / copy_name)
    # nothing left to train: the result is exactly the checkpoint (a fresh learner is not)
    noop = train_sac(toy_factory, config, env_steps=128, out_dir=tmp_path / "noop", resume=True)
    assert noop.env_steps == 128 and noop.update_steps == a.update_steps
    for x, y in zip(a.algorithm.parameters(), noop.algorithm.parameters(), strict=True):
        assert torch.equal(x, y)
    c = train_sac(toy_factory, config, env_steps=192, out_dir=tmp_path / "a", resume=True)
    assert c.env_steps == 192
    # one more epoch of 64 transitions: 4 collections of 16, each one update step
    assert c.update_steps == a.update_steps + 4 and c.gradient_steps == (a.update_steps + 4) * 4
    assert not all(torch.equal(x, y) for x, y in zip(a.algorithm.parameters(),
                                                     c.algorithm.parameters(), strict=True))
    # the replay buffer was reloaded and extended: warm-up 32 + 128 before, 64 after
    (buffer,) = (tmp_path / "a").glob("buffer-*.h5")
    assert len(VectorReplayBuffer.load_hdf5(str(buffer))) == 32 + 128 + 64
    # resuming is deterministic: the same checkpoint and buffer give the same learner
    again = train_sac(toy_factory, config, env_steps=192, out_dir=tmp_path / "again",
                      resume=True)
    for x, y in zip(c.algorithm.parameters(), again.algorithm.parameters(), strict=True):
        assert torch.equal(x, y)
    # a kill after checkpoint.pt but before Tianshou logs its counters leaves the log behind
    # (here: no log at all); the counters come from the checkpoint, so no epoch trains twice
    shutil.rmtree(tmp_path / "lagging_log" / "tb")
    lagging = train_sac(toy_factory, config, env_steps=192, out_dir=tmp_path / "lagging_log",
                        resume=True)
    assert (lagging.env_steps, lagging.update_steps) == (c.env_steps, c.update_steps)
    for x, y in zip(c.algorithm.parameters(), lagging.algorithm.parameters(), strict=True):
        assert torch.equal(x, y)
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        train_sac(toy_factory, config, env_steps=64, out_dir=tmp_path / "none", resume=True)


def test_config_validation():
    with pytest.raises(ValueError, match="tau"):
        SACConfig(tau=1.5)
    with pytest.raises(ValueError, match="multiple"):
        SACConfig(num_envs=8, collect_env_steps=12)
    with pytest.raises(ValueError, match="critic_warmup_gradient_steps"):
        SACConfig(critic_warmup_gradient_steps=-1)
    assert SACConfig().tau == 0.01 and SACConfig().batch_size == 8
    assert (SACConfig().actor_lr, SACConfig().critic_lr, SACConfig().alpha_lr) == (1e-5, 5e-5, 5e-4)
    assert SACConfig().actor_hidden == (512,) * 4 and SACConfig().critic_hidden == (512,) * 5


def test_difference_credit_mixes_each_locators_credit_into_its_one_step_target():
    rng = np.random.default_rng(1)
    buf = ReplayBuffer(16)
    for k in range(16):
        buf.add(Batch(
            obs=Batch(observation=rng.random((N, OBS_DIM), dtype=np.float32),
                      alive=np.ones(N, dtype=np.int8)),
            act=rng.integers(0, 4, N), rew=float(rng.normal()), terminated=k % 4 == 3,
            truncated=False, done=k % 4 == 3,
            obs_next=Batch(observation=rng.random((N, OBS_DIM), dtype=np.float32),
                           alive=np.array([1, 0, 1], dtype=np.int8)),
            info={"locator_credit": rng.normal(size=N).astype(np.float32)},
        ))
    indices = np.arange(16)
    returns = {}
    for weight in (0.0, 0.5, 1.0):
        seed_everything(0)
        algo = build_ctde_sac(OBS_DIM, N, small_config(difference_credit=weight))
        torch.manual_seed(7)  # the target samples the other locators' next actions
        returns[weight] = algo._preprocess_batch(buf[indices], buf, indices).returns
    credit = torch.as_tensor(buf.info.locator_credit)
    rew = torch.as_tensor(buf.rew, dtype=torch.float32)[:, None]
    for weight in (0.5, 1.0):
        torch.testing.assert_close(returns[weight],
                                   returns[0.0] + weight * (credit - rew))
    # terminal transitions carry only the reward: team for w = 0, the credit for w = 1
    ends = buf.terminated
    torch.testing.assert_close(returns[0.0][ends], rew[ends].expand(-1, N))
    torch.testing.assert_close(returns[1.0][ends], credit[ends])
    with pytest.raises(ValueError, match="n_step=1"):
        SACConfig(difference_credit=0.5, n_step=2)
    with pytest.raises(ValueError, match="difference_credit"):
        SACConfig(difference_credit=1.5)
    for bad in (np.zeros((16, 1), np.float32), np.full((16, N), np.nan, np.float32)):
        broken = copy.deepcopy(buf)
        broken.info.locator_credit = bad
        with pytest.raises(ValueError, match="one finite value per locator"):
            algo._preprocess_batch(broken[indices], broken, indices)
    with pytest.raises(KeyError, match="locator_credit"):  # the toy env has no credit info
        train_sac(toy_factory, small_config(difference_credit=1.0), env_steps=64)


def test_epoch_callback_runs_after_every_epoch(tmp_path):
    """epoch_callback(learner, env_step, writer) after each epoch, once per env-step count,
    with the run's TensorBoard writer (benchmarks.plots logs figures through it)."""
    calls: list[tuple[int, bool]] = []

    def callback(learner, env_step, writer) -> None:
        calls.append((env_step, hasattr(writer, "add_image")))
        assert isinstance(learner.policy.actor, LocatorActors)

    train_sac(toy_factory, small_config(epoch_env_steps=256, warmup_env_steps=64),
              env_steps=512, out_dir=tmp_path, epoch_callback=callback)
    assert calls == [(256, True), (512, True)]
    with pytest.raises(ValueError, match="epoch_callback needs out_dir"):
        train_sac(toy_factory, small_config(), env_steps=64, epoch_callback=callback)


# --- discrete SAC's quantities by hand (Christodoulou 2019, per locator, CTDE critics) --------

HAND_N, HAND_OBS = 2, 2


def _fixed_(tensor: torch.Tensor, seed: int) -> None:
    """Known weights: normal numbers from their own seeded generator, scaled by 0.5."""
    with torch.no_grad():
        tensor.copy_(0.5 * torch.randn(tensor.shape, generator=torch.Generator().manual_seed(seed)))


def _hand_algorithm(init_alpha: float = 0.5):
    """CTDE SAC with single-layer actors and critics whose weights are fixed numbers; the
    target critics get other numbers than the online ones."""
    config = small_config(actor_hidden=(), critic_hidden=(), init_alpha=init_alpha,
                          target_entropy_ratio=0.6)
    algo = build_ctde_sac(HAND_OBS, HAND_N, config)
    actor = algo.policy.actor.net[0]
    _fixed_(actor.weight, 1)
    _fixed_(actor.bias, 2)
    for k, net in enumerate(_critics(algo)):
        _fixed_(net.net[0].weight, 10 + k)
        _fixed_(net.net[0].bias, 20 + k)
    return algo


def _critics(algo):
    """(critic, critic2, target critic, target critic2) as CentralCritic modules (Tianshou
    wraps the targets in an eval-mode wrapper that holds them as ``.module``)."""
    return algo.critic, algo.critic2, algo.critic_old.module, algo.critic2_old.module


def _hand_logits(algo, observation: torch.Tensor) -> torch.Tensor:
    """Actor i: logits = obs_i W_i + b_i (its own observation only)."""
    layer = algo.policy.actor.net[0]
    return torch.stack([observation[:, i] @ layer.weight[i] + layer.bias[i]
                        for i in range(HAND_N)], dim=1)


def _hand_q(critic, observation, alive, actions) -> torch.Tensor:
    """Q_i(s, . | a_-i) = W [s, alive, onehot(i), onehot(a_j) * alive_j for j != i (0 for j = i)]
    + b, the centralized critic's input written out."""
    layer = critic.net[0]
    out = torch.zeros(observation.shape[0], HAND_N, 4)
    for b in range(observation.shape[0]):
        for i in range(HAND_N):
            others = [F_one_hot(actions[b, j]) * float(alive[b, j]) if j != i
                      else torch.zeros(4) for j in range(HAND_N)]
            x = torch.cat([observation[b].reshape(-1), alive[b].float(), F_one_hot(i, HAND_N),
                           *others])
            out[b, i] = layer.weight @ x + layer.bias
    return out


def F_one_hot(index, size: int = 4) -> torch.Tensor:  # noqa: N802 - reads like F.one_hot
    return torch.nn.functional.one_hot(torch.as_tensor(index), size).float()


def _hand_batch():
    observation = torch.tensor([[[0.2, -0.5], [0.9, 0.1]],
                                [[-0.7, 0.4], [0.3, 0.8]],
                                [[0.5, 0.5], [-0.2, -0.9]]])
    alive = torch.tensor([[True, True], [True, False], [False, True]])
    return observation, alive


def test_soft_value_of_the_next_state_by_hand():
    """V_i(s') = sum_a pi_i(a|s') [min_j Q'_j(s', a | a'_-i) - alpha log pi_i(a|s')], with
    a'_-i sampled from the current actors and the *target* critics; 0 for stopped locators."""
    algo = _hand_algorithm()
    observation, alive = _hand_batch()
    logits = _hand_logits(algo, observation)
    obs_batch = Batch(obs=Batch(observation=observation.numpy(), alive=alive.numpy()))
    torch.manual_seed(11)
    got = algo._target_q_compute_value(obs_batch, Batch(logits=logits))
    torch.manual_seed(11)  # the same draw of the other locators' next actions
    sampled = torch.distributions.Categorical(logits=logits).sample()
    alpha = 0.5
    target1, target2 = _critics(algo)[2:]
    q1, q2 = _hand_q(target1, observation, alive, sampled), _hand_q(target2, observation, alive,
                                                                    sampled)
    q = torch.min(q1, q2)
    assert (q1 < q2).any() and (q2 < q1).any()  # both twins matter in the min
    expected = torch.zeros(3, HAND_N)
    for b in range(3):
        for i in range(HAND_N):
            pi = torch.softmax(logits[b, i], 0)
            value = (pi * (q[b, i] - alpha * torch.log(pi))).sum()
            expected[b, i] = value if alive[b, i] else 0.0
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert expected[1, 1] == 0 and expected[2, 0] == 0 and (expected[alive] != 0).all()
    # the online critics would give another value: the target networks are the ones used
    online = torch.min(_hand_q(algo.critic, observation, alive, sampled),
                       _hand_q(algo.critic2, observation, alive, sampled))
    assert not torch.allclose(online, q)


def test_actor_and_alpha_losses_by_hand():
    """Actor loss: mean over alive (sample, locator) of pi^T (alpha log pi - min_j Q_j(s, . |
    a_-i)), the buffer's other actions in the critics; alpha loss (Tianshou's log-alpha form
    of Eq. 11): -mean(log alpha * (target entropy - H(pi)))."""
    algo = _hand_algorithm(init_alpha=0.5)
    observation, alive = _hand_batch()
    act = torch.tensor([[1, 3], [2, 0], [0, 1]])
    returns = torch.tensor([[0.3, -0.1], [0.5, 0.0], [0.0, 0.2]])
    logits = _hand_logits(algo, observation).detach()  # the actors before their step
    log_alpha = math.log(0.5)
    batch = Batch(obs=Batch(observation=observation.numpy(), alive=alive.numpy().astype(np.int8)),
                  act=act.numpy(), returns=returns)
    stats = algo._update_with_batch(batch)
    # the actor loss is computed after the critics' step: use the critics as they are now
    q1 = _hand_q(algo.critic, observation, alive, act).detach()
    q2 = _hand_q(algo.critic2, observation, alive, act).detach()
    q = torch.min(q1, q2)
    assert (q1[alive] < q2[alive]).any() and (q2[alive] < q1[alive]).any()
    losses, entropies = [], []
    for b in range(3):
        for i in range(HAND_N):
            if not alive[b, i]:
                continue
            pi = torch.softmax(logits[b, i], 0)
            logpi = torch.log(pi)
            losses.append((pi * (0.5 * logpi - q[b, i])).sum())
            entropies.append(-(pi * logpi).sum())
    assert len(losses) == 4  # stopped locators are left out
    assert stats.actor_loss == pytest.approx(float(torch.stack(losses).mean()), abs=1e-5)
    target_entropy = 0.6 * math.log(4)
    entropy = torch.stack(entropies)
    expected_alpha_loss = float(-(log_alpha * (target_entropy - entropy)).mean())
    assert stats.alpha_loss == pytest.approx(expected_alpha_loss, abs=1e-6)
    # Adam's first step moves log alpha by lr against the gradient's sign: alpha rises when
    # the policy's entropy is below the target and falls when above
    step = 1e-3 * np.sign(float((target_entropy - entropy).mean()))
    assert math.log(stats.alpha) == pytest.approx(log_alpha + step, abs=1e-6)


def test_clone_actor_fits_alive_locators_and_ignores_stopped_ones():
    """Behaviour cloning reproduces a rule of the observation (here: the action is the step
    index stored in the last entry, as in the env) on alive locators; stopped locators carry
    a contradicting label that must not be learned."""
    seed_everything(0)
    algo = build_ctde_sac(OBS_DIM, N, small_config())
    gen = torch.Generator().manual_seed(0)
    M = 2048
    observation = torch.randn(M, N, OBS_DIM, generator=gen)
    step = torch.randint(0, 4, (M, 1), generator=gen).expand(M, N)
    observation[..., -1] = step / 4.0
    alive = torch.rand(M, N, generator=gen) < 0.7
    schedule = torch.tensor([3, 2, 1, 0])
    actions = torch.where(alive, schedule[step], torch.ones_like(step))  # dead rows: noise
    before = clone_actor(algo, observation, alive, actions, gradient_steps=0)
    after = clone_actor(algo, observation, alive, actions, gradient_steps=1000, seed=0)
    assert before < 0.6 and after > 0.98
    # label smoothing leaves the policy stochastic: SAC's entropy term has room to explore
    with torch.no_grad():
        probs = torch.softmax(algo.policy.actor(observation), -1)[alive]
    assert 0.8 < float(probs.max(-1).values.mean()) < 0.995
    with pytest.raises(ValueError, match="actions must be in"):
        clone_actor(algo, observation, alive, actions + 4, gradient_steps=1)
    with pytest.raises(ValueError, match="observation"):
        clone_actor(algo, observation[:, :2], alive, actions, gradient_steps=1)
    with pytest.raises(ValueError, match="no transition"):
        clone_actor(algo, observation, torch.zeros_like(alive), actions, gradient_steps=1)


class _Killed(Exception):
    """Stands for a kill -9 right after a checkpoint was written."""


@pytest.mark.parametrize("augmented", [False, True], ids=["plain", "noise+jitter"])
def test_a_run_killed_after_an_epoch_resumes_to_the_same_weights(tiny_dataset, tmp_path,
                                                                  monkeypatch, augmented):
    """On the CPU, SAC on the real env killed after its second epoch's checkpoint and resumed
    ends bit for bit where an uninterrupted run of the same seed ends: the env's in-flight
    episodes, its sampler, the noise and jitter streams and the collector's last observations
    are in the checkpoint, and the trainer continues them instead of restarting episodes."""
    import agents.sac_training as sac_training
    from agents.augment import FeatureNoiseSource
    from features.source import CachedFrameSource
    from vimo_env.gym_env import VideoLocatorsVectorEnv
    from vimo_env.recognizer import Recognizer, RecognizerConfig

    train = CachedFrameSource(tiny_dataset, split="train", device="cpu")
    torch.manual_seed(0)
    recognizer = Recognizer(RecognizerConfig(feature_dim=train.feature_dim,
                                             num_classes=train.num_classes, num_locators=2,
                                             hidden_dim=16, transformer_layers=1,
                                             transformer_heads=2, transformer_dim=16,
                                             transformer_ff_dim=32)).eval()

    def factory(num_envs: int, seed: int) -> VideoLocatorsVectorEnv:
        source = FeatureNoiseSource(train, 0.5, seed) if augmented else train
        env = VideoLocatorsVectorEnv(num_envs, features=source, recognizer=recognizer,
                                     num_locators=2, max_moves=3, stride=2, frame_cost=0.01,
                                     device="cpu", seed=seed)
        if augmented:
            env.core.set_start_jitter(2, seed)
        return env

    config = small_config(num_envs=4, collect_env_steps=16, batch_size=16, epoch_env_steps=48,
                          warmup_env_steps=32, actor_hidden=(32,), critic_hidden=(32,))
    whole = train_sac(factory, config, env_steps=144, out_dir=tmp_path / "whole")
    real_save = sac_training.save_checkpoint

    def save_then_die(algorithm, path, **extra):
        out = real_save(algorithm, path, **extra)
        if path.name == "checkpoint.pt" and extra.get("env_step") == 96:
            raise _Killed
        return out

    monkeypatch.setattr(sac_training, "save_checkpoint", save_then_die)
    with pytest.raises(_Killed):
        train_sac(factory, config, env_steps=144, out_dir=tmp_path / "killed")
    monkeypatch.setattr(sac_training, "save_checkpoint", real_save)
    saved = torch.load(tmp_path / "killed" / "checkpoint.pt", weights_only=False)["extra"]
    assert saved["env_step"] == 96 and saved["episodes"] is not None
    resumed = train_sac(factory, config, env_steps=144, out_dir=tmp_path / "killed",
                        resume=True)
    assert (resumed.env_steps, resumed.update_steps) == (whole.env_steps, whole.update_steps)
    for (name, x), y in zip(whole.algorithm.named_parameters(),
                            resumed.algorithm.parameters(), strict=True):
        assert torch.equal(x, y), name


def test_resume_takes_its_epoch_from_the_env_step_when_the_checkpoint_has_none(tmp_path):
    """A final checkpoint written before epochs were stored says epoch -1: the resume counts
    the epochs done from its env step instead of training the whole budget again; a budget
    whose epochs do not divide the saved env step is refused."""
    config = small_config(num_envs=4, collect_env_steps=16, batch_size=16, epoch_env_steps=64,
                          warmup_env_steps=32)
    done = train_sac(toy_factory, config, env_steps=128, out_dir=tmp_path / "a")
    path = tmp_path / "a" / "checkpoint.pt"
    state = torch.load(path, weights_only=False)
    state["extra"]["epoch"] = -1
    torch.save(state, path)
    again = train_sac(toy_factory, config, env_steps=128, out_dir=tmp_path / "a", resume=True)
    assert (again.env_steps, again.update_steps) == (128, done.update_steps)
    with pytest.raises(ValueError, match="whole number of this budget's epochs"):
        train_sac(toy_factory, replace(config, epoch_env_steps=48), env_steps=144,
                  out_dir=tmp_path / "a", resume=True)


def test_saved_episodes_refuse_another_env(tiny_dataset):
    """Episode state goes back only into an env with the same split, settings and device; a
    noisy source refuses a state read without noise."""
    from agents.augment import FeatureNoiseSource
    from features.source import CachedFrameSource
    from vimo_env.gym_env import VideoLocatorsVectorEnv

    train = CachedFrameSource(tiny_dataset, split="train", device="cpu")

    def env(**kw):
        made = VideoLocatorsVectorEnv(3, **{"features": train, "device": "cpu", "seed": 0, **kw})
        made.reset(seed=0)
        return made

    saved = env().episode_state()
    env().load_episode_state(saved)  # the same env takes it
    with pytest.raises(ValueError, match="its stride is 3, this env's 2"):
        env(stride=2).load_episode_state(saved)
    val = CachedFrameSource(tiny_dataset, split="val", device="cpu")
    with pytest.raises(ValueError, match="its videos is"):
        env(features=val, split="val").load_episode_state(saved)
    with pytest.raises(ValueError, match="without feature noise"):
        env(features=FeatureNoiseSource(train, 0.1)).load_episode_state(saved)
    with pytest.raises(ValueError, match="for 3 envs, this env has 2"):
        VideoLocatorsVectorEnv(2, features=train, device="cpu").load_episode_state(saved)
