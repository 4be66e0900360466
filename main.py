"""vcp-jax entry point: `python main.py --config configs/<name>.py --workdir DIR [--config.k=v]`.

`config.task` picks the stage (pretrain, finetune, retrieval, probe, demo); see `vcp_jax/main.py`.
"""

from vcp_jax.main import run

if __name__ == "__main__":
    run()
