"""The command line: help, version, exit codes, JSON output and `qformer info`'s figures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from qformer_cli.cli import app

ROOT = Path(__file__).resolve().parents[2]
runner = CliRunner()


def _info_json(*args: str) -> dict:
    result = runner.invoke(app, ["info", *args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_info_reports_the_papers_parameter_counts():
    report = _info_json("--config", str(ROOT / "configs" / "blip2_vitg_opt2.7b.yaml"))
    params, totals = report["parameters"], report["totals"]
    assert params["qformer_encoder"]["parameters"] == 105_137_664  # transformers' Blip2QFormerModel
    assert round(totals["stage2"]["trainable"] / 1e6, 2) == 107.13
    assert round(params["vision_encoder"]["frozen"] / 1e6, 2) == 985.95
    assert round(params["llm"]["frozen"] / 1e6, 1) == 2651.6
    assert round(totals["stage1"]["trainable"] / 1e6, 1) == 186.7
    assert report["forward_flops_per_sample"]["image_tokens"] == 257
    # bf16 frozen weights take half the fp32 bytes; the trainable part stays fp32 either way.
    memory = report["memory_bytes"]
    frozen = totals["stage2"]["frozen"]
    assert memory["fp32"]["inference"] - memory["bf16"]["inference"] == frozen * 2


def test_info_table_goes_to_stdout_without_json():
    result = runner.invoke(
        app, ["info", "--config", str(ROOT / "configs" / "blip2_vitg_opt2.7b.yaml")]
    )
    assert result.exit_code == 0
    assert "105,137,664" in result.stdout


def test_usage_errors_exit_2_with_one_line():
    result = runner.invoke(app, ["info", "--set", "train.nope=1"])
    assert result.exit_code == 2
    assert (
        result.stderr.strip().splitlines() == [result.stderr.strip().splitlines()[0]]
        and "unknown config key 'train.nope'" in result.stderr
    )
    assert "Traceback" not in result.output


def test_missing_config_file_is_a_usage_error(tmp_path: Path):
    result = runner.invoke(app, ["info", "--config", str(tmp_path / "absent.yaml")])
    assert result.exit_code == 2
    assert "absent.yaml" in result.stderr


def test_missing_backbone_is_a_one_line_error(tmp_path: Path):
    result = runner.invoke(app, ["info", "--set", f"model.vision.model={tmp_path}/nowhere"])
    assert result.exit_code == 2
    assert "backbone directory not found" in result.stderr and "Traceback" not in result.output


def test_help_lists_only_working_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    listed = {
        cmd.name or cmd.callback.__name__.replace("_", "-") for cmd in app.registered_commands
    }
    for name in listed:
        assert name in result.stdout
    assert listed == {
        "info",
        "pretrain-stage1",
        "finetune",
        "pretrain-stage2",
        "extract-features",
        "eval-retrieval",
        "caption",
        "eval-caption",
        "eval-vqa",
        "ask",
        "match",
        "convert",
        "export-onnx",
    }  # each has its own tests


def test_version_and_module_entry_point():
    completed = subprocess.run(
        [sys.executable, "-m", "qformer_cli", "--version"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert completed.stdout.startswith("qformer ")


MODEL = str(ROOT)  # exists; the settings are refused before any model is looked for


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["pretrain-stage1", "--max-steps", "-5"], "train.max_steps = -5: must be >= 0"),
        (["pretrain-stage1", "--batch-size", "0"], "train.batch_size = 0: must be >= 1"),
        (["pretrain-stage2", "--set", "train.lr=-1"], "train.lr = -1.0: must be > 0"),
        (["pretrain-stage1", "--device", "tpu"], "--device tpu: choose auto | cpu | cuda"),
        (["caption", "--model", MODEL, "--num-beams", "0"], "generate.num_beams = 0: must be >= 1"),
        (
            ["eval-vqa", "--model", MODEL, "--max-new-tokens", "-1"],
            "vqa.max_new_tokens = -1: must be >= 1",
        ),
        (
            ["eval-vqa", "--model", MODEL, "--set", "vqa.top_p=2"],
            "vqa.top_p = 2.0: must be > 0 and <= 1",
        ),
        (
            ["caption", "--model", MODEL, "--min-new-tokens", "50"],
            "generate.min_new_tokens = 50: more than generate.max_new_tokens = 30",
        ),
    ],
)
def test_out_of_range_settings_are_refused_before_anything_loads(
    args: list[str], message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # a default runs/<command>-<time> would land here
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines() == [f"error: {message}"]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "args",
    [
        ["caption", "--model", MODEL, "--batch-size", "0"],
        ["eval-retrieval", "--model", MODEL, "--k", "0"],
        ["extract-features", "--out", "x", "--shard-size", "0"],
    ],
)
def test_counts_below_one_are_usage_errors(args: list[str]) -> None:
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    [line] = result.output.strip().splitlines()  # one line, as every other error
    assert line.startswith(f"error: Invalid value for '{args[-2]}'")
    assert line.endswith(f"(see qformer {args[0]} -h)")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["caption", "--bogus"], "No such option: --bogus"),
        (["caption"], "Missing option '--model'"),
        (["no-such-command"], "No such command 'no-such-command'"),
    ],
)
def test_click_usage_errors_are_one_line(args: list[str], message: str) -> None:
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    [line] = result.output.strip().splitlines()
    assert line.startswith(f"error: {message}")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["pretrain-stage2", "--llm", "sample_data/backbones/bert"],
            "a bert model is not a causal",
        ),
        (
            ["pretrain-stage1", "--vision-model", "sample_data/backbones/opt"],
            "not a vision encoder",
        ),
    ],
)
def test_backbones_of_the_wrong_kind_are_refused_from_their_configs(
    args: list[str], message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    args = [str(ROOT / arg) if arg.startswith("sample_data") else arg for arg in args]
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    [line] = result.output.strip().splitlines()  # before any weights load: no init report
    assert line.startswith("error: model.") and message in line
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", [[], ["caption"], ["pretrain-stage1"], ["eval-vqa"]])
def test_dash_h_is_help(command: list[str]) -> None:
    short, long = runner.invoke(app, [*command, "-h"]), runner.invoke(app, [*command, "--help"])
    assert short.exit_code == long.exit_code == 0
    assert short.output == long.output and "Usage:" in short.output


@pytest.mark.parametrize(
    ("args", "option"),
    [
        (["caption", "--model", "{missing}"], "--model"),
        (["caption", "--model", ".", "--images", "{missing}"], "--images"),
        (["eval-caption", "--predictions", "{missing}"], "--predictions"),
        (["eval-vqa", "--model", ".", "--questions", "{missing}"], "--questions"),
        (["eval-vqa", "--predictions", ".", "--annotations", "{missing}"], "--annotations"),
        (["eval-retrieval", "--model", "{missing}"], "--model"),
        (["export-onnx", "--model", "{missing}", "--out", "o"], "--model"),
        (["convert", "out", "--model", "{missing}"], "--model"),
        (["pretrain-stage2", "--init", "{missing}"], "--init"),
        (["pretrain-stage1", "--data", "{missing}"], "data.train (--data)"),
        (["pretrain-stage1", "--features", "{missing}"], "data.features (--features)"),
        (["pretrain-stage1", "--resume", "{missing}"], "--resume"),
    ],
)
def test_a_missing_input_is_a_usage_error_naming_its_option(
    args: list[str], option: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    missing = str(tmp_path / "nothing-here.json")
    result = runner.invoke(app, [arg.replace("{missing}", missing) for arg in args])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {option} {missing}: no such"), lines
    assert list(tmp_path.iterdir()) == []


def test_every_option_has_help_and_every_command_ends_with_examples_that_parse():
    """Each option explains itself; each command's help ends with examples whose flags are the
    command's own (an example naming a flag that was renamed fails here)."""
    import shlex

    import typer.main

    from qformer_cli.cli import EXAMPLES

    group = typer.main.get_command(app)
    assert set(EXAMPLES) == set(group.commands)
    for name, command in group.commands.items():
        for param in command.params:
            if param.param_type_name == "option":
                assert getattr(param, "help", None), f"{name} {param.opts[0]}: no help"
        shown = runner.invoke(app, [name, "-h"], env={"COLUMNS": "200"}).stdout
        assert shown.rstrip().endswith(EXAMPLES[name][-1].strip().rstrip("\\").rstrip())
        known = {opt for param in command.params for opt in param.opts}
        examples = "\n".join(EXAMPLES[name]).replace("\\\n", " ").splitlines()
        for part in (part for example in examples for part in example.split("&&")):
            part_words = shlex.split(part)  # "a && b": the part that runs this command
            if name not in part_words:
                continue
            after = part_words[part_words.index(name) + 1 :]
            flags = [word for word in after if word.startswith("--")]
            assert set(flags) <= known, (name, set(flags) - known)


@pytest.mark.parametrize("native", [False, True])
def test_precision_auto_takes_bf16_only_where_the_cpu_computes_it(
    native: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The built-in precision: fp32 on a CPU without AVX-512-BF16 / AMX (where bf16 would be
    emulated, ~100x slower), bf16 on one with them; the run config records the choice. The
    CPU answers as such a CPU does, flags and measured matmul rates (an Intel Xeon with AMX:
    218 and 392 GFLOP/s), on any machine: on an AVX2-only one the speed check would refuse."""
    import torch

    from qformer_cli import runtime

    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: native)
    rates = {torch.float32: 218e9, torch.bfloat16: 392e9}
    monkeypatch.setattr(runtime, "matmul_rate", lambda device, dtype, size=0: rates[dtype])
    out = tmp_path / "run"
    args = ["pretrain-stage1", "--precision", "auto", "--max-steps", "1", "--batch-size", "8"]
    result = runner.invoke(app, [*args, "--out", str(out)])
    assert result.exit_code == 0, result.output
    expected = "bf16" if native else "fp32"
    assert f"precision auto: {expected} (" in result.output
    recorded = json.loads((out / "run_config.json").read_text())
    assert recorded["train"]["precision"] == expected


def test_precision_auto_on_cuda_follows_the_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """bf16 only where the GPU has it in hardware: torch's check also counts a GPU that
    emulates it (a V100) unless told not to."""
    import torch

    from qformer_cli import runtime
    from qformer_cli.runtime import resolve_precision

    asked = []
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda **kw: asked.append(kw) or False)
    assert resolve_precision("auto", torch.device("cuda"))[0] == "fp32"
    assert asked == [{"including_emulation": False}]
    for supported, expected in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(runtime, "cuda_has_native_bf16", lambda supported=supported: supported)
        assert resolve_precision("auto", torch.device("cuda"))[0] == expected
    assert resolve_precision("fp16", torch.device("cuda")) == ("fp16", "as given")


def test_bf16_on_a_cpu_that_emulates_it_is_refused_unless_allowed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An AVX2-only CPU runs bf16 matmuls ~100x slower than fp32: measured before any weights
    load (here the measurement answers as such a CPU's did: 1 vs 161 GFLOP/s)."""
    import torch

    from qformer_cli import runtime

    rates = {torch.float32: 161e9, torch.bfloat16: 1e9}
    monkeypatch.setattr(runtime, "matmul_rate", lambda device, dtype: rates[dtype])
    args = ["pretrain-stage1", "--precision", "bf16", "--max-steps", "1", "--batch-size", "8"]
    refused = runner.invoke(app, [*args, "--out", str(tmp_path / "a")])
    assert refused.exit_code == 2, refused.output
    [line] = refused.output.strip().splitlines()  # no init report: nothing loaded
    assert "bf16 matmuls run at 1.0 GFLOP/s against 161.0 fp32" in line and "~161x" in line
    allowed = runner.invoke(
        app, [*args, "--out", str(tmp_path / "b"), "--set", "train.allow_slow_precision=true"]
    )
    assert allowed.exit_code == 0, allowed.output
