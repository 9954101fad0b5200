"""The ``deepunlearn`` parser and its dispatch."""
from __future__ import annotations

import argparse
import sys

from .evaluate import cmd_evaluate
from .forget import cmd_forget
from .options import collect_args, model_args, run_args
from .stats import cmd_stats_build, cmd_stats_show


def build_parser() -> argparse.ArgumentParser:
    from deepunlearn import cli  # the package's docstring: the subcommands at a glance

    p = argparse.ArgumentParser(prog="deepunlearn", description=cli.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    f = sub.add_parser("forget", help="make a model forget classes, from an image tree or stored statistics")
    model_args(f)
    f.add_argument("--data", help="training image tree root/<class>/<image> to draw the samples from")
    f.add_argument("--stats", help="per-class statistics from 'deepunlearn stats build' (no image is read)")
    f.add_argument("--forget", nargs="+", required=True, metavar="CLASS", help="class folder names or class indices")
    f.add_argument("--retain-per-class", type=int, default=1, help="retain images per kept class (paper, ImageNet: 1)")
    f.add_argument("--forget-samples", type=int, default=None,
                   help="forget images in all (default: as many as the retain sample, capped by the class)")
    f.add_argument("--alpha-r", type=float, default=None,
                   help="retain-space scale (paper, ImageNet: 100); default: chosen on held-out images of the samples")
    f.add_argument("--alpha-f", type=float, default=None, help="forget-space scale (paper, ImageNet: 10); default: chosen")
    f.add_argument("--alpha-f-head", type=float, default=None,
                   help="the classifier head's own forget scale; default: --alpha-f where given, else chosen with it")
    f.add_argument("--search", action="store_true", help="choose alpha_r, alpha_f on held-out images of --data")
    f.add_argument("--search-per-class", type=int, default=2, help="held-out images per class for --search")
    f.add_argument("--search-data", help="image tree to score --search on (default: images of --data not drawn)")
    f.add_argument("--solver", choices=["cholesky", "eigh", "svd"], default="cholesky")
    f.add_argument("--first-layer", choices=["auto", "skip", "edit"], default="auto",
                   help="the layer the input reaches first: auto (default) skips it when alpha is chosen, edits it when "
                        "both scales are given (the paper's procedure)")
    f.add_argument("--first-token", choices=["auto", "yes", "no"], default="auto",
                   help="statistics of sequence inputs (ViT tokens) from the first position only: auto (default) "
                        "scores both when alpha is chosen, no when both scales are given")
    f.add_argument("--keep-retain-mean", choices=["auto", "yes", "no"], default="auto",
                   help="shift each edited layer's bias so that its mean output over the retain images stays: auto "
                        "(default) with the first position's statistics when alpha is chosen, else no")
    f.add_argument("--refit-head", choices=["auto", "yes", "no"], default="auto",
                   help="correct the classifier head after the edit: its retained classes' rows re-fitted so that the "
                        "retain images keep the original logits where cross-validation shows it still forgetting, else "
                        "its bias shifted to keep the retained classes' shares: auto (default) when alpha is chosen; "
                        "needs the automatic choice")
    collect_args(f)
    f.add_argument("--out", required=True, help="the edited model file (same form as the input)")
    f.add_argument("--report", help="JSON report (default: OUT.json)")
    f.add_argument("--overwrite", action="store_true", help="replace --out / --report if they exist")
    run_args(f)
    f.set_defaults(func=cmd_forget)

    e = sub.add_parser("evaluate", help="accuracy on the retain and the forget classes of an image tree")
    model_args(e)
    e.add_argument("--data", required=True, help="image tree root/<class>/<image> (e.g. the validation split)")
    e.add_argument("--forget", nargs="+", required=True, metavar="CLASS", help="class folder names or class indices")
    e.add_argument("--per-class", type=int, default=None, help="at most this many images per class (default: all)")
    e.add_argument("--report", help="write the numbers as JSON here")
    e.add_argument("--overwrite", action="store_true")
    run_args(e, batch_size=128)
    e.set_defaults(func=cmd_evaluate)

    s = sub.add_parser("stats", help="per-class statistics: build once, answer many deletion requests")
    ssub = s.add_subparsers(dest="stats_command", required=True, metavar="ACTION")
    b = ssub.add_parser("build", help="collect statistics per class from an image tree")
    model_args(b)
    b.add_argument("--data", required=True, help="training image tree root/<class>/<image>")
    b.add_argument("--per-class", type=int, default=10, help="images per class")
    collect_args(b)
    b.add_argument("--out", required=True, help="statistics file to write")
    b.add_argument("--overwrite", action="store_true")
    run_args(b)
    b.set_defaults(func=cmd_stats_build)
    sh = ssub.add_parser("show", help="what a statistics file holds (its checksum is verified)")
    sh.add_argument("file")
    sh.add_argument("--json", action="store_true", help="print JSON")
    sh.set_defaults(func=cmd_stats_show)

    sub.add_parser("suite", help="the comparison suite against baselines (python -m deepunlearn.experiments.suite; --help there)",
                   add_help=False)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["suite"]:  # its own parser, options passed through untouched
        from .experiments.suite import main as suite_main

        return suite_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, ImportError) as exc:  # bad input, or an optional package missing (extras.require)
        print(f"deepunlearn {args.command}: error: {exc}", file=sys.stderr)
        return 2
