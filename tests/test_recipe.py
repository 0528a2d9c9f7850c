"""The recipe is validated at the door: precise errors, exit code 2, nothing written."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from byoai.cli import app
from byoai.recipe import RecipeError, load_recipe
from byoai.recipes import RECIPES_DIR

runner = CliRunner()


def test_demo_recipe_is_valid_and_resolves_targets():
    recipe = load_recipe(RECIPES_DIR / "demo.yaml")
    assert recipe.model.kind == "embedded"
    assert [t.name for t in recipe.targets] == ["cpu-x86"]
    assert recipe.targets[0].device == "cpu"
    gptq = next(v for v in recipe.variants if v.technique == "gptq")
    # defaults are filled in by the technique's typed config
    assert gptq.stages[0].params["group_size"] == 64 and gptq.stages[0].params["actorder"] == "static"


def test_sha_ignores_formatting_but_not_content(write_recipe):
    path = write_recipe()
    original = path.read_text()
    sha = load_recipe(path).sha()
    path.write_text("# a comment\n" + original.replace(": ", ":   "))
    assert load_recipe(path).sha() == sha
    path.write_text(original.replace("seed: 0", "seed: 1"))
    assert load_recipe(path).sha() != sha


@pytest.mark.parametrize(
    ("section", "value", "expected"),
    [
        ("variants", "[{name: x, technique: awq-typo}]", "variants[0].technique: unknown technique 'awq-typo'; allowed: "),
        ("variants", "[{name: x, technique: gptq, params: {bits: 5}}]", "params.bits: Input should be 2, 3, 4 or 8"),
        ("variants", "[{name: x, technique: rtn, params: {group: 64}}]", "params.group: Extra inputs are not permitted"),
        ("variants", "[{name: a, technique: rtn}, {name: a, technique: gptq}]", "duplicate name(s) ['a']"),
        ("variants", "[]", "variants: give at least one"),
        ("targets", "[tpu-v9]", "unknown target 'tpu-v9'; allowed: cpu-x86, cpu-x86-avx2, cuda-h100"),
        ("model", "{kind: local, path: ./no-such-model}", "no-such-model is not a model folder (no config.json)"),
        ("model", "{kind: hub, id: not a repo}", "model.id"),
        ("calibration", "{source: {kind: file, path: missing.txt}}", "calibration.source.path: text file"),
        ("evaluation", "{perplexity: {source: {kind: builtin, split: test}, max_tokens: 64, seq_len: 128}}", "max_tokens (64) must be at least seq_len (128)"),
        ("promotion", "{objective: cheapest}", "promotion.objective"),
    ],
)
def test_invalid_recipe_names_the_field(write_recipe, section, value, expected):
    path = write_recipe(**{section: value})
    with pytest.raises(RecipeError) as caught:
        load_recipe(path)
    assert str(path) in str(caught.value)
    assert expected in str(caught.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(RecipeError, match="file not found"):
        load_recipe(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(bad)


def test_recipe_folder_targets_shadow_shipped_profiles(write_recipe, workdir):
    (workdir / "targets").mkdir()
    (workdir / "targets" / "edge-box.yaml").write_text("name: edge-box\ndevice: cpu\ndtype: bfloat16\nthreads: 1\ntechniques: [baseline, rtn]\n")
    recipe = load_recipe(write_recipe(targets="[edge-box]"))
    assert recipe.targets[0].dtype == "bfloat16" and recipe.targets[0].threads == 1
    (workdir / "targets" / "edge-box.yaml").write_text("name: edge-box\ndevice: fpga\ntechniques: [sparsify]\n")
    with pytest.raises(RecipeError) as caught:
        load_recipe(write_recipe(targets="[edge-box]"))
    assert "edge-box.yaml" in str(caught.value) and "device" in str(caught.value) and "sparsify" in str(caught.value)


def test_cli_exit_code_2_and_nothing_written(write_recipe, workdir):
    path = write_recipe(variants="[{name: x, technique: nope}]")
    result = runner.invoke(app, ["run", str(path)])
    assert result.exit_code == 2
    assert "unknown technique 'nope'" in result.output
    assert not (workdir / ".byoai").exists()
    assert runner.invoke(app, ["validate", str(path)]).exit_code == 2
    assert runner.invoke(app, ["validate", str(write_recipe())]).exit_code == 0


def test_chains_validate_each_stage(write_recipe):
    chain = "[{name: sp-then-q, stages: [{technique: rtn, params: {bits: 8}}, {technique: gptq, params: {bits: 4, group_size: 32}}]}]"
    recipe = load_recipe(write_recipe(variants=chain))
    variant = recipe.variants[0]
    assert variant.technique == "rtn+gptq"
    assert variant.flat_params()["stage1.group_size"] == 32 and variant.flat_params()["stage0.technique"] == "rtn"
    bad = "[{name: x, stages: [{technique: rtn}, {technique: gptq, params: {bits: 7}}]}]"
    with pytest.raises(RecipeError, match=r"variants\[0\]\.stages\[1\]: invalid params for technique 'gptq'"):
        load_recipe(write_recipe(variants=bad))
    both = "[{name: x, technique: rtn, stages: [{technique: rtn}]}]"
    with pytest.raises(RecipeError, match="either technique"):
        load_recipe(write_recipe(variants=both))


def test_broken_inputs_fail_at_the_door_within_seconds(write_recipe, workdir, tiny_model):
    """A non-GGUF .gguf, a config.json that is not JSON, an empty or too short text: exit 2 naming
    the field, before anything runs (no MLflow store, no retries)."""
    import shutil
    import time

    fake = workdir / "model.gguf"
    fake.write_text("not a gguf")
    broken = workdir / "broken"
    shutil.copytree(tiny_model, broken)
    (broken / "config.json").write_text("{not json")
    custom = workdir / "custom-code"
    shutil.copytree(tiny_model, custom)
    config = json.loads((custom / "config.json").read_text())
    (custom / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoModelForCausalLM": "modeling_x.XForCausalLM"}}))
    (workdir / "empty.txt").write_text("\n  \n")
    (workdir / "short.txt").write_text("a few words only")
    cases = [
        ({"model": f"{{kind: gguf, path: {fake}}}"}, "model.path", "is not a GGUF file"),
        ({"model": f"{{kind: local, path: {broken}}}"}, "model.path", "config.json is not valid JSON"),
        ({"model": f"{{kind: local, path: {custom}}}"}, "model", "trust_remote_code: true"),
        ({"calibration": "{source: {kind: file, path: empty.txt}, n_samples: 2, seq_len: 32}"}, "calibration.source.path", "is empty"),
        ({"calibration": "{source: {kind: file, path: short.txt}, n_samples: 2, seq_len: 32}"}, "calibration.source", "fewer than the 33 tokens one window needs (calibration.seq_len)"),
    ]
    for sections, field, message in cases:
        started = time.perf_counter()
        for command in ("validate", "run"):
            result = runner.invoke(app, [command, str(write_recipe(**sections))])
            assert result.exit_code == 2, (command, result.output)
            assert field in result.output and message in result.output, result.output
        assert time.perf_counter() - started < 60  # no retries: the old behaviour waited 5 + 30 + 120 s
    assert not (workdir / ".byoai").exists()


def test_remote_code_runs_only_when_the_recipe_says_so(write_recipe, workdir, tiny_model):
    import shutil

    from byoai.settings import hf_load_kwargs, remote_code_policy

    custom = workdir / "custom-code"
    shutil.copytree(tiny_model, custom)
    config = json.loads((custom / "config.json").read_text())
    (custom / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoModelForCausalLM": "modeling_x.XForCausalLM"}}))
    recipe = load_recipe(write_recipe(model=f"{{kind: local, path: {custom}, trust_remote_code: true}}"))
    assert recipe.model.trust_remote_code is True
    assert load_recipe(write_recipe()).model.trust_remote_code is False  # the embedded GGUF carries no code
    assert hf_load_kwargs() == {"trust_remote_code": False}
    with remote_code_policy(recipe.model.trust_remote_code):
        assert hf_load_kwargs() == {"trust_remote_code": True}
    assert hf_load_kwargs() == {"trust_remote_code": False}
