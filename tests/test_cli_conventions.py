"""CLI conventions: --flag/--no-flag booleans, full help text at 80 columns, --version, every backend listed,
the capture train flags reaching the config."""

from __future__ import annotations

import click
import pytest
import typer

from magicstudio import __version__
from magicstudio.cli.main import _register, app, main


def _commands():
    _register()
    root = typer.main.get_command(app)

    def walk(cmd, path):
        if isinstance(cmd, click.Group):
            for name, sub in cmd.commands.items():
                yield from walk(sub, path + [name])
        else:
            yield path, cmd

    return list(walk(root, []))


def test_every_boolean_flag_has_a_negative_form():
    missing = []
    for path, cmd in _commands():
        for p in cmd.params:
            if isinstance(p, click.Option) and p.is_flag and p.name != "help" and not p.secondary_opts:
                missing.append(f"{' '.join(path)} {p.opts[0]}")
    assert not missing, missing


def test_help_at_80_columns_shows_every_word(monkeypatch, capsys):
    """Nothing cut: every word of every option's help appears in the rendered help (no "…"), and no `<bool>`."""
    monkeypatch.setenv("COLUMNS", "80")
    for path, cmd in _commands():
        capsys.readouterr()
        assert main([*path, "--help"]) == 0
        text = " ".join(capsys.readouterr().out.split())
        assert "…" not in text and "<bool>" not in text, path
        flat = text.replace(" ", "")
        for p in cmd.params:
            for word in (p.help or "").split() if isinstance(p, click.Option) else []:
                assert word in flat, (path, p.name, word)


def test_backends_and_choices_are_listed(capsys):
    capsys.readouterr()
    main(["evaluate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for word in ("toyworld", "dreamsim", "clip_t", "insightface:PATH.onnx", "arcface:PATH"):
        assert word in text, word
    main(["bench", "--help"])
    assert "toyworld" in capsys.readouterr().out


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"magicstudio {__version__}"


def test_capture_train_flags_reach_the_config(monkeypatch, tmp_path):
    import magicstudio.methods.magicapture as mc

    seen = {}

    def fake(source, reference, out, cfg, resume=False, progress=True):
        seen["cfg"] = cfg
        from magicstudio.training.runs import RunDir

        return RunDir(out)

    monkeypatch.setattr(mc, "run_training", fake)
    base = ["capture", "train", "--source", str(tmp_path), "--reference", str(tmp_path), "-o", str(tmp_path / "r"),
            "--preset", "smoke", "-q"]
    assert main(base + ["--no-ar", "--no-composed", "--no-id", "--gradient-checkpointing", "--cache-latents",
                        "--sample-every", "5", "--sample-prompt", "a <v1> person", "--sample-prompt", "a dog"]) == 0
    cfg = seen["cfg"]
    assert (cfg.use_ar, cfg.use_composed, cfg.use_id) == (False, False, False)
    assert cfg.gradient_checkpointing and cfg.cache_latents
    assert cfg.sample_every == 5 and cfg.sample_prompts == ["a <v1> person", "a dog"]
    assert main(base + ["--ar", "--no-gradient-checkpointing"]) == 0
    assert seen["cfg"].use_ar and not seen["cfg"].gradient_checkpointing and seen["cfg"].use_id
    assert seen["cfg"].sample_prompts == []
