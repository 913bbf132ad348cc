"""Which device, dtype and weight formats a node runs in (`williw.devices`): every branch of the decision on
made-up facts, the real probe on this machine, and `williw node` refusing a device it lacks before registering."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from williw.devices import (
    Facts,
    choose_device,
    choose_dtype,
    choose_weights,
    decide,
    describe_device,
    probe,
    resolve_device,
    resolve_dtype,
    resolve_node,
)
from williw.errors import DeviceError
from williw.precision import WEIGHTS

NONE = Facts()
TWO_AMPERE = Facts(cuda_available=True, cuda_count=2, bf16_supported=True)
ONE_TURING = Facts(cuda_available=True, cuda_count=1, bf16_supported=False)
MAC = Facts(mps_available=True)
NO_CUDA = "torch sees no CUDA device (torch.cuda.is_available() is False); use --device cpu or auto"
NO_MPS = ("device 'mps' is not available here: torch sees no MPS device (torch.backends.mps.is_available() is "
          "False); use --device cpu or auto")


@pytest.mark.parametrize(("spec", "facts", "device"), [
    ("auto", TWO_AMPERE, "cuda:0"),  # CUDA first, even where MPS would be there too
    ("auto", Facts(cuda_available=True, cuda_count=1, mps_available=True), "cuda:0"),
    ("auto", MAC, "mps"),  # then MPS
    ("auto", NONE, "cpu"),  # then the CPU
    ("auto", Facts(cuda_available=True, cuda_count=0), "cpu"),  # available but no device: not usable
    ("cpu", TWO_AMPERE, "cpu"),
    ("cuda", TWO_AMPERE, "cuda:0"),
    ("cuda:1", TWO_AMPERE, "cuda:1"),
    ("cuda:0", ONE_TURING, "cuda:0"),
    ("mps", MAC, "mps"),
])
def test_choose_device(spec, facts, device):
    assert choose_device(spec, facts) == device


@pytest.mark.parametrize(("spec", "facts", "message"), [
    ("cuda", NONE, f"device 'cuda' is not available here: {NO_CUDA}"),
    ("cuda:0", MAC, f"device 'cuda:0' is not available here: {NO_CUDA}"),
    ("cuda", Facts(cuda_available=True, cuda_count=0), f"device 'cuda' is not available here: {NO_CUDA}"),
    ("cuda:2", TWO_AMPERE, "device 'cuda:2' is not available here: torch sees 2 CUDA devices (cuda:0 to cuda:1)"),
    ("cuda:1", ONE_TURING, "device 'cuda:1' is not available here: torch sees 1 CUDA device (cuda:0)"),
    ("mps", TWO_AMPERE, NO_MPS),
    ("gpu", TWO_AMPERE, "device 'gpu' is not one of auto, cpu, cuda, cuda:N, mps"),
    ("cuda:", TWO_AMPERE, "device 'cuda:' is not one of auto, cpu, cuda, cuda:N, mps"),
    ("cuda:01", TWO_AMPERE, "device 'cuda:01' is not one of auto, cpu, cuda, cuda:N, mps"),
    ("mps:0", MAC, "device 'mps:0' is not one of auto, cpu, cuda, cuda:N, mps"),
    ("CPU", NONE, "device 'CPU' is not one of auto, cpu, cuda, cuda:N, mps"),
])
def test_choose_device_refuses_in_one_line(spec, facts, message):
    with pytest.raises(DeviceError) as exc:
        choose_device(spec, facts)
    assert str(exc.value) == message


@pytest.mark.parametrize(("spec", "device", "weights", "facts", "dtype"), [
    ("auto", "cuda:0", "as-stored", TWO_AMPERE, "bfloat16"),
    ("auto", "cuda:0", "int4", TWO_AMPERE, "bfloat16"),
    ("auto", "cuda:0", "as-stored", ONE_TURING, "float16"),  # no native bfloat16
    ("auto", "mps", "as-stored", MAC, "float16"),
    ("auto", "mps", "int8", MAC, "float16"),
    ("auto", "cpu", "as-stored", NONE, "float32"),
    ("auto", "cpu", "int8", NONE, "bfloat16"),  # torch's int8/int4 CPU kernels are fast with bfloat16
    ("auto", "cpu", "int4", NONE, "bfloat16"),
    ("float32", "cuda:1", "as-stored", TWO_AMPERE, "float32"),
    ("float16", "cpu", "int8", NONE, "float16"),
    ("bfloat16", "cpu", "as-stored", NONE, "bfloat16"),
    ("bfloat16", "cuda:0", "as-stored", TWO_AMPERE, "bfloat16"),
    ("bfloat16", "mps", "as-stored", MAC, "bfloat16"),
])
def test_choose_dtype(spec, device, weights, facts, dtype):
    assert choose_dtype(spec, device, weights, facts) == dtype


@pytest.mark.parametrize(("spec", "device", "facts", "message"), [
    ("bfloat16", "cuda:0", ONE_TURING, "dtype 'bfloat16' cannot run on cuda:0: it has no native bfloat16 "
                                       "(torch.cuda.is_bf16_supported() is False: compute capability below 8.0); "
                                       "use --dtype float16 or auto"),
    ("fp16", "cpu", NONE, "dtype 'fp16' is not one of auto, float32, bfloat16, float16"),
    ("float64", "cpu", NONE, "dtype 'float64' is not one of auto, float32, bfloat16, float16"),
])
def test_choose_dtype_refuses_in_one_line(spec, device, facts, message):
    with pytest.raises(DeviceError) as exc:
        choose_dtype(spec, device, "as-stored", facts)
    assert str(exc.value) == message


@pytest.mark.parametrize(("spec", "device", "dtype", "facts", "weights"), [
    ("as-stored", "cpu", "float32", NONE, ("as-stored",)),
    ("int4,int8", "cpu", "bfloat16", NONE, ("int8", "int4")),  # highest precision first
    ("auto", "cpu", "float32", NONE, WEIGHTS),
    ("auto", "cuda:0", "bfloat16", TWO_AMPERE, WEIGHTS),
    ("auto", "cuda:0", "float16", TWO_AMPERE, ("as-stored", "int8")),  # tinygemm computes in bfloat16
    ("auto", "cuda:0", "float16", ONE_TURING, ("as-stored", "int8")),  # tinygemm needs compute capability 8.0
    ("auto", "mps", "float16", MAC, ("as-stored", "int8")),  # no int4 kernel on MPS
    ("int4", "cuda:1", "bfloat16", TWO_AMPERE, ("int4",)),
    ("int8", "mps", "float16", MAC, ("int8",)),
])
def test_choose_weights(spec, device, dtype, facts, weights):
    assert choose_weights(spec, device, dtype, facts) == weights


@pytest.mark.parametrize(("spec", "device", "dtype", "facts", "message"), [
    ("int4", "mps", "float16", MAC, "weights 'int4' cannot run on mps at float16: torch has no int4 kernel for MPS; "
                                    "use --weights int8, as-stored or auto"),
    ("int8,int4", "cuda:0", "float16", ONE_TURING,
     "weights 'int4' cannot run on cuda:0 at float16: torch's CUDA int4 kernel (tinygemm) needs compute capability "
     "8.0 or more; use --weights int8, as-stored or auto"),
    ("int4", "cuda:0", "float32", TWO_AMPERE,
     "weights 'int4' cannot run on cuda:0 at float32: torch's CUDA int4 kernel (tinygemm) computes in bfloat16, not "
     "float32; use --weights int8, as-stored or auto"),
    ("int3", "cpu", "float32", NONE,
     "weights 'int3': expected auto or a comma-separated list of as-stored, int8, int4"),
    ("", "cpu", "float32", NONE, "weights '': expected auto or a comma-separated list of as-stored, int8, int4"),
])
def test_choose_weights_refuses_in_one_line(spec, device, dtype, facts, message):
    with pytest.raises(DeviceError) as exc:
        choose_weights(spec, device, dtype, facts)
    assert str(exc.value) == message


@pytest.mark.parametrize(("asked", "facts", "chosen"), [
    (("auto", "auto", "auto"), TWO_AMPERE, ("cuda:0", "bfloat16", WEIGHTS)),
    (("auto", "auto", "auto"), ONE_TURING, ("cuda:0", "float16", ("as-stored", "int8"))),
    (("auto", "auto", "auto"), MAC, ("mps", "float16", ("as-stored", "int8"))),
    (("auto", "auto", "auto"), NONE, ("cpu", "float32", WEIGHTS)),  # it accepts as-stored: float32
    (("auto", "auto", "int8,int4"), NONE, ("cpu", "bfloat16", ("int8", "int4"))),
    (("cpu", "auto", "as-stored"), TWO_AMPERE, ("cpu", "float32", ("as-stored",))),
])
def test_decide(asked, facts, chosen):
    assert decide(*asked, facts) == chosen


def test_a_bad_weights_spec_is_refused_before_the_dtype_is_chosen():
    with pytest.raises(DeviceError, match=r"^weights 'int2,int8': expected auto or a comma-separated list of "):
        decide("cpu", "auto", "int2,int8", NONE)


# -- the real probe, on this machine -------------------------------------------------------------------------

cpu_only = pytest.mark.skipif(probe("cuda").cuda_available or probe("mps").mps_available,
                              reason="this machine has a GPU: the CPU-only answers do not hold")


@cpu_only
def test_the_probe_on_this_cpu_machine():
    import torch

    assert probe("cuda") == probe("cuda:1") == probe("mps") == Facts(False, 0, False, False)
    assert (torch.cuda.is_available(), torch.backends.mps.is_available()) == (False, False)
    assert probe("cpu") == probe("auto") == NONE
    assert resolve_device("auto") == resolve_device("cpu") == "cpu"
    assert resolve_dtype("auto", "cpu", "as-stored") == "float32"
    assert resolve_dtype("auto", "cpu", "int4") == "bfloat16"
    for spec, message in [("cuda", f"device 'cuda' is not available here: {NO_CUDA}"),
                          ("cuda:1", f"device 'cuda:1' is not available here: {NO_CUDA}"), ("mps", NO_MPS)]:
        with pytest.raises(DeviceError) as exc:
            resolve_device(spec)
        assert str(exc.value) == message


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/cpuinfo")
def test_describe_this_cpu():
    import psutil

    lines = Path("/proc/cpuinfo").read_text().splitlines()
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    info = describe_device("cpu")
    assert info == {"kind": "cpu", "name": " ".join(names[0].split()) if names else info["name"],
                    "memory_bytes": psutil.virtual_memory().total}
    assert info["name"] and info["memory_bytes"] > 2**30


@cpu_only
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux device files")
def test_auto_on_a_linux_machine_without_gpu_files_never_imports_torch():
    # Importing torch costs every agent ~2 s before it registers; without /dev/nvidia*, /dev/kfd or /dev/dxg there
    # is no GPU torch could use.
    code = ("import sys; from williw.devices import resolve_node; n = resolve_node('auto', 'auto', 'int8'); "
            "print(n.device, n.kind, n.dtype, n.weights, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["cpu", "cpu", "bfloat16", "('int8',)", "False"]


def test_resolve_node_registers_the_kind_name_and_memory():
    node = resolve_node("cpu", "auto", "int4,as-stored")
    assert (node.device, node.kind, node.dtype, node.weights) == ("cpu", "cpu", "float32", ("as-stored", "int4"))
    assert node.registration() == {"device": "cpu", "device_name": describe_device("cpu")["name"],
                                   "dtype": "float32", "weights": ["as-stored", "int4"],
                                   "device_memory_bytes": describe_device("cpu")["memory_bytes"]}


# -- williw node ---------------------------------------------------------------------------------------------

@cpu_only
@pytest.mark.parametrize(("device", "message"), [
    ("cuda", f"device 'cuda' is not available here: {NO_CUDA}"),
    ("mps", NO_MPS),
])
def test_williw_node_refuses_a_device_it_lacks_before_registering(williw, tmp_path, device, message):
    # The worker's port is closed: had the agent tried to register, it would have failed otherwise.
    proc = williw("node", "--worker", "http://127.0.0.1:9", "--node-id", "n", "--compute-tflops", "1",
                  "--memory-gb", "1", "--data-dir", str(tmp_path / "data"), "--device", device, timeout=60)
    assert (proc.returncode, proc.stdout, proc.stderr) == (2, "", f"error: {message}\n")
    assert not (tmp_path / "data").exists()


def test_williw_node_refuses_a_bad_spec_in_one_line(williw, tmp_path):
    args = ("node", "--worker", "http://127.0.0.1:9", "--node-id", "n", "--compute-tflops", "1", "--memory-gb", "1",
            "--data-dir", str(tmp_path))
    proc = williw(*args, "--device", "gpu")
    assert (proc.returncode, proc.stderr) == (2, "error: williw node: Invalid value for '--device': device 'gpu' "
                                                 "is not one of auto, cpu, cuda, cuda:N, mps (see 'williw node "
                                                 "--help')\n")
    proc = williw(*args, "--weights", "int8,fp8")
    assert (proc.returncode, proc.stderr) == (2, "error: williw node: Invalid value for '--weights': weights "
                                                 "'int8,fp8': expected auto or a comma-separated list of as-stored, "
                                                 "int8, int4 (see 'williw node --help')\n")
