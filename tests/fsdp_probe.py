"""`python -m qformer_cli` with a look at the frozen LLM's parameters right after FSDP2 sharding.

Run under torchrun as ``tests/fsdp_probe.py REPORT_DIR <qformer arguments>``: each rank writes
``REPORT_DIR/rank<r>.json`` with, for every parameter of the sharded module, whether it is a
DTensor, its placements, its global shape and the shape of the shard this rank holds. Then the
command runs on as usual. A test helper (tests/train/test_fsdp.py); nothing in the package
knows of it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch
from torch.distributed.tensor import DTensor

from qformer_cli import cli
from qformer_cli.train import stage2


def parameter_report(module: torch.nn.Module) -> dict[str, dict[str, Any]]:
    report = {}
    for name, param in module.named_parameters():
        is_dtensor = isinstance(param, DTensor)
        local = param.to_local() if is_dtensor else param
        report[name] = {
            "dtensor": is_dtensor,
            "placements": [repr(p) for p in param.placements] if is_dtensor else [],
            "global_shape": list(param.shape),
            "local_shape": list(local.shape),
        }
    return report


def main() -> None:
    report_dir = Path(sys.argv[1])
    real_shard = stage2.shard_frozen_lm

    def shard_and_report(owner, prompted_lm, llm, device) -> int:
        blocks = real_shard(owner, prompted_lm, llm, device)
        rank = torch.distributed.get_rank()
        report = {
            "rank": rank,
            "world_size": torch.distributed.get_world_size(),
            "parameters": parameter_report(prompted_lm),
        }
        (report_dir / f"rank{rank}.json").write_text(json.dumps(report))
        return blocks

    stage2.shard_frozen_lm = shard_and_report
    sys.argv = ["qformer", *sys.argv[2:]]
    cli.main()


if __name__ == "__main__":
    main()
