"""``python -m osrm_lora ...`` = the ``osrm-lora`` command (e.g. ``torchrun --nproc_per_node 2 -m osrm_lora run cfg.yaml``)."""

import sys

from osrm_lora.cli import main

sys.exit(main())
