#!/usr/bin/env python3
"""Rewrites a CRIU cpuinfo image (`criu cpuinfo dump -D DIR` writes
DIR/cpuinfo.img) into the image of another CPU: an Intel Xeon Phi 7295
(Knights Mill), whose AVX-512 PF/ER/4VNNIW/4FMAPS instructions no later CPU
has, so that `criu cpuinfo check` refuses the result on any host the tests
run on. The two hosts of the end-to-end tests share one CPU, so a CPU
mismatch can only be tested with an image recorded elsewhere.

    criu cpuinfo dump -D /tmp/own
    craft-cpuinfo.py /tmp/own/cpuinfo.img foreign-cpuinfo.img

The image format (CRIU 4.2.1, criu/include/magic.h, images/cpuinfo.proto):
two little-endian u32 magics (IMG_COMMON_MAGIC, CPUINFO_MAGIC), then one
entry: a little-endian u32 length and a protobuf `cpuinfo_entry` whose
field 1 is a `cpuinfo_x86_entry`. No protobuf library is needed: the
fields are varints, one string and a repeated (unpacked) uint32.
"""

import struct
import sys

IMG_COMMON_MAGIC = 0x54564319
CPUINFO_MAGIC = 0x61404013

# cpuinfo_x86_entry's fields.
VENDOR, FAMILY, MODEL, STEPPING, CAP_VER, CAPABILITY = 1, 2, 3, 4, 5, 6
MODEL_ID, XFEATURES_MASK, XSAVE_SIZE, XSAVE_SIZE_MAX = 7, 8, 9, 10
INTEL = 1

# Knights Mill, as Linux reports it: family 6, model 0x85.
KNIGHTS_MILL = {
    VENDOR: INTEL,
    FAMILY: 6,
    MODEL: 0x85,
    STEPPING: 0,
    MODEL_ID: b"Intel(R) Xeon Phi(TM) CPU 7295 @ 1.50GHz",
    # x87, SSE, AVX, opmask, ZMM_Hi256, Hi16_ZMM; its XSAVE area is 2688
    # bytes (no PKRU, no AMX).
    XFEATURES_MASK: 0xE7,
    XSAVE_SIZE: 2688,
    XSAVE_SIZE_MAX: 2688,
}

# (word, bit) of compel's x86_capability words
# (compel/arch/x86/src/lib/include/uapi/asm/cpu.h) set on Knights Mill and on
# no CPU since: AVX512PF, AVX512ER (CPUID 7.0 EBX, word 9), AVX512_4VNNIW,
# AVX512_4FMAPS (CPUID 7.0 EDX, word 18). CRIU's instruction check refuses
# an image with instructions the host lacks.
ADDED_FEATURES = [(9, 26), (9, 27), (18, 2), (18, 3)]


def varint(data, at):
    value, shift = 0, 0
    while True:
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, at


def encode_varint(value):
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def fields(data):
    """(field, wire type, value) of a protobuf message, in order."""
    at = 0
    while at < len(data):
        key, at = varint(data, at)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, at = varint(data, at)
        elif wire == 2:
            length, at = varint(data, at)
            value, at = data[at : at + length], at + length
        else:
            sys.exit(f"unexpected wire type {wire} for field {field}")
        yield field, wire, value


def encode(field, wire, value):
    key = encode_varint(field << 3 | wire)
    if wire == 0:
        return key + encode_varint(value)
    return key + encode_varint(len(value)) + value


def rewrite_x86(entry):
    values = {}
    capability = []
    for field, wire, value in fields(entry):
        if field == CAPABILITY:
            capability.append(value)
        else:
            values[field] = (wire, value)
    if values.get(CAP_VER, (0, 0))[1] != 2 or len(capability) != 19:
        sys.exit("expected capability version 2 with 19 words (CRIU 4.x)")
    for word, bit in ADDED_FEATURES:
        capability[word] |= 1 << bit
    for field, value in KNIGHTS_MILL.items():
        values[field] = (2 if isinstance(value, bytes) else 0, value)
    out = b""
    for field in sorted(set(values) | {CAPABILITY}):
        if field == CAPABILITY:
            out += b"".join(encode(CAPABILITY, 0, word) for word in capability)
        else:
            out += encode(field, *values[field])
    return out


def main():
    if len(sys.argv) != 3:
        sys.exit(f"usage: {sys.argv[0]} OWN-cpuinfo.img OUT-cpuinfo.img")
    data = open(sys.argv[1], "rb").read()
    common, magic, length = struct.unpack_from("<III", data)
    if (common, magic) != (IMG_COMMON_MAGIC, CPUINFO_MAGIC):
        sys.exit(f"{sys.argv[1]} is not a CRIU cpuinfo image")
    entry = data[12 : 12 + length]
    if len(entry) != length or len(data) != 12 + length:
        sys.exit(f"{sys.argv[1]} does not hold exactly one entry")
    out = b""
    for field, wire, value in fields(entry):
        if field == 1:
            value = rewrite_x86(value)
        out += encode(field, wire, value)
    image = struct.pack("<III", IMG_COMMON_MAGIC, CPUINFO_MAGIC, len(out)) + out
    open(sys.argv[2], "wb").write(image)


if __name__ == "__main__":
    main()
