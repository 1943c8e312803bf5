import psutil
import pytest

from memprop.budget import resolve_budget
from memprop.devices.reconcile import reconcile
from memprop.errors import MemPropError


def test_sizes_and_percentages() -> None:
    assert resolve_budget("1.5GiB").bytes == 1610612736
    assert resolve_budget(1000).bytes == 1000
    total = psutil.virtual_memory().total
    half = resolve_budget("50%")
    assert half.bytes == int(total * 0.5) and "50%" in half.source


def test_default_is_what_the_device_has_free() -> None:
    budget = resolve_budget(None)
    assert 0 < budget.bytes <= psutil.virtual_memory().total
    assert "available" in budget.source


@pytest.mark.parametrize("text", ["0%", "150%", "lots"])
def test_bad_budgets(text: str) -> None:
    with pytest.raises(MemPropError):
        resolve_budget(text)


def test_reconciliation_explains_each_gap() -> None:
    gib = 1024**3
    layers = reconcile(tensor_bytes=10 * gib, reserved_bytes=14 * gib, process_bytes=15 * gib,
                       device_used_bytes=18 * gib, device_total_bytes=80 * gib)
    assert [layer.bytes for layer in layers] == [10 * gib, 14 * gib, 15 * gib, 18 * gib]
    assert [layer.gap_bytes for layer in layers] == [0, 4 * gib, 1 * gib, 3 * gib]
    assert "expandable_segments" in (layers[1].advice or "")   # 1.4x: fragmentation advice
    assert layers[2].advice is None                              # a 1 GiB context is normal
    assert "another process" in (layers[3].advice or "")


def test_reconciliation_without_nvml() -> None:
    layers = reconcile(tensor_bytes=100, reserved_bytes=120, process_bytes=None,
                       device_used_bytes=None, device_total_bytes=None)
    assert len(layers) == 2 and layers[1].advice is None
