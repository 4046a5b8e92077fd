"""The sequential RL prototype: PPO (stable-baselines3) chooses a format for one layer group per step.

**Environment** (:class:`AllocationEnv`, a gymnasium Env). One episode walks through the decided
groups in model order, one step each, and the action is the option index. The observation is

* the group's features from the sensitivity table: input-activation statistics (abs-mean, std,
  max, kurtosis), weight statistics (the same four), log weight count, and the log proxy cost in
  every option. Each feature is z-normalised over the groups,
* the choices so far: the fraction of groups decided and the average bits of the decided groups
  (/16),
* the budget left: the bits per weight still available to the undecided groups, relative to the
  target.

The reward comes at the end of the episode, from one real evaluation of the finished allocation:

    reward = -w_ppl * (PPL / PPL_fp - 1) + w_mem * memory_saving - w_kl * KL - w_attn * attention_shift
             - penalty * max(0, avg_bits / target - 1)

``KL`` is the mean per-token KL to the full-precision model. ``attention_shift`` is the mean absolute
change of every head's attention entropy, relative to the full-precision entropy. It needs
attention probabilities (eager attention with ``output_attentions``). For models that cannot
return them, ``w_attn`` defaults to 0 (see ``AllocationEvaluator.supports_attention``).

**Budget.** As in REINFORCE, the penalty steers training. The final allocation is the policy's
deterministic rollout, repaired greedily if it still exceeds the budget.

**Resuming.** Training runs in chunks of ``checkpoint_every`` PPO updates. Each update uses
``episodes_per_update`` whole episodes. After each chunk, the policy and optimizer state dicts,
the global RNG states (sb3 samples with torch's and shuffles with numpy's), the timestep count
and the learning curve are saved with ``torch.save``. The state file is read back with
``weights_only=True``. sb3's own ``PPO.load`` unpickles its settings, so it is not used: the model
is rebuilt from this solver's settings, then its tensors are loaded. Rollouts end on episode
boundaries, where the environment's state is its deterministic reset state, so a resumed run
continues exactly like an uninterrupted one. Deterministic for a seed.
"""

from __future__ import annotations

import math
import random
import time
from pathlib import Path

import numpy as np
import torch

from automp.errors import AutompError

try:
    import gymnasium as gym
except ImportError as err:  # an optional extra: say how to get it instead of a traceback
    raise AutompError("the ppo solver needs stable-baselines3 and gymnasium: pip install 'automp[rl]'") from err
from automp.search.problem import Evaluator, Problem, Solution
from automp.search.space import FULL_BITS, DecisionSpace, bit_options, format_option
from automp.search.state import fingerprint, load_state, save_state

DEFAULT_ATTENTION_WEIGHT = 0.5


class AllocationEnv(gym.Env):
    """One step per decided group; the episode's reward is computed from one real evaluation."""

    metadata: dict = {"render_modes": []}

    def __init__(self, space: DecisionSpace, evaluator, weights: dict[str, float], penalty: float):
        super().__init__()
        self.space, self.evaluator, self.weights, self.penalty = space, evaluator, weights, penalty
        self.features = group_features(space)
        self.reference = evaluator.fp.ppl
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (self.features.shape[1] + 3,), np.float32)
        self.action_space = gym.spaces.Discrete(space.n_options)
        self.curve: list[dict] = []
        self.actions: list[int] = []
        layers = space.problem.table.layers
        sizes = [sum(layers[i].numel for i in space.grouped.groups[g]) for g in space.decided]
        self._weights_after = [*np.cumsum(sizes[::-1])[::-1].tolist(), 0]  # weights still undecided, by step

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self.actions = []
        return self._observation(), {}

    def step(self, action):
        self.advance(int(action))
        if len(self.actions) < self.space.n_groups:
            return self._observation(), 0.0, False, False, {}
        reward = self._finish()
        return self._observation(), reward, True, False, {}

    def advance(self, action: int) -> np.ndarray:
        """Record ``action`` for the current group (an option it may not take becomes the nearest one)."""
        g = len(self.actions)
        if not self.space.valid[g, action]:
            usable = np.flatnonzero(self.space.valid[g])
            action = int(usable[np.argmin(np.abs(self.space.bits[g, usable] - self.space.bits[g, action]))])
        self.actions.append(action)
        return self._observation()

    def _observation(self) -> np.ndarray:
        space, done = self.space, len(self.actions)
        rows = np.arange(done)
        decided_bits = int(space.bits[rows, self.actions].sum()) if done else 0
        decided_weights = self._weights_after[0] - self._weights_after[done]
        avg_so_far = decided_bits / decided_weights if decided_weights else 0.0
        left = self._weights_after[done]
        available = (space.budget - space.fixed_bits - decided_bits) / left if left else 0.0
        progress = [done / space.n_groups, avg_so_far / FULL_BITS, available / space.problem.target_bits]
        features = self.features[min(done, space.n_groups - 1)]
        return np.concatenate([features, progress]).astype(np.float32)

    def _finish(self) -> float:
        space, actions = self.space, self.actions
        result = self.evaluator.measure(
            space.allocation(actions), kl=self.weights["kl"] > 0, attention=self.weights["attention"] > 0
        )
        kl, shift = result.kl or 0.0, result.attn_shift or 0.0
        saving = space.memory_saving(actions)
        excess = max(0.0, space.avg_bits(actions) / space.problem.target_bits - 1)
        w = self.weights
        reward = (
            -w["ppl"] * (result.ppl / self.reference - 1)
            + w["memory"] * saving
            - w["kl"] * kl
            - w["attention"] * shift
            - self.penalty * excess
        )
        self.curve.append(
            {
                "episode": len(self.curve),
                "reward": reward,
                "ppl": result.ppl,
                "kl": kl,
                "attn_shift": shift,
                "memory_saving": saving,
                "avg_bits": space.avg_bits(actions),
            }
        )
        return float(reward)


class PPOSolver:
    name = "ppo"

    def __init__(
        self,
        episodes: int = 300,
        formats: list[str] | str | None = None,
        w_ppl: float = 0.7,
        w_memory: float = 2.0,
        w_kl: float = 1.0,
        w_attention: float | None = None,
        penalty: float = 10.0,
        episodes_per_update: int = 4,
        lr: float = 3e-3,
        n_epochs: int = 10,
        ent_coef: float = 0.01,
        hidden: int = 64,
        state: Path | str | None = None,
        checkpoint_every: int = 5,
    ) -> None:
        if episodes < 1 or episodes_per_update < 1 or checkpoint_every < 1:
            raise AutompError("episodes, episodes_per_update and checkpoint_every must be at least 1")
        self.episodes, self.episodes_per_update = episodes, episodes_per_update
        self.formats = format_option(formats)
        self.weights = {"ppl": w_ppl, "memory": w_memory, "kl": w_kl, "attention": w_attention}
        self.penalty, self.lr, self.n_epochs, self.ent_coef, self.hidden = penalty, lr, n_epochs, ent_coef, hidden
        self.state = Path(state) if state is not None else None
        self.checkpoint_every = checkpoint_every

    def solve(self, problem: Problem, *, seed: int = 0, evaluator: Evaluator | None = None) -> Solution:
        if evaluator is None or not hasattr(evaluator, "measure"):
            raise AutompError("the ppo solver measures real quality: it needs an AllocationEvaluator (--eval)")
        start = time.perf_counter()
        space = DecisionSpace.build(problem, self.formats or bit_options(problem))
        weights = dict(self.weights)
        if weights["attention"] is None:
            weights["attention"] = DEFAULT_ATTENTION_WEIGHT if evaluator.supports_attention else 0.0
        env = AllocationEnv(space, evaluator, weights, self.penalty)
        with _isolated_rng():  # sb3 seeds and draws from the global RNGs; the caller's stay untouched
            model = self._model(env, seed)
            key = fingerprint(self._settings(problem, space, seed, weights, evaluator.fp.ppl))
            updates_done = self._resume(model, env, key)
            updates = math.ceil(self.episodes / self.episodes_per_update)
            while updates_done < updates:
                chunk = min(self.checkpoint_every, updates - updates_done)
                model.learn(total_timesteps=chunk * model.n_steps, reset_num_timesteps=False)
                updates_done += chunk
                if self.state is not None:
                    save_state(self.state, self._checkpoint(model, env, key, updates_done))
            actions = self._rollout(model, env)
        return space.solution(
            space.repair(actions), self.name, time.perf_counter() - start, evaluations=len(env.curve), curve=env.curve
        )

    def _model(self, env: AllocationEnv, seed: int):
        try:
            from stable_baselines3 import PPO
            from stable_baselines3.common.logger import Logger
        except ImportError as err:
            raise AutompError("the ppo solver needs stable-baselines3: pip install 'automp[rl]'") from err

        n_steps = self.episodes_per_update * env.space.n_groups
        model = PPO(
            "MlpPolicy",
            env,
            learning_rate=self.lr,
            n_steps=n_steps,
            batch_size=n_steps,
            n_epochs=self.n_epochs,
            gamma=1.0,  # the only reward comes at the end of the episode: do not discount it
            gae_lambda=0.95,
            ent_coef=self.ent_coef,
            policy_kwargs={"net_arch": [self.hidden, self.hidden]},
            seed=seed,
            device="cpu",
            verbose=0,
        )
        model.set_logger(Logger(folder=None, output_formats=[]))  # sb3's default makes a /tmp folder per run
        return model

    def _resume(self, model, env: AllocationEnv, key: str) -> int:
        """Load the saved state into ``model`` and ``env``; the number of updates already done."""
        saved = load_state(self.state, key) if self.state is not None else None
        if saved is None:
            return 0
        model.set_parameters(saved["parameters"], exact_match=True, device="cpu")
        model.num_timesteps = saved["timesteps"]
        torch.set_rng_state(saved["torch_rng"])
        np.random.set_state(("MT19937", saved["numpy_rng"].numpy().astype(np.uint32), *saved["numpy_rng_pos"]))
        random.setstate(_tuples(saved["python_rng"]))
        env.curve = saved["curve"]
        return saved["updates"]

    def _checkpoint(self, model, env: AllocationEnv, key: str, updates: int) -> dict:
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        return {
            "fingerprint": key,
            "updates": updates,
            "timesteps": model.num_timesteps,
            "parameters": model.get_parameters(),
            "torch_rng": torch.get_rng_state(),
            "numpy_rng": torch.from_numpy(keys.astype(np.int64)),
            "numpy_rng_pos": [int(pos), int(has_gauss), float(cached)],
            "python_rng": random.getstate(),
            "curve": env.curve,
        }

    def _rollout(self, model, env: AllocationEnv) -> np.ndarray:
        """The policy's most likely format for every group, in order, without evaluating."""
        obs, _ = env.reset()
        for _ in range(env.space.n_groups):
            action, _ = model.predict(obs, deterministic=True)
            obs = env.advance(int(action))
        return np.array(env.actions)

    def _settings(self, problem: Problem, space: DecisionSpace, seed: int, weights: dict, reference: float) -> dict:
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
            "weights": weights,
            "hyper": [self.penalty, self.episodes_per_update, self.lr, self.n_epochs, self.ent_coef, self.hidden],
        }


def group_features(space: DecisionSpace) -> np.ndarray:
    """(decided groups, features): table statistics and log proxy costs, z-normalised over the groups."""
    layers = space.problem.table.layers
    rows = []
    for g, group in enumerate(space.decided):
        members = [layers[i] for i in space.grouped.groups[group]]
        stats = [
            np.mean([_signed_log(getattr(layer, field)) for layer in members])
            for field in (
                "act_absmean", "act_std", "act_max", "act_kurtosis",
                "weight_absmean", "weight_std", "weight_max", "weight_kurtosis",
            )
        ]  # fmt: skip
        size = math.log(sum(layer.numel for layer in members))
        rows.append([*stats, size, *np.log10(space.cost[g] + 1e-12)])
    features = np.array(rows, dtype=np.float64)
    spread = features.std(axis=0)
    return np.where(spread > 0, (features - features.mean(axis=0)) / np.where(spread > 0, spread, 1), 0.0)


def _signed_log(value: float) -> float:
    """log1p of the magnitude with the sign kept: statistics span orders of magnitude (kurtosis, max)."""
    return math.copysign(math.log1p(abs(value)), value)


def _tuples(value):
    """``random.setstate`` needs tuples; a weights-only load may give lists back."""
    return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


class _isolated_rng:
    """Save the global torch, numpy and Python RNG states on entry and restore them on exit."""

    def __enter__(self) -> None:
        self.saved = (torch.get_rng_state(), np.random.get_state(), random.getstate())

    def __exit__(self, *exc) -> None:
        torch.set_rng_state(self.saved[0])
        np.random.set_state(self.saved[1])
        random.setstate(self.saved[2])
