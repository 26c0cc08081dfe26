"""Reinforced Model Merging (RMM, arXiv 2503.21272; reference code WuDiHJQ/Reinforced-Model-Merging).

An agent builds the merged model layer by layer. The adapted modules are grouped by transformer
layer (:func:`osrm_lora.search.layer_groups` with one group per layer; modules outside numbered
layers form one last position). The candidates are each task's own adapter and merged adapters
(registered methods that merge into one shared model without task data, e.g. task_arithmetic, ties,
dare_ties, at their defaults or given parameters), each merged once over the whole model.

Environment (:class:`MergeEnv`). A pointer starts at the first layer; each step the agent takes one
of ``M + 2`` actions: ``0..M-1`` put that candidate's update of the layer's modules in and move on,
``M`` (skip) leaves the layer without an update (the base weights) and moves on, ``M + 1`` (back)
moves the pointer back one layer, whose choice the next action replaces. The episode ends when the
pointer passes the last layer (the reward: the mean score over the tasks, with the constraint
penalty, of the architecture on small random subsets of the tasks' VALIDATION splits), when "back"
is taken at the first layer (reward -10, no evaluation) or after ``max_steps`` steps (reward -10, no
evaluation). The state is the matrix of how often each choice (candidates and skip) was taken at
each layer in this episode, plus a one-hot of the pointer.

Agent (:class:`PPOAgent`): actor and critic MLPs (two hidden layers of 64, tanh), PPO with the
clipped surrogate (clip 0.2), Monte-Carlo returns (gamma 0.99) normalised per update, advantages
``return - value``, loss ``surrogate + 0.5 MSE(value, return) - 1e-4 entropy``, 40 epochs per update
on the episodes since the last one (every 4 episodes), Adam with lr 3e-4 (actor) and 1e-3 (critic).

Budget. ``budget`` bounds every evaluation of a merged model on validation data: one per episode
that completes an architecture (on subsets; each evaluation draws the next ``subset_size`` examples
per task from a reshuffled stream over the split), plus the final re-scoring on the whole validation
split of up to ``rescore`` architectures (the final policy's greedy one and the best by mean subset
reward), which are reserved from it. The best feasible re-scored architecture is chosen on the full
validation split; the test split is scored once, for it. See docs/SEARCH.md.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from osrm_lora.adapters import LoraAdapter, load_adapter
from osrm_lora.cards import adapter_hash
from osrm_lora.config import RMM_METHODS, PPOSettings, check_methods
from osrm_lora.constraints import Constraint, check_constraint_tasks, shortfalls
from osrm_lora.encoding import Encoded
from osrm_lora.errors import OsrmError
from osrm_lora.evaluate import mean
from osrm_lora.fsutil import claim_output, write_json
from osrm_lora.merge.registry import MergeContext, get_method, merge, resolve_params
from osrm_lora.merged_eval import DeltasFn, MergedEvaluator
from osrm_lora.search import LayerGroup, layer_groups, save_found_merge, search_evaluator

logger = logging.getLogger(__name__)

PAPER = "https://arxiv.org/abs/2503.21272"
SUMMARY = ("Reinforced Model Merging: a PPO agent builds the merge layer by layer from each adapter, merged "
           "candidates, skips and steps back; rewards from small validation subsets")
CODE = "https://github.com/WuDiHJQ/Reinforced-Model-Merging"
RECORD = "rmm.json"
MERGED = "merged"
SUBSET = "validation@rmm"
DEFAULT_METHODS = RMM_METHODS
SKIP = -1
"""The architecture entry of a skipped layer (no update)."""
FAIL_REWARD = -10.0
"""Reward of an episode that goes back before the first layer (as the reference code) or runs out of steps."""


# ---------------------------------------------------------------------------------------------- settings
def parse_candidate_params(texts: Sequence[str], methods: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``METHOD.KEY=VALUE`` strings (``ties.density=0.3``) -> ``{method: {key: value}}``, typed by the
    method's schema; the method must be one of the candidate ``methods``."""
    out: dict[str, dict[str, Any]] = {}
    for text in texts:
        name, eq, value = text.partition("=")
        method, dot, key = name.strip().partition(".")
        if not eq or not dot or not method or not key.strip():
            raise OsrmError(f"parameter {text!r} is not METHOD.KEY=VALUE; pass e.g. -p ties.density=0.3")
        if method not in methods:
            raise OsrmError(f"parameter {text!r} is for {method}, which is not a candidate method "
                            f"({', '.join(methods) or 'none'}); add it to --methods")
        param = get_method(method).param(key.strip())
        out.setdefault(method, {})[param.name] = param.parse(value)
    return out


def parse_ppo(texts: Sequence[str]) -> PPOSettings:
    """``KEY=VALUE`` strings (``epochs=10``, ``lr_actor=1e-4``) -> :class:`PPOSettings`, the others at
    their defaults (the paper's); OsrmError naming the key or the value at fault."""
    kinds = {f.name: type(getattr(PPOSettings(), f.name)) for f in dataclasses.fields(PPOSettings)}
    given: dict[str, Any] = {}
    for text in texts:
        key, eq, value = (x.strip() for x in text.partition("="))
        if not eq or not key:
            raise OsrmError(f"PPO setting {text!r} is not KEY=VALUE; pass e.g. --ppo epochs=10")
        if key.replace("-", "_") not in kinds:
            raise OsrmError(f"unknown PPO setting {key!r}; valid settings: {', '.join(kinds)}")
        key = key.replace("-", "_")
        try:
            given[key] = kinds[key](value)
        except ValueError:
            raise OsrmError(f"PPO setting {key} needs {'an integer' if kinds[key] is int else 'a number'}, "
                            f"got {value!r}") from None
    return PPOSettings(**given)


def _positive_int(name: str, value: Any, hint: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or float(value) != int(value) or int(value) < 1:
        raise OsrmError(f"{name} must be a positive integer, got {value!r}; {hint}")
    return int(value)


# ---------------------------------------------------------------------------------------------- candidates
@dataclass
class Candidate:
    """One choice for a layer: a task's own adapter or a merge of all adapters."""

    label: str
    kind: str  # "adapter" or "merge"
    deltas: dict[str, torch.Tensor]
    method: str | None = None
    params: dict[str, Any] = field(default_factory=dict)

    def describe(self, index: int) -> dict[str, Any]:
        return {"index": index, "label": self.label, "kind": self.kind, "method": self.method, "params": self.params}


def build_candidates(adapters: Sequence[LoraAdapter], methods: Sequence[str],
                     params: Mapping[str, Mapping[str, Any]] | None = None, seed: int = 0) -> list[Candidate]:
    """Each adapter alone (``adapter:<task>``), then each method's merge of all adapters
    (``merge:<method>``, computed once with the registry's :func:`merge`; DARE seeded by ``seed``)."""
    params = params or {}
    out = [Candidate(f"adapter:{a.name}", "adapter", {k: d.float() for k, d in a.deltas().items()}) for a in adapters]
    for method in methods:
        result = merge(list(adapters), method, dict(params.get(method) or {}), context=MergeContext(seed=seed),
                       ignore_extra=True)
        deltas = result.deltas_for(None)
        out.append(Candidate(f"merge:{method}", "merge", {k: deltas[k].float() for k in adapters[0].modules},
                             method, dict(result.params)))
    return out


def compose_deltas(candidates: Sequence[Candidate | Mapping[str, torch.Tensor]], groups: Sequence[LayerGroup],
                   architecture: Sequence[int]) -> dict[str, torch.Tensor]:
    """The dense update of every module under ``architecture`` (per layer group: a candidate index,
    or :data:`SKIP` for no update, i.e. zeros)."""
    if len(architecture) != len(groups):
        raise OsrmError(f"an architecture needs one choice per layer ({len(groups)}), got {len(architecture)}")
    tables = [c.deltas if isinstance(c, Candidate) else c for c in candidates]
    out: dict[str, torch.Tensor] = {}
    for group, choice in zip(groups, architecture):
        if choice != SKIP and not 0 <= int(choice) < len(tables):
            raise OsrmError(f"architecture choice {choice!r} is not a candidate (0..{len(tables) - 1}) or skip")
        for key in group.modules:
            out[key] = torch.zeros_like(tables[0][key]) if choice == SKIP else tables[int(choice)][key]
    return out


# ---------------------------------------------------------------------------------------------- environment
RewardFn = Callable[[tuple[int, ...]], float]


class MergeEnv:
    """The layer-by-layer merging environment (see the module docstring for actions and rewards).

    ``reward_fn(architecture)`` scores a complete architecture (a tuple with, per layer, a candidate
    index or :data:`SKIP`); it is called once per episode that completes one, and ``evaluations``
    counts those calls.
    """

    def __init__(self, n_layers: int, n_candidates: int, reward_fn: RewardFn, *, max_steps: int | None = None,
                 fail_reward: float = FAIL_REWARD) -> None:
        if n_layers < 1 or n_candidates < 1:
            raise OsrmError(f"the environment needs at least one layer and one candidate, got {n_layers} and {n_candidates}")
        self.n_layers, self.n_candidates = int(n_layers), int(n_candidates)
        self.max_steps = 4 * self.n_layers if max_steps is None else int(max_steps)
        if self.max_steps < self.n_layers:
            raise OsrmError(f"max_steps ({self.max_steps}) must be at least the number of layers ({self.n_layers})")
        self.reward_fn = reward_fn
        self.fail_reward = float(fail_reward)
        self.evaluations = 0
        self.reset()

    @property
    def n_actions(self) -> int:
        return self.n_candidates + 2

    @property
    def skip_action(self) -> int:
        return self.n_candidates

    @property
    def back_action(self) -> int:
        return self.n_candidates + 1

    @property
    def state_dim(self) -> int:
        return self.n_layers * (self.n_candidates + 1) + self.n_layers

    def reset(self) -> torch.Tensor:
        self.pos = 0
        self.steps = 0
        self.counts = torch.zeros(self.n_layers, self.n_candidates + 1)
        self.choices: list[int | None] = [None] * self.n_layers
        return self.state()

    def state(self) -> torch.Tensor:
        where = torch.zeros(self.n_layers)
        if 0 <= self.pos < self.n_layers:
            where[self.pos] = 1.0
        return torch.cat([self.counts.flatten(), where])

    def step(self, action: int) -> tuple[torch.Tensor, float, bool, dict[str, Any]]:
        """Apply ``action``; returns ``(state, reward, done, info)`` with ``info["end"]`` one of
        ``"complete"`` (``info["architecture"]`` set), ``"back_at_first_layer"``, ``"step_limit"``, or None."""
        action = int(action)
        if not 0 <= action < self.n_actions:
            raise OsrmError(f"action {action} is not one of 0..{self.n_actions - 1}")
        if not 0 <= self.pos < self.n_layers:
            raise OsrmError("the episode has ended; call reset() first")
        self.steps += 1
        if action == self.back_action:
            self.pos -= 1
        else:
            choice = SKIP if action == self.skip_action else action
            self.choices[self.pos] = choice
            self.counts[self.pos, self.n_candidates if choice == SKIP else choice] += 1.0
            self.pos += 1
        info: dict[str, Any] = {"end": None, "architecture": None}
        if self.pos == self.n_layers:
            arch = tuple(int(c) for c in self.choices)  # type: ignore[arg-type]  # every layer was passed
            self.evaluations += 1
            info.update(end="complete", architecture=arch)
            return self.state(), float(self.reward_fn(arch)), True, info
        if self.pos < 0:
            info["end"] = "back_at_first_layer"
            return self.state(), self.fail_reward, True, info
        if self.steps >= self.max_steps:
            info["end"] = "step_limit"
            self.pos = -1  # ended
            return self.state(), self.fail_reward, True, info
        return self.state(), 0.0, False, info


# ---------------------------------------------------------------------------------------------- agent
class ActorCritic(nn.Module):
    """Actor (action logits) and critic (state value): two tanh hidden layers each."""

    def __init__(self, state_dim: int, n_actions: int, hidden: int = 64) -> None:
        super().__init__()
        self.actor = nn.Sequential(nn.Linear(state_dim, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(),
                                   nn.Linear(hidden, n_actions))
        self.critic = nn.Sequential(nn.Linear(state_dim, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(),
                                    nn.Linear(hidden, 1))

    def log_probs(self, states: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(self.actor(states), dim=-1)

    def value(self, states: torch.Tensor) -> torch.Tensor:
        values: torch.Tensor = self.critic(states).squeeze(-1)
        return values


def clipped_surrogate(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                      clip: float) -> torch.Tensor:
    """PPO's clipped surrogate loss: ``-mean(min(r A, clip(r, 1 - eps, 1 + eps) A))`` with the
    probability ratio ``r = exp(logp - old_logp)``."""
    ratio = torch.exp(logp - old_logp)
    return -torch.minimum(ratio * advantages, torch.clamp(ratio, 1.0 - clip, 1.0 + clip) * advantages).mean()


def discounted_returns(rewards: Sequence[float], terminals: Sequence[bool], gamma: float) -> list[float]:
    """Monte-Carlo returns of a buffer of steps; the sum restarts after every episode end."""
    out: list[float] = []
    running = 0.0
    for reward, done in zip(reversed(rewards), reversed(terminals)):
        if done:
            running = 0.0
        running = float(reward) + gamma * running
        out.append(running)
    return out[::-1]


class PPOAgent:
    """PPO over the episodes gathered since the last update (see the module docstring)."""

    def __init__(self, state_dim: int, n_actions: int, settings: PPOSettings = PPOSettings(), seed: int = 0) -> None:
        self.settings = settings
        with torch.random.fork_rng(devices=[]):  # seeded weights without touching the caller's generator
            torch.manual_seed(int(seed))
            self.policy = ActorCritic(state_dim, n_actions, settings.hidden)
        self.old = copy.deepcopy(self.policy)
        self.optimizer = torch.optim.Adam([
            {"params": self.policy.actor.parameters(), "lr": settings.lr_actor},
            {"params": self.policy.critic.parameters(), "lr": settings.lr_critic},
        ])
        self.generator = torch.Generator().manual_seed(int(seed))
        self.clear()
        self.updates = 0

    def clear(self) -> None:
        self.states: list[torch.Tensor] = []
        self.actions: list[int] = []
        self.logprobs: list[float] = []
        self.values: list[float] = []
        self.rewards: list[float] = []
        self.terminals: list[bool] = []

    @property
    def pending(self) -> int:
        return len(self.rewards)

    def act(self, state: torch.Tensor, greedy: bool = False) -> int:
        """An action of the behaviour policy for ``state`` (sampled and buffered; ``greedy``: its most
        probable action, not buffered)."""
        with torch.no_grad():
            logp = self.old.log_probs(state)
            if greedy:
                return int(torch.argmax(logp).item())
            action = int(torch.multinomial(logp.exp(), 1, generator=self.generator).item())
            value = float(self.old.value(state).item())
        self.states.append(state.detach().clone())
        self.actions.append(action)
        self.logprobs.append(float(logp[action].item()))
        self.values.append(value)
        return action

    def record(self, reward: float, done: bool) -> None:
        self.rewards.append(float(reward))
        self.terminals.append(bool(done))

    def update(self) -> dict[str, float]:
        """``epochs`` steps of the PPO loss on the buffer; the behaviour policy becomes the new one."""
        s = self.settings
        if not self.rewards:
            return {}
        returns = torch.tensor(discounted_returns(self.rewards, self.terminals, s.gamma))
        spread = returns.std() if returns.numel() > 1 else torch.tensor(0.0)
        returns = (returns - returns.mean()) / (spread + 1e-7)
        states = torch.stack(self.states)
        actions = torch.tensor(self.actions)
        old_logp = torch.tensor(self.logprobs)
        advantages = returns - torch.tensor(self.values)
        last: dict[str, float] = {}
        for _ in range(s.epochs):
            logp_all = self.policy.log_probs(states)
            logp = logp_all.gather(1, actions[:, None]).squeeze(1)
            entropy = -(logp_all.exp() * logp_all).sum(-1).mean()
            values = self.policy.value(states)
            surrogate = clipped_surrogate(logp, old_logp, advantages, s.clip)
            value_loss = torch.mean((values - returns) ** 2)
            loss = surrogate + s.value_coef * value_loss - s.entropy_coef * entropy
            self.optimizer.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]  # torch leaves Tensor.backward unannotated
            self.optimizer.step()
            last = {"loss": float(loss.item()), "surrogate": float(surrogate.item()),
                    "value_loss": float(value_loss.item()), "entropy": float(entropy.item())}
        self.old.load_state_dict(self.policy.state_dict())
        self.clear()
        self.updates += 1
        return last


def run_episodes(env: MergeEnv, agent: PPOAgent, *, episodes: int, max_evaluations: int,
                 on_episode: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    """Train ``agent`` on ``env`` for up to ``episodes`` episodes, stopping before an episode could
    make ``env.evaluations`` exceed ``max_evaluations`` (each episode evaluates at most once).
    Returns per episode: its reward, how it ended, its architecture (complete ones) and steps."""
    history: list[dict[str, Any]] = []
    for episode in range(int(episodes)):
        if env.evaluations >= max_evaluations:
            break
        state = env.reset()
        total = 0.0
        while True:
            state, reward, done, info = env.step(agent.act(state))
            agent.record(reward, done)
            total += reward
            if done:
                break
        entry = {"episode": episode, "reward": total, "end": info["end"],
                 "architecture": None if info["architecture"] is None else list(info["architecture"]),
                 "steps": env.steps}
        if (episode + 1) % agent.settings.update_every == 0:
            agent.update()
        history.append(entry)
        if on_episode is not None:
            on_episode(entry)
    if agent.pending:
        agent.update()  # the last, incomplete batch of episodes still informs the final policy
    return history


def greedy_architecture(agent: PPOAgent, n_layers: int, n_candidates: int,
                        max_steps: int | None = None) -> tuple[int, ...] | None:
    """The architecture the agent's most probable actions build (None when they go back before the
    first layer or run out of steps); nothing is evaluated."""
    env = MergeEnv(n_layers, n_candidates, lambda arch: 0.0, max_steps=max_steps)
    state = env.reset()
    while True:
        state, _, done, info = env.step(agent.act(state, greedy=True))
        if done:
            arch: tuple[int, ...] | None = info["architecture"]
            return arch


# ---------------------------------------------------------------------------------------------- subsets
class SubsetStream:
    """Indices of successive random subsets of a split: a reshuffled pass over it, ``size`` at a time
    (as a data loader with shuffling that is drawn from batch by batch)."""

    def __init__(self, n: int, size: int, generator: torch.Generator) -> None:
        self.n, self.size, self.generator = int(n), min(int(size), int(n)), generator
        self.order: list[int] = []

    def next(self) -> list[int]:
        out = self.order[: self.size]
        self.order = self.order[self.size:]
        if len(out) < self.size:  # the pass is used up: reshuffle, without repeating an index in this subset
            taken = set(out)
            fresh = torch.randperm(self.n, generator=self.generator).tolist()
            fresh = [i for i in fresh if i not in taken] + [i for i in fresh if i in taken]
            need = self.size - len(out)
            out, self.order = out + fresh[:need], fresh[need:]
        return sorted(out)


# ---------------------------------------------------------------------------------------------- search
@dataclass
class RMMResult:
    """What :func:`rmm_search` returns: the record written to ``rmm.json``, the chosen architecture
    (per layer a candidate label or ``"skip"``), the per-episode rewards and the merged deltas."""

    record: dict[str, Any]
    architecture: list[str]
    reward_curve: list[float]
    deltas: dict[str, torch.Tensor]
    validation: dict[str, float]
    out: Path


def rmm_search(
    adapter_dirs: Sequence[str | Path],
    out_dir: str | Path,
    *,
    methods: Sequence[str] = DEFAULT_METHODS,
    params: Mapping[str, Mapping[str, Any]] | None = None,
    episodes: int = 300,
    budget: int = 200,
    subset_size: int = 32,
    rescore: int = 3,
    constraints: Sequence[Constraint | str] = (),
    penalty: float = 1.0,
    seed: int = 0,
    ppo: PPOSettings = PPOSettings(),
    max_steps: int | None = None,
    model: str | None = None,
    max_length: int | None = None,
    batch_size: int = 128,
    device: str | None = None,
    evaluator: MergedEvaluator | None = None,
    model_path: str | None = None,
    overwrite: bool = False,
) -> RMMResult:
    """Search a per-layer merge architecture with RMM on validation data; write the chosen merge to
    ``out_dir/merged`` (the common merge writer) and the search to ``out_dir/rmm.json``.

    ``methods``/``params``: the merged candidates besides the adapters themselves (``params``:
    method -> its parameters; defaults otherwise). ``episodes``: most episodes; ``budget``: most
    merged-model evaluations on validation (subset rewards plus the final re-scoring of ``rescore``
    architectures on the whole split); ``subset_size``: examples per task per reward. Constraints
    (``TASK>=FLOOR`` / ``TASK>=single-TOL``, as :func:`osrm_lora.search.search_merge`) subtract
    ``penalty`` times each shortfall from the reward and make an architecture that misses one on the
    whole validation split ineligible. ``evaluator`` (over the same adapters, in order; then
    ``model_path`` names its base model) replaces loading the runs' tasks.
    """
    methods = check_methods(methods) if methods else []
    method_params = {m: dict(p) for m, p in (params or {}).items()}
    for m, p in method_params.items():
        if m not in methods:
            raise OsrmError(f"parameters given for {m}, which is not a candidate method ({', '.join(methods) or 'none'})")
        resolve_params(get_method(m), p, len(adapter_dirs))  # names and ranges, before any work
    episodes = _positive_int("the number of episodes", episodes, "pass e.g. --episodes 300")
    budget = _positive_int("the evaluation budget", budget, "pass e.g. --budget 200 (merged-model evaluations)")
    subset_size = _positive_int("the subset size", subset_size, "pass e.g. --subset-size 32 (examples per task)")
    rescore = _positive_int("the number of re-scored architectures", rescore, "pass e.g. --rescore 3")
    if budget <= rescore:
        raise OsrmError(f"the evaluation budget ({budget}) must exceed the {rescore} final re-scoring(s) on the whole "
                        "validation split it reserves; raise --budget or lower --rescore")
    if isinstance(penalty, bool) or not isinstance(penalty, (int, float)) or not math.isfinite(penalty) or penalty < 0:
        raise OsrmError(f"the constraint penalty must be a number >= 0, got {penalty!r}")
    if max_steps is not None:
        max_steps = _positive_int("max_steps", max_steps, "pass e.g. 4 x the number of layers")
    parsed = [c if isinstance(c, Constraint) else Constraint.parse(c) for c in constraints]
    dirs = [Path(d) for d in adapter_dirs]
    if not dirs:
        raise OsrmError("no adapter directories given; pass the adapters to merge (each with its task head)")
    out = Path(out_dir)
    with claim_output(out, overwrite=overwrite, container=True, inputs=dirs):
        if overwrite:
            (out / RECORD).unlink(missing_ok=True)
            shutil.rmtree(out / MERGED, ignore_errors=True)
        if evaluator is None:
            evaluator, model_path = search_evaluator(dirs, parsed, model=model, max_length=max_length,
                                                     batch_size=batch_size, device=device)
        try:
            return _search(evaluator, dirs, out, methods=methods, params=method_params, episodes=episodes, budget=budget,
                           subset_size=subset_size, rescore=rescore, constraints=parsed, penalty=float(penalty),
                           seed=int(seed), ppo=ppo, max_steps=max_steps, model_path=model_path)
        finally:
            for slot in evaluator.slots:
                slot.encoded.pop(SUBSET, None)


def _search(evaluator: MergedEvaluator, dirs: Sequence[Path], out: Path, *, methods: list[str],
            params: dict[str, dict[str, Any]], episodes: int, budget: int, subset_size: int, rescore: int,
            constraints: list[Constraint], penalty: float, seed: int, ppo: PPOSettings, max_steps: int | None,
            model_path: str | None) -> RMMResult:
    t0 = time.perf_counter()
    tasks = evaluator.task_names
    if len(tasks) != len(dirs):
        raise OsrmError(f"the evaluator has {len(tasks)} tasks for {len(dirs)} adapters; give one adapter per task")
    if any("validation" not in slot.encoded for slot in evaluator.slots):
        raise OsrmError("the evaluator must hold the validation split (splits=('validation', ...))")
    check_constraint_tasks(constraints, tasks)
    adapters = [load_adapter(d, name=t) for d, t in zip(dirs, tasks)]
    for ad, d in zip(adapters, dirs):
        if ad.trains_biases:
            raise OsrmError(f"{d} trains biases, which a per-layer merge cannot compose; train the adapters "
                            "with bias='none'")
    groups = layer_groups(list(adapters[0].modules), None)
    candidates = build_candidates(adapters, methods, params, seed)
    labels = [c.label for c in candidates]
    env_steps = 4 * len(groups) if max_steps is None else max_steps
    if env_steps < len(groups):
        raise OsrmError(f"max_steps ({env_steps}) must be at least the number of layers ({len(groups)})")
    for slot in evaluator.slots:
        if len(slot.encoded["validation"]) == 0:
            raise OsrmError(f"task {slot.task.name} has an empty validation split; RMM needs validation data")
    own = [c.deltas for c in candidates[: len(adapters)]]
    single = evaluator.evaluate(lambda i: own[i], "validation", per_task=True)
    floors = {c.text(): c.resolve(single) for c in constraints}

    def violations(scores: Mapping[str, float]) -> list[float]:
        return shortfalls(constraints, floors, scores)

    streams = [SubsetStream(len(slot.encoded["validation"]), subset_size,
                            torch.Generator().manual_seed(seed * 1000003 + 7919 * t + 1))
               for t, slot in enumerate(evaluator.slots)]
    sizes = {slot.task.name: s.size for slot, s in zip(evaluator.slots, streams)}
    evaluations: list[dict[str, Any]] = []
    stats: dict[tuple[int, ...], list[float]] = {}  # architecture -> rewards

    def reward_fn(arch: tuple[int, ...]) -> float:
        for slot, stream in zip(evaluator.slots, streams):
            full = slot.encoded["validation"]
            idx = stream.next()
            slot.encoded[SUBSET] = Encoded(tuple(full.features[i] for i in idx), full.labels[idx])
        deltas = compose_deltas(candidates, groups, arch)
        scores = evaluator.evaluate(lambda i: deltas, SUBSET)
        viol = violations(scores)
        reward = mean(scores.values()) - penalty * sum(max(0.0, v) for v in viol)
        evaluations.append({"scores": scores, "violations": viol, "reward": reward})
        stats.setdefault(arch, []).append(reward)
        return reward

    env = MergeEnv(len(groups), len(candidates), reward_fn, max_steps=env_steps)
    agent = PPOAgent(env.state_dim, env.n_actions, ppo, seed)
    every = max(1, episodes // 10)
    logger.info("rmm: %d layers x %d candidates (%s) + skip/back; up to %d episodes, %d evaluations on %s examples "
                "per task", len(groups), len(candidates), ", ".join(labels), episodes, budget - rescore,
                subset_size)
    rewards: list[float] = []

    def on_episode(entry: dict[str, Any]) -> None:
        if entry["end"] == "complete":
            entry.update(evaluations[-1])  # its subset scores, violations and reward
            entry["evaluation"] = len(evaluations)
        rewards.append(entry["reward"])
        n = entry["episode"] + 1
        if n % every == 0 or n == episodes or env.evaluations >= budget - rescore:
            best = max((e["reward"] for e in evaluations), default=math.nan)
            logger.info("rmm: episode %d/%d, %d/%d evaluations, mean reward of the last %d episodes %.2f, best %.2f",
                        n, episodes, env.evaluations, budget - rescore, len(rewards[-every:]),
                        mean(rewards[-every:]), best)

    history = run_episodes(env, agent, episodes=episodes, max_evaluations=budget - rescore, on_episode=on_episode)
    search_evaluations = env.evaluations

    # the architectures to re-score on the whole validation split
    greedy = greedy_architecture(agent, len(groups), len(candidates), env_steps)
    ranked = sorted(stats, key=lambda a: (-mean(stats[a]), -len(stats[a])))  # stable: first seen first on ties
    picks: list[tuple[tuple[int, ...], str]] = []
    if greedy is not None:
        picks.append((greedy, "greedy policy"))
    for arch in ranked:
        if len(picks) >= rescore:
            break
        if arch not in [p[0] for p in picks]:
            picks.append((arch, "subset reward"))
    picks = picks[:rescore]

    def describe(arch: Sequence[int]) -> list[str]:
        return ["skip" if c == SKIP else labels[c] for c in arch]

    rescored: list[dict[str, Any]] = []
    for arch, why in picks:
        deltas = compose_deltas(candidates, groups, arch)
        scores = evaluator.evaluate(cast(DeltasFn, lambda i, deltas=deltas: deltas), "validation")
        viol = violations(scores)
        rescored.append({
            "architecture": describe(arch), "indices": list(arch), "picked_by": why,
            "subset_rewards": {"mean": mean(stats[arch]), "count": len(stats[arch])} if arch in stats else None,
            "validation": scores, "avg_validation": mean(scores.values()),
            "constraint_violation": viol, "feasible": all(v <= 0 for v in viol),
        })
    final_evaluations = len(rescored)
    feasible = [r for r in rescored if r["feasible"]]
    chosen = max(feasible, key=lambda r: r["avg_validation"], default=None)  # max keeps the first on ties
    curve = [float(e["reward"]) for e in history]
    record: dict[str, Any] = {
        "paper": PAPER, "code": CODE, "strategy": "rmm", "seed": seed, "tasks": tasks,
        "adapters": [adapter_hash(d) for d in dirs],
        "candidates": [c.describe(i) for i, c in enumerate(candidates)],
        "actions": labels + ["skip", "back"],
        "layers": [{"name": g.name, "layers": list(g.layers), "modules": list(g.modules)} for g in groups],
        "settings": {"episodes": episodes, "budget": budget, "subset_size": subset_size, "rescore": rescore,
                     "penalty": penalty, "max_steps": env_steps, "fail_reward": FAIL_REWARD,
                     "ppo": {k: getattr(ppo, k) for k in PPOSettings.__dataclass_fields__}},
        "subset_examples": sizes,
        "constraints": [{"constraint": text, "floor": floor} for text, floor in floors.items()],
        "single_task_validation": dict(single),
        "budget": {"evaluations": budget, "used": search_evaluations + final_evaluations,
                   "search": search_evaluations, "final": final_evaluations, "episodes": len(history),
                   "policy_updates": agent.updates,
                   "unit": "merged-model evaluations on validation (subsets during the search, the whole split "
                           "for the final re-scoring)"},
        "reward_curve": curve,
        "episodes": [{**e, "architecture": None if e["architecture"] is None else describe(e["architecture"])}
                     for e in history],
        "rescored": rescored, "best": None,
        "notes": ["rewards use random subsets of the validation splits; the choice uses the whole validation "
                  "splits; the test split is scored once, for the chosen architecture"],
    }
    if chosen is None:
        record["seconds"] = time.perf_counter() - t0
        write_json(out / RECORD, record)
        if not rescored:
            raise OsrmError(f"no episode built a complete architecture in {len(history)} episodes; raise --episodes")
        raise OsrmError(f"no re-scored architecture met the constraints ({len(rescored)} re-scored on the whole "
                        "validation split); raise --budget or --episodes, or loosen the constraints")
    arch = tuple(chosen["indices"])
    deltas = compose_deltas(candidates, groups, arch)
    has_test = all("test" in slot.encoded for slot in evaluator.slots)
    test = evaluator.evaluate(lambda i: deltas, "test") if has_test else None  # once, for the chosen architecture
    best = {"architecture": chosen["architecture"], "indices": list(arch),
            "layers": {g.name: label for g, label in zip(groups, chosen["architecture"])},
            "picked_by": chosen["picked_by"], "subset_rewards": chosen["subset_rewards"],
            "validation": chosen["validation"], "avg_validation": chosen["avg_validation"],
            "test": test, "avg_test": None if test is None else mean(test.values()),
            "selected_on": "validation (whole split, mean over tasks, among the feasible re-scored architectures)"}
    record["best"] = best
    merge_scores: dict[str, Any] = {"split": "validation", "scores": best["validation"]}
    if test is not None:
        merge_scores["test"] = test
    used = {c for c in arch if c != SKIP}
    carrier = next((candidates[c].method for c in sorted(used) if candidates[c].method), None) or "task_arithmetic"
    save_found_merge(out / MERGED, adapters, dirs, carrier=str(carrier), label="rmm",
                     params={"architecture": best["layers"], "candidates": record["candidates"], "seed": seed},
                     info={"search": f"../{RECORD}", "paper": PAPER, "code": CODE,
                           "layers": {g.name: list(g.modules) for g in groups}},
                     deltas=deltas, model_path=model_path, scores=merge_scores, paper=PAPER,
                     reproduce=("Found by `osrm-lora rmm` (Reinforced Model Merging: per layer, one candidate's update "
                                f"or none); `{RECORD}` beside this directory records the candidates, the reward curve "
                                "and the chosen architecture. Rerun the same command with the same `--seed` (on "
                                "CPU) to repeat it.\n"))
    record["output"] = MERGED
    record["seconds"] = time.perf_counter() - t0
    write_json(out / RECORD, record)
    logger.info("rmm: chosen architecture validation avg %.2f%s; written to %s", best["avg_validation"],
                "" if best["avg_test"] is None else f", test avg {best['avg_test']:.2f}", out)
    return RMMResult(record, list(best["architecture"]), curve, deltas, dict(best["validation"]), out)


def best_deltas(record: Mapping[str, Any], adapters: Sequence[LoraAdapter]) -> dict[str, torch.Tensor]:
    """The dense update of every module of the architecture RMM chose (``record``: the contents of
    ``rmm.json``; ``adapters``: the searched ones, in the record's task order): the candidates it uses
    merged again as in the search (same resolved parameters, DARE seeded by the record's seed), then
    composed per layer."""
    best = record.get("best")
    if best is None:
        raise OsrmError("the RMM record has no chosen architecture; rerun RMM with a larger budget")
    if [a.name for a in adapters] != list(record["tasks"]):
        raise OsrmError(f"the adapters are of tasks {[a.name for a in adapters]}, RMM's of {record['tasks']}; "
                        "pass the searched adapters in the same order")
    groups = [LayerGroup(str(g["name"]), tuple(g["layers"]), tuple(g["modules"])) for g in record["layers"]]
    arch = [int(c) for c in best["indices"]]
    tables: dict[int, Mapping[str, torch.Tensor]] = {}
    for index in sorted({c for c in arch if c != SKIP}):
        cand = record["candidates"][index]
        if cand["kind"] == "adapter":
            tables[index] = adapters[index].deltas()
        else:
            result = merge(list(adapters), cand["method"], dict(cand["params"] or {}),
                           context=MergeContext(seed=int(record["seed"])), ignore_extra=True)
            tables[index] = result.deltas_for(None)
    out: dict[str, torch.Tensor] = {}
    for group, choice in zip(groups, arch):
        for key in group.modules:
            out[key] = (torch.zeros_like(adapters[0].modules[key].delta()).float() if choice == SKIP
                        else tables[choice][key].float())
    return out


def summary_lines(record: Mapping[str, Any]) -> list[str]:
    """What ``osrm-lora rmm`` prints: the chosen architecture, its scores and the budget used."""
    best = record["best"]
    test = "" if best["avg_test"] is None else f", test avg {best['avg_test']:.2f} (test scored once, for it)"
    lines = [f"chosen architecture ({best['picked_by']}): validation avg {best['avg_validation']:.2f}{test}"]
    for layer, label in zip(record["layers"], best["architecture"]):
        where = ", ".join(layer["layers"]) or "modules outside numbered layers"
        lines.append(f"  {layer['name']} ({where}): {label}")
    b = record["budget"]
    lines.append(f"{b['episodes']} episodes, {b['used']} of {b['evaluations']} evaluations ({b['search']} on validation "
                 f"subsets, {b['final']} on the whole validation split), {b['policy_updates']} policy updates")
    return lines
