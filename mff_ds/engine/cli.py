"""What the training command lines share: `python -m mff_ds.pretrain` (launch/pretrain.py) and the fine-tune /
linear-probe ones (mff_ds.eval.cli). Imported after the pretraining CLI has installed its signal handlers (the
recipe errors derive from mff_ds.common.UserError, which loads torch)."""
import argparse
import json
import os
import sys
from typing import Callable, Optional

from .recipe import RecipeError, shipped_recipes


def run_parser(doc: str, config: str, set_example: str) -> argparse.ArgumentParser:
    """--config (default `config`), --output-dir, --set, --max-steps, --resume and the deepspeed launcher's
    --local_rank; the caller adds its own options."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--config", default=config,
                   help=f"recipe: a YAML path, or the name of a shipped recipe ({', '.join(shipped_recipes())})")
    p.add_argument("--output-dir", default=None, help="default: runs/<recipe name>")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help=f"override a recipe value, e.g. --set {set_example} (repeatable)")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this optimizer step (schedule unchanged)")
    p.add_argument("--resume", default="auto", help="auto (latest complete checkpoint in the output dir), none "
                   "(refused over another run's outputs), fresh (move those aside to OUTPUT_DIR/previous-<time>/, "
                   "then none), or a checkpoint PATH")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--print-schema", action="store_true",
                   help="write the JSON Schema of this command's recipes to stdout and exit")
    return p


def print_schema(recipe_cls) -> int:
    """--print-schema: the recipe class's JSON Schema on stdout (editors and CI validate recipes with it)."""
    print(json.dumps(recipe_cls.model_json_schema(), indent=2))
    return 0


def load_or_report(load: Callable, args, overrides) -> Optional[object]:
    """load(args.config, overrides) -> the recipe; None after printing one line when the recipe or --max-steps
    is bad (the caller exits 2)."""
    try:
        recipe = load(args.config, overrides)
    except RecipeError as e:
        print(f"error: {e}", file=sys.stderr)
        return None
    if args.max_steps is not None and args.max_steps < 1:
        print(f"error: --max-steps: expected a positive integer, got {args.max_steps}", file=sys.stderr)
        return None
    return recipe


def run_or_report(run: Callable[[], dict]):
    """run() -> (its summary, 0), or (None, exit code) after one line: for a user error (mff_ds.common.UserError:
    a recipe, data, checkpoint or run-directory refusal) 3 for a non-finite loss, 2 otherwise, and the other ranks
    hear of it at once; for a peer lost (a collective failed and a rank's heartbeat stopped, engine/liveness.py) 69,
    the line naming it. Anything else is a bug: it propagates with its traceback (exit 1)."""
    from mff_ds.common import UserError

    from . import liveness
    from .trainer import NonFiniteLossError
    try:
        return run(), 0
    except UserError as e:
        liveness.failed(f"error: {e}")
        print(f"error: {e}", file=sys.stderr)
        return None, 3 if isinstance(e, NonFiniteLossError) else 2
    except Exception as e:  # noqa: BLE001 (a lost peer, or re-raised)
        if liveness.explain(e) is None:  # said, when a lost peer explains it
            raise
        return None, liveness.LOST_PEER_EXIT


def stopped(summary: dict, out: str) -> Optional[int]:
    """The exit code of a run a signal stopped (75, or 130 for SIGINT), after saying where it saved; None when
    no signal stopped it."""
    if not summary.get("stopped_by"):
        return None
    from .signals import exit_code
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"stopped by {summary['stopped_by']} at step {summary['step']}/{summary['total_steps']}; checkpoint "
              f"saved under {out}/checkpoints; rerun with --resume auto to continue", flush=True)
    return exit_code(summary["stopped_by"])
