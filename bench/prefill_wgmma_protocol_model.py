# Protocol model of prefill_wgmma_kernel (s14p: INT4 with two producer warpgroups, K and V, raw rings of their own): roles as generators, mbarriers with phase parity,
# async copies landing at random later times, random interleavings. Checks: no hang, no buffer
# overwritten while read (tags), consumers read the right tiles.
import random, sys
class Bar:
    def __init__(s, n): s.n, s.arr, s.tx, s.done = n, 0, 0, 0
    def arrive(s, tx=0):
        s.arr += 1; s.tx += tx; s.check()
    def complete_tx(s, b):
        s.tx -= b; s.check()
    def check(s):
        if s.arr == s.n and s.tx == 0: s.arr = 0; s.done += 1
    def ready(s, parity): return (s.done & 1) != parity
class Named:
    def __init__(s): s.count, s.gen = 0, 0
def run(seed, int4, pingpong):
    R = random.Random(seed)
    items = []
    for _ in range(R.randint(1, 6)):
        nt = R.randint(1, 5)
        items.append((nt, R.randint(0, nt), R.randint(0, nt)))
    B = lambda n: Bar(n)
    full_k, full_v = [B(128), B(128)] if not int4 else [B(4), B(4)], None
    full_k = [B(4), B(4)]; full_v = [B(4), B(4)]  # producer warps as units (4 warps x 32 threads)
    empty_k = [B(8), B(8)]; empty_v = [B(8), B(8)]
    q_full = [B(4), B(4)]; q_empty = [B(8), B(8)]
    raw_full = [B(1) for _ in range(4)]; raw_free = [B(4), B(4), B(4), B(4)]
    kst = [None, None]; vst = [None, None]; raw = [None] * 4; qst = [None, None]
    readers = {}  # buffer name -> set of readers
    pending = []  # async events: (fn)
    named = {4: Named(), 5: Named()}
    def write(buf, idx, tag):
        key = (buf, idx)
        assert not readers.get(key), f"overwrite {key} by {tag} while read by {readers[key]}"
        {'k': kst, 'v': vst, 'raw': raw, 'q': qst}[buf][idx] = tag
    def wait(bar, par):
        while not bar.ready(par): yield 'blocked'
    def wait_free(empty, r):
        if r >= 2: yield from wait(empty[r & 1], ((r >> 1) - 1) & 1)
    def dq(is_v, kt, ring0, who, arrivals):
                    r = ring0 + kt; kv = 2 if is_v else 0
                    yield from wait(raw_full[kv + (r & 1)], (r >> 1) & 1)
                    yield from wait_free(empty_v if is_v else empty_k, r)
                    key = ('raw', kv + (r & 1)); readers.setdefault(key, set()).add(who)
                    assert raw[kv + (r & 1)] == ('raw', kv, r), (raw, kv, r)
                    yield 'step'
                    st = 'v' if is_v else 'k'
                    skey = (st, r & 1)
                    assert not readers.get(skey), f"overwrite {skey} while read by {readers[skey]}"
                    {'k': kst, 'v': vst}[st][r & 1] = (st, r)
                    readers[key].discard(who)
                    for _ in range(arrivals):
                        (full_v if is_v else full_k)[r & 1].arrive()
                        raw_free[kv + (r & 1)].arrive()
                    yield 'step'
    def producer(warp):
        ring0 = 0
        is_v = warp >= 4  # INT4: warps 0-3 dequantize K (and copy Q), 4-7 V
        lw = warp % 4
        for n, (nt, _, _) in enumerate(items):
            if not is_v:
                if n >= 2: yield from wait(q_empty[n & 1], ((n >> 1) - 1) & 1)
                def qland(n=n): write('q', n & 1, ('q', n)); q_full[n & 1].arrive()
                pending.append(qland)
                yield 'step'
            if not int4:
                for kt in range(nt + 1):
                    if kt < nt:
                        r = ring0 + kt
                        yield from wait_free(empty_k, r)
                        def kl(r=r): write('k', r & 1, ('k', r)); full_k[r & 1].arrive()
                        pending.append(kl); yield 'step'
                    if kt > 0:
                        r = ring0 + kt - 1
                        yield from wait_free(empty_v, r)
                        def vl(r=r): write('v', r & 1, ('v', r)); full_v[r & 1].arrive()
                        pending.append(vl); yield 'step'
            else:
                def copy_raw(is_v, kt):
                    r = ring0 + kt; kv = 2 if is_v else 0
                    if r >= 2: yield from wait(raw_free[kv + (r & 1)], ((r >> 1) - 1) & 1)
                    raw_full[kv + (r & 1)].arrive(tx=1)
                    def land(r=r, kv=kv): write('raw', kv + (r & 1), ('raw', kv, r)); raw_full[kv + (r & 1)].complete_tx(1)
                    pending.append(land); yield 'step'
                def dequant(is_v, kt):
                    yield from dq(is_v, kt, ring0, ('p', warp), 1)
                if lw == 0: yield from copy_raw(is_v, 0)
                for kt in range(nt):
                    if lw == 0 and kt + 1 < nt: yield from copy_raw(is_v, kt + 1)
                    yield from dequant(is_v, kt)
            ring0 += nt
    def consumer(cw):
        ring0 = 0
        inflight = []  # wgmma groups: (kind, r, buffers read)
        def nsync(i):
            nb = named[i]; g = nb.gen; nb.count += 1
            if nb.count == 2: nb.count = 0; nb.gen += 1
            while nb.gen == g: yield 'blocked'
        def narrive(i):
            nb = named[i]; nb.count += 1
            if nb.count == 2: nb.count = 0; nb.gen += 1
        def issue(kind, r):
            key = (kind, r & 1)
            assert {'k': kst, 'v': vst}[kind][r & 1] == (kind, r), ('read wrong tile', kind, r, kst, vst)
            readers.setdefault(key, set()).add(('c', cw, r)); inflight.append((kind, r))
        def wgwait(k):
            while len(inflight) > k:
                kind, r = inflight.pop(0)
                assert {'k': kst, 'v': vst}[kind][r & 1] == (kind, r), 'overwritten in flight'
                readers[(kind, r & 1)].discard(('c', cw, r))
        def release(empty, kind, r):
            assert ('c', cw, r) not in readers.get((kind, r & 1), set()), 'released while in flight'
            for _ in range(4): empty[r & 1].arrive()
        for n, (nt, w0, w1) in enumerate(items):
            nwg = w0 if cw == 0 else w1
            yield from wait(q_full[n & 1], (n >> 1) & 1)
            assert qst[n & 1] == ('q', n)
            readers.setdefault(('q', n & 1), set()).add(('c', cw))
            wfk = lambda kt: wait(full_k[(ring0 + kt) & 1], ((ring0 + kt) >> 1) & 1)
            wfv = lambda kt: wait(full_v[(ring0 + kt) & 1], ((ring0 + kt) >> 1) & 1)
            def pass_turn(kt):
                if pingpong and not (cw == 1 and kt == nt): narrive(5 - cw)
            if pingpong and cw == 1: narrive(4)
            kt = 0
            if nwg > 0:
                yield from wfk(0)
                if pingpong: yield from nsync(4 + cw)
                issue('k', ring0); pass_turn(0); yield 'step'
                wgwait(0); release(empty_k, 'k', ring0); yield 'step'
                for kt in range(1, nwg + 1):
                    last = kt == nwg
                    if not last or kt < nt: yield from wfk(kt)
                    if pingpong: yield from nsync(4 + cw)
                    if not last: issue('k', ring0 + kt)
                    wgwait(0 if last else 1); yield 'step'
                    if kt >= 2: release(empty_v, 'v', ring0 + kt - 2)
                    yield from wfv(kt - 1)
                    issue('v', ring0 + kt - 1); pass_turn(kt); yield 'step'
                    if not last:
                        wgwait(1); release(empty_k, 'k', ring0 + kt); yield 'step'
                    else:
                        wgwait(0)
                        if kt < nt: release(empty_k, 'k', ring0 + kt)
                        release(empty_v, 'v', ring0 + kt - 1)
                kt = nwg + 1
            for kt in range(kt, nt + 1):
                if kt < nt: yield from wfk(kt)
                if pingpong: yield from nsync(4 + cw)
                if kt > 0: yield from wfv(kt - 1)
                pass_turn(kt)
                if kt < nt: release(empty_k, 'k', ring0 + kt)
                if kt > 0: release(empty_v, 'v', ring0 + kt - 1)
                yield 'step'
            readers[('q', n & 1)].discard(('c', cw))
            for _ in range(4): q_empty[n & 1].arrive()
            ring0 += nt
    roles = [producer(w) for w in range(8 if int4 else 4)] + [consumer(0), consumer(1)]
    alive = list(range(len(roles)))
    stuck = 0
    while alive:
        if pending and R.random() < 0.3:
            pending.pop(R.randrange(len(pending)))(); stuck = 0; continue
        i = R.choice(alive)
        try:
            st = next(roles[i])
            stuck = stuck + 1 if st == 'blocked' else 0
        except StopIteration:
            alive.remove(i); stuck = 0
        if stuck > 5000 and not pending:
            raise AssertionError(f'hang seed {seed} items {items}')
    assert not pending or True
    return True
bad = 0
for int4 in (False, True):
    for pp in (False, True):
        for seed in range(int(sys.argv[1]) if len(sys.argv) > 1 else 500):
            try: run(seed, int4, pp)
            except AssertionError as e:
                bad += 1
                if bad < 5: print('FAIL', int4, pp, seed, e)
print('bad', bad)
