import gzip, re, sys, statistics as st, collections
from datetime import datetime
def ts(l): return datetime.fromisoformat(l[:26]).timestamp()
for f in sys.argv[1:]:
    lines = gzip.open(f,'rt').read().splitlines()
    ev = []
    for l in lines:
        if 'admitted to a batch' in l or 'denoised engine' in l:
            kv = dict(re.findall(r'(\w+)=([\w.]+)', l.split('diffit_server::engine::scheduler:')[1]))
            kind = 'adm' if 'admitted' in l else 'den'
            http = 'request{' in l
            ev.append((ts(l), kind, http, kv))
    # passes: split by the 2-step warmup; http flagged
    # engine-vs-png passes separated by gap; identify by time clustering
    t0 = ev[0][0]
    # gap-based segmentation on admitted events
    segs = []; cur=[]; last=None
    for e in ev:
        if last is not None and e[0]-last > 0.3 and e[1]=='adm' and not cur[-1:] == []:
            pass
        cur.append(e); last=e[0]
    # simpler: label by steps and http
    den = [e for e in ev if e[1]=='den' and e[3]['steps']=='50']
    adm = [e for e in ev if e[1]=='adm']
    print(f"\n# {f}: {len(den)} denoised(50 steps), {len(adm)} admitted")
    # split passes by time: find big gaps between consecutive denoised
    den.sort(key=lambda e:e[0])
    bounds=[den[0][0]-4]
    for a,b in zip(den,den[1:]):
        if b[0]-a[0] > 0.5: bounds.append((a[0]+b[0])/2)
    bounds.append(den[-1][0]+1)
    print("pass boundaries (s):", [round(b-t0,2) for b in bounds])
    for p in range(len(bounds)-1):
        lo,hi = bounds[p],bounds[p+1]
        D=[e for e in den if lo<e[0]<=hi]; A=[e for e in adm if lo-3.5<e[0]<=hi and e[0] > (bounds[p-1] if p else 0)]
        A=[e for e in adm if lo-3.2 < e[0] <= hi-2.5]
        per = collections.defaultdict(list)
        for e in D: per[e[3]['engine']].append(float(e[3]['batch_mean']))
        waits=[int(e[3]['queue_wait_ms']) for e in A]
        http=sum(e[2] for e in D)
        dms=[int(e[3]['denoise_ms']) for e in D]
        print(f"pass {p}: {len(D)} jobs (http-spanned {http}); per engine jobs/mean batch: " +
              ", ".join(f"e{k}: {len(v)}/{st.mean(v):.1f}" for k,v in sorted(per.items())) +
              f"; denoise ms p50 {st.median(dms):.0f} max {max(dms)}; queue wait ms p50 {st.median(waits) if waits else 0} p99 {sorted(waits)[int(.99*len(waits))] if waits else 0} max {max(waits) if waits else 0}")
