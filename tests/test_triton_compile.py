"""Every Triton kernel compiles ahead of time to cubin for sm_80 and sm_90 (no GPU needed),
without spills, and with 64-bit pointer offsets (tests/triton_compile.py builds them)."""

from __future__ import annotations

import pytest

triton = pytest.importorskip("triton", reason="triton is not installed")
pytestmark = pytest.mark.gpu_proof

from triton_compile import ARCHS, SOLVERS, compile_all, offset_types, specialisations  # noqa: E402

KERNELS = ("_bogc_kernel", "_combine_gram_kernel", *SOLVERS)


@pytest.fixture(scope="module")
def rows():
    return compile_all()


def test_every_specialisation_compiles_for_every_arch(rows):
    assert len(rows) == len(specialisations()) * len(ARCHS)
    errors = [f"{r['name']}: {r['error']}" for r in rows if "error" in r]
    assert not errors, "compile errors:\n" + "\n".join(errors)
    assert {r["arch"] for r in rows} == {f"sm_{a}" for a in ARCHS}
    assert {r["kernel"] for r in rows} == set(KERNELS)
    assert all(r["cubin_bytes"] > 0 for r in rows)


def test_no_build_spills_registers(rows):
    spills = [f"{r['name']}: {r['spill_stores']}/{r['spill_loads']} B" for r in rows if r["spill_stores"] or r["spill_loads"]]
    assert not spills, "local-memory spills:\n" + "\n".join(spills)
    assert all(0 < r["registers"] <= 255 for r in rows)


def test_pointer_offsets_are_64_bit_where_they_can_pass_2_31(rows):
    """row * n and program * BLOCK exceed 2**31 on a large buffer although n fits in 32
    bits: every offset the kernels add to a pointer is computed in 64 bits (the solvers
    only index M x M Gram matrices, M <= 16)."""
    for r in rows:
        if r["kernel"] not in SOLVERS:
            assert r["offset_types"] == ["i64"], (r["name"], r["offset_types"])


def test_the_offset_reader_sees_a_32_bit_offset():
    """The check above can fail: the reader finds i32 tensor and scalar offsets, and lets
    only compile-time constants through."""
    ttir = ("%k = arith.constant 3 : i32 loc(#loc0)\n"
            "%x = tt.addptr %g_ptr, %offs : tensor<512x!tt.ptr<f32>>, tensor<512xi32> loc(#loc1)\n"
            "%y = tt.addptr %g_ptr, %n : !tt.ptr<f32>, i32 loc(#loc2)\n"
            "%z = tt.addptr %g_ptr, %k : !tt.ptr<f32>, i32 loc(#loc3)\n")
    assert offset_types(ttir) == ["i32"]
    assert offset_types(ttir.replace("%n :", "%k :").replace("tensor<512xi32>", "tensor<512xi64>")) == ["i64"]
