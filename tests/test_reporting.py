"""The TensorBoard writer: scalars a reader finds in the event file, without importing PyTorch."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

from tests.conftest import REPO_ROOT


def _scalars(event_file: Path) -> dict[str, list[tuple[int, float]]]:
    """(step, value) per tag, read from the TFRecord framing of an event file."""
    from tensorboardX.proto import event_pb2  # noqa: PLC0415

    data, offset, found = event_file.read_bytes(), 0, {}
    while offset < len(data):
        (length,) = struct.unpack_from("<Q", data, offset)
        record = data[offset + 12: offset + 12 + length]  # after the length and its CRC
        offset += 12 + length + 4  # then the record's CRC
        event = event_pb2.Event.FromString(record)
        for value in event.summary.value:
            found.setdefault(value.tag, []).append((event.step, value.simple_value))
    return found


def test_scalars_are_written_and_torch_is_not_imported(tmp_path: Path) -> None:
    # A fresh interpreter: the test session may have imported torch already (parity tests).
    script = textwrap.dedent(f"""
        import json, sys
        from vcp_jax import reporting
        writer = reporting.metric_writer({str(tmp_path)!r})
        reporting.write_scalars(writer, 3, {{"loss": 1.5, "nan": float("nan"), "name": "x"}},
                                prefix="train/")
        reporting.write_scalars(writer, 6, {{"loss": 0.25}}, prefix="train/")
        writer.close()
        imported = "torch" in sys.modules
        try:
            import torch  # still importable afterwards, where installed
            importable = True
        except ImportError:
            importable = None
        print(json.dumps({{"torch_imported": imported, "torch_importable": importable}}))
    """)
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True,
                         text=True, timeout=300, check=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    assert result["torch_imported"] is False
    assert result["torch_importable"] in (True, None)
    (event_file,) = (tmp_path / "tensorboard").iterdir()
    # Only finite numbers become scalars: the NaN and the string are left out.
    assert _scalars(event_file) == {"train/loss": [(3, 1.5), (6, 0.25)]}
