"""One process of test_eval_ddp.py's 2-process gloo test of the data-parallel hooks (a module of its own:
the spawned processes import only torch and spectralds.evaluation, not everything the test imports)."""

import json
from pathlib import Path

import torch
import torch.distributed as dist

from spectralds.evaluation import data_parallel


def collectives(rank: int, store: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        ranks = data_parallel.join(torch.device("cpu"))  # the group that is already there
        got = {
            "ranks": [ranks.rank, ranks.world_size],
            "count": data_parallel.all_gather(torch.tensor(10 + rank), ranks).tolist(),  # lm-eval's use
            "rows": data_parallel.all_gather(torch.full((2, 3), rank), ranks).tolist(),
            "objects": data_parallel.gather_object({"rank": rank}, ranks),
            "broadcast": data_parallel.broadcast_object(f"from {rank}", ranks),
        }
        data_parallel.barrier(ranks)
        Path(out, f"rank{rank}.json").write_text(json.dumps(got))
    finally:
        dist.destroy_process_group()
