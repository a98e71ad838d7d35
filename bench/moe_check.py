# Checks bench_moe_layer --dump against PyTorch: the peer's grouped() math (copied from
# ../shared/peers/moe_layer_torch.py, bf16 on cuda) on the dumped weights, out and every gradient
# by autograd of out.float().pow(2).mean(), norm-wise relative errors and routing agreement.
# usage: python3 bench/moe_check.py DUMP_DIR   (DIR holds meta.json, or sub-folders that do)
# On near ties (top-k+1 log-probabilities within TIE) the reference takes semoe's choice, since
# the tie-break there is arbitrary; elsewhere the routing must agree. Exits 1 when an error
# passes TOL or more than 0.1% of tokens route differently off near ties.
import json, os, sys
import torch
import torch.nn.functional as F

TOL = 2e-2
TIE = 0.02  # log-probability gap under which two experts count as a near tie (~2.5 bf16 ulps)


def grouped(x, wg, w1, w3, w2, k, pick=None):
    # The peer's grouped(), returning out and the routing; pick (mask, idx) replaces topk's
    # choice on the masked tokens (near ties, where the tie-break is arbitrary) by semoe's:
    # gather has topk's gradient, so autograd is unchanged.
    T, d = x.shape
    E = wg.shape[1]
    logits = x @ wg
    p = logits.float().softmax(-1)
    w, idx = p.topk(k, dim=-1)
    if pick is not None:
        idx = torch.where(pick[0][:, None], pick[1], idx)
        w = p.gather(-1, idx)
    w = (w / w.sum(-1, keepdim=True)).to(x.dtype)
    flat = idx.reshape(-1)
    order = flat.argsort(stable=True)
    counts = torch.bincount(flat, minlength=E)
    offs = counts.cumsum(0).to(torch.int32)
    tok = order // k
    h = x[tok]
    a = torch._grouped_mm(h, w1, offs=offs)
    b = torch._grouped_mm(h, w3, offs=offs)
    y = torch._grouped_mm(F.silu(a) * b, w2, offs=offs)
    y = y * w.reshape(-1)[order, None]
    out = torch.zeros_like(x).index_add(0, tok, y)
    return out, idx, p


def load(dirname, name, shape, dtype=torch.bfloat16):
    with open(os.path.join(dirname, name), 'rb') as fp:
        raw = bytearray(fp.read())
    return torch.frombuffer(raw, dtype=dtype).reshape(shape).to('cuda')


def check(dirname):
    meta = json.load(open(os.path.join(dirname, 'meta.json')))
    T, d, f, E, k = (meta[n] for n in ('T', 'd', 'f', 'E', 'k'))
    # semoe's layouts (nn.Linear's (out, in); W1 and W3 stacked) into the peer's (in, out)
    x = load(dirname, 'x.bin', (T, d))
    wg = load(dirname, 'wg.bin', (E, d))
    w13 = load(dirname, 'w13.bin', (E, 2 * f, d))
    w2 = load(dirname, 'w2.bin', (E, d, f))
    peer = dict(x=x, wg=wg.t(), w1=w13[:, :f].transpose(1, 2), w3=w13[:, f:].transpose(1, 2),
                w2=w2.transpose(1, 2))
    ins = {n: t.contiguous().requires_grad_() for n, t in peer.items()}
    sidx = load(dirname, 'idx.bin', (T, k), torch.int32).long()
    with torch.no_grad():  # torch's own routing first, to find the near ties
        _, idx, p = grouped(ins['x'], ins['wg'], ins['w1'], ins['w3'], ins['w2'], k)
    lp = p.log().sort(-1, descending=True).values[:, :min(k + 1, E)]
    tie = (lp[:, :-1] - lp[:, 1:] < TIE).any(-1) if lp.shape[1] > 1 else torch.zeros(T, dtype=torch.bool, device='cuda')
    out, _, _ = grouped(ins['x'], ins['wg'], ins['w1'], ins['w3'], ins['w2'], k, pick=(tie, sidx))
    out.float().pow(2).mean().backward()
    ref = dict(out=out.detach(), dx=ins['x'].grad, dwg=ins['wg'].grad.t(),
               dw13=torch.cat([ins['w1'].grad.transpose(1, 2), ins['w3'].grad.transpose(1, 2)], 1),
               dw2=ins['w2'].grad.transpose(1, 2))
    got_shapes = dict(out=(T, d), dx=(T, d), dwg=(E, d), dw13=(E, 2 * f, d), dw2=(E, d, f))
    ok = True
    errs = {}
    for n, s in got_shapes.items():
        got = load(dirname, n + '.bin', s).float()
        r = ref[n].float()
        err = ((got - r).norm() / r.norm().clamp_min(1e-30)).item()
        errs[n] = err
        good = err <= TOL and torch.isfinite(got).all().item()
        ok &= good
        print(f'  {n:4s} rel err {err:.3e}  (|ref| {r.norm().item():.4e})  {"ok" if good else "FAIL"}')
    # routing: semoe's idx against torch's on tokens whose top-k+1 probabilities are not near ties
    same = (sidx == idx).all(-1)
    bad = (~same & ~tie).sum().item()
    print(f'  routing: {same.float().mean().item() * 100:.3f}% of tokens equal; {tie.sum().item()} near ties; '
          f'{bad} differ off near ties  {"ok" if bad <= T * 1e-3 else "FAIL"}')
    ok &= bad <= T * 1e-3
    return ok, errs


def main():
    if len(sys.argv) != 2:
        print('usage: moe_check.py DUMP_DIR', file=sys.stderr)
        return 2
    root = sys.argv[1]
    dirs = [root] if os.path.exists(os.path.join(root, 'meta.json')) else sorted(
        os.path.join(root, s) for s in os.listdir(root) if os.path.exists(os.path.join(root, s, 'meta.json')))
    if not dirs:
        print(f'moe_check: {root}: no meta.json in it or its sub-folders (bench_moe_layer --dump {root})', file=sys.stderr)
        return 1
    allok = True
    for dirname in dirs:
        meta = json.load(open(os.path.join(dirname, 'meta.json')))
        print(f'== {dirname}: T={meta["T"]} d={meta["d"]} f={meta["f"]} E={meta["E"]} k={meta["k"]} gemm={meta["gemm"]}', flush=True)
        ok, errs = check(dirname)
        print(json.dumps(dict(check=os.path.basename(dirname), ok=bool(ok), **{k: round(v, 6) for k, v in errs.items()})), flush=True)
        allok &= ok
        torch.cuda.empty_cache()
    print('== moe_check: ' + ('all within %.0e' % TOL if allok else 'FAILED'))
    return 0 if allok else 1


if __name__ == '__main__':
    sys.exit(main())
