"""`python -m services.api`: config from the environment, key=value logs, gunicorn."""
from __future__ import annotations

import sys

from services.api.service import run_api
from shared import log as qflog
from shared.config import load, mask_secrets
from shared.errors import ConfigError


def main() -> int:
    """Run the API until gunicorn stops; 2 on a bad configuration."""
    try:
        cfg = load()
    except ConfigError as exc:
        print(mask_secrets(f"qf api: {exc}"), file=sys.stderr)
        return 2
    qflog.setup("api", cfg.common.log_level).info("config", extra=cfg.effective())
    run_api(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
