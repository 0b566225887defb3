"""GPU smoke check of the 2:4 ops, one step per subprocess (a crash in one step cannot hide the others).

Run: python benchmarks/diag_cusparselt.py  -> prints one line per step; exit code 0 when step A (compress +
default-algorithm linear) works, 1 otherwise (the GPU runner then disables our cuSPARSELt path).
"""
import subprocess
import sys

PRE = """
import torch, torch.nn.functional as F
from llmprune_kernels.sparse24.backends import cusparselt as cslt
from llmprune_kernels.sparse24.dispatch import random_24_weight, time_ms
from llmprune_kernels.sparse24.pack import pack_24
from llmprune_kernels.sparse24.backends.decode import sparse24_mm
w = random_24_weight(4096, 4096, torch.float16, 'cuda')
def err(y, x): r = F.linear(x.float(), w.float()); return float((y.float() - r).abs().max() / r.abs().max())
"""
STEPS = {
    "A_compress_linear": """
c = cslt.compress(w)
for m in (1, 16, 2048):
    x = torch.randn(m, 4096, device='cuda', dtype=torch.float16)
    print('M', m, 'err', err(cslt.linear(x, c, 4096), x), 'plans', cslt.plan_count())
""",
    "B_every_alg": """
c = cslt.compress(w)
x = torch.randn(2048, 4096, device='cuda', dtype=torch.float16)
n = cslt.max_alg_id(x, c, 4096)
print('max_alg_id', n)
for a in range(n + 1):
    try:
        e = err(cslt.linear(x, c, 4096, None, cslt.CsltConfig(a)), x)
        print(a, 'err %.2e' % e, 'ms %.4f' % time_ms([lambda: cslt.linear(x, c, 4096, None, cslt.CsltConfig(a))], reps=10))
    except RuntimeError as exc:
        print(a, 'rejected', str(exc)[:120])
print('dense ms %.4f' % time_ms([lambda: F.linear(x, w)], reps=10))
""",
    "C_decode_peek": """
p = pack_24(w)
for m in (1, 16):
    x = torch.randn(m, 4096, device='cuda', dtype=torch.float16)
    print('M', m, 'err', err(sparse24_mm(x, p.values, p.meta, None, 4096), x))
    ws = [random_24_weight(4096, 4096, torch.float16, 'cuda') for _ in range(6)]
    ps = [pack_24(v) for v in ws]
    td = time_ms([lambda v=v: F.linear(x, v) for v in ws])
    ts = time_ms([lambda q=q: sparse24_mm(x, q.values, q.meta, None, 4096) for q in ps])
    print('M', m, 'dense_ms %.4f decode_ms %.4f speedup %.2f' % (td, ts, td / ts))
""",
    "D_library_search": """
c = cslt.compress(w)
x = torch.randn(2048, 4096, device='cuda', dtype=torch.float16)
print(cslt.library_search(x, c, 4096))
""",
}

ok_a = False
for name, body in STEPS.items():
    r = subprocess.run([sys.executable, "-c", PRE + body], capture_output=True, text=True, timeout=120)
    tail = (r.stdout + r.stderr).strip().splitlines()[-25:]
    print(f"=== {name}: rc={r.returncode}")
    print("\n".join(tail))
    if name.startswith("A_") and r.returncode == 0:
        ok_a = True
sys.exit(0 if ok_a else 1)
