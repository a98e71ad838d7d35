"""The PyTorch peer's grouped_mm MoE layer (../shared/peers/moe_layer_torch.py, loaded as it is)
held back to back for --seconds, as bench_moe_layer --hold holds ours: each step timed alone
(CUDA events, synchronised, as the peer's own bench() does), the median over the second half,
and that half's wall-clock window (Unix ms) for matching a clock and power log. Only the
grouped_mm implementation runs; the peer's other two are skipped. One JSON line on stdout:
  python3 bench/peer_hold.py --peer .device/peers/moe_layer_torch.py --shape mixtral --seconds 6
"""
import argparse
import importlib.util
import json
import statistics
import sys
import time

SHAPES = {'mixtral': (16384, 4096, 14336, 8, 2), 'deepseek': (16384, 2048, 1408, 64, 6),
          'small': (8192, 1024, 2816, 16, 2)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--peer', required=True)
    ap.add_argument('--shape', default='mixtral', choices=sorted(SHAPES))
    ap.add_argument('--seconds', type=float, default=6.0)
    a = ap.parse_args()
    if not 0 < a.seconds <= 600:
        sys.exit('peer_hold: --seconds must be in (0, 600]')
    spec = importlib.util.spec_from_file_location('moe_layer_torch', a.peer)
    peer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(peer)
    import torch
    held = {}

    def hold(fn, iters=10, warm=3):
        if fn.__name__ != 'grouped':
            return float('inf')  # not held: the peer records 0 tok/s for it
        for _ in range(warm):
            fn()
        torch.cuda.synchronize()
        ts, t0, mid = [], time.time(), None
        while time.time() - t0 < a.seconds:
            s = torch.cuda.Event(enable_timing=True)
            e = torch.cuda.Event(enable_timing=True)
            s.record(); fn(); e.record(); torch.cuda.synchronize()
            ts.append(s.elapsed_time(e))
            if mid is None and time.time() - t0 >= a.seconds / 2:
                mid = time.time()
        half = ts[len(ts) // 2:]
        held.update(steps=len(ts), ms=statistics.median(half), from_unix_ms=round(mid * 1e3),
                    to_unix_ms=round(time.time() * 1e3), seconds=round(time.time() - t0, 1))
        return held['ms']

    peer.bench = hold
    results = []
    peer.run(*SHAPES[a.shape], results)
    if 'ms' not in held:
        sys.exit(f'peer_hold: the peer did not run grouped_mm: {results}')
    print(json.dumps(dict(impl='peer_hold', gemm='grouped_mm', shape=a.shape,
                          seconds=held['seconds'], steps=held['steps'], ms=round(held['ms'], 3),
                          from_unix_ms=held['from_unix_ms'], to_unix_ms=held['to_unix_ms'])))


if __name__ == '__main__':
    main()
