"""The command line: ``critnet fit|validate|test|predict`` and ``critnet-train`` (also ``python analyze.py`` and
``python train.py`` in a checkout)."""

from __future__ import annotations

import logging
import os
import re
import sys
from typing import Any, NoReturn, Sequence

from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar, RichProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from jsonargparse import DefaultHelpFormatter  # isort: skip (after Lightning, as before)

from critnet import presets
from critnet.callbacks.run_summary import RunSummary
from critnet.data import ClassificationDataModule
from critnet.distributed import peer_stopped
from critnet.errors import CritnetError, Interrupted, one_line
from critnet.module import ClassifierModule

_STRUCTURE = ("Does not validate", "Subtypes:", "Errors:", "Given value type:", "Given value:")


def _readable_reason(reason: str) -> str:
    """jsonargparse's "Expected a <type>. Got value: <v>" as "'<v>' is not <what is allowed>"."""
    match = re.match(r"Expected a (.+?)\. Got value: (.*)$", reason)
    if not match:
        return reason
    expected, value = match.groups()
    literal = re.match(r"typing\.Literal\[(.*)\]$", expected)
    if literal:
        choices = ", ".join(c.strip().strip("'\"") for c in literal.group(1).split(","))
        return f"{value!r} is not one of {choices}"
    simple = re.match(r"<class '(?:[\w.]+\.)?(\w+)'>$", expected)
    names = {"float": "a finite number", "int": "an integer", "bool": "true or false", "str": "a string"}
    allowed = names.get(simple.group(1), simple.group(1)) if simple else expected
    return f"{value!r} is not {allowed}"


def one_line_error(message: str) -> str:
    """jsonargparse's (often nested, multi-line) parse error as one line naming the flag, the value and what is
    allowed: the most specific problem wins, and the generic ``lightning.Callback`` alternative is ignored."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    if len(lines) <= 1:
        return lines[0] if lines else message
    keys: list[str] = []
    owner = None
    for line in lines:
        problem = re.match(r"- Problem with given class_path '([^']+)':", line)
        if problem:
            owner, keys = problem.group(1), keys[:1]
            continue
        key = re.match(r'(?:- )?Parser key "([^"]+)":?(.*)$', line)
        if key:
            keys.append(key.group(1))
            if key.group(2).strip():
                return _flag(keys, owner) + ": " + _readable_reason(key.group(2).strip())
            continue
        if line.startswith(_STRUCTURE) or not keys:
            continue
        return _flag(keys, owner) + ": " + _readable_reason(line.lstrip("- "))
    return " ".join(lines)


def _flag(keys: list[str], owner: str | None) -> str:
    if owner and len(keys) > 1:
        return f"--{keys[0]}.init_args.{'.'.join(keys[1:])} ({owner.rpartition('.')[2]})"
    return "--" + ".".join(keys)


class CritnetArgumentParser(LightningArgumentParser):
    """Parse errors end in one line naming the flag at fault (exit status 2), not in the usage and a nested
    type-union report."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error:
            super().error(message, ex)
        print(f"error: {one_line_error(message)}", file=sys.stderr)
        raise SystemExit(2)


class PresetHelpFormatter(DefaultHelpFormatter):
    """Keeps the line breaks of the epilog, so that the presets are listed one a line."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return "".join(indent + line for line in text.splitlines(keepends=True))


def presets_epilog(example: str) -> str:
    """The list of presets (name and first comment line) and an example command that end ``--help``."""
    width = max(len(name) for name in presets.names())
    rows = [f"  {name:<{width}}  {presets.summary(name)}" for name in presets.names()]
    text = "\n".join([
        "presets: -c NAME or --config NAME, repeated to compose (an existing file of that name wins; any path to",
        "a YAML file works too):",
        *rows,
        "",
        f"example: {os.path.basename(sys.argv[0])} {example}",
    ])
    return text.replace("%", "%%")  # argparse %-formats the epilog (for %(prog)s)


class CritnetCLI(LightningCLI):
    """LightningCLI with critnet's always-on callbacks and the data → model class-count link."""

    DESCRIPTION = "Rank the critical units of a trained image classifier, prune it, inject faults: critnet."
    EXAMPLE = "validate -c resnet20_cifar10 -c rank_neurons --data.root DIR --model.weights FILE"

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        parser = super().init_parser(**kwargs)
        for action in parser._actions:
            if action.dest == "config":
                action.help = "A preset's name (listed below) or the path of a YAML or JSON config file."
        return parser

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(RunSummary, "summary")
        parser.link_arguments("data", "model.num_classes", compute_fn=lambda data: data.num_classes,
                              apply_on="instantiate")
        # Without a data config, --data.root names an ImageFolder tree preprocessed for the model.
        parser.set_defaults({"data": {"class_path": "critnet.datasets.ImageFolderDataModule"}})

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        share_model_with_data(config)

    def _prepare_subcommand_parser(self, klass: type, subcommand: str, **kwargs: Any) -> LightningArgumentParser:
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        # RunSummary prints the exact numbers (float64 loss, counts); Lightning's own table repeats them as float32
        # (81.02999877929688). Off by default; `--verbose true` brings it back.
        if "verbose" in self._subcommand_method_arguments.get(subcommand, ()):
            parser.set_defaults(verbose=False)
        return parser

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Callback]) -> Trainer:
        # A rich progress bar by default, unless the user turned progress bars off or brought their own.
        user_callbacks = config.get("callbacks") or []
        if not isinstance(user_callbacks, list):
            user_callbacks = [user_callbacks]
        wants_bar = config.get("enable_progress_bar", True) is not False
        if wants_bar and not any(isinstance(c, ProgressBar) for c in [*callbacks, *user_callbacks]):
            callbacks = [*callbacks, RichProgressBar()]
        return super()._instantiate_trainer(config, callbacks)


def share_model_with_data(config: Any) -> None:
    """Tell a datamodule that preprocesses per model (``arch``/``weights`` arguments left unset) which model runs,
    so that it uses that model's weights' own eval transforms."""
    data, model = config.get("data"), config.get("model")
    init = data.get("init_args") if data is not None and hasattr(data, "get") else None
    if init is None or model is None or model.get("network") is not None:
        return
    if "arch" in init and init.get("arch") is None:
        init["arch"] = model.get("arch")
        init["weights"] = model.get("weights")


class TrainCLI(CritnetCLI):
    """``critnet-train`` (``train.py``): also keeps the best checkpoint (by val/top1) in ``checkpoints/``."""

    EXAMPLE = "-c resnet20_cifar10 -c finetune_resnet20_jpeg --data.root DIR --model.weights FILE"

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        super().add_arguments_to_parser(parser)
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({
            "checkpoint.dirpath": "checkpoints",
            "checkpoint.filename": "finetuned-{epoch:02d}-top1={val/top1:.2f}",
            "checkpoint.auto_insert_metric_name": False,
            "checkpoint.monitor": "val/top1",
            "checkpoint.mode": "max",
            "checkpoint.save_top_k": 1,
        })


def _parser_kwargs(cli_class: type[CritnetCLI]) -> dict[str, Any]:
    """The main parser's and every subcommand parser's help end with the presets."""
    help_kwargs = {"epilog": presets_epilog(cli_class.EXAMPLE), "formatter_class": PresetHelpFormatter}
    return {"description": cli_class.DESCRIPTION, **help_kwargs,
            **{name: dict(help_kwargs) for name in cli_class.subcommands()}}


def _run(cli_class: type[CritnetCLI], args: Sequence[str] | None) -> CritnetCLI:
    quiet_lightning_tips()
    return cli_class(
        ClassifierModule,
        ClassificationDataModule,
        subclass_mode_data=True,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        args=list(args) if args is not None else None,
        auto_configure_optimizers=False,
        parser_class=CritnetArgumentParser,
        parser_kwargs=_parser_kwargs(cli_class),
    )


def _run_reporting_errors(cli_class: type[CritnetCLI], args: Sequence[str] | None) -> CritnetCLI:
    """Run the CLI on ``args`` (``None``: the command line itself) with presets resolved, bad input reported in one
    line (exit status 2), an interrupted analysis in one line (exit status 130)."""
    try:
        if args is None:
            # Rewritten in place rather than passed as args: LightningCLI warns when it gets both, and a DDP launch
            # re-runs sys.argv in every process.
            sys.argv[1:] = resolve_presets(sys.argv[1:])
        else:
            args = resolve_presets(args)
        return _run(cli_class, args)
    except Interrupted as stop:
        print(f"interrupted: {stop}", file=sys.stderr)
        raise SystemExit(130) from stop
    except Exception as err:
        user_error = _critnet_cause(err)
        if user_error is None and peer_stopped(err):
            # The process that stopped has said why (one line, or its traceback); a second traceback here, about
            # the broken connection, would only bury it.
            print("error: another process of this distributed run stopped (its message above says why); this one "
                  "stops with it", file=sys.stderr)
            raise SystemExit(2) from err
        if user_error is None:
            raise
        # Bad input is the user's to fix: one line naming the flag or file, not a traceback.
        print(f"error: {one_line(user_error)}", file=sys.stderr)
        raise SystemExit(2) from err


def _critnet_cause(err: BaseException | None) -> CritnetError | None:
    """The CritnetError behind ``err``: jsonargparse wraps errors raised while it instantiates a subclass (the data
    module) in a ValueError of its own."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, CritnetError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


_CONFIG_FLAGS = ("-c", "--config")
# A value jsonargparse would read as a file name (not an inline YAML/JSON config such as '{trainer: {...}}')
_FILE_NAME = re.compile(r"[\w.~/+-]+")


def resolve_presets(args: Sequence[str]) -> list[str]:
    """``args`` with the value of every ``-c``/``--config`` that names a preset replaced by the preset's path.

    An existing file always wins over a preset of the same name; a value that is neither an existing file nor a
    preset raises :class:`CritnetError` naming the flag and listing the presets; an inline YAML/JSON config is left
    to jsonargparse.

    >>> from critnet.cli import resolve_presets
    >>> args = resolve_presets(["validate", "-c", "resnet20_cifar10", "--config=rank_neurons.yaml"])
    >>> args[:2], args[2] == str(critnet.presets.path("resnet20_cifar10"))
    (['validate', '-c'], True)
    >>> args[3] == "--config=" + str(critnet.presets.path("rank_neurons"))
    True
    >>> resolve_presets(["validate", "-c", "resnet20"])  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    critnet.errors.CritnetError: -c resnet20: no such file, and no preset of that name; the presets are ...
    """
    resolved: list[str] = []
    flag = None
    for arg in args:
        if flag is not None:
            resolved.append(_config_file(flag, arg))
            flag = None
        elif arg in _CONFIG_FLAGS:
            flag = arg
            resolved.append(arg)
        elif arg.startswith("--config="):
            resolved.append("--config=" + _config_file("--config", arg[len("--config="):]))
        else:
            resolved.append(arg)
    return resolved


def _config_file(flag: str, value: str) -> str:
    if os.path.isfile(value) or not _FILE_NAME.fullmatch(value):
        return value
    try:
        return str(presets.path(value))
    except CritnetError:
        raise CritnetError(f"{flag} {value}: no such file, and no preset of that name; the presets are "
                           f"{', '.join(presets.names())}") from None


class _NoLightningTips(logging.Filter):
    """Drops the tips Lightning logs at the start of every run ("💡 Tip: ... install litlogger", "... litmodels"):
    they advertise its cloud services and say nothing about the run. Its other messages and warnings pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno == logging.INFO and str(record.msg).startswith("💡"))


def quiet_lightning_tips() -> None:
    """Install :class:`_NoLightningTips` on the loggers that Lightning's ``rank_zero_info`` writes to (once)."""
    from lightning_utilities.core import rank_zero

    names = {"lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero", rank_zero.log.name}
    for name in names:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _NoLightningTips) for f in logger.filters):
            logger.addFilter(_NoLightningTips())


def print_models() -> None:
    """Print every model name ``--model.arch`` accepts, one a line, with its input size."""
    from critnet.models import get_model_spec, list_models

    for name in list_models(include_timm=False):
        spec = get_model_spec(name)
        print(f"{name}\t{spec.family}\tinput {spec.input_size} (smallest {spec.smallest_input})")
    from critnet.models.timm_models import timm_model_names

    timm_names = timm_model_names()
    for name in timm_names:
        print(f"timm/{name}\ttimm")
    if not timm_names:
        print("timm/<name>\t(install timm: pip install critnet[timm])")


def main(args: Sequence[str] | None = None) -> CritnetCLI | None:
    """Entry point of the ``critnet`` command and of ``analyze.py``: ``main(["validate", "-c", "resnet20_cifar10",
    ...])``.

    ``main(["--list-models"])`` prints the model names instead (LightningCLI has no place for a flag that needs no
    subcommand, so it is handled before parsing).
    """
    argv = list(sys.argv[1:] if args is None else args)
    if "--list-models" in argv:
        print_models()
        return None
    return _run_reporting_errors(CritnetCLI, args)


def train_main(args: Sequence[str] | None = None) -> CritnetCLI:
    """Entry point of the ``critnet-train`` command and of ``train.py``: always the ``fit`` subcommand, best
    checkpoint kept in ``checkpoints/``."""
    if args is None:
        sys.argv[1:] = _fit(sys.argv[1:])
        return _run_reporting_errors(TrainCLI, None)
    return _run_reporting_errors(TrainCLI, _fit(args))


def _fit(args: Sequence[str]) -> list[str]:
    args = list(args)
    return ["fit", *(args[1:] if args[:1] == ["fit"] else args)]


def command() -> None:
    """The installed ``critnet`` command: :func:`main` on the command line (a console script exits with the status
    its function returns, so this returns nothing rather than the CLI object)."""
    main()


def train_command() -> None:
    """The installed ``critnet-train`` command: :func:`train_main` on the command line."""
    train_main()
