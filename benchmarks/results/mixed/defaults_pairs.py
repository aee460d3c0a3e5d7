"""Paired differences of the `(library defaults)` rows of a --mixed runs-*.json (README: defaults benchmarked)."""
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # benchmarks/
import quality as q

d = json.load(open(sys.argv[1]))
runs = d['runs']
names = ['python','licenses','changelog','weak','weak_s1','general','c_headers','manpages']
pure, mixed = q.split_mixed(runs)
methods = [m for m in q.ALL_METHODS if any(r['method'] == m for r in runs)]
for label, rs in (('mixed', mixed), ('pure', pure)):
    agg = q.aggregate(rs, methods, names)
    ps = agg['per_seed']
    for a, b in (('adaptive (library defaults)', 'oracle (library defaults)'), ('min_ce (library defaults)', 'oracle (library defaults)'),
                 ('adaptive (library defaults)', 'min_ce (library defaults)'), ('oracle (library defaults)', 'oracle')):
        diffs = [ps[a][s]['interference'] - ps[b][s]['interference'] for s in ps[a] if s in ps[b]]
        print(label, f'{a} - {b}: {statistics.fmean(diffs):+.3f} ± {statistics.stdev(diffs):.3f} (n={len(diffs)})')
