"""mmkernels.profiling: every recipe, stock against mmkernels, at tiny size; the report, the trace,
the CLI, and the errors."""
import argparse
import csv
import json

import pytest
import torch
from torch import nn

from mmkernels.profiling import cli, profile, recipes, speedup_text
from mmkernels.profiling.report import CSV_FIELDS

pytest.importorskip("transformers")


@pytest.mark.parametrize("name", list(recipes.RECIPES))
def test_recipe_runs_stock_and_fused_and_they_agree(name, tmp_path):
    recipe = recipes.build(name, "tiny")
    trace = tmp_path / "trace.json"
    result = profile(recipe.model, recipe.inputs, trace=str(trace), iters=2, label=recipe.title)
    assert result.agree, str(result)
    assert [m.mode for m in result.modes] == ["fwd", "fwd+bwd"]
    fwd, train = result.modes
    assert fwd.compared == "outputs" and train.compared == "gradients"
    for m in result.modes:
        assert m.stock_ms > 0 and m.mmkernels_ms > 0 and m.speedup > 0
        assert m.max_abs_diff <= 1e-4 * max(1.0, m.max_abs_value)
        assert 0 < m.fused_share <= 1 and m.sdpa_calls == 0  # every attention of these models is covered
        assert m.stock_peak_mib is None or m.stock_peak_mib >= 0
    assert fwd.fused_calls.get("mmkernels::cross_attention", 0) > 0
    assert train.fused_calls.get("mmkernels::cross_attention_backward", 0) > 0
    assert any(r.fused for r in result.modules) and all(r.name != type(recipe.model).__name__ for r in result.modules)
    text = str(result)
    for field in ("speed-up", "stock MiB", "fused share", "max |diff|", "where the forward time went", "top ops", recipe.title):
        assert field in text
    assert ("faster" in text) or ("slower" in text)
    names = {e["name"] for e in json.loads(trace.read_text())["traceEvents"]}
    assert {"mmkernels.profiling: stock fwd", "mmkernels.profiling: mmkernels fwd+bwd", "mmkernels::cross_attention"} <= names


def test_transformer_decoder_row_pairs_the_replaced_layer():
    recipe = recipes.build("transformer_decoder", "tiny")
    result = profile(recipe.model, recipe.inputs, backward=False, iters=1)
    assert [m.mode for m in result.modes] == ["fwd"]
    assert "4 MultiheadAttention -> CrossModalAttention" in result.changes
    row = next(r for r in result.modules if r.name == "MultiheadAttention -> CrossModalAttention")
    assert row.stock_calls == row.mmkernels_calls == 4 and row.fused == 4 and row.stock_ms > 0 and row.mmkernels_ms > 0


def test_speedup_is_never_a_fraction_faster():
    assert speedup_text(2.0, 1.0) == "2.00x faster"
    assert speedup_text(1.0, 2.0) == "2.00x slower"
    assert speedup_text(1.0, 1.0) == "1.00x faster"
    assert speedup_text(1.0, 0.0) == "n/a"


def test_a_model_with_nothing_to_replace_says_so():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 3))
    result = profile(model, torch.randn(4, 8), iters=1, loss=lambda out: out.square().mean())
    assert result.agree and all(m.n_fused == 0 and m.fused_share == 0 for m in result.modes)
    assert result.changes[0].startswith("nothing")
    assert any("no mmkernels op ran" in n for n in result.notes)


def test_models_that_differ_are_reported_as_disagreeing():
    torch.manual_seed(0)
    model, other = (nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2)) for _ in range(2))
    result = profile(model, torch.randn(4, 8), fused=other, iters=1)
    assert not result.agree and all(not m.agree for m in result.modes)
    assert "NO" in str(result) and any("DISAGREE" in n for n in result.notes)


def test_profile_arguments_are_checked():
    model = nn.Linear(4, 4)
    with pytest.raises(ValueError, match="warmup"):
        profile(model, torch.randn(2, 4), warmup=0)
    with pytest.raises(ValueError, match="iters"):
        profile(model, torch.randn(2, 4), iters=0)
    with pytest.raises(TypeError, match="nn.Module"):
        profile("model", torch.randn(2, 4))
    result = profile(lambda: nn.Linear(4, 4), torch.randn(2, 4), backward=False, iters=1)  # a factory is called once
    assert result.agree


def test_recipe_arguments_are_checked():
    with pytest.raises(ValueError, match="recipe must be one of .*got 'llava'"):
        recipes.build("llava")
    with pytest.raises(ValueError, match="size must be one of .*got 'huge'"):
        recipes.build("whisper", "huge")
    with pytest.raises(ValueError, match="device must be 'cpu' or 'cuda'"):
        recipes.build("whisper", "tiny", device="tpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given where there is no GPU")
def test_cuda_without_a_gpu_is_a_message_not_a_traceback(capsys):
    with pytest.raises(ValueError, match="torch.cuda.is_available"):
        recipes.build("transformer_decoder", device="cuda")
    args = _parse(["--recipe", "transformer_decoder", "--device", "cuda"])
    assert cli.run(args) == 2
    err = capsys.readouterr().err
    assert "--device" in err and "no GPU" in err and "Traceback" not in err


def _parse(argv):
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    return parser.parse_args(argv)


def test_cli_runs_one_recipe_at_tiny_size(tmp_path, capsys):
    out, trace = tmp_path / "profile.csv", tmp_path / "trace.json"
    args = _parse(["--recipe", "transformer_decoder", "--size", "tiny", "--iters", "1", "--csv", str(out), "--trace", str(trace)])
    assert cli.run(args) == 0
    printed = capsys.readouterr().out
    assert "transformer_decoder (tiny)" in printed and "speed-up" in printed and "fwd+bwd" in printed
    rows = list(csv.DictReader(out.open()))
    assert list(rows[0]) == CSV_FIELDS and [r["mode"] for r in rows] == ["fwd", "fwd+bwd"]
    assert all(r["recipe"] == "transformer_decoder" and float(r["speedup"]) > 0 for r in rows)
    json.loads(trace.read_text())
    assert cli.run(_parse(["--recipe", "whisper", "--iters", "0"])) == 2


def test_readme_profile_table_is_the_committed_csv():
    import importlib.util
    import pathlib

    root = pathlib.Path(__file__).resolve().parent.parent
    spec = importlib.util.spec_from_file_location("make_readme", root / "benchmarks" / "make_readme.py")
    make_readme = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_readme)
    assert f"<!-- profile:start -->\n{make_readme.profile_section()}\n<!-- profile:end -->" in (root / "README.md").read_text(), \
        "the README's profile table is stale: run python benchmarks/make_readme.py"


def test_gradients_that_share_no_parameter_name_are_not_a_match():
    """fwd+bwd compares gradients by parameter name: none in common must not read as agreement."""
    torch.manual_seed(0)
    model = nn.Linear(4, 4)
    other = nn.Sequential(nn.Linear(4, 4))
    other[0].load_state_dict(model.state_dict())
    result = profile(model, torch.randn(3, 4), fused=other, iters=1)
    fwd, fwd_bwd = result.modes
    assert fwd.agree and not fwd_bwd.agree
