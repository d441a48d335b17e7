# Intel AMX tile instructions for the CPU kernels (dynamic_int8_matmul.mojo, full_attention.mojo).
#
# AMX (Sapphire Rapids and later) holds 8 tiles of up to 16 rows x 64 bytes and multiplies them in
# a unit of its own: tdpbusd sums four u8 x i8 products into each int32 (as AVX-512 VNNI's vpdpbusd
# does, exactly), tdpbf16ps two bf16 x bf16 products into each fp32. A process must ask Linux for
# the tile state first (amx_granted), and each thread load a tile configuration (amx_configure)
# before its first tile instruction and release it after its last (amx_release).
from std.ffi import external_call
from std.sys import CompilationTarget, inlined_assembly

# The instructions are written as their bytes: MAX's CPU target does not enable LLVM's AMX features,
# so their intrinsics cannot be selected. Operands sit in fixed registers: rdi the address, rsi the
# row stride (the SIB byte 0x37 = base rdi, index rsi, scale 1). Intel SDM encodings: LDTILECFG
# VEX.128.NP.0F38.W0 49 /0, TILERELEASE VEX.128.NP.0F38.W0 49 C0, TILEZERO VEX.128.F2.0F38.W0 49
# 11:rrr:000, TILELOADD VEX.128.F2.0F38.W0 4B, TILESTORED VEX.128.F3.0F38.W0 4B, TDPBUSD
# VEX.128.66.0F38.W0 5E 11:rrr:bbb and TDPBF16PS VEX.128.F3.0F38.W0 5C 11:rrr:bbb, with the third
# tile in VEX.vvvv (inverted).
comptime AMX_ROWS = 16  # rows of every tile amx_configure sets up
comptime AMX_ROW_BYTES = 64  # bytes of each of their rows
comptime SYS_ARCH_PRCTL = 158
comptime ARCH_REQ_XCOMP_PERM = 0x1023
comptime XFEATURE_XTILEDATA = 18


def amx_granted() -> Bool:
    """Whether this process may use AMX tiles: Linux (5.16 and later) grants the tile state on request
    where the CPU has it and refuses it elsewhere. Asking again once granted is harmless and cheap."""
    comptime if CompilationTarget.is_x86():
        return external_call["syscall", Int](SYS_ARCH_PRCTL, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0
    else:
        return False


@always_inline
def amx_configure(cfg: Pointer[UInt8, MutAnyOrigin]):
    """Loads a tile configuration (64 bytes at cfg): palette 1, all 8 tiles 16 rows of 64 bytes."""
    for i in range(64):
        cfg.unsafe_store(i, UInt8(0))
    cfg.unsafe_store(0, UInt8(1))
    for tile in range(8):
        cfg.unsafe_store(16 + 2 * tile, UInt8(AMX_ROW_BYTES))  # bytes a row (a little-endian uint16)
        cfg.unsafe_store(48 + tile, UInt8(AMX_ROWS))
    inlined_assembly[".byte 0xc4,0xe2,0x78,0x49,0x07", NoneType, constraints="{rdi},~{memory}",
                     has_side_effect=True](cfg)


@always_inline
def amx_release():
    inlined_assembly[".byte 0xc4,0xe2,0x78,0x49,0xc0", NoneType, constraints="~{memory}", has_side_effect=True]()


@always_inline
def tile_zero[tile: Int]():
    comptime code = ".byte 0xc4,0xe2,0x7b,0x49," + String(0xC0 | (tile << 3))
    inlined_assembly[code, NoneType, constraints="~{memory}", has_side_effect=True]()


@always_inline
def tile_load[dtype: DType, //, tile: Int](address: Pointer[Scalar[dtype], MutAnyOrigin], stride: Int):
    """Loads 16 rows of 64 bytes, `stride` bytes apart, into `tile`."""
    comptime code = ".byte 0xc4,0xe2,0x7b,0x4b," + String(0x04 | (tile << 3)) + ",0x37"
    inlined_assembly[code, NoneType, constraints="{rdi},{rsi},~{memory}", has_side_effect=True](address, stride)


@always_inline
def tile_store[dtype: DType, //, tile: Int](address: Pointer[Scalar[dtype], MutAnyOrigin], stride: Int):
    """Stores `tile`'s 16 rows of 64 bytes, `stride` bytes apart."""
    comptime code = ".byte 0xc4,0xe2,0x7a,0x4b," + String(0x04 | (tile << 3)) + ",0x37"
    inlined_assembly[code, NoneType, constraints="{rdi},{rsi},~{memory}", has_side_effect=True](address, stride)


@always_inline
def tile_dpbusd[c: Int, a: Int, b: Int]():
    """Tile c += a (16 rows of 64 unsigned bytes) x b (16 rows of 16 columns x 4 signed bytes), per
    int32 the sum of four products, as vpdpbusd's lanes."""
    comptime code = ".byte 0xc4,0xe2," + String(((15 - b) << 3) | 1) + ",0x5e," + String(0xC0 | (c << 3) | a)
    inlined_assembly[code, NoneType, constraints="~{memory}", has_side_effect=True]()


@always_inline
def tile_dpbf16ps[c: Int, a: Int, b: Int]():
    """Tile c (16 x 16 fp32) += a (16 rows of 32 bf16) x b (16 rows of 16 columns x 2 bf16): per fp32
    the sum of two products, a row's pair k times b's row k."""
    comptime code = ".byte 0xc4,0xe2," + String(((15 - b) << 3) | 2) + ",0x5c," + String(0xC0 | (c << 3) | a)
    inlined_assembly[code, NoneType, constraints="~{memory}", has_side_effect=True]()
