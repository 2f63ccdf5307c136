"""AMC's DDPG agent, built from stable-baselines3's DDPG and its extension points.

He et al. (AMC, ECCV 2018) train DDPG with: actor and critic of 300-300 units, γ = 1,
τ = 0.01, batch 64, actor learning rate 1e-4 and critic 1e-3, 100 warm-up episodes of
uniformly random actions, then truncated-normal exploration noise around the actor's
action with σ = 0.5 (on a [0, 1] action scale) decaying ×0.95 per episode, and the
episode's final reward credited to every step, less a moving-average baseline of the
rewards sampled for updates.

Here that is SB3's `DDPG` with:
- `TruncatedNormalNoise`, an `ActionNoise` that samples around the actor's action, with
  σ kept above a floor (0.1): with AMC's decay alone σ is below 0.004 a hundred episodes
  after the warm-up, and an actor that has settled at the edge of its range repeats one
  policy for dozens of episodes;
- `EpisodeRewardBuffer`, a `ReplayBuffer` that holds an episode until it ends, stores
  every step with the final reward and the action that took effect (after the
  environment's rounding and action bound), and subtracts the moving baseline from the
  rewards of each sampled batch. It keeps the last 100 episodes only: a buffer that kept
  the whole search, random warm-up included, let the critic go on fitting stale episodes,
  and on the default model the policy collapsed to well below its own warm-up;
- `EpisodeTracker`, a callback that decays the noise, records each episode and keeps
  the best policy seen.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from stable_baselines3 import DDPG
from stable_baselines3.common.buffers import ReplayBuffer
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.logger import Logger
from stable_baselines3.common.noise import ActionNoise
from stable_baselines3.common.policies import ContinuousCritic
from stable_baselines3.common.type_aliases import ReplayBufferSamples
from stable_baselines3.td3.policies import TD3Policy

from autoprune.errors import AutopruneError


@dataclass
class AMCConfig:
    """DDPG settings, AMC's values by default. The episode counts have no default here: a
    search takes them from its settings (`SearchSettings.episodes`, AMC's 400 and 100)."""

    episodes: int  # episodes in all, warm-up included
    warmup_episodes: int  # episodes of uniformly random actions before learning
    hidden: tuple[int, int] = (300, 300)  # actor and critic hidden layers
    gamma: float = 1.0  # discount
    tau: float = 0.01  # soft target update
    batch_size: int = 64  # transitions per update
    actor_lr: float = 1e-4
    critic_lr: float = 1e-3
    noise_sigma: float = 0.5  # initial exploration noise, in keep-ratio action units ([0, 1])
    noise_decay: float = 0.95  # per episode after warm-up
    noise_floor: float = 0.1  # σ never decays below this (AMC's schedule has no floor: 0)
    moving_alpha: float = 0.5  # weight of the past in the reward baseline
    buffer_episodes: int = 100  # the replay buffer holds the most recent episodes only
    actor_penalty: float = 0.0  # weight of ½·mean(pre-tanh output²) in the actor's loss (0: DDPG's loss)
    leaders: int = 1  # the best distinct policies the search keeps (for a closer look after it)
    device: str = "cpu"  # where the actor and critic run


class TruncatedNormalNoise(ActionNoise):
    """Normal noise around an action, truncated to the action bounds [-1, 1].

    `sigma` is given on AMC's [0, 1] action scale and doubled for SB3's [-1, 1] scale.
    """

    def __init__(self, sigma: float, decay: float, seed: int = 0, floor: float = 0.0):
        super().__init__()
        self.initial_sigma = sigma
        self.sigma = sigma
        self.decay = decay
        self.floor = floor
        self.rng = np.random.default_rng(seed)

    def sample_around(self, action: np.ndarray) -> np.ndarray:
        """One draw from N(action, (2σ)²) restricted to [-1, 1] (by rejection)."""
        scale = 2.0 * self.sigma
        out = np.array(action, dtype=np.float64, copy=True)
        flat = out.reshape(-1)
        for i, mu in enumerate(flat):
            if scale <= 0:
                continue
            for _ in range(1000):
                candidate = self.rng.normal(mu, scale)
                if -1.0 <= candidate <= 1.0:
                    flat[i] = candidate
                    break
            else:
                flat[i] = float(np.clip(mu, -1.0, 1.0))
        return out

    def __call__(self) -> np.ndarray:
        return np.zeros(1)  # SB3's additive path is unused: AMCDDPG samples around the action

    def step(self) -> None:
        """Decay σ after an episode, down to the floor."""
        self.sigma = max(self.sigma * self.decay, self.floor)

    def reset(self) -> None:
        """SB3 calls this at every episode end; σ follows its own schedule, so nothing resets."""


class EpisodeRewardBuffer(ReplayBuffer):
    """Holds an episode's transitions until it ends, then stores every step with the
    episode's final reward (AMC credits the whole episode with it).

    As in AMC, a moving-average baseline is subtracted when transitions are sampled for
    an update, not when they are stored: the baseline follows the mean reward of the
    sampled batches, so every stored episode is judged against the same, slowly moving
    reference. (Subtracting a baseline of the last few episodes at storage time would
    freeze each episode's reward relative to its own era, and a search stuck in a bad
    region would see its bad episodes rated as average.)
    """

    def __init__(self, *args, moving_alpha: float = 0.5, **kwargs):
        super().__init__(*args, **kwargs)
        self.moving_alpha = moving_alpha
        self.baseline: float | None = None
        self._pending: list[tuple] = []

    def add(self, obs, next_obs, action, reward, done, infos: list[dict[str, Any]]) -> None:
        if infos and "effective_action" in infos[0]:
            # learn from what happened: the environment may round or clip the agent's action
            action = np.full_like(action, infos[0]["effective_action"])
        self._pending.append((obs, next_obs, action, done, infos))
        if not bool(np.asarray(done).reshape(-1)[0]):
            return
        final = np.asarray(reward, dtype=np.float32).reshape(-1)
        for o, n, a, d, i in self._pending:
            super().add(o, n, a, final, d, i)
        self._pending = []

    def sample(self, batch_size: int, env=None) -> ReplayBufferSamples:
        samples = super().sample(batch_size, env)
        mean = float(samples.rewards.mean())
        if self.baseline is None:
            self.baseline = mean
        else:
            self.baseline = self.moving_alpha * self.baseline + (1 - self.moving_alpha) * mean
        return samples._replace(rewards=samples.rewards - self.baseline)


class ActorLossCritic(ContinuousCritic):
    """A critic whose `q1_forward` (used only for the actor's loss) does not record its
    own weights for autograd.

    SB3's update zeroes the critic's gradients before every critic step, so the gradients
    the actor's loss leaves on the critic's weights are never used. Not computing them
    leaves every update's result unchanged and takes about 5 % off an update's time.
    """

    def q1_forward(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        params = [p for p in self.q_networks[0].parameters() if p.requires_grad]
        for p in params:
            p.requires_grad_(False)
        try:
            return super().q1_forward(obs, actions)
        finally:
            for p in params:
                p.requires_grad_(True)


class _PenaltyGradient(torch.autograd.Function):
    """Identity going forward; going back it adds the gradient of `weight`/2 · the batch
    mean of x², as if that term were part of whatever loss is being differentiated."""

    @staticmethod
    def forward(ctx, x, weight):
        ctx.save_for_backward(x)
        ctx.weight = weight
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad + ctx.weight * x / x.shape[0], None


class PreActivationPenalty(nn.Module):
    """Sits between the actor's last linear layer and its tanh. It changes no output; the
    actor's loss gains `weight`/2 · mean(pre-activation²), which keeps the actor off the
    flat ends of its tanh, where the critic's gradient no longer reaches it. (At 50 %
    latency the actor drove every group to −1 and stayed there: BENCHMARKS.md.) Only
    the actor's update differentiates through it: the critic's targets use the target
    actor without gradients."""

    def __init__(self, weight: float):
        super().__init__()
        self.weight = float(weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight <= 0 or not torch.is_grad_enabled() or not x.requires_grad:
            return x
        return _PenaltyGradient.apply(x, self.weight)


class AMCPolicy(TD3Policy):
    """SB3's TD3/DDPG actor-critic policy with an `ActorLossCritic`, and with a
    `PreActivationPenalty` before the actor's tanh when `actor_penalty` > 0."""

    def __init__(self, *args, actor_penalty: float = 0.0, **kwargs):
        self.actor_penalty = actor_penalty
        super().__init__(*args, **kwargs)

    def make_actor(self, features_extractor=None):
        actor = super().make_actor(features_extractor)
        if self.actor_penalty > 0:
            layers = list(actor.mu)
            if not isinstance(layers[-1], nn.Tanh):
                raise AutopruneError("the actor does not end in a tanh; cannot place the pre-activation penalty")
            actor.mu = nn.Sequential(*layers[:-1], PreActivationPenalty(self.actor_penalty), layers[-1])
        return actor

    def make_critic(self, features_extractor=None) -> ActorLossCritic:
        critic_kwargs = self._update_features_extractor(self.critic_kwargs, features_extractor)
        return ActorLossCritic(**critic_kwargs).to(self.device)


class AMCDDPG(DDPG):
    """SB3's DDPG with separate actor/critic learning rates and AMC's truncated noise."""

    def __init__(self, *args, actor_lr: float = 1e-4, critic_lr: float = 1e-3, **kwargs):
        self.actor_lr, self.critic_lr = actor_lr, critic_lr
        super().__init__(*args, **kwargs)

    def _update_learning_rate(self, optimizers) -> None:
        if not isinstance(optimizers, list):
            optimizers = [optimizers]
        self.logger.record("train/learning_rate", self.critic_lr)
        for optimizer in optimizers:
            lr = self.actor_lr if optimizer is self.actor.optimizer else self.critic_lr
            for group in optimizer.param_groups:
                group["lr"] = lr

    def _sample_action(self, learning_starts, action_noise=None, n_envs=1):
        action, buffer_action = super()._sample_action(learning_starts, None, n_envs)
        if isinstance(action_noise, TruncatedNormalNoise) and self.num_timesteps >= learning_starts:
            buffer_action = action_noise.sample_around(buffer_action).astype(np.float32)
            action = self.policy.unscale_action(buffer_action)
        return action, buffer_action


class EpisodeTracker(BaseCallback):
    """Decays the noise after warm-up, records every episode and the best policy seen.

    `on_episode(record)` is called with a JSON-safe dict per finished episode, and
    `on_best(record)` whenever the best reward improves. Both run at the end of the
    rollout (one episode, with `train_freq=(1, "episode")`): SB3 stores a step's
    transition after the step callback, so only then is the episode in the replay buffer
    and a state saved from `on_episode` complete. The episode's gradient steps follow the
    rollout; a search resumed from such a state owes them (`pending_updates`) and takes
    them before its first action.
    """

    def __init__(self, noise: TruncatedNormalNoise, warmup_episodes: int,
                 on_episode: Callable[[dict], None] | None = None, on_best: Callable[[dict], None] | None = None,
                 leaders: int = 1):
        super().__init__()
        self.noise = noise
        self.warmup_episodes = warmup_episodes
        self.on_episode, self.on_best = on_episode, on_best
        self.episode = 0
        self.best: dict | None = None
        self.keep_leaders = max(1, leaders)
        self.leaders: list[dict] = []  # the `leaders` best records with distinct policies, best first
        self.rollout_steps = 0  # environment steps since the last rollout ended
        self.pending_updates = 0  # gradient steps a resumed search owes its last episode
        self._finished: list[dict] = []
        self._trace: list[tuple] = []  # (observation, sampled action, effective action) of this rollout's steps

    def _on_training_start(self) -> None:
        if self.pending_updates:
            self.model.train(gradient_steps=self.pending_updates, batch_size=self.model.batch_size)
            self.pending_updates = 0

    def _on_rollout_start(self) -> None:
        self.rollout_steps = 0
        self._trace = []

    def _on_step(self) -> bool:
        self.rollout_steps += 1
        info = self.locals["infos"][0]
        # SB3 replaces _last_obs only after this callback: it is the state the action was taken in
        self._trace.append((np.asarray(self.model._last_obs[0], dtype=np.float32).copy(),
                            float(np.asarray(self.locals["buffer_actions"]).reshape(-1)[0]),
                            float(info.get("effective_action", np.nan))))
        self._finished += [info for done, info in zip(self.locals["dones"], self.locals["infos"]) if done]
        return True

    def _rank(self, record: dict) -> None:
        """Place `record` among the leaders: a new list each time (a saved state shares the old
        one), a policy already there kept with its first record (the cache scores it the same)."""
        if any(leader["policy"] == record["policy"] for leader in self.leaders):
            return
        ranked = sorted([*self.leaders, record], key=lambda r: (-r["reward"], r["episode"]))
        self.leaders = ranked[:self.keep_leaders]

    def diagnostics(self) -> dict:
        """What the agent did in the rollout just finished, for the history: the actor's own
        (noise-free) action, the action sampled around it and the one that took effect after
        the environment's bounds, each averaged over the episode's steps; the spread of the
        actor's actions over the steps (near 0: it gives every group the same ratio); and
        the critic's estimate of the first state under the actor's action."""
        if not self._trace:
            return {}
        observations = torch.as_tensor(np.stack([t[0] for t in self._trace]), device=self.model.device)
        with torch.no_grad():
            actor = self.model.actor(observations)
            q_first = self.model.critic.q1_forward(observations[:1], actor[:1])
        actor = actor.cpu().numpy().reshape(-1)
        return {"actor_action": round(float(actor.mean()), 4), "actor_spread": round(float(actor.std()), 4),
                "sampled_action": round(float(np.mean([t[1] for t in self._trace])), 4),
                "effective_action": round(float(np.mean([t[2] for t in self._trace])), 4),
                "critic_q_first": round(float(q_first.reshape(-1)[0]), 4)}

    def _on_rollout_end(self) -> None:
        finished, self._finished = self._finished, []
        for info in finished:
            self.episode += 1
            record = {"episode": self.episode, "reward": info["reward"], "accuracy": info["accuracy"],
                      "cost_ratio": info["cost_ratio"], "flops": info["flops"], "params": info["params"],
                      "latency_ms": info["latency_ms"],
                      "noise_sigma": 0.0 if self.episode <= self.warmup_episodes else self.noise.sigma,
                      "warmup": self.episode <= self.warmup_episodes, "policy": info["policy"],
                      **self.diagnostics()}
            if self.episode > self.warmup_episodes:
                self.noise.step()
            if self.best is None or record["reward"] > self.best["reward"]:
                self.best = record
                if self.on_best is not None:
                    self.on_best(record)
            self._rank(record)
            if self.on_episode is not None:
                self.on_episode(record)


def make_agent(env, config: AMCConfig, seed: int = 0) -> tuple[AMCDDPG, TruncatedNormalNoise]:
    """AMC's DDPG on a ChannelPruningEnv (one step per prunable group)."""
    steps = len(env.unwrapped.groups)
    noise = TruncatedNormalNoise(config.noise_sigma, config.noise_decay, seed=seed, floor=config.noise_floor)
    agent = AMCDDPG(
        AMCPolicy, env, learning_rate=config.critic_lr, actor_lr=config.actor_lr, critic_lr=config.critic_lr,
        # the same size whatever the number of episodes, so that a resumed search may run more of them
        buffer_size=config.buffer_episodes * steps, learning_starts=config.warmup_episodes * steps,
        batch_size=config.batch_size, tau=config.tau, gamma=config.gamma, train_freq=(1, "episode"),
        gradient_steps=-1, action_noise=noise, replay_buffer_class=EpisodeRewardBuffer,
        replay_buffer_kwargs={"moving_alpha": config.moving_alpha},
        # fused Adam: one kernel per step instead of a loop over tensors, ~20 % off an update on CPU
        policy_kwargs={"net_arch": {"pi": list(config.hidden), "qf": list(config.hidden)},
                       "optimizer_kwargs": {"fused": True}, "actor_penalty": config.actor_penalty},
        seed=seed, device=config.device, verbose=0)
    # a logger of our own writes nowhere: SB3's default makes an empty directory in /tmp per learn()
    agent.set_logger(Logger(folder=None, output_formats=[]))
    return agent, noise


BUFFER_FIELDS = ("observations", "next_observations", "actions", "rewards", "dones", "timeouts")


def _copied(value):
    """`value` with every tensor in its dicts, lists and tuples cloned, the rest shared."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {key: _copied(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_copied(item) for item in value)
    return value


def agent_state(agent: AMCDDPG, tracker: EpisodeTracker) -> dict:
    """Everything a search needs to continue exactly where it stopped, at a rollout's end.

    One dictionary of tensors, arrays and numbers for a single `torch.save`: networks,
    optimisers, the filled part of the replay buffer and its baseline, the noise, the
    step counters, the tracker and every random generator the search draws from (SB3
    samples batches with NumPy's global generator and warm-up actions with the action
    space's). About half the cost of SB3's zip archive plus a pickled buffer.

    The result is a snapshot: tensors and arrays are copies, and the records it shares
    (the best episode, random-generator states) are never changed in place, so later
    updates cannot leak into it while it is written in the background.
    """
    buffer = agent.replay_buffer
    filled = buffer.buffer_size if buffer.full else buffer.pos
    return {
        "policy": _copied(agent.policy.state_dict()),
        "actor_optimizer": _copied(agent.actor.optimizer.state_dict()),
        "critic_optimizer": _copied(agent.critic.optimizer.state_dict()),
        "counters": {"num_timesteps": agent.num_timesteps, "n_updates": agent._n_updates,
                     "episode_num": agent._episode_num},
        "buffer": {name: getattr(buffer, name)[:filled].copy() for name in BUFFER_FIELDS}
        | {"pos": buffer.pos, "full": buffer.full, "baseline": buffer.baseline},
        "noise": {"sigma": tracker.noise.sigma, "rng": tracker.noise.rng.bit_generator.state},
        "tracker": {"episode": tracker.episode, "best": tracker.best, "leaders": tracker.leaders,
                    # SB3 trains on the episode right after this rollout, once past the warm-up
                    "pending_updates": tracker.rollout_steps if agent.num_timesteps > agent.learning_starts else 0},
        "rng": {"numpy": np.random.get_state(), "python": random.getstate(), "torch": torch.get_rng_state(),
                "action_space": agent.action_space.np_random.bit_generator.state},
    }


def restore_agent_state(agent: AMCDDPG, tracker: EpisodeTracker, state: dict) -> None:
    """Put a freshly made agent and tracker back into the state `agent_state` captured."""
    agent.policy.load_state_dict(state["policy"])
    agent.actor.optimizer.load_state_dict(state["actor_optimizer"])
    agent.critic.optimizer.load_state_dict(state["critic_optimizer"])
    counters = state["counters"]
    agent.num_timesteps, agent._n_updates = counters["num_timesteps"], counters["n_updates"]
    agent._episode_num = counters["episode_num"]
    buffer, saved = agent.replay_buffer, state["buffer"]
    filled = len(saved["observations"])
    if filled > buffer.buffer_size:
        raise AutopruneError(f"the saved replay buffer holds {filled} transitions, this agent's {buffer.buffer_size}")
    for name in BUFFER_FIELDS:
        getattr(buffer, name)[:filled] = saved[name]
    buffer.pos, buffer.full, buffer.baseline = saved["pos"], saved["full"], saved["baseline"]
    if buffer.full and filled < buffer.buffer_size:  # a smaller buffer (states written before its size was fixed)
        buffer.pos, buffer.full = filled, False
    tracker.noise.sigma = state["noise"]["sigma"]
    tracker.noise.rng.bit_generator.state = state["noise"]["rng"]
    tracker.episode, tracker.best = state["tracker"]["episode"], state["tracker"]["best"]
    # a state written before the leaders were kept knows its best alone
    tracker.leaders = state["tracker"].get("leaders") or ([tracker.best] if tracker.best is not None else [])
    tracker.pending_updates = state["tracker"]["pending_updates"]
    rng = state["rng"]
    np.random.set_state(rng["numpy"])
    random.setstate(rng["python"])
    torch.set_rng_state(rng["torch"])
    agent.action_space.np_random.bit_generator.state = rng["action_space"]


def search_policy(env, config: AMCConfig, seed: int = 0, on_episode=None, on_best=None) -> dict:
    """Run AMC's search for `config.episodes` episodes; returns the best episode's record."""
    agent, noise = make_agent(env, config, seed)
    tracker = EpisodeTracker(noise, config.warmup_episodes, on_episode, on_best, leaders=config.leaders)
    agent.learn(total_timesteps=config.episodes * len(env.unwrapped.groups), callback=tracker)
    return tracker.best
