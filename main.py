"""vcp-jax entry point: `python main.py --config configs/<name>.py --workdir DIR [--config.k=v]`."""

from absl import app, flags
from ml_collections import config_flags

from vcp_jax import config_utils, train

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Where checkpoints, logs and metrics.json go.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    try:
        train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    except config_utils.ConfigError as e:
        raise app.UsageError(str(e)) from None


if __name__ == "__main__":
    app.run(main)
