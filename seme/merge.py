"""`python -m seme.merge CONFIG OUT`: the command line. Arguments are parsed before anything heavy
is imported, so --help and argument errors are instant."""
from __future__ import annotations

import argparse
import os
import sys
import types

from seme.options import OPTIONS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m seme.merge",
        description="Merge Hugging Face checkpoints (mergekit-compatible YAML recipes) into one checkpoint.")
    parser.add_argument("config", nargs="?", help="recipe YAML file (mergekit schema)")
    parser.add_argument("out", nargs="?", help="output folder")
    parser.add_argument("--demo", action="store_true",
                        help="build two tiny fine-tunes of a tiny Llama and merge them (no downloads)")
    for o in OPTIONS:
        flag = "--" + o.name.replace("_", "-")
        if o.parse is None:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction if o.default is None else "store_true",
                                default=o.default, help=o.help)
        else:
            parser.add_argument(flag, default=o.default, help=f"{o.help} (default: {o.default})")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Before torch or seme._C loads OpenMP: idle OpenMP workers sleep instead of spinning. Spinning
    # between a tensor's kernels took the cores from the readers, the checksum thread and the next
    # tensor's setup (bench.e2e, 2 cores: DARE-TIES merge loop 1.45 -> 1.05 s, CPU time 2.5 -> 1.75 s).
    os.environ.setdefault("OMP_WAIT_POLICY", "passive")
    from seme.errors import SemeError

    try:
        if args.demo:
            from seme.demo import run_demo

            options = {o.name: getattr(args, o.name) for o in OPTIONS}
            run_demo(args.out or args.config or "./seme-demo-merged", **options)
            return 0
        if not args.config or not args.out:
            raise SemeError("expected CONFIG and OUT (or --demo); see --help")
        from seme.api import merge

        merge(args.config, args.out, **{o.name: getattr(args, o.name) for o in OPTIONS})
        return 0
    except SemeError as e:
        print(f"seme: error: {' '.join(str(e).split())}", file=sys.stderr)  # always one line
        return e.exit_status
    except KeyboardInterrupt:
        print("seme: interrupted; no output was published (rerun with --resume to continue)", file=sys.stderr)
        return 130
    except OSError as e:
        print(f"seme: error: {e.strerror or e}: {e.filename or ''}".rstrip(": "), file=sys.stderr)
        return 1


class _CallableModule(types.ModuleType):
    """`seme.merge` is both this CLI module and the API function: importing the module replaces the
    package attribute, so the module itself forwards calls to `seme.api.merge`."""

    def __call__(self, config, out_dir: str, **options) -> dict:
        from seme.api import merge

        return merge(config, out_dir, **options)


sys.modules[__name__].__class__ = _CallableModule

if __name__ == "__main__":
    status = main()
    # The output is published and every file is written and closed: skip the interpreter's teardown,
    # which spent 0.7 s freeing torch and the input mappings after a 1.8 GB merge (bench.e2e models).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
