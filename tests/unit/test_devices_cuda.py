"""memprop.devices.cuda without a GPU: NVML through a fake ``pynvml`` module, and the device
numbering between CUDA and NVML."""

from __future__ import annotations

import sys
import types
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from memprop.devices import cuda, get_device, gpu_layers
from memprop.devices.cpu import CpuDevice
from memprop.errors import DeviceUnavailableError, UsageError

GIB = 1024**3
PID = 4242


class FakeNvmlError(Exception):
    pass


def fake_pynvml(*, init_error: Exception | None = None, processes: Any = None,
                uuids: tuple[str, ...] = ()) -> types.ModuleType:
    """A ``pynvml`` stand-in: 80 GiB GPUs with 30 GiB used; ``processes`` is a list of
    (pid, used bytes) or an exception the per-process query raises."""
    module = types.ModuleType("pynvml")
    calls: dict[str, Any] = {"init": 0, "shutdown": 0, "index": [], "uuid": []}

    def init() -> None:
        calls["init"] += 1
        if init_error is not None:
            raise init_error

    def shutdown() -> None:
        calls["shutdown"] += 1

    def by_index(index: int) -> str:
        calls["index"].append(index)
        return f"index:{index}"

    def by_uuid(uuid: str) -> str:
        calls["uuid"].append(uuid)
        if uuid not in uuids:
            raise FakeNvmlError("NVML_ERROR_NOT_FOUND")
        return f"uuid:{uuid}"

    def running(handle: str) -> list[Any]:
        if isinstance(processes, Exception):
            raise processes
        return [SimpleNamespace(pid=pid, usedGpuMemory=used) for pid, used in processes or []]

    module.NVMLError = FakeNvmlError  # type: ignore[attr-defined]
    module.nvmlInit = init  # type: ignore[attr-defined]
    module.nvmlShutdown = shutdown  # type: ignore[attr-defined]
    module.nvmlDeviceGetHandleByIndex = by_index  # type: ignore[attr-defined]
    module.nvmlDeviceGetHandleByUUID = by_uuid  # type: ignore[attr-defined]
    module.nvmlDeviceGetMemoryInfo = (  # type: ignore[attr-defined]
        lambda handle: SimpleNamespace(total=80 * GIB, free=50 * GIB, used=30 * GIB))
    module.nvmlDeviceGetComputeRunningProcesses = running  # type: ignore[attr-defined]
    module.nvmlSystemGetDriverVersion = lambda: b"550.54.15"  # type: ignore[attr-defined]
    module.calls = calls  # type: ignore[attr-defined]
    return module


@pytest.fixture
def session(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """A fresh NVML session; the returned list collects what it registers with atexit."""
    monkeypatch.setattr(cuda, "_session", cuda._NvmlSession())
    registered: list[Any] = []
    monkeypatch.setattr(cuda.atexit, "register", registered.append)
    return registered


def test_a_missing_package_is_a_sentence(monkeypatch: pytest.MonkeyPatch,
                                         session: list[Any]) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes ``import pynvml`` fail
    assert "pip install nvidia-ml-py" in cuda.nvml_status()
    assert cuda.nvml_memory(uuid=None, index=0) is None
    assert session == []


def test_an_nvml_error_at_start_is_a_sentence(monkeypatch: pytest.MonkeyPatch,
                                              session: list[Any]) -> None:
    fake = fake_pynvml(init_error=FakeNvmlError("Driver Not Loaded"))
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    status = cuda.nvml_status()
    assert "nvmlInit failed" in status and "Driver Not Loaded" in status
    assert cuda.nvml_memory(uuid=None, index=0) is None
    assert fake.calls["init"] == 1 and session == []  # tried once, never again


def test_a_broken_library_is_a_sentence(monkeypatch: pytest.MonkeyPatch,
                                        session: list[Any]) -> None:
    fake = fake_pynvml(init_error=OSError("libnvidia-ml.so.1: cannot open shared object file"))
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    assert "libnvidia-ml.so.1" in cuda.nvml_status()


def test_nvml_starts_once_and_stops_at_exit(monkeypatch: pytest.MonkeyPatch,
                                            session: list[Any]) -> None:
    fake = fake_pynvml(processes=[(PID, 3 * GIB)])
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    for _ in range(3):
        assert cuda.nvml_status() == "ok"
        assert cuda.nvml_memory(uuid=None, index=0, pid=PID) is not None
    assert fake.calls["init"] == 1 and fake.calls["shutdown"] == 0
    assert len(session) == 1
    session[0]()  # what atexit runs
    session[0]()  # twice is harmless
    assert fake.calls["shutdown"] == 1


def test_this_process_s_figures(monkeypatch: pytest.MonkeyPatch, session: list[Any]) -> None:
    fake = fake_pynvml(processes=[(1, 7 * GIB), (PID, 3 * GIB)])
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    memory = cuda.nvml_memory(uuid=None, index=0, pid=PID)
    assert memory == cuda.NvmlMemory(total_bytes=80 * GIB, free_bytes=50 * GIB,
                                     used_bytes=30 * GIB, process_bytes=3 * GIB,
                                     process_note="ok")


@pytest.mark.parametrize(("processes", "note"), [
    (FakeNvmlError("Insufficient Permissions"), "refused per-process figures"),
    ([(1, 7 * GIB)], "PID namespace"),
    ([(PID, None)], "without a figure"),
    ([(PID, 2**64 - 1)], "without a figure"),  # NVML_VALUE_NOT_AVAILABLE
])
def test_per_process_figures_refused(monkeypatch: pytest.MonkeyPatch, session: list[Any],
                                     processes: Any, note: str) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(processes=processes))
    memory = cuda.nvml_memory(uuid=None, index=0, pid=PID)
    assert memory is not None and memory.used_bytes == 30 * GIB
    assert memory.process_bytes is None and note in memory.process_note


def test_gpus_are_found_by_uuid_then_by_index(monkeypatch: pytest.MonkeyPatch,
                                              session: list[Any]) -> None:
    fake = fake_pynvml(uuids=("MIG-abc",))
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    cuda.nvml_memory(uuid="abc", index=3)
    assert fake.calls["uuid"] == ["GPU-abc", "MIG-abc"] and fake.calls["index"] == []
    cuda.nvml_memory(uuid="zzz", index=3)
    assert fake.calls["index"] == [3]
    cuda.nvml_memory(uuid=None, index=1)
    assert fake.calls["index"] == [3, 1]


@pytest.mark.parametrize(("index", "visible", "expected"), [
    (0, None, 0),
    (1, None, 1),
    (0, "2,3", 2),
    (1, "2, 3", 3),
    (1, "GPU-8932f937,GPU-1234", 1),  # UUIDs: found by UUID instead
    (4, "0,1", 4),
])
def test_nvml_index_follows_cuda_visible_devices(index: int, visible: str | None,
                                                 expected: int) -> None:
    assert cuda.nvml_index(index, visible) == expected


def test_no_gpu_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # whatever this machine has
    with pytest.raises(DeviceUnavailableError, match="use the CPU"):
        get_device("cuda")
    with pytest.raises(DeviceUnavailableError, match="no CUDA GPU"):
        get_device("cuda:1")


@pytest.mark.parametrize("name", ["cuda:x", "cuda:-1", "cuda1", "gpu"])
def test_malformed_devices(name: str) -> None:
    with pytest.raises(UsageError):
        get_device(name)


@pytest.fixture
def two_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.cuda pretending to see two GPUs (nothing is allocated on them)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    properties = SimpleNamespace(name="NVIDIA Test GPU", total_memory=80 * GIB, uuid="u1")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: properties)


def test_device_numbering(monkeypatch: pytest.MonkeyPatch, two_gpus: None) -> None:
    assert cuda.CudaDevice("cuda").name == "cuda:0"
    device = cuda.CudaDevice("cuda:1")
    assert device.index == 1 and device.torch_device == torch.device("cuda", 1)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6")
    assert device._nvml_index() == 6
    with pytest.raises(DeviceUnavailableError, match=r"sees 2 GPU\(s\) \(CUDA_VISIBLE_DEVICES"):
        cuda.CudaDevice("cuda:2")


def test_describe_names_the_gpu_and_driver(monkeypatch: pytest.MonkeyPatch, session: list[Any],
                                           two_gpus: None) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(uuids=("GPU-u1",),
                                                           processes=[(1, GIB)]))
    described = cuda.CudaDevice("cuda:1").describe()
    assert described["name"] == "NVIDIA Test GPU" and described["index"] == 1
    assert described["nvml"] == "ok" and described["driver"] == "550.54.15"
    assert described["nvml_used_bytes"] == 30 * GIB
    assert described["process_bytes"] is None and "PID" in described["process_note"]


def test_describe_without_nvml(monkeypatch: pytest.MonkeyPatch, session: list[Any],
                               two_gpus: None) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)
    described = cuda.CudaDevice("cuda:0").describe()
    assert "nvidia-ml-py" in described["nvml"] and "driver" not in described
    assert described["total_bytes"] == 80 * GIB


def test_gpu_layers_only_for_a_gpu() -> None:
    assert gpu_layers(CpuDevice(), 1024) is None
    assert gpu_layers(None, 1024) is None
