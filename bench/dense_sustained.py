"""Dense bf16 GEMM rate against the SM clock over time, on one GPU (PyTorch, the GPU machine).

Runs torch.matmul on (n, n) bf16 operands back to back for --seconds, and prints per window of
--window seconds: the TFLOP/s, the SM clock and board power sampled by nvidia-smi beside it,
and the FLOPs per SM per clock (the rate's share of the tensor cores' per-clock peak of 4096
dense bf16 FLOP/clk/SM on Hopper). It tells whether a sustained GEMM load keeps the clock
where a short benchmark sees it: the MoE layer's GEMMs (bench/gpu-moe-ab.sh) run at
1650-1770 MHz.
    python3 bench/dense_sustained.py [--n 8192] [--seconds 6] [--window 0.5] [--json FILE]
--json writes {"impl": "dense_sustained", "n", "tflops" (the median window after the first),
"mhz", "watts"} to FILE.
"""
import argparse
import json
import statistics
import subprocess
import time

import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--n', type=int, default=8192)
    ap.add_argument('--seconds', type=float, default=6.0)
    ap.add_argument('--window', type=float, default=0.5)
    ap.add_argument('--json')
    a = ap.parse_args()
    n = a.n
    x = torch.randn(n, n, device='cuda', dtype=torch.bfloat16)
    y = torch.randn(n, n, device='cuda', dtype=torch.bfloat16)
    smi = subprocess.Popen(['nvidia-smi', '--query-gpu=clocks.sm,power.draw',
                            '--format=csv,noheader,nounits', '-lms', '50'],
                           stdout=subprocess.PIPE, text=True)
    nsm = torch.cuda.get_device_properties(0).multi_processor_count
    flop = 2.0 * n * n * n
    windows = []
    t_end = time.time() + a.seconds
    while time.time() < t_end:
        start = torch.cuda.Event(enable_timing=True)
        stop = torch.cuda.Event(enable_timing=True)
        t0 = time.time()
        start.record()
        k = 0
        while time.time() - t0 < a.window:
            for _ in range(8):
                torch.matmul(x, y)
            k += 8
            torch.cuda.synchronize()
        stop.record()
        stop.synchronize()
        windows.append((t0, time.time(), k * flop / (start.elapsed_time(stop) * 1e9)))
    smi.terminate()
    samples = [l.split(', ') for l in smi.communicate()[0].splitlines() if l.strip()]
    # nvidia-smi's samples are spread evenly over the run; give each window its share
    per = max(1, len(samples) // max(1, len(windows)))
    print(f'{torch.cuda.get_device_name(0)}, {nsm} SMs, bf16 {n}^3, torch {torch.__version__}')
    rows = []
    for i, (t0, t1, tf) in enumerate(windows):
        chunk = samples[i * per:(i + 1) * per] or samples[-1:]
        mhz = sum(float(c[0]) for c in chunk) / len(chunk)
        watt = sum(float(c[1]) for c in chunk) / len(chunk)
        eff = tf * 1e12 / (nsm * mhz * 1e6)
        rows.append((tf, mhz, watt))
        print(f'window {i:2d}: {tf:6.1f} TFLOP/s  sm {mhz:5.0f} MHz  {watt:4.0f} W  '
              f'{eff:5.0f} FLOP/clk/SM ({100 * eff / 4096:.1f}% of 4096)')
    if a.json:
        held = rows[1:] or rows  # the first window is the ramp up to the power cap
        with open(a.json, 'w') as f:
            json.dump({'impl': 'dense_sustained', 'n': n,
                       'tflops': round(statistics.median(r[0] for r in held), 1),
                       'mhz': round(statistics.median(r[1] for r in held)),
                       'watts': round(statistics.median(r[2] for r in held))}, f)


if __name__ == '__main__':
    main()
