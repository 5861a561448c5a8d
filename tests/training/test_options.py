"""Options declared once: a dataclass makes the command line's flags and reads a job's plain dict."""

import argparse
from dataclasses import dataclass

import pytest

from lorlib_ui.core.errors import LorlibError
from lorlib_ui.training.building import BuildOptions
from lorlib_ui.training.config import TrainConfig
from lorlib_ui.training.options import add_options, from_mapping, from_namespace, option


@dataclass(frozen=True, kw_only=True)
class Toy:
    folders: tuple[str, ...] = option(positional=True, metavar="DIR")
    k: int = option(help="how many")
    rate: float = option(0.5, "a rate")
    name: str | None = option(None, "a name", flags=("--name", "-n"))
    mode: str = option("fast", "how", choices=("fast", "slow"))
    quiet: bool = option(False, "say less")
    shared: bool = option(True, "no shared one")
    words: tuple[str, ...] | None = option(None, "comma-separated words", group="pick")
    letters: tuple[str, ...] | None = option(None, "comma-separated letters", group="pick")
    shots: tuple[int, ...] = option((8,), "comma-separated numbers")
    tasks: str | tuple[str, ...] = option("all", "all, or comma-separated", sets=("all", "seen"))
    secret: int = option(3, internal=True)

    def __post_init__(self):
        if self.k < 1:
            raise LorlibError(f"k must be positive, got {self.k}")


def _parser() -> argparse.ArgumentParser:
    class Parser(argparse.ArgumentParser):
        def error(self, message):
            raise LorlibError(message)

    parser = Parser(prog="toy")
    add_options(parser, Toy)
    return parser


def test_flags_carry_the_fields_names_types_defaults_and_help():
    actions = {a.dest: a for a in _parser()._actions if a.dest != "help"}
    assert set(actions) == {f for f in Toy.__dataclass_fields__ if f != "secret"}  # internal: no flag
    assert actions["folders"].option_strings == [] and actions["folders"].nargs == "+"
    assert actions["k"].required and actions["k"].help == "how many"
    assert actions["name"].option_strings == ["--name", "-n"] and actions["mode"].choices == ("fast", "slow")
    assert actions["quiet"].option_strings == ["--quiet"] and actions["quiet"].default is False
    assert actions["shared"].option_strings == ["--no-shared"] and actions["shared"].default is True
    parsed = from_namespace(Toy, _parser().parse_args(["a", "b", "--k", "2", "--no-shared", "--shots", "32, 8"]))
    assert parsed == Toy(folders=("a", "b"), k=2, shared=False, shots=(32, 8))
    parsed = from_namespace(Toy, _parser().parse_args(["a", "--k=1", "--tasks", "seen", "--words", "x,,y", "-n", "z"]))
    assert (parsed.tasks, parsed.words, parsed.name) == ("seen", ("x", "y"), "z")
    assert from_namespace(Toy, _parser().parse_args(["a", "--k=1", "--tasks", "t1,t2"])).tasks == ("t1", "t2")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["a", "--k", "0"], "k must be positive, got 0"),  # the dataclass's own check
        (["a"], "the following arguments are required: --k"),
        (["a", "--k", "two"], "invalid int value: 'two'"),
        (["a", "--k", "1", "--mode", "odd"], "invalid choice: 'odd'"),
        (["a", "--k", "1", "--shots", "8,x"], "--shots takes whole numbers separated by commas, got '8,x'"),
        (["a", "--k", "1", "--words", "x", "--letters", "y"], "not allowed with argument --words"),
    ],
)
def test_bad_flags_are_one_line(argv, message):
    with pytest.raises(LorlibError, match="^[^\n]*$") as info:
        from_namespace(Toy, _parser().parse_args(argv))
    assert message in str(info.value)


def test_a_dict_is_read_with_its_types():
    toy = from_mapping(Toy, {"folders": ["a"], "k": 2, "rate": 1, "tasks": ["t"], "shots": [4, 2]}, "toy job")
    assert toy == Toy(folders=("a",), k=2, rate=1.0, tasks=("t",), shots=(4, 2))
    assert isinstance(toy.rate, float) and from_mapping(Toy, {"folders": [], "k": 1, "name": None}, "toy").name is None


@pytest.mark.parametrize(
    ("mapping", "message"),
    [
        ({"k": 1, "folders": [], "kk": 2}, "toy job: unknown option 'kk'; the options are folders, k, "),
        ({"k": 1, "folders": [], "secret": 4}, "toy job: unknown option 'secret'"),  # internal: not a key
        ({"k": "1", "folders": []}, "toy job: option 'k' must be an integer, got '1'"),
        ({"k": True, "folders": []}, "toy job: option 'k' must be an integer, got True"),
        ({"k": 1.5, "folders": []}, "toy job: option 'k' must be an integer, got 1.5"),
        ({"k": 1, "folders": "a"}, "toy job: option 'folders' must be a list of strings, got 'a'"),
        ({"k": 1, "folders": [], "shots": [8, "9"]}, "option 'shots' must be a list of integers, got [8, '9']"),
        ({"k": 1, "folders": [], "quiet": "yes"}, "option 'quiet' must be true or false, got 'yes'"),
        ({"k": 1, "folders": [], "k2": 1, "rate": None}, "unknown option 'k2'"),
        ({"k": 1, "folders": [], "rate": None}, "option 'rate' must be a number, got None"),
        ({"k": 1, "folders": [], "tasks": 3}, "option 'tasks' must be a string or a list of strings, got 3"),
        ({"folders": []}, "toy job: option 'k' is required"),
        ({"k": 0, "folders": []}, "k must be positive, got 0"),
        (["k"], "toy job: options must be a dict, got list"),
        ({"k": 1, "folders": [], "x" * 500: 1}, "unknown option 'xxxxxxxx"),
    ],
)
def test_a_bad_dict_is_refused_in_one_line(mapping, message):
    with pytest.raises(LorlibError) as info:
        from_mapping(Toy, mapping, "toy job")
    assert message in str(info.value) and "\n" not in str(info.value) and len(str(info.value)) < 300


def test_a_build_jobs_dict_holds_two_dataclasses():
    """What the app's Build tab sends: BuildOptions' keys beside TrainConfig's, each read by its own."""
    sent = {"steps": 3, "rank": 2, "targets": ["q_proj"], "shared": False, "families": ["copy"], "data": "x.jsonl"}
    options = from_mapping(BuildOptions, sent, "build job", beside=(TrainConfig,))
    config = from_mapping(TrainConfig, sent, "build job", beside=(BuildOptions,))
    assert options == BuildOptions(data="x.jsonl", families=("copy",), shared=False)
    assert config == TrainConfig(steps=3, rank=2, targets=("q_proj",))
    with pytest.raises(LorlibError, match="build job: unknown option 'alpha'"):  # set by the program only
        from_mapping(TrainConfig, {**sent, "alpha": 8.0}, "build job", beside=(BuildOptions,))
    with pytest.raises(LorlibError, match="choose tasks or families, not both"):
        from_mapping(BuildOptions, {**sent, "tasks": ["copy0"]}, "build job", beside=(TrainConfig,))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"shared_steps": 0}, "the shared expert's steps must be positive, got 0"),
        ({"tasks": ()}, "the list of tasks or families is empty"),
        ({"holdout_per_family": -1}, "--holdout-per-family must be 0 or more, got -1"),
    ],
)
def test_build_options_check_themselves(options, message):
    with pytest.raises(LorlibError, match=message):
        BuildOptions(**options)
