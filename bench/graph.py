"""Benchmark: vectorised ``build_graph`` vs the per-dialogue loop ``build_graph_loop``.

Workload: a batch of 10 IEMOCAP-sized dialogues (lengths drawn around 50 utterances), 3 modalities,
wp=11, wf=5 (CORECT's IEMOCAP window). Reports the median wall time of each builder over
``--repeats`` calls (time.perf_counter), their ratio (target >= 20x) and the edge count.

Run:  PYTHONPATH=src python bench/graph.py --repeats 200
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from affectkit.graph import build_graph, build_graph_loop


def median_seconds(fns: list[Callable[[], object]], repeats: int, rounds: int = 5) -> list[float]:
    """Median per-call wall time of each ``fn()`` over ``repeats`` calls, after one warm-up call each.

    The calls are split into ``rounds`` blocks and the functions take turns block by block, so slow
    drifts in background load affect both alike while each block still runs one function back to back.
    """
    times: list[list[float]] = [[] for _ in fns]
    per_round = max(1, -(-repeats // rounds))
    for _ in range(rounds):
        for fn, bucket in zip(fns, times):
            fn()  # warm-up (allocator, caches) after the other function's block
            for _ in range(per_round):
                t0 = time.perf_counter()
                fn()
                bucket.append(time.perf_counter() - t0)
    return [statistics.median(bucket) for bucket in times]


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, check both builders agree, time them and print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=100, help="timed calls per builder (median reported)")
    parser.add_argument("--dialogues", type=int, default=10)
    parser.add_argument("--mean-length", type=int, default=50)
    parser.add_argument("--modalities", type=int, default=3)
    parser.add_argument("--wp", type=int, default=11)
    parser.add_argument("--wf", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: reproducible)")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")

    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(args.seed)
    spread = max(1, args.mean_length // 5)
    lengths = torch.randint(
        args.mean_length - spread, args.mean_length + spread + 1, (args.dialogues,), generator=gen
    ).clamp_min(1)
    graph_args = (lengths, args.modalities, args.wp, args.wf)

    vec_index, vec_type = build_graph(*graph_args)
    ref_index, ref_type = build_graph_loop(*graph_args)
    vec = set(zip(vec_index[0].tolist(), vec_index[1].tolist(), vec_type.tolist()))
    ref = set(zip(ref_index[0].tolist(), ref_index[1].tolist(), ref_type.tolist()))
    assert vec == ref and len(vec) == vec_type.numel(), "vectorised and loop edge sets differ"

    t_vec, t_loop = median_seconds(
        [lambda: build_graph(*graph_args), lambda: build_graph_loop(*graph_args)], args.repeats
    )

    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, repeats {args.repeats}")
    print(
        f"lengths {lengths.tolist()} (U={int(lengths.sum())}), M={args.modalities}, "
        f"wp={args.wp}, wf={args.wf}"
    )
    print(f"edges          {vec_type.numel()}")
    print(f"build_graph      median {t_vec:.6f} s")
    print(f"build_graph_loop median {t_loop:.6f} s")
    print(f"speed-up       {t_loop / t_vec:.1f}x (target >= 20x)")


if __name__ == "__main__":
    main()
