"""Every subcommand's help teaches: a description, every option's default and choices, two
examples; and the version."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

import pytest

import betasmooth as bs
from betasmooth.attack import ATTACK_DEFAULTS, GOALS, UNTARGETED_STEPS
from betasmooth.cli import build_parser, main


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


SUBCOMMANDS = sorted(_subparsers())


def test_every_command_is_covered() -> None:
    assert SUBCOMMANDS == sorted(
        ["attack", "curvature", "demo", "explain", "report", "sweep", "theorem"]
    )


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_help_has_description_defaults_and_two_examples(name) -> None:
    p = _subparsers()[name]
    text = p.format_help()
    # A description of at least one full sentence, above the options.
    description = p.description or ""
    assert len(description.split()) >= 20 and description.rstrip().endswith(".")
    assert description.split()[0] in text
    examples = re.findall(
        rf"^  (?:torchrun .* -m )?betasmooth {name}\b.*$", text.split("examples:")[1], re.M
    )
    assert len(examples) == 2, text
    for action in p._actions:
        if action.help == argparse.SUPPRESS or isinstance(action, argparse._HelpAction):
            continue
        if action.required or not action.option_strings:
            continue
        assert "default" in action.help, f"{name} {action.option_strings}: {action.help}"
        for choice in action.choices or ():
            assert str(choice) in action.help or str(choice) in text


def test_attack_help_lists_methods_goals_and_per_method_steps() -> None:
    text = " ".join(_subparsers()["attack"].format_help().split())
    for method, defaults in ATTACK_DEFAULTS.items():
        assert f"{method} {defaults['steps']}" in text
    # The untargeted goals' own default, which the help gave as the per-method one.
    assert f"; {UNTARGETED_STEPS} for the untargeted goals topk and center)" in text
    for goal in GOALS:
        assert goal in text
    explain_text = " ".join(_subparsers()["explain"].format_help().split())
    for method in bs.METHODS:
        assert method in explain_text
    # What each --method takes, as runs.attack_methods and explain_methods check it.
    assert "captum:NAME or a method registered in a model file; or all (every" in explain_text
    method_help = text[text.index("--method METHOD comma") : text.index("--steps STEPS attack")]
    assert method_help.endswith(
        ", a method registered in a model file; "
        "or all (these, with the paper's budgets, and any the model file registers) "
    )
    assert "captum:" not in method_help  # Captum's maps are not differentiable: not attacked


def test_version(capsys) -> None:
    with pytest.raises(SystemExit) as exit:
        main(["--version"])
    assert exit.value.code == 0
    assert capsys.readouterr().out == f"betasmooth {bs.__version__}\n"


@pytest.mark.parametrize("name", ["attack", "explain", "curvature"])
@pytest.mark.parametrize("spelling", ["-n", "--images", "--n"])
def test_every_spelling_of_the_image_count_is_the_same_option(name, spelling) -> None:
    # --n is the spelling of the command-line contract; -n the one torchrun lets through.
    inputs = ["--model", "digits-cnn", "--data", "digits", "--out", "run"]
    head = {
        "attack": [*inputs, "--method", "gradient"],
        "explain": [*inputs, "--method", "gradient"],
        "curvature": inputs,
    }[name]
    assert build_parser().parse_args([name, *head, spelling, "7"]).n == 7


@pytest.mark.parametrize(
    "words", [["0.485", "0.456", "0.406"], ["0.485,0.456,0.406"], ["0.485,0.456", "0.406"]]
)
def test_mean_and_std_take_spaces_or_commas_as_other_lists_do(words) -> None:
    # --betas and --method are comma lists; a per-channel mean written so is the same mean.
    head = ["explain", "--model", "digits-cnn", "--data", "digits", "--method", "gradient"]
    args = build_parser().parse_args([*head, "--out", "x", "--mean", *words, "--std", *words])
    assert args.mean == args.std == [0.485, 0.456, 0.406]


def test_submodules_are_attributes_of_the_package_before_their_import():
    # The README's bs.pretrained.checkpoint_path(...) after a plain `import betasmooth`.
    code = (
        "import betasmooth as bs, sys; "
        "assert 'betasmooth.pretrained' not in sys.modules; "
        "print(bs.pretrained.checkpoint_path('torchvision:resnet18').name, bs.theory.__name__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["resnet18-f37072fd.pth", "betasmooth.theory"]
    with pytest.raises(AttributeError, match="module 'betasmooth' has no attribute 'nothing'"):
        bs.nothing  # noqa: B018


def test_dir_offers_every_public_name_and_submodule_but_not_the_packages_own_imports():
    # A notebook's tab completion lists dir(bs): the lazy bs.load_data and bs.manipulate too.
    names = set(dir(bs))
    submodules = {p.stem for p in Path(bs.__file__).parent.iterdir() if p.stem[0] != "_"}
    assert {"load_data", "load_model", "manipulate", "curvature", "quantus_explain"} <= names
    public = {n for n in names if not n.startswith("_")}
    assert public == set(bs.__all__) | (submodules - {"weights"})
    assert {"__version__", "__file__", "__path__", "__doc__"} <= names
    assert not names & {"importlib", "pkgutil", "annotations"}
    assert all(hasattr(bs, name) for name in names)


def test_probing_the_package_for_main_does_not_run_the_command_line():
    code = (
        "import betasmooth as bs, sys; "
        "print(hasattr(bs, '__main__'), 'betasmooth.__main__' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


@pytest.mark.parametrize("name", ["attack", "explain"])
def test_every_option_example_of_the_help_runs(name, tmp_path, capsys) -> None:
    # The help's --option examples are options that command takes: explain's
    # Occlusion is no method attack can differentiate, so attack shows others.
    action = next(a for a in _subparsers()[name]._actions if "--option" in a.option_strings)
    examples = re.findall(r"([\w:]+)\.(\w+)=(\S+?)(?:,\s|\s\()", action.help)
    assert len(examples) == 3, action.help
    for k, (method, option, value) in enumerate(examples):
        argv = [name, "--model", "photos-cnn", "--data", "photos", "--no-progress"]
        argv += ["--method", method, "--option", f"{method}.{option}={value}"]
        # An attack needs two images (a target map is another image's).
        argv += ["-n", "2", "--steps", "1"] if name == "attack" else ["-n", "1"]
        if method == "captum:Occlusion":
            # At Captum's stride of one pixel the window visits every pixel: 3,249
            # forward passes of one image. A stride of a window's width takes the
            # example's option as given and leaves 64 passes.
            argv += ["--option", "captum:Occlusion.strides=8"]
        assert main([*argv, "--out", str(tmp_path / str(k))]) == 0, capsys.readouterr().err


@pytest.mark.parametrize("name", ["attack", "explain"])
def test_the_example_a_malformed_option_is_shown_runs(name, tmp_path, capsys) -> None:
    # The error of a malformed --option shows one example: an option that every
    # command with --option takes (Occlusion is no method attack can differentiate).
    argv = [name, "--model", "photos-cnn", "--data", "photos", "--no-progress"]
    with pytest.raises(SystemExit) as stop:
        main([*argv, "--option", "steps16", "--out", str(tmp_path / "bad")])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    found = re.search(r"expected METHOD\.NAME=VALUE, e\.g\. (\S+); got 'steps16' \(see", err)
    assert found, err
    example = found.group(1)
    argv += ["--method", example.split(".")[0], "--option", example]
    argv += ["-n", "2", "--steps", "1"] if name == "attack" else ["-n", "1"]
    assert main([*argv, "--out", str(tmp_path / "run")]) == 0, capsys.readouterr().err
