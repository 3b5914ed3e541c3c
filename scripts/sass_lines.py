#!/usr/bin/env python3
"""SASS instructions per PTX line and source line, without cuobjdump/nvdisasm (CUDA 13 here ships neither;
scripts/sass.py shows the instructions themselves with Debian's nvdisasm 11.8).

ptxas -lineinfo writes two DWARF line tables into the cubin: .debug_line (SASS address -> .cu line) and
.nv_debug_line_sass (SASS address -> PTX line). Swapping the two sections' names lets objdump decode the
second one. Each SASS instruction is 16 bytes; the low 12 bits are the opcode (sm_90: 0x981 LDG, 0x984 LDS,
0x986 STG, 0x988 STS, 0x230 HADD2.F32, 0x220 FMUL, 0x221 FADD, 0x223 FFMA, 0x209 FMNMX, 0xf89 SHFL,
0x308 MUFU, 0x816 PRMT, 0x947 BRA, 0x94d EXIT; the 0x2xx/0x4xx/0x8xx/0xcxx forms are register/immediate/
constant operand variants of one op).

  scripts/sass_lines.py FILE.ptx KERNEL [--list] [--blocks] [RANGE ...]

FILE.ptx: `nvcc -ptx -lineinfo` output (the nvcc line of `ninja -t commands`, -ptx instead of -c);
KERNEL: a substring of one .entry name (mangled). Without options: SASS counts per source line.
--list: every SASS instruction (index, opcode, PTX line, source line, PTX text). --blocks: SASS per PTX
basic block (label to label). RANGE a-b: only SASS from PTX lines [a, b) of the kernel's own PTX (printed
with --blocks), the out-of-line code after the last EXIT left out: the dynamic count of a path is the sum
over the ranges of the blocks it runs.
"""
import collections
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile


def kernel_ptx(text, name):
    entries = [m.start() for m in re.finditer(r'\n(?:\.visible |\.weak )?\.entry', text)]
    files = text.index('\t.file')
    for i, start in enumerate(entries):
        end = entries[i + 1] if i + 1 < len(entries) else files
        if name in text[start:end].split('(')[0]:
            return text[:entries[0]] + text[start:end] + '\n' + text[files:]
    sys.exit(f'no .entry containing {name!r}')


def sections(data):
    shoff = struct.unpack_from('<Q', data, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from('<HHH', data, 0x3a)
    headers = [struct.unpack_from('<IIQQQQIIQQ', data, shoff + i * shentsize) for i in range(shnum)]
    names = headers[shstrndx][4]
    name = lambda off: data[names + off:data.index(b'\0', names + off)].decode()
    return {name(h[0]): (i, h) for i, h in enumerate(headers)}, shoff, shentsize


def sass_to_ptx_lines(cubin):
    data = bytearray(open(cubin, 'rb').read())
    secs, shoff, shentsize = sections(data)
    text = next(h for n, (i, h) in secs.items() if n.startswith('.text.'))
    code = bytes(data[text[4]:text[4] + text[5]])
    (a, ha), (b, hb) = secs['.debug_line'], secs['.nv_debug_line_sass']
    struct.pack_into('<I', data, shoff + a * shentsize, hb[0])
    struct.pack_into('<I', data, shoff + b * shentsize, ha[0])
    swapped = cubin + '.swapped'
    open(swapped, 'wb').write(data)
    out = subprocess.run(['objdump', '--dwarf=decodedline', swapped], capture_output=True, text=True, check=True).stdout
    rows = sorted((int(m.group(2), 16), int(m.group(1)))
                  for m in (re.match(r'\S+\s+(\d+)\s+(0x[0-9a-f]+|0)\s', l) for l in out.split('\n')) if m)
    result, j = [], 0
    for i in range(len(code) // 16):
        while j + 1 < len(rows) and rows[j + 1][0] <= i * 16:
            j += 1
        result.append((struct.unpack_from('<Q', code, i * 16)[0] & 0xfff, rows[j][1]))
    return result


def main():
    args = [a for a in sys.argv[1:] if not a.startswith('--')]
    if len(args) < 2:
        sys.exit(__doc__)
    ptx = kernel_ptx(open(args[0]).read(), args[1])
    ranges = [tuple(map(int, r.split('-'))) for r in args[2:]]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, 'kernel.ptx')
        open(path, 'w').write(ptx)
        ptxas = shutil.which('ptxas') or '/usr/local/cuda/bin/ptxas'
        subprocess.run([ptxas, '-arch=sm_90a', '-O3', '-lineinfo', path, '-o', path + '.cubin'], check=True)
        sass = sass_to_ptx_lines(path + '.cubin')
    lines = ptx.split('\n')
    src, loc = {}, None
    for n, l in enumerate(lines, 1):
        m = re.match(r'\s*\.loc\s+(\d+)\s+(\d+)', l)
        loc = f'{m.group(1)}:{m.group(2)}' if m else loc
        src[n] = loc
    last_exit = max(i for i, (op, _) in enumerate(sass) if op == 0x94d)
    if '--list' in sys.argv:
        for i, (op, line) in enumerate(sass):
            print(f'{i:5} {op:03x} L{line:<6} {src.get(line)!s:8} {lines[line - 1].strip()[:90]}')
    elif '--blocks' in sys.argv:
        per_line = collections.Counter(line for op, line in sass)
        label, start, count = 'entry', 1, 0
        for n, l in enumerate(lines + ['$end:'], 1):
            m = re.match(r'(\$\w+):', l.strip())
            if m:
                if count:
                    print(f'{label:14} PTX lines {start}-{n}: {count} SASS')
                label, start, count = m.group(1), n, 0
            count += per_line.get(n, 0)
    else:
        chosen = [(op, line) for i, (op, line) in enumerate(sass)
                  if not ranges or (i <= last_exit and any(a <= line < b for a, b in ranges))]
        by_src = collections.Counter(src.get(line) for op, line in chosen)
        for s, c in sorted(by_src.items(), key=lambda kv: -kv[1]):
            print(f'{s!s:10} {c}')
        print(f'total {len(chosen)} SASS')


if __name__ == '__main__':
    main()
