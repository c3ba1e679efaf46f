"""DDPG (Lillicrap et al. 2016) as AMC uses it, behind an ask/tell interface.

``ask()`` rolls out ``K`` episodes of the environment with the actor plus independent
truncated-normal noise (uniform random actions during the warm-up episodes); the caller
measures each episode's reward however it likes and hands them back with ``tell()``. Every
transition of an episode gets the episode's reward minus a moving-average baseline (divided by
the rewards' moving standard deviation with ``normalize``, so the critic's targets keep a unit
scale whatever the reward's); the critic minimises the TD error
``(Q(s, a) − (r + γ·Q'(s', π'(s'))))²``, the actor maximises ``Q(s, π(s))`` and the target
networks follow softly, ``θ' ← τθ + (1 − τ)θ'``. The noise scale decays as
``σ · decay^(episode − warmup)``, never below ``noise_floor`` (at zero noise a converged actor
proposes the same policy again and again, each a wasted evaluation). All randomness comes from
the seed; torch runs on one thread inside the agent, so a seed gives the same search on any
machine and any number of workers.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy.stats import truncnorm
from torch import nn

from onnxzip.search.env import Episode, PruningEnv


@dataclass
class DdpgConfig:
    episodes: int = 300
    warmup: int = 100
    proposals: int = 4  # K episodes per round, measured together
    hidden: int = 300
    # AMC's settings except where marked. On cnn-sparse at 20 % of the params, 300 evaluations:
    # AMC's found a best reward-split accuracy of 0.992 (seed 0; test 0.972, 3-seed test mean
    # 0.971), random search 0.988-0.990 (seeds 0-2; test 0.975-0.978); the marked ones
    # 0.994-0.996 (seeds 0-2; test 0.981-0.986).
    actor_lr: float = 1e-3  # AMC 1e-4
    critic_lr: float = 1e-3
    tau: float = 0.01
    discount: float = 1.0
    batch_size: int = 64
    buffer_episodes: int = 100
    noise: float = 0.5
    noise_decay: float = 0.98  # AMC 0.95
    noise_floor: float = 0.1  # the noise scale never decays below this (AMC 0)
    baseline_decay: float = 0.95
    normalize: bool = True  # divide the advantage by a moving standard deviation of the rewards (AMC no)
    seed: int = 0


def _mlp(inputs: int, hidden: int, last: nn.Module | None) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Linear(inputs, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1)]
    return nn.Sequential(*layers, *([last] if last is not None else []))


class _Threads:
    """One torch thread and the agent's own RNG state while the agent computes."""

    def __init__(self, generator_state: torch.Tensor) -> None:
        self.state = generator_state

    def __enter__(self) -> _Threads:
        self.previous = torch.get_num_threads()
        self.fork = torch.random.fork_rng(devices=[])
        self.fork.__enter__()
        torch.set_rng_state(self.state)
        torch.set_num_threads(1)
        return self

    def __exit__(self, *exc: object) -> None:
        self.state = torch.get_rng_state()
        torch.set_num_threads(self.previous)
        self.fork.__exit__(*exc)


class DdpgAgent:
    """Actor, critic, their targets and the replay buffer, for one environment."""

    def __init__(self, env: PruningEnv, config: DdpgConfig) -> None:
        self.env, self.config = env, config
        self.rng = np.random.default_rng(config.seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            self._torch = _Threads(torch.get_rng_state())
        with self._torch:
            dim = env.state_dim
            self.actor = _mlp(dim, config.hidden, nn.Sigmoid())
            self.critic = _mlp(dim + 1, config.hidden, None)
            self.actor_target, self.critic_target = copy.deepcopy(self.actor), copy.deepcopy(self.critic)
            self.actor_opt = torch.optim.Adam(self.actor.parameters(), lr=config.actor_lr)
            self.critic_opt = torch.optim.Adam(self.critic.parameters(), lr=config.critic_lr)
        self.capacity = config.buffer_episodes * len(env.groups)
        self.buffer: list[tuple[np.ndarray, float, float, np.ndarray, float]] = []
        self.baseline: float | None = None
        self.variance = 0.0
        self.episode = 0

    def noise_scale(self, episode: int) -> float:
        decayed = self.config.noise * self.config.noise_decay ** max(0, episode - self.config.warmup)
        return max(decayed, self.config.noise_floor)

    def _act(self, state: np.ndarray) -> float:
        with self._torch, torch.no_grad():
            return float(self.actor(torch.from_numpy(state)[None])[0, 0])

    def ask(self) -> list[Episode]:
        """The next round's episodes (at most ``proposals``, never past ``episodes``)."""
        count = min(self.config.proposals, self.config.episodes - self.episode)
        proposals = []
        for offset in range(count):
            episode = self.episode + offset
            rng = np.random.default_rng([self.config.seed, episode])
            if episode < self.config.warmup:
                proposals.append(self.env.rollout(lambda state, step: rng.uniform()))
                continue
            sigma = self.noise_scale(episode)

            def policy(state: np.ndarray, step: int, sigma: float = sigma, rng=rng) -> float:  # noqa: ANN001
                mean = self._act(state)
                low, high = (0.0 - mean) / sigma, (1.0 - mean) / sigma
                return float(truncnorm.rvs(low, high, loc=mean, scale=sigma, random_state=rng))

            proposals.append(self.env.rollout(policy))
        return proposals

    def tell(self, episodes: list[Episode], rewards: list[float]) -> None:
        """Learn from the round's episodes, in the order they were asked."""
        decay = self.config.baseline_decay
        for episode, reward in zip(episodes, rewards):
            if self.baseline is None:
                self.baseline = reward
            else:  # exponentially weighted mean and variance of the rewards
                diff = reward - self.baseline
                self.baseline += (1 - decay) * diff
                self.variance = decay * (self.variance + (1 - decay) * diff * diff)
            advantage = reward - self.baseline
            if self.config.normalize and self.variance > 0:
                advantage /= math.sqrt(self.variance)
            following = self.env.next_states(episode)
            last = len(episode.states) - 1
            for step, (state, action) in enumerate(zip(episode.states, episode.actions)):
                self.buffer.append((state, action, advantage, following[step], float(step == last)))
            del self.buffer[: max(0, len(self.buffer) - self.capacity)]
            self.episode += 1
            if self.episode > self.config.warmup:
                for _ in range(len(episode.states)):
                    self._update()

    def _update(self) -> None:
        config = self.config
        picks = self.rng.integers(0, len(self.buffer), size=min(config.batch_size, len(self.buffer)))
        rows = [self.buffer[i] for i in picks]
        with self._torch:
            state = torch.from_numpy(np.stack([r[0] for r in rows]))
            action = torch.tensor([[r[1]] for r in rows], dtype=torch.float32)
            reward = torch.tensor([[r[2]] for r in rows], dtype=torch.float32)
            following = torch.from_numpy(np.stack([r[3] for r in rows]))
            done = torch.tensor([[r[4]] for r in rows], dtype=torch.float32)
            with torch.no_grad():
                future = self.critic_target(torch.cat([following, self.actor_target(following)], dim=1))
                target = reward + config.discount * (1 - done) * future
            critic_loss = nn.functional.mse_loss(self.critic(torch.cat([state, action], dim=1)), target)
            self.critic_opt.zero_grad()
            critic_loss.backward()
            self.critic_opt.step()
            actor_loss = -self.critic(torch.cat([state, self.actor(state)], dim=1)).mean()
            self.actor_opt.zero_grad()
            actor_loss.backward()
            self.actor_opt.step()
            with torch.no_grad():
                for net, target_net in ((self.actor, self.actor_target), (self.critic, self.critic_target)):
                    for p, q in zip(net.parameters(), target_net.parameters()):
                        q.mul_(1 - config.tau).add_(config.tau * p)

    @property
    def done(self) -> bool:
        return self.episode >= self.config.episodes
