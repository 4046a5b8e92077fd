"""The activation-statistics RL prototype: REINFORCE over per-layer bit widths, real perplexity as reward.

* **State**: every layer's input-activation abs-mean from the sensitivity table, z-normalised over
  the layers. It is the same in every episode, so the policy learns one distribution per layer
  conditioned on the model's activation profile.
* **Policy**: a 3-layer MLP (state -> hidden -> hidden -> logits), one categorical head per decided
  group over the bit options (default: one format each for 3, 4 and 8 bits, e.g. w3g128, w4g128, w8).
* **Episode**: sample one format per group and evaluate the allocation for real with the evaluator,
  on a small held-out slice. The reward is

      reward = -alpha * (PPL / PPL_fp - 1) + beta * memory_saving - penalty * max(0, avg_bits / target - 1)

  with ``memory_saving = 1 - stored bits / (16 * weights)``, ``alpha = 0.7`` and ``beta = 2.0`` as in the
  prototype. With a KL evaluator (baseline 0) the first term is ``-alpha * KL``.
* **Update**: REINFORCE after every episode. The advantage is the reward standardised by the mean
  and standard deviation of the previous ``baseline_window`` rewards (the baseline). An entropy bonus
  keeps exploration alive.
* **Result**: the argmax format of every head.

**Budget.** The prototype's reward only encourages saving. It never enforces a bits budget. Here
the penalty term steers training below the problem's budget. If the argmax allocation still
exceeds it, a greedy repair lowers the groups with the least proxy damage per saved bit until it
fits (``DecisionSpace.repair``). The returned allocation always meets the budget.

**Resuming.** With ``state`` set, the policy, the optimizer, the sampling generator and the
learning curve are saved every ``checkpoint_every`` episodes and at the end (``search/state.py``).
A run restarted with the same settings and seed continues from the last save. Because the
evaluator's numbers do not depend on history, it ends exactly where an uninterrupted run ends.
Deterministic for a seed.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from automp.errors import AutompError
from automp.search.problem import Evaluator, Problem, Solution
from automp.search.space import DecisionSpace, bit_options, format_option
from automp.search.state import fingerprint, load_state, save_state


class Reinforce:
    name = "reinforce"

    def __init__(
        self,
        episodes: int = 300,
        formats: list[str] | str | None = None,
        alpha: float = 0.7,
        beta: float = 2.0,
        penalty: float = 10.0,
        lr: float = 0.01,
        hidden: int = 64,
        entropy: float = 0.01,
        baseline_window: int = 20,
        state: Path | str | None = None,
        checkpoint_every: int = 10,
        progress: bool = False,
    ) -> None:
        if episodes < 1 or checkpoint_every < 1 or baseline_window < 2:
            raise AutompError("episodes and checkpoint_every must be at least 1, baseline_window at least 2")
        self.episodes = episodes
        self.formats = format_option(formats)
        self.alpha, self.beta, self.penalty = alpha, beta, penalty
        self.lr, self.hidden, self.entropy, self.baseline_window = lr, hidden, entropy, baseline_window
        self.state = Path(state) if state is not None else None
        self.checkpoint_every = checkpoint_every
        self.progress = progress

    def solve(self, problem: Problem, *, seed: int = 0, evaluator: Evaluator | None = None) -> Solution:
        start = time.perf_counter()
        reference = _reference(evaluator, self.name)
        space = DecisionSpace.build(problem, self.formats or bit_options(problem))
        observation = activation_state(problem)
        run = _Training(len(observation), self.hidden, space, self.lr, seed)
        key = fingerprint(self._settings(problem, space, seed, reference))
        if self.state is not None and (saved := load_state(self.state, key)) is not None:
            run.load(saved)

        metric = getattr(evaluator, "metric", "loss")
        episodes = range(len(run.curve), self.episodes)  # a resumed run starts after the saved episodes
        for episode in tqdm(episodes, desc=self.name, disable=not self.progress, leave=False):
            log_probs = run.log_probs(observation)
            actions = torch.multinomial(log_probs.exp(), 1, generator=run.generator).squeeze(1)
            loss = evaluator(space.allocation(actions.numpy()))
            reward, saving = self._reward(space, actions.numpy(), loss, reference)
            entropy = -(log_probs.exp() * log_probs.masked_fill(~run.valid, 0.0)).sum(dim=1).mean()
            advantage = _advantage(reward, [row["reward"] for row in run.curve[-self.baseline_window :]])
            chosen = log_probs.gather(1, actions.unsqueeze(1)).sum()
            run.optimizer.zero_grad()
            (-advantage * chosen - self.entropy * entropy).backward()
            run.optimizer.step()
            run.curve.append(
                {
                    "episode": episode,
                    "reward": reward,
                    metric: loss,
                    "memory_saving": saving,
                    "avg_bits": space.avg_bits(actions.numpy()),
                    "entropy": entropy.item(),
                }
            )
            done = episode + 1
            if self.state is not None and (done % self.checkpoint_every == 0 or done == self.episodes):
                save_state(self.state, {**run.state_dict(), "fingerprint": key})

        with torch.no_grad():
            greedy = run.log_probs(observation).argmax(dim=1).numpy()
        actions = space.repair(greedy)
        return space.solution(
            actions, self.name, time.perf_counter() - start, evaluations=len(run.curve), curve=run.curve
        )

    def _reward(self, space: DecisionSpace, actions: np.ndarray, loss: float, reference: float) -> tuple[float, float]:
        """The prototype's reward plus the budget penalty; also returns the memory saving."""
        degradation = loss / reference - 1 if reference > 0 else loss
        saving = space.memory_saving(actions)
        excess = max(0.0, space.avg_bits(actions) / space.problem.target_bits - 1)
        return -self.alpha * degradation + self.beta * saving - self.penalty * excess, saving

    def _settings(self, problem: Problem, space: DecisionSpace, seed: int, reference: float) -> dict:
        """Everything a resumed run must share with the run that wrote the state (not ``episodes``)."""
        return {
            "solver": self.name,
            "seed": seed,
            "layers": [layer.name for layer in problem.table.layers],
            "options": space.options,
            "target_bits": problem.target_bits,
            "proxy": problem.proxy,
            "pinned": problem.pinned,
            "tie_fused": problem.tie_fused,
            "reference": reference,
            "hyper": [self.alpha, self.beta, self.penalty, self.lr, self.hidden, self.entropy, self.baseline_window],
        }


def activation_state(problem: Problem) -> torch.Tensor:
    """Every layer's input-activation abs-mean, z-normalised over the layers (zeros if all are equal)."""
    values = torch.tensor([layer.act_absmean for layer in problem.table.layers], dtype=torch.float32)
    spread = values.std() if len(values) > 1 else torch.tensor(0.0)
    return (values - values.mean()) / spread if spread > 0 else torch.zeros_like(values)


def _reference(evaluator: Evaluator | None, solver: str) -> float:
    if evaluator is None:
        raise AutompError(f"the {solver} solver measures real quality: it needs an evaluator (--eval)")
    reference = getattr(evaluator, "baseline", None)
    if reference is None:
        raise AutompError(f"the {solver} solver needs an evaluator with a full-precision baseline")
    return float(reference)


class _Training:
    """Everything a run carries from episode to episode, and what a state file saves of it."""

    def __init__(self, inputs: int, hidden: int, space: DecisionSpace, lr: float, seed: int) -> None:
        self.space = space
        with torch.random.fork_rng(devices=[]):  # the policy's initialisation must not touch the caller's RNG
            torch.manual_seed(seed)
            self.policy = _mlp(inputs, hidden, space.n_groups * space.n_options)
        self.optimizer = torch.optim.Adam(self.policy.parameters(), lr=lr)
        self.generator = torch.Generator().manual_seed(seed)  # samples the episodes' allocations
        self.valid = torch.as_tensor(space.valid)
        self.curve: list[dict] = []

    def log_probs(self, observation: torch.Tensor) -> torch.Tensor:
        """(groups, options) log-probabilities; options a group may not take get probability 0."""
        logits = self.policy(observation).view(self.space.n_groups, self.space.n_options)
        return torch.log_softmax(logits.masked_fill(~self.valid, float("-inf")), dim=1)

    def state_dict(self) -> dict:
        return {
            "policy": self.policy.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "generator": self.generator.get_state(),
            "curve": self.curve,
        }

    def load(self, saved: dict) -> None:
        self.policy.load_state_dict(saved["policy"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.generator.set_state(saved["generator"])
        self.curve = saved["curve"]


def _mlp(inputs: int, hidden: int, outputs: int) -> nn.Module:
    return nn.Sequential(
        nn.Linear(inputs, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, outputs)
    )


def _advantage(reward: float, previous: list[float]) -> float:
    """The reward standardised against the previous rewards (0 until two are known)."""
    if len(previous) < 2:
        return 0.0
    past = np.asarray(previous)
    return float((reward - past.mean()) / (past.std() + 1e-8))
