"""Reinforced Model Merging: the PPO machinery on a synthetic MDP, the layer composition and the
environment's actions, the evaluation budget, and end-to-end runs on a tiny BERT with three keyword tasks."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from tinymodels import KEYWORD_TASKS, trained_keyword_adapters

from osrm_lora.adapters import load_adapter
from osrm_lora.cli import main
from osrm_lora.errors import OsrmError
from osrm_lora.merge.registry import merge
from osrm_lora.merged_eval import MergedEvaluator
from osrm_lora.rmm import (
    FAIL_REWARD,
    SKIP,
    SUBSET,
    MergeEnv,
    PPOAgent,
    PPOSettings,
    SubsetStream,
    build_candidates,
    clipped_surrogate,
    compose_deltas,
    discounted_returns,
    greedy_architecture,
    parse_candidate_params,
    rmm_search,
    run_episodes,
)
from osrm_lora.search import layer_groups

TASKS = KEYWORD_TASKS


@pytest.fixture(scope="module")
def trained(tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Three adapters (rank 2) trained on local keyword tasks; a MergedEvaluator over them."""
    return trained_keyword_adapters(tiny_bert, tmp_path_factory.mktemp("rmm"), TASKS)


@pytest.fixture()
def calls(trained: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[str, bool]]]:
    """Every (split, per_task) the evaluator scores, in order."""
    ev: MergedEvaluator = trained["evaluator"]
    seen: list[tuple[str, bool]] = []
    original = MergedEvaluator.evaluate

    def spy(deltas_for: Any, split: str, per_task: bool = False) -> dict[str, float]:
        seen.append((split, per_task))
        return original(ev, deltas_for, split, per_task)

    monkeypatch.setattr(ev, "evaluate", spy)
    yield seen


def _rmm(trained: dict[str, Any], out: Path, **kw: Any) -> Any:
    kw.setdefault("methods", ["ties"])
    kw.setdefault("episodes", 24)
    kw.setdefault("budget", 14)
    kw.setdefault("subset_size", 8)
    kw.setdefault("rescore", 2)
    return rmm_search(trained["dirs"], out, evaluator=trained["evaluator"], model_path=trained["model"], seed=0, **kw)


# ---------------------------------------------------------------------------------------------- PPO
def test_clipped_surrogate_matches_a_hand_computed_value() -> None:
    ratios = torch.tensor([1.5, 0.5, 1.1, 0.7])
    old = torch.tensor([-1.0, -2.0, -0.5, -3.0])
    adv = torch.tensor([1.0, 1.0, -1.0, -2.0])
    # min(r A, clip(r, 0.8, 1.2) A): min(1.5, 1.2) = 1.2; min(0.5, 0.8) = 0.5; min(-1.1, -1.1) = -1.1;
    # min(-1.4, -1.6) = -1.6; the loss is minus their mean: -(1.2 + 0.5 - 1.1 - 1.6) / 4 = 0.25
    loss = clipped_surrogate(old + torch.log(ratios), old, adv, 0.2)
    assert float(loss) == pytest.approx(0.25, abs=1e-6)
    assert float(clipped_surrogate(old, old, adv, 0.2)) == pytest.approx(-float(adv.mean()))  # ratio 1


def test_discounted_returns_restart_at_episode_ends() -> None:
    got = discounted_returns([0.0, 0.0, 5.0, 0.0, 3.0], [False, False, True, False, True], 0.5)
    assert got == pytest.approx([1.25, 2.5, 5.0, 1.5, 3.0])


def test_ppo_finds_the_known_best_sequence_of_a_synthetic_mdp() -> None:
    """Three layers, three candidates; a third of 100 for every layer that matches (2, skip, 0)."""
    target = (2, SKIP, 0)
    seen: list[tuple[int, ...]] = []

    def reward(arch: tuple[int, ...]) -> float:
        seen.append(arch)
        return 100.0 / 3 * sum(a == b for a, b in zip(arch, target))

    env = MergeEnv(3, 3, reward)
    agent = PPOAgent(env.state_dim, env.n_actions, PPOSettings(), seed=0)
    history = run_episodes(env, agent, episodes=160, max_evaluations=150)
    assert env.evaluations == len(seen) <= 150
    assert target in seen
    assert greedy_architecture(agent, 3, 3) == target  # the learnt policy builds the optimum
    rewards = [e["reward"] for e in history]
    assert sum(rewards[-20:]) / 20 > 90 > sum(rewards[:20]) / 20
    assert agent.updates == math.ceil(len(history) / 4)


def test_agent_is_deterministic_for_a_seed() -> None:
    def run(seed: int) -> list[float]:
        env = MergeEnv(2, 2, lambda arch: float(sum(arch)))
        agent = PPOAgent(env.state_dim, env.n_actions, PPOSettings(epochs=5), seed=seed)
        return [e["reward"] for e in run_episodes(env, agent, episodes=30, max_evaluations=30)]

    assert run(3) == run(3)
    assert run(3) != run(4)


# ---------------------------------------------------------------------------------------------- environment
def test_actions_choose_skip_and_go_back() -> None:
    seen: list[tuple[int, ...]] = []
    env = MergeEnv(3, 2, lambda arch: seen.append(arch) or 7.0)
    assert env.n_actions == 4 and (env.skip_action, env.back_action) == (2, 3)
    state = env.reset()
    assert state.shape == (env.state_dim,) and state[-3:].tolist() == [1.0, 0.0, 0.0]  # the pointer at layer 0
    for action in (0, 1, env.back_action):  # layer 0 <- 0, layer 1 <- 1, back to layer 1
        _, reward, done, _ = env.step(action)
        assert (reward, done) == (0.0, False)
    assert env.pos == 1
    env.step(0)  # layer 1 again: the new choice replaces the old one
    _, reward, done, info = env.step(env.skip_action)  # layer 2: no update
    assert done and reward == 7.0 and info["end"] == "complete"
    assert info["architecture"] == seen[0] == (0, 0, SKIP) and env.evaluations == 1
    assert env.counts.tolist() == [[1, 0, 0], [1, 1, 0], [0, 0, 1]]  # every choice made, skip in the last column
    with pytest.raises(OsrmError, match="reset"):
        env.step(0)

    env.reset()
    _, reward, done, info = env.step(env.back_action)  # back at the first layer ends the episode
    assert done and reward == FAIL_REWARD and info["end"] == "back_at_first_layer"
    env = MergeEnv(2, 2, lambda arch: seen.append(arch) or 0.0, max_steps=3)
    for action in (0, env.back_action):
        env.step(action)
    _, reward, done, info = env.step(1)
    assert done and reward == FAIL_REWARD and info["end"] == "step_limit"
    assert len(seen) == 1 and env.evaluations == 0  # neither failure is evaluated


def test_budget_cap_is_never_exceeded_in_the_agent_loop() -> None:
    count = [0]

    def reward(arch: tuple[int, ...]) -> float:
        count[0] += 1
        return float(arch.count(1))

    for cap in (1, 5, 17):
        count[0] = 0
        env = MergeEnv(2, 3, reward)
        history = run_episodes(env, PPOAgent(env.state_dim, env.n_actions, PPOSettings(epochs=2), seed=1),
                               episodes=200, max_evaluations=cap)
        assert count[0] == env.evaluations == cap == sum(e["end"] == "complete" for e in history)


def test_subset_stream_covers_the_split_without_repeats() -> None:
    stream = SubsetStream(10, 4, torch.Generator().manual_seed(0))
    subsets = [stream.next() for _ in range(5)]
    assert all(len(s) == len(set(s)) == 4 for s in subsets)
    assert set(subsets[0]) | set(subsets[1]) | set(subsets[2]) == set(range(10))  # one pass before reshuffling
    assert SubsetStream(3, 8, torch.Generator()).next() == [0, 1, 2]


# ---------------------------------------------------------------------------------------------- composition
def test_layer_composition_reproduces_adapters_and_skips(trained: dict[str, Any]) -> None:
    adapters = trained["adapters"]
    groups = layer_groups(list(adapters[0].modules), None)
    assert len(groups) >= 2
    cands = build_candidates(adapters, ["ties"], {"ties": {"density": 0.5}})
    assert [c.label for c in cands] == [f"adapter:{t}" for t in trained["tasks"]] + ["merge:ties"]
    assert cands[-1].params["density"] == 0.5
    ties = merge(list(adapters), "ties", {"density": 0.5}, ignore_extra=True).deltas_for(None)
    for key, d in ties.items():
        assert torch.equal(cands[-1].deltas[key], d.float())
    for i, ad in enumerate(adapters):
        got = compose_deltas(cands, groups, [i] * len(groups))
        want = ad.deltas()
        assert set(got) == set(want)
        assert all(torch.equal(got[k], want[k]) for k in want)  # exactly task i's adapter
    arch = [SKIP] + [3] * (len(groups) - 1)
    got = compose_deltas(cands, groups, arch)
    for key in groups[0].modules:
        assert not got[key].any()  # a skipped layer has no update
    for g in groups[1:]:
        assert all(torch.equal(got[k], cands[3].deltas[k]) for k in g.modules)
    with pytest.raises(OsrmError, match="one choice per layer"):
        compose_deltas(cands, groups, [0])


# ---------------------------------------------------------------------------------------------- end to end
def test_rmm_run_respects_the_budget_and_never_rewards_on_test(trained: dict[str, Any], calls: list[tuple[str, bool]],
                                                              tmp_path: Path) -> None:
    result = _rmm(trained, tmp_path / "r", budget=9, rescore=2, episodes=40)
    merged = [split for split, per_task in calls if not per_task]
    validation = [s for s in merged if s.startswith("validation")]
    assert len(validation) <= 9 == result.record["budget"]["evaluations"]
    assert result.record["budget"]["used"] == len(validation)
    assert validation.count("validation") == result.record["budget"]["final"] <= 2
    assert merged.count("test") == 1 and merged[-1] == "test"  # once, for the chosen architecture
    assert all(s == SUBSET for s in merged[:result.record["budget"]["search"]])
    assert result.record["budget"]["search"] == sum(e["end"] == "complete" for e in result.record["episodes"])
    assert all(SUBSET not in slot.encoded for slot in trained["evaluator"].slots)  # cleaned up


def test_rmm_end_to_end_cli_writes_a_loadable_merge(trained: dict[str, Any], tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    dirs = list(map(str, trained["dirs"]))
    rc = main(["-q", "rmm", *dirs, "--out", str(out), "--methods", "task_arithmetic,ties", "-p", "ties.density=0.5",
               "--episodes", "16", "--budget", "12", "--subset-size", "8", "--rescore", "2",
               "--constraint", "polar>=single-100", "--ppo", "epochs=3", "--ppo", "hidden=16"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert captured.out.startswith("chosen architecture") and "written to" in captured.out
    record = json.loads((out / "rmm.json").read_text())
    assert record["paper"].endswith("2503.21272") and record["tasks"] == trained["tasks"]
    ppo = record["settings"]["ppo"]
    assert ppo["epochs"] == 3 and ppo["hidden"] == 16 and ppo["clip"] == 0.2  # --ppo, the rest the paper's
    assert len(record["reward_curve"]) == record["budget"]["episodes"] == len(record["episodes"]) <= 16
    assert record["budget"]["used"] <= 12
    assert [c["label"] for c in record["candidates"]][-2:] == ["merge:task_arithmetic", "merge:ties"]
    assert record["candidates"][-1]["params"]["density"] == 0.5
    best = record["best"]
    assert len(best["architecture"]) == len(record["layers"]) and set(best["validation"]) == set(trained["tasks"])
    assert best["avg_validation"] == max(r["avg_validation"] for r in record["rescored"] if r["feasible"])
    assert set(best["architecture"]) <= set(record["actions"][:-1])
    assert record["constraints"][0]["floor"] == pytest.approx(record["single_task_validation"]["polar"] - 100)

    info = json.loads((out / "merged" / "merge_info.json").read_text())
    assert info["method"] == "rmm" and info["params"]["architecture"] == best["layers"]
    assert "osrm-lora rmm" in (out / "merged" / "README.md").read_text()
    adapters = trained["adapters"]
    groups = layer_groups(list(adapters[0].modules), None)
    cands = build_candidates(adapters, ["task_arithmetic", "ties"], {"ties": {"density": 0.5}})
    want = compose_deltas(cands, groups, best["indices"])
    saved = load_adapter(out / "merged").deltas()
    for key, d in want.items():
        assert torch.linalg.norm(saved[key] - d) <= 1e-3 * max(float(torch.linalg.norm(d)), 1e-12) + 1e-6

    rc = main(["-q", "evaluate", *dirs, "--merged", str(out / "merged"), "--split", "validation"])
    lines = capsys.readouterr().out.splitlines()
    assert rc == 0 and [ln.split(":")[0] for ln in lines] == trained["tasks"]
    rc = main(["-q", "rmm", *dirs, "--out", str(out), "--episodes", "4", "--budget", "4"])  # no silent replace
    assert rc == 2 and "--overwrite" in _error_line(capsys.readouterr().err)


def test_rmm_is_deterministic_for_a_seed(trained: dict[str, Any], tmp_path: Path) -> None:
    a = _rmm(trained, tmp_path / "a", methods=["dare_ties"])
    b = _rmm(trained, tmp_path / "b", methods=["dare_ties"])
    assert a.reward_curve == b.reward_curve and a.architecture == b.architecture
    assert a.record["episodes"] == b.record["episodes"] and a.validation == b.validation
    assert all(torch.equal(a.deltas[k], b.deltas[k]) for k in a.deltas)


def test_constraints_penalise_the_reward_and_an_infeasible_run_fails(trained: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "c"
    with pytest.raises(OsrmError, match="no re-scored architecture met the constraints") as err:
        _rmm(trained, out, constraints=["polar>=101"], penalty=2.0, episodes=12, budget=8)
    assert "\n" not in str(err.value)
    record = json.loads((out / "rmm.json").read_text())
    assert record["best"] is None and not (out / "merged").exists()
    done = [e for e in record["episodes"] if e["end"] == "complete"]
    assert done
    for e in done:  # reward = mean subset score - penalty x shortfall
        mean_score = sum(e["scores"].values()) / len(e["scores"])
        assert e["violations"] == [pytest.approx(101 - e["scores"]["polar"])]
        assert e["reward"] == pytest.approx(mean_score - 2.0 * (101 - e["scores"]["polar"]))
    assert all(not r["feasible"] for r in record["rescored"])


# ---------------------------------------------------------------------------------------------- bad input
def _error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("args, message", [
    (["--methods", "nope"], "unknown merge method 'nope'"),
    (["--methods", "emr"], "method emr cannot be searched"),
    (["--budget", "0"], "the evaluation budget must be a positive integer"),
    (["--budget", "3", "--rescore", "3"], "must exceed the 3 final re-scoring"),
    (["--episodes", "0"], "the number of episodes must be a positive integer"),
    (["--subset-size", "0"], "the subset size must be a positive integer"),
    (["-p", "ties.density"], "is not METHOD.KEY=VALUE"),
    (["-p", "ties.nope=1"], "has no parameter 'nope'"),
    (["-p", "tsv_m.rank_fraction=0.5"], "not a candidate method"),
    (["-p", "ties.density=7"], "out of range"),
    (["--constraint", "nothere>=3"], "constraint task 'nothere' is not one of"),
    (["--ppo", "epochs=0"], "PPO setting epochs must be an integer >= 1"),
    (["--ppo", "nope=1"], "unknown PPO setting 'nope'; valid settings: epochs, clip"),
    (["--ppo", "epochs=x"], "PPO setting epochs needs an integer, got 'x'"),
    (["--ppo", "clip"], "is not KEY=VALUE"),
])
def test_cli_rmm_bad_input_is_one_line(trained: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                       args: list[str], message: str) -> None:
    out = tmp_path / "bad"
    rc = main(["-q", "rmm", *map(str, trained["dirs"]), "--out", str(out), "--episodes", "4", *args])
    assert rc == 2
    assert message in _error_line(capsys.readouterr().err)
    assert not out.exists()  # nothing left behind


def test_parse_candidate_params() -> None:
    assert parse_candidate_params(["ties.density=0.3", "ties.scaling=0.7", "dare_ties.p=0.2"],
                                  ["ties", "dare_ties"]) == {"ties": {"density": 0.3, "scaling": 0.7},
                                                             "dare_ties": {"p": 0.2}}
