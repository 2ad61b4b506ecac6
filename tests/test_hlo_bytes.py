"""segnext_jax.hlo_bytes: per-operation bytes of optimised HLO, checked against hand-counted programs."""

import jax
import jax.numpy as jnp

from segnext_jax import hlo_bytes


def test_shape_bytes_pads_to_the_layouts_tile():
    # bf16[4,128,128,32] with W (dim 2) minor-most, then C (dim 3): tile (8, 128) pads neither (32 % 8, 128 % 128)
    assert hlo_bytes.shape_bytes("bf16", "4,128,128,32", "{2,3,1,0:T(8,128)(2,1)}") == 4 * 128 * 128 * 32 * 2
    # C minor-most: 32 -> 128 lanes, W 128 stays: four times the logical size
    assert hlo_bytes.shape_bytes("bf16", "4,128,128,32", "{3,2,1,0:T(8,128)(2,1)}") == 4 * 128 * 128 * 128 * 2
    # f32[3,5] tiled (8, 128): 8 x 128 floats
    assert hlo_bytes.shape_bytes("f32", "3,5", "{1,0:T(8,128)}") == 8 * 128 * 4
    assert hlo_bytes.shape_bytes("s32", "", None) == 4
    assert hlo_bytes.shape_bytes("f32", "10,7", "{1,0}") == 280


HLO = """HloModule example, entry_computation_layout={(f32[1024]{0})->f32[1024]{0}}

%fused_add (p0: f32[1024]) -> f32[1024] {
  %p0 = f32[1024]{0} parameter(0)
  %c = f32[] constant(1)
  %b = f32[1024]{0} broadcast(%c), dimensions={}
  ROOT %add = f32[1024]{0} add(%p0, %b), metadata={op_name="jit(f)/while/body/add"}
}

%body (state: (s32[], f32[1024])) -> (s32[], f32[1024]) {
  %state = (s32[], f32[1024]{0}) parameter(0)
  %i = s32[] get-tuple-element(%state), index=0
  %x = f32[1024]{0} get-tuple-element(%state), index=1
  %one = s32[] constant(1)
  %next = s32[] add(s32[] %i, s32[] %one)
  %y = f32[1024]{0} fusion(f32[1024]{0} %x), kind=kLoop, calls=%fused_add, metadata={op_name="jit(f)/while/body/add"}
  ROOT %t = (s32[], f32[1024]{0}) tuple(%next, %y)
}

%condition (state: (s32[], f32[1024])) -> pred[] {
  %state = (s32[], f32[1024]{0}) parameter(0)
  %i = s32[] get-tuple-element(%state), index=0
  %n = s32[] constant(7)
  ROOT %lt = pred[] compare(s32[] %i, s32[] %n), direction=LT
}

ENTRY %main (x: f32[1024]) -> f32[1024] {
  %x = f32[1024]{0} parameter(0)
  %zero = s32[] constant(0)
  %init = (s32[], f32[1024]{0}) tuple(%zero, %x)
  %loop = (s32[], f32[1024]{0}) while((s32[], f32[1024]{0}) %init), condition=%condition, body=%body
  %out = f32[1024]{0} get-tuple-element(%loop), index=1
  %start = (f32[1024]{0}, f32[1024]{0:S(1)}, u32[]) copy-start(%out)
  %done = f32[1024]{0:S(1)} copy-done(%start)
  ROOT %copy = f32[1024]{0} copy(f32[1024]{0} %done), metadata={op_name="jit(f)/copy"}
}
"""


def test_loop_bodies_count_once_per_trip():
    ops = {op.name: op for op in hlo_bytes.operations(HLO)}
    assert ops["y"].trips == 7
    assert ops["y"].bytes == 7 * (4096 + 4096)  # reads x, writes y, seven times
    assert ops["y"].opcode == "fusion:kLoop"
    assert ops["copy"].bytes == 4096 + 4096 and ops["copy"].trips == 1
    assert ops["next"].bytes == 7 * 12  # the counter's add: two s32 in, one out
    assert ops["start"].bytes == 4096 + 4096 and "done" not in ops  # an asynchronous copy counts once
    assert list(hlo_bytes.by_source(list(ops.values())))[0] == "fwd add"


def test_a_compiled_scan_is_counted_per_iteration():
    def f(x):
        return jax.lax.scan(lambda carry, _: (jnp.sin(carry) * 2.0, None), x, None, length=5)[0]

    text = jax.jit(f).lower(jax.ShapeDtypeStruct((256, 1024), jnp.float32)).compile().as_text()
    heavy = [op for op in hlo_bytes.operations(text) if op.bytes >= 256 * 1024 * 4]
    body = [op for op in heavy if op.trips == 5]
    assert body, [(op.name, op.trips) for op in heavy]
    # the sine and the product fuse into one pass over the carry per iteration: read 1 MiB, write 1 MiB
    assert min(op.bytes for op in body) == 5 * 2 * 256 * 1024 * 4
