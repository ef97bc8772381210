"""Every MagiCapture setting is reachable from `capture train`: --config FILE (a run's own config.yaml repeats the
run), --set KEY=VALUE, and the typed flags (--lr, --ti-lr, --lora-rank, --lambda-attn, --lambda-id)."""

from __future__ import annotations

import yaml
from safetensors.torch import load_file

from magicstudio.cli.main import main

SMALL = ["--preset", "smoke", "--ti-steps", "2", "--lora-steps", "2", "--resolution", "64", "--deterministic", "-q"]


def _args(demo_sets, out, *extra):
    return ["capture", "train", "--source", str(demo_sets[0]), "--reference", str(demo_sets[1]), "--out", str(out),
            *SMALL, *extra]


def _error(capsys) -> str:
    err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("WARNING")]
    assert len(err) == 1 and err[0].startswith("error:"), err
    return err[0]


def test_set_and_flags_reach_the_config_and_a_config_file_repeats_the_run(demo_sets, tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(_args(demo_sets, a, "--set", "lambda_attn=1.5", "--set", "use_id=false", "--lora-rank", "2",
                      "--lr", "3e-3", "--lambda-id", "0.5")) == 0
    cfg = yaml.safe_load((a / "config.yaml").read_text())
    assert cfg["lambda_attn"] == 1.5 and cfg["use_id"] is False and cfg["lora_rank"] == 2 and cfg["lora_alpha"] == 2.0
    assert cfg["lora_lr"] == 3e-3 and cfg["lambda_id"] == 0.5 and cfg["preset"] == "smoke"
    # the run's own config.yaml as input, nothing else: the same settings, inputs and weights
    assert main(["capture", "train", "--config", str(a / "config.yaml"), "--out", str(b), "-q"]) == 0
    again = yaml.safe_load((b / "config.yaml").read_text())
    assert {k: v for k, v in again.items()} == cfg
    wa, wb = load_file(str(a / "pytorch_lora_weights.safetensors")), load_file(str(b / "pytorch_lora_weights.safetensors"))
    assert wa.keys() == wb.keys() and all((wa[k] == wb[k]).all() for k in wa)
    # flags win over the file
    c = tmp_path / "c"
    assert main(["capture", "train", "--config", str(a / "config.yaml"), "--out", str(c), "-q", "--lambda-attn", "0.25",
                 "--set", "lambda_id=0.75"]) == 0
    third = yaml.safe_load((c / "config.yaml").read_text())
    assert third["lambda_attn"] == 0.25 and third["lambda_id"] == 0.75 and third["lora_rank"] == 2


def test_unknown_keys_and_wrong_types_are_one_line(demo_sets, tmp_path, capsys):
    assert main(_args(demo_sets, tmp_path / "r1", "--set", "lamda_attn=1")) == 2
    line = _error(capsys)
    assert "lamda_attn" in line and "accepted" in line and "lambda_attn" in line
    assert main(_args(demo_sets, tmp_path / "r2", "--set", "lora_rank=abc")) == 2
    assert "lora_rank" in _error(capsys)
    assert main(_args(demo_sets, tmp_path / "r3", "--set", "novalue")) == 2
    assert "KEY=VALUE" in _error(capsys)
    bad = tmp_path / "bad.yaml"
    bad.write_text("{{{: nope")
    assert main(["capture", "train", "--config", str(bad), "--out", str(tmp_path / "r4")]) == 2
    assert "bad.yaml" in _error(capsys)
    listy = tmp_path / "list.yaml"
    listy.write_text("- a\n- b\n")
    assert main(["capture", "train", "--config", str(listy), "--out", str(tmp_path / "r5")]) == 2
    assert "list.yaml" in _error(capsys)
    toml = tmp_path / "s.toml"
    toml.write_text('preset = "smoke"\nnope = 1\n')
    assert main(["capture", "train", "--config", str(toml), "--source", str(demo_sets[0]), "--reference",
                 str(demo_sets[1]), "--out", str(tmp_path / "r6")]) == 2
    assert "nope" in _error(capsys)
    assert main(["capture", "train", "--out", str(tmp_path / "r7")]) == 2
    assert "--source" in _error(capsys)
    for k in range(1, 8):
        assert not (tmp_path / f"r{k}" / "config.yaml").exists()
