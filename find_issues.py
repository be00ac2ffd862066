"""Find wrong labels, near duplicates (leaks across splits) and outliers: ``python find_issues.py ckpt_path=PATH`` (see README)."""

import hydra
from omegaconf import DictConfig

from image_finetune.core.cli import quick_help, user_errors


@hydra.main(version_base="1.3", config_path="configs", config_name="find_issues")
def main(cfg: DictConfig) -> None:
    with user_errors():
        from image_finetune.inference.data_issues import find_issues  # heavy (torch, cleanlab): only once a run starts

        find_issues(cfg)


if __name__ == "__main__" and not quick_help(__file__, "find_issues"):  # Hydra's own --help takes ~2 s
    main()
