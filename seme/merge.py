"""`python -m seme.merge CONFIG OUT`: the command line. Arguments are parsed before anything heavy
is imported, so --help and argument errors are instant."""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import types

from seme import distributed  # light: torch is imported only where a group is made
from seme.options import MERGEKIT_FLAGS, OPTIONS


def build_parser(prog: str = "python -m seme.merge") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Merge Hugging Face checkpoints (mergekit-compatible YAML recipes) into one checkpoint.")
    parser.add_argument("config", nargs="?", help="recipe YAML file (mergekit schema)")
    parser.add_argument("out", nargs="?", help="output folder")
    parser.add_argument("--demo", action="store_true",
                        help="build two tiny fine-tunes of a tiny Llama and merge them (no downloads)")
    for o in OPTIONS:
        flags = ["--" + o.name.replace("_", "-")] + ([o.short] if o.short else [])
        if o.parse is None:
            parser.add_argument(*flags, action="store_true" if o.default is False else argparse.BooleanOptionalAction,
                                default=o.default, help=o.help + (" (default: on)" if o.default else ""))
        else:
            shown = "" if o.default is None else f" (default: {o.default})"
            parser.add_argument(*flags, default=o.default, help=o.help + shown)
    mergekit = parser.add_argument_group("mergekit-yaml's flags", "accepted so that switching is a change of command")
    for f in MERGEKIT_FLAGS:
        flags = ["--" + f.name.replace("_", "-")] + ([f.short] if f.short else [])
        if f.takes is None:
            mergekit.add_argument(*flags, action=argparse.BooleanOptionalAction, default=None, help=f.effect)
        else:
            mergekit.add_argument(*flags, type=f.takes, default=None, metavar=f.takes.__name__.upper(), help=f.effect)
    mergekit.add_argument("-v", action="count", default=0, help="no effect: seme's output is one line per merge")
    mergekit.add_argument("--out-path", metavar="OUT", help="OUT, as mergekit-multimerge names it")
    return parser


def _options(args, parser) -> dict:
    """The merge options of parsed arguments, mergekit-yaml's flags applied (a flag's environment
    variable is set here, before the kernels' OpenMP or torch start)."""
    from seme.errors import SemeError

    options = {o.name: getattr(args, o.name) for o in OPTIONS}
    for f in MERGEKIT_FLAGS:
        value = getattr(args, f.name)
        if value is None:
            continue
        if f.refused and value == f.refused[0]:
            raise SemeError(f.refused[1])
        if f.minimum is not None and value < f.minimum:  # OpenMP ignores OMP_NUM_THREADS=0 with a complaint
            raise SemeError(f"--{f.name.replace('_', '-')} must be at least {f.minimum}, got {value}")
        if f.env:
            os.environ[f.env] = str(value)
        for name, setting in (f.sets.items() if value is True else ()):
            if options[name] == parser.get_default(name):  # an option given itself wins
                options[name] = setting
    return options


def main(argv: list[str] | None = None, prog: str = "python -m seme.merge") -> int:
    parser = build_parser(prog)
    try:
        with contextlib.ExitStack() as quiet:
            if not distributed.reports():  # --help and argument errors: said once under torchrun
                quiet.enter_context(contextlib.redirect_stdout(io.StringIO()))
                quiet.enter_context(contextlib.redirect_stderr(io.StringIO()))
            args = parser.parse_args(argv)
    except SystemExit as e:
        if e.code:
            distributed.join("invalid arguments")
        raise
    # Before torch or seme._C loads OpenMP: idle OpenMP workers sleep instead of spinning. Spinning
    # between a tensor's kernels took the cores from the readers, the checksum thread and the next
    # tensor's setup (bench.e2e, 2 cores: DARE-TIES merge loop 1.45 -> 1.05 s, CPU time 2.5 -> 1.75 s).
    os.environ.setdefault("OMP_WAIT_POLICY", "passive")
    from seme.errors import SemeError

    try:
        options = _options(args, parser)
        if args.demo:
            from seme.demo import run_demo

            run_demo(args.out or args.config or "./seme-demo-merged", **options)
            return 0
        if args.out and args.out_path and args.out != args.out_path:
            raise SemeError(f"two outputs given: {args.out} and --out-path {args.out_path}")
        out = args.out or args.out_path
        if not args.config or not out:
            raise SemeError("expected CONFIG and OUT (or --demo); see --help")
        from seme.api import merge

        merge(args.config, out, **options)
        return 0
    except SemeError as e:
        distributed.join(str(e))
        _say(f"seme: error: {' '.join(str(e).split())}")  # always one line
        return e.exit_status
    except BrokenPipeError:  # stdout's reader left (`--dry-run | head`): nothing is wrong, nothing more to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # what stdout still buffers goes nowhere
        return 128 + 13  # the status of a process that SIGPIPE ended, as a shell's own tools give
    except KeyboardInterrupt:
        _say("seme: interrupted; no output was published (rerun with --resume to continue)")
        return 130
    except OSError as e:
        line = f"seme: error: {e.strerror or e}: {e.filename or ''}".rstrip(": ")
        distributed.join(line)
        _say(line)
        return 1


def _say(line: str) -> None:
    """An error's line on stderr; under torchrun, rank 0's alone (`seme.distributed`: the others
    have told it of theirs)."""
    if distributed.reports():
        print(line, file=sys.stderr)


class _CallableModule(types.ModuleType):
    """`seme.merge` is both this CLI module and the API function: importing the module replaces the
    package attribute, so the module itself forwards calls to `seme.api.merge`."""

    def __call__(self, config, out_dir: str, **options) -> dict:
        from seme.api import merge

        return merge(config, out_dir, **options)


def run(prog: str = "seme-merge") -> None:
    """The command (`seme-merge`, `python -m seme.merge`): `main`, then exit at once. The output is
    published and every file is written and closed, so the interpreter's teardown is skipped: it spent
    0.7 s freeing torch and the input mappings after a 1.8 GB merge (bench.e2e models)."""
    status = main(prog=prog)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


sys.modules[__name__].__class__ = _CallableModule

if __name__ == "__main__":
    run("python -m seme.merge")
