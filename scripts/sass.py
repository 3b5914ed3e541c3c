#!/usr/bin/env python3
"""Real SASS of our sm_90a cubins on a machine without a GPU toolkit's disassembler, and its loops summarised.

CUDA 13 here ships no cuobjdump/nvdisasm. Debian's non-free `nvidia-cuda-toolkit` (11.8) has nvdisasm, which
decodes sm_90 SASS (IGMMA, WARPGROUP.*, SYNCS.* included) but not the ELF header CUDA 12+ writes (OS/ABI 0x41,
ABI version 8, new e_flags: "does not contain Cuda architecture information"). The instruction encoding is the
same, so a copy of the cubin with the old header (OS/ABI 0x33, ABI 7, e_flags SM90) disassembles; checked on a
kernel built by both toolkits: identical listings. Get it without installing its dependencies:
  apt-get download nvidia-cuda-toolkit && dpkg -x nvidia-cuda-toolkit_*.deb /opt/cuda118   (non-free enabled)
  NVDISASM=/opt/cuda118/usr/bin/nvdisasm scripts/sass.py ...
A cubin: the nvcc line of `ninja -t commands nibble_cuda` for the .cu, `-cubin` instead of `-c`.

  scripts/sass.py list CUBIN KERNEL          the kernel's SASS with each instruction's scheduling fields
  scripts/sass.py loops CUBIN KERNEL         per loop (a backward branch): size, stall cycles, opcode mix,
                                             the wgmma events in order (ARRIVE, IGMMA ... gsb0 = a commit,
                                             DEPBAR.LE n = wait until n groups are pending)
  scripts/sass.py kernels CUBIN              kernel names (mangled) with their instruction counts
  scripts/sass.py hazards CUBIN KERNEL       instructions that write an in-flight wgmma group's A or accumulator
                                             registers, or read its accumulators, before the WARPGROUP.DEPBAR
                                             that retires it (address order, branches not followed); exit 1 if any

KERNEL: a substring of the mangled name (the first match is taken). nvdisasm 11.8 leaves out a few labels (seen
in the attention decode kernels): a loop whose head has no label line is not listed; `list` still shows its code.
The scheduling fields are the compiler's control bits of each 128-bit instruction: stall (cycles before the warp
may issue its next instruction), yield, the scoreboard it sets on write / read, the scoreboards it waits for. The sum of stalls along a loop
body is the fewest cycles one warp needs for an iteration if no scoreboard wait or barrier ever blocks it:
with w warps a scheduler, an iteration of all of them takes at least max(sum of stalls, w x instructions).
"""
import collections
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile

LINE = re.compile(r'^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;?\s*/\* (0x[0-9a-f]{16}) \*/\s*$')
CONTROL = re.compile(r'^\s*/\* (0x[0-9a-f]{16}) \*/\s*$')
LABEL = re.compile(r'^(\.L_x_\d+):')
FUNCTION = re.compile(r'^\.text\.(\S+):')
BRANCH = re.compile(r'BRA\b.*`\((\.L_x_\d+)\)')


def nvdisasm():
    tool = os.environ.get('NVDISASM') or shutil.which('nvdisasm')
    if not tool:
        sys.exit('no nvdisasm: set NVDISASM (see this script\'s help for where Debian has one)')
    return tool


def old_header_copy(cubin, directory):
    data = bytearray(open(cubin, 'rb').read())
    if data[:4] != b'\x7fELF' or struct.unpack_from('<H', data, 0x12)[0] != 190:
        sys.exit(f'{cubin}: not a CUDA cubin (an ELF file for machine 190, EM_CUDA)')
    flags = struct.unpack_from('<I', data, 0x30)[0]
    arch = (flags >> 8) & 0xff if data[8] >= 8 else flags & 0xff  # ABI 8 moved the SM field
    if arch != 90:
        sys.exit(f'{cubin}: sm_{arch}, this reader is for sm_90 / sm_90a cubins')
    data[7], data[8] = 0x33, 7
    struct.pack_into('<I', data, 0x30, 0x5a055a)
    path = os.path.join(directory, 'old_header.cubin')
    open(path, 'wb').write(data)
    return path


class Instruction:
    def __init__(self, address, text, high):
        self.address, self.text = address, text
        self.opcode = text.split()[0] if not text.startswith('@') else text.split()[1]
        self.predicate = text.split()[0] if text.startswith('@') else ''
        control = high >> 41
        self.stall = control & 0xf
        self.yield_ = (control >> 4) & 1
        self.write_sb = (control >> 5) & 7
        self.read_sb = (control >> 8) & 7
        self.wait_mask = (control >> 11) & 0x3f
        self.reuse = (control >> 17) & 0xf

    def fields(self):
        sb = lambda b: '-' if b == 7 else str(b)
        waits = ''.join(str(i) for i in range(6) if self.wait_mask >> i & 1) or '-'
        return f'S{self.stall:02d} {"Y" if self.yield_ else "-"} W{sb(self.write_sb)} R{sb(self.read_sb)} B{waits:<6}'


def disassemble(cubin):
    """{kernel: [(label or None, Instruction)]} in address order."""
    with tempfile.TemporaryDirectory() as tmp:
        out = subprocess.run([nvdisasm(), '-hex', '-c', old_header_copy(cubin, tmp)],
                             capture_output=True, text=True)
    if out.returncode:
        sys.exit(f'nvdisasm failed on {cubin}: {out.stderr.strip()}')
    kernels, current, pending_label, last = {}, None, None, None
    for line in out.stdout.splitlines():
        if m := FUNCTION.match(line):
            current = kernels.setdefault(m.group(1), [])
            continue
        if current is None:
            continue
        if m := LABEL.match(line):
            pending_label = m.group(1)
        elif m := LINE.match(line):
            last = (int(m.group(1), 16), m.group(2).strip().rstrip(';').strip())
        elif (m := CONTROL.match(line)) and last:
            current.append((pending_label, Instruction(last[0], last[1], int(m.group(1), 16))))
            pending_label, last = None, None
    return kernels


def pick(kernels, name):
    found = [k for k in kernels if name in k]
    if not found:
        sys.exit(f'no kernel containing {name!r}; `kernels` lists them')
    return found[0], kernels[found[0]]


def loops(code):
    """(start, end) index ranges of the bodies closed by a backward branch, innermost first. A branch back
    from the out-of-line code after the kernel's EXITs (mbarrier retry stubs) closes no loop."""
    at = {label: i for i, (label, _) in enumerate(code) if label}
    found = []
    for i, (_, ins) in enumerate(code):
        m = BRANCH.search(ins.text)
        if m and m.group(1) in at and at[m.group(1)] <= i:
            if not any(other.opcode == 'EXIT' and not other.predicate for _, other in code[at[m.group(1)]:i]):
                found.append((at[m.group(1)], i + 1))
    return sorted(set(found), key=lambda r: (r[1] - r[0], r[0]))


def wgmma_events(body):
    events = []
    for _, ins in body:
        if ins.opcode.startswith(('IGMMA', 'HGMMA')):
            events.append(ins.opcode.split('.')[0] + ('*' if ins.text.rstrip().endswith('gsb0') else ''))
        elif ins.opcode == 'WARPGROUP.ARRIVE':
            events.append('A')
        elif ins.opcode == 'WARPGROUP.DEPBAR.LE':
            events.append('D' + ins.text.split('0x')[-1].strip())
        elif ins.opcode.startswith('SYNCS.PHASECHK'):
            events.append('wait')
    return ' '.join(events)


# Opcodes whose first operand is not a register they write.
NO_DEST = re.compile(r'^(ST|RED|ATOM|BRA|BAR|SYNCS|WARP|EXIT|RET|CALL|BSYNC|BSSY|MEMBAR|ERRBAR|CGAERRBAR|NOP|DEPBAR|'
                     r'ISETP|FSETP|PLOP3|U|R2UR|ARRIVES|ELECT)')


def registers(operand, width):
    m = re.match(r'-?\|?R(\d+)\b', operand)
    return set(range(int(m.group(1)), int(m.group(1)) + width)) if m else set()


def hazards(code):
    """(instruction, group's first wgmma, registers written, accumulators read) for every instruction that touches
    an in-flight group's registers. A group is the wgmma up to the one marked gsb0 (a commit); DEPBAR.LE n retires
    all but the n newest. A wgmma's accumulators: N / 2 registers a thread for 64 x N int32 or fp32 sums (N from
    the opcode), N / 4 for fp16; its A operand from registers: 4."""
    pending, current, found = [], None, []
    for _, ins in code:
        text = ins.text[len(ins.predicate):].strip()
        operands = [o.strip() for o in text[len(ins.opcode):].split(',')]
        if ins.opcode.startswith(('IGMMA', 'HGMMA')):
            n = int(re.search(r'\.64x(\d+)x', ins.opcode).group(1))
            accumulators = n // 2 if ins.opcode.startswith('IGMMA') or '.F32' in ins.opcode else n // 4
            current = current or {'first': ins, 'a': set(), 'd': set()}
            current['d'] |= registers(operands[0], accumulators)
            current['a'] |= registers(operands[1], 4)
            if text.endswith('gsb0'):
                pending.append(current)
                current = None
        elif ins.opcode == 'WARPGROUP.DEPBAR.LE':
            keep = int(operands[-1], 16)
            pending = pending[len(pending) - keep:] if keep else []
        elif pending:
            width = 4 if '.128' in ins.opcode else 2 if ('.64' in ins.opcode or '.WIDE' in ins.opcode) else 1
            writes = set() if NO_DEST.match(ins.opcode) else registers(operands[0], width)
            reads = {int(r) for o in (operands[1:] if writes else operands) for r in re.findall(r'\bR(\d+)\b', o)}
            for group in pending:
                written, read = writes & (group['a'] | group['d']), reads & group['d']
                if written or read:
                    found.append((ins, group['first'], sorted(written), sorted(read)))
    return found


def main(argv):
    if len(argv) < 2 or argv[0] not in ('list', 'loops', 'kernels', 'hazards'):
        sys.exit(__doc__)
    kernels = disassemble(argv[1])
    if argv[0] == 'kernels':
        for name, code in kernels.items():
            print(f'{len(code):6d}  {name}')
        return
    if len(argv) < 3:
        sys.exit(__doc__)
    name, code = pick(kernels, argv[2])
    print(f'# {name}: {len(code)} instructions')
    if argv[0] == 'hazards':
        found = hazards(code)
        for ins, first, writes, reads in found:
            print(f'  {ins.address:05x}  {ins.text}   [group from {first.address:05x}: writes {writes}, reads {reads}]')
        print(f'{len(found)} hazards')
        sys.exit(1 if found else 0)
    if argv[0] == 'list':
        for label, ins in code:
            if label:
                print(f'{label}:')
            print(f'  {ins.address:05x}  {ins.fields()}  {ins.text}')
        return
    for start, end in loops(code):
        body = code[start:end]
        mix = collections.Counter(ins.opcode.split('.')[0] for _, ins in body)
        local = sum(n for op, n in mix.items() if op in ('LDL', 'STL'))
        print(f'\nloop {code[start][0]} [{body[0][1].address:05x}, {body[-1][1].address:05x}]: '
              f'{len(body)} instructions, {sum(ins.stall for _, ins in body)} stall cycles, local memory {local}')
        print('  ' + ', '.join(f'{op} {n}' for op, n in mix.most_common()))
        if events := wgmma_events(body):
            print('  wgmma: ' + events)


if __name__ == '__main__':
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # quiet under `| head`
    main(sys.argv[1:])
