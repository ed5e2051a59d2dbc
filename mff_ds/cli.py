"""mff-ds COMMAND [ARGS]: every mff-ds command, from an installed package (`pip install .`) or a checkout; the
same as `python -m mff_ds COMMAND` (and `torchrun ... -m mff_ds COMMAND` under a launcher). COMMAND --help says more.

  mff-ds pretrain  [--config NAME|PATH] [--set KEY=VALUE] ...   MFF / MAE pretraining   (python -m mff_ds.pretrain)
  mff-ds finetune  --checkpoint PATH [--config NAME|PATH] ...   fine-tune a pretrained encoder
  mff-ds linprobe  --checkpoint PATH [--probe lars|knn,logreg]  linear probe, or k-NN / logistic-regression probes
  mff-ds evaluate  CKPT... --val PATH                           top-1 / top-5 of classifier files
  mff-ds convert   COMMAND SRC DST                              checkpoint formats      (python -m mff_ds.convert)
  mff-ds zoo       list | fetch NAME...                         released checkpoints    (python -m mff_ds.zoo)
  mff-ds index     DATA_DIR [--out FILE] [--list FILE]          list a dataset once for every rank and run
"""
import os
import sys

TRAINING = ("pretrain", "finetune", "linprobe")  # stop signals are caught before torch is imported
COMMANDS = TRAINING + ("evaluate", "convert", "zoo", "index")


def run(command: str, argv) -> int:
    if command == "pretrain":
        from mff_ds.pretrain.cli import main
        return main(argv)
    if command in ("finetune", "linprobe"):
        from mff_ds.eval.cli import train_main
        return train_main(command, argv)
    if command == "evaluate":
        from mff_ds.eval.cli import evaluate_main
        return evaluate_main(argv)
    if command == "convert":
        from mff_ds.convert.__main__ import main
        return main(argv)
    if command == "index":
        from mff_ds.data.index import main
        return main(argv)
    from mff_ds.zoo.__main__ import main
    return main(argv)


def take_local_rank(argv: list):
    """`deepspeed --module mff_ds COMMAND ...` runs `python -u -m mff_ds --local_rank=N COMMAND ...`
    (deepspeed/launcher/launch.py, unless --no_local_rank): N goes to LOCAL_RANK where the launcher has not set it,
    and the option is dropped. -> (argv without it, None), or (None, the error line)."""
    name, eq, value = argv[0].partition("=") if argv else ("", "", "")
    if name not in ("--local_rank", "--local-rank"):
        return argv, None
    rest = argv[1:]
    if not eq:
        value, rest = (rest[0], rest[1:]) if rest else (None, rest)
    if value is None or not value.isdigit():
        got = "nothing" if value is None else repr(value)
        return None, f"mff-ds: --local_rank: expected a non-negative integer, got {got}"
    os.environ.setdefault("LOCAL_RANK", str(int(value)))
    return rest, None


def main(argv=None) -> int:
    argv, error = take_local_rank(sys.argv[1:] if argv is None else list(argv))
    if error:
        print(error, file=sys.stderr)
        return 2
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    command, rest = (argv[0], argv[1:]) if argv else (None, [])
    if command not in COMMANDS:
        if command is None:
            print(__doc__, file=sys.stderr)
        print(f"mff-ds: expected a command, one of {', '.join(COMMANDS)}; got "
              + (f"{command!r} (mff-ds --help)" if command is not None else "none"), file=sys.stderr)
        return 2
    from mff_ds.engine import signals  # (no torch)
    sys.argv[0] = f"mff-ds {command}"  # argparse's usage line
    try:
        if command in TRAINING:
            signals.catch()  # the training loop saves and stops; the feature probes raise (eval/cli.py)
            return run(command, rest) or 0
        with signals.raising():  # nothing to resume: stop at once
            return run(command, rest) or 0
    except signals.Stopped as e:
        print(f"mff-ds {command}: stopped by {e.signal}; it saves nothing to resume: rerun the command",
              file=sys.stderr, flush=True)
        return e.exit_code
    except KeyboardInterrupt:  # SIGINT left out of MFF_DS_STOP_SIGNALS: Python's default
        print(f"mff-ds {command}: stopped by SIGINT, without saving", file=sys.stderr, flush=True)
        return signals.EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
