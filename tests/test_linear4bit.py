"""Linear4bit: forward against float64, state-dict round trips in bitsandbytes / AWQ layouts, loading a
bitsandbytes checkpoint file without re-quantizing, and malformed checkpoints."""

import json

import pytest
import torch
from safetensors.torch import save_file

from kindred import ops
from kindred.errors import KindredFormatError, KindredValueError
from kindred.formats import nf4_from_bnb
from kindred.nn import Linear4bit, load_linear4bit

from .helpers import randn
from .tolerances import REL_ERR, rel_err


def make_linear(k=256, n=96, bias=True, seed=0):
    lin = torch.nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(randn((n, k), seed=seed))
        if bias:
            lin.bias.copy_(randn((n,), seed=seed + 1))
    return lin


@pytest.mark.parametrize("quant", ["nf4", "int4g"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("lead", [(1,), (3,), (2, 117)])
def test_forward_matches_float64(quant, dtype, lead):
    layer = Linear4bit.from_linear(make_linear(), quant=quant)
    x = randn((*lead, 256), seed=3, scale=1.0)
    w64 = layer.dequantize(torch.float32).double()
    ref = torch.nn.functional.linear(x.double(), w64, layer.bias.double())
    out = layer(x.to(dtype))
    assert out.shape == (*lead, 96) and out.dtype == dtype
    assert rel_err(out, ref) < REL_ERR[dtype]


def test_quantization_error_is_what_4_bits_give():
    lin = make_linear(512, 128)
    for quant, bound in (("nf4", 0.12), ("int4g", 0.12)):
        layer = Linear4bit.from_linear(lin, quant=quant)
        assert rel_err(layer.dequantize(torch.float32), lin.weight.detach()) < bound
        assert 4.0 < layer.quantized.bits_per_weight < 4.6
        assert not any(p.requires_grad for p in layer.parameters())


def test_nf4_state_dict_round_trip_uses_bitsandbytes_keys(tmp_path):
    layer = Linear4bit.from_linear(make_linear(), quant="nf4")
    sd = layer.state_dict()
    assert set(sd) == {
        "bias",
        "weight",
        "weight.absmax",
        "weight.quant_map",
        "weight.nested_absmax",
        "weight.nested_quant_map",
        "weight.quant_state.bitsandbytes__nf4",
    }
    assert sd["weight"].shape == (96 * 256 // 2, 1) and sd["weight"].dtype == torch.uint8
    state = json.loads(bytes(sd["weight.quant_state.bitsandbytes__nf4"].tolist()))
    assert state["quant_type"] == "nf4" and state["shape"] == [96, 256] and state["blocksize"] == 64
    fresh = Linear4bit.from_linear(make_linear(seed=9), quant="nf4")
    fresh.load_state_dict(sd)
    x = randn((5, 256), seed=4, scale=1.0)
    assert torch.equal(fresh(x), layer(x))
    save_file(
        {f"model.layers.0.mlp.up_proj.{k}": v.contiguous() for k, v in sd.items()}, tmp_path / "m.safetensors"
    )
    loaded = load_linear4bit(tmp_path / "m.safetensors", "model.layers.0.mlp.up_proj")
    assert torch.equal(loaded(x), layer(x))


def test_int4g_state_dict_round_trip_uses_awq_keys():
    layer = Linear4bit.from_linear(make_linear(256, 64), quant="int4g")
    sd = layer.state_dict()
    assert set(sd) == {"bias", "qweight", "qzeros", "scales"}
    assert sd["qweight"].shape == (256, 8) and sd["scales"].shape == (2, 64)
    fresh = Linear4bit.from_linear(make_linear(256, 64, seed=5), quant="int4g")
    fresh.load_state_dict(sd)
    x = randn((3, 256), seed=6, scale=1.0)
    assert torch.equal(fresh(x), layer(x))


def test_loads_a_checkpoint_written_by_bitsandbytes(tmp_path):
    F = pytest.importorskip("bitsandbytes.functional")
    lin = make_linear(512, 64).to(torch.bfloat16)
    packed, state = F.quantize_4bit(
        lin.weight.detach(), blocksize=64, compress_statistics=True, quant_type="nf4"
    )
    # transformers writes the layer's state dict: the packed weight, its quant state, then the bias.
    tensors = {"lm.q_proj.weight": packed, "lm.q_proj.bias": lin.bias.detach()}
    tensors.update({f"lm.q_proj.weight.{k}": v for k, v in state.as_dict(packed=True).items()})
    save_file(tensors, tmp_path / "model.safetensors")
    layer = load_linear4bit(tmp_path / "model.safetensors", "lm.q_proj")
    assert layer.quantized.double_quant and layer.quantized.dtype == torch.bfloat16
    assert torch.equal(layer.dequantize(), F.dequantize_4bit(packed, state))  # no re-quantization
    x = randn((2, 512), torch.bfloat16, seed=1, scale=1.0)
    ref = torch.nn.functional.linear(x.double(), F.dequantize_4bit(packed, state).double(), lin.bias.double())
    assert rel_err(layer(x), ref) < REL_ERR[torch.bfloat16]


def test_bitsandbytes_reads_what_kindred_writes():
    F = pytest.importorskip("bitsandbytes.functional")
    layer = Linear4bit.from_linear(make_linear(), quant="nf4")
    sd = layer.state_dict()
    qs = {k[len("weight.") :]: v for k, v in sd.items() if k.startswith("weight.")}
    state = F.QuantState.from_dict(qs, device=torch.device("cpu"))
    assert torch.equal(F.dequantize_4bit(sd["weight"], state), layer.dequantize())


def _bnb_dict(double_quant=True):
    layer = Linear4bit(ops.quantize_nf4(randn((32, 128)), 64, double_quant))
    return layer.state_dict()


def test_malformed_bnb_state_is_named():
    sd = _bnb_dict()
    key = "weight.quant_state.bitsandbytes__nf4"
    blob = bytes(sd[key].tolist()).replace(b'"blocksize": 64', b'"blocksize": 64,,')
    broken = dict(sd, **{key: torch.tensor(list(blob), dtype=torch.uint8)})
    with pytest.raises(KindredFormatError, match=r"malformed JSON at byte \d+"):
        nf4_from_bnb(broken, source="ckpt.safetensors")
    with pytest.raises(KindredFormatError, match=r"missing tensor 'weight\.nested_absmax'"):
        nf4_from_bnb({k: v for k, v in sd.items() if k != "weight.nested_absmax"})
    with pytest.raises(KindredFormatError, match="has 2047 bytes, expected 2048"):
        nf4_from_bnb(dict(sd, weight=sd["weight"][:-1]))
    fp4 = {k.replace("__nf4", "__fp4"): v for k, v in sd.items()}
    with pytest.raises(KindredFormatError, match="kindred reads NF4 only"):
        nf4_from_bnb(fp4)
    bad_map = dict(sd, **{"weight.quant_map": torch.linspace(-1, 1, 16)})
    with pytest.raises(KindredFormatError, match="not the NF4 codebook"):
        nf4_from_bnb(bad_map)
    truncated = dict(sd, **{"weight.absmax": sd["weight.absmax"][:10]})
    with pytest.raises(KindredFormatError, match=r"'weight\.absmax' has 10 entries, expected 64"):
        nf4_from_bnb(truncated)


def test_bad_files_and_shapes(tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(KindredFormatError, match=r"junk\.safetensors: not a readable safetensors file"):
        load_linear4bit(junk, "x")
    plain = tmp_path / "plain.safetensors"
    save_file({"x.weight": torch.ones(4, 4)}, plain)
    with pytest.raises(KindredFormatError, match="no bitsandbytes quant_state"):
        load_linear4bit(plain, "x")
    with pytest.raises(KindredFormatError, match="no tensors under 'y'"):
        load_linear4bit(plain, "y")
    layer = Linear4bit.from_linear(make_linear())
    with pytest.raises(KindredValueError, match="in_features=256"):
        layer(torch.ones(2, 255))
    with pytest.raises(KindredValueError, match="quant must be one of"):
        Linear4bit.from_linear(make_linear(), quant="fp4")
    other = Linear4bit.from_linear(make_linear(128, 96))
    with pytest.raises(RuntimeError, match=r"checkpoint shape \(96, 256\)"):
        other.load_state_dict(layer.state_dict())


@pytest.mark.gpu
def test_forward_on_cuda_matches_cpu():
    layer = Linear4bit.from_linear(make_linear(), quant="nf4")
    x = randn((7, 256), torch.bfloat16, seed=2, scale=1.0)
    gpu = Linear4bit.from_linear(make_linear().cuda(), quant="nf4")
    assert torch.equal(gpu.dequantize().cpu(), layer.dequantize())
    assert rel_err(gpu(x.cuda()), layer(x)) < REL_ERR[torch.bfloat16]
    moved = layer.to("cuda")
    assert moved.quantized.packed.is_cuda and torch.equal(moved.dequantize().cpu(), gpu.dequantize().cpu())


@pytest.mark.gpu
@pytest.mark.parametrize("quant", ["nf4", "int4g"])
def test_decode_layout_is_cached_on_cuda_and_never_saved(quant):
    layer = Linear4bit.from_linear(make_linear(256, 96).cuda(), quant=quant)
    assert layer.decode_weight(build=False) is None
    x = randn((3, 256), torch.bfloat16, seed=5, scale=1.0, device="cuda")
    with torch.no_grad():
        out = layer(x)  # builds the decode layout once and uses it
    d = layer.decode_weight(build=False)
    assert d is not None and d.data.is_cuda
    assert layer.decode_weight().data.data_ptr() == d.data.data_ptr()  # cached, not rebuilt
    w64 = layer.dequantize(torch.float32).double()
    ref = torch.nn.functional.linear(x.double(), w64, layer.bias.double())
    assert rel_err(out, ref) < REL_ERR[torch.bfloat16]
    assert not any(k.startswith("_decode") for k in layer.state_dict())
    fresh = Linear4bit.from_linear(make_linear(256, 96, seed=9).cuda(), quant=quant)
    with torch.no_grad():
        fresh(x)
    fresh.load_state_dict(layer.state_dict())  # a new weight drops the stale decode layout
    assert fresh.decode_weight(build=False) is None
    with torch.no_grad():
        assert torch.equal(fresh(x), out)
    cpu = layer.to("cpu")  # the cached layout moves with the module
    assert cpu.decode_weight(build=False).data.device.type == "cpu"
