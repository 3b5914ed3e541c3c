# Protocol model of gemm_w4a4's stream-K kernel (wgmma_stream_k_kernel, GemmPath::WgmmaStreamK;
# bench/NOTES-gemm_w4a4.md "Session 15"): the shares, spans, owners and contributors of
# gemm_w4a4_plan.h (the same integer formulas); per block the producer's stage ring (`loaded` completes
# when the slab's copy lands, `consumed` counts the consumer warps' releases) across all the share's
# spans and its wait for the last releases before it exits; per consumer warp the slab loop (wait,
# read the stage, fold, release), the tail's partial stores + __threadfence + the flag's st.release,
# the head's poll of all its contributors' flags (relaxed loads, then fence.acq_rel), its reads of their
# partials in block order, the flags' reset, and the output. Global memory has per-warp store buffers whose plain stores become
# visible in any order (a fence waits for all of them, a release store only after them). Two launches
# of the kernel share the workspace, the second programmatically dependent on the first: its blocks may
# take an SM only once every block of the first has executed launch_dependents, and touch memory only
# after griddepcontrol.wait (the first grid complete and its stores visible). Blocks take the SMs in a
# random order, SMs = the plan's limit. Every warp is a coroutine; all of it runs in random
# interleavings. Checks: no hang; no stage overwritten while read and every read sees its own slab;
# each output tile = all its slabs once, summed in slab order (the owner's span, then the contributors'
# partials in block order: deterministic); no partial read before it was written (poison) or from the
# other launch; every flag zero after both launches. Also checks the output staging's index math
# (check_output_staging).
# Usage: python3 bench/protocol_gemm_w4a4_stream_k.py [seeds, default 300] [bug name: run with a
# deliberate protocol bug, which must make some seeds fail]
import random
import sys

BUGS = {
    'none': 'the kernel as written',
    'no_fence': 'the flag a plain store without the fence: it can become visible before the partial',
    'no_reset': 'the owner leaves the flag raised: the next launch reads the old partial',
    'arrival_order': 'the owner adds partials as their flags appear, not in block order',
    'no_acquire_fence': 'the owner polls the flags relaxed without the acquire fence: partial loads can pass the poll',
    'no_dependency_wait': 'the dependent launch touches the workspace before griddepcontrol.wait',
    'early_release': 'a consumer releases its stage before it has read it',
    'grid_above_sms': 'more blocks than SMs: an owner can hold the SM its contributor needs',
    'last_contributor_plus_one': 'the owner waits for one block too many',
}
POISON = 'poison'


def share_begin(b, iterations, blocks):
    return iterations * b // blocks


def span(it, end, slabs):
    tile = it // slabs
    s0 = it - tile * slabs
    return tile, s0, min(slabs, s0 + end - it)


def last_contributor(tile, slabs, iterations, blocks):
    x = (tile + 1) * slabs - 1
    return ((x + 1) * blocks - 1) // iterations


class MBar:  # completes a phase after `n` arrivals; `done` counts completed phases
    def __init__(s, n):
        s.n, s.arr, s.done = n, 0, 0

    def arrive(s):
        s.arr += 1
        assert s.arr <= s.n, 'mbarrier over-arrived'
        if s.arr == s.n:
            s.arr, s.done = 0, s.done + 1

    def ready(s, parity):
        return (s.done & 1) != parity


def run(seed, bug):
    R = random.Random(seed)
    tiles = R.randint(1, 12)
    slabs = R.randint(1, 9)
    iterations = tiles * slabs
    sms = R.randint(1, min(10, iterations))
    blocks = R.randint(1, sms)
    if bug == 'grid_above_sms':
        sms = R.randint(1, 3)
        blocks = R.randint(sms + 1, max(sms + 1, min(12, iterations)))
        if blocks > iterations:
            return None
    stages = R.choice([1, 2, 3, 8])
    warps = 2  # consumer warps (8 in the kernel): each has its own flag and partial slot
    mem = {}  # visible global memory: ('flag', b, w), ('partial', b, w)
    for b in range(blocks):
        for w in range(warps):
            mem[('flag', b, w)] = 0
            mem[('partial', b, w)] = POISON
    outputs = {}  # (launch, tile, warp) -> tuple of tokens in summation order
    pending = []  # events that happen at a random time: copy landings
    buffers = {}  # (launch, block, warp) -> store buffer: [[key, value, is_release]]
    launches = []

    def commit_one(buf, i):
        key, value, _ = buf.pop(i)
        mem[key] = value

    def committable(buf):  # plain stores in any order; a release store only once everything before it is visible
        return [i for i, e in enumerate(buf) if not e[2] or i == 0]

    def fence(buf):
        while buf:
            yield 'blocked'

    class Launch:
        def __init__(L, index):
            L.index, L.triggered, L.done_blocks, L.started = index, set(), set(), set()

        def complete(L):
            return len(L.done_blocks) == blocks and all(not buffers[k] for k in buffers if k[0] == L.index)

    def block(L, b):
        begin, end = share_begin(b, iterations, blocks), share_begin(b + 1, iterations, blocks)
        n = end - begin
        loaded = [MBar(1) for _ in range(stages)]
        consumed = [MBar(warps) for _ in range(stages)]
        stage = [None] * stages
        readers = [set() for _ in range(stages)]

        def land(p, what):
            assert not readers[p], f'stage {p} overwritten while read by warps {readers[p]}'
            stage[p] = what
            loaded[p].arrive()

        def dependency_wait():
            if L.index == 1 and bug != 'no_dependency_wait':
                while not launches[0].complete():
                    yield 'blocked'

        def producer():
            yield from dependency_wait()
            L.triggered.add(b)  # griddepcontrol.launch_dependents
            for i in range(n):
                it = begin + i
                tile, s = it // slabs, it % slabs
                p = i % stages
                if i >= stages:
                    while not consumed[p].ready(((i // stages) & 1) ^ 1):
                        yield 'blocked'
                pending.append(lambda p=p, what=(L.index, tile, s): land(p, what))
                yield 'step'
            for i in range(max(0, n - stages), n):  # every copy landed and was read before it leaves
                while not consumed[i % stages].ready((i // stages) & 1):
                    yield 'blocked'

        def consumer(w):
            yield from dependency_wait()
            buf = buffers.setdefault((L.index, b, w), [])
            acc = []
            for i in range(n):
                it = begin + i
                tile, s = it // slabs, it % slabs
                p = i % stages
                while not loaded[p].ready((i // stages) & 1):
                    yield 'blocked'
                if bug == 'early_release':
                    consumed[p].arrive()
                readers[p].add(w)
                yield 'reading'
                assert stage[p] == (L.index, tile, s), f'ring position {i} read {stage[p]}, expected {(L.index, tile, s)}'
                acc.append(stage[p])
                readers[p].discard(w)
                if bug != 'early_release':
                    consumed[p].arrive()
                yield 'step'
                if s != slabs - 1 and i != n - 1:
                    continue
                # the span whose last slab is ring position i ends here
                s0 = max(0, begin - tile * slabs)
                if s0 > 0:  # a tail: the partial, then the flag
                    buf.append([('partial', b, w), tuple(acc), False])
                    yield 'step'
                    if bug == 'no_fence':
                        buf.append([('flag', b, w), 1, False])
                    else:
                        yield from fence(buf)
                        buf.append([('flag', b, w), 1, True])
                    yield 'step'
                else:
                    if s + 1 < slabs:  # a head: the contributors' partials
                        last = last_contributor(tile, slabs, iterations, blocks)
                        if bug == 'last_contributor_plus_one':
                            last += 1
                        todo = list(range(b + 1, last + 1))
                        early = {c: mem.get(('partial', c, w), POISON) for c in todo}  # loads hoisted above the poll
                        if bug == 'arrival_order':  # each partial added as soon as its flag shows
                            while todo:
                                ready = [c for c in todo if c < blocks and mem[('flag', c, w)] != 0]
                                if not ready:
                                    yield 'blocked'
                                    continue
                                c = R.choice(ready)
                                part = mem[('partial', c, w)]
                                assert part != POISON, f'block {b} read block {c} partial before it was written'
                                acc.extend(part)
                                buf.append([('flag', c, w), 0, False])
                                todo.remove(c)
                                yield 'step'
                        # every flag polled (relaxed loads), then fence.acq_rel, then the partials in block order
                        while not all(c < blocks and mem[('flag', c, w)] != 0 for c in todo):
                            yield 'blocked'
                        yield 'step'
                        for c in todo:
                            part = early[c] if bug == 'no_acquire_fence' and R.random() < 0.5 else mem[('partial', c, w)]
                            assert part != POISON, f'block {b} read block {c} partial before it was written'
                            acc.extend(part)
                            yield 'step'
                        if bug != 'no_reset':
                            for c in todo:
                                buf.append([('flag', c, w), 0, False])
                    key = (L.index, tile, w)
                    assert key not in outputs, f'tile {tile} written twice'
                    outputs[key] = tuple(acc)
                acc = []
                yield 'step'

        return [producer()] + [consumer(w) for w in range(warps)]

    launches = [Launch(0), Launch(1)]
    waiting = {0: list(range(blocks)), 1: list(range(blocks))}
    running = []  # [launch, block, coroutines]
    free_sms = sms
    steps = idle = 0
    while True:
        steps += 1
        assert steps < 200000, 'too many steps'
        choices = []
        for L in (0, 1):
            if waiting[L] and free_sms > 0 and (L == 0 or len(launches[0].triggered) == blocks):
                choices.append(('dispatch', L))
        for r in running:
            for co in r[2]:
                choices.append(('run', r, co))
        for i in range(len(pending)):
            choices.append(('land', i))
        for key, buf in buffers.items():
            for i in committable(buf):
                choices.append(('commit', buf, i))
        if not choices:
            if not waiting[0] and not waiting[1] and not running:
                break
            raise AssertionError('hang: nothing can move')
        R.shuffle(choices)
        moved = False
        for c in choices:
            if c[0] == 'dispatch':
                L = c[1]
                b = waiting[L].pop(R.randrange(len(waiting[L])))
                running.append([L, b, block(launches[L], b)])
                free_sms -= 1
                moved = True
            elif c[0] == 'land':
                pending.pop(c[1])()
                moved = True
            elif c[0] == 'commit':
                commit_one(c[1], c[2])
                moved = True
            else:
                r, co = c[1], c[2]
                try:
                    what = next(co)
                except StopIteration:
                    r[2].remove(co)
                    if not r[2]:
                        running.remove(r)
                        launches[r[0]].done_blocks.add(r[1])
                        launches[r[0]].triggered.add(r[1])
                        free_sms += 1
                    moved = True
                    break
                if what == 'blocked':
                    continue
                moved = True
            break
        # A warp can change state and then block in the same advance: only two idle passes in a row
        # (every coroutine advanced, nothing moved) are a hang.
        idle = 0 if moved else idle + 1
        if idle >= 2:  # every warp waits, and no copy, store or block is left to move
            where = sorted(f'L{r[0]}b{r[1]}:{co.gi_frame.f_lineno if co.gi_frame else "-"}' for r in running for co in r[2])
            raise AssertionError(f'hang: every warp waits ({" ".join(where)}; waiting {waiting})')
    for L in (0, 1):
        for tile in range(tiles):
            for w in range(warps):
                want = tuple((L, tile, s) for s in range(slabs))
                got = outputs.get((L, tile, w))
                assert got == want, f'launch {L} tile {tile} warp {w}: summed {got}, want {want}'
    left = [k for k, v in mem.items() if k[0] == 'flag' and v != 0]
    assert not left, f'flags left raised: {left}'
    return True


def check_output_staging():
    """store_warp_rows' index math (gemm_w4a4.cu), under PTX's stmatrix semantics: a lane's register of an 8x8
    b16 matrix holds fragment row lane/4, columns 2(lane%4), +1; .trans stores fragment element (r, c) at
    position r of the row whose address lane 8i + c gives. Checks that every output read back for (token, W
    row) is the accumulator the fold put there (acc[4j + e]: W row g + 8(e >> 1), token 8j + 2t + (e & 1)),
    and that no stmatrix phase has two rows in one bank group."""
    def chunk(row, h):
        return row * 32 + ((h ^ (row >> 2 & 1)) << 4)
    for half in range(2):
        mem = {}
        for jj in range(0, 8, 2):
            j = 8 * half + jj
            addr = [chunk(8 * (jj + (lane // 8) // 2) + lane % 8, (lane // 8) % 2) for lane in range(32)]
            for i in range(4):  # matrix i: registers pack(acc[4j + 2i], acc[4j + 2i + 1])
                assert len({addr[8 * i + k] // 16 % 8 for k in range(8)}) == 8, 'stmatrix bank conflict'
                for lane in range(32):
                    for e in range(2):
                        a = addr[8 * i + 2 * (lane % 4) + e] + 2 * (lane // 4)
                        assert a not in mem, 'two outputs staged at one address'
                        mem[a] = (lane, 4 * j + 2 * i + e)
        for c in range(128):  # lane c % 32, round c // 32: chunk (row c / 2, half h = c % 2)
            row, h = c // 2, c % 2
            for e in range(8):
                lane, idx = mem[chunk(row, h) + 2 * e]
                w_row = lane // 4 + 8 * ((idx % 4) >> 1)
                token = 8 * (idx // 4) + 2 * (lane % 4) + (idx % 2)
                assert (w_row, token) == (8 * h + e, 64 * half + row), 'output staged in the wrong place'


def main():
    check_output_staging()
    seeds = int(sys.argv[1]) if len(sys.argv) > 1 else 300
    bugs = sys.argv[2:] if len(sys.argv) > 2 else ['none']
    status = 0
    for bug in bugs:
        bad, ran, first = 0, 0, None
        for seed in range(seeds):
            try:
                if run(seed, bug) is None:
                    continue
                ran += 1
            except AssertionError as e:
                ran += 1
                bad += 1
                first = first or f'seed {seed}: {e}'
        print(f'{bug:26s} {bad:4d} of {ran} runs bad' + (f'   first: {first}' if first else ''))
        if (bug == 'none') != (bad == 0):
            status = 1
    print('OK' if status == 0 else 'FAILED')
    sys.exit(status)


if __name__ == '__main__':
    main()
