"""mff-ds COMMAND [ARGS]: every mff-ds command, from an installed package (`pip install .`) or a checkout; the
same as `python -m mff_ds COMMAND` (and `torchrun ... -m mff_ds COMMAND` under a launcher). COMMAND --help says more.

  mff-ds pretrain  [--config NAME|PATH] [--set KEY=VALUE] ...   MFF / MAE pretraining   (python -m mff_ds.pretrain)
  mff-ds finetune  --checkpoint PATH [--config NAME|PATH] ...   fine-tune a pretrained encoder
  mff-ds linprobe  --checkpoint PATH [--probe lars|knn,logreg]  linear probe, or k-NN / logistic-regression probes
  mff-ds evaluate  CKPT... --val PATH                           top-1 / top-5 of classifier files
  mff-ds convert   COMMAND SRC DST                              checkpoint formats      (python -m mff_ds.convert)
  mff-ds zoo       list | fetch NAME...                         released checkpoints    (python -m mff_ds.zoo)
"""
import sys

TRAINING = ("pretrain", "finetune", "linprobe")  # stop signals are caught before torch is imported
COMMANDS = TRAINING + ("evaluate", "convert", "zoo")


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
        from mff_ds.convert import main
        return main(argv)
    from mff_ds.zoo.__main__ import main
    return main(argv)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"mff-ds: expected a command, one of {', '.join(COMMANDS)}; got {command!r} (mff-ds --help)",
              file=sys.stderr)
        return 2
    if command in TRAINING:
        from mff_ds.engine import signals
        signals.catch()
    sys.argv[0] = f"mff-ds {command}"  # argparse's usage line
    return run(command, rest) or 0


if __name__ == "__main__":
    sys.exit(main())
