"""Command line: `python -m metabolic {run,study,config}`.

    python -m metabolic run --profile smoke [--stages corpus,pretrain] [--set train.epochs=3 ...]
    python -m metabolic study --profile smoke [--only 00,01] [--set ...]
    python -m metabolic config --profile gpu [--set ...]
    torchrun --nproc-per-node 2 -m metabolic run --profile gpu --stages csc   # CSC labelling sharded on 2 processes

Errors caused by input (profile, override, assets, data) or by the disk (read-only, permission, full)
print one line and exit with status 2, also when a notebook of `study` raises them; another error in a
notebook prints one line and exits 1 (its traceback stays in the executed notebook). `study --set ...` writes beside the default run
(`data/<profile>+<hash>/`, see `metabolic.pipeline.study.run_name`).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

from metabolic.core.errors import ConfigError, MetabolicError, os_fault_message
from metabolic.core.profiles import PROFILES


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m metabolic", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_ in (
        ("run", "run the stages without Jupyter"),
        ("study", "run the notebooks headless with papermill"),
        ("config", "print the resolved config"),
    ):
        p = sub.add_parser(name, help=help_)
        p.add_argument("--profile", default="smoke", help=f"{', '.join(PROFILES)} (default: smoke)")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                       help="override a config value; repeatable")
        if name == "run":
            p.add_argument("--stages", default="", help="comma-separated stages or ranges in pipeline order, e.g. "
                           "'csc', '..evaluate' (corpus to evaluate), 'train..' (default: all, in order)")
        if name == "study":
            p.add_argument("--only", default="", help="comma-separated notebook prefixes, e.g. 00,01")
            p.add_argument("--inplace", action="store_true", help="write outputs back into notebooks/*.ipynb (smoke)")
        p.add_argument("-v", "--verbose", action="store_true", help="debug logging (study: also the notebooks' output)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from metabolic.core import numerics

    numerics.pin(args.profile)  # before anything loads torch (see metabolic.core.numerics)
    try:
        from metabolic.core.config import parse_override_strings
        from metabolic.core.profiles import load_config

        overrides = parse_override_strings(args.overrides)
        cfg = load_config(args.profile, overrides)
        if args.command == "config":
            print(cfg.to_json())
        elif args.command == "run":
            from metabolic.core import artefacts
            from metabolic.csc.sharding import shard_from_env
            from metabolic.pipeline import stages

            names = stages.select(args.stages)
            rank, world = shard_from_env()
            if world > 1 and names != ["csc"]:
                raise ConfigError(f"--stages {args.stages or '<all>'} under torchrun (WORLD_SIZE={world}): only the csc "
                                  f"stage is sharded: run `torchrun --nproc-per-node N -m metabolic run --stages csc`, "
                                  f"then the other stages in one process")
            t0 = time.perf_counter()
            timings = stages.run(cfg, names or None)
            if rank > 0:
                return 0  # rank 0 reports the run
            summary = {"profile": cfg.profile, "stages_s": timings, "total_s": time.perf_counter() - t0}
            artefacts.atomic_write_json(artefacts.run_dir(cfg.run_name) / "run_timings.json", summary)
            print(json.dumps(summary, indent=2))
        elif args.command == "study":
            from metabolic.core import artefacts
            from metabolic.pipeline.study import NotebookFailed, run_study

            # The notebooks' own output reaches the terminal with -v only; the bar and a line per notebook always.
            logging.getLogger("papermill").setLevel(logging.INFO if args.verbose else logging.WARNING)
            t0 = time.perf_counter()
            try:
                run = run_study(args.profile, overrides, [o.strip() for o in args.only.split(",") if o.strip()] or None,
                                inplace=args.inplace, stream_output=args.verbose)
            except NotebookFailed as exc:  # a bug in a cell: one line here, the traceback in the executed notebook
                print(f"error: {exc}", file=sys.stderr)
                return 1
            summary = {"profile": args.profile, "run": run.name, "data": str(run.data_dir), "figures": str(run.figures_dir),
                       "notebooks_s": run.notebooks_s, "total_s": time.perf_counter() - t0}
            artefacts.atomic_write_json(run.data_dir / "study_timings.json", summary)
            print(json.dumps(summary, indent=2))
    except MetabolicError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        message = os_fault_message(exc)
        if message is None:
            raise  # not a fault of the user's disk: a bug, keep its traceback
        print(f"error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to resume from the last checkpoint", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
